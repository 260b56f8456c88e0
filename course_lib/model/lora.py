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
from torch import nn
from torch.autograd.function import once_differentiable

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
    # A quantised nn.Linear subclass (bitsandbytes' Linear4bit) stores packed integer codes in
    # `weight`, whose shape is not (out, in); only a floating-point weight is checked.
    if (
        isinstance(module, nn.Linear)
        and weight.is_floating_point()
        and tuple(weight.shape) != (out_f, in_f)
    ):
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


class _LowRankUpdate(torch.autograd.Function):
    """``base + scaling * (x @ A.T) @ B.T`` on 2-D inputs (``base`` may be None).

    Same maths as autograd through two ``F.linear`` calls, but the backward picks the GEMM
    layouts that are fast for skinny matrices: autograd's ``grad_B = grad.T @ h`` (a transposed
    ``(d, N) @ (N, r)``) runs tens of times slower on CPU BLAS than the equal ``(h.T @ grad).T``.
    ``B @ A`` is never formed, the scaling rides on the GEMMs' ``alpha`` or on the small
    ``(d, r)`` / ``(r, k)`` matrices instead of an extra pass over an ``(N, d)`` tensor, and the
    base output is added inside the second GEMM (``addmm``).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, base, scaling):  # x: (N, k), A: (r, k), B: (d, r)
        h = torch.mm(x, lora_A.t())  # (N, r), unscaled
        if base is None:
            out = torch.mm(h, (lora_B * scaling).t())
        else:
            out = torch.addmm(base, h, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, lora_A, lora_B, h)
        ctx.scaling = scaling
        return out  # (N, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # grad_out: (N, d)
        x, lora_A, lora_B, h = ctx.saved_tensors
        need_x, need_A, need_B, need_base, _ = ctx.needs_input_grad
        grad_A, grad_B, grad_x = _low_rank_grads(
            grad_out, x, lora_A, lora_B, h, ctx.scaling, need_A, need_B, need_x
        )
        return grad_x, grad_A, grad_B, grad_out if need_base else None, None


def _low_rank_grads(grad_out, x, lora_A, lora_B, h, scaling, need_A, need_B, need_x):
    """``(grad_A, grad_B, grad_h @ A)`` of ``scaling * h @ B.T`` with ``h = x @ A.T`` (unscaled);
    each is None when not needed. Every GEMM uses the fast layout for skinny matrices."""
    grad_A = grad_B = grad_x = None
    if need_B:
        grad_B = torch.mm(h.t(), grad_out).mul_(scaling).t().contiguous()  # (d, r)
    if need_A or need_x:
        grad_h = torch.mm(grad_out, lora_B)  # (N, r), without the scaling
        if need_A:
            grad_A = torch.mm(grad_h.t(), x).mul_(scaling)  # (r, k)
        if need_x:
            grad_x = torch.mm(grad_h, lora_A * scaling)  # (N, k)
    return grad_A, grad_B, grad_x


class _LinearWithLowRank(torch.autograd.Function):
    """``x @ W.T + b + scaling * (x_lora @ A.T) @ B.T`` for an ``nn.Linear`` base, in one node.

    ``x_lora`` is ``dropout(x)``, or None when it is ``x`` itself. Compared with autograd through
    ``base(x) + update``, the update is accumulated into the base output in place (no extra
    ``(N, d)`` tensor and no separate add), and in backward the LoRA part of ``grad_x`` is
    accumulated into the base's ``grad_x`` the same way; the LoRA GEMMs use the fast layouts of
    :class:`_LowRankUpdate`. The base weight and bias get gradients too if they require them.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, scaling):  # x: (N, k)
        h = torch.mm(x if x_lora is None else x_lora, lora_A.t())  # (N, r), unscaled
        out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        out.addmm_(h, lora_B.t(), alpha=scaling)  # (N, d)
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B, h)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # grad_out: (N, d)
        x, x_lora, weight, lora_A, lora_B, h = ctx.saved_tensors
        need_x, need_xl, need_w, need_b, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scaling
        grad_x = grad_xl = grad_w = grad_b = grad_A = grad_B = None
        if need_B:
            grad_B = torch.mm(h.t(), grad_out).mul_(s).t().contiguous()  # (d, r)
        if need_x or need_xl or need_A:
            grad_h = torch.mm(grad_out, lora_B)  # (N, r), without the scaling
            if need_A:
                grad_A = torch.mm(grad_h.t(), x if x_lora is None else x_lora).mul_(s)  # (r, k)
            if need_x:
                grad_x = torch.mm(grad_out, weight)  # (N, k)
                if x_lora is None:
                    grad_x.addmm_(grad_h, lora_A, alpha=s)
            if need_xl and x_lora is not None:
                grad_xl = torch.mm(grad_h, lora_A * s)
        if need_w:
            grad_w = torch.mm(grad_out.t(), x)  # (d, k)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum(0)
        return grad_x, grad_xl, grad_w, grad_b, grad_A, grad_B, None


def _autocast_on(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        return False


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

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x)`` in the LoRA dtype (dropout skipped when p == 0 or in eval mode)."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"LoRA input must have last dimension in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        if self.training and self.lora_dropout.p > 0:
            x = self.lora_dropout(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)  # (..., in_features)
        if _autocast_on(x):  # let autocast choose the dtypes: plain autograd ops
            return nn.functional.linear(nn.functional.linear(x, self.lora_A) * self.scaling,
                                        self.lora_B)
        out = _LowRankUpdate.apply(
            x.reshape(-1, self.in_features), self.lora_A, self.lora_B, None, self.scaling
        )  # (N, out_features)
        return out.view(*x.shape[:-1], self.out_features)

    def add_to(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result + forward(x)`` in ``result``'s dtype; fused into one GEMM when it can be."""
        x = self._input(x)
        if (
            result.dtype == x.dtype and result.shape[:-1] == x.shape[:-1]
            and not _autocast_on(x)
        ):
            out = _LowRankUpdate.apply(
                x.reshape(-1, self.in_features), self.lora_A, self.lora_B,
                result.reshape(-1, self.out_features), self.scaling,
            )  # (N, out_features)
            return out.view(result.shape)
        return result + self.forward(x).to(result.dtype)

    def linear_forward(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + forward(x)`` for an ``nn.Linear`` ``base`` in one autograd node.

        Falls back to ``add_to(base(x), x)`` where the fused kernel does not apply (dtypes
        differ, autocast is on, the base has forward hooks or is an nn.Linear subclass).
        """
        weight, bias = base.weight, base.bias
        fusable = (
            type(base) is nn.Linear
            and not base._forward_hooks and not base._forward_pre_hooks
            and x.dtype == weight.dtype == self.lora_A.dtype
            and (bias is None or bias.dtype == weight.dtype)
            and x.shape[-1:] == (self.in_features,)
            and not _autocast_on(x)
        )
        if not fusable:
            return self.add_to(base(x), x)
        x2 = x.reshape(-1, self.in_features)  # (N, k)
        x_lora = None
        if self.training and self.lora_dropout.p > 0:
            x_lora = self.lora_dropout(x2)
        out = _LinearWithLowRank.apply(
            x2, x_lora, weight, bias, self.lora_A, self.lora_B, self.scaling
        )  # (N, d)
        return out.view(*x.shape[:-1], self.out_features)

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

    Speed: for a plain ``nn.Linear`` base (no forward hooks, one dtype, autocast off) the base
    GEMM and the update run in one autograd node that adds ``B (A x)`` into the base output in
    place and uses the fast GEMM layouts for the skinny LoRA matrices (see
    ``benchmarks/bench_lora_layer.py``); other bases run ``base_layer(x)`` and add the update.
    Like any custom autograd function, these support first-order gradients only (no
    double backward).
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
        if self.merged:
            return self.base_layer(x)  # (..., out_features): the update is in the weight
        if isinstance(self.base_layer, nn.Linear):
            return self.lora.linear_forward(self.base_layer, x)
        return self.lora.add_to(self.base_layer(x), x)

    # ---- merging ------------------------------------------------------------------------------

    def _float_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        shape = (self.out_features, self.in_features)
        if not (weight.is_floating_point() and tuple(weight.shape) == shape):
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


# --------------------------------------------------------------------------------------------
# Configuration and model-level helpers
# --------------------------------------------------------------------------------------------


def _default_targets() -> list[str]:
    return ["q_proj", "v_proj"]


@dataclass
class LoRAConfig:
    """Which layers get LoRA and how; field names are PEFT's ``LoraConfig`` names."""

    r: int = field(default=8, metadata={"help": (
        "Rank of the update B·A, a positive int (8 for small tasks, 64 for large ones)."
    )})
    lora_alpha: float = field(default=16, metadata={"help": (
        "Scale numerator: the update is multiplied by lora_alpha / r (or lora_alpha / sqrt(r) "
        "with use_rslora). Common choices: r or 2r."
    )})
    lora_dropout: float = field(default=0.0, metadata={"help": (
        "Dropout probability in [0, 1) on the input of the update, in training mode only."
    )})
    target_modules: list[str] | str = field(default_factory=_default_targets, metadata={"help": (
        "Layers to wrap: a list of names (each matches a module name exactly or as its dotted "
        "suffix, e.g. 'q_proj'), a full-match regex string, or 'all-linear' (every linear "
        "layer except the output head). Default: the attention's q_proj and v_proj."
    )})
    use_rslora: bool = field(default=False, metadata={"help": (
        "Rank-stabilised LoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r."
    )})
    init_lora_weights: bool | str = field(default=True, metadata={"help": (
        "True: A kaiming-uniform, B zero; 'gaussian': A ~ N(0, 1/r^2), B zero; False: B "
        "random too (the update is not zero at the start; for experiments only)."
    )})

    def __post_init__(self) -> None:
        _positive_int("r", self.r)
        _check_alpha(self.lora_alpha)
        _check_dropout(self.lora_dropout)
        _check_bool("use_rslora", self.use_rslora)
        _check_init(self.init_lora_weights)
        self.target_modules = _normalise_targets(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`LinearWithLoRA` / :class:`LoRALayer` for this config."""
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "init_lora_weights": self.init_lora_weights,
            "use_rslora": self.use_rslora,
        }

    def to_peft_dict(self) -> dict[str, Any]:
        """The fields of PEFT's ``adapter_config.json`` for this config."""
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": list(targets) if isinstance(targets, list) else targets,
            "use_rslora": self.use_rslora,
            "init_lora_weights": self.init_lora_weights,
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter config") -> LoRAConfig:
        """Read a PEFT ``adapter_config.json`` dict; unsupported LoRA variants are a ValueError."""
        if data.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type must be 'LORA', got {data.get('peft_type')!r}")
        unsupported = {
            "use_dora": (False, None),
            "fan_in_fan_out": (False, None),
            "bias": ("none", None),
            "rank_pattern": ({}, None),
            "alpha_pattern": ({}, None),
            "modules_to_save": (None, []),
            "layers_to_transform": (None,),
            "layer_replication": (None,),
            "exclude_modules": (None, []),
            "target_parameters": (None, []),
            "trainable_token_indices": (None,),
        }
        for key, allowed in unsupported.items():
            if key in data and data[key] not in allowed:
                raise ValueError(
                    f"{source}: {key}={data[key]!r} is not supported by course_lib's LoRA "
                    f"(allowed: {' or '.join(repr(a) for a in allowed)})"
                )
        if "target_modules" not in data or data["target_modules"] is None:
            raise ValueError(f"{source}: target_modules is missing")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _normalise_targets(targets: object) -> list[str] | str:
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(
                    f"target_modules={targets!r} is not a valid regular expression ({exc}); "
                    f"use a list of module names such as ['q_proj', 'v_proj'], a regex or "
                    f"'all-linear'"
                ) from None
        return targets
    if isinstance(targets, (list, tuple, set, frozenset)):
        items = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
        if items and all(isinstance(t, str) and t for t in items):
            return items
    raise ValueError(
        f"target_modules must be a non-empty list of module names (e.g. ['q_proj', 'v_proj']), "
        f"a regex string or 'all-linear', got {targets!r}"
    )


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the full name; a list entry matches the name or
    its dotted suffix (``'q_proj'`` matches ``'blocks.0.attn.q_proj'``, not ``'xq_proj'``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named submodules, skipping the root and everything inside a LinearWithLoRA."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LinearWithLoRA):
            inside.append(name + ".")
        yield name, module


def _output_head_names(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    """The output head that ``'all-linear'`` leaves out: ``model.get_output_embeddings()`` if the
    model has it (as transformers models do), and any linear layer named ``lm_head``."""
    heads = {name for name in linears if name.rsplit(".", 1)[-1] == "lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        head = get_head()
        heads |= {name for name, module in linears.items() if module is head}
    return heads


def _describe_names(names: Sequence[str], limit: int = 8) -> str:
    """All names when there are few; otherwise the distinct last parts with counts and an
    example, e.g. ``25 layers named q_proj (x4), ..., lm_head, e.g. 'blocks.0.attn.q_proj'``."""
    if not names:
        return "(none)"
    if len(names) <= limit:
        return ", ".join(names)
    counts: dict[str, int] = {}
    for name in names:
        last = name.rsplit(".", 1)[-1]
        counts[last] = counts.get(last, 0) + 1
    kinds = ", ".join(f"{last} (x{n})" if n > 1 else last for last, n in counts.items())
    return f"{len(names)} layers named {kinds}, e.g. {names[0]!r}"


def _select_targets(
    model: nn.Module, targets: list[str] | str, layer_types: tuple[type, ...]
) -> list[str]:
    modules = dict(_candidates(model))
    linears = {
        name: m for name, m in modules.items() if isinstance(m, (*layer_types, LinearWithLoRA))
    }
    if targets == "all-linear":
        heads = _output_head_names(model, linears)
        chosen = [n for n in linears if n not in heads]
    else:
        chosen = [n for n in modules if _matches(n, targets)]
    type_names = " or ".join(t.__name__ for t in layer_types)
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} matched no module of this {type(model).__name__}. Its "
            f"{type_names} layers: {_describe_names(list(linears))}. A list entry matches a "
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
                f"pattern select only those (this model's: {_describe_names(list(linears))})"
            )
    return chosen


def apply_lora(
    model: nn.Module,
    config: LoRAConfig | None = None,
    *,
    layer_types: tuple[type, ...] = (nn.Linear,),
) -> nn.Module:
    """Wrap the layers ``config.target_modules`` selects in :class:`LinearWithLoRA`, in place.

    Matching follows PEFT: a list entry matches a module name exactly or as its dotted suffix,
    a string is a full-match regex, ``"all-linear"`` selects every linear layer except the
    output head (``lm_head`` / ``get_output_embeddings()``). The default config targets
    ``["q_proj", "v_proj"]``. Every matched module must be an instance of ``layer_types``
    (``nn.Linear`` unless a caller such as the QLoRA module passes its quantised layer class);
    a match of another type is a ``TypeError``, no match at all a ``ValueError`` listing the
    model's linear layers. Afterwards only LoRA parameters are trainable (as with PEFT's
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


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    """``(name, layer)`` for every :class:`LinearWithLoRA` in ``model`` (``model`` itself too)."""
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            yield name, module


def _lora_parameter_ids(model: nn.Module) -> set[int]:
    return {
        id(p) for m in model.modules() if isinstance(m, LoRALayer) for p in m.parameters()
    }


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except ``lora_A`` / ``lora_B`` of the model's LoRA layers.

    Raises ``ValueError`` if the model has no LoRA layer (nothing would be trainable).
    Returns ``model``.
    """
    lora_ids = _lora_parameter_ids(model)
    if not lora_ids:
        raise ValueError(
            f"this {type(model).__name__} has no LoRA layers, so nothing would be trainable; "
            f"call apply_lora(model, config) first"
        )
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_ids)
    return model


@dataclass(frozen=True)
class TrainableSummary:
    """Trainable and total parameter counts; ``str()`` prints them like PEFT does."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {self.percent:.4f}"
        )


def trainable_parameters_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable and all parameters (shared parameters once), like PEFT's
    ``print_trainable_parameters``; ``print()`` the result for PEFT's one-line format."""
    params = list(model.parameters())
    return TrainableSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def _require_lora(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(
            f"this {type(model).__name__} has no LoRA layers; call apply_lora(model, config) first"
        )
    return layers


def merge_lora(model: nn.Module) -> int:
    """Merge every not-yet-merged LoRA layer of ``model``; returns how many were merged."""
    count = 0
    for _, layer in _require_lora(model):
        if not layer.merged:
            layer.merge()
            count += 1
    return count


def unmerge_lora(model: nn.Module) -> int:
    """Unmerge every merged LoRA layer of ``model``; returns how many were unmerged."""
    count = 0
    for _, layer in _require_lora(model):
        if layer.merged:
            layer.unmerge()
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# Adapter files (PEFT's layout)
# --------------------------------------------------------------------------------------------


def _config_from_layers(layers: list[tuple[str, LinearWithLoRA]]) -> LoRAConfig:
    first = layers[0][1].lora
    config = LoRAConfig(
        r=first.r, lora_alpha=first.lora_alpha, lora_dropout=first.lora_dropout.p,
        target_modules=sorted(name for name, _ in layers), use_rslora=first.use_rslora,
        init_lora_weights=first.init_lora_weights,
    )
    return config


def _check_layers_match(layers: list[tuple[str, LinearWithLoRA]], config: LoRAConfig) -> None:
    for name, layer in layers:
        lora = layer.lora
        got = (lora.r, lora.lora_alpha, lora.use_rslora)
        want = (config.r, config.lora_alpha, config.use_rslora)
        if got[0] != want[0] or not math.isclose(got[1], want[1]) or got[2] != want[2]:
            raise ValueError(
                f"LoRA layer {name!r} has r={got[0]}, lora_alpha={got[1]}, use_rslora={got[2]}, "
                f"but the config says r={want[0]}, lora_alpha={want[1]}, use_rslora={want[2]}"
            )


def save_adapter(
    model: nn.Module, directory: str | Path, config: LoRAConfig | None = None
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout).

    Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``. ``config``
    (default: read from the layers) must agree with every LoRA layer's r / lora_alpha /
    use_rslora. The saved ``target_modules`` select exactly the wrapped layers under PEFT's
    rules (``'all-linear'``, or a pattern that would now select other layers, is written as
    the list of wrapped module paths). Returns the directory.
    """
    from safetensors.torch import save_file

    layers = _require_lora(model)
    if config is None:
        config = _config_from_layers(layers)
    elif not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig or None, got {type(config).__name__}")
    _check_layers_match(layers, config)
    wrapped = [name for name, _ in layers]
    if "" in wrapped:
        raise ValueError("save_adapter needs a model that contains LoRA layers, not a bare "
                         "LinearWithLoRA (wrap it in an nn.Module with a named attribute)")
    targets = config.target_modules
    exact = targets != "all-linear" and sorted(
        n for n, _ in _candidates(model) if _matches(n, targets)
    ) == sorted(wrapped)
    if not exact:  # write the wrapped paths so that PEFT selects exactly these layers
        targets = sorted(wrapped)
    peft_config = config.to_peft_dict()
    peft_config["target_modules"] = targets
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        for part in ("lora_A", "lora_B"):
            tensor = getattr(layer.lora, part).detach().cpu().contiguous()
            tensors[f"{_KEY_PREFIX}{name}.{part}.weight"] = tensor
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG_NAME).write_text(
        json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def _parse_adapter_keys(
    tensors: dict[str, torch.Tensor], source: str
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"lora_A": tensor, "lora_B": tensor}}`` from PEFT-style keys."""
    pattern = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{source}: unexpected key {key!r}; LoRA adapter keys look like "
                f"'base_model.model.<module path>.lora_A.weight' / '.lora_B.weight'"
            )
        found.setdefault(match.group(1), {})[match.group(2)] = tensor
    for name, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise ValueError(f"{source}: module {name!r} has no {missing} weight")
    return found


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    layer_types: tuple[type, ...] = (nn.Linear,),
) -> nn.Module:
    """Load an adapter directory written by :func:`save_adapter` or by PEFT into ``model``.

    A model without LoRA layers is first wrapped with :func:`apply_lora` using the saved config;
    a model that already has LoRA layers must have them exactly where the file does, with the
    same r / lora_alpha / use_rslora. A missing file, a module that is missing on either side
    or a shape mismatch raises an error naming it; nothing is changed unless everything fits.
    Returns ``model``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    config = LoRAConfig.from_peft_dict(raw, source=str(config_path))
    found = _parse_adapter_keys(load_file(str(weights_path)), str(weights_path))

    if not any(True for _ in lora_layers(model)):
        apply_lora(model, config, layer_types=layer_types)
    layers = dict(lora_layers(model))
    _check_layers_match(list(layers.items()), config)
    missing_in_model = sorted(set(found) - set(layers))
    if missing_in_model:
        raise ValueError(
            f"adapter {directory} has weights for module {missing_in_model[0]!r}, but the model "
            f"has no LoRA layer there; its LoRA layers are: {_describe_names(sorted(layers))}"
        )
    missing_in_file = sorted(set(layers) - set(found))
    if missing_in_file:
        raise ValueError(
            f"the model's LoRA layer {missing_in_file[0]!r} has no weights in adapter {directory} "
            f"(the adapter covers: {_describe_names(sorted(found))})"
        )
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"LoRA layer {name!r} is merged; call unmerge_lora(model) before "
                             f"loading an adapter")
        for part in ("lora_A", "lora_B"):
            want = tuple(getattr(layer.lora, part).shape)
            got = tuple(found[name][part].shape)
            if got != want:
                raise ValueError(
                    f"adapter {directory}: {part} of module {name!r} has shape {got}, but the "
                    f"model's layer needs {want} (r={layer.lora.r}, in_features="
                    f"{layer.in_features}, out_features={layer.out_features})"
                )
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                param = getattr(layer.lora, part)
                param.copy_(found[name][part].to(device=param.device, dtype=param.dtype))
    return model
