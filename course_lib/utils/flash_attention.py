"""Attention as lesson 11 (section 4.3) builds it: SDPA, standard attention, FlashAttention.

All functions take ``(batch, num_heads, seq_len, head_dim)`` tensors (nanoGPT's
``(B, nh, T, hs)``) and compute ``O = softmax(q k^T * scale + mask) @ v`` row by row.

- :func:`flash_attention_forward` -- what a model calls, in the lesson's three steps: check
  support, call ``F.scaled_dot_product_attention`` (SDPA) with the causal flag, fall back to
  standard attention. ``backend=`` restricts SDPA to one kernel (``"flash" | "efficient" |
  "math" | "cudnn"``, see :mod:`course_lib.utils.sdpa_backends`) or picks a hand-written path.
- :func:`naive_attention` -- standard attention, materialising the ``L x S`` scores and
  probabilities: the baseline and the fallback.
- :func:`online_softmax_update`, :func:`tiled_attention` -- FlashAttention's forward in pure
  PyTorch with notebook 04's loop order and names: query blocks outside (FlashAttention-2),
  key/value blocks inside, each tile folded into the running ``(m, ell, o)`` of its rows.

The IO and memory models (:mod:`course_lib.utils.attention_io`) and SDPA's kernel listing are
re-exported here.

**Causal convention** (every path): bottom-right alignment. With ``L`` queries and ``S`` keys,
query ``i`` may attend to key ``j`` iff ``j <= i + (S - L)``: the last query sees every key, as a
decoder with a KV cache needs (FlashAttention >= 2.1 and ``causal_lower_right`` use the same
rule). For ``L == S`` it is the usual lower-triangular mask. SDPA's ``is_causal=True`` aligns
top-left (``j <= i``) instead, so :func:`flash_attention_forward` passes SDPA a bottom-right mask
when ``L != S``. When ``L > S`` the first ``L - S`` queries see no key at all.

**Fully masked rows** (a query that may attend to no key) give an output row of zeros on every
path, as SDPA's CPU kernels do (:func:`flash_attention_forward` zeroes them after any SDPA
kernel, in case a GPU kernel returns NaN there), and a log-sum-exp of ``-inf``.

**attn_mask** follows SDPA: boolean (``True`` = may attend) or a float mask added to the scores,
broadcastable to ``(batch, num_heads, L, S)``. With ``causal=True`` both apply.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from course_lib.utils.attention_inputs import check_attention_inputs, describe_inputs
from course_lib.utils.attention_io import (
    AttentionIO,
    attention_hbm_accesses,
    attention_memory_bytes,
)
from course_lib.utils.sdpa_backends import (
    SDPA_BACKENDS,
    SDPA_REQUIREMENTS,
    SDPAKernelError,
    backend_name,
    only_kernel,
    sdpa_backends,
)
from course_lib.validation import check_bool, check_choice, positive_int

__all__ = [
    "CAUSAL_ALIGNMENT",
    "SDPA_BACKENDS",
    "SDPA_REQUIREMENTS",
    "MANUAL_BACKENDS",
    "BACKENDS",
    "AttentionIO",
    "SDPAKernelError",
    "flash_attention_forward",
    "naive_attention",
    "online_softmax_update",
    "tiled_attention",
    "attention_backend",
    "default_backend",
    "causal_mask",
    "sdpa_available",
    "sdpa_backends",
    "sdpa_backend_support",
    "sdpa_selected_backend",
    "attention_hbm_accesses",
    "attention_memory_bytes",
]

CAUSAL_ALIGNMENT = "bottom-right"  # query i sees key j iff j <= i + (S - L); see module docstring
MANUAL_BACKENDS = ("naive", "tiled")
BACKENDS = ("auto", *SDPA_BACKENDS, *MANUAL_BACKENDS)
NEG_INF = float("-inf")
_DEFAULT_BACKEND: ContextVar[str] = ContextVar("course_attention_backend", default="auto")


# --------------------------------------------------------------------------------------------
# What a model calls: SDPA, with standard attention as the fallback
# --------------------------------------------------------------------------------------------


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
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention ``softmax(q k^T * scale + mask) @ v`` through the fastest available path.

    Returns a ``(B, nh, L, hs)`` tensor of ``q``'s dtype; autograd flows through every path.
    ``scale`` defaults to ``1 / sqrt(hs)``; ``causal`` aligns bottom-right when ``L != S``
    (module docstring). ``dropout_p`` is applied whenever it is non-zero: pass ``0.0`` in
    evaluation (``dropout_p=self.dropout if self.training else 0.0``), as with SDPA.

    ``backend`` (default ``"auto"``, or what :func:`attention_backend` set):
      - ``"auto"``: SDPA, which runs the best kernel it can (flash, memory-efficient, cuDNN or
        math); if SDPA is missing or no kernel accepts the inputs, a ``RuntimeWarning`` says
        why and :func:`naive_attention` computes the result.
      - ``"flash"``, ``"efficient"``, ``"math"``, ``"cudnn"``: SDPA restricted to that kernel;
        :class:`SDPAKernelError` (a ``RuntimeError``) explains why if it cannot run these
        inputs (see :func:`sdpa_backend_support` and :data:`SDPA_REQUIREMENTS`).
      - ``"naive"``, ``"tiled"``: the hand-written paths (:func:`naive_attention`,
        :func:`tiled_attention`), for teaching and comparison.

    ``enable_gqa=True`` (SDPA's keyword) allows grouped-query attention: k and v with ``Hkv``
    heads, a divisor of q's ``Hq``; each k/v head serves ``Hq // Hkv`` consecutive query heads,
    the same as repeating it (``k.repeat_interleave(Hq // Hkv, dim=-3)``).
    """
    scale = check_attention_inputs(q, k, v, causal, attn_mask, dropout_p, scale, enable_gqa)
    backend = check_choice("backend", default_backend() if backend is None else backend, BACKENDS)
    gqa = {"enable_gqa": True} if k.shape[-3] != q.shape[-3] else {}  # SDPA's keyword, when needed
    if backend in MANUAL_BACKENDS:
        manual = naive_attention if backend == "naive" else tiled_attention
        return manual(q, k, v, causal, attn_mask, dropout_p, scale, **gqa)

    # Step 1: check support. PyTorch >= 2.0 has F.scaled_dot_product_attention (SDPA), which
    # runs the fastest kernel that accepts the inputs: FlashAttention, memory-efficient
    # attention, cuDNN, or its math implementation.
    reason = "this PyTorch has no F.scaled_dot_product_attention (it needs PyTorch >= 2.0)"
    if sdpa_available():
        # Step 2: call SDPA with the causal flag. is_causal=True aligns top-left, which is the
        # course's bottom-right rule only when L == S; otherwise the mask goes in explicitly.
        is_causal, mask = _sdpa_mask(causal, attn_mask, q.shape[-2], k.shape[-2], q.device)
        kernel = contextlib.nullcontext() if backend == "auto" else only_kernel(
            backend, q.device, describe_inputs(q, attn_mask, dropout_p)
        )
        try:
            with kernel:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **gqa,
                )
        except RuntimeError as exc:
            if backend != "auto" or isinstance(exc, torch.OutOfMemoryError):
                raise  # the chosen kernel explains its refusal; running out of memory is no refusal
            reason = f"no SDPA kernel accepts these inputs ({exc})"
        else:
            return _zero_empty_rows(out, mask)
    # Step 3: fall back to standard attention.
    warnings.warn(f"{reason}; computing standard attention instead", RuntimeWarning, stacklevel=2)
    return naive_attention(q, k, v, causal, attn_mask, dropout_p, scale, **gqa)


def sdpa_available() -> bool:
    """Step 1 of :func:`flash_attention_forward`: has PyTorch ``F.scaled_dot_product_attention``?"""
    return hasattr(F, "scaled_dot_product_attention")


# --------------------------------------------------------------------------------------------
# Standard attention: the baseline and the fallback
# --------------------------------------------------------------------------------------------


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
    enable_gqa: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Standard attention: ``S = q k^T * scale``, ``P = softmax(S)``, ``O = P v``.

    Materialises the ``(B, H, L, S)`` matrices ``S`` and ``P`` (the memory tiled attention
    saves). fp16/bf16 inputs are computed in fp32 and the result cast back. Differentiable.
    With ``return_lse=True`` also returns the row log-sum-exp of the scaled, masked scores,
    shape ``(B, H, L)``, in the compute dtype. ``enable_gqa=True``: k/v may have fewer heads
    (grouped-query attention, as in :func:`flash_attention_forward`); here they are repeated.
    """
    scale = check_attention_inputs(q, k, v, causal, attn_mask, dropout_p, scale, enable_gqa)
    check_bool("return_lse", return_lse)
    if k.shape[-3] != q.shape[-3]:  # GQA: each k/v head serves Hq // Hkv consecutive q heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    cdtype = _compute_dtype(q.dtype)
    q_len, k_len = q.shape[-2], k.shape[-2]
    s = (q.to(cdtype) @ k.to(cdtype).transpose(-2, -1)) * scale  # (B, H, L, S)
    mask = _combined_mask(attn_mask, causal, q_len, k_len, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else s + mask.to(cdtype)
    # Only a mask can empty a row; softmax would give NaN there, SDPA gives zeros.
    if mask is not None and not (attn_mask is None and q_len <= k_len):
        row_max = s.amax(dim=-1, keepdim=True)
        e = torch.exp(s - row_max.masked_fill(row_max == NEG_INF, 0.0))
        total = e.sum(dim=-1, keepdim=True)
        p = e / total.masked_fill(total == 0, 1.0)
    else:
        p = torch.softmax(s, dim=-1)  # (B, H, L, S)
    out = (_dropout(p, dropout_p) @ v.to(cdtype)).to(q.dtype)  # (B, H, L, hs)
    return (out, torch.logsumexp(s, dim=-1)) if return_lse else out


# --------------------------------------------------------------------------------------------
# FlashAttention in pure PyTorch: online softmax and the tiled forward
# --------------------------------------------------------------------------------------------


def online_softmax_update(
    m: torch.Tensor,
    ell: torch.Tensor,
    o: torch.Tensor,
    s_block: torch.Tensor,
    v_block: torch.Tensor,
    *,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One online-softmax step: fold a block of scores and values into ``(m, ell, o)``.

    ``m``, ``ell``: ``(..., rows)`` running max and running sum ``sum(exp(s - m))`` of the
    scores seen so far (``-inf`` and ``0`` before the first block); ``o``: ``(..., rows, d)``
    the unnormalised output ``sum(exp(s - m) v)``; ``s_block``: ``(..., rows, Bc)`` this key
    block's scores; ``v_block``: ``(..., Bc, d)`` its values. Returns ``(m_new, ell_new,
    o_new)``::

        m_new = max(m, rowmax(s_block))
        p     = exp(s_block - m_new)        # this block, relative to the new max
        alpha = exp(m - m_new)              # rescales what was summed against the old max
        ell_new = alpha * ell + rowsum(p)
        o_new   = alpha * o + p @ v_block

    After the last block ``softmax(s) @ v = o / ell`` and the log-sum-exp is ``m + log(ell)``.
    Rows whose scores are all ``-inf`` so far keep ``m = -inf``, ``ell = 0`` and ``o = 0`` (never
    NaN). ``dropout_p`` drops entries of ``p`` (scaled by ``1 / (1 - dropout_p)``) after they are
    summed into ``ell`` and before they multiply ``v_block``: the distribution of
    ``dropout(softmax(s)) @ v``.
    """
    if m.shape != s_block.shape[:-1] or ell.shape != m.shape or o.shape[:-1] != m.shape:
        raise ValueError(
            f"m and ell must have shape s_block.shape[:-1] = {tuple(s_block.shape[:-1])} and o "
            f"that shape plus (d,); got m {tuple(m.shape)}, ell {tuple(ell.shape)}, "
            f"o {tuple(o.shape)}"
        )
    m_new = torch.maximum(m, s_block.amax(dim=-1))
    m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)  # no key seen yet: avoid -inf - -inf
    p = torch.exp(s_block - m_safe[..., None])
    alpha = torch.exp(m - m_safe)
    ell_new = alpha * ell + p.sum(dim=-1)
    o_new = alpha[..., None] * o + _dropout(p, dropout_p) @ v_block
    return m_new, ell_new, o_new


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    *,
    block_q: int = 512,
    block_k: int = 512,
    return_lse: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's forward pass in pure PyTorch (exact, not an approximation)::

        for each query block Q_i (block_q rows):             # outer loop (FlashAttention-2)
            m, ell, o = -inf, 0, 0                            # Q_i's own statistics ("in SRAM")
            for each key/value block K_j, V_j (block_k keys): # causal: stop after the diagonal
                S_ij = Q_i K_j^T * scale                      # one tile, masked if needed
                m, ell, o = online_softmax_update(m, ell, o, S_ij, V_j)
            O_i = o / ell                                     # the only write of the result

    Only one ``(B, H, block_q, block_k)`` tile of scores exists at a time, so the extra memory
    is ``O(N)`` (the output, the statistics and one tile) instead of the ``O(N^2)`` of
    :func:`naive_attention`. With ``causal=True`` the tiles entirely above the diagonal are
    never computed (about half the work) and only tiles crossing it are masked. This is the
    loop of notebook 04's ``my_tiled_attention``; the library's version also takes
    ``attn_mask``, dropout, ``L != S`` (bottom-right causal), different query and key block
    sizes and ``return_lse=True`` (the log-sum-exp ``m + log(ell)`` of each row, shape
    ``(B, H, L)``, in the compute dtype; ``-inf`` for a row that sees no key, whose output is 0).

    Defaults suit a CPU: large blocks mean few, large tensor ops, which matters more in PyTorch
    than fitting a tile into cache. When other processes keep the cores busy, start Python with
    ``OMP_WAIT_POLICY=PASSIVE`` so that waiting threads sleep instead of spinning (the loop issues
    hundreds of small multi-threaded ops; ``benchmarks/bench_attention.py`` does this). fp16/bf16
    inputs are computed and accumulated in fp32 and the output cast back. Differentiable:
    autograd records the loop and keeps every tile (unlike FlashAttention's recomputing
    backward), so train with :func:`flash_attention_forward`.

    ``enable_gqa=True``: k/v may have ``Hkv`` heads, fewer than q's ``Hq`` (grouped-query
    attention). They are not repeated: q is viewed as ``(B, Hkv, Hq // Hkv, L, hs)`` and each
    k/v head is broadcast over its group of query heads.
    """
    scale = check_attention_inputs(q, k, v, causal, attn_mask, dropout_p, scale, enable_gqa)
    block_q = positive_int("block_q", block_q)
    block_k = positive_int("block_k", block_k)
    check_bool("return_lse", return_lse)

    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[-3], k.shape[-2]
    groups = (kv_heads, heads // kv_heads)  # GQA: query head h uses k/v head h // (Hq // Hkv)
    offset = k_len - q_len  # bottom-right causal alignment: query i sees keys j <= i + offset
    cdtype = _compute_dtype(q.dtype)
    qs = (q.to(cdtype) * scale).unflatten(1, groups)  # (B, Hkv, G, L, hs), scaled once
    kt = k.to(cdtype).transpose(-2, -1).unsqueeze(2)  # (B, Hkv, 1, hs, S): shared by the group
    vc = v.to(cdtype).unsqueeze(2)  # (B, Hkv, 1, S, hs)
    mask = None
    if attn_mask is not None:  # a view (B, Hkv, G, L, S)
        mask = attn_mask.expand(batch, heads, q_len, k_len).unflatten(1, groups)
        mask = mask if mask.dtype == torch.bool else mask.to(cdtype)
    out = qs.new_zeros(qs.shape)
    lse = qs.new_full(qs.shape[:-1], NEG_INF) if return_lse else None
    for r0 in range(0, q_len, block_q):
        r1 = min(r0 + block_q, q_len)
        m = qs.new_full((*qs.shape[:3], r1 - r0), NEG_INF)
        ell = qs.new_zeros(*qs.shape[:3], r1 - r0)
        o = qs.new_zeros(*qs.shape[:3], r1 - r0, head_dim)
        # Causal: the block's last query sees keys j < r1 + offset; later key blocks are skipped.
        k_stop = min(k_len, r1 + offset) if causal else k_len
        for k0 in range(0, k_stop, block_k):
            k1 = min(k0 + block_k, k_len)
            s = qs[..., r0:r1, :] @ kt[..., k0:k1]  # (B, Hkv, G, bq, bk) tile of scores
            if causal and k1 - 1 > r0 + offset:  # the tile crosses the diagonal
                q_idx = torch.arange(r0 + offset, r1 + offset, device=q.device).unsqueeze(-1)
                s = s.masked_fill(torch.arange(k0, k1, device=q.device) > q_idx, NEG_INF)
            if mask is not None:
                mb = mask[..., r0:r1, k0:k1]
                s = s.masked_fill(~mb, NEG_INF) if mb.dtype == torch.bool else s + mb
            m, ell, o = online_softmax_update(
                m, ell, o, s, vc[..., k0:k1, :], dropout_p=dropout_p
            )
        empty = ell == 0  # rows with no key to attend to: output 0 (as SDPA), lse -inf
        out[..., r0:r1, :] = o / ell.masked_fill(empty, 1.0).unsqueeze(-1)
        if return_lse:
            lse[..., r0:r1] = (m + torch.log(ell)).masked_fill(empty, NEG_INF)
    out = out.flatten(1, 2).to(q.dtype)  # (B, Hq, L, hs)
    return (out, lse.flatten(1, 2)) if return_lse else out


# --------------------------------------------------------------------------------------------
# Choosing the default backend, masks, SDPA's mask argument
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Make ``name`` the default backend of :func:`flash_attention_forward` inside the block.

    Lets a lesson run a whole model (e.g. TinyGPT) on the ``"naive"`` or ``"tiled"`` path, or
    on one SDPA kernel, without changing the model's code::

        with attention_backend("tiled"):
            logits = model(idx)
    """
    token = _DEFAULT_BACKEND.set(check_choice("backend", name, BACKENDS))
    try:
        yield
    finally:
        _DEFAULT_BACKEND.reset(token)


def default_backend() -> str:
    """The backend :func:`flash_attention_forward` uses when none is passed (``"auto"`` unless
    an :func:`attention_backend` block chose another)."""
    return _DEFAULT_BACKEND.get()


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(q_len, k_len)`` mask, ``True`` where query ``i`` may see key ``j``.

    Bottom-right aligned (see the module docstring): ``j <= i + (k_len - q_len)``.
    """
    positive_int("q_len", q_len)
    positive_int("k_len", k_len)
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
    return attn_mask.masked_fill(~allowed, NEG_INF)


def _sdpa_mask(
    causal: bool, attn_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device
) -> tuple[bool, torch.Tensor | None]:
    """``(is_causal, attn_mask)`` arguments that make SDPA follow the course's causal rule."""
    if causal and attn_mask is None and q_len == k_len:
        return True, None  # top-left and bottom-right agree: the fastest, flash-eligible form
    return False, _combined_mask(attn_mask, causal, q_len, k_len, device)


def _zero_empty_rows(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the output rows that may attend to no key (some CUDA kernels return NaN there)."""
    if mask is None:
        return out
    if mask.dtype == torch.bool:
        empty = ~mask.any(dim=-1, keepdim=True)
    else:
        empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
    return out.masked_fill(empty, 0.0)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are computed (and accumulated) in fp32; fp32/fp64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dropout(p: torch.Tensor, dropout_p: float) -> torch.Tensor:
    if dropout_p == 0.0:
        return p
    keep = torch.rand_like(p) >= dropout_p
    return p * keep / (1.0 - dropout_p)


# --------------------------------------------------------------------------------------------
# Which SDPA kernels can run given inputs
# --------------------------------------------------------------------------------------------


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
    check_attention_inputs(q, k, v, causal, attn_mask, dropout_p, None)
    result = {}
    for name in SDPA_BACKENDS:
        try:
            with torch.no_grad():
                flash_attention_forward(q, k, v, causal, attn_mask, dropout_p, backend=name)
        except SDPAKernelError as exc:
            result[name] = exc.reason
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

    Asks PyTorch's private ``torch._fused_sdp_choice``. For ``L != S`` with ``causal`` it reports
    the choice for the explicit bottom-right mask.
    """
    check_attention_inputs(q, k, v, causal, attn_mask, dropout_p, None)
    is_causal, mask = _sdpa_mask(causal, attn_mask, q.shape[-2], k.shape[-2], q.device)
    return backend_name(torch._fused_sdp_choice(q, k, v, mask, dropout_p, is_causal))
