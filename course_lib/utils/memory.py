"""Where the memory of a training step goes: measured on a live model, estimated for any size.

Training keeps five kinds of bytes alive (notebook ``05_memory_compute_tradeoffs``):

==================  ==============================================================================
weights             every parameter and buffer (frozen or trainable, LoRA adapters included)
quant constants     what a quantised weight needs besides its codes (NF4 absmax, nested absmax, ...)
gradients           one ``.grad`` per trainable parameter
optimizer state     AdamW's two moments (fp32, or 8-bit codes + blockwise absmax), step counters
activations         the tensors autograd saves in the forward pass for the backward pass
==================  ==============================================================================

plus, in the estimator only, ``master_weights`` (an fp32 copy of 16-bit trainable weights for
mixed precision) and ``recompute`` (with gradient checkpointing, the activations of the one block
that is being recomputed during the backward pass).

**Measuring** (:func:`measure_training_step`, :func:`weight_bytes`, :func:`gradient_bytes`,
:func:`optimizer_state_bytes`, :class:`SavedTensorsMeter`) counts *storages*, not tensors: two
views of one buffer, a tied embedding/head pair or a tensor saved twice for backward occupy memory
once, so every count is the sum of ``untyped_storage().nbytes()`` over *unique* storages. It works
on any ``nn.Module`` and any optimiser whose state is a dict of tensors per parameter
(``torch.optim.AdamW``, ``bitsandbytes.optim.AdamW8bit`` -- which steps on CPU -- and friends),
on CPU deterministically.

Quantisation constants are detected generically (no import of bitsandbytes or of the course's
QLoRA module is needed): a tensor is a constant when it hangs off a parameter object as an
attribute (bitsandbytes keeps ``Params4bit.quant_state``; ``Int8Params.SCB``), when it sits in
a *quantisation-state object* stored on a module or parameter (any non-tensor object with an
``absmax`` attribute: bitsandbytes' ``QuantState`` with its nested ``state2``, the course's
``NF4State`` / ``Blockwise8bitState``), or when it is a registered buffer whose name says so
(``absmax``, ``weight_absmax2``, ``quant_map``, ``offset``, ``code``, ``SCB``, ``scales`` ...,
see :data:`CONSTANT_BUFFER_NAMES`) on a module that also holds integer codes. Their codebooks
(16 NF4 levels, 256-entry dynamic map) are counted where they are stored, once per storage.

Saved activations are measured with :func:`torch.autograd.graph.saved_tensors_hooks`: every tensor
autograd packs for backward is seen once, parameters and buffers are excluded. A custom autograd
``Function`` that stashes tensors on ``ctx`` attributes instead of ``ctx.save_for_backward`` (as
bitsandbytes' 4-bit matmul does with its weight) is invisible to these hooks.

**Estimating** (:func:`estimate_memory`) works from shapes alone (:class:`TransformerSpec`,
presets in :data:`PRESETS`: the course's TinyGPT, LLaMA-7B/13B/33B/65B and the four GPT-2 sizes)
for full fine-tuning, LoRA and QLoRA. Weights, quantisation constants, gradients and optimiser
state are counted tensor by tensor with the same rules the libraries use, so on the course model
they equal the measurement exactly. Activations follow what autograd saves, operation by
operation (:func:`activation_bytes`): a linear layer keeps its input only when its weight is
trained, a LoRA layer keeps its input and the rank-``r`` intermediate, attention keeps q, k, v,
its output and the softmax statistics (with a fused/flash kernel) or the ``s x s`` probabilities
(without), and nothing upstream of the first trainable parameter keeps anything. For a GPT block
with 16-bit activations, dropout, fused LayerNorm and no flash attention this is exactly the
count of Korthikanti et al. (2022), ``34 s b h + 5 a s^2 b`` bytes per layer
(:func:`korthikanti_activation_bytes`), plus the LayerNorm statistics they neglect; flash attention
removes the ``5 a s^2 b`` term. The course model's RMSNorm is written in plain PyTorch, so its
profile (:attr:`TransformerSpec.fused_norm` ``= False``) keeps ``x``, ``x * rms`` and ``rms``,
which is what the course model was measured to save.

Units: ``GB`` is 10^9 bytes, as in the lesson ("a 7B model needs 28 GB for its fp32 weights")
and the QLoRA paper. GPU cards are sold as 24/48/80 "GB" but hold that many GiB (7 % more), so a
budget that fits under a 48 GB line fits the card.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "GB",
    "MB",
    "CATEGORIES",
    "CATEGORY_LABELS",
    "WEIGHT_DTYPES",
    "FLOAT_DTYPES",
    "METHODS",
    "OPTIMIZERS",
    "ADAMW8BIT_MIN_SIZE",
    "ADAMW8BIT_BLOCKSIZE",
    "CONSTANT_BUFFER_NAMES",
    "MemoryBreakdown",
    "dtype_name",
    "format_bytes",
    "storage_key",
    "unique_storage_bytes",
    "quantization_constant_tensors",
    "weight_bytes",
    "quantization_constant_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "SavedTensorsMeter",
    "measure_training_step",
    "LinearSpec",
    "TransformerSpec",
    "PRESETS",
    "get_preset",
    "preset_names",
    "bits_per_parameter",
    "quantized_weight_bytes",
    "adamw_state_bytes",
    "lora_target_layers",
    "ActivationEstimate",
    "activation_bytes",
    "korthikanti_activation_bytes",
    "estimate_memory",
    "comparison_table",
]

GB = 10**9  # the lesson's unit: a 7B model's fp32 weights are "28 GB" = 7e9 * 4 bytes
MB = 10**6

CATEGORIES = (
    "weights",
    "quant_constants",
    "gradients",
    "optimizer_state",
    "master_weights",
    "activations",
    "recompute",
)
CATEGORY_LABELS = {
    "weights": "weights",
    "quant_constants": "quantisation constants",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "master_weights": "fp32 master weights",
    "activations": "activations",
    "recompute": "recompute (1 block)",
}

FLOAT_DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}
WEIGHT_DTYPES = ("fp32", "fp16", "bf16", "int8", "nf4", "nf4-dq")
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
ADAMW8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors with fewer elements
ADAMW8BIT_BLOCKSIZE = 256  # elements per absmax of bitsandbytes' blockwise 8-bit optimiser state
_QMAP_BYTES = 2 * 256 * 4  # AdamW8bit's two 256-entry fp32 quantisation maps, shared by all tensors

_TORCH_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype: ``torch.bfloat16 -> 'bf16'``, ``torch.uint8 -> 'uint8'``."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return _TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def format_bytes(nbytes: float, digits: int = 3) -> str:
    """Bytes in decimal units with ``digits`` significant digits: ``26_953_662_464 -> '27.0 GB'``."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or not nbytes >= 0:
        raise ValueError(f"nbytes must be a non-negative number, got {nbytes!r}")
    for unit, scale in (("TB", 10**12), ("GB", GB), ("MB", MB), ("kB", 10**3)):
        if nbytes >= scale:
            value = nbytes / scale
            decimals = max(0, digits - 1 - int(math.floor(math.log10(value))))
            return f"{value:.{decimals}f} {unit}"
    return f"{int(nbytes)} B"


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The result: one number per category
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per category of one training step (measured or estimated).

    ``total`` is the sum of the categories: the budget planners use. It is an upper bound of
    the true peak, since activations are freed while the gradients are produced.
    """

    weights: int = 0
    quant_constants: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    master_weights: int = 0
    activations: int = 0
    recompute: int = 0
    weights_by_dtype: Mapping[str, int] = field(default_factory=dict)
    parameters: int = 0  # parameter elements (a packed 4-bit weight counts its logical size)
    trainable_parameters: int = 0
    label: str = ""

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in CATEGORIES)

    def as_dict(self) -> dict[str, int]:
        """``{category: bytes}`` in :data:`CATEGORIES` order."""
        return {name: getattr(self, name) for name in CATEGORIES}

    def fits(self, capacity_gb: float) -> bool:
        """Whether ``total`` fits in ``capacity_gb`` GB (10^9 bytes)."""
        return self.total <= capacity_gb * GB

    def table(self, skip_zero: bool = True) -> str:
        """A small text table: one row per category, bytes and share of the total."""
        total = self.total
        title = self.label or "memory"
        lines = [f"{title}", f"  {'category':<24}{'bytes':>16}{'':>10}{'share':>8}"]
        for name, value in self.as_dict().items():
            if skip_zero and value == 0:
                continue
            share = value / total if total else 0.0
            lines.append(
                f"  {CATEGORY_LABELS[name]:<24}{value:>16,}{format_bytes(value):>10}{share:>8.1%}"
            )
        lines.append(f"  {'total':<24}{total:>16,}{format_bytes(total):>10}{1:>8.0%}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def comparison_table(measured: MemoryBreakdown, estimated: MemoryBreakdown) -> str:
    """Measured vs estimated bytes per category, with their ratio (estimate / measured)."""
    lines = [f"  {'category':<24}{'measured':>14}{'estimated':>14}{'ratio':>8}"]
    for name in CATEGORIES:
        m, e = getattr(measured, name), getattr(estimated, name)
        if m == 0 and e == 0:
            continue
        ratio = f"{e / m:.3f}" if m else "-"
        lines.append(f"  {CATEGORY_LABELS[name]:<24}{m:>14,}{e:>14,}{ratio:>8}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Measuring: unique storages
# --------------------------------------------------------------------------------------------


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identity of the memory ``t`` lives in: two views of one buffer share their key."""
    try:
        return ("storage", t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError, AttributeError):  # sparse, nested, ...
        return ("tensor", id(t))


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, AttributeError):
        return t.numel() * t.element_size()


def unique_storage_bytes(
    tensors: Iterable[torch.Tensor], exclude: set[tuple[str, int]] | None = None
) -> int:
    """Bytes of the unique storages behind ``tensors`` (whole storages, each once).

    Storages whose key (:func:`storage_key`) is in ``exclude`` are skipped.
    """
    seen: set[tuple[str, int]] = set(exclude or ())
    total = 0
    for t in tensors:
        key = storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += _storage_nbytes(t)
    return total


CONSTANT_BUFFER_NAMES = re.compile(
    r"(^|_)(absmax\d*|quant_map|nested_absmax|nested_quant_map|offset|code|scb|scales?|zeros?)($|_)",
    re.IGNORECASE,
)
"""A registered buffer with a matching name, on a module that holds integer codes (a quantised
module), is a quantisation constant."""


def _is_quant_state(obj: object) -> bool:
    return (
        not isinstance(obj, (torch.Tensor, nn.Module, type))
        and hasattr(obj, "__dict__")
        and hasattr(obj, "absmax")
    )


def _state_tensors(obj: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside a quantisation-state object, following nested states (e.g. ``state2``)."""
    if depth > 4:
        return
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif _is_quant_state(value):
            yield from _state_tensors(value, depth + 1)


def _named_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, is_parameter)`` of every parameter and buffer, each object once."""
    for name, p in model.named_parameters(remove_duplicate=True):
        yield name, p, True
    for name, b in model.named_buffers(remove_duplicate=True):
        yield name, b, False


def quantization_constant_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor that is a quantisation constant of ``model`` (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found: list[torch.Tensor] = []
    for _, t, _ in _named_state(model):
        # tensors hanging off the parameter object (Params4bit.quant_state, Int8Params.SCB)
        for attr, value in vars(t).items():
            if isinstance(value, torch.Tensor) and attr not in ("grad", "data"):
                found.append(value)
            elif _is_quant_state(value):
                found.extend(_state_tensors(value))
    for module in model.modules():
        for value in vars(module).values():  # quantisation states kept on modules
            if _is_quant_state(value):
                found.extend(_state_tensors(value))
        # named constant buffers of a quantised module (one that holds integer codes)
        own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        if any(not t.is_floating_point() for t in own):
            found.extend(
                b for name, b in module._buffers.items()
                if b is not None and CONSTANT_BUFFER_NAMES.search(name)
            )
    return found


def _weight_label(t: torch.Tensor) -> str:
    quant_state = getattr(t, "quant_state", None)
    quant_type = getattr(quant_state, "quant_type", None) or getattr(t, "quant_type", None)
    if isinstance(quant_type, str) and t.dtype in (torch.uint8, torch.int8):
        return quant_type
    return dtype_name(t.dtype)


def _logical_numel(t: torch.Tensor) -> int:
    shape = getattr(getattr(t, "quant_state", None), "shape", None)
    return math.prod(shape) if isinstance(shape, torch.Size) else t.numel()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s parameters and buffers by dtype (quantisation constants excluded).

    Keys are short dtype names (``'fp32'``, ``'bf16'``, ``'uint8'``); a bitsandbytes 4-bit weight
    is reported under its quant type (``'nf4'``). Tied or shared tensors count once.
    """
    constants = {storage_key(t) for t in quantization_constant_tensors(model)}
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for _, t, _ in _named_state(model):
        key = storage_key(t)
        if key in seen or key in constants:
            continue
        seen.add(key)
        label = _weight_label(t)
        out[label] = out.get(label, 0) + _storage_nbytes(t)
    return out


def quantization_constant_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s quantisation constants, each storage once.

    A constant registered as a buffer counts here and not in :func:`weight_bytes`; a tensor
    that is a parameter's own storage stays a weight.
    """
    params = {storage_key(p) for p in model.parameters()}
    return unique_storage_bytes(quantization_constant_tensors(model), exclude=params)


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors of ``model``'s parameters (``None`` counts nothing)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return unique_storage_bytes(
        p.grad for p in model.parameters() if p.grad is not None
    )


def _tensors_in(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (moments, 8-bit codes, absmax, step counters).

    Storages shared between parameters (bitsandbytes' quantisation maps) count once. Python
    numbers (bitsandbytes' ``step``) take no tensor memory. State exists only after the first
    ``step()``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return unique_storage_bytes(_tensors_in(list(optimizer.state.values())))


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(all, trainable)`` parameter elements, counting a quantised weight by its logical size.

    A bitsandbytes 4-bit weight is a parameter whose ``quant_state.shape`` gives that size; a
    packed integer ``weight`` *buffer* of a Linear-like module (the course's ``NF4Linear``)
    counts as its ``out_features * in_features`` frozen parameters.
    """
    total = trainable = 0
    for p in model.parameters():
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    for module in model.modules():
        w = module._buffers.get("weight")
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if (
            isinstance(w, torch.Tensor) and not w.is_floating_point()
            and isinstance(in_f, int) and isinstance(out_f, int)
        ):
            total += in_f * out_f
    return total, trainable


class SavedTensorsMeter:
    """Record the tensors autograd saves for backward while the ``with`` block runs.

    ``exclude`` (a module, or tensors) names memory that is not an activation: the module's
    parameters, buffers and quantisation constants. Each storage is counted once, however many
    views of it are saved and however often. The meter keeps the storages it saw alive until
    the block ends, so a freed address cannot be reused and counted twice. Deterministic on CPU.

    >>> with SavedTensorsMeter(model) as meter:          # doctest: +SKIP
    ...     loss = loss_fn(model(x), y)
    >>> meter.nbytes, meter.count                        # doctest: +SKIP
    """

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] | None = None) -> None:
        if exclude is None:
            tensors: list[torch.Tensor] = []
        elif isinstance(exclude, nn.Module):
            tensors = [t for _, t, _ in _named_state(exclude)]
            tensors += quantization_constant_tensors(exclude)
        else:
            tensors = list(exclude)
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                raise TypeError("exclude must be an nn.Module, tensors, or None")
        self._exclude = {storage_key(t) for t in tensors}
        self._held: list[torch.Tensor] = []
        self._seen: set[tuple[str, int]] = set()
        self.nbytes = 0  # bytes of the unique storages saved
        self.count = 0  # number of unique storages saved
        self.calls = 0  # number of tensors packed (views and repeats included)
        self.by_dtype: dict[str, int] = {}
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        key = storage_key(t)
        if key not in self._seen and key not in self._exclude:
            self._seen.add(key)
            nbytes = _storage_nbytes(t)
            self.nbytes += nbytes
            self.count += 1
            name = dtype_name(t.dtype)
            self.by_dtype[name] = self.by_dtype.get(name, 0) + nbytes
            self._held.append(t)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensorsMeter:
        if self._hooks is not None:
            raise RuntimeError("this SavedTensorsMeter is already active")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._held = []


def measure_training_step(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: bool = True,
    label: str = "",
) -> MemoryBreakdown:
    """Run one training step and measure where its memory goes.

    ``loss_fn()`` runs the forward pass and returns a scalar loss. The gradients are zeroed
    (set to ``None``) first; the forward runs under a :class:`SavedTensorsMeter`; then
    ``loss.backward()`` and, when ``optimizer`` is given and ``step``, ``optimizer.step()``.
    Weights, constants, gradients and optimiser state are measured after the step (optimiser
    state exists from the first step on); activations are what the forward pass saved.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable returning the loss, got {loss_fn!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {optimizer!r}")
    model.zero_grad(set_to_none=True)
    with SavedTensorsMeter(model) as meter:
        loss = loss_fn()
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
        raise ValueError(
            "loss_fn must return a scalar tensor that requires grad (did the model run under "
            "torch.no_grad(), or has it no trainable parameter?)"
        )
    activations = meter.nbytes
    loss.backward()
    if optimizer is not None and step:
        optimizer.step()
    by_dtype = weight_bytes(model)
    total, trainable = _count_parameters(model)
    return MemoryBreakdown(
        weights=sum(by_dtype.values()),
        quant_constants=quantization_constant_bytes(model),
        gradients=gradient_bytes(model),
        optimizer_state=optimizer_state_bytes(optimizer) if optimizer is not None else 0,
        activations=activations,
        weights_by_dtype=by_dtype,
        parameters=total,
        trainable_parameters=trainable,
        label=label,
    )


# --------------------------------------------------------------------------------------------
# Estimating: transformer shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a transformer block: ``name`` is its dotted path inside the block."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


_ARCHS = ("llama", "gpt2", "tinygpt")


@dataclass(frozen=True)
class TransformerSpec:
    """The shapes of a decoder-only transformer, enough to count its memory.

    ``arch`` fixes the layer layout and names (as in the Hugging Face / course modules, so LoRA
    targets mean the same thing):

    - ``"llama"``: ``attn.q_proj/k_proj/v_proj/o_proj``, gated MLP ``mlp.gate_proj/up_proj/
      down_proj``, RMSNorm, rotary positions (no position parameters), untied head, no biases.
    - ``"gpt2"``: fused ``attn.c_attn`` (d -> 3d) and ``attn.c_proj``, ``mlp.c_fc`` /
      ``mlp.c_proj``, LayerNorm (weight and bias), learned positions, tied head, biases.
    - ``"tinygpt"``: the course model (``course_lib.model.tinygpt``): q/k/v/o, ``mlp.up_proj`` /
      ``mlp.down_proj`` with GELU, RMSNorm, learned positions, untied head, no biases.
    """

    name: str
    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int  # context length (the size of the learned position table, if any)
    dropout: bool = False  # dropout layers active in training (they save 1-byte masks)
    fused_norm: bool = True  # a fused norm kernel saves only its input (+ statistics)
    loss_mask: bool = False  # the loss multiplies by a float mask (course_lib's lm_loss)

    def __post_init__(self) -> None:
        _choice("arch", self.arch, _ARCHS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )

    # -- layout -------------------------------------------------------------------------------
    @property
    def gated_mlp(self) -> bool:
        return self.arch == "llama"

    @property
    def norm(self) -> str:
        return "layernorm" if self.arch == "gpt2" else "rmsnorm"

    @property
    def learned_positions(self) -> bool:
        return self.arch in ("gpt2", "tinygpt")

    @property
    def tied_head(self) -> bool:
        return self.arch == "gpt2"

    @property
    def bias(self) -> bool:
        return self.arch == "gpt2"

    def block_linears(self) -> tuple[LinearSpec, ...]:
        """The linear layers of one block, in forward order."""
        h, f, b = self.d_model, self.d_ff, self.bias
        if self.arch == "gpt2":
            return (
                LinearSpec("attn.c_attn", h, 3 * h, b),
                LinearSpec("attn.c_proj", h, h, b),
                LinearSpec("mlp.c_fc", h, f, b),
                LinearSpec("mlp.c_proj", f, h, b),
            )
        attn = tuple(LinearSpec(f"attn.{n}", h, h, b) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if self.arch == "llama":
            mlp = (
                LinearSpec("mlp.gate_proj", h, f, b),
                LinearSpec("mlp.up_proj", h, f, b),
                LinearSpec("mlp.down_proj", f, h, b),
            )
        else:
            mlp = (LinearSpec("mlp.up_proj", h, f, b), LinearSpec("mlp.down_proj", f, h, b))
        return attn + mlp

    def _roles(self) -> dict[str, Any]:
        lin = {spec.name: spec for spec in self.block_linears()}
        if self.arch == "gpt2":
            return {"attn_in": ["attn.c_attn"], "attn_out": "attn.c_proj",
                    "mlp_in": ["mlp.c_fc"], "mlp_out": "mlp.c_proj", "lin": lin}
        mlp_in = ["mlp.gate_proj", "mlp.up_proj"] if self.gated_mlp else ["mlp.up_proj"]
        return {"attn_in": ["attn.q_proj", "attn.k_proj", "attn.v_proj"], "attn_out": "attn.o_proj",
                "mlp_in": mlp_in, "mlp_out": "mlp.down_proj", "lin": lin}

    # -- parameter counts ---------------------------------------------------------------------
    def norm_params(self) -> int:
        """Parameters of one norm layer (RMSNorm: weight; LayerNorm: weight and bias)."""
        return 2 * self.d_model if self.norm == "layernorm" else self.d_model

    def param_groups(self) -> dict[str, int]:
        """Parameter elements by role: block linear weights, biases, norms, embeddings, head."""
        lin = self.block_linears()
        groups = {
            "linear_weights": self.n_layers * sum(s.numel for s in lin),
            "linear_biases": self.n_layers * sum(s.out_features for s in lin if s.bias),
            "norms": (2 * self.n_layers + 1) * self.norm_params(),
            "token_embedding": self.vocab_size * self.d_model,
            "position_embedding": self.max_seq_len * self.d_model if self.learned_positions else 0,
            "lm_head": 0 if self.tied_head else self.vocab_size * self.d_model,
        }
        return groups

    @property
    def n_params(self) -> int:
        """Total parameter elements (a tied head counts once)."""
        return sum(self.param_groups().values())

    def parameter_tensors(self) -> list[tuple[str, int, int]]:
        """``(role, numel, out_features)`` of every parameter tensor (a tied head once).

        ``out_features`` is the number of output rows of a linear weight, 0 for other tensors.
        """
        h = self.d_model
        norm = [("norms", h, 0)] * (2 if self.norm == "layernorm" else 1)
        out: list[tuple[str, int, int]] = [("token_embedding", self.vocab_size * h, 0)]
        if self.learned_positions:
            out.append(("position_embedding", self.max_seq_len * h, 0))
        for _ in range(self.n_layers):
            out += norm * 2
            for s in self.block_linears():
                out.append(("linear_weights", s.numel, s.out_features))
                if s.bias:
                    out.append(("linear_biases", s.out_features, 0))
        out += norm
        if not self.tied_head:
            out.append(("lm_head", self.vocab_size * h, 0))
        return out

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_tinygpt(cls, config: Any = None, name: str = "tinygpt") -> TransformerSpec:
        """The spec of a course ``TinyGPT`` with ``config`` (default: ``TinyGPTConfig()``)."""
        from course_lib.model.tinygpt import TinyGPTConfig

        if config is None:
            config = TinyGPTConfig()
        if not isinstance(config, TinyGPTConfig):
            raise TypeError(f"config must be a TinyGPTConfig, got {type(config).__name__}")
        return cls(
            name=name,
            arch="tinygpt",
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            n_layers=config.n_layer,
            n_heads=config.n_head,
            d_ff=config.d_ff,
            max_seq_len=config.block_size,
            dropout=config.dropout > 0,
            fused_norm=False,
            loss_mask=True,
        )

    @classmethod
    def llama(
        cls, name: str, d_model: int, n_layers: int, n_heads: int, d_ff: int,
        vocab_size: int = 32000, max_seq_len: int = 2048,
    ) -> TransformerSpec:
        """A LLaMA-style model (gated MLP, RMSNorm, rotary positions, untied head, no bias)."""
        return cls(name, "llama", vocab_size, d_model, n_layers, n_heads, d_ff, max_seq_len)

    @classmethod
    def gpt2(
        cls, name: str, d_model: int, n_layers: int, n_heads: int,
        vocab_size: int = 50257, max_seq_len: int = 1024, dropout: bool = True,
    ) -> TransformerSpec:
        """A GPT-2-style model (d_ff = 4 d_model, LayerNorm, learned positions, tied head)."""
        return cls(
            name, "gpt2", vocab_size, d_model, n_layers, n_heads, 4 * d_model, max_seq_len, dropout
        )


PRESETS: dict[str, TransformerSpec] = {
    "llama-7b": TransformerSpec.llama("llama-7b", 4096, 32, 32, 11008),
    "llama-13b": TransformerSpec.llama("llama-13b", 5120, 40, 40, 13824),
    "llama-33b": TransformerSpec.llama("llama-33b", 6656, 60, 52, 17920),
    "llama-65b": TransformerSpec.llama("llama-65b", 8192, 80, 64, 22016),
    "gpt2-124m": TransformerSpec.gpt2("gpt2-124m", 768, 12, 12),
    "gpt2-355m": TransformerSpec.gpt2("gpt2-355m", 1024, 24, 16),
    "gpt2-774m": TransformerSpec.gpt2("gpt2-774m", 1280, 36, 20),
    "gpt2-1.5b": TransformerSpec.gpt2("gpt2-1.5b", 1600, 48, 25),
}
"""Real shapes. ``"tinygpt"`` (the course model) is built on demand by :func:`get_preset`."""


def preset_names() -> tuple[str, ...]:
    """Every preset name: the course model first, then the real shapes."""
    return ("tinygpt", *PRESETS)


def get_preset(name: str) -> TransformerSpec:
    """The spec called ``name`` (see :func:`preset_names`)."""
    if name == "tinygpt":
        return TransformerSpec.from_tinygpt()
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {preset_names()}, got {name!r}")
    return PRESETS[name]


def _spec(spec: TransformerSpec | str) -> TransformerSpec:
    if isinstance(spec, str):
        return get_preset(spec)
    if not isinstance(spec, TransformerSpec):
        raise TypeError(f"spec must be a TransformerSpec or a preset name, got {spec!r}")
    return spec


# --------------------------------------------------------------------------------------------
# Estimating: bytes of weights and optimiser state
# --------------------------------------------------------------------------------------------


def bits_per_parameter(weight_dtype: str, blocksize: int = 64, dq_blocksize: int = 256) -> float:
    """Storage bits per weight for large tensors (codes + constants).

    fp32 32, fp16/bf16 16, int8 8 (plus one fp32 scale per output row, negligible), nf4
    ``4 + 32/blocksize`` (4.5 at 64) and nf4 with double quantisation
    ``4 + 8/blocksize + 32/(blocksize * dq_blocksize)`` (about 4.127).
    """
    _choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    _positive_int("blocksize", blocksize)
    _positive_int("dq_blocksize", dq_blocksize)
    if weight_dtype in FLOAT_DTYPES:
        return 8.0 * FLOAT_DTYPES[weight_dtype]
    if weight_dtype == "int8":
        return 8.0
    if weight_dtype == "nf4":
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)


def quantized_weight_bytes(
    numel: int, weight_dtype: str, out_features: int | None = None, blocksize: int = 64,
    dq_blocksize: int = 256,
) -> tuple[int, int]:
    """``(data bytes, constant bytes)`` of one weight tensor of ``numel`` elements.

    Blockwise over the flattened tensor, as bitsandbytes and ``course_lib.model.nf4`` do:

    - nf4: ``ceil(n/2)`` bytes of packed codes + one fp32 absmax per block;
    - nf4-dq: the same codes + one uint8 absmax per block + one fp32 absmax per
      ``dq_blocksize`` blocks + one fp32 offset;
    - int8: ``n`` bytes + one fp32 scale per output row (``out_features`` is required);
    - fp32/fp16/bf16: ``n * element size`` and no constants.
    """
    n = _positive_int("numel", numel)
    _choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    _positive_int("blocksize", blocksize)
    if weight_dtype in FLOAT_DTYPES:
        return n * FLOAT_DTYPES[weight_dtype], 0
    if weight_dtype == "int8":
        if out_features is None:
            raise ValueError("out_features is required for weight_dtype='int8' (one scale per row)")
        return n, 4 * _positive_int("out_features", out_features)
    codes = (n + 1) // 2
    blocks = -(-n // blocksize)
    if weight_dtype == "nf4":
        return codes, 4 * blocks
    return codes, blocks + 4 * (-(-blocks // dq_blocksize)) + 4


def adamw_state_bytes(numels: Iterable[int], optimizer: str = "adamw") -> int:
    """Optimiser-state bytes for trainable tensors of the given sizes.

    - ``"adamw"``: two fp32 moments (8 bytes per element) and a 0-d fp32 ``step`` per tensor,
      as ``torch.optim.AdamW`` keeps them (and as mixed-precision trainers and bitsandbytes'
      32-bit/paged AdamW keep them for 16-bit parameters).
    - ``"adamw8bit"``: bitsandbytes' blockwise 8-bit AdamW: tensors with at least
      :data:`ADAMW8BIT_MIN_SIZE` elements keep two uint8 states (2 bytes per element) and two
      fp32 absmax per block of :data:`ADAMW8BIT_BLOCKSIZE`; smaller tensors keep fp32 states;
      the two 256-entry quantisation maps exist once; ``step`` is a Python int.
    - ``"sgd"``: plain SGD without momentum keeps nothing.
    """
    _choice("optimizer", optimizer, OPTIMIZERS)
    sizes = [_positive_int("numel", n) for n in numels]
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return sum(8 * n + 4 for n in sizes)
    total = 0
    any_8bit = False
    for n in sizes:
        if n >= ADAMW8BIT_MIN_SIZE:
            any_8bit = True
            total += 2 * n + 2 * 4 * (-(-n // ADAMW8BIT_BLOCKSIZE))
        else:
            total += 8 * n
    return total + (_QMAP_BYTES if any_8bit else 0)


def lora_target_layers(
    spec: TransformerSpec | str, targets: Sequence[str] | str
) -> tuple[LinearSpec, ...]:
    """The block linears that ``targets`` selects (PEFT's rule: a name matches itself or a
    dotted suffix, ``"c_proj"`` matches ``attn.c_proj`` and ``mlp.c_proj``; ``"all-linear"``
    selects every block linear, never the output head)."""
    spec = _spec(spec)
    linears = spec.block_linears()
    if targets == "all-linear":
        return linears
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets or not all(
        isinstance(t, str) and t for t in targets
    ):
        raise ValueError(
            "lora_targets must be a non-empty list of layer names (e.g. ['q_proj', 'v_proj']) "
            f"or 'all-linear', got {targets!r}"
        )
    chosen = tuple(
        s for s in linears if any(s.name == t or s.name.endswith("." + t) for t in targets)
    )
    unmatched = [t for t in targets if not any(s.name == t or s.name.endswith("." + t) for s in linears)]
    if unmatched:
        names = sorted({s.short_name for s in linears})
        raise ValueError(
            f"lora_targets {unmatched} matched no linear layer of {spec.name!r}; its layers are "
            f"{names} (or use 'all-linear')"
        )
    return chosen


# --------------------------------------------------------------------------------------------
# Estimating: activations (what autograd saves, operation by operation)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationEstimate:
    """Saved-activation bytes of one forward pass.

    ``saved``: kept from the forward pass until backward (embeddings + blocks + head + loss);
    ``per_block``: what each block keeps; ``recompute``: with gradient checkpointing, the
    largest block's full activations, alive while that block is recomputed during backward.
    """

    saved: int
    per_block: tuple[int, ...]
    embedding: int
    head: int
    recompute: int


class _Saver:
    """Named saved tensors: a tensor saved by several operations counts once."""

    def __init__(self) -> None:
        self.saved: dict[str, int] = {}

    def save(self, name: str, nbytes: int) -> None:
        self.saved[name] = nbytes

    @property
    def total(self) -> int:
        return sum(self.saved.values())


def _block_activations(
    spec: TransformerSpec, B: int, T: int, e: int, *, full: bool,
    lora: Mapping[str, tuple[int, int]], rg_in: bool, flash: bool,
) -> tuple[int, bool]:
    """Bytes one block saves and whether its output requires grad.

    ``e``: bytes per activation element; ``full``: every parameter is trained; ``lora``: maps
    a block linear's name to ``(rank, bytes per LoRA element)``; ``rg_in``: the block input
    requires grad (something upstream is trained).
    """
    N, h, f, a = B * T, spec.d_model, spec.d_ff, spec.n_heads
    roles = spec._roles()
    lin: dict[str, LinearSpec] = roles["lin"]
    s = _Saver()

    def norm(x: str, rg: bool, prefix: str) -> tuple[str, bool]:
        if spec.fused_norm:  # one kernel: saves its input and per-token statistics
            if rg or full:
                s.save(x, N * h * e)
                s.save(prefix + ".stats", N * 4 * (2 if spec.norm == "layernorm" else 1))
        else:  # course RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, op by op
            if rg:
                s.save(x, N * h * e)  # by pow and by x * rms
                s.save(prefix + ".rms", N * e)  # by rsqrt and by x * rms
            if full:
                s.save(prefix + ".x_rms", N * h * e)  # by (x * rms) * weight, for weight's grad
        return prefix + ".out", rg or full

    def linear(x: str, rg: bool, name: str) -> tuple[str, bool]:
        spec_ = lin[name]
        if full:  # weight's gradient needs the input
            s.save(x, N * spec_.in_features * e)
        if name in lora:
            r, lb = lora[name]
            if lb == e:
                s.save(x, N * spec_.in_features * e)  # the same tensor as the base input
            else:
                s.save(name + ".lora_x", N * spec_.in_features * lb)  # cast to the LoRA dtype
            s.save(name + ".lora_h", N * r * lb)  # x @ A^T, for B's gradient
        return name + ".out", rg or full or name in lora

    # attention
    n1, n1_rg = norm("x_in", rg_in, "norm1")
    outs = [linear(n1, n1_rg, name) for name in roles["attn_in"]]
    attn_rg = any(rg for _, rg in outs)
    attn_out = "attn.merged"
    if attn_rg:
        for (out, _), name in zip(outs, roles["attn_in"]):
            s.save(out, N * lin[name].out_features * e)  # q, k, v (views of c_attn's output)
        if flash:
            s.save("attn.out", N * h * e)  # kernel output = o_proj input
            s.save("attn.lse", B * a * T * 4)  # fp32 log-sum-exp per row
            attn_out = "attn.out"
        else:
            s.save("attn.probs", B * a * T * T * e)  # softmax output
            if spec.dropout:
                s.save("attn.drop_mask", B * a * T * T)
                s.save("attn.drop_out", B * a * T * T * e)
    o, o_rg = linear(attn_out, attn_rg, roles["attn_out"])
    if spec.dropout and o_rg:
        s.save("attn.resid_mask", N * h)
    rg_mid = rg_in or o_rg

    # MLP
    n2, n2_rg = norm("x_mid", rg_mid, "norm2")
    if spec.gated_mlp:
        (g, g_rg), (u, u_rg) = (linear(n2, n2_rg, name) for name in roles["mlp_in"])
        if g_rg:
            s.save(g, N * f * e)  # silu's input
            s.save(u, N * f * e)  # silu(g) * u keeps u for silu(g)'s gradient
        if u_rg:
            s.save("mlp.silu", N * f * e)  # ... and silu(g) for u's gradient
        act, act_rg = "mlp.prod", g_rg or u_rg
    else:
        up, up_rg = linear(n2, n2_rg, roles["mlp_in"][0])
        if up_rg:
            s.save(up, N * f * e)  # GELU's input
        act, act_rg = "mlp.act", up_rg
    d, d_rg = linear(act, act_rg, roles["mlp_out"])
    if spec.dropout and d_rg:
        s.save("mlp.resid_mask", N * h)
    return s.total, rg_mid or d_rg


def _embedding_activations(spec: TransformerSpec, B: int, T: int, full: bool) -> int:
    total = 0
    if full:
        total += B * T * 8  # token ids (int64), for the embedding's gradient
        if spec.learned_positions:
            total += T * 8  # position ids
        if spec.dropout:
            total += B * T * spec.d_model  # dropout mask
    return total


def _head_activations(spec: TransformerSpec, B: int, T: int, e: int, full: bool, rg: bool) -> int:
    N, h = B * T, spec.d_model
    s = _Saver()
    # final norm (same rules as in a block)
    if spec.fused_norm:
        if rg or full:
            s.save("x", N * h * e)
            s.save("stats", N * 4 * (2 if spec.norm == "layernorm" else 1))
    else:
        if rg:
            s.save("x", N * h * e)
            s.save("rms", N * e)
        if full:
            s.save("x_rms", N * h * e)
    if full:
        s.save("normed", N * h * e)  # the head's input, for the head's gradient
    if rg or full:
        s.save("log_softmax", N * spec.vocab_size * 4)  # the loss works in fp32
        s.save("targets", N * 8)
        if spec.loss_mask:
            s.save("mask", N * 4)
            s.save("scalars", 8)  # the token count and the summed loss
    return s.total


def _lora_map(
    spec: TransformerSpec, targets: Sequence[str] | str | None, rank: int, lora_bytes: int
) -> dict[str, tuple[int, int]]:
    if targets is None:
        return {}
    return {s.name: (rank, lora_bytes) for s in lora_target_layers(spec, targets)}


def activation_bytes(
    spec: TransformerSpec | str,
    batch_size: int,
    seq_len: int,
    *,
    method: str = "full",
    dtype: str = "bf16",
    lora_targets: Sequence[str] | str = ("q_proj", "v_proj"),
    lora_rank: int = 8,
    lora_dtype: str | None = None,
    gradient_checkpointing: bool = False,
    flash_attention: bool = True,
) -> ActivationEstimate:
    """Bytes autograd saves in one forward pass of ``batch_size`` sequences of ``seq_len``.

    ``method="full"`` trains every parameter; ``"lora"`` / ``"qlora"`` train only LoRA adapters
    on ``lora_targets`` (a frozen linear layer keeps no input; layers before the first adapter
    keep nothing). ``dtype`` is the activation dtype (the compute dtype); LoRA layers in another
    ``lora_dtype`` keep a cast copy of their input. With ``gradient_checkpointing`` each block
    keeps only its input, and ``recompute`` reports the largest block's activations, alive while
    it is recomputed. ``flash_attention=False`` keeps the ``seq_len x seq_len`` probabilities.
    """
    spec = _spec(spec)
    B = _positive_int("batch_size", batch_size)
    T = _positive_int("seq_len", seq_len)
    _choice("method", method, METHODS)
    _choice("dtype", dtype, tuple(FLOAT_DTYPES))
    _check_bool("gradient_checkpointing", gradient_checkpointing)
    _check_bool("flash_attention", flash_attention)
    if spec.learned_positions and T > spec.max_seq_len:
        raise ValueError(
            f"seq_len={T} exceeds {spec.name!r}'s context of {spec.max_seq_len} positions"
        )
    e = FLOAT_DTYPES[dtype]
    full = method == "full"
    if full:
        lora: dict[str, tuple[int, int]] = {}
    else:
        lora_dtype = dtype if lora_dtype is None else lora_dtype
        _choice("lora_dtype", lora_dtype, tuple(FLOAT_DTYPES))
        lora = _lora_map(spec, lora_targets, _positive_int("lora_rank", lora_rank),
                         FLOAT_DTYPES[lora_dtype])
    embedding = _embedding_activations(spec, B, T, full)
    rg = full
    per_block: list[int] = []
    recompute = 0
    for _ in range(spec.n_layers):
        nbytes, rg_out = _block_activations(
            spec, B, T, e, full=full, lora=lora, rg_in=rg, flash=flash_attention
        )
        if gradient_checkpointing:
            recompute = max(recompute, nbytes)
            nbytes = B * T * spec.d_model * e  # the block input, kept for the recomputation
        per_block.append(nbytes)
        rg = rg_out
    head = _head_activations(spec, B, T, e, full, rg)
    return ActivationEstimate(
        saved=embedding + sum(per_block) + head,
        per_block=tuple(per_block),
        embedding=embedding,
        head=head,
        recompute=recompute,
    )


def korthikanti_activation_bytes(
    seq_len: int, batch_size: int, d_model: int, n_heads: int, n_layers: int = 1,
    flash_attention: bool = False,
) -> int:
    """Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer
    Models", eq. (1): a GPT layer with 16-bit activations and dropout saves
    ``34 s b h + 5 a s^2 b`` bytes. A fused attention kernel never stores the ``s x s``
    probabilities (nor their dropout mask), which removes the ``5 a s^2 b`` term."""
    s, b = _positive_int("seq_len", seq_len), _positive_int("batch_size", batch_size)
    h, a = _positive_int("d_model", d_model), _positive_int("n_heads", n_heads)
    L = _positive_int("n_layers", n_layers)
    per_layer = 34 * s * b * h + (0 if flash_attention else 5 * a * s * s * b)
    return L * per_layer


# --------------------------------------------------------------------------------------------
# Estimating: the whole step
# --------------------------------------------------------------------------------------------


def estimate_memory(
    spec: TransformerSpec | str,
    method: str = "full",
    *,
    batch_size: int = 1,
    seq_len: int | None = None,
    weight_dtype: str | None = None,
    compute_dtype: str | None = None,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | str = ("q_proj", "v_proj"),
    lora_dtype: str | None = None,
    optimizer: str = "adamw",
    master_weights: bool = False,
    gradient_checkpointing: bool = False,
    flash_attention: bool = True,
    quant_blocksize: int = 64,
) -> MemoryBreakdown:
    """Estimate the memory of one training step of ``spec`` (a :class:`TransformerSpec` or a
    preset name such as ``"llama-65b"``).

    Args:
        method: ``"full"`` (every parameter trained), ``"lora"`` (frozen base, adapters on
            ``lora_targets``) or ``"qlora"`` (LoRA on a base whose block linears are 4-bit).
        batch_size, seq_len: sequences per step and tokens per sequence (default
            ``min(512, context)``).
        weight_dtype: storage of the base weights: ``"fp32"`` / ``"fp16"`` / ``"bf16"`` (full and
            LoRA; default fp32), ``"int8"`` (LoRA on an 8-bit base), ``"nf4"`` / ``"nf4-dq"``
            (QLoRA; default ``"nf4-dq"``, double quantisation). Only the block linears are
            quantised; embeddings, norms, biases and the head stay in ``compute_dtype``.
        compute_dtype: dtype of activations and unquantised tensors (default: ``weight_dtype``
            when it is a float, else ``"bf16"``).
        lora_rank, lora_targets, lora_dtype: the adapters (``lora_targets`` a list of layer
            names or ``"all-linear"``; ``lora_dtype`` defaults to ``compute_dtype``).
        optimizer: ``"adamw"`` (fp32 moments), ``"adamw8bit"`` (bitsandbytes' blockwise 8-bit)
            or ``"sgd"`` (no state); see :func:`adamw_state_bytes`. Paged optimisers hold the
            same bytes; they only move them to CPU memory when the GPU runs out.
        master_weights: keep an fp32 copy of 16-bit trainable weights (mixed precision).
        gradient_checkpointing: keep only each block's input, recompute the rest in backward.
        flash_attention: attention through a fused kernel (no ``s x s`` matrix saved).
        quant_blocksize: values per absmax block of the 4-bit and 8-bit quantisation.

    Returns a :class:`MemoryBreakdown` whose ``weights_by_dtype`` splits the weights. Codebooks
    are left out of ``quant_constants``: the course's ``NF4Linear`` stores none per layer, while
    bitsandbytes keeps its 16-entry NF4 table (and, with double quantisation, its 256-entry map)
    in every layer's ``quant_state`` -- 1,088 bytes per layer, which a measurement counts.
    """
    spec = _spec(spec)
    _choice("method", method, METHODS)
    if seq_len is None:
        seq_len = min(512, spec.max_seq_len)
    if weight_dtype is None:
        weight_dtype = "nf4-dq" if method == "qlora" else "fp32"
    _choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    allowed = {"full": tuple(FLOAT_DTYPES), "lora": (*FLOAT_DTYPES, "int8"), "qlora": ("nf4", "nf4-dq")}
    if weight_dtype not in allowed[method]:
        hint = " (4-bit base weights: use method='qlora')" if weight_dtype.startswith("nf4") else ""
        raise ValueError(
            f"weight_dtype={weight_dtype!r} is not allowed with method={method!r}; "
            f"allowed: {allowed[method]}{hint}"
        )
    if compute_dtype is None:
        compute_dtype = weight_dtype if weight_dtype in FLOAT_DTYPES else "bf16"
    _choice("compute_dtype", compute_dtype, tuple(FLOAT_DTYPES))
    _choice("optimizer", optimizer, OPTIMIZERS)
    _check_bool("master_weights", master_weights)
    _check_bool("gradient_checkpointing", gradient_checkpointing)
    _check_bool("flash_attention", flash_attention)
    _positive_int("quant_blocksize", quant_blocksize)
    full = method == "full"
    if not full:
        lora_dtype = compute_dtype if lora_dtype is None else lora_dtype
        _choice("lora_dtype", lora_dtype, tuple(FLOAT_DTYPES))
        _positive_int("lora_rank", lora_rank)
        targets = lora_target_layers(spec, lora_targets)
    trainable_dtype = weight_dtype if full else lora_dtype
    if master_weights and FLOAT_DTYPES[trainable_dtype] == 4:
        raise ValueError(
            "master_weights=True keeps an fp32 copy of 16-bit trainable weights, but the trained "
            f"weights are already {trainable_dtype}; use a 16-bit weight_dtype (full) or "
            "lora_dtype (LoRA), or master_weights=False"
        )

    # weights and constants, tensor by tensor
    by_dtype: dict[str, int] = {}
    constants = 0
    other_dtype = weight_dtype if weight_dtype in FLOAT_DTYPES else compute_dtype
    trainable_numels: list[int] = []
    for role, numel, rows in spec.parameter_tensors():
        if role == "linear_weights":
            data, const = quantized_weight_bytes(numel, weight_dtype, rows, quant_blocksize)
            label = "nf4" if weight_dtype.startswith("nf4") else weight_dtype
            constants += const
        else:
            data, label = numel * FLOAT_DTYPES[other_dtype], other_dtype
        by_dtype[label] = by_dtype.get(label, 0) + data
        if full:
            trainable_numels.append(numel)
    if not full:
        for s in targets:
            for numel in (lora_rank * s.in_features, s.out_features * lora_rank):
                trainable_numels.extend([numel] * spec.n_layers)
        lora_bytes = sum(trainable_numels) * FLOAT_DTYPES[lora_dtype]
        by_dtype[lora_dtype] = by_dtype.get(lora_dtype, 0) + lora_bytes
    trainable = sum(trainable_numels)
    parameters = spec.n_params + (0 if full else trainable)

    acts = activation_bytes(
        spec, batch_size, seq_len, method=method, dtype=compute_dtype,
        lora_targets=lora_targets, lora_rank=lora_rank,
        lora_dtype=None if full else lora_dtype,
        gradient_checkpointing=gradient_checkpointing, flash_attention=flash_attention,
    )
    label = (
        f"{spec.name} {method} ({weight_dtype} weights"
        + ("" if full else f", r={lora_rank}")
        + f", {optimizer}, b={batch_size}, s={seq_len}"
        + (", checkpointing" if gradient_checkpointing else "")
        + ")"
    )
    return MemoryBreakdown(
        weights=sum(by_dtype.values()),
        quant_constants=constants,
        gradients=trainable * FLOAT_DTYPES[trainable_dtype],
        optimizer_state=adamw_state_bytes(trainable_numels, optimizer),
        master_weights=4 * trainable if master_weights else 0,
        activations=acts.saved,
        recompute=acts.recompute,
        weights_by_dtype=by_dtype,
        parameters=parameters,
        trainable_parameters=trainable,
        label=label,
    )

