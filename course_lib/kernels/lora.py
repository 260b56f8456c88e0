"""Fused LoRA update: the fast path behind ``LinearWithLoRA(fused=True)``.

The reference is the plain forward in :mod:`course_lib.model.lora`::

    result + (dropout(x) @ A.T @ B.T) * scaling

:func:`add_lora` computes the same sum in one autograd node. What it saves on CPU:

- the backward of ``h @ B.T`` (``h = x @ A.T``, shape ``(N, r)``) makes autograd compute
  ``grad_B = grad.T @ h``, a GEMM whose first operand is a transposed ``(d, N)`` view; CPU BLAS
  runs that layout over ten times slower than the equal ``(h.T @ grad).T``, which is used here;
- ``scaling`` rides on the GEMMs' ``alpha`` or on the small ``(d, r)`` / ``(r, k)`` matrices
  instead of a pass over an ``(N, d)`` tensor, and the update is added to ``result`` inside the
  second GEMM (``addmm``) instead of in a separate pass.

``benchmarks/bench_lora_layer.py`` prints the plain and the fused rows side by side; the tests
check that both give the same outputs and gradients. Like any custom autograd function it
supports first-order gradients only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["applies", "add_lora"]


def applies(lora: nn.Module, x: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether :func:`add_lora` can stand in for ``result + lora(x).to(result.dtype)``.

    It needs ``result`` in the LoRA dtype with the shape ``(*x.shape[:-1], out_features)``, an
    input of width ``in_features`` and autocast off (under autocast the plain path lets autocast
    choose the dtypes).
    """
    return (
        result.dtype == lora.lora_A.dtype
        and x.shape[-1:] == (lora.in_features,)
        and result.shape == (*x.shape[:-1], lora.out_features)
        and not _autocast_on(x)
    )


def add_lora(result: torch.Tensor, x: torch.Tensor, lora: nn.Module) -> torch.Tensor:
    """``result + scaling * B A dropout(x)`` for a ``LoRALayer`` ``lora`` (same dropout mask as
    the plain path: dropout runs on the same tensor, before the fused node)."""
    x = lora.lora_dropout(x.to(lora.lora_A.dtype))
    out = _LowRankUpdate.apply(
        x.reshape(-1, lora.in_features), lora.lora_A, lora.lora_B,
        result.reshape(-1, lora.out_features), lora.scaling,
    )  # (N, out_features)
    return out.view(result.shape)


def _autocast_on(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        return False


class _LowRankUpdate(torch.autograd.Function):
    """``result + scaling * (x @ A.T) @ B.T`` on 2-D tensors, with fast GEMM layouts."""

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
        s = ctx.scaling
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = torch.mm(h.t(), grad_out).mul_(s).t().contiguous()  # (d, r)
        if need_A or need_x:
            grad_h = torch.mm(grad_out, lora_B)  # (N, r), without the scaling
            if need_A:
                grad_A = torch.mm(grad_h.t(), x).mul_(s)  # (r, k)
            if need_x:
                grad_x = torch.mm(grad_h, lora_A * s)  # (N, k)
        return grad_x, grad_A, grad_B, grad_out if need_result else None, None
