"""The mistakes (and correct alternatives) that the checks of notebook 04_flash_attention
(:mod:`course_lib.checks.flash_attention`) know, as edits of the solution cells.

A list this long lives beside its check module; ``tests/test_check_variants.py`` runs each
entry through its real check cell (:mod:`course_lib.checks.variants`)."""

from __future__ import annotations

from course_lib.checks.core import OWN_WORK_PREFIX
from course_lib.checks.variants import BLOCK, alternative, mistake

__all__ = ["VARIANTS"]


# ---------------------------------------------------------------------------------------------
# The mistakes (and correct alternatives) these checks know
# ---------------------------------------------------------------------------------------------

_U = "nb04_online_softmax_impl"
_T = "nb04_tiled_attention_impl"
_OWN = OWN_WORK_PREFIX
_ALPHA = "alpha = torch.exp(m - m_new)  # rescales what was summed against the old max"
_ELL = "ell_new = alpha * ell + p.sum(dim=-1)"
_O = "o_new = alpha[..., None] * o + p @ v_block"
_MAX = "m_new = torch.maximum(m, s_block.max(dim=-1).values)  # new running max per row"
_P = "p = torch.exp(s_block - m_new[..., None])  # this block, relative to the new max"
_SCALE = "q_i = q[:, :, i : i + block_size] / math.sqrt(d)  # (B, H, rows, d)"
_KSTOP = "k_stop = min(n, i + rows) if causal else n  # causal: nothing after the diagonal block"
_MASK = "s = s.masked_fill(k_pos > q_pos, float(\"-inf\"))"

VARIANTS = (
    # -- online_softmax_update ------------------------------------------------------------
    mistake(_U, "delegates", "calls course_lib's online_softmax_update",
            [(BLOCK, "from course_lib.utils.flash_attention import online_softmax_update as ref\n"
                     "return ref(m, ell, o, s_block, v_block)")], says=_OWN),
    mistake(_U, "alpha_inverted", "rescale factor exp(m_new - m) instead of exp(m - m_new)",
            [(_ALPHA, "alpha = torch.exp(m_new - m)")], says="the rescale factor is upside down"),
    mistake(_U, "no_running_max", "m_new is the block's max, the old m is forgotten",
            [(_MAX, "m_new = s_block.max(dim=-1).values")],
            says="m_new is this block's max, not the running max"),
    mistake(_U, "whole_block_max", "one max over the whole block instead of per row",
            [(_MAX, "m_new = torch.maximum(m, s_block.max())")],
            says="one max for the whole block"),
    mistake(_U, "no_rescale", "old ell and o added without alpha",
            [(_ELL, "ell_new = ell + p.sum(dim=-1)"), (_O, "o_new = o + p @ v_block")],
            says="neither the old sum ell nor the old output o was rescaled"),
    mistake(_U, "rescale_l_only", "ell rescaled, o not",
            [(_O, "o_new = o + p @ v_block")], says="the old output o was not rescaled"),
    mistake(_U, "rescale_o_only", "o rescaled, ell not",
            [(_ELL, "ell_new = ell + p.sum(dim=-1)")], says="the old sum ell was not rescaled"),
    mistake(_U, "p_old_max", "p measured against the old max m",
            [(_P, "p = torch.exp(s_block - m[..., None])")],
            says="p is measured against the old max m"),
    mistake(_U, "no_max_subtraction", "p = exp(s_block), no max subtracted",
            [(_P, "p = torch.exp(s_block)")], says="without subtracting the max"),
    mistake(_U, "normalised_too_early", "o_new divided by ell_new inside the update",
            [("return m_new, ell_new, o_new", "return m_new, ell_new, o_new / ell_new[..., None]")],
            says="do not divide by ell here"),
    mistake(_U, "alpha_not_broadcast", "alpha * o without [..., None]",
            [(_O, "o_new = alpha * o + p @ v_block")], says="[..., None]"),
    mistake(_U, "max_without_values", "torch.maximum(m, s_block.max(dim=-1)) without .values",
            [(_MAX, "m_new = torch.maximum(m, s_block.max(dim=-1))")], says=".values"),
    mistake(_U, "rows_only_2d", "dim=1 and [:, None]: right only for 2-D statistics",
            [(_MAX, "m_new = torch.maximum(m, s_block.max(dim=1).values)"),
             (_P, "p = torch.exp(s_block - m_new[:, None])"),
             (_ELL, "ell_new = alpha * ell + p.sum(dim=1)"),
             (_O, "o_new = alpha[:, None] * o + p @ v_block")], says="[..., None]"),
    mistake(_U, "wrong_order", "returns (m_new, o_new, ell_new)",
            [("return m_new, ell_new, o_new", "return m_new, o_new, ell_new")],
            says="in the order (m_new, o_new, ell_new)"),
    mistake(_U, "block_max_unguarded", "FlashAttention-1 form shifted by the block's own max, "
            "nan on a fully masked block row",
            [(BLOCK, """
                m_block = s_block.max(dim=-1).values
                m_new = torch.maximum(m, m_block)
                p = torch.exp(s_block - m_block[..., None])
                beta = torch.exp(m_block - m_new)
                alpha = torch.exp(m - m_new)
                return m_new, alpha * ell + beta * p.sum(-1), alpha[..., None] * o + beta[..., None] * (p @ v_block)
            """)], says="fully masked row"),
    alternative(_U, "amax_einsum", "amax, unsqueeze and einsum",
                [(_MAX, "m_new = torch.max(m, s_block.amax(dim=-1))"),
                 (_O, "o_new = o * alpha.unsqueeze(-1) + torch.einsum('...rc,...cd->...rd', "
                      "p, v_block)")]),
    alternative(_U, "guarded_block_max", "FlashAttention-1 form, shifted by the block's own max "
                "with a guard for rows that see no key",
                [(BLOCK, """
                    m_block = s_block.amax(dim=-1)
                    m_new = torch.maximum(m, m_block)
                    safe = torch.where(torch.isinf(m_block), m_new, m_block)
                    p = torch.exp(s_block - safe[..., None])
                    beta = torch.exp(safe - m_new).nan_to_num(0.0)
                    alpha = torch.exp(m - m_new).nan_to_num(0.0)
                    return m_new, alpha * ell + beta * p.sum(-1), alpha[..., None] * o + beta[..., None] * (p @ v_block)
                """)]),
    alternative(_U, "library_guard", "the library's m_safe guard against -inf - -inf",
                [(_P, "m_safe = m_new.masked_fill(m_new == float('-inf'), 0.0)\n"
                      "    p = torch.exp(s_block - m_safe[..., None])"),
                 (_ALPHA, "alpha = torch.exp(m - m_safe)")]),
    # -- my_tiled_attention ---------------------------------------------------------------
    mistake(_T, "delegates_tiled", "calls course_lib's tiled_attention",
            [(BLOCK, "return tiled_attention(q, k, v, causal, block_q=block_size, "
                     "block_k=block_size)")], says=_OWN),
    mistake(_T, "delegates_sdpa", "calls torch's scaled_dot_product_attention",
            [(BLOCK, "return F.scaled_dot_product_attention(q, k, v, is_causal=causal)")],
            says=_OWN),
    mistake(_T, "delegates_softmax", "plain softmax attention with torch.softmax",
            [(BLOCK, "s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
                     "if causal:\n"
                     "    s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2]), float('-inf'))\n"
                     "return torch.softmax(s, dim=-1) @ v")], says=_OWN),
    mistake(_T, "no_scale", "scores not scaled", [(_SCALE, "q_i = q[:, :, i : i + block_size]")],
            says="the scores are not scaled"),
    mistake(_T, "scale_by_d", "scores divided by d instead of sqrt(d)",
            [(_SCALE, "q_i = q[:, :, i : i + block_size] / d")],
            says="divided by d instead of sqrt(d)"),
    mistake(_T, "scale_by_n", "scores divided by sqrt(N) instead of sqrt(d)",
            [(_SCALE, "q_i = q[:, :, i : i + block_size] / math.sqrt(n)")],
            says="divided by sqrt(N)"),
    mistake(_T, "scale_multiplied", "scores multiplied by sqrt(d)",
            [(_SCALE, "q_i = q[:, :, i : i + block_size] * math.sqrt(d)")],
            says="multiplied by sqrt(d)"),
    mistake(_T, "empty_causal_loop", "causal key loop stops before the diagonal block",
            [(_KSTOP, "k_stop = i if causal else n")], says="key loop is empty"),
    mistake(_T, "mask_hides_diagonal", "mask k_pos >= q_pos also hides j == i",
            [(_MASK, "s = s.masked_fill(k_pos >= q_pos, float(\"-inf\"))")],
            says="fully masked row"),
    mistake(_T, "mask_off_by_one", "mask k_pos > q_pos + 1",
            [(_MASK, "s = s.masked_fill(k_pos > q_pos + 1, float(\"-inf\"))")],
            says="off by one"),
    mistake(_T, "no_causal", "causal flag ignored",
            [(_KSTOP, "k_stop = n"), ("if causal and j + block_size > i:", "if False:")],
            says="the causal mask is ignored"),
    mistake(_T, "diagonal_unmasked", "blocks skipped but the diagonal tile not masked",
            [("if causal and j + block_size > i:", "if False:")],
            says="the tiles on the diagonal are not masked"),
    mistake(_T, "drops_last_block", "key loop over whole blocks only",
            [("for j in range(0, k_stop, block_size):",
              "for j in range(0, k_stop - k_stop % block_size, block_size):")],
            says="the last (shorter) key block"),
    mistake(_T, "not_normalised", "o not divided by ell",
            [("out[:, :, i : i + rows] = o / ell[..., None]", "out[:, :, i : i + rows] = o")],
            says="not normalised"),
    mistake(_T, "m_init_zero", "running max starts at 0",
            [('m = torch.full((batch, heads, rows), float("-inf"))',
              "m = torch.zeros(batch, heads, rows)")], says="did not start at -inf"),
    mistake(_T, "no_skip", "causal: every key block visited (masked, not skipped)",
            [(_KSTOP, "k_stop = n")], says="skipping the tiles above the diagonal"),
    mistake(_T, "hard_coded_block", "block size 64 hard-coded",
            [("batch, heads, n, d = q.shape", "batch, heads, n, d = q.shape\n    block_size = 64")],
            says="ignore block_size"),
    alternative(_T, "key_blocks_reversed", "key blocks visited from the diagonal down to 0",
                [("for j in range(0, k_stop, block_size):",
                  "for j in reversed(range(0, k_stop, block_size)):")]),
    alternative(_T, "mask_every_tile", "the causal mask applied to every visited tile",
                [("if causal and j + block_size > i:", "if causal:")]),
)
