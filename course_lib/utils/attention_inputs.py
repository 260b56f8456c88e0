"""Argument checks shared by every attention function of the course.

:func:`check_attention_inputs` validates ``q, k, v, causal, attn_mask, dropout_p, scale`` the same
way for :func:`~course_lib.utils.flash_attention.flash_attention_forward`, ``naive_attention``,
``tiled_attention`` and the SDPA kernel probes, following :mod:`course_lib.validation`'s rules
(wrong type: ``TypeError``, wrong value: ``ValueError``, the message names the argument).
"""

from __future__ import annotations

import math

import torch

from course_lib.validation import check_bool, check_number, check_probability

__all__ = ["SUPPORTED_DTYPES", "check_attention_inputs", "describe_inputs"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None,
    enable_gqa: bool = False,
) -> float:
    """Check the arguments of an attention call; return the softmax scale to use.

    ``TypeError`` for a wrong type (not a tensor, an integer dtype, mixed dtypes, a non-bool
    ``causal``), ``ValueError`` for a wrong value (shapes that do not fit together, an empty
    input, a mask that does not broadcast to ``(batch, num_heads, L, S)``, ``dropout_p``
    outside ``[0, 1)``, a ``scale`` that is not positive); each message names the argument.
    ``scale=None`` gives ``1 / sqrt(head_dim)``. ``enable_gqa=True`` (SDPA's keyword) lets k and
    v have fewer heads than q (grouped-query attention), a divisor of q's head count.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (batch, num_heads, seq_len, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    (bq, hq, lq, dq), (bk, hk, sk, dk), (bv, hv, sv, dv) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise ValueError(f"batch sizes differ: q {bq}, k {bk}, v {bv}")
    if not (hq == hk == hv) and not check_bool("enable_gqa", enable_gqa):
        raise ValueError(
            f"num_heads differ: q {hq}, k {hk}, v {hv}; for grouped-query attention pass "
            "enable_gqa=True (as with SDPA) or repeat the k/v heads before calling"
        )
    if hk != hv:
        raise ValueError(f"k and v must have the same num_heads, got k {hk} and v {hv}")
    if hk and hq % hk:
        raise ValueError(
            f"enable_gqa=True needs q's num_heads to be a multiple of k/v's, got q {hq} and "
            f"k/v {hk}"
        )
    if not (dq == dk == dv):
        raise ValueError(f"head_dim differs: q {dq}, k {dk}, v {dv}")
    if sk != sv:
        raise ValueError(f"k and v must have the same seq_len, got k {sk} and v {sv}")
    if min(lq, sk, dq, bq, hq) == 0:
        raise ValueError(f"empty input: q shape {tuple(q.shape)}, k shape {tuple(k.shape)}")
    check_bool("causal", causal)
    check_bool("enable_gqa", enable_gqa)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask)}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise TypeError(
                f"attn_mask must be bool (True = may attend) or q's dtype {q.dtype} "
                f"(added to the scores), got {attn_mask.dtype}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        target = (bq, hq, lq, sk)
        try:
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"(batch, num_heads, L, S) = {target}"
            )
    check_probability("dropout_p", dropout_p)
    if scale is None:
        return 1.0 / math.sqrt(dq)
    return check_number(
        "scale", scale, low=0.0, low_inclusive=False, hint="or None: 1/sqrt(head_dim)"
    )


def describe_inputs(q: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float) -> str:
    """A short description of attention inputs, for error messages."""
    return (
        f"device {q.device}, dtype {q.dtype}, head_dim {q.shape[-1]}, attn_mask "
        f"{'given' if attn_mask is not None else 'none'}, dropout_p {dropout_p}"
    )
