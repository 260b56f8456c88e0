"""The notebook-04 checks pass on the solution and fail usefully on the stub and typical mistakes."""

from __future__ import annotations

import pytest
import torch

from course_lib.checks.flash_attention import check_online_softmax_update, check_tiled_attention
from course_lib.utils.flash_attention import online_softmax_update as library_update
from course_lib.utils.flash_attention import tiled_attention

OWN_WORK = "the check runs your own implementation: write it instead of calling"

# --------------------------------------------------------------------------------------------
# Online-softmax update: the solution and its typical mistakes
# --------------------------------------------------------------------------------------------


def update_solution(m, l, o, s_block, v_block):  # noqa: E741
    m_new = torch.maximum(m, s_block.max(dim=-1).values)
    p = torch.exp(s_block - m_new[..., None])
    alpha = torch.exp(m - m_new)
    return m_new, alpha * l + p.sum(dim=-1), alpha[..., None] * o + p @ v_block


def update_stub(m, l, o, s_block, v_block):  # noqa: E741
    raise NotImplementedError("Fill-in 'nb04_online_softmax_impl' is not done yet")


def update_no_rescale(m, l, o, s_block, v_block):  # noqa: E741
    m_new = torch.maximum(m, s_block.max(dim=-1).values)
    p = torch.exp(s_block - m_new[..., None])
    return m_new, l + p.sum(dim=-1), o + p @ v_block


def update_rescale_l_only(m, l, o, s_block, v_block):  # noqa: E741
    m_new = torch.maximum(m, s_block.max(dim=-1).values)
    p = torch.exp(s_block - m_new[..., None])
    return m_new, torch.exp(m - m_new) * l + p.sum(dim=-1), o + p @ v_block


def update_rescale_o_only(m, l, o, s_block, v_block):  # noqa: E741
    m_new = torch.maximum(m, s_block.max(dim=-1).values)
    p = torch.exp(s_block - m_new[..., None])
    alpha = torch.exp(m - m_new)
    return m_new, l + p.sum(dim=-1), alpha[..., None] * o + p @ v_block


def update_no_max_subtraction(m, l, o, s_block, v_block):  # noqa: E741
    m_new = torch.maximum(m, s_block.max(dim=-1).values)
    p = torch.exp(s_block)
    return m_new, l + p.sum(dim=-1), o + p @ v_block


def update_alpha_inverted(m, l, o, s_block, v_block):  # noqa: E741
    m_new = torch.maximum(m, s_block.max(dim=-1).values)
    p = torch.exp(s_block - m_new[..., None])
    alpha = torch.exp(m_new - m)
    return m_new, alpha * l + p.sum(dim=-1), alpha[..., None] * o + p @ v_block


def update_no_running_max(m, l, o, s_block, v_block):  # noqa: E741
    m_new = s_block.max(dim=-1).values
    p = torch.exp(s_block - m_new[..., None])
    alpha = torch.exp(m - m_new)
    return m_new, alpha * l + p.sum(dim=-1), alpha[..., None] * o + p @ v_block


def update_block_max_unguarded(m, l, o, s_block, v_block):  # noqa: E741
    # FlashAttention-1's form: right, except that a fully masked block row gives nan.
    m_block = s_block.max(dim=-1).values
    m_new = torch.maximum(m, m_block)
    p = torch.exp(s_block - m_block[..., None])
    beta, alpha = torch.exp(m_block - m_new), torch.exp(m - m_new)
    return (m_new, alpha * l + beta * p.sum(-1),
            alpha[..., None] * o + beta[..., None] * (p @ v_block))


def update_library(m, l, o, s_block, v_block):  # noqa: E741
    return library_update(m, l, o, s_block, v_block)


def update_normalised_too_early(m, l, o, s_block, v_block):  # noqa: E741
    m_new, l_new, o_new = update_solution(m, l, o, s_block, v_block)
    return m_new, l_new, o_new / l_new[..., None]


def update_2d_only(m, l, o, s_block, v_block):  # noqa: E741
    m_new = torch.maximum(m, s_block.max(dim=1).values)
    p = torch.exp(s_block - m_new[:, None])
    alpha = torch.exp(m - m_new)
    return m_new, alpha * l + p.sum(dim=1), alpha[:, None] * o + p @ v_block


def test_update_check_passes_on_solution_and_prints_only_the_pass_line(capsys):
    check_online_softmax_update(update_solution)
    assert capsys.readouterr().out == "CHECK nb04_online_softmax: PASS\n"


def test_update_check_keeps_the_global_random_state():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_online_softmax_update(update_solution)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "fn,match",
    [
        (update_stub, "is not filled in yet"),
        (update_no_rescale, "neither the old sum ell nor the old output o was rescaled"),
        (update_rescale_l_only, r"the old output o was not rescaled \(ell was\)"),
        (update_rescale_o_only, r"the old sum ell was not rescaled \(o was\)"),
        (update_no_max_subtraction, "without subtracting the max"),
        (update_alpha_inverted, "upside down"),
        (update_no_running_max, "not the running max"),
        (update_block_max_unguarded, "fully masked row"),
        (update_library, OWN_WORK),
        (lambda m, l_, o, s, v: (m, o, l_), r"in the order \(m_new, o_new, ell_new\)"),
        (update_normalised_too_early, "do not divide by ell here"),
        (update_2d_only, r"\[\.\.\., None\]"),
        (lambda m, l_, o, s, v: None, "returned None"),
        (lambda m, l_, o, s, v: (m, l_), "return three tensors"),
    ],
    ids=["stub", "no_rescale", "l_only", "o_only", "no_max", "alpha_inverted", "no_running_max",
         "block_max_unguarded", "delegates", "wrong_order", "normalised", "2d_only", "none",
         "two_values"],
)
def test_update_check_fails_with_a_hint(fn, match, capsys):
    with pytest.raises(AssertionError, match=match):
        check_online_softmax_update(fn)
    assert "PASS" not in capsys.readouterr().out


def test_update_check_catches_overflow_when_only_large_scores_reveal_it():
    def overflows(m, l, o, s_block, v_block):  # noqa: E741
        # Right on small scores (the shift cancels), but exp(s) overflows near 1e4.
        m_new = torch.maximum(m, s_block.max(dim=-1).values)
        p = torch.exp(s_block) / torch.exp(m_new[..., None])
        alpha = torch.exp(m) / torch.exp(m_new)
        return m_new, alpha * l + p.sum(dim=-1), alpha[..., None] * o + p @ v_block

    with pytest.raises(AssertionError, match="overflows"):
        check_online_softmax_update(overflows)


# --------------------------------------------------------------------------------------------
# Tiled forward: the solution and its typical mistakes
# --------------------------------------------------------------------------------------------


def make_tiled(
    update=update_solution,
    *,
    scale=True,
    factor=None,
    key_end=None,
    m_init=float("-inf"),
    normalise=True,
    causal_mask=True,
    skip_blocks=True,
    full_matrix=False,
    mask_offset=0,
):
    def tiled(q, k, v, block_size=32, causal=False):
        batch, heads, n, d = q.shape
        out = torch.empty_like(q)
        if full_matrix:
            s_all = q @ k.transpose(-2, -1)  # the mistake: the whole N x N matrix
            del s_all
        for i in range(0, n, block_size):
            qi = q[:, :, i : i + block_size] * (factor(d, n, block_size) if factor else
                                                (d**-0.5 if scale else 1.0))
            rows = qi.shape[2]
            m = torch.full((batch, heads, rows), m_init)
            l = torch.zeros(batch, heads, rows)  # noqa: E741
            o = torch.zeros(batch, heads, rows, d)
            k_end = min(n, i + block_size) if (causal and skip_blocks) else n
            if key_end is not None:
                k_end = key_end(n, block_size, k_end)
            for j in range(0, k_end, block_size):
                s = qi @ k[:, :, j : j + block_size].transpose(-2, -1)
                if causal and causal_mask:
                    qpos = torch.arange(i, i + rows)[:, None]
                    kpos = torch.arange(j, min(j + block_size, n))[None, :]
                    s = s.masked_fill(kpos > qpos + mask_offset, float("-inf"))
                m, l, o = update(m, l, o, s, v[:, :, j : j + block_size])  # noqa: E741
            out[:, :, i : i + block_size] = o / l[..., None] if normalise else o
        return out

    return tiled


def tiled_stub(q, k, v, block_size=32, causal=False):
    raise NotImplementedError("Fill-in 'nb04_tiled_attention_impl' is not done yet")


def test_tiled_check_passes_on_solution(capsys):
    check_tiled_attention(make_tiled())
    assert capsys.readouterr().out == "CHECK nb04_tiled_attention: PASS\n"


def test_tiled_check_refuses_the_library_implementation(capsys):
    with pytest.raises(AssertionError, match=OWN_WORK + " course_lib.utils.flash_attention.tiled"):
        check_tiled_attention(lambda q, k, v, b, c: tiled_attention(q, k, v, c, block_q=b,
                                                                    block_k=b))
    assert "PASS" not in capsys.readouterr().out


@pytest.mark.parametrize("call", [
    lambda q, k, v, b, c: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=c),
    lambda q, k, v, b, c: torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1) @ v,
], ids=["sdpa", "softmax"])
def test_tiled_check_refuses_torch_answers(call):
    with pytest.raises(AssertionError, match=OWN_WORK):
        check_tiled_attention(call)


def test_update_check_refuses_the_library_class_object_itself():
    with pytest.raises(AssertionError, match=OWN_WORK):
        check_online_softmax_update(library_update)


def _query_blocks_against_all_keys(q, k, v, block_size=32, causal=False):
    # O(block x N) memory per step and a plain softmax: not tiled over the keys.
    n, d = q.shape[2], q.shape[3]
    out = torch.empty_like(q)
    for i in range(0, n, block_size):
        s = q[:, :, i : i + block_size] @ k.transpose(-2, -1) / d**0.5
        if causal:
            rows = torch.arange(i, i + s.shape[2])[:, None]
            s = s.masked_fill(torch.arange(n)[None, :] > rows, float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        out[:, :, i : i + block_size] = (e / e.sum(-1, keepdim=True)) @ v
    return out


def _last_block_dropped(q, k, v, block_size=32, causal=False):
    n = q.shape[2] // block_size * block_size
    return make_tiled()(q[:, :, :n], k[:, :, :n], v[:, :, :n], block_size, causal)


@pytest.mark.parametrize(
    "fn,match",
    [
        (tiled_stub, "is not filled in yet"),
        (make_tiled(scale=False), "not scaled"),
        (make_tiled(normalise=False), "not normalised"),
        (make_tiled(causal_mask=False, skip_blocks=False), "causal mask is ignored"),
        (make_tiled(causal_mask=False), "the tiles on the diagonal are not masked"),
        (make_tiled(mask_offset=1), "off by one"),
        (make_tiled(mask_offset=-1), "fully masked row"),
        (make_tiled(factor=lambda d, n, b: 1 / d), "divided by d instead of sqrt"),
        (make_tiled(factor=lambda d, n, b: n**-0.5), r"divided by sqrt\(N\)"),
        (make_tiled(factor=lambda d, n, b: b**-0.5), r"divided by sqrt\(block_size\)"),
        (make_tiled(factor=lambda d, n, b: 0.37), "scaled by 0.37"),
        (make_tiled(update_no_rescale), "attention weights differ"),
        (make_tiled(key_end=lambda n, b, e: e if b <= n else 0), "an empty key loop"),
        (make_tiled(key_end=lambda n, b, e: e - b if e < n else e), "key loop is empty"),
        (make_tiled(m_init=0.0), "did not start at -inf"),
        (make_tiled(update_no_max_subtraction), "inf/nan|max abs error"),
        (make_tiled(full_matrix=True), "full N x N score matrix"),
        (_query_blocks_against_all_keys, "not against all keys"),
        (make_tiled(skip_blocks=False), "skipping the tiles above the diagonal"),
        (_last_block_dropped, r"expected \(2, 3, 50, 16\)"),
        (lambda q, k, v, b, c: None, "returned None"),
    ],
    ids=["stub", "no_scale", "no_normalise", "no_causal", "diag_unmasked", "mask_off_by_one",
         "mask_hides_diagonal", "scale_1_over_d", "scale_n", "scale_block", "scale_other",
         "no_rescale", "empty_loop_block_gt_n", "empty_causal_loop", "m_init_zero", "no_max", "full_matrix", "all_keys", "no_skip", "short_block", "none"],
)
def test_tiled_check_fails_with_a_hint(fn, match, capsys):
    with pytest.raises(AssertionError, match=match):
        check_tiled_attention(fn)
    assert "PASS" not in capsys.readouterr().out


def test_tiled_check_catches_overflow_on_large_logits():
    def unstable(q, k, v, block_size=32, causal=False):
        # Plain softmax without max subtraction: right on small scores, inf/nan near 1e4.
        s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if causal:
            s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), float("-inf"))
        e = torch.exp(s)
        return (e / e.sum(-1, keepdim=True)) @ v

    with pytest.raises(AssertionError, match="inf/nan"):
        check_tiled_attention(unstable)
