"""LoRA: low-rank adaptation of linear layers (see notebook 01_lora).

A frozen weight ``W0`` (``out_features x in_features``, i.e. ``d x k``) gets a trainable
low-rank update::

    h = W0 x + (alpha / r) B A x        A: (r, in_features)   B: (out_features, r)

``alpha / r`` is the ``scaling`` (``alpha / sqrt(r)`` with rank-stabilised LoRA). ``B`` starts at
zero, so a freshly wrapped layer computes exactly what its base computed, and only
``r * (d + k)`` parameters are trained instead of ``d * k``.

Names follow loralib and PEFT, so what is learned here transfers: :class:`LoRALayer` holds
``lora_A`` / ``lora_B`` and returns only the update; :class:`LinearWithLoRA` wraps a frozen
``base_layer``, adds the update and can ``merge()`` / ``unmerge()`` it into the base weight (a
``merged`` flag, never triggered by ``train()`` / ``eval()``); :class:`LoRAConfig` +
:func:`apply_lora` wrap the layers that ``target_modules`` select, with PEFT's matching rules.
PEFT's adapter files (:func:`save_adapter` / :func:`load_adapter`) are in
:mod:`course_lib.model.adapters` and importable from here too.

The forward passes here are the plain formulas and the reference. ``LinearWithLoRA`` has one
switch, ``fused``: when it is on (the default) and :func:`course_lib.kernels.lora.applies`, the
same sum comes from fused autograd nodes that are faster on CPU
(``benchmarks/bench_lora_layer.py`` prints both).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from course_lib.kernels import lora as kernels
from course_lib.model.targets import (
    ALL_LINEAR,
    describe_names,
    matches,
    normalise_targets,
    output_head_names,
)
from course_lib.utils.params import TrainableSummary, trainable_parameters_summary
from course_lib.validation import (
    check_bool,
    check_choice,
    check_number,
    check_probability,
    positive_int,
)

__all__ = [
    "LoRALayer", "LinearWithLoRA", "LoRAConfig", "apply_lora", "lora_layers",
    "mark_only_lora_as_trainable", "merge_lora", "unmerge_lora", "lora_parameter_count",
    "lora_savings",
    # re-exported: the parameter counter (course_lib.utils.params) and PEFT's adapter files
    # (course_lib.model.adapters, through the module __getattr__ at the end of this file)
    "TrainableSummary", "trainable_parameters_summary",
    "save_adapter", "load_adapter", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME",  # noqa: F822
]

INIT_CHOICES = (True, False, "gaussian")


class LoRALayer(nn.Module):
    """The low-rank update ``scaling * B A dropout(x)`` of a ``out_features x in_features`` weight.

    Args:
        in_features: ``k``, the size of each input vector.
        out_features: ``d``, the size of each output vector.
        r: the rank, a positive int (typically 8 to 64).
        lora_alpha: a positive number; ``scaling = lora_alpha / r``.
        lora_dropout: dropout probability in ``[0, 1)`` on the update's input (when training).
        init_lora_weights: ``True``: ``A`` kaiming-uniform (a=√5, as PEFT and loralib), ``B = 0``;
            ``"gaussian"``: ``A ~ N(0, (1/r)^2)`` (PEFT's), ``B = 0``; ``False``: ``B`` random
            too, so the update is not zero at the start (for experiments only).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        device, dtype: where and in which dtype ``lora_A`` / ``lora_B`` are created.

    ``forward(x)`` takes ``(..., in_features)`` and returns ``(..., out_features)`` in the LoRA
    parameters' dtype; it never forms ``B @ A``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True,
                 use_rslora: bool = False, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.r = positive_int("r", r)
        self.lora_alpha = _check_alpha(lora_alpha)
        self.use_rslora = check_bool("use_rslora", use_rslora)
        self.init_lora_weights = check_choice("init_lora_weights", init_lora_weights, INIT_CHOICES)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(_check_dropout(lora_dropout))
        _warn_if_no_saving(out_features, in_features, r)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise ``lora_A`` / ``lora_B`` as ``init_lora_weights`` says."""
        if self.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, mean=0.0, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"LoRA input must have last dimension in_features="
                             f"{self.in_features}, got shape {tuple(x.shape)}")
        x = x.to(self.lora_A.dtype)  # (..., in_features), in the LoRA dtype
        return (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``ΔW = scaling * B @ A`` (``out_features x in_features``), computed in at least fp32."""
        return _delta(self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
            f"lora_dropout={self.lora_dropout.p}, use_rslora={self.use_rslora}"
        )


class LinearWithLoRA(nn.Module):
    """A frozen ``base_layer`` plus a trainable :class:`LoRALayer` ``lora``.

    ``forward(x) = base_layer(x) + lora(x)``; after :meth:`merge` it is just ``base_layer(x)``
    with the update folded into the base weight.

    ``base_layer`` is an ``nn.Linear`` or any Linear-like module (int ``in_features`` /
    ``out_features`` and a ``weight`` tensor), e.g. a quantised layer; its parameters are frozen.
    The LoRA parameters live on the base weight's device, in ``lora_dtype``: by default the base
    weight's dtype if that is fp32 or fp64, else fp32 (as PEFT's ``autocast_adapter_dtype``).
    The update is computed in the LoRA dtype and cast to the base output's dtype.

    ``fused`` (default True) adds the update with :mod:`course_lib.kernels.lora` where that
    applies: the same sum as the plain path, faster on CPU, first-order gradients only (use
    ``fused=False`` for double backward).
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True,
                 use_rslora: bool = False, *, lora_dtype: torch.dtype | None = None,
                 fused: bool = True) -> None:
        super().__init__()
        in_features, out_features, weight = _linear_like(base_layer)
        if lora_dtype is None:
            keep = weight.dtype in (torch.float32, torch.float64)
            lora_dtype = weight.dtype if keep else torch.float32
        elif not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
            raise TypeError(f"lora_dtype must be a floating-point torch.dtype, got {lora_dtype!r}")
        self.fused = check_bool("fused", fused)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.lora = LoRALayer(
            in_features, out_features, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
            device=weight.device, dtype=lora_dtype,
        )
        self.merged = False
        # (A, B, scaling) exactly as merged, so unmerge() removes what merge() added even if
        # lora_A / lora_B were changed in between.
        self._merged_factors: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the update is already inside the base weight
            return self.base_layer(x)
        if self.fused and kernels.applies(self, x):
            return kernels.forward(self, x)  # the same sum through fused autograd nodes
        result = self.base_layer(x)  # (..., out_features)
        return result + self.lora(x).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW = scaling · B · A`` into the base weight (zero-latency inference). A second
        ``merge()`` warns and does nothing; a non-finite result is a ``ValueError``."""
        if self.merged:
            warnings.warn("merge(): this layer is already merged; nothing was done", UserWarning,
                          stacklevel=2)
            return
        A = self.lora.lora_A.detach().clone()
        B = self.lora.lora_B.detach().clone()
        self._add_to_weight(_delta(A, B, self.lora.scaling), "merge()")
        self._merged_factors = (A, B, self.lora.scaling)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged update out of the base weight again (warns if not merged)."""
        if not self.merged:
            warnings.warn("unmerge(): this layer is not merged; nothing was done", UserWarning,
                          stacklevel=2)
            return
        assert self._merged_factors is not None
        self._add_to_weight(-_delta(*self._merged_factors), "unmerge()")
        self._merged_factors = None
        self.merged = False

    def _add_to_weight(self, delta: torch.Tensor, what: str) -> None:
        """``weight += delta``, unless the weight is not dense float or the sum is not finite."""
        weight = self.base_layer.weight
        shape = (self.out_features, self.in_features)
        if not (weight.is_floating_point() and tuple(weight.shape) == shape):
            raise TypeError(
                f"cannot merge into {type(self.base_layer).__name__}: merging needs a "
                f"floating-point weight of shape {shape}, but it has {weight.dtype} "
                f"{tuple(weight.shape)} (dequantise the base layer first)"
            )
        compute = torch.promote_types(weight.dtype, delta.dtype)
        new = weight.to(compute) + delta.to(device=weight.device, dtype=compute)
        if not torch.isfinite(new).all():
            raise ValueError(
                f"{what} would put non-finite values (inf/nan) into the base weight; the weight "
                f"was left unchanged (check lora_A / lora_B for inf/nan or huge values)"
            )
        weight.copy_(new)

    # A Linear-like view of the wrapped layer, so code that inspects layers keeps working.
    in_features = property(lambda self: self.lora.in_features)
    out_features = property(lambda self: self.lora.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: getattr(self.base_layer, "bias", None))

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


# ---- Argument checks and helpers of the layers ---------------------------------------------


def _check_alpha(value: object) -> float:
    check_number("lora_alpha", value, low=0.0, low_inclusive=False, hint="e.g. 16")
    return value  # as given: lora_alpha=16 stays the int 16 in reprs and adapter files


def _check_dropout(value: object) -> float:
    return check_probability("lora_dropout", value, hint="0 turns dropout off")


def _warn_if_no_saving(out_features: int, in_features: int, r: int) -> None:
    if r > min(out_features, in_features):
        warnings.warn(
            f"r={r} exceeds min(out_features, in_features)={min(out_features, in_features)} "
            f"of a {out_features}x{in_features} weight: B·A cannot have a higher rank than that, "
            f"and LoRA's r*(d+k)={r * (out_features + in_features):,} parameters are more than "
            f"the full weight's {out_features * in_features:,}, so there is no saving",
            UserWarning, stacklevel=3,
        )


def _linear_like(module: object) -> tuple[int, int, torch.Tensor]:
    """``(in_features, out_features, weight)`` of a Linear-like module, or a ``TypeError``."""
    if isinstance(module, LinearWithLoRA):
        raise TypeError("base_layer already has a LoRA adapter (it is a LinearWithLoRA)")
    in_f = getattr(module, "in_features", None)
    out_f = getattr(module, "out_features", None)
    weight = getattr(module, "weight", None)
    sizes_ok = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (in_f, out_f))
    if not (isinstance(module, nn.Module) and sizes_ok and isinstance(weight, torch.Tensor)):
        raise TypeError(
            f"base_layer must be an nn.Linear (or a Linear-like module with int in_features, "
            f"out_features and a weight tensor, e.g. a quantised linear layer), "
            f"got {type(module).__name__}"
        )
    # A quantised nn.Linear subclass (bitsandbytes' Linear4bit) stores packed integer codes in
    # `weight`, whose shape is not (out, in); only a floating-point weight is checked.
    shape_ok = not weight.is_floating_point() or tuple(weight.shape) == (out_f, in_f)
    if isinstance(module, nn.Linear) and not shape_ok:
        raise ValueError(
            f"base_layer.weight has shape {tuple(weight.shape)}, but an nn.Linear with "
            f"in_features={in_f}, out_features={out_f} needs ({out_f}, {in_f})"
        )
    return in_f, out_f, weight


def _delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` computed in at least fp32 (the only place ``B @ A`` is formed)."""
    compute = torch.promote_types(A.dtype, torch.float32)
    return (B.detach().to(compute) @ A.detach().to(compute)) * scaling


# ---- Configuration and model-level helpers -------------------------------------------------


@dataclass
class LoRAConfig:
    """Which layers get LoRA and how; field names are PEFT's ``LoraConfig`` names."""

    r: int = field(default=8, metadata={"help": "Rank of the update B·A, a positive int (8 for "
                                                 "small tasks, 64 for large ones)."})
    lora_alpha: float = field(default=16, metadata={"help": (
        "Scale numerator: the update is multiplied by lora_alpha / r (or lora_alpha / sqrt(r) "
        "with use_rslora). Common choices: r or 2r.")})
    lora_dropout: float = field(default=0.0, metadata={"help": (
        "Dropout probability in [0, 1) on the input of the update, in training mode only.")})
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": (
            "Layers to wrap: a list of names (each matches a module name exactly or as its "
            "dotted suffix, e.g. 'q_proj'), a full-match regex string, or 'all-linear' (every "
            "linear layer except the output head). Default: the attention's q_proj and v_proj.")})
    use_rslora: bool = field(default=False, metadata={"help": (
        "Rank-stabilised LoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r.")})
    init_lora_weights: bool | str = field(default=True, metadata={"help": (
        "True: A kaiming-uniform, B zero; 'gaussian': A ~ N(0, 1/r^2), B zero; False: B "
        "random too (the update is not zero at the start; for experiments only).")})

    def __post_init__(self) -> None:
        positive_int("r", self.r)
        _check_alpha(self.lora_alpha)
        _check_dropout(self.lora_dropout)
        check_bool("use_rslora", self.use_rslora)
        check_choice("init_lora_weights", self.init_lora_weights, INIT_CHOICES)
        self.target_modules = normalise_targets(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`LinearWithLoRA` / :class:`LoRALayer` for this config."""
        return {"r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "init_lora_weights": self.init_lora_weights, "use_rslora": self.use_rslora}

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` fields (see :mod:`course_lib.model.adapters`)."""
        from course_lib.model import adapters

        return adapters.to_peft_dict(self)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter config") -> LoRAConfig:
        """A config from PEFT's ``adapter_config.json`` (see :mod:`course_lib.model.adapters`)."""
        from course_lib.model import adapters

        return adapters.from_peft_dict(data, source)


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, *,
               layer_types: tuple[type, ...] = (nn.Linear,)) -> nn.Module:
    """Wrap the layers ``config.target_modules`` selects in :class:`LinearWithLoRA`, in place.

    Matching is PEFT's (:mod:`course_lib.model.targets`); the default config targets
    ``["q_proj", "v_proj"]``. Every matched module must be an instance of ``layer_types``
    (``nn.Linear`` unless a caller such as the QLoRA module passes its quantised layer class):
    a match of another type is a ``TypeError``, no match at all a ``ValueError`` listing the
    model's linear layers. Afterwards only LoRA parameters are trainable (as after PEFT's
    ``get_peft_model``). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    if not (
        isinstance(layer_types, tuple) and layer_types
        and all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types)
    ):
        raise TypeError(f"layer_types must be a tuple of nn.Module classes, got {layer_types!r}")
    for name in _select_targets(model, config.target_modules, layer_types):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LinearWithLoRA(getattr(parent, child), **config.layer_kwargs()))
    mark_only_lora_as_trainable(model)
    return model


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named submodules as the base model names them: not the root, nothing inside a
    LinearWithLoRA (its ``base_layer`` / ``lora``), but the LinearWithLoRA itself."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LinearWithLoRA):
            inside.append(name + ".")
        yield name, module


def _select_targets(
    model: nn.Module, targets: list[str] | str, layer_types: tuple[type, ...]
) -> list[str]:
    modules = dict(_candidates(model))
    linears = [n for n, m in modules.items() if isinstance(m, (*layer_types, LinearWithLoRA))]
    if targets == ALL_LINEAR:
        heads = output_head_names(model, linears)
        chosen = [n for n in linears if n not in heads]
    else:
        chosen = [n for n in modules if matches(n, targets)]
    type_names = " or ".join(t.__name__ for t in layer_types)
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} matched no module of this {type(model).__name__}. Its "
            f"{type_names} layers: {describe_names(linears)}. A list entry matches a "
            f"module name or its dotted suffix (e.g. 'q_proj'), a string is a full-match regex, "
            f"'all-linear' takes every linear layer except the output head"
        )
    for name in chosen:
        module = modules[name]
        if isinstance(module, LinearWithLoRA):
            raise ValueError(
                f"module {name!r} already has a LoRA adapter (was apply_lora called twice?); "
                f"unwrap it or choose target_modules that leave it out"
            )
        if not isinstance(module, layer_types):
            raise TypeError(
                f"target_modules={targets!r} matched module {name!r}, a "
                f"{type(module).__name__}, but LoRA wraps only {type_names} layers; make the "
                f"pattern select only those (this model's: {describe_names(linears)})"
            )
    return chosen


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    """``(name, layer)`` for every :class:`LinearWithLoRA` in ``model`` (``model`` itself too)."""
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            yield name, module


def _require_lora(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    """:func:`lora_layers` as a list; a ``ValueError`` if there are none."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(
            f"this {type(model).__name__} has no LoRA layers; call apply_lora(model, config) first"
        )
    return layers


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except ``lora_A`` / ``lora_B`` of the model's LoRA layers (a
    ``ValueError`` if there are none: nothing would be trainable). Returns ``model``."""
    lora_ids = {id(p) for m in model.modules() if isinstance(m, LoRALayer) for p in m.parameters()}
    if not lora_ids:
        raise ValueError(
            f"this {type(model).__name__} has no LoRA layers, so nothing would be trainable; "
            f"call apply_lora(model, config) first"
        )
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_ids)
    return model


def merge_lora(model: nn.Module) -> int:
    """Merge every not-yet-merged LoRA layer of ``model``; returns how many were merged."""
    todo = [layer for _, layer in _require_lora(model) if not layer.merged]
    for layer in todo:
        layer.merge()
    return len(todo)


def unmerge_lora(model: nn.Module) -> int:
    """Unmerge every merged LoRA layer of ``model``; returns how many were unmerged."""
    todo = [layer for _, layer in _require_lora(model) if layer.merged]
    for layer in todo:
        layer.unmerge()
    return len(todo)


# ---- The lesson's counting formulas --------------------------------------------------------


def lora_parameter_count(d: int, k: int, r: int) -> int:
    """Trainable parameters of a rank-``r`` update of a ``d x k`` weight: ``B`` is ``d x r``,
    ``A`` is ``r x k``, so ``r * (d + k)``."""
    d, k, r = positive_int("d", d), positive_int("k", k), positive_int("r", r)
    return r * (d + k)


def lora_savings(d: int, k: int, r: int) -> float:
    """How many times fewer parameters LoRA trains than full fine-tuning: ``d*k / (r*(d+k))``."""
    return (positive_int("d", d) * positive_int("k", k)) / lora_parameter_count(d, k, r)


# ---- PEFT's adapter files: in course_lib.model.adapters (which imports this module) -------

_ADAPTER_NAMES = ("save_adapter", "load_adapter", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME")


def __getattr__(name: str) -> Any:
    if name in _ADAPTER_NAMES:
        from course_lib.model import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
