"""Tests of course_lib.utils.flash_attention: every path against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import course_lib
from course_lib.utils import flash_attention as fa
from course_lib.utils.benchmark import growth_exponent, peak_memory, torch_threads
from course_lib.utils.flash_attention import (
    attention_backend,
    attention_hbm_accesses,
    attention_memory_bytes,
    causal_mask,
    default_backend,
    flash_attention_forward,
    naive_attention,
    online_softmax_update,
    sdpa_backend_support,
    sdpa_backends,
    sdpa_selected_backend,
    tiled_attention,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------
# An independent float64 reference: row by row, explicit index rule for causal.
# --------------------------------------------------------------------------------------------


def reference(q, k, v, causal=True, attn_mask=None, scale=None):
    """(out, lse) in float64; fully masked rows give 0 and -inf; bottom-right causal."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    scores = torch.einsum("bhld,bhsd->bhls", q64, k64) * scale
    allowed = torch.ones(batch, heads, q_len, k_len, dtype=torch.bool)
    if causal:  # query i sees key j iff j <= i + (S - L)
        i = torch.arange(q_len).view(q_len, 1)
        j = torch.arange(k_len).view(1, k_len)
        allowed = allowed & (j <= i + (k_len - q_len))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1))
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with lse = -inf
    return weights @ v64, lse


def make_qkv(batch, heads, q_len, k_len, head_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, heads, k_len, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, k_len, head_dim, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


PATHS = {
    "naive": lambda *a, **kw: naive_attention(*a, **kw),
    "tiled_small_blocks": lambda *a, **kw: tiled_attention(*a, block_q=8, block_k=16, **kw),
    "tiled_default": lambda *a, **kw: tiled_attention(*a, **kw),
    "sdpa_auto": lambda *a, **kw: flash_attention_forward(*a, **kw),
    "sdpa_math": lambda *a, **kw: flash_attention_forward(*a, backend="math", **kw),
    "forced_naive": lambda *a, **kw: flash_attention_forward(*a, backend="naive", **kw),
    "forced_tiled": lambda *a, **kw: flash_attention_forward(*a, backend="tiled", **kw),
}
if sdpa_backends()["flash"] and not CUDA:  # PyTorch's fused CPU kernel
    PATHS["sdpa_flash_cpu"] = lambda *a, **kw: flash_attention_forward(*a, backend="flash", **kw)

SHAPES = [
    # (batch, heads, q_len, k_len, head_dim)
    (2, 3, 17, 17, 16),  # odd length, L == S
    (1, 2, 5, 33, 32),  # L < S (a decoding step against a cache)
    (1, 2, 33, 5, 64),  # L > S (the first L - S queries see nothing when causal)
    (2, 1, 40, 23, 128),
    (1, 1, 1, 1, 16),
    (1, 2, 64, 64, 80),  # head_dim not a power of two
]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_all_paths_match_float64_reference(path, shape, causal):
    q, k, v = make_qkv(*shape)
    expected, _ = reference(q, k, v, causal)
    got = PATHS[path](q, k, v, causal=causal)
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def masks_for(batch, heads, q_len, k_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, 1, q_len, k_len, generator=g) > 0.3
    keep[:, :, 0] = False  # one query row that may attend to nothing
    additive = torch.randn(q_len, k_len, generator=g)
    additive[1, :3] = float("-inf")
    return {"bool_with_empty_row": keep, "float_broadcast_2d": additive}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_kind", ["bool_with_empty_row", "float_broadcast_2d"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [(19, 19), (9, 26), (26, 9)])
def test_all_paths_match_reference_with_masks(path, mask_kind, causal, lengths):
    q_len, k_len = lengths
    q, k, v = make_qkv(2, 2, q_len, k_len, 16)
    mask = masks_for(2, 2, q_len, k_len)[mask_kind]
    expected, _ = reference(q, k, v, causal, mask)
    got = PATHS[path](q, k, v, causal=causal, attn_mask=mask)
    assert torch.isfinite(got).all(), "fully masked rows must give zeros, not NaN"
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", list(PATHS))
def test_float64_inputs_are_exact(path):
    q, k, v = make_qkv(1, 2, 21, 30, 24, dtype=torch.float64)
    expected, _ = reference(q, k, v, True)
    got = PATHS[path](q, k, v, causal=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("blocks", [(1, 1), (5, 7), (7, 5), (3, 64), (64, 3), (4096, 4096)])
@pytest.mark.parametrize("lengths", [(26, 9), (9, 26), (23, 23)])
def test_tiled_block_sizes_do_not_change_the_result(blocks, lengths):
    q, k, v = make_qkv(1, 2, *lengths, 8, dtype=torch.float64)
    mask = masks_for(1, 2, *lengths)["bool_with_empty_row"]
    for causal in (True, False):
        for attn_mask in (None, mask):
            expected, expected_lse = reference(q, k, v, causal, attn_mask)
            out, lse = tiled_attention(q, k, v, causal, attn_mask, block_q=blocks[0],
                                       block_k=blocks[1], return_lse=True)
            torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(lse, expected_lse, atol=1e-12, rtol=1e-12)


def test_tiled_matches_naive_within_1e_5_in_fp32():
    q, k, v = make_qkv(2, 4, 300, 300, 64, seed=3)
    for causal in (True, False):
        diff = (tiled_attention(q, k, v, causal) - naive_attention(q, k, v, causal)).abs().max()
        assert diff <= 1e-5


def test_causal_convention_is_bottom_right_everywhere():
    assert fa.CAUSAL_ALIGNMENT == "bottom-right"
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(3, 2).tolist() == [[False, False], [True, False], [True, True]]
    q, k, v = make_qkv(1, 2, 4, 11, 16)
    expected, _ = reference(q, k, v, True)
    for path in PATHS.values():
        torch.testing.assert_close(path(q, k, v, causal=True).double(), expected,
                                   atol=1e-5, rtol=1e-5)
    # SDPA's own is_causal=True aligns top-left: a different answer when L != S.
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(top_left, flash_attention_forward(q, k, v), atol=1e-3)


def test_fully_masked_rows_are_zero_and_lse_minus_inf_like_sdpa():
    q, k, v = make_qkv(1, 2, 6, 3, 8)  # causal, L > S: rows 0..2 see no key
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(6, 3))
    for name, path in PATHS.items():
        out = path(q, k, v, causal=True)
        assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3])), name
        torch.testing.assert_close(out, sdpa, atol=1e-6, rtol=1e-6)
    _, lse = tiled_attention(q, k, v, causal=True, block_q=2, block_k=2, return_lse=True)
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()


def test_empty_rows_are_zeroed_even_if_an_sdpa_kernel_returns_nan(monkeypatch):
    real = F.scaled_dot_product_attention

    def nan_on_empty_rows(q, k, v, attn_mask=None, **kwargs):
        out = real(q, k, v, attn_mask=attn_mask, **kwargs)
        empty = ~attn_mask.any(dim=-1, keepdim=True)  # what some CUDA kernels do there
        return out.masked_fill(empty, float("nan"))

    monkeypatch.setattr(fa.F, "scaled_dot_product_attention", nan_on_empty_rows)
    q, k, v = make_qkv(1, 2, 7, 4, 8)  # causal, L > S: rows 0..2 see no key
    expected, _ = reference(q, k, v, True)
    torch.testing.assert_close(flash_attention_forward(q, k, v).double(), expected,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_lse_matches_reference(causal):
    q, k, v = make_qkv(2, 2, 37, 29, 32)
    mask = masks_for(2, 2, 37, 29)["bool_with_empty_row"]
    _, expected = reference(q, k, v, causal, mask)
    for fn in (tiled_attention, naive_attention):
        out, lse = fn(q, k, v, causal, mask, return_lse=True)
        assert lse.shape == (2, 2, 37)
        torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)
    _, lse_small = tiled_attention(q, k, v, causal, mask, block_q=4, block_k=5, return_lse=True)
    torch.testing.assert_close(lse_small.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_inputs(dtype, tol):
    q, k, v = make_qkv(1, 2, 70, 70, 64, dtype=dtype, seed=4)
    expected, _ = reference(q, k, v, True)
    for name, path in PATHS.items():
        got = path(q, k, v, causal=True)
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_accumulates_half_inputs_in_fp32(dtype):
    q, k, v = make_qkv(1, 2, 96, 96, 32, dtype=dtype, seed=5)
    out, lse = tiled_attention(q, k, v, block_q=16, block_k=16, return_lse=True)
    out32, lse32 = tiled_attention(q.float(), k.float(), v.float(), block_q=16, block_k=16,
                                   return_lse=True)
    assert lse.dtype == torch.float32
    assert torch.equal(out, out32.to(dtype)), "the half path must compute exactly as fp32 does"
    assert torch.equal(lse, lse32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_do_not_overflow(dtype):
    # Scores around 1e4: exp(1e4) overflows any float; every path must subtract the max.
    q, k, v = make_qkv(1, 2, 40, 40, 16, seed=6)
    q = q * 100.0
    k = k * 100.0
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() > 1e4
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    expected, _ = reference(q, k, v, True, scale=1.0)
    for name, path in PATHS.items():
        if dtype == torch.float16 and name.startswith("sdpa"):
            continue  # fp16 SDPA on CPU computes the 1e4-sized scores in fp16 itself
        got = path(q, k, v, causal=True, scale=1.0)
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=1e-3, msg=name)
    _, lse = tiled_attention(q, k, v, causal=True, scale=1.0, return_lse=True)
    assert torch.isfinite(lse).all() and lse.abs().max() > 1e3


class _CountMatmuls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__matmul__", "matmul"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_causal_tiled_skips_blocks_above_the_diagonal():
    q, k, v = make_qkv(1, 1, 64, 64, 8)
    counts = {}
    for causal in (False, True):
        with _CountMatmuls() as mode:
            tiled_attention(q, k, v, causal, block_q=16, block_k=16)
        counts[causal] = mode.count
    # 4 x 4 tiles without causal; 1 + 2 + 3 + 4 tiles with causal; two matmuls per tile.
    assert counts == {False: 2 * 16, True: 2 * 10}


def test_tiled_peak_memory_grows_linearly_and_naive_quadratically():
    sizes = [256, 512, 1024, 2048]
    tiled, naive = [], []
    for n in sizes:
        q, k, v = make_qkv(1, 2, n, n, 32)
        with torch_threads(1):  # many small ops: one thread is fastest on a shared machine
            tiled.append(peak_memory(lambda q=q, k=k, v=v: tiled_attention(q, k, v, block_q=64,
                                                                           block_k=64)))
        naive.append(peak_memory(lambda q=q, k=k, v=v: naive_attention(q, k, v)))
    # peak = constant (one tile) + c * N: each doubling of N adds twice the previous increment.
    steps = [b - a for a, b in zip(tiled, tiled[1:])]
    assert all(1.8 <= b / a <= 2.2 for a, b in zip(steps, steps[1:])), tiled
    assert growth_exponent(sizes, tiled) <= 1.1, tiled
    # naive: dominated by the N x N matrices, each doubling of N about quadruples the peak.
    assert growth_exponent(sizes, naive) >= 1.8, naive
    assert all(3.5 <= b / a <= 4.5 for a, b in zip(naive, naive[1:])), naive
    assert tiled[-1] <= 0.05 * naive[-1]
    # The output alone is 2 * n * 32 * 4 bytes: tiled needs only a small multiple of it.
    assert tiled[-1] <= 3 * (2 * sizes[-1] * 32 * 4)


# --------------------------------------------------------------------------------------------
# online_softmax_update
# --------------------------------------------------------------------------------------------


def test_online_softmax_update_over_a_stream_of_blocks_equals_softmax():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50, dtype=torch.float64) * 20  # (heads, rows, keys)
    values = torch.randn(2, 50, 4, dtype=torch.float64)
    m = torch.full((2, 3), float("-inf"), dtype=torch.float64)
    ell = torch.zeros(2, 3, dtype=torch.float64)
    o = torch.zeros(2, 3, 4, dtype=torch.float64)
    for start in range(0, 50, 7):
        m, ell, o = online_softmax_update(m, ell, o, x[..., start : start + 7],
                                          values[:, start : start + 7])
        seen = x[..., : start + 7]
        torch.testing.assert_close(m, seen.amax(-1))
        torch.testing.assert_close(ell, torch.exp(seen - m.unsqueeze(-1)).sum(-1))
    torch.testing.assert_close(o / ell.unsqueeze(-1), torch.softmax(x, -1) @ values)
    torch.testing.assert_close(m + torch.log(ell), torch.logsumexp(x, -1))


def test_online_softmax_update_keeps_all_masked_rows_at_zero():
    block = torch.tensor([[float("-inf"), float("-inf")], [1.0, 2.0]])
    v = torch.ones(2, 3)
    m, ell, o = online_softmax_update(torch.full((2,), float("-inf")), torch.zeros(2),
                                      torch.zeros(2, 3), block, v)
    assert torch.isneginf(m[0]) and ell[0] == 0 and torch.equal(o[0], torch.zeros(3))
    assert not any(t.isnan().any() for t in (m, ell, o))
    # a later block with real scores takes over from -inf without NaN
    m, ell, o = online_softmax_update(m, ell, o, torch.tensor([[0.0, 0.0], [0.0, 0.0]]), v)
    torch.testing.assert_close(o[0] / ell[0], torch.ones(3))


def test_online_softmax_update_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="m and ell must have shape"):
        online_softmax_update(torch.zeros(3), torch.zeros(2), torch.zeros(2, 4),
                              torch.zeros(2, 5), torch.zeros(5, 4))


def test_online_softmax_update_dropout_is_applied_after_the_sum():
    scores, v = torch.zeros(4, 1000), torch.ones(1000, 1)
    start = (torch.full((4,), float("-inf")), torch.zeros(4), torch.zeros(4, 1))
    torch.manual_seed(0)
    m, ell, o = online_softmax_update(*start, scores, v, dropout_p=0.5)
    assert torch.equal(ell, torch.full((4,), 1000.0))  # every probability counts in ell
    kept = o.squeeze(-1) / 2.0  # kept entries are scaled by 1 / (1 - p) = 2
    assert ((kept > 400) & (kept < 600)).all() and not torch.equal(kept, torch.full((4,), 500.0))


# --------------------------------------------------------------------------------------------
# Autograd, dropout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [naive_attention, tiled_attention], ids=["naive", "tiled"])
def test_manual_paths_pass_gradcheck(fn):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 6, 9, 4, dtype=torch.float64))
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(2)) > 0.2

    def f(q, k, v):
        return fn(q, k, v, True, mask) if fn is naive_attention else fn(
            q, k, v, True, mask, block_q=4, block_k=4
        )

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", ["auto", "math", "naive", "tiled"])
@pytest.mark.parametrize("lengths", [(24, 24), (8, 24), (24, 8)])
def test_gradients_flow_and_agree_with_reference(backend, lengths):
    q, k, v = make_qkv(2, 2, *lengths, 16)
    params = [t.clone().requires_grad_() for t in (q, k, v)]
    flash_attention_forward(*params, causal=True, backend=backend).square().sum().backward()
    ref = [t.clone().double().requires_grad_() for t in (q, k, v)]
    reference(*ref, causal=True)[0].square().sum().backward()
    for got, want in zip(params, ref):
        assert got.grad is not None
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "naive", "tiled"])
def test_dropout_rescales_kept_probabilities(backend):
    q, k, _ = make_qkv(1, 4, 256, 256, 16)
    v = torch.ones(1, 4, 256, 16)
    torch.manual_seed(0)
    a = flash_attention_forward(q, k, v, False, dropout_p=0.5, backend=backend)
    torch.manual_seed(0)
    b = flash_attention_forward(q, k, v, False, dropout_p=0.5, backend=backend)
    assert torch.equal(a, b), "seeded dropout must be reproducible"
    # softmax rows sum to 1, so with v = 1 each output is sum(kept p) / (1 - p): mean 1.
    assert not torch.allclose(a, torch.ones_like(a))
    assert abs(a.mean().item() - 1.0) < 0.05
    no_drop = flash_attention_forward(q, k, v, False, dropout_p=0.0, backend=backend)
    torch.testing.assert_close(no_drop, torch.ones_like(no_drop))


# --------------------------------------------------------------------------------------------
# Backends, fallback, re-export
# --------------------------------------------------------------------------------------------


def test_reexported_from_course_lib():
    assert course_lib.flash_attention_forward is flash_attention_forward


def test_backend_listing_and_support_report():
    listing = sdpa_backends()
    assert set(listing) == {"flash", "efficient", "math", "cudnn"}
    assert listing["math"] is True
    q, k, v = make_qkv(1, 2, 16, 16, 16)
    support = sdpa_backend_support(q, k, v)
    assert set(support) == set(listing) and support["math"] == "ok"
    assert sdpa_selected_backend(q, k, v) in {"flash", "efficient", "math", "cudnn", "unknown"}
    if not CUDA:
        assert support["efficient"] != "ok" and support["cudnn"] != "ok"
        assert support["flash"] == "ok"  # the fused CPU kernel
        assert sdpa_selected_backend(q, k, v) == "flash"
        assert sdpa_selected_backend(q, k, v, dropout_p=0.1) == "math"


@pytest.mark.skipif(CUDA, reason="CPU builds have no memory-efficient kernel")
def test_unavailable_backend_raises_with_explanation():
    q, k, v = make_qkv(1, 2, 8, 8, 16)
    with pytest.raises(fa.SDPAKernelError, match="SDPA backend 'efficient' cannot run") as info:
        flash_attention_forward(q, k, v, backend="efficient")
    assert isinstance(info.value, RuntimeError) and info.value.backend == "efficient"
    assert "exists only for CUDA tensors" in info.value.reason
    assert "CUDA only" in str(info.value) and "dtype torch.float32" in str(info.value)


def test_attention_backend_context_switches_the_default(monkeypatch):
    calls = []
    real = fa.tiled_attention
    monkeypatch.setattr(fa, "tiled_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv(1, 1, 8, 8, 8)
    with attention_backend("tiled"):
        flash_attention_forward(q, k, v)
    flash_attention_forward(q, k, v)
    assert calls == [1]
    with pytest.raises(ValueError, match="backend must be one of"):
        with attention_backend("fastest"):
            pass


def test_default_backend_follows_the_context():
    assert default_backend() == "auto"
    with attention_backend("naive"):
        assert default_backend() == "naive"
        with attention_backend("tiled"):
            assert default_backend() == "tiled"
        assert default_backend() == "naive"
    assert default_backend() == "auto"


def test_step_3_falls_back_to_standard_attention_without_sdpa(monkeypatch):
    monkeypatch.delattr(F, "scaled_dot_product_attention")
    assert not fa.sdpa_available()
    q, k, v = make_qkv(1, 2, 9, 12, 16)
    expected, _ = reference(q, k, v, True)
    for backend in ("auto", "math"):
        with pytest.warns(RuntimeWarning, match="no F.scaled_dot_product_attention.*standard"):
            out = flash_attention_forward(q, k, v, backend=backend)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(CUDA, reason="on CUDA the memory-efficient kernel accepts these inputs")
def test_step_3_falls_back_when_no_enabled_kernel_accepts_the_inputs():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = make_qkv(1, 2, 10, 10, 16)
    expected, _ = reference(q, k, v, True)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # CPU builds have no such kernel
        with pytest.warns(RuntimeWarning, match="no SDPA kernel accepts these inputs"):
            out = flash_attention_forward(q, k, v)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_running_out_of_memory_is_not_a_reason_to_fall_back(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(fa.F, "scaled_dot_product_attention", out_of_memory)
    q, k, v = make_qkv(1, 1, 4, 4, 8)
    for backend in ("auto", "math"):  # neither a fallback nor an SDPAKernelError
        with pytest.raises(torch.OutOfMemoryError):
            flash_attention_forward(q, k, v, backend=backend)


@pytest.mark.skipif(CUDA, reason="checks the reason PyTorch's CPU flash kernel gives")
def test_support_report_quotes_pytorchs_reason_without_printing_it(recwarn):
    q, k, v = make_qkv(1, 2, 16, 16, 16)
    support = sdpa_backend_support(q, k, v, dropout_p=0.1)
    assert support["math"] == "ok"
    assert "dropout" in support["flash"] and "Triggered internally" not in support["flash"]
    assert not recwarn.list  # collected, not shown


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

_Q, _K, _V = make_qkv(1, 2, 4, 4, 8)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"q": _Q[0]}, ValueError, "q must have 4 dimensions"),
        ({"k": _K[:, :1]}, ValueError, "num_heads differ"),
        ({"v": _V[..., :4]}, ValueError, "head_dim differs"),
        ({"v": _V[:, :, :3]}, ValueError, "k and v must have the same seq_len"),
        ({"k": torch.randn(2, 2, 4, 8), "v": torch.randn(2, 2, 4, 8)}, ValueError, "batch"),
        ({"q": _Q.long()}, TypeError, "q must be float16, bfloat16, float32 or float64"),
        ({"q": _Q.double()}, TypeError, "share one dtype"),
        ({"q": _Q.numpy()}, TypeError, "q must be a torch.Tensor"),
        ({"attn_mask": torch.ones(3, 4, dtype=torch.bool)}, ValueError, "does not broadcast"),
        ({"attn_mask": torch.ones(4, 4, dtype=torch.int64)}, TypeError, "attn_mask must be bool"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\)"),
        ({"dropout_p": "0.1"}, TypeError, "dropout_p"),
        ({"scale": -1.0}, ValueError, "scale must be a number > 0"),
        ({"scale": "1"}, TypeError, "scale must be a number > 0"),
        ({"attn_mask": [[True]]}, TypeError, "attn_mask must be a torch.Tensor or None"),
        ({"causal": 1}, TypeError, "causal must be True or False"),
        ({"backend": "fast"}, ValueError, "backend must be one of"),
        ({"q": torch.randn(1, 2, 0, 8)}, ValueError, "empty input"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(kwargs, error, match):
    args = {"q": _Q, "k": _K, "v": _V, **kwargs}
    with pytest.raises(error, match=match):
        flash_attention_forward(**args)
    if "backend" not in kwargs:
        for fn in (naive_attention, tiled_attention):
            with pytest.raises(error, match=match):
                fn(**args)


# --------------------------------------------------------------------------------------------
# Grouped-query attention (enable_gqa=True, SDPA's keyword)
# --------------------------------------------------------------------------------------------
GQA_SHAPES = [
    # (batch, q heads, kv heads, q_len, k_len, head_dim)
    (2, 4, 2, 9, 9, 16),
    (1, 6, 2, 5, 13, 8),   # L < S
    (1, 9, 3, 12, 7, 16),  # L > S, SmolLM2's 9 query and 3 key/value heads
    (1, 4, 1, 8, 8, 8),    # multi-query attention
]


def make_gqa(batch, q_heads, kv_heads, q_len, k_len, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_matches_sdpa_and_repeated_heads(path, shape, causal):
    q, k, v = make_gqa(*shape)
    groups = q.shape[1] // k.shape[1]
    got = PATHS[path](q, k, v, causal=causal, enable_gqa=True)
    assert got.shape == q.shape
    expected, _ = reference(q, k.repeat_interleave(groups, dim=1),
                            v.repeat_interleave(groups, dim=1), causal)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)
    if not causal or q.shape[2] == k.shape[2]:  # SDPA's own causal aligns top-left
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(got, sdpa, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [naive_attention, tiled_attention])
def test_gqa_with_masks_and_lse(fn):
    q, k, v = make_gqa(2, 4, 2, 6, 10, 8)
    mask = torch.rand(2, 4, 6, 10, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0, 1, 2] = False  # a row that sees no key
    out, lse = fn(q, k, v, False, mask, return_lse=True, enable_gqa=True)
    want, want_lse = reference(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
                               False, mask)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-5)
    assert lse[0, 1, 2] == float("-inf") and out[0, 1, 2].abs().max() == 0


def test_gqa_gradients_match_sdpa():
    q, k, v = (t.requires_grad_() for t in make_gqa(1, 4, 2, 7, 7, 8))
    for backend in ("naive", "tiled", "auto"):
        grads = torch.autograd.grad(
            flash_attention_forward(q, k, v, backend=backend, enable_gqa=True).square().sum(),
            (q, k, v),
        )
        want = torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            .square().sum(), (q, k, v),
        )
        for got_grad, want_grad in zip(grads, want):
            torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def test_gqa_needs_enable_gqa_and_a_head_multiple():
    q, k, v = make_gqa(1, 4, 2, 4, 4, 8)
    for fn in (flash_attention_forward, naive_attention, tiled_attention):
        with pytest.raises(ValueError, match=r"num_heads differ: q 4, k 2, v 2; .*enable_gqa=True"):
            fn(q, k, v)
        with pytest.raises(ValueError, match="multiple of k/v's, got q 4 and k/v 3"):
            fn(q, k[:, :1].expand(1, 3, 4, 8), v[:, :1].expand(1, 3, 4, 8), enable_gqa=True)
        with pytest.raises(ValueError, match="k and v must have the same num_heads"):
            fn(q, k, v[:, :1], enable_gqa=True)
        with pytest.raises(TypeError, match="enable_gqa must be True or False"):
            fn(q, q, q, enable_gqa=1)
    # equal heads: enable_gqa=True changes nothing
    torch.testing.assert_close(naive_attention(q, q, q, enable_gqa=True), naive_attention(q, q, q))


@pytest.mark.parametrize("name", ["block_q", "block_k"])
@pytest.mark.parametrize("value,error", [(0, ValueError), (-4, ValueError), (2.5, TypeError),
                                         (True, TypeError)])
def test_bad_block_sizes(name, value, error):
    with pytest.raises(error, match=f"{name} must be a positive int"):
        tiled_attention(_Q, _K, _V, **{name: value})


def test_bad_flags_and_masks():
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        tiled_attention(_Q, _K, _V, return_lse=1)
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        naive_attention(_Q, _K, _V, return_lse="yes")
    with pytest.raises(ValueError, match="q_len must be a positive int"):
        causal_mask(0, 4)
    with pytest.raises(ValueError, match="q, k and v must be on one device"):
        flash_attention_forward(_Q, _K.to("meta"), _V)


# --------------------------------------------------------------------------------------------
# IO model and memory model
# --------------------------------------------------------------------------------------------


def test_io_model_counts_and_block_sizes():
    io = attention_hbm_accesses(4096, 64, 192 * 1024, bytes_per_element=2)
    assert io.sram_elements == 98304
    assert (io.block_c, io.block_r) == (384, 64)  # Bc = ceil(M / 4d), Br = min(Bc, d)
    assert (io.t_c, io.t_r) == (11, 64)
    assert io.standard == 4 * 4096 * 64 + 4 * 4096**2
    assert io.flash == 2 * 4096 * 64 + 11 * (3 * 4096 * 64 + 4 * 4096)
    assert io.standard_bytes == 2 * io.standard and io.ratio > 5


def test_io_model_scales_as_the_paper_says():
    def flash(n, m):
        return attention_hbm_accesses(n, 64, m * 2).flash

    # Theta(N^2 d^2 / M): doubling N ~ 4x, doubling M ~ 1/2 (once T_c >> 1).
    assert 3.9 < flash(32768, 2**15) / flash(16384, 2**15) < 4.1
    assert 0.45 < flash(32768, 2**16) / flash(32768, 2**15) < 0.55
    # Standard: Theta(N^2) for N >> d.
    io = [attention_hbm_accesses(n, 64, 2**16).standard for n in (16384, 32768)]
    assert 3.9 < io[1] / io[0] < 4.0
    # A bigger SRAM always helps FlashAttention. Its traffic ~12 N^2 d^2 / M only beats the
    # standard ~4 N^2 once M > 3 d^2 elements (24 KiB of fp16 for d = 64).
    ratios = [attention_hbm_accesses(8192, 64, s).ratio for s in (2**14, 2**16, 192 * 1024)]
    assert ratios == sorted(ratios)
    assert ratios[0] < 1 < ratios[1]


def test_io_model_rejects_bad_input():
    with pytest.raises(ValueError, match="fewer than head_dim"):
        attention_hbm_accesses(1024, 128, 128)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        attention_hbm_accesses(0, 64, 1024)


def test_attention_memory_model():
    mem = attention_memory_bytes(1024, batch=2, heads=4, head_dim=64, dtype_bytes=2)
    assert mem["qkvo"] == 4 * 2 * 4 * 1024 * 64 * 2
    assert mem["naive_extra"] == 2 * 2 * 4 * 1024 * 1024 * 2
    assert mem["flash_extra"] == 2 * 4 * 1024 * 4
    assert mem["naive"] == mem["qkvo"] + mem["naive_extra"]
    assert mem["flash"] == mem["qkvo"] + mem["flash_extra"]
    with pytest.raises(ValueError, match="heads must be a positive int"):
        attention_memory_bytes(1024, heads=0)


def test_memory_model_matches_measured_naive_peak():
    q, k, v = make_qkv(1, 2, 512, 512, 32)
    measured = peak_memory(lambda: naive_attention(q, k, v, causal=False))
    model = attention_memory_bytes(512, batch=1, heads=2, head_dim=32, dtype_bytes=4)
    assert 0.95 <= measured / (model["naive_extra"] + model["qkvo"] // 4) <= 1.1


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "flash", "efficient", "math", "tiled", "naive"])
def test_cuda_paths_match_reference(backend):
    q, k, v = (t.cuda() for t in make_qkv(2, 4, 128, 128, 64, dtype=torch.float16))
    if backend != "auto" and backend in fa.SDPA_BACKENDS:
        if sdpa_backend_support(q, k, v)[backend] != "ok":
            pytest.skip(f"{backend} kernel unavailable on this GPU")
    expected, _ = reference(q.cpu(), k.cpu(), v.cpu(), True)
    got = flash_attention_forward(q, k, v, backend=backend)
    assert got.is_cuda and got.dtype == torch.float16
    torch.testing.assert_close(got.cpu().double(), expected, atol=2e-3, rtol=2e-3)


@needs_cuda
def test_cuda_flash_rejects_fp32_with_a_reason():
    q, k, v = (t.cuda() for t in make_qkv(1, 2, 64, 64, 64))
    support = sdpa_backend_support(q, k, v)
    assert support["math"] == "ok" and support["flash"] != "ok"


@needs_cuda
def test_cuda_tiled_memory_is_linear():
    sizes = [1024, 2048, 4096]
    peaks = []
    for n in sizes:
        q, k, v = (t.cuda() for t in make_qkv(1, 4, n, n, 64))
        peaks.append(peak_memory(lambda q=q, k=k, v=v: tiled_attention(q, k, v, block_q=64,
                                                                       block_k=64), "cuda"))
    assert growth_exponent(sizes, peaks) < 1.2
