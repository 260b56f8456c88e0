"""Fused LoRA: the fast path behind ``LinearWithLoRA(fused=True)``.

The reference is the plain forward in :mod:`course_lib.model.lora`::

    result = base_layer(x)
    return result + (dropout(x) @ A.T @ B.T) * scaling

:func:`forward` computes the same sum in custom autograd nodes. What they save on CPU:

- the backward of ``h @ B.T`` (``h = x @ A.T``, shape ``(N, r)``) makes autograd compute
  ``grad_B = grad.T @ h``, a GEMM whose first operand is a transposed ``(d, N)`` view; CPU BLAS
  runs that layout many times slower than the equal ``(h.T @ grad).T``, which is used here;
- ``scaling`` rides on the GEMMs' ``alpha`` or on the small ``(d, r)`` / ``(r, k)`` matrices
  instead of a pass over an ``(N, d)`` tensor, and ``B @ A`` is never formed;
- the update is added inside the second GEMM (``addmm``) instead of in a separate pass. For a
  plain ``nn.Linear`` base the base GEMM runs in the same node (:class:`_LinearWithLowRank`):
  the update is accumulated into its output in place, and in backward the LoRA part of
  ``grad_x`` into the base's ``grad_x``. Any other base (a quantised layer, an ``nn.Linear``
  with hooks or a subclass) runs as it is and the update is added to its output
  (:class:`_LowRankUpdate`).

``benchmarks/bench_lora_layer.py`` prints the plain and the fused rows side by side, and the tests
check that both paths give the same outputs and gradients. Like any custom autograd function,
these support first-order gradients only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["applies", "forward"]


def applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`forward` can stand in for ``LinearWithLoRA``'s plain forward on ``x``:
    an input of width ``in_features`` and autocast off (under autocast the plain path lets
    autocast choose the dtypes)."""
    return x.shape[-1:] == (layer.in_features,) and not _autocast_on(x)


def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base_layer(x) + scaling * B A dropout(x)`` of a ``LinearWithLoRA`` through the fused
    nodes. The result has the base output's dtype; the update is computed in the LoRA dtype."""
    base, lora = layer.base_layer, layer.lora
    dtype = lora.lora_A.dtype
    if _is_plain_linear(base, x, dtype):
        x2 = x.reshape(-1, lora.in_features)  # (N, k)
        x_lora = lora.lora_dropout(x2) if lora.training and lora.lora_dropout.p > 0 else None
        out = _LinearWithLowRank.apply(
            x2, x_lora, base.weight, base.bias, lora.lora_A, lora.lora_B, lora.scaling
        )  # (N, d)
        return out.view(*x.shape[:-1], lora.out_features)
    result = base(x)  # (..., out_features), the base's own forward (and hooks)
    x_lora = lora.lora_dropout(x.to(dtype))
    out = _LowRankUpdate.apply(
        x_lora.reshape(-1, lora.in_features), lora.lora_A, lora.lora_B,
        result.to(dtype).reshape(-1, lora.out_features), lora.scaling,
    )  # (N, d)
    return out.view(result.shape).to(result.dtype)


def _is_plain_linear(base: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """An ``nn.Linear`` itself (not a subclass), without hooks, with ``x``, weight and bias in
    the LoRA dtype: its GEMM can run inside :class:`_LinearWithLowRank`."""
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    bias = base.bias
    return x.dtype == base.weight.dtype == dtype and (bias is None or bias.dtype == dtype)


def _autocast_on(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        return False


def _update_grads(grad_out, x, lora_B, h, scaling, need_A, need_B, need_h):
    """``(grad_A, grad_B, grad_h)`` of ``scaling * h @ B.T`` with ``h = x @ A.T`` (unscaled);
    ``grad_h`` lacks the scaling. Each is None when not needed; every GEMM uses the fast layout
    for skinny matrices."""
    grad_A = grad_B = grad_h = None
    if need_B:
        grad_B = torch.mm(h.t(), grad_out).mul_(scaling).t().contiguous()  # (d, r)
    if need_A or need_h:
        grad_h = torch.mm(grad_out, lora_B)  # (N, r)
        if need_A:
            grad_A = torch.mm(grad_h.t(), x).mul_(scaling)  # (r, k)
    return grad_A, grad_B, grad_h


class _LowRankUpdate(torch.autograd.Function):
    """``result + scaling * (x @ A.T) @ B.T`` on 2-D tensors, in one GEMM after ``x @ A.T``."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, result, scaling):  # x: (N, k), A: (r, k), B: (d, r)
        h = torch.mm(x, lora_A.t())  # (N, r), unscaled
        ctx.save_for_backward(x, lora_A, lora_B, h)
        ctx.scaling = scaling
        return torch.addmm(result, h, lora_B.t(), alpha=scaling)  # (N, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # grad_out: (N, d)
        x, lora_A, lora_B, h = ctx.saved_tensors
        need_x, need_A, need_B, need_result, _ = ctx.needs_input_grad
        grad_A, grad_B, grad_h = _update_grads(
            grad_out, x, lora_B, h, ctx.scaling, need_A, need_B, need_x
        )
        grad_x = torch.mm(grad_h, lora_A * ctx.scaling) if need_x else None  # (N, k)
        return grad_x, grad_A, grad_B, grad_out if need_result else None, None


class _LinearWithLowRank(torch.autograd.Function):
    """``x @ W.T + b + scaling * (x_lora @ A.T) @ B.T`` for an ``nn.Linear`` base, in one node.

    ``x_lora`` is ``dropout(x)``, or None when it is ``x`` itself. The base weight and bias get
    gradients too if they require them.
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
        grad_A, grad_B, grad_h = _update_grads(
            grad_out, x if x_lora is None else x_lora, lora_B, h, s, need_A, need_B,
            need_x or need_xl,
        )
        grad_x = grad_xl = grad_w = grad_b = None
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
