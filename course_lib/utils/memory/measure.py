"""Measuring where the memory of a training step goes, on a live model.

Training keeps these kinds of bytes alive (notebook ``05_memory_compute_tradeoffs``):
weights (every parameter and buffer, LoRA adapters included), quantisation constants (what a
quantised weight needs besides its codes: NF4 absmax, nested absmax, ...), gradients (one
``.grad`` per trainable parameter), optimiser state (AdamW's moments, or 8-bit codes + blockwise
absmax, step counters) and activations (the tensors autograd saves in the forward pass).

Every count is of *storages*, not tensors: two views of one buffer, a tied embedding/head pair
or a tensor saved twice for backward occupy memory once, so a count is the sum of
``untyped_storage().nbytes()`` over *unique* storages (:func:`storage_key`,
:func:`unique_storage_bytes`). It works on any ``nn.Module`` and any optimiser whose state is a
dict of tensors per parameter (``torch.optim.AdamW``, ``bitsandbytes.optim.AdamW8bit`` -- which
steps on CPU -- and friends), on CPU deterministically.

Quantisation constants are detected generically (no import of bitsandbytes or of the course's
QLoRA module is needed): a tensor is a constant when it hangs off a parameter object as an
attribute (bitsandbytes keeps ``Params4bit.quant_state``; ``Int8Params.SCB``), when it sits in
a *quantisation-state object* stored on a module or parameter (any non-tensor object with an
``absmax`` attribute: bitsandbytes' ``QuantState`` with its nested ``state2``, the course's
``NF4State`` / ``Blockwise8bitState``), or when it is a registered buffer whose name says so
(``absmax``, ``weight_absmax2``, ``quant_map``, ``offset``, ``code``, ``SCB``, ``scales`` ...,
see :data:`CONSTANT_BUFFER_NAMES`) on a module that also holds integer codes. Their codebooks
(16 NF4 levels, 256-entry dynamic map) are counted where they are stored, once per storage.

Saved activations are measured with :func:`torch.autograd.graph.saved_tensors_hooks`
(:class:`SavedTensorsMeter`): every tensor autograd packs for backward is seen once, parameters
and buffers are excluded. A custom autograd ``Function`` that stashes tensors on ``ctx``
attributes instead of ``ctx.save_for_backward`` (as bitsandbytes' 4-bit matmul does with its
weight) is invisible to these hooks. By the course's convention, measured bytes are printed in
binary units (``format_bytes(n, "binary")``: MiB, GiB).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from course_lib.utils.memory.breakdown import MemoryBreakdown
from course_lib.utils.params import trainable_parameters_summary

__all__ = [
    "CONSTANT_BUFFER_NAMES",
    "dtype_name",
    "storage_key",
    "unique_storage_bytes",
    "quantization_constant_tensors",
    "weight_bytes",
    "quantization_constant_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "SavedTensorsMeter",
    "measure_training_step",
]

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


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype: ``torch.bfloat16 -> 'bf16'``, ``torch.uint8 -> 'uint8'``."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return _TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))



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
    counts = trainable_parameters_summary(model)
    return MemoryBreakdown(
        weights=sum(by_dtype.values()),
        quant_constants=quantization_constant_bytes(model),
        gradients=gradient_bytes(model),
        optimizer_state=optimizer_state_bytes(optimizer) if optimizer is not None else 0,
        activations=activations,
        weights_by_dtype=by_dtype,
        parameters=counts.total,
        trainable_parameters=counts.trainable,
        label=label,
    )


# --------------------------------------------------------------------------------------------
# Estimating: transformer shapes
# --------------------------------------------------------------------------------------------
