"""LoRA: low-rank adaptation of linear layers (see notebook 01_lora).

A frozen weight ``W0`` (``out_features x in_features``, i.e. ``d x k``) gets a trainable
low-rank update::

    h = W0 x + scaling * B A x        A: (r, in_features)   B: (out_features, r)
    scaling = lora_alpha / r          (or lora_alpha / sqrt(r) with use_rslora)

``B`` starts at zero, so a freshly wrapped layer computes exactly what its base computed.

Names and conventions follow loralib and PEFT, so what is learned here transfers:

- :class:`LoRALayer` holds ``lora_A`` / ``lora_B`` and returns only the update.
- :class:`LinearWithLoRA` wraps a frozen base (``base_layer``) and adds ``lora``'s update;
  ``merge()`` / ``unmerge()`` fold the update into the base weight (a ``merged`` flag; never
  triggered by ``train()`` / ``eval()``).
- :class:`LoRAConfig` + :func:`apply_lora` wrap the layers a model's ``target_modules`` select,
  with PEFT's matching rules.
- :func:`save_adapter` / :func:`load_adapter` read and write PEFT's adapter directory
  (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  ``base_model.model.<module path>.lora_A.weight``), so ``peft.PeftModel.from_pretrained``
  loads what :func:`save_adapter` writes, and the other way round.

Which base layers can be wrapped: :class:`LinearWithLoRA` accepts an ``nn.Linear`` or any
*Linear-like* module (one with positive int ``in_features`` / ``out_features`` and a ``weight``
tensor whose forward maps ``(..., in_features) -> (..., out_features)``), so the QLoRA module can
wrap its quantised layers. :func:`apply_lora` wraps only instances of ``layer_types``, which is
``(nn.Linear,)`` unless a caller names its own classes: a pattern that selects an attention block
or an embedding by mistake is then a clear ``TypeError`` instead of a silently broken model.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRALayer",
    "LinearWithLoRA",
    "LoRAConfig",
    "TrainableSummary",
    "apply_lora",
    "lora_layers",
    "mark_only_lora_as_trainable",
    "trainable_parameters_summary",
    "merge_lora",
    "unmerge_lora",
    "save_adapter",
    "load_adapter",
    "lora_parameter_count",
    "lora_savings",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."
_INIT_CHOICES = (True, False, "gaussian")


# --------------------------------------------------------------------------------------------
# Argument checks (each error names the argument and what is allowed)
# --------------------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_alpha(value: object) -> float | int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"lora_alpha must be a positive number (e.g. 16), got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"lora_alpha must be a positive finite number (e.g. 16), got {value!r}")
    return value


def _check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"lora_dropout must be a float in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1) (0 turns dropout off), got {value!r}")
    return float(value)


def _check_init(value: object) -> bool | str:
    if not any(value is c if isinstance(c, bool) else value == c for c in _INIT_CHOICES):
        raise ValueError(
            f"init_lora_weights must be True (A kaiming-uniform, B zero), 'gaussian' "
            f"(A ~ N(0, 1/r^2), B zero) or False (B random too), got {value!r}"
        )
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _warn_if_no_saving(out_features: int, in_features: int, r: int) -> None:
    if r > min(out_features, in_features):
        warnings.warn(
            f"r={r} exceeds min(out_features, in_features)={min(out_features, in_features)} "
            f"of a {out_features}x{in_features} weight: B·A cannot have a higher rank than that, "
            f"and LoRA's r*(d+k)={r * (out_features + in_features):,} parameters are more than "
            f"the full weight's {out_features * in_features:,}, so there is no saving",
            UserWarning,
            stacklevel=3,
        )


def _linear_like(module: object, name: str = "base_layer") -> tuple[int, int, torch.Tensor]:
    """``(in_features, out_features, weight)`` of a Linear-like module, or a ``TypeError``."""
    if isinstance(module, LinearWithLoRA):
        raise TypeError(f"{name} already has a LoRA adapter (it is a LinearWithLoRA)")
    in_f = getattr(module, "in_features", None)
    out_f = getattr(module, "out_features", None)
    weight = getattr(module, "weight", None)
    ok = (
        isinstance(module, nn.Module)
        and isinstance(in_f, int) and not isinstance(in_f, bool) and in_f > 0
        and isinstance(out_f, int) and not isinstance(out_f, bool) and out_f > 0
        and isinstance(weight, torch.Tensor)
    )
    if not ok:
        raise TypeError(
            f"{name} must be an nn.Linear (or a Linear-like module with int in_features, "
            f"out_features and a weight tensor, e.g. a quantised linear layer), "
            f"got {type(module).__name__}"
        )
    if isinstance(module, nn.Linear) and tuple(weight.shape) != (out_f, in_f):
        raise ValueError(
            f"{name}.weight has shape {tuple(weight.shape)}, but an nn.Linear with "
            f"in_features={in_f}, out_features={out_f} needs ({out_f}, {in_f})"
        )
    return in_f, out_f, weight


# --------------------------------------------------------------------------------------------
# The lesson's formulas
# --------------------------------------------------------------------------------------------


def lora_parameter_count(d: int, k: int, r: int) -> int:
    """Trainable parameters of a rank-``r`` LoRA update of a ``d x k`` weight: ``r * (d + k)``.

    ``B`` is ``d x r`` and ``A`` is ``r x k``.
    """
    d, k, r = _positive_int("d", d), _positive_int("k", k), _positive_int("r", r)
    return r * (d + k)


def lora_savings(d: int, k: int, r: int) -> float:
    """How many times fewer parameters LoRA trains than full fine-tuning: ``d*k / (r*(d+k))``."""
    return (_positive_int("d", d) * _positive_int("k", k)) / lora_parameter_count(d, k, r)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` computed in at least fp32 (the only place ``B @ A`` is formed)."""
    compute = torch.promote_types(A.dtype, torch.float32)
    return (B.detach().to(compute) @ A.detach().to(compute)) * scaling


class LoRALayer(nn.Module):
    """The low-rank update ``scaling * B A dropout(x)`` of a ``out_features x in_features`` weight.

    Args:
        in_features: ``k``, the size of each input vector.
        out_features: ``d``, the size of each output vector.
        r: the rank, a positive int (typically 8 to 64).
        lora_alpha: a positive number; ``scaling = lora_alpha / r``.
        lora_dropout: dropout probability in ``[0, 1)`` applied to the input of the update
            (only in training mode; skipped entirely when 0).
        init_lora_weights: ``True``: ``A`` kaiming-uniform (a=√5, as PEFT and loralib);
            ``"gaussian"``: ``A ~ N(0, (1/r)^2)`` (PEFT's ``"gaussian"``); in both cases ``B = 0``.
            ``False``: ``B`` is random too, so the update is not zero at the start
            (for experiments only).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        device, dtype: where and in which dtype ``lora_A`` / ``lora_B`` are created.

    ``forward(x)`` takes ``(..., in_features)`` and returns ``(..., out_features)`` in the LoRA
    parameters' dtype; it never materialises ``B @ A``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.r = _positive_int("r", r)
        self.lora_alpha = _check_alpha(lora_alpha)
        self.use_rslora = _check_bool("use_rslora", use_rslora)
        self.init_lora_weights = _check_init(init_lora_weights)
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

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * A dropout(x)``: ``(..., in_features) -> (..., r)`` in the LoRA dtype."""
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        if self.training and self.lora_dropout.p > 0:
            x = self.lora_dropout(x)
        # Scaling the r-wide intermediate costs r multiplies per token instead of out_features.
        return F.linear(x, self.lora_A) * self.scaling  # (..., r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._down(x), self.lora_B)  # (..., out_features)

    def add_to(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result + forward(x)``, cast to ``result``'s dtype (fused into one GEMM if it can)."""
        h = self._down(x)  # (..., r)
        if result.dtype == h.dtype and result.shape[:-1] == h.shape[:-1]:
            # addmm adds the base output inside the GEMM: no separate update tensor, no extra add.
            out = torch.addmm(
                result.reshape(-1, self.out_features), h.reshape(-1, self.r), self.lora_B.t()
            )
            return out.view(result.shape)
        return result + F.linear(h, self.lora_B).to(result.dtype)

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
    ``out_features`` and a ``weight`` tensor), e.g. a quantised layer; anything else is a
    ``TypeError``. Its parameters are frozen. The LoRA parameters are created on the base
    weight's device, in ``lora_dtype``: by default the base weight's dtype when that is fp32 or
    fp64, and fp32 otherwise (a bf16/fp16 or quantised base gets fp32 adapters, as PEFT's
    ``autocast_adapter_dtype`` does). The update is computed in the LoRA dtype and cast back to
    the base output's dtype.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        *,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features, weight = _linear_like(base_layer)
        if lora_dtype is None:
            keep = weight.dtype in (torch.float32, torch.float64)
            lora_dtype = weight.dtype if keep else torch.float32
        elif not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
            raise TypeError(f"lora_dtype must be a floating-point torch.dtype, got {lora_dtype!r}")
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

    # Linear-like view of the wrapped layer, so code that inspects layers keeps working.
    @property
    def in_features(self) -> int:
        return self.lora.in_features

    @property
    def out_features(self) -> int:
        return self.lora.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out_features)
        if self.merged:
            return result
        return self.lora.add_to(result, x)

    # ---- merging ------------------------------------------------------------------------------

    def _float_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if not (weight.is_floating_point() and tuple(weight.shape) == (self.out_features, self.in_features)):
            raise TypeError(
                f"cannot merge into {type(self.base_layer).__name__}: merging needs a "
                f"floating-point weight of shape ({self.out_features}, {self.in_features}), but "
                f"it has {weight.dtype} {tuple(weight.shape)} (dequantise the base layer first)"
            )
        return weight

    @staticmethod
    def _apply_delta(weight: torch.Tensor, delta: torch.Tensor, sign: int, what: str) -> None:
        compute = torch.promote_types(weight.dtype, delta.dtype)
        new = weight.to(compute) + sign * delta.to(device=weight.device, dtype=compute)
        if not torch.isfinite(new).all():
            raise ValueError(
                f"{what} would put non-finite values (inf/nan) into the base weight; the weight "
                f"was left unchanged (check lora_A / lora_B for inf/nan or huge values)"
            )
        weight.copy_(new)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW = scaling · B · A`` into the base weight (zero-latency inference).

        A second ``merge()`` warns and does nothing; a non-finite result raises ``ValueError``
        and leaves the weight unchanged.
        """
        if self.merged:
            warnings.warn("merge(): this layer is already merged; nothing was done", UserWarning,
                          stacklevel=2)
            return
        weight = self._float_weight()
        A = self.lora.lora_A.detach().clone()
        B = self.lora.lora_B.detach().clone()
        scaling = self.lora.scaling
        self._apply_delta(weight, _delta(A, B, scaling), +1, "merge()")
        self._merged_factors = (A, B, scaling)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged update out of the base weight again (warns if not merged)."""
        if not self.merged:
            warnings.warn("unmerge(): this layer is not merged; nothing was done", UserWarning,
                          stacklevel=2)
            return
        assert self._merged_factors is not None
        A, B, scaling = self._merged_factors
        self._apply_delta(self._float_weight(), _delta(A, B, scaling), -1, "unmerge()")
        self._merged_factors = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"merged={self.merged}"
