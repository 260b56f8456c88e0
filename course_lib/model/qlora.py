"""QLoRA: a frozen 4-bit base model plus trainable LoRA adapters (see notebook 03_qlora).

QLoRA = 4-bit NormalFloat base weights + LoRA in 16/32 bit + paged optimisers::

    y = dequant(W_nf4) x + scaling * B A x        (only A and B are trained)

:class:`QLoRAModel` does it in two steps, as the lesson's outline says:

1. **Quantise** every ``nn.Linear`` of the base model to 4 bits, except the modules named in
   ``QuantizationConfig.llm_int8_skip_modules`` (matched as transformers does; by default the
   output head), with ``bitsandbytes.nn.Linear4bit`` (backend ``"bitsandbytes"``, the layer QLoRA uses
   in practice) or the course's :class:`NF4Linear` (``"torch"``: pure PyTorch on
   ``course_lib.model.nf4``, bit-identical NF4 codes).
2. **Add LoRA**: walk the named modules and wrap each ``LoRAConfig.target_modules`` layer in
   ``course_lib.model.lora.LinearWithLoRA``.

:meth:`QLoRAModel.prepare_for_training` freezes everything but LoRA, keeps the norms (and every
other layer that is not quantised) in fp32, and can turn on gradient checkpointing.
:func:`memory_footprint` sorts the measured bytes of the model's tensors by kind.

The configuration uses transformers' ``BitsAndBytesConfig`` field names, so the same settings
work unchanged with ``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)``.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.model import nf4
from course_lib.model.lora import (
    LinearWithLoRA,
    LoRAConfig,
    LoRALayer,
    apply_lora,
    mark_only_lora_as_trainable,
)
from course_lib.model.targets import normalise_skip_modules, output_head_names, skip_matches
from course_lib.utils.memory import (
    quantization_constant_bytes,
    quantization_constant_tensors,
    storage_key,
    unique_storage_bytes,
    weight_bytes,
)
from course_lib.utils.params import TrainableSummary, trainable_parameters_summary
from course_lib.utils.units import MiB
from course_lib.validation import check_bool, check_choice

__all__ = [
    "QuantizationConfig", "NF4Linear", "QLoRAModel", "MemoryFootprint", "quantize_model",
    "memory_footprint", "bitsandbytes_available", "BACKENDS", "QUANT_TYPES",
]

BACKENDS = ("bitsandbytes", "torch")
QUANT_TYPES = ("nf4", "fp4")


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
        if not isinstance(lora_config, LoRAConfig):
            raise TypeError(f"lora_config must be a LoRAConfig, got {lora_config!r}")
        self.quantization_config = quantization_config
        self.lora_config = lora_config
        # Step 1: quantise the base model's linear layers to 4 bits (the output head stays).
        self.quantized_modules = quantize_model(model, quantization_config)
        # Step 2: walk the named modules and wrap each targeted linear layer, 4-bit or kept in
        # full precision, in LinearWithLoRA (apply_lora replaces it in its parent module).
        linear_types = (*_quantized_types(quantization_config.backend), nn.Linear)
        apply_lora(model, lora_config, layer_types=linear_types)
        self.model = model

    def prepare_for_training(self, gradient_checkpointing: bool = False) -> QLoRAModel:
        """Get ready to train; returns ``self`` in training mode.

        Every parameter except ``lora_A`` / ``lora_B`` is frozen. The layers that are not
        quantised (norms, embeddings, a skipped output head) are cast from fp16/bf16 to fp32:
        norms in low precision are a known source of instability, and their memory is negligible
        next to the 4-bit weights. ``gradient_checkpointing=True`` calls the model's
        ``gradient_checkpointing_enable()`` (activations are recomputed in backward).
        """
        check_bool("gradient_checkpointing", gradient_checkpointing)
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

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def config(self):
        """The wrapped model's ``config`` (if any), e.g. for its ``block_size``."""
        return getattr(self.model, "config", None)

    def lora_modules(self) -> list[str]:
        """Names (inside ``model``) of the layers that carry a LoRA adapter."""
        return [n for n, m in self.model.named_modules() if isinstance(m, LinearWithLoRA)]

    def memory_footprint(self) -> MemoryFootprint:
        """Bytes of the model's tensors by kind, measured (see :func:`memory_footprint`)."""
        return memory_footprint(self.model)

    def trainable_parameters_summary(self) -> TrainableSummary:
        """Trainable vs all parameters (a 4-bit layer counts the out x in weights it stands for)."""
        return trainable_parameters_summary(self.model)

    def extra_repr(self) -> str:
        qc = self.quantization_config
        return (
            f"backend={qc.backend}, quant_type={qc.bnb_4bit_quant_type}, "
            f"double_quant={qc.bnb_4bit_use_double_quant}, compute_dtype={qc.compute_dtype}, "
            f"quantized={len(self.quantized_modules)} layers, lora={len(self.lora_modules())} layers"
        )


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
        if check_bool("load_in_4bit", self.load_in_4bit) is not True:
            raise ValueError(
                "load_in_4bit must be True: QLoRAModel quantises the base model to 4 bits "
                "(got False; for plain LoRA use course_lib.model.lora.apply_lora)"
            )
        check_choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, QUANT_TYPES)
        check_bool("bnb_4bit_use_double_quant", self.bnb_4bit_use_double_quant)
        self.bnb_4bit_compute_dtype = _compute_dtype(self.bnb_4bit_compute_dtype)
        if self.llm_int8_skip_modules is not None:
            self.llm_int8_skip_modules = normalise_skip_modules(self.llm_int8_skip_modules)
        nf4.check_blocksize(self.blocksize)
        if self.backend is None:
            self.backend = "bitsandbytes" if bitsandbytes_available() else "torch"
        check_choice("backend", self.backend, BACKENDS)
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


_COMPUTE_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _compute_dtype(value: object) -> torch.dtype:
    allowed = (
        f"torch.float32, torch.bfloat16 or torch.float16 (or one of the strings "
        f"{sorted(_COMPUTE_DTYPES)})"
    )
    if not isinstance(value, (str, torch.dtype)):
        raise TypeError(f"bnb_4bit_compute_dtype must be {allowed}, got {value!r}")
    if isinstance(value, str) and value.removeprefix("torch.") in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[value.removeprefix("torch.")]
    if value in (torch.float32, torch.float16, torch.bfloat16):
        return value  # type: ignore[return-value]
    raise ValueError(f"bnb_4bit_compute_dtype must be {allowed}, got {value!r}")


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
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, blocksize: int = 64,
        double_quant: bool = False, compute_dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__()
        what = "weight must be a 2-D (out_features, in_features) tensor, got"
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{what} {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"{what} {tuple(weight.shape)}")
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
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False,
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
        shape = torch.Size((self.out_features, self.in_features))
        return nf4.NF4State(
            absmax=self.weight_absmax, shape=shape, dtype=self.weight_dtype,
            blocksize=self.blocksize, offset=self.weight_offset, state2=state2,
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
def quantize_model(model: nn.Module, config: QuantizationConfig | None = None) -> list[str]:
    """Step 1 of QLoRA: replace the model's ``nn.Linear`` layers by 4-bit ones, in place.

    Every ``nn.Linear`` is quantised except those matching ``config.llm_int8_skip_modules``
    (transformers' rule, :func:`course_lib.model.targets.skip_matches`: a prefix up to a module
    boundary, a regex, or a plain suffix; default: the output head, ``lm_head`` or
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
    skipped = output_head_names(model) if skip is None else set()
    names = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, quantized_types)
        and name not in skipped and not (skip and skip_matches(name, skip))
    ]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to quantise "
            f"(llm_int8_skip_modules={skip!r} and the output head are kept in full precision)"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        if config.backend == "torch":
            new = NF4Linear.from_linear(
                linear, config.blocksize, config.bnb_4bit_use_double_quant, config.compute_dtype
            )
        else:
            new = _to_linear4bit(linear, config)
        setattr(model.get_submodule(parent_name), child, new)
    return names


def bitsandbytes_available() -> bool:
    """Whether ``bitsandbytes`` is installed (it is not imported here)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _bnb():
    # Importing course_lib first installs its filter for bitsandbytes' hub-kernel warning.
    import course_lib  # noqa: F401, I001
    import bitsandbytes as bnb

    return bnb


def _quantized_types(backend: str | None = None) -> tuple[type, ...]:
    """The 4-bit layer class of ``backend``; ``None``: every 4-bit class that can exist now."""
    if backend == "torch":
        return (NF4Linear,)
    if backend == "bitsandbytes":
        return (_bnb().nn.Linear4bit,)
    bnb = sys.modules.get("bitsandbytes")  # a bitsandbytes layer exists only once it is imported
    return (NF4Linear,) if bnb is None else (NF4Linear, bnb.nn.Linear4bit)


def _to_linear4bit(linear: nn.Linear, config: QuantizationConfig) -> nn.Module:
    bnb = _bnb()
    quant = dict(
        compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type
    )
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=config.compute_dtype, **quant,
        device="meta",  # no throw-away random weight; the real one is assigned below
    )
    weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, blocksize=config.blocksize,
        module=layer, **quant,
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

    @property
    def total(self) -> int:
        return self.weights_4bit + self.quant_constants + self.lora + self.other

    def as_dict(self) -> dict[str, int]:
        return {
            "4-bit weights": self.weights_4bit, "quantisation constants": self.quant_constants,
            "LoRA parameters": self.lora, "other": self.other, "total": self.total,
        }

    def __str__(self) -> str:
        rows = [f"{'kind':<24}{'bytes':>14}{'MiB':>10}"]
        for kind, nbytes in self.as_dict().items():
            rows.append(f"{kind:<24}{nbytes:>14,d}{nbytes / MiB:>10.3f}")
        return "\n".join(rows)


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """Measure the bytes of ``model``'s parameters and buffers, by kind, each storage once.

    The numbers are ``course_lib.utils.memory``'s (those ``measure_training_step`` reports):
    ``quant_constants`` is its ``quantization_constant_bytes`` (absmax, offsets, nested absmax,
    the code tables bitsandbytes keeps per layer), and its ``weight_bytes`` of the other tensors
    are split into the 4-bit layers' packed codes, the LoRA parameters and the rest. A plain
    model has only ``other``; a LoRA model ``lora`` + ``other``; a QLoRA model all four kinds.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    constants = {storage_key(t) for t in quantization_constant_tensors(model)}
    quantized = _quantized_types()
    codes = [m.weight for m in model.modules() if isinstance(m, quantized)]
    lora = [p for m in model.modules() if isinstance(m, LoRALayer) for p in m.parameters()]
    weights_4bit = unique_storage_bytes(codes, exclude=constants)
    lora_bytes = unique_storage_bytes(lora, exclude=constants | {storage_key(t) for t in codes})
    return MemoryFootprint(
        weights_4bit=weights_4bit,
        quant_constants=quantization_constant_bytes(model),
        lora=lora_bytes,
        other=sum(weight_bytes(model).values()) - weights_4bit - lora_bytes,
    )
