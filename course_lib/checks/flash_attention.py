"""Checks for notebook 04_flash_attention: the online-softmax update and the tiled forward.

Each check runs the student's function on small seeded inputs, compares it with the check's
private reference and, on a mismatch, names the mistake by its signature:

- **online_softmax_update**: every plausible wrong recurrence (old sum/output not rescaled,
  the rescale factor upside down, no running max, one max for the whole block, ``p`` measured
  against the old max or not shifted at all, normalised too early) is simulated on the same
  probes (the empty state, a finite state whose rows' maxima rise, fall, or see a fully masked
  block, leading batch/head dimensions); the one the student's results match is named.
- **my_tiled_attention**: on a mismatch the check reads the student's attention weights
  directly (values ``v`` = one-hot rows, so the output *is* the softmax matrix) and tells apart
  keys a row never saw (loop bounds, a skipped last or diagonal block, a mask that also hides
  the diagonal), keys it should not see (the causal mask ignored or misplaced), rows that saw no
  key at all (``nan``), a wrong softmax scale (estimated from the weights), and a missing final
  division. Memory, tile size and causal block skipping are checked on larger inputs.

The global random state is restored afterwards, so a check never changes what later cells draw.
The mistakes and correct alternatives these checks know: :mod:`.flash_attention_variants`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from course_lib.checks import call_student, check, expect, fail
from course_lib.checks.flash_attention_variants import VARIANTS
from course_lib.utils.benchmark import peak_memory, torch_threads
from course_lib.utils.flash_attention import naive_attention
from course_lib.utils.units import format_bytes

__all__ = ["check_online_softmax_update", "check_tiled_attention", "VARIANTS"]

_UPDATE = "online_softmax_update(m, ell, o, s_block, v_block)"
_TILED = "my_tiled_attention(q, k, v, block_size, causal)"
_NEG_INF = float("-inf")
_LIB = "course_lib.utils.flash_attention."

_UPDATE_FORBID = tuple(_LIB + n for n in ("online_softmax_update", "tiled_attention",
                                            "flash_attention_forward"))
_TILED_FORBID = (*_UPDATE_FORBID, _LIB + "naive_attention",
                 "torch.nn.functional.scaled_dot_product_attention", "torch.softmax",
                 "torch.nn.functional.softmax")


def _close(got: Any, want: torch.Tensor, tol: float = 1e-5) -> bool:
    return (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and bool(torch.allclose(got.double(), want.double(), atol=tol, rtol=tol, equal_nan=True))
    )


def _finite(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and bool(torch.isfinite(t).all())


def _broadcast_hint(exc: BaseException) -> str | None:
    """The likely cause of a shape clash or a wrong call inside the update."""
    text = str(exc)
    if isinstance(exc, TypeError) and "return_types" in text:
        return ("s_block.max(dim=-1) returns a pair (values, indices): take .values (or use "
                "s_block.amax(dim=-1)) before torch.maximum(m, ...).")
    if isinstance(exc, (RuntimeError, IndexError)) and ("size of tensor" in text
                                                        or "dimension" in text):
        return ("a per-row tensor of shape (..., rows) (m_new, alpha or ell) meets a (..., rows, "
                "Bc) or (..., rows, d) one: give it a last axis with [..., None] "
                "(s_block - m_new[..., None], alpha[..., None] * o) so that it broadcasts over the "
                "columns, and reduce over dim=-1 so leading (batch, head) dimensions pass "
                "through.")
    return None


# ---------------------------------------------------------------------------------------------
# 1. Online softmax update
# ---------------------------------------------------------------------------------------------


def _reference_update(m, l, o, s, v):  # noqa: E741
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
    p = torch.exp(s - m_safe[..., None])
    alpha = torch.exp(m - m_safe)
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * o + p @ v


def _mistaken_update(kind: str, m, l, o, s, v):  # noqa: E741
    """What the update returns with mistake ``kind`` (the signatures the check looks for)."""
    if kind == "no_running_max":
        m_new = s.amax(-1)
    elif kind == "whole_block_max":
        m_new = torch.maximum(m, s.amax())
    else:
        m_new = torch.maximum(m, s.amax(-1))
    if kind == "p_old_max":
        p = torch.exp(s - m[..., None])
    else:
        p = torch.exp(s - m_new[..., None])
    alpha = torch.exp(m_new - m) if kind == "alpha_inverted" else torch.exp(m - m_new)
    a_l = 1.0 if kind in ("no_rescale", "rescale_o_only") else alpha
    a_o = 1.0 if kind in ("no_rescale", "rescale_l_only") else alpha[..., None]
    l_new = a_l * l + p.sum(-1)
    o_new = a_o * o + p @ v
    if kind == "normalised":
        o_new = o_new / l_new[..., None]
    return m_new, l_new, o_new


_RESCALE = ("When a new block raises the max from m_old to m_new, everything summed so far was "
            "measured against m_old: multiply both ell and o by alpha = exp(m_old - m_new) before "
            "adding the new block (ell_new = alpha * ell + p.sum(-1), "
            "o_new = alpha[..., None] * o + p @ v_block).")

# kind -> (diagnosis, hint); checked in this order against every probe.
_UPDATE_MISTAKES = {
    "alpha_inverted": (
        "the rescale factor is upside down: your alpha = exp(m_new - m_old) is >= 1 (and "
        "exp(+inf) * 0 = nan on the first block, where m_old = -inf)",
        "alpha = exp(m - m_new): the old statistics shrink when the max grows.",
    ),
    "no_running_max": (
        "m_new is this block's max, not the running max: when an earlier block had the larger "
        "score, m must keep it",
        "m_new = torch.maximum(m, s_block.max(dim=-1).values).",
    ),
    "whole_block_max": (
        "m_new takes one max for the whole block instead of one max per query row",
        "reduce over the keys only: s_block.max(dim=-1).values (shape (..., rows)).",
    ),
    "p_old_max": (
        "p is measured against the old max m instead of the new max m_new (on the first block "
        "m = -inf, so exp(s - m) = inf)",
        "p = exp(s_block - m_new[..., None]).",
    ),
    "no_rescale": ("neither the old sum ell nor the old output o was rescaled", _RESCALE),
    "rescale_o_only": ("the old sum ell was not rescaled (o was)", _RESCALE),
    "rescale_l_only": ("the old output o was not rescaled (ell was)", _RESCALE),
    "normalised": (
        "o_new is already divided by ell_new: do not divide by ell here",
        "o stays unnormalised (sum of exp(s - m) v); the tiled loop divides by ell once, after "
        "the last key block.",
    ),
}


def _probes() -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """``(label, (m, ell, o, s_block, v_block))`` inputs of one update step each."""
    gen = torch.Generator().manual_seed(11)
    out = []
    # The empty state (m = -inf, ell = o = 0), one block.
    s = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    empty = (torch.full((3,), _NEG_INF, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
             torch.zeros(3, 4, dtype=torch.float64), s, v)
    out.append(("on the first block (m = -inf, ell = 0, o = 0)", empty))
    # A finite state: row 0's max rises, row 1's falls, row 2 sees a fully masked block (all
    # -inf, as a row of a tile on the causal diagonal can), row 3's max rises a lot.
    m = torch.tensor([0.5, 3.0, 1.0, -2.0], dtype=torch.float64)
    ell = torch.tensor([1.5, 2.0, 1.2, 1.1], dtype=torch.float64)
    o = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    s = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    s[0] += 2.0
    s[1] -= 2.0
    s[2] = _NEG_INF
    s[3] += 4.0
    v = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    out.append(("from a running state (rows whose max rises, falls, or whose block is fully "
                "masked)", (m, ell, o, s, v)))
    # Leading (batch, heads) dimensions, float32.
    s = torch.randn(2, 3, 4, 6, generator=gen)
    v = torch.randn(2, 3, 6, 5, generator=gen)
    m = torch.randn(2, 3, 4, generator=gen)
    ell = torch.rand(2, 3, 4, generator=gen) + 0.5
    o = torch.randn(2, 3, 4, 5, generator=gen)
    out.append(("with (B, H, rows) statistics and s_block (B, H, rows, Bc)", (m, ell, o, s, v)))
    return out


def _unpack_update(result: Any, label: str, want) -> tuple[torch.Tensor, ...]:
    expect(result is not None, f"{label} returned None: return the tuple (m_new, ell_new, o_new).")
    expect(
        isinstance(result, (tuple, list)) and len(result) == 3,
        f"{label} returned {type(result).__name__}"
        + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        + "; return three tensors (m_new, ell_new, o_new).",
    )
    for name, t in zip(("m_new", "ell_new", "o_new"), result):
        expect(isinstance(t, torch.Tensor), f"{label}: {name} is a {type(t).__name__}, "
                                            "expected a torch.Tensor.")
    shapes = tuple(tuple(t.shape) for t in result)
    wanted = tuple(tuple(t.shape) for t in want)
    if shapes != wanted:
        if shapes == (wanted[0], wanted[2], wanted[1]):
            fail(f"{label}: the results come back in the order (m_new, o_new, ell_new).",
                 "return m_new, ell_new, o_new (in that order).")
        fail(f"{label}: got shapes m_new {shapes[0]}, ell_new {shapes[1]}, o_new {shapes[2]}; "
             f"expected {wanted[0]}, {wanted[1]}, {wanted[2]}.",
             "m_new and ell_new have one entry per query row (reduce s_block over dim=-1); "
             "o_new has the shape of o (p @ v_block).")
    return tuple(result)


def _run_update(fn, inputs, label):
    args = tuple(t.clone() for t in inputs)
    result = call_student(fn, *args, what=f"{_UPDATE} {label}", explain=_broadcast_hint)
    return _unpack_update(result, f"{_UPDATE} {label}", _reference_update(*inputs))


def _stream(rows: int, sizes: list[int], d: int, offset: float, seed: int, step: float = 2.0):
    """Score blocks whose row maxima change by ``step`` from block to block."""
    gen = torch.Generator().manual_seed(seed)
    blocks, values = [], []
    for i, size in enumerate(sizes):
        blocks.append(torch.randn(rows, size, generator=gen, dtype=torch.float64) + offset
                      + step * i)
        values.append(torch.randn(size, d, generator=gen, dtype=torch.float64))
    return blocks, values


def _fold(fn, blocks, values, label):
    rows, d = blocks[0].shape[0], values[0].shape[1]
    m = torch.full((rows,), _NEG_INF, dtype=torch.float64)
    l = torch.zeros(rows, dtype=torch.float64)  # noqa: E741
    o = torch.zeros(rows, d, dtype=torch.float64)
    for s, v in zip(blocks, values):
        m, l, o = _run_update(fn, (m, l, o, s, v), label)  # noqa: E741
    return m, l, o


def _diagnose_update(results, probes) -> None:
    """Name the mistake whose signature the student's results match on every probe."""
    for kind, (diagnosis, hint) in _UPDATE_MISTAKES.items():
        with torch.no_grad():
            simulated = [_mistaken_update(kind, *inputs) for _, inputs in probes]
        if all(all(_close(g, w, 1e-4) for g, w in zip(got, sim))
               for got, sim in zip(results, simulated)):
            fail(f"{_UPDATE}: {diagnosis}.", hint)


@check("nb04_online_softmax", forbid=_UPDATE_FORBID)
def check_online_softmax_update(student_fn: Callable[..., Any]) -> None:
    """``online_softmax_update(m, ell, o, s_block, v_block) -> (m_new, ell_new, o_new)``.

    Checked on one block from the empty state, one step from a running state (rows whose max
    rises, falls, or whose block is fully masked), batched (B, H, rows) statistics, streams of
    blocks whose maxima grow or shrink, and scores near 1e4 (``exp`` must not overflow).
    """
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(0)
        probes = _probes()
        results = [_run_update(student_fn, inputs, label) for label, inputs in probes]
        wants = [_reference_update(*inputs) for _, inputs in probes]
        ok = [all(_close(g, w, 1e-4) for g, w in zip(got, want))
              for got, want in zip(results, wants)]
        if not all(ok):
            _diagnose_update(results, probes)
            _explain_update_probe(results, wants, probes, ok)

        # Streams: maxima that grow, then shrink (the running max and the rescaling both matter).
        for step, seed in ((2.0, 2), (-2.0, 3)):
            blocks, values = _stream(4, [3, 5, 2, 6], 3, offset=0.0, seed=seed, step=step)
            trend = "grow" if step > 0 else "shrink"
            label = f"over a stream of 4 blocks whose maxima {trend}"
            m, l, o = _fold(student_fn, blocks, values, label)  # noqa: E741
            full = torch.softmax(torch.cat(blocks, -1), -1) @ torch.cat(values, 0)
            want_m = torch.cat(blocks, -1).amax(-1)
            expect(_close(m, want_m), f"{_UPDATE} {label}: final m = {m.tolist()}, expected the "
                                      f"running max {want_m.tolist()}.",
                   "m_new = torch.maximum(m, s_block.max(dim=-1).values) keeps the largest score "
                   "seen so far.")
            expect(_close(o / l[:, None], full),
                   f"{_UPDATE} {label}: o / ell differs from softmax(all scores) @ all values.",
                   "each step: alpha = exp(m - m_new), ell_new = alpha * ell + p.sum(-1), "
                   "o_new = alpha[..., None] * o + p @ v_block.")

        # Scores near 1e4: exp must only ever see (score - running max) <= 0.
        blocks, values = _stream(2, [4, 4, 4], 3, offset=1e4, seed=4)
        label = "with scores around 1e4"
        m, l, o = _fold(student_fn, blocks, values, label)  # noqa: E741
        expect(
            _finite(l) and _finite(o),
            f"{_UPDATE} {label}: ell_new or o_new became inf/nan: exp(1e4) overflows.",
            "only ever exponentiate differences from the running max: p = exp(s_block - "
            "m_new[..., None]) and alpha = exp(m - m_new), never exp(s_block) or exp(m) alone.",
        )
        full = torch.softmax(torch.cat(blocks, -1), -1) @ torch.cat(values, 0)
        expect(_close(o / l[:, None], full),
               f"{_UPDATE} {label}: ell_new/o_new are finite but o / ell is wrong.",
               "check the rescaling by alpha = exp(m - m_new).")


def _explain_update_probe(results, wants, probes, ok) -> None:
    """No known mistake matched: say which quantity of which probe is wrong."""
    index = ok.index(False)
    label, (m0, l0, o0, s, v) = probes[index]
    (m, l, o), (want_m, want_l, want_o) = results[index], wants[index]  # noqa: E741
    where = f"{_UPDATE} {label}"
    if index == 0 and _close(l, torch.exp(s).sum(-1)):
        fail(f"{where}: ell_new = sum(exp(s_block)), without subtracting the max.",
             "the running sum is measured against the running max: p = exp(s_block - "
             "m_new[..., None]), ell_new = alpha * ell + p.sum(dim=-1) (exp(1e4) overflows "
             "otherwise).")
    if index == 1:
        good = [r for r in range(4) if _close(m[r], want_m[r]) and _close(l[r], want_l[r], 1e-4)
                and _close(o[r], want_o[r], 1e-4)]
        if good == [0, 1, 3]:
            fail(f"{where}: row 2 of s_block is all -inf (a fully masked row, as in a tile on "
                 "the causal diagonal) and its state must stay unchanged (m, ell, o); you "
                 f"returned m = {m[2].item():.4g}, ell = {l[2].item():.4g}.",
                 "with m finite, m_new = max(m, -inf) = m, p = exp(-inf - m) = 0 and alpha = 1. "
                 "If you shift by the block's own max, exp(-inf - (-inf)) is nan: shift by m_new.")
    if index == 2:
        fail(f"{where}: wrong values with leading dimensions (got m_new {m.flatten()[:3].tolist()}"
             f"..., expected {want_m.flatten()[:3].tolist()}...).",
             "reduce over dim=-1 and broadcast with [..., None] instead of dim=1 / [:, None].")
    for name, got, want, what in (
        ("m_new", m, want_m, "max(m, s_block.max(dim=-1).values)"),
        ("ell_new", l, want_l, "alpha * ell + sum(exp(s_block - m_new))"),
        ("o_new", o, want_o, "alpha[..., None] * o + exp(s_block - m_new) @ v_block "
                             "(unnormalised)"),
    ):
        if not _close(got, want, 1e-4):
            fail(f"{where}: {name} = {got.flatten()[:4].tolist()}..., expected "
                 f"{want.flatten()[:4].tolist()}... = {what}.",
                 "alpha = exp(m - m_new) rescales the old statistics; p = exp(s_block - "
                 "m_new[..., None]) is the new block.")


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


class _Products(TorchFunctionMode):
    """Records the output shapes of the matrix products run inside the block."""

    _FUNCS = {"matmul", "bmm", "mm", "einsum", "__matmul__", "__rmatmul__"}

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in self._FUNCS and isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def _visible(n: int, causal: bool) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool)
    return allowed.tril() if causal else allowed


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")


def _weights_probe(student_fn, n: int, block: int, causal: bool):
    """The student's attention weights: with v = one-hot rows, output[..., :n] = softmax(s)."""
    dp = n + 3  # head dim != N, so 1/sqrt(N) and 1/sqrt(d) tell apart
    gen = torch.Generator().manual_seed(100 + n)
    q = torch.randn(1, 1, n, dp, generator=gen, dtype=torch.float64) * 0.8
    k = torch.randn(1, 1, n, dp, generator=gen, dtype=torch.float64) * 0.8
    v = torch.zeros(1, 1, n, dp, dtype=torch.float64)
    v[0, 0, :, :n] = torch.eye(n, dtype=torch.float64)
    got = call_student(student_fn, q.clone(), k.clone(), v.clone(), block, causal, what=_TILED)
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (1, 1, n, dp):
        return None
    raw = (q @ k.transpose(-2, -1))[0, 0]
    return got[0, 0, :, :n].double(), raw, dp


def _estimate_scale(weights, raw, allowed) -> float | None:
    """The factor c with weights = softmax(c * raw) on the allowed keys, if there is one."""
    xs, ys = [], []
    for r in range(weights.shape[0]):
        keys = allowed[r] & (weights[r] > 0)
        if int(keys.sum()) < 2:
            continue
        x = raw[r, keys]
        y = torch.log(weights[r, keys])
        xs.append(x - x.mean())
        ys.append(y - y.mean())
    if not xs:
        return None
    x, y = torch.cat(xs), torch.cat(ys)
    c = float((x * y).sum() / (x * x).sum())
    return c if float((y - c * x).abs().max()) < 1e-3 * max(1.0, float(y.abs().max())) else None


def _scale_diagnosis(c: float, dp: int, n: int, block: int) -> str:
    named = (
        (1.0, "the scores are not scaled at all (scale 1)"),
        (1 / dp, "the scores are divided by d instead of sqrt(d) (or scaled twice, e.g. q and "
                 "s both)"),
        (math.sqrt(dp), "the scores are multiplied by sqrt(d) instead of divided by it"),
        (1 / math.sqrt(n), "the scores are divided by sqrt(N), the sequence length, instead of "
                           "sqrt(d), the head dimension"),
        (1 / math.sqrt(block), "the scores are divided by sqrt(block_size) instead of sqrt(d)"),
    )
    for value, text in named:
        if abs(c - value) <= 1e-3 * value:
            return text
    return f"the scores are scaled by {c:.4g} instead of 1/sqrt(d)"


def _diagnose_weights(student_fn, n: int, block: int, causal: bool, label: str) -> None:
    """Read the student's attention weights and name what is wrong with them."""
    probe = _weights_probe(student_fn, n, block, causal)
    if probe is None:
        return
    weights, raw, dp = probe
    allowed = _visible(n, causal)
    where = f"{label} (read through one-hot values v, N={n}, d={dp})"
    bad_rows = [r for r in range(n) if not bool(torch.isfinite(weights[r]).all())]
    if bad_rows:
        first = list(range(min(block, n)))
        common = (f"{where}: query rows {_ranges(bad_rows)} came out nan: they saw no key at all "
                  "(every score -inf, or no key block visited), so ell stayed 0 and o / ell = "
                  "0 / 0.")
        if len(bad_rows) == n and not causal:
            fail(common + f" With block_size={block} and N={n} the key loop ran no key block "
                 "(an empty key loop).",
                 "loop over range(0, N, block_size): it runs once even when block_size > N, and "
                 "its last block may be shorter.")
        if causal and set(first) <= set(bad_rows):
            fail(common + " The first query block's key loop is empty: with causal=True it "
                 "stopped before the diagonal block.",
                 "for the query block starting at i, run the key loop up to and including the "
                 "diagonal block: range(0, min(N, i + rows), block_size), not range(0, i, ...).")
        if causal and bool((weights.diagonal()[~torch.isnan(weights.diagonal())] == 0).all()):
            fail(common + " Query 0 is a fully masked row: your causal mask also hides key j == "
                 "i (the diagonal).",
                 "query i sees keys j <= i: mask only where k_pos > q_pos.")
        fail(common + " These rows are fully masked or their key loop is empty.",
             "every query must see at least key 0 (causal) or all keys: check the key loop's "
             "range and the mask condition k_pos > q_pos.")
    want = torch.softmax(raw / math.sqrt(dp) + torch.where(allowed, 0.0, _NEG_INF), dim=-1)
    if _close(weights, want, 1e-5):
        return
    seen = weights != 0
    extra = seen & ~allowed
    missing = allowed & ~seen
    if bool(extra.any()):
        pairs = extra.nonzero().tolist()
        if bool((extra == ~_visible(n, True)).all()):
            fail(f"{where}: every query attends to future keys: the causal mask is ignored.",
                 "query i may only see keys j <= i: skip the key blocks after the diagonal block "
                 "and mask s with -inf where k_pos > q_pos.")
        if all(j == i + 1 for i, j in pairs):
            fail(f"{where}: query i also sees key i + 1: the causal mask is off by one.",
                 "mask where k_pos > q_pos (keep j == i, hide j == i + 1).")
        if all(i // block == j // block for i, j in pairs):
            fail(f"{where}: queries see later keys of their own diagonal tile: the tiles on the "
                 "diagonal are not masked.",
                 "in a tile that crosses the diagonal, set s to -inf where k_pos > q_pos (use "
                 "the tile's absolute positions i + row, j + col).")
        fail(f"{where}: {len(pairs)} (query, key) pairs with key > query get weight, e.g. "
             f"{pairs[:4]}: the mask is misplaced.",
             "build the mask from absolute positions: q_pos = arange(i, i + rows)[:, None], "
             "k_pos = arange(j, j + cols)[None, :], mask where k_pos > q_pos.")
    if bool(missing.any()):
        keys = sorted({j for _, j in missing.nonzero().tolist()})
        last = n // block * block
        diag = bool((missing == (torch.eye(n, dtype=torch.bool) & allowed)).all())
        if diag:
            fail(f"{where}: no query sees its own key (j == i): the causal mask also hides the "
                 "diagonal.", "mask only where k_pos > q_pos, not k_pos >= q_pos.")
        if last < n and keys == list(range(last, n)):
            fail(f"{where}: keys {_ranges(keys)}, the last (shorter) key block, are never seen: "
                 "the key loop drops the partial last block.",
                 "loop over range(0, N, block_size) and slice k[:, :, j : j + block_size]: the "
                 "slice is shorter for the last block.")
        if causal:
            diag_tile = allowed & torch.tensor([[i // block == j // block for j in range(n)]
                                                for i in range(n)])
            if bool((missing == diag_tile).all()):
                fail(f"{where}: no query sees the keys of its own (diagonal) block: the causal "
                     "key loop stops one block early.",
                     "run the key loop up to and including the diagonal block: range(0, min(N, i "
                     "+ rows), block_size).")
            if all(j < (i // block) * block for i, j in missing.nonzero().tolist()):
                fail(f"{where}: queries never see the keys before their own block: the key loop "
                     "starts at the query block instead of 0.",
                     "every query block's key loop starts at key 0: range(0, k_stop, block_size).")
        fail(f"{where}: keys {_ranges(keys)} are never seen by queries that should see them.",
             "check the key loop's bounds: range(0, N, block_size) (causal: up to and including "
             "the diagonal block) and that every tile is folded in with online_softmax_update.")
    sums = weights.sum(-1)
    if not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-6)):
        ratio = weights / want
        if bool(torch.allclose(ratio[allowed], (ratio.nan_to_num(0).amax(-1, keepdim=True)
                                                .expand_as(ratio))[allowed], rtol=1e-5)):
            fail(f"{where}: each row's weights are the right ones times a constant (row sums "
                 f"{sums[:3].tolist()}...): the output is not normalised.",
                 "after the last key block divide the running output by the running sum: "
                 "o / ell[..., None].")
    c = _estimate_scale(weights, raw, allowed)
    if c is not None and abs(c * math.sqrt(dp) - 1) > 1e-4:
        fail(f"{where}: the weights are softmax(c * q k^T) with c = {c:.4g}, but the softmax "
             f"scale is 1/sqrt(d) = {1 / math.sqrt(dp):.4g}: {_scale_diagnosis(c, dp, n, block)}.",
             "scale the scores by 1/sqrt(d), d = q.shape[-1] (the head dimension), once: e.g. "
             "q_i = q[:, :, i : i + block_size] / math.sqrt(d).")
    err = (weights - want).abs().max().item()
    fail(f"{where}: the attention weights differ from softmax(q k^T / sqrt(d)) (max abs error "
         f"{err:.3g}) although every row sees the right keys.",
         "check the online-softmax update (run its check cell again) and that each query block "
         "starts from m = -inf, ell = 0, o = 0.")


def _underflow(got, q, k, causal: bool, label: str) -> None:
    """Fail if the output is inf/nan exactly in the rows whose visible scores are all << 0."""
    if _finite(got):
        return
    n, d = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~_visible(n, causal), _NEG_INF)
    row_max = scores.amax(-1)  # (B, H, N)
    bad = ~torch.isfinite(got).all(-1)
    if bool((row_max[bad] < -80).all()) and bool((row_max[~bad] > -80).all()):
        fail(f"{label}: the output has inf/nan exactly in the rows whose scores are all far "
             "below 0 (here about -1e4): exp(s - m) underflowed to 0 there, so ell = 0. The "
             "running max did not start at -inf.",
             "start each query block with m = torch.full(..., float('-inf')) (not 0), "
             "ell = 0 and o = 0.")


def _diagnose_tiled(student_fn, got, q, k, v, block: int, causal: bool, label: str) -> None:
    want = naive_attention(q, k, v, causal)
    if _finite(got) and _close(got, want):
        return
    n, d = q.shape[-2], q.shape[-1]
    _underflow(got, q, k, causal, label)
    if causal and _close(got, naive_attention(q, k, v, False)):
        fail(f"{label}: the output equals NON-causal attention: the causal mask is ignored.",
             "query i may only see keys j <= i: skip the key blocks after the diagonal block and "
             "mask s with -inf where k_pos > q_pos.")
    if not causal and _close(got, naive_attention(q, k, v, True)):
        fail(f"{label}: with causal=False the output is causal.",
             "apply the mask (and the block skipping) only when causal=True.")
    if _finite(got) and _close(got, naive_attention(q, k, v, causal, scale=1.0)):
        fail(f"{label}: the scores are not scaled.",
             f"multiply q @ k^T by 1/sqrt(d) = {1 / math.sqrt(d):.4f}, d = q.shape[-1].")
    _diagnose_weights(student_fn, n, block, causal, label)
    err = (got - want).abs().max().item()
    fail(f"{label}: max abs error {err:.3g} against standard attention, although the attention "
         "weights are right.",
         "the output must be (weights) @ v: check how o accumulates p @ v_block and which rows of "
         "out each query block writes.")


_CASES = (  # (batch, heads, N, d, block_size)
    (1, 1, 8, 4, 4),  # N a multiple of the block
    (2, 3, 50, 16, 16),  # a partial last block
    (1, 2, 37, 8, 8),
    (1, 1, 5, 8, 8),  # block_size > N
    (1, 2, 20, 12, 7),
    (1, 1, 6, 3, 1),  # 1 x 1 tiles
)


@check("nb04_tiled_attention", forbid=_TILED_FORBID)
def check_tiled_attention(student_fn: Callable[..., Any]) -> None:
    """``my_tiled_attention(q, k, v, block_size, causal) -> (B, H, N, d)``.

    Compared with standard attention (fp32, max abs error <= 1e-5) for N a multiple of the block
    size or not, block_size > N and block_size 1, several head dims, causal and not; stable for
    large and for very negative logits; it must use tiles of block_size, its peak memory must
    stay far below the N x N score matrix, and with ``causal=True`` it must skip the tiles above
    the diagonal.
    """
    with torch.random.fork_rng(devices=[]), torch_threads(1):  # tiny ops: one thread is fastest
        torch.manual_seed(0)
        for causal in (False, True):
            for batch, heads, n, d, block in _CASES:
                q, k, v = _qkv(batch, heads, n, d, seed=n + d)
                label = (f"{_TILED} with q of shape {(batch, heads, n, d)}, block_size={block}, "
                         f"causal={causal}")
                got = call_student(student_fn, q.clone(), k.clone(), v.clone(), block, causal,
                                   what=_TILED, explain=_tiled_hint)
                expect(got is not None, f"{label} returned None.", "return the output tensor.")
                expect(isinstance(got, torch.Tensor),
                       f"{label} returned a {type(got).__name__}.", "return a torch.Tensor.")
                expect(tuple(got.shape) == (batch, heads, n, d),
                       f"{label} returned shape {tuple(got.shape)}, expected "
                       f"{(batch, heads, n, d)}.",
                       "out has q's shape; every query block (the last one may be shorter) "
                       "writes its rows out[:, :, i : i + rows].")
                _diagnose_tiled(student_fn, got, q, k, v, block, causal, label)

        # Large logits (around 1e4) must not overflow; very negative ones must not underflow.
        for gain, sign, what in ((60.0, 1.0, "scores around 1e4"),
                                 (60.0, -1.0, "scores all around -1e4")):
            q, k, v = _qkv(1, 2, 24, 16, seed=5, gain=gain)
            if sign < 0:
                q, k = q.abs(), -k.abs()
            label = f"{_TILED} with {what}"
            got = call_student(student_fn, q, k, v, 8, True, what=_TILED, explain=_tiled_hint)
            expect(isinstance(got, torch.Tensor) and got.shape == q.shape,
                   f"{label} returned {type(got).__name__}.", "return a (B, H, N, d) tensor.")
            _underflow(got, q, k, True, label)
            if sign > 0 and not _finite(got):
                fail(f"{label}: the output has inf/nan: exp overflowed.",
                     "subtract the running max before exp (your online_softmax_update does "
                     "that: p = exp(s - m_new[..., None])).")
            _diagnose_tiled(student_fn, got, q, k, v, 8, True, label)

        # Tiles of block_size: record the shapes of the score products.
        n, d, block = 96, 24, 16
        q, k, v = _qkv(1, 1, n, d, seed=8)
        products = _Products()
        with products:
            call_student(student_fn, q, k, v, block, False, what=_TILED)
        tiles = [s for s in products.shapes if len(s) >= 2 and s[-1] != d]
        if tiles:
            rows, cols = max(s[-2] for s in tiles), max(s[-1] for s in tiles)
            expect(
                (rows, cols) == (block, block) or cols == n,
                f"{_TILED} with N={n}, block_size={block} computes score tiles of up to {rows} x "
                f"{cols}: the loops ignore block_size (a hard-coded block size?).",
                "slice the query and key blocks with the block_size argument: "
                "q[:, :, i : i + block_size], k[:, :, j : j + block_size].",
            )

        # Memory: one tile at a time, never the N x N matrix.
        n, block = 1024, 64
        q, k, v = _qkv(1, 2, n, 32, seed=6)
        full = 2 * n * n * 4  # one (B, H, N, N) fp32 score matrix
        products = _Products()
        with products:
            used = peak_memory(lambda: call_student(student_fn, q, k, v, block, False,
                                                    what=_TILED))
        widest = max((s[-1] for s in products.shapes if len(s) >= 2 and s[-1] != 32), default=0)
        if used >= full / 8 or widest == n:
            against_all = widest == n and any(s[-2] < n for s in products.shapes
                                              if len(s) >= 2 and s[-1] == n)
            fail(f"{_TILED} with N={n}, block_size={block} allocated "
                 f"{format_bytes(used, 'binary')} at its peak; the full N x N score matrix is "
                 f"{format_bytes(full, 'binary')}, and a tiled version needs well under "
                 f"{format_bytes(full // 8, 'binary')}."
                 + (" Each query block's scores are computed against all N keys at once (not "
                    "against all keys: one key block at a time)." if against_all else
                    " It materialises the full N x N score matrix."),
                 "hold only one (block_size x block_size) tile of scores at a time: inside the "
                 "inner loop, compute s for one query block against one key block and fold it "
                 "in with online_softmax_update.")

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
            f"matmul work; skipping the tiles above the diagonal leaves {expected:.0%}.",
            "for a query block starting at i, stop the key loop after the block that holds key "
            "i + rows - 1 (the tiles above the diagonal are all -inf: skip them, do not mask "
            "them).",
        )


def _tiled_hint(exc: BaseException) -> str | None:
    hint = _broadcast_hint(exc)
    if hint is None:
        return None
    return ("shapes inside the loop: q_i (B, H, rows, d), k_j (B, H, cols, d), s = q_i @ "
            "k_j.transpose(-2, -1) is (B, H, rows, cols); m and ell are (B, H, rows), o is (B, "
            "H, rows, d); the last block may be shorter than block_size. " + hint)
