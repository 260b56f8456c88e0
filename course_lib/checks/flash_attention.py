"""Checks for notebook 04_flash_attention: the online-softmax update and the tiled forward.

Each check runs the student's function on small seeded inputs, compares it with the reference
(``course_lib.utils.flash_attention``) and, on a mismatch, names the most likely mistake: the
old sum/output not rescaled by ``exp(m_old - m_new)``, no max subtraction (``exp`` overflows on
large scores), a missing ``1/sqrt(d)`` scale or final division by ``l``, a causal mask that is
ignored or misplaced, the full ``N x N`` matrix materialised, masked tiles not skipped. The
global random state is restored afterwards, so a check never changes what later cells draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from course_lib.checks import call_student, expect, passed
from course_lib.utils.benchmark import peak_memory, torch_threads
from course_lib.utils.flash_attention import naive_attention
from course_lib.utils.units import format_bytes

__all__ = ["check_online_softmax_update", "check_tiled_attention"]

_UPDATE = "online_softmax_update(m, ell, o, s_block, v_block)"
_TILED = "my_tiled_attention(q, k, v, block_size, causal)"


def _close(got: Any, want: torch.Tensor, tol: float = 1e-5) -> bool:
    return (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and bool(torch.allclose(got.double(), want.double(), atol=tol, rtol=tol))
    )


def _finite(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------------------------------
# 1. Online softmax update
# ---------------------------------------------------------------------------------------------


def _unpack_update(result: Any, label: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    expect(result is not None, f"{label} returned None: return the tuple (m_new, ell_new, o_new).")
    expect(
        isinstance(result, (tuple, list)) and len(result) == 3,
        f"{label} returned {type(result).__name__}; return three tensors (m_new, ell_new, o_new).",
    )
    for name, t in zip(("m_new", "ell_new", "o_new"), result):
        expect(isinstance(t, torch.Tensor), f"{label}: {name} is a {type(t).__name__}, "
                                            "expected a torch.Tensor.")
    return tuple(result)  # type: ignore[return-value]


def _stream(rows: int, sizes: list[int], d: int, offset: float, seed: int):
    """Score blocks whose row maxima grow from block to block (so rescaling matters)."""
    gen = torch.Generator().manual_seed(seed)
    blocks, values = [], []
    for i, size in enumerate(sizes):
        blocks.append(torch.randn(rows, size, generator=gen, dtype=torch.float64) + offset + 2 * i)
        values.append(torch.randn(size, d, generator=gen, dtype=torch.float64))
    return blocks, values


def _run_stream(fn, blocks, values, label):
    rows, d = blocks[0].shape[0], values[0].shape[1]
    m = torch.full((rows,), float("-inf"), dtype=torch.float64)
    l = torch.zeros(rows, dtype=torch.float64)  # noqa: E741
    o = torch.zeros(rows, d, dtype=torch.float64)
    for s, v in zip(blocks, values):
        m, l, o = _unpack_update(  # noqa: E741
            call_student(fn, m.clone(), l.clone(), o.clone(), s.clone(), v.clone(), what=_UPDATE),
            label,
        )
    return m, l, o


def _variants(blocks, values):
    """Final (m, l, o) of the correct recurrence and of typical mistakes, on a block stream."""
    rows, d = blocks[0].shape[0], values[0].shape[1]
    out = {}
    for kind in ("right", "no_rescale", "rescale_l_only", "rescale_o_only", "alpha_inverted"):
        m = torch.full((rows,), float("-inf"), dtype=torch.float64)
        l = torch.zeros(rows, dtype=torch.float64)  # noqa: E741
        o = torch.zeros(rows, d, dtype=torch.float64)
        for s, v in zip(blocks, values):
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[:, None])
            alpha = torch.exp(m - m_new)
            if kind == "alpha_inverted":
                alpha = torch.exp(m_new - m).nan_to_num(posinf=0.0)
            a_l = 1.0 if kind in ("no_rescale", "rescale_o_only") else alpha
            a_o = 1.0 if kind in ("no_rescale", "rescale_l_only") else alpha
            l = a_l * l + p.sum(-1)  # noqa: E741
            o = (a_o[:, None] if isinstance(a_o, torch.Tensor) else a_o) * o + p @ v
            m = m_new
        out[kind] = (m, l, o)
    return out


def check_online_softmax_update(student_fn: Callable[..., Any]) -> None:
    """``online_softmax_update(m, ell, o, s_block, v_block) -> (m_new, ell_new, o_new)``.

    Checked on one block from the empty state, on a stream of blocks whose maxima grow (the
    old sum and output must be rescaled), on scores near 1e4 (``exp`` must not overflow) and
    with leading batch/head dimensions.
    """
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(0)
        # (a) One block from the empty state: m = rowmax, l = sum exp(s - m), o = exp(s - m) @ v.
        blocks, values = _stream(3, [5], 4, offset=0.0, seed=1)
        s, v = blocks[0], values[0]
        label = f"{_UPDATE} on the first block (m = -inf, ell = 0, o = 0)"
        m, l, o = _run_stream(student_fn, blocks, values, label)  # noqa: E741
        want_m = s.amax(-1)
        expect(m.shape == (3,), f"{label}: m_new has shape {tuple(m.shape)}, expected (3,) "
                                "(one running max per query row).")
        expect(
            _close(m, want_m),
            f"{label}: m_new = {m.tolist()} but the row maxima are {want_m.tolist()}. "
            "m_new = max(m, s_block.max(dim=-1).values).",
        )
        want_l = torch.exp(s - want_m[:, None]).sum(-1)
        if _close(l, torch.exp(s).sum(-1)):
            raise AssertionError(
                f"{label}: ell_new = sum(exp(s_block)), without subtracting the max. The running "
                "sum is measured against the running max: p = exp(s_block - m_new[..., None]), "
                "ell_new = alpha * ell + p.sum(dim=-1). (exp(1e4) overflows to inf otherwise.)"
            )
        expect(_close(l, want_l), f"{label}: ell_new = {l.tolist()}, expected {want_l.tolist()} "
                                  "= sum(exp(s_block - m_new)).")
        want_o = torch.exp(s - want_m[:, None]) @ v
        expect(o.shape == want_o.shape, f"{label}: o_new has shape {tuple(o.shape)}, expected "
                                        f"{tuple(want_o.shape)} = (rows, d): p @ v_block.")
        expect(_close(o, want_o), f"{label}: o_new is wrong; expected exp(s_block - m_new) @ "
                                  "v_block (unnormalised: do not divide by ell here).")

        # (b) A stream of blocks whose maxima grow: the old l and o must be rescaled.
        blocks, values = _stream(4, [3, 5, 2, 6], 3, offset=0.0, seed=2)
        label = f"{_UPDATE} over a stream of 4 blocks"
        m, l, o = _run_stream(student_fn, blocks, values, label)  # noqa: E741
        variants = _variants(blocks, values)
        want_m, want_l, want_o = variants["right"]
        if not (_close(m, want_m) and _close(l, want_l) and _close(o, want_o)):
            for kind, hint in (
                ("no_rescale", "neither the old sum ell nor the old output o was rescaled"),
                ("rescale_o_only", "the old sum ell was not rescaled (o was)"),
                ("rescale_l_only", "the old output o was not rescaled (ell was)"),
                ("alpha_inverted", "the rescale factor is upside down: use exp(m_old - m_new)"),
            ):
                vm, vl, vo = variants[kind]
                if _close(m, vm) and _close(l, vl) and _close(o, vo):
                    raise AssertionError(
                        f"{label}: {hint}. When a new block raises the max from m_old to m_new, "
                        "everything summed so far was measured against m_old: multiply both by "
                        "alpha = exp(m_old - m_new) before adding the new block "
                        "(ell_new = alpha * ell + p.sum(-1), o_new = alpha[..., None] * o + p @ v)."
                    )
            expect(_close(m, want_m), f"{label}: final m = {m.tolist()}, expected the running "
                                      f"max {want_m.tolist()}.")
            expect(_close(l, want_l), f"{label}: final ell = {l.tolist()}, expected "
                                      f"{want_l.tolist()} = sum over all blocks of "
                                      "exp(s - m_final).")
            raise AssertionError(f"{label}: final o is wrong; o / ell should equal "
                                 "softmax(all scores) @ all values.")
        full = torch.softmax(torch.cat(blocks, -1), -1) @ torch.cat(values, 0)
        expect(_close(o / l[:, None], full), f"{label}: o / ell differs from softmax(s) @ v.")

        # (c) Scores near 1e4: exp must only ever see (score - running max) <= 0.
        blocks, values = _stream(2, [4, 4, 4], 3, offset=1e4, seed=3)
        label = f"{_UPDATE} with scores around 1e4"
        m, l, o = _run_stream(student_fn, blocks, values, label)  # noqa: E741
        expect(
            _finite(l) and _finite(o),
            f"{label}: ell_new or o_new became inf/nan. exp(1e4) overflows: compute "
            "p = exp(s_block - m_new[..., None]) and alpha = exp(m - m_new), never exp(s_block).",
        )
        want_m, want_l, want_o = _variants(blocks, values)["right"]
        expect(_close(l, want_l) and _close(o, want_o),
               f"{label}: ell_new/o_new are finite but wrong; check the rescaling by alpha.")

        # (d) Leading (batch, heads) dimensions, float32.
        gen = torch.Generator().manual_seed(4)
        s = torch.randn(2, 3, 4, 6, generator=gen)
        v = torch.randn(2, 3, 6, 5, generator=gen)
        m0 = torch.randn(2, 3, 4, generator=gen)
        l0 = torch.rand(2, 3, 4, generator=gen) + 0.5
        o0 = torch.randn(2, 3, 4, 5, generator=gen)
        label = f"{_UPDATE} with shapes m (B, H, rows), s_block (B, H, rows, Bc)"
        result = call_student(
            student_fn, m0.clone(), l0.clone(), o0.clone(), s.clone(), v.clone(),
            what=f"{_UPDATE} with (B, H, rows) statistics",
            explain=lambda exc: (
                "the notebook's tiled attention calls this with (B, H, rows) statistics: reduce "
                "over dim=-1 and broadcast with [..., None] instead of dim=1 / [:, None]."
            ) if isinstance(exc, (RuntimeError, IndexError)) else None,
        )
        m, l, o = _unpack_update(result, label)  # noqa: E741
        want_m = torch.maximum(m0, s.amax(-1))
        p = torch.exp(s - want_m[..., None])
        alpha = torch.exp(m0 - want_m)
        want_l, want_o = alpha * l0 + p.sum(-1), alpha[..., None] * o0 + p @ v
        expect(
            m.shape == want_m.shape and l.shape == want_l.shape and o.shape == want_o.shape,
            f"{label}: got shapes {tuple(m.shape)}, {tuple(l.shape)}, {tuple(o.shape)}, expected "
            f"{tuple(want_m.shape)}, {tuple(want_l.shape)}, {tuple(want_o.shape)}. Reduce over "
            "dim=-1 and index with [..., None] so leading dimensions pass through.",
        )
        expect(_close(m, want_m) and _close(l, want_l, 1e-4) and _close(o, want_o, 1e-4),
               f"{label}: wrong values with leading dimensions (use dim=-1 and [..., None]).")
    passed("nb04_online_softmax")


# ---------------------------------------------------------------------------------------------
# 2. Tiled forward
# ---------------------------------------------------------------------------------------------


def _qkv(batch: int, heads: int, n: int, d: int, seed: int, gain: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, d, generator=gen) * g for g in (gain, gain, 1.0))


def _matmul_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _diagnose_tiled(got, q, k, v, causal: bool, label: str) -> None:
    want = naive_attention(q, k, v, causal)
    if _close(got, want):
        return
    d = q.shape[-1]
    other = naive_attention(q, k, v, not causal)
    unscaled = naive_attention(q, k, v, causal, scale=1.0)
    if causal and _close(got, other):
        raise AssertionError(
            f"{label}: the output equals NON-causal attention: the causal mask is ignored. "
            "Query i may only see keys j <= i: skip the key blocks after the query block and mask "
            "s with -inf where the key position is greater than the query position."
        )
    if not causal and _close(got, other):
        raise AssertionError(f"{label}: with causal=False the output is causal; apply the mask "
                             "only when causal=True.")
    if _close(got, unscaled):
        raise AssertionError(f"{label}: the scores are not scaled: multiply q @ k^T by "
                             f"1/sqrt(d) = {1 / math.sqrt(d):.4f}.")
    # Unnormalised output o = sum_j exp(s_j - m) v_j = softmax(s) @ v * l, l = exp(lse - m).
    _, lse = naive_attention(q, k, v, causal, return_lse=True)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(),
                                    float("-inf"))
    l_final = torch.exp(lse - scores.amax(-1))
    if _close(got, want * l_final[..., None], 1e-4):
        raise AssertionError(f"{label}: the output is not normalised: after the last key block "
                             "divide the running output o by the running sum ell (o / ell[..., None]).")
    if causal:
        err = (got - want).abs().amax(dim=(0, 1, 3))  # per query row
        bad = torch.nonzero(err > 1e-4).flatten().tolist()
        raise AssertionError(
            f"{label}: rows {bad[:8]}{'...' if len(bad) > 8 else ''} of {q.shape[2]} differ from "
            f"causal attention (max abs error {err.max().item():.3g}). Check the mask inside the "
            "tiles on the diagonal (set s to -inf where key position > query position) and which "
            "key blocks each query block visits."
        )
    err = (got - want).abs().max().item()
    raise AssertionError(f"{label}: max abs error {err:.3g} against standard attention. Check the "
                         "loop bounds (the last block can be shorter) and the online-softmax "
                         "update.")


def check_tiled_attention(student_fn: Callable[..., Any]) -> None:
    """``my_tiled_attention(q, k, v, block_size, causal) -> (B, H, N, d)``.

    Compared with standard attention (fp32, max abs error <= 1e-5) for N not a multiple of the
    block size, causal and not; stable for large logits; its peak memory must stay far below
    the N x N score matrix; with ``causal=True`` it must skip the tiles above the diagonal.
    """
    with torch.random.fork_rng(devices=[]), torch_threads(1):  # tiny ops: one thread is fastest
        torch.manual_seed(0)
        for causal in (False, True):
            for batch, heads, n, d, block in ((1, 1, 8, 4, 4), (2, 3, 50, 16, 16), (1, 2, 37, 8, 8)):
                q, k, v = _qkv(batch, heads, n, d, seed=n + d)
                label = (f"{_TILED} with q of shape {(batch, heads, n, d)}, block_size={block}, "
                         f"causal={causal}")
                got = call_student(student_fn, q.clone(), k.clone(), v.clone(), block, causal,
                                   what=_TILED)
                expect(got is not None, f"{label} returned None: return the output tensor.")
                expect(isinstance(got, torch.Tensor),
                       f"{label} returned a {type(got).__name__}; return a torch.Tensor.")
                expect(tuple(got.shape) == (batch, heads, n, d),
                       f"{label} returned shape {tuple(got.shape)}, expected "
                       f"{(batch, heads, n, d)}. Did the last (shorter) block get written?")
                expect(_finite(got), f"{label}: the output has inf/nan. Start m at -inf, ell and o "
                                     "at 0, and divide by ell only at the end.")
                _diagnose_tiled(got, q, k, v, causal, label)

        # Large logits: scores around 1e4 must not overflow.
        q, k, v = _qkv(1, 2, 24, 16, seed=5, gain=60.0)
        label = f"{_TILED} with scores around 1e4"
        got = call_student(student_fn, q, k, v, 8, True, what=_TILED)
        expect(_finite(got), f"{label}: the output has inf/nan. Subtract the running max before "
                             "exp (your online_softmax_update should do that).")
        _diagnose_tiled(got, q, k, v, True, label)

        # Memory: one tile at a time, never the N x N matrix.
        n, block = 1024, 64
        q, k, v = _qkv(1, 2, n, 32, seed=6)
        full = 2 * n * n * 4  # one (B, H, N, N) fp32 score matrix
        used = peak_memory(lambda: call_student(student_fn, q, k, v, block, False, what=_TILED))
        expect(
            used < full / 8,
            f"{_TILED} with N={n}, block_size={block} allocated {format_bytes(used, 'binary')} "
            f"at its peak; the full N x N score matrix is {format_bytes(full, 'binary')}, and a "
            f"tiled version needs well under {format_bytes(full // 8, 'binary')}. Hold only one "
            "(block_size x block_size) tile of scores at a time: inside the inner loop, compute s for one query block against "
            "one key block (not against all keys) and fold it in with online_softmax_update.",
        )

        # Causal tiles above the diagonal are skipped (about half the matmul work).
        n, block = 128, 16
        q, k, v = _qkv(1, 1, n, 16, seed=7)
        dense = _matmul_flops(lambda: call_student(student_fn, q, k, v, block, False, what=_TILED))
        causal = _matmul_flops(lambda: call_student(student_fn, q, k, v, block, True, what=_TILED))
        tiles = n // block
        expected = (tiles + 1) / (2 * tiles)  # (1 + 2 + ... + T) of T^2 tiles
        expect(
            dense > 0 and causal <= (expected + 0.1) * dense,
            f"{_TILED} with causal=True does {causal / max(dense, 1):.0%} of the non-causal "
            f"matmul work; skipping the tiles above the diagonal leaves {expected:.0%}. For a "
            "query block starting at i, stop the key loop after the block that holds key i + "
            "block_size - 1.",
        )
    passed("nb04_tiled_attention")
