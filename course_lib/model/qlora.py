"""QLoRA: a frozen 4-bit base model plus trainable LoRA adapters (see notebook 03_qlora).

QLoRA = 4-bit NormalFloat base weights + LoRA in 16/32 bit + paged optimisers::

    y = dequant(W_nf4) x + scaling * B A x        (only A and B are trained)

:class:`QLoRAModel` does it in two steps, as the lesson's outline says:

1. **Quantise** every ``nn.Linear`` of the base model to 4 bits, except the modules named in
   ``QuantizationConfig.llm_int8_skip_modules`` (by default the output head, as transformers
   does), with one of two backends:

   - ``"bitsandbytes"``: ``bitsandbytes.nn.Linear4bit`` (the layer QLoRA uses in practice);
   - ``"torch"``: the course's :class:`NF4Linear`, built on ``course_lib.model.nf4`` (pure
     PyTorch, bit-identical NF4 codes).

2. **Add LoRA**: wrap the ``LoRAConfig.target_modules`` layers in
   ``course_lib.model.lora.LinearWithLoRA``.

:meth:`QLoRAModel.prepare_for_training` freezes everything but LoRA, keeps the norms (and every
other layer that is not quantised) in fp32, and can turn on gradient checkpointing.
:meth:`QLoRAModel.memory_footprint` measures the bytes of every tensor by kind.

The configuration uses transformers' ``BitsAndBytesConfig`` field names, so the same settings
work unchanged with ``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.model import nf4
from course_lib.model.lora import (
    LinearWithLoRA,
    LoRAConfig,
    LoRALayer,
    TrainableSummary,
    apply_lora,
    mark_only_lora_as_trainable,
)

__all__ = [
    "QuantizationConfig",
    "NF4Linear",
    "QLoRAModel",
    "MemoryFootprint",
    "quantize_model",
    "memory_footprint",
    "bitsandbytes_available",
    "BACKENDS",
    "QUANT_TYPES",
]

BACKENDS = ("bitsandbytes", "torch")
QUANT_TYPES = ("nf4", "fp4")
_COMPUTE_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def bitsandbytes_available() -> bool:
    """Whether ``bitsandbytes`` is installed (it is not imported here)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _bnb():
    # Importing course_lib first installs its filter for bitsandbytes' hub-kernel warning.
    import course_lib  # noqa: F401, I001
    import bitsandbytes as bnb

    return bnb


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class QuantizationConfig:
    """How the base model is quantised; field names follow transformers' ``BitsAndBytesConfig``."""

    load_in_4bit: bool = True  # QLoRA's base model is 4-bit; must be True here
    bnb_4bit_quant_type: str = "nf4"  # "nf4" (NormalFloat, QLoRA's choice) or "fp4"
    bnb_4bit_use_double_quant: bool = False  # quantise the absmax constants too (0.5 -> 0.127 bit)
    bnb_4bit_compute_dtype: torch.dtype | str = torch.float32  # dtype of the on-the-fly matmul
    llm_int8_skip_modules: list[str] | None = None  # kept in full precision; None: the output head
    blocksize: int = 64  # values per absmax block (course extra; transformers always uses 64)
    backend: str | None = None  # "bitsandbytes" (default when installed) or "torch" (NF4Linear)

    def __post_init__(self) -> None:
        if self.load_in_4bit is not True:
            raise ValueError(
                f"load_in_4bit must be True: QLoRAModel quantises the base model to 4 bits "
                f"(got {self.load_in_4bit!r}; for plain LoRA use course_lib.model.lora.apply_lora)"
            )
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(
                f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {self.bnb_4bit_quant_type!r}"
            )
        if not isinstance(self.bnb_4bit_use_double_quant, bool):
            raise ValueError(
                f"bnb_4bit_use_double_quant must be True or False, "
                f"got {self.bnb_4bit_use_double_quant!r}"
            )
        self.bnb_4bit_compute_dtype = _compute_dtype(self.bnb_4bit_compute_dtype)
        if self.llm_int8_skip_modules is not None:
            skip = self.llm_int8_skip_modules
            if isinstance(skip, str) or not all(isinstance(s, str) and s for s in skip):
                raise ValueError(
                    f"llm_int8_skip_modules must be None or a list of module names "
                    f"(e.g. ['lm_head']), got {skip!r}"
                )
            self.llm_int8_skip_modules = list(skip)
        nf4.check_blocksize(self.blocksize)
        if self.backend is None:
            self.backend = "bitsandbytes" if bitsandbytes_available() else "torch"
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "bitsandbytes" and not bitsandbytes_available():
            raise ValueError(
                "backend='bitsandbytes' needs the bitsandbytes package, which is not installed; "
                "install it (pip install bitsandbytes) or use backend='torch'"
            )
        if self.backend == "torch" and self.bnb_4bit_quant_type != "nf4":
            raise ValueError(
                f"backend='torch' (NF4Linear) implements only bnb_4bit_quant_type='nf4', got "
                f"{self.bnb_4bit_quant_type!r}; use backend='bitsandbytes' for fp4"
            )

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bnb_4bit_compute_dtype  # type: ignore[return-value]


def _compute_dtype(value: object) -> torch.dtype:
    if isinstance(value, str) and value.removeprefix("torch.") in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[value.removeprefix("torch.")]
    if value in (torch.float32, torch.float16, torch.bfloat16):
        return value  # type: ignore[return-value]
    raise ValueError(
        f"bnb_4bit_compute_dtype must be torch.float32, torch.bfloat16 or torch.float16 "
        f"(or one of the strings {sorted(_COMPUTE_DTYPES)}), got {value!r}"
    )


# --------------------------------------------------------------------------------------------
# The course's 4-bit linear layer
# --------------------------------------------------------------------------------------------
class _DequantLinear(torch.autograd.Function):
    """``x @ dequant(W).T + bias`` that keeps only the 4-bit weight for backward.

    Plain autograd through ``F.linear(x, dequantize(...))`` would save the dequantised
    full-precision weight of every layer until backward, undoing the memory saving. Here the
    weight is dequantised again in backward instead (as bitsandbytes' ``MatMul4Bit`` does).
    """

    @staticmethod
    def forward(ctx, x, bias, layer):  # x: (..., in), bias: (out,) or None
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dequantize(x.dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (..., out)
        need_x, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_bias = None
        if need_x:
            grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype)  # (..., in)
        if ctx.has_bias and need_bias:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (``course_lib.model.nf4``).

    The weight ``(out_features, in_features)`` is kept as packed 4-bit codes (buffer
    ``weight``, uint8) plus its quantisation constants (``weight_absmax``, and with double
    quantisation ``weight_offset`` / ``weight_absmax2``). ``forward`` dequantises it on the fly
    in ``compute_dtype``, computes ``x @ W.T + bias`` and returns the input's dtype; backward
    dequantises again rather than keeping the full-precision weight alive. The layer has no
    trainable parameters (the bias, if any, is a frozen parameter).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
            raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got {shape}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}"
            )
        self.compute_dtype = _compute_dtype(compute_dtype)
        packed, state = nf4.quantize_nf4(weight.detach(), blocksize, double_quant)
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype  # the dtype the weight had, and dequantises to
        self.register_buffer("weight", packed)
        self.register_buffer("weight_absmax", state.absmax)
        if state.state2 is not None:
            self.register_buffer("weight_offset", state.offset)
            self.register_buffer("weight_absmax2", state.state2.absmax)
        else:
            self.weight_offset = None
            self.weight_absmax2 = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | str = torch.float32,
    ) -> NF4Linear:
        """Quantise an ``nn.Linear`` (its weight and bias are copied, the original is untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(
            linear.weight, linear.bias,
            blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
        )

    @property
    def double_quant(self) -> bool:
        return self.weight_absmax2 is not None

    @property
    def quant_state(self) -> nf4.NF4State:
        """The :class:`~course_lib.model.nf4.NF4State` of the weight (views of the buffers)."""
        state2 = None
        if self.weight_absmax2 is not None:
            state2 = nf4.Blockwise8bitState(
                absmax=self.weight_absmax2, code=nf4.dynamic_map(self.weight.device),
                blocksize=nf4.DQ_BLOCKSIZE,
            )
        return nf4.NF4State(
            absmax=self.weight_absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            offset=self.weight_offset,
            state2=state2,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(out_features, in_features)`` in ``dtype`` (default: ``compute_dtype``)."""
        w = nf4.dequantize_nf4(self.weight, self.quant_state)
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have last dimension in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _DequantLinear.apply(x, bias, self).to(inp_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


# --------------------------------------------------------------------------------------------
# Step 1: quantise the base model
# --------------------------------------------------------------------------------------------
def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {name for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head) and get_head() is not None:
        head = get_head()
        heads |= {name for name, m in model.named_modules() if m is head}
    return heads


def _quantized_types(backend: str) -> tuple[type, ...]:
    if backend == "torch":
        return (NF4Linear,)
    return (_bnb().nn.Linear4bit,)


def _to_linear4bit(linear: nn.Linear, config: QuantizationConfig) -> nn.Module:
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=config.compute_dtype,
        compress_statistics=config.bnb_4bit_use_double_quant,
        quant_type=config.bnb_4bit_quant_type,
        device="meta",  # no throw-away random weight; the real one is assigned below
    )
    weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(),
        requires_grad=False,
        blocksize=config.blocksize,
        compress_statistics=config.bnb_4bit_use_double_quant,
        quant_type=config.bnb_4bit_quant_type,
        module=layer,
    )
    device = linear.weight.device
    # On CPU bitsandbytes quantises when asked explicitly; on a GPU moving the weight does it.
    layer.weight = weight._quantize(device) if device.type == "cpu" else weight.to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place on the first forward in
    # eval mode (bf16 scales, a bf16 kernel): outputs would then depend on the CPU and the layer
    # could not go back to training. Keep the portable fp32 path everywhere.
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_model(model: nn.Module, config: QuantizationConfig | None = None) -> list[str]:
    """Step 1 of QLoRA: replace the model's ``nn.Linear`` layers by 4-bit ones, in place.

    Every ``nn.Linear`` is quantised except those matching ``config.llm_int8_skip_modules``
    (a name or dotted suffix; default: the output head, ``lm_head`` or
    ``model.get_output_embeddings()``). Layers already inside a LoRA wrapper are refused.
    Returns the names of the quantised layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = QuantizationConfig() if config is None else config
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"quantization_config must be a QuantizationConfig, got {config!r}")
    if any(isinstance(m, LinearWithLoRA) for m in model.modules()):
        raise ValueError(
            "the model already has LoRA layers; quantise the base model first, then add LoRA "
            "(QLoRAModel does both in that order)"
        )
    quantized_types = _quantized_types(config.backend)
    skip = config.llm_int8_skip_modules
    skipped = _output_head_names(model) if skip is None else set()
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not isinstance(m, quantized_types)
        and name not in skipped
        and not (skip and _matches(name, skip))
    ]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to quantise "
            f"(llm_int8_skip_modules={skip!r} and the output head are kept in full precision)"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if config.backend == "torch":
            new = NF4Linear.from_linear(
                linear, config.blocksize, config.bnb_4bit_use_double_quant, config.compute_dtype
            )
        else:
            new = _to_linear4bit(linear, config)
        setattr(parent, child, new)
    return names


# --------------------------------------------------------------------------------------------
# Memory footprint, measured from the tensors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes of a model's tensors by kind (parameters and buffers, each storage counted once)."""

    weights_4bit: int = 0  # packed 4-bit codes of the quantised layers
    quant_constants: int = 0  # absmax (fp32 or 8-bit), offsets, second-level absmax, code tables
    lora: int = 0  # lora_A and lora_B
    other: int = 0  # embeddings, norms, layers kept in full precision, biases
    detail: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def total(self) -> int:
        return self.weights_4bit + self.quant_constants + self.lora + self.other

    def as_dict(self) -> dict[str, int]:
        return {
            "4-bit weights": self.weights_4bit,
            "quantisation constants": self.quant_constants,
            "LoRA parameters": self.lora,
            "other": self.other,
            "total": self.total,
        }

    def __str__(self) -> str:
        rows = [f"{'kind':<24}{'bytes':>14}{'MiB':>10}"]
        for kind, nbytes in self.as_dict().items():
            rows.append(f"{kind:<24}{nbytes:>14,d}{nbytes / 2**20:>10.3f}")
        return "\n".join(rows)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bnb_constants(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        return
    yield from (t for t in (qs.absmax, qs.code, qs.offset) if isinstance(t, torch.Tensor))
    if qs.state2 is not None:
        yield from (t for t in (qs.state2.absmax, qs.state2.code) if isinstance(t, torch.Tensor))


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """Measure the bytes of ``model``'s parameters and buffers, by kind.

    Works for any model: a plain fp32 model has only ``other``; a LoRA model ``lora`` +
    ``other``; a QLoRA model all four kinds. bitsandbytes layers also hold their quantisation
    constants (and per-layer copies of their code tables) in ``weight.quant_state``; these are
    counted as quantisation constants. Tensors that share storage are counted once.
    """
    seen: set[tuple[int, int]] = set()
    totals = {"weights_4bit": 0, "quant_constants": 0, "lora": 0, "other": 0}

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            return
        seen.add(key)
        totals[kind] += _nbytes(t)

    # A bitsandbytes layer can only exist if bitsandbytes was imported: don't import it here.
    bnb = sys.modules.get("bitsandbytes")
    bnb_types = (bnb.nn.Linear4bit,) if bnb is not None else ()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            add("weights_4bit", module.weight)
            for name in ("weight_absmax", "weight_offset", "weight_absmax2"):
                add("quant_constants", getattr(module, name))
        elif bnb_types and isinstance(module, bnb_types):
            add("weights_4bit", module.weight)
            for t in _bnb_constants(module.weight):
                add("quant_constants", t)
        elif isinstance(module, LoRALayer):
            for p in module.parameters(recurse=False):
                add("lora", p)
    for t in [*model.parameters(), *model.buffers()]:
        add("other", t)  # everything not counted above
    return MemoryFootprint(**totals)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class QLoRAModel(nn.Module):
    """A base model quantised to 4 bits (step 1) with LoRA adapters on its targets (step 2).

    ``QLoRAModel(model, quantization_config, lora_config)`` changes ``model`` in place (as
    PEFT's ``get_peft_model`` does) and wraps it; ``forward`` calls ``model``. Afterwards only
    the LoRA parameters are trainable. Call :meth:`prepare_for_training` before training.
    """

    def __init__(
        self,
        model: nn.Module,
        quantization_config: QuantizationConfig | None = None,
        lora_config: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        quantization_config = quantization_config or QuantizationConfig()
        lora_config = lora_config or LoRAConfig()
        if not isinstance(quantization_config, QuantizationConfig):
            raise TypeError(
                f"quantization_config must be a QuantizationConfig, got {quantization_config!r}"
            )
        if not isinstance(lora_config, LoRAConfig):
            raise TypeError(f"lora_config must be a LoRAConfig, got {lora_config!r}")
        self.quantization_config = quantization_config
        self.lora_config = lora_config
        # Step 1: quantise the base model's linear layers to 4 bits.
        self.quantized_modules = quantize_model(model, quantization_config)
        # Step 2: wrap the target layers (quantised or kept in full precision) with LoRA.
        quantized_type = NF4Linear if quantization_config.backend == "torch" else _bnb().nn.Linear4bit
        apply_lora(model, lora_config, layer_types=(quantized_type, nn.Linear))
        self.model = model

    @property
    def config(self):
        """The wrapped model's ``config`` (if any), e.g. for its ``block_size``."""
        return getattr(self.model, "config", None)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def lora_modules(self) -> list[str]:
        """Names (inside ``model``) of the layers that carry a LoRA adapter."""
        return [n for n, m in self.model.named_modules() if isinstance(m, LinearWithLoRA)]

    def prepare_for_training(self, gradient_checkpointing: bool = False) -> QLoRAModel:
        """Get ready to train: only LoRA trains, full-precision layers in fp32, optional checkpointing.

        - every parameter except ``lora_A`` / ``lora_B`` is frozen;
        - the layers that are not quantised (norms, embeddings, a skipped output head) are cast
          from fp16/bf16 to fp32: norms in low precision are a known source of instability, and
          their memory is negligible next to the 4-bit weights;
        - ``gradient_checkpointing=True`` calls the model's ``gradient_checkpointing_enable()``
          (activations are recomputed in backward instead of stored).

        Returns ``self`` in training mode.
        """
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(
                f"gradient_checkpointing must be True or False, got {gradient_checkpointing!r}"
            )
        mark_only_lora_as_trainable(self.model)
        quantized = _quantized_types(self.quantization_config.backend)
        for module in self.model.modules():
            if isinstance(module, (*quantized, LoRALayer)):
                continue
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
        if gradient_checkpointing:
            enable = getattr(self.model, "gradient_checkpointing_enable", None)
            if not callable(enable):
                raise ValueError(
                    f"gradient_checkpointing=True needs a model with a "
                    f"gradient_checkpointing_enable() method; {type(self.model).__name__} has none"
                )
            enable()
        self.train()
        return self

    def memory_footprint(self) -> MemoryFootprint:
        """Bytes of the model's tensors by kind, measured (see :func:`memory_footprint`)."""
        return memory_footprint(self.model)

    def trainable_parameters_summary(self) -> TrainableSummary:
        """Trainable vs all parameters; ``print()`` it for PEFT's one-line format.

        A quantised layer counts ``out_features * in_features`` parameters (the weights it
        represents), whichever way its backend stores the packed codes.
        """
        quantized = _quantized_types(self.quantization_config.backend)
        total = trainable = 0
        for module in self.model.modules():
            own = list(module.parameters(recurse=False))
            trainable += sum(p.numel() for p in own if p.requires_grad)
            if isinstance(module, quantized):
                total += module.out_features * module.in_features
                own = [p for p in own if p is not module.weight]
            total += sum(p.numel() for p in own)
        return TrainableSummary(trainable=trainable, total=total)

    def extra_repr(self) -> str:
        qc = self.quantization_config
        return (
            f"backend={qc.backend}, quant_type={qc.bnb_4bit_quant_type}, "
            f"double_quant={qc.bnb_4bit_use_double_quant}, compute_dtype={qc.compute_dtype}, "
            f"quantized={len(self.quantized_modules)} layers, lora={len(self.lora_modules())} layers"
        )
