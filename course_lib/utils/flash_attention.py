"""Attention three ways: PyTorch's fused SDPA, the naive baseline and a tiled FlashAttention.

All functions take ``(batch, num_heads, seq_len, head_dim)`` tensors (nanoGPT's
``(B, nh, T, hs)``) and compute ``softmax(q @ k^T * scale + mask) @ v`` row by row.

- :func:`flash_attention_forward` -- what a model calls: PyTorch's
  ``F.scaled_dot_product_attention`` (SDPA) with validated inputs, a choice of SDPA kernel
  (``backend="flash" | "efficient" | "math" | "cudnn"``), and the manual paths
  (``backend="naive" | "tiled"``) for teaching or when SDPA is missing.
- :func:`naive_attention` -- the standard algorithm: materialises the ``L x S`` score matrix
  ``S`` and the probabilities ``P``; the baseline.
- :func:`tiled_attention` -- FlashAttention's forward pass in pure PyTorch: loops over K/V blocks
  with the online-softmax recurrence (:func:`online_softmax`) and never holds more than one
  ``block_q x block_k`` tile of scores per head.
- :func:`attention_hbm_accesses` -- the FlashAttention paper's IO model (Dao et al., 2022,
  Theorem 2): standard attention reads/writes ``Theta(N d + N^2)`` elements of HBM, FlashAttention
  ``Theta(N^2 d^2 / M)`` for an SRAM of ``M`` elements.

Causal convention (the same on every path)
------------------------------------------
``causal=True`` uses **bottom-right** alignment: with ``L`` queries and ``S`` keys, query ``i``
may attend to key ``j`` iff ``j <= i + (S - L)``. The last query sees every key, which is what a
decoder with a KV cache needs (the ``L`` new tokens are the last ``L`` positions of the
sequence); FlashAttention >= 2.1 and ``torch.nn.attention.bias.causal_lower_right`` use the same
rule. When ``L == S`` it is the usual lower-triangular mask. Note that
``F.scaled_dot_product_attention(is_causal=True)`` aligns top-left (``j <= i``) instead; the two
differ only when ``L != S``, and :func:`flash_attention_forward` passes SDPA a bottom-right mask
in that case so all paths agree. When ``L > S`` the first ``L - S`` queries see no key at all.

Fully masked rows (a query that may attend to no key, through ``causal`` with ``L > S`` or
through ``attn_mask``) give an output row of zeros on every path, as SDPA's CPU kernels do in
PyTorch >= 2.5 (:func:`flash_attention_forward` zeroes them after any SDPA kernel, in case a GPU
kernel returns NaN there), and a log-sum-exp of ``-inf``.

``attn_mask`` follows SDPA: a boolean mask (``True`` = may attend) or a float mask added to the
scores, broadcastable to ``(batch, num_heads, L, S)``. With ``causal=True`` both apply.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "CAUSAL_ALIGNMENT",
    "SDPA_BACKENDS",
    "MANUAL_BACKENDS",
    "BACKENDS",
    "AttentionIO",
    "flash_attention_forward",
    "attention_backend",
    "naive_attention",
    "tiled_attention",
    "online_softmax",
    "causal_mask",
    "sdpa_available",
    "sdpa_backends",
    "sdpa_backend_support",
    "sdpa_selected_backend",
    "attention_hbm_accesses",
    "attention_memory_bytes",
]

CAUSAL_ALIGNMENT = "bottom-right"  # query i sees key j iff j <= i + (S - L); see module docstring

# SDPA kernels by course name -> name of the member of torch.nn.attention.SDPBackend.
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
    "cudnn": "CUDNN_ATTENTION",
}
MANUAL_BACKENDS = ("naive", "tiled")
BACKENDS = ("auto", *SDPA_BACKENDS, *MANUAL_BACKENDS)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEFAULT_BACKEND: ContextVar[str] = ContextVar("course_attention_backend", default="auto")

# What each SDPA kernel needs (PyTorch 2.x; the authoritative answer for *your* inputs is
# sdpa_backend_support(), which asks PyTorch itself). Shown in notebook 04 (pitfall 4).
SDPA_REQUIREMENTS = {
    "flash": (
        "CUDA: fp16/bf16 only, head_dim <= 256 (multiple of 8), sm80+ GPU for most head_dims, "
        "no arbitrary attn_mask (causal is fine). CPU: PyTorch's fused CPU kernel, any float "
        "dtype, masks allowed, no dropout."
    ),
    "efficient": (
        "CUDA only: fp32/fp16/bf16, supports attn_mask and dropout, head_dim multiple of 8 "
        "(or 4 for fp32)."
    ),
    "math": "Any device, any float dtype, any mask and dropout: the reference, materialises S.",
    "cudnn": "Recent NVIDIA GPUs (sm80+/sm90) with cuDNN >= 9: fp16/bf16, head_dim <= 128.",
}


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> float:
    """Check the inputs of every attention path; return the softmax scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (batch, num_heads, seq_len, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    bq, hq, lq, dq = q.shape
    bk, hk, sk, dk = k.shape
    bv, hv, sv, dv = v.shape
    if not (bq == bk == bv):
        raise ValueError(f"batch sizes differ: q {bq}, k {bk}, v {bv}")
    if not (hq == hk == hv):
        raise ValueError(
            f"num_heads differ: q {hq}, k {hk}, v {hv} (repeat k/v heads for grouped-query "
            "attention before calling)"
        )
    if not (dq == dk == dv):
        raise ValueError(f"head_dim differs: q {dq}, k {dk}, v {dv}")
    if sk != sv:
        raise ValueError(f"k and v must have the same seq_len, got k {sk} and v {sv}")
    if min(lq, sk, dq, bq, hq) == 0:
        raise ValueError(f"empty input: q shape {tuple(q.shape)}, k shape {tuple(k.shape)}")
    _check_bool("causal", causal)
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
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if scale is None:
        return 1.0 / math.sqrt(dq)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive float or None, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale)


def _check_block(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(q_len, k_len)`` mask, ``True`` where query ``i`` may see key ``j``.

    Bottom-right aligned (see the module docstring): ``j <= i + (k_len - q_len)``.
    """
    _check_block("q_len", q_len)
    _check_block("k_len", k_len)
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def _combined_mask(
    attn_mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor | None:
    """One mask holding both ``attn_mask`` and (if ``causal``) the bottom-right causal mask."""
    if not causal:
        return attn_mask
    allowed = causal_mask(q_len, k_len, device)
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return attn_mask.masked_fill(~allowed, float("-inf"))


# --------------------------------------------------------------------------------------------
# The naive baseline
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are computed (and accumulated) in fp32; fp32/fp64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dropout(p: torch.Tensor, dropout_p: float) -> torch.Tensor:
    if dropout_p == 0.0:
        return p
    keep = torch.rand_like(p) >= dropout_p
    return p * keep / (1.0 - dropout_p)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Standard attention: ``S = q k^T * scale``, ``P = softmax(S)``, ``O = P v``.

    Materialises the ``(B, H, L, S)`` matrices ``S`` and ``P`` (the memory tiled attention
    saves). fp16/bf16 inputs are computed in fp32 and the result cast back. Differentiable.
    With ``return_lse=True`` also returns the row log-sum-exp of the scaled, masked scores,
    shape ``(B, H, L)``, in the compute dtype.
    """
    scale = _validate(q, k, v, causal, attn_mask, dropout_p, scale)
    _check_bool("return_lse", return_lse)
    cdtype = _compute_dtype(q.dtype)
    q_len, k_len = q.shape[-2], k.shape[-2]
    s = (q.to(cdtype) @ k.to(cdtype).transpose(-2, -1)) * scale  # (B, H, L, S)
    mask = _combined_mask(attn_mask, causal, q_len, k_len, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(cdtype)
    # Only a mask can empty a row; softmax would give NaN there, SDPA gives zeros.
    may_be_empty = mask is not None and not (attn_mask is None and q_len <= k_len)
    if may_be_empty:
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
        e = torch.exp(s - row_max)
        total = e.sum(dim=-1, keepdim=True)
        p = e / total.masked_fill(total == 0, 1.0)
    else:
        p = torch.softmax(s, dim=-1)  # (B, H, L, S)
    out = (_dropout(p, dropout_p) @ v.to(cdtype)).to(q.dtype)  # (B, H, L, hs)
    if not return_lse:
        return out
    return out, torch.logsumexp(s, dim=-1)


# --------------------------------------------------------------------------------------------
# Online softmax and tiled (FlashAttention) forward
# --------------------------------------------------------------------------------------------


def online_softmax(
    scores: torch.Tensor,
    m: torch.Tensor | None = None,
    l: torch.Tensor | None = None,  # noqa: E741  (the paper's name for the running sum)
    *,
    overwrite_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the online-softmax recurrence over the last dimension.

    Given the running max ``m`` and running sum ``l = sum(exp(x - m))`` of the scores seen so
    far (shape ``scores.shape[:-1]``; ``None`` before the first block), and a new block of
    ``scores`` (``(..., block)``), return ``(m_new, l_new, p, alpha)``::

        m_new = max(m, rowmax(scores))
        p     = exp(scores - m_new)            # this block's unnormalised probabilities
        alpha = exp(m - m_new)                 # rescales everything summed against the old max
        l_new = alpha * l + rowsum(p)

    A running output ``o`` (sum of ``p @ v`` over the blocks) is updated the same way,
    ``o_new = alpha * o + p @ v``; after the last block ``softmax(x) @ v = o / l`` and the
    log-sum-exp is ``m + log(l)``. Rows whose scores are all ``-inf`` so far keep
    ``m = -inf`` and ``l = 0`` (``p`` and ``alpha`` are 0 there, never NaN). With
    ``overwrite_scores=True`` the block is turned into ``p`` in place (saves one allocation).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1 or scores.shape[-1] == 0:
        raise ValueError("scores must be a tensor with a non-empty last dimension")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    rows = scores.shape[:-1]
    if m is None:
        m = torch.full(rows, float("-inf"), dtype=scores.dtype, device=scores.device)
    if l is None:
        l = torch.zeros(rows, dtype=scores.dtype, device=scores.device)  # noqa: E741
    if m.shape != rows or l.shape != rows:
        raise ValueError(
            f"m and l must have shape scores.shape[:-1] = {tuple(rows)}, "
            f"got {tuple(m.shape)} and {tuple(l.shape)}"
        )
    m_new = torch.maximum(m, scores.amax(dim=-1))
    # Subtract 0 instead of -inf on rows with nothing to attend to yet (avoids -inf - -inf).
    m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
    if overwrite_scores:
        p = scores.sub_(m_safe.unsqueeze(-1)).exp_()
    else:
        p = torch.exp(scores - m_safe.unsqueeze(-1))
    alpha = torch.exp(m - m_safe)
    l_new = alpha * l + p.sum(dim=-1)
    return m_new, l_new, p, alpha


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    *,
    block_q: int = 1024,
    block_k: int = 256,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's forward pass in pure PyTorch (exact, not an approximation).

    The paper's Algorithm 1 loop order: the outer loop reads each K/V block of ``block_k`` keys
    once; the inner loop visits the query blocks of ``block_q`` rows that can see it and folds
    the ``(B, H, block_q, block_k)`` tile of scores into per-row running statistics -- the max
    ``m``, the sum ``l`` and the unnormalised output ``o`` (:func:`online_softmax`). After the
    last K/V block, ``O = o / l``. Only one tile of scores exists at a time, so the extra memory
    is ``O(N)`` (the statistics, the output and one tile) instead of the ``O(N^2)`` of
    :func:`naive_attention`. With ``causal=True`` the tiles entirely above the diagonal are
    skipped (about half the work) and only tiles crossing it are masked. (The notebook's
    version puts the query loop outside, as FlashAttention-2 does; the result is the same.)

    Defaults suit a CPU: large query blocks mean few, large tensor ops, which matters more in
    PyTorch than fitting a tile into cache. The loop still issues hundreds of small
    multi-threaded ops; when other processes keep the cores busy, start Python with
    ``OMP_WAIT_POLICY=PASSIVE`` so waiting threads sleep instead of spinning (up to 10x faster
    then; ``benchmarks/bench_attention.py`` does this automatically). fp16/bf16 inputs are computed and accumulated in
    fp32 and the output cast back. Differentiable (autograd records the loop and keeps every
    tile, unlike FlashAttention's recomputing backward, so train with
    :func:`flash_attention_forward`). ``return_lse=True`` also returns the log-sum-exp
    ``m + log(l)`` of each row, shape ``(B, H, L)``, in the compute dtype. Dropout is applied
    to each tile's probabilities after they are summed into ``l``: the same distribution as
    ``dropout(softmax(S)) @ v``, not the same random bits.
    """
    scale = _validate(q, k, v, causal, attn_mask, dropout_p, scale)
    block_q = _check_block("block_q", block_q)
    block_k = _check_block("block_k", block_k)
    _check_bool("return_lse", return_lse)

    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[-2]
    offset = k_len - q_len  # bottom-right causal alignment: query i sees keys j <= i + offset
    cdtype = _compute_dtype(q.dtype)
    qs = q.to(cdtype) * scale  # (B, H, L, hs), scaled once
    kt = k.to(cdtype).transpose(-2, -1)  # (B, H, hs, S)
    vc = v.to(cdtype)  # (B, H, S, hs)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(batch, heads, q_len, k_len)  # a view, no copy
        if mask.dtype != torch.bool:
            mask = mask.to(cdtype)
    # In-place updates are faster and lighter, but autograd needs the intermediate values.
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, attn_mask) if t is not None
    )
    inplace = not needs_grad
    neg_inf = float("-inf")

    # Running statistics of every query row (they would live in HBM between K/V blocks).
    m = torch.full((batch, heads, q_len), neg_inf, dtype=cdtype, device=q.device)
    l = torch.zeros(batch, heads, q_len, dtype=cdtype, device=q.device)  # noqa: E741
    o = torch.zeros(batch, heads, q_len, head_dim, dtype=cdtype, device=q.device)
    for k0 in range(0, k_len, block_k):
        k1 = min(k0 + block_k, k_len)
        # Causal: rows before k0 - offset see none of these keys (their tiles are skipped).
        first_row = max(0, k0 - offset) if causal else 0
        if first_row >= q_len:
            break  # ... and no row sees any later key block either
        kb, vb = kt[..., k0:k1], vc[:, :, k0:k1]  # (B, H, hs, bk), (B, H, bk, hs)
        for r0 in range(first_row, q_len, block_q):
            r1 = min(r0 + block_q, q_len)
            s = qs[:, :, r0:r1] @ kb  # (B, H, bq, bk) tile of scores
            if causal:
                band = min(r1, k1 - 1 - offset) - r0  # leading rows that cannot see all keys
                if band > 0:  # the tile crosses the diagonal
                    q_idx = torch.arange(r0, r0 + band, device=q.device).unsqueeze(-1)
                    hidden = torch.arange(k0, k1, device=q.device) > q_idx + offset
                    if inplace:
                        s[:, :, :band].masked_fill_(hidden, neg_inf)
                    else:
                        s = torch.cat([s[:, :, :band].masked_fill(hidden, neg_inf),
                                       s[:, :, band:]], dim=2)
            if mask is not None:
                mb = mask[:, :, r0:r1, k0:k1]
                if mb.dtype == torch.bool:
                    s = s.masked_fill_(~mb, neg_inf) if inplace else s.masked_fill(~mb, neg_inf)
                else:
                    s = s.add_(mb) if inplace else s + mb
            m_new, l_new, p, alpha = online_softmax(
                s, m[:, :, r0:r1], l[:, :, r0:r1], overwrite_scores=inplace
            )
            p = _dropout(p, dropout_p)
            if inplace:
                m[:, :, r0:r1] = m_new
                l[:, :, r0:r1] = l_new
                o[:, :, r0:r1].mul_(alpha.unsqueeze(-1)).add_(p @ vb)
            else:
                o_new = o[:, :, r0:r1] * alpha.unsqueeze(-1) + p @ vb
                m = torch.slice_scatter(m, m_new, dim=2, start=r0, end=r1)
                l = torch.slice_scatter(l, l_new, dim=2, start=r0, end=r1)  # noqa: E741
                o = torch.slice_scatter(o, o_new, dim=2, start=r0, end=r1)
    empty = l == 0  # rows with no key to attend to: output 0 (as SDPA), lse -inf
    denom = l.masked_fill(empty, 1.0).unsqueeze(-1)
    out = (o.div_(denom) if inplace else o / denom).to(q.dtype)
    if not return_lse:
        return out
    return out, (m + torch.log(l)).masked_fill(empty, neg_inf)


# --------------------------------------------------------------------------------------------
# SDPA and the public entry point
# --------------------------------------------------------------------------------------------


def sdpa_available() -> bool:
    """True when this PyTorch has ``F.scaled_dot_product_attention`` (PyTorch >= 2.0)."""
    return hasattr(F, "scaled_dot_product_attention")


def _sdpa_kernel_ctx(name: str):
    """A context manager that restricts SDPA to one kernel (``name`` from SDPA_BACKENDS)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:  # PyTorch < 2.3
        raise RuntimeError(
            f"choosing the SDPA backend {name!r} needs torch.nn.attention.sdpa_kernel "
            f"(PyTorch >= 2.3); this is PyTorch {torch.__version__}. Use backend='auto'."
        ) from exc
    member = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if member is None:
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no SDPA backend {name!r}")
    return sdpa_kernel([member])


def _sdpa(q, k, v, causal, attn_mask, dropout_p, scale):
    q_len, k_len = q.shape[-2], k.shape[-2]
    if causal and attn_mask is None and q_len == k_len:
        # Top-left and bottom-right agree when L == S: the fastest, flash-eligible form.
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale
        )
    if causal and attn_mask is None and q_len < k_len:
        try:
            from torch.nn.attention.bias import causal_lower_right
        except ImportError:
            pass
        else:  # lets fused kernels apply the bottom-right mask without materialising it
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_lower_right(q_len, k_len), dropout_p=dropout_p,
                scale=scale,
            )
    mask = _combined_mask(attn_mask, causal, q_len, k_len, q.device)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=False, scale=scale
    )
    if mask is None:
        return out
    # Rows that may attend to no key are 0 on the CPU kernels; some CUDA kernels give NaN.
    # Zero them explicitly so every kernel agrees with the manual paths.
    if mask.dtype == torch.bool:
        empty = ~mask.any(dim=-1, keepdim=True)
    else:
        empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
    return out.masked_fill(empty, 0.0)


def _kernel_reasons(caught: list[warnings.WarningMessage]) -> str:
    """PyTorch's explanations (from its warnings) of why SDPA kernels refused, tidied up."""
    texts = []
    for w in caught:
        text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message))
        text = " ".join(text.split())
        if text and text not in texts:
            texts.append(text)
    return " ".join(texts)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Make ``name`` the default backend of :func:`flash_attention_forward` inside the block.

    Lets a lesson run a whole model (e.g. TinyGPT) on the ``"naive"`` or ``"tiled"`` path, or
    on one SDPA kernel, without changing the model's code::

        with attention_backend("tiled"):
            logits = model(idx)
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _DEFAULT_BACKEND.set(name)
    try:
        yield
    finally:
        _DEFAULT_BACKEND.reset(token)


def flash_attention_forward(
    q: torch.Tensor,  # (B, nh, L, hs)
    k: torch.Tensor,  # (B, nh, S, hs)
    v: torch.Tensor,  # (B, nh, S, hs)
    causal: bool = True,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention ``softmax(q k^T * scale + mask) @ v`` through the fastest available path.

    Returns a ``(B, nh, L, hs)`` tensor of ``q``'s dtype; autograd flows through every path.

    ``backend``:
      - ``"auto"`` (default, or what :func:`attention_backend` set): PyTorch's
        ``F.scaled_dot_product_attention``, which picks the best kernel it can run (flash,
        memory-efficient, cuDNN, or math); falls back to :func:`naive_attention` when this
        PyTorch has no SDPA.
      - ``"flash"``, ``"efficient"``, ``"math"``, ``"cudnn"``: SDPA restricted to that kernel; a
        ``RuntimeError`` explains why if it cannot run these inputs (see
        :func:`sdpa_backend_support` and :data:`SDPA_REQUIREMENTS`).
      - ``"naive"``, ``"tiled"``: the manual paths (:func:`naive_attention`,
        :func:`tiled_attention`), for teaching and comparison.

    ``causal`` uses bottom-right alignment on every path when ``L != S`` (module docstring).
    ``dropout_p`` is applied whenever it is non-zero: pass ``0.0`` in evaluation
    (``dropout_p=self.dropout if self.training else 0.0``), as with SDPA.
    """
    scale = _validate(q, k, v, causal, attn_mask, dropout_p, scale)
    if backend is None:
        backend = _DEFAULT_BACKEND.get()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and not sdpa_available():
        backend = "naive"  # PyTorch < 2.0: the lesson's fallback, standard attention
    if backend == "naive":
        return naive_attention(q, k, v, causal, attn_mask, dropout_p, scale)
    if backend == "tiled":
        return tiled_attention(q, k, v, causal, attn_mask, dropout_p, scale)
    if not sdpa_available():
        raise RuntimeError(
            f"backend={backend!r} needs F.scaled_dot_product_attention (PyTorch >= 2.0); this is "
            f"PyTorch {torch.__version__}. Use backend='naive' or 'tiled'."
        )
    if backend == "auto":
        return _sdpa(q, k, v, causal, attn_mask, dropout_p, scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _sdpa_kernel_ctx(backend):
                return _sdpa(q, k, v, causal, attn_mask, dropout_p, scale)
        except RuntimeError as exc:
            reasons = _kernel_reasons(caught)
            if not reasons and q.device.type != "cuda" and backend in ("efficient", "cudnn"):
                reasons = f"the {backend} kernel exists only for CUDA tensors; these are on {q.device}"
            raise RuntimeError(
                f"SDPA backend {backend!r} cannot run these inputs (device {q.device}, dtype "
                f"{q.dtype}, head_dim {q.shape[-1]}, attn_mask "
                f"{'given' if attn_mask is not None else 'none'}, dropout_p {dropout_p}). "
                f"PyTorch says: {reasons or exc}. It needs: {SDPA_REQUIREMENTS[backend]}"
            ) from exc


# --------------------------------------------------------------------------------------------
# Which SDPA kernels exist and which can run given inputs
# --------------------------------------------------------------------------------------------


def sdpa_backends() -> dict[str, bool]:
    """Which SDPA kernels this PyTorch build has, and whether each is enabled.

    A kernel listed ``True`` may still refuse particular inputs (dtype, head_dim, mask):
    :func:`sdpa_backend_support` tries them on real inputs.
    """
    if not sdpa_available():
        return dict.fromkeys(SDPA_BACKENDS, False)
    cuda = torch.cuda.is_available()
    bk = torch.backends.cuda
    flash_built = bool(getattr(bk, "is_flash_attention_available", lambda: cuda)())
    return {
        # The CPU build has its own fused "flash" kernel; on CUDA it needs the flash build.
        "flash": (not cuda or flash_built) and bk.flash_sdp_enabled(),
        "efficient": cuda and bk.mem_efficient_sdp_enabled(),
        "math": bk.math_sdp_enabled(),
        "cudnn": cuda and bool(getattr(bk, "cudnn_sdp_enabled", lambda: False)()),
    }


def sdpa_backend_support(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> dict[str, str]:
    """Try each SDPA kernel on these inputs; map its name to ``"ok"`` or the reason it refused.

    Runs one forward per kernel (use small inputs). PyTorch's own explanations (dtype,
    head_dim, mask, device, ...) are collected from its warnings instead of printed.
    """
    _validate(q, k, v, causal, attn_mask, dropout_p, None)
    result = {}
    for name in SDPA_BACKENDS:
        try:
            with torch.no_grad():
                flash_attention_forward(q, k, v, causal, attn_mask, dropout_p, backend=name)
        except RuntimeError as exc:
            msg = str(exc)
            start = msg.find("PyTorch says: ")
            end = msg.find(". It needs:")
            result[name] = msg[start + 14 : end] if start >= 0 and end > start else msg
        else:
            result[name] = "ok"
    return result


def sdpa_selected_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> str:
    """The kernel SDPA's dispatcher picks for these inputs under ``backend="auto"``.

    Uses PyTorch's private ``torch._fused_sdp_choice``; returns ``"unknown"`` where this
    PyTorch lacks it. For ``L != S`` with ``causal`` it reports the choice for the explicit
    bottom-right mask.
    """
    _validate(q, k, v, causal, attn_mask, dropout_p, None)
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None or not sdpa_available():
        return "unknown"
    from torch.nn.attention import SDPBackend

    q_len, k_len = q.shape[-2], k.shape[-2]
    if causal and attn_mask is None and q_len == k_len:
        index = choose(q, k, v, None, dropout_p, True)
    else:
        mask = _combined_mask(attn_mask, causal, q_len, k_len, q.device)
        index = choose(q, k, v, mask, dropout_p, False)
    member = SDPBackend(index).name
    names = {value: key for key, value in SDPA_BACKENDS.items()}
    return names.get(member, member.lower())


# --------------------------------------------------------------------------------------------
# IO model and memory model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionIO:
    """HBM traffic of one head's attention forward, in elements (the FlashAttention IO model).

    ``standard`` = ``4 N d + 4 N^2`` (Algorithm 0: read Q, K, write S; read S, write P;
    read P, V, write O). ``flash`` = ``2 N d + T_c (3 N d + 4 N)`` (Algorithm 1: K and V read
    once; for each of the ``T_c`` K/V blocks, every Q block, O block and its ``l``, ``m``
    statistics are read and O, ``l``, ``m`` written back). ``block_c = ceil(M / 4d)`` keys and
    ``block_r = min(block_c, d)`` queries per tile, with ``M`` the SRAM size in elements.
    """

    seq_len: int
    head_dim: int
    sram_elements: int
    block_c: int
    block_r: int
    t_c: int
    t_r: int
    standard: int
    flash: int
    bytes_per_element: int

    @property
    def ratio(self) -> float:
        """How many times less HBM traffic FlashAttention needs than standard attention."""
        return self.standard / self.flash

    @property
    def standard_bytes(self) -> int:
        return self.standard * self.bytes_per_element

    @property
    def flash_bytes(self) -> int:
        return self.flash * self.bytes_per_element


def attention_hbm_accesses(
    seq_len: int, head_dim: int, sram_bytes: int, bytes_per_element: int = 2
) -> AttentionIO:
    """The paper's IO model for sequence length ``N``, head dim ``d`` and SRAM of ``sram_bytes``.

    Standard attention moves ``Theta(N d + N^2)`` elements between HBM and the chip,
    FlashAttention ``Theta(N^2 d^2 / M)`` with ``M = sram_bytes / bytes_per_element``
    (Dao et al., 2022, Theorem 2); see :class:`AttentionIO` for the exact counts used. Requires
    ``d <= M`` (a row of Q must fit on chip). Example: an A100 SM has 192 KB of SRAM; with
    fp16 and ``d = 64``, ``N = 4096``: ``attention_hbm_accesses(4096, 64, 192 * 1024)``.
    """
    n = _check_block("seq_len", seq_len)
    d = _check_block("head_dim", head_dim)
    sram_bytes = _check_block("sram_bytes", sram_bytes)
    bpe = _check_block("bytes_per_element", bytes_per_element)
    m = sram_bytes // bpe
    if m < d:
        raise ValueError(
            f"sram_bytes={sram_bytes} holds {m} elements of {bpe} bytes, fewer than head_dim={d}: "
            "the IO model needs at least one row of Q on chip"
        )
    block_c = math.ceil(m / (4 * d))
    block_r = min(block_c, d)
    t_c = math.ceil(n / block_c)
    t_r = math.ceil(n / block_r)
    standard = 4 * n * d + 4 * n * n
    flash = 2 * n * d + t_c * (3 * n * d + 4 * n)
    return AttentionIO(n, d, m, block_c, block_r, t_c, t_r, standard, flash, bpe)


def attention_memory_bytes(
    seq_len: int,
    *,
    batch: int = 1,
    heads: int = 1,
    head_dim: int = 64,
    dtype_bytes: int = 2,
    materialised_matrices: int = 2,
) -> dict[str, int]:
    """Memory of one attention forward: inputs/output, and what each algorithm adds.

    - ``"qkvo"``: ``q``, ``k``, ``v`` and the output, ``4 B H N d`` elements.
    - ``"naive_extra"``: the ``B H N^2`` score matrix ``S`` and probabilities ``P`` that
      standard attention materialises (``materialised_matrices=2``: both are alive when the
      softmax finishes).
    - ``"flash_extra"``: FlashAttention's per-row statistics, ``B H N`` fp32 log-sum-exps
      (its tiles live in on-chip SRAM).
    - ``"naive"`` / ``"flash"``: ``qkvo`` plus the algorithm's extra.
    """
    n = _check_block("seq_len", seq_len)
    b = _check_block("batch", batch)
    h = _check_block("heads", heads)
    d = _check_block("head_dim", head_dim)
    e = _check_block("dtype_bytes", dtype_bytes)
    mats = _check_block("materialised_matrices", materialised_matrices)
    qkvo = 4 * b * h * n * d * e
    naive_extra = mats * b * h * n * n * e
    flash_extra = b * h * n * 4
    return {
        "qkvo": qkvo,
        "naive_extra": naive_extra,
        "flash_extra": flash_extra,
        "naive": qkvo + naive_extra,
        "flash": qkvo + flash_extra,
    }
