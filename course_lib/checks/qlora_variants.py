"""The mistakes (and correct alternatives) that the checks of notebook 03_qlora
(:mod:`course_lib.checks.qlora`) know, as edits of the solution cells.

A list this long lives beside its check module; ``tests/test_check_variants.py`` runs each
entry through its real check cell (:mod:`course_lib.checks.variants`)."""

from __future__ import annotations

from course_lib.checks.core import OWN_WORK_PREFIX
from course_lib.checks.variants import BLOCK, alternative, mistake

__all__ = ["VARIANTS"]


# ---------------------------------------------------------------------------------------------
# The mistakes (and correct alternatives) these checks know
# ---------------------------------------------------------------------------------------------

_A = "nb03_absmax_scale_impl"
_N = "nb03_nearest_level_impl"
_P = "nb03_pack_nibbles_impl"
_D = "nb03_double_quant_impl"
_B = "nb03_bits_per_param_impl"
_M = "nb03_qlora_model_impl"
_OWN = OWN_WORK_PREFIX
_BLOCKS = "blocks = w.reshape(-1, blocksize).float()"
_ABSMAX = "absmax = blocks.abs().amax(dim=1)"
_SCALED = "scaled = blocks * torch.reciprocal(absmax.clamp(min=1e-38)).unsqueeze(1)"
_MID = "midpoints = (codebook[:-1] + codebook[1:]) / 2"
_BUCKET = "return torch.bucketize(scaled, midpoints)"
_FLAT = "codes = codes.reshape(-1).to(torch.uint8)"
_PACK = "return (codes[0::2] << 4) | codes[1::2]"
_OFFSET = "offset = absmax.mean()"
_SCALE2 = "blockwise_absmax_scale(absmax - offset, blocksize)"
_CODES = "codes = nearest_level_code(scaled, dynamic_map()).to(torch.uint8)"
_RET2 = "return codes.reshape(absmax.shape), offset, absmax2"
_DQ = "return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)"
_PLAIN = "return 4 + 32 / blocksize"
_QC = "bnb_4bit_use_double_quant=True,"
_LC = 'adapters = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])'
_RETM = "return QLoRAModel(base, quantization, adapters).prepare_for_training()"

VARIANTS = (
    # -- blockwise_absmax_scale ---------------------------------------------------------------
    mistake(_A, "delegates", "calls course_lib's blockwise_absmax",
            [(BLOCK, "flat = w.reshape(-1).float()\n"
                     "absmax = nf4.blockwise_absmax(flat, blocksize)\n"
                     "return flat.view(-1, blocksize) / absmax.clamp(min=1e-38)[:, None], absmax")],
            says=_OWN),
    mistake(_A, "delegates_quantize", "reads the absmax from course_lib's quantize_nf4",
            [(BLOCK, "_, state = nf4.quantize_nf4(w, blocksize)\n"
                     "blocks = w.reshape(-1, blocksize).float()\n"
                     "return blocks / state.absmax.clamp(min=1e-38)[:, None], state.absmax")],
            says=_OWN),
    mistake(_A, "signed_max", "max instead of the absolute max",
            [(_ABSMAX, "absmax = blocks.amax(dim=1)")],
            says="the maximum, not the absolute maximum"),
    mistake(_A, "per_row", "one absmax per row of w",
            [(_BLOCKS, "blocks = w.reshape(w.shape[0], -1).float()")],
            says="one absmax per row"),
    mistake(_A, "wrong_dim", "amax over dim 0",
            [(_ABSMAX, "absmax = blocks.abs().amax(dim=0)")], says="over the wrong dim"),
    mistake(_A, "hard_coded_64", "blocks of 64 whatever blocksize says",
            [(_BLOCKS, "blocks = w.reshape(-1, 64).float()")], says="not a hard-coded 64"),
    mistake(_A, "no_zero_guard", "divides by absmax without guarding all-zero blocks",
            [(_SCALED, "scaled = blocks / absmax.unsqueeze(1)")], says="all-zero block"),
    mistake(_A, "multiplies", "multiplies by absmax instead of dividing",
            [(_SCALED, "scaled = blocks * absmax.unsqueeze(1)")],
            says="multiplied each block by its absmax"),
    mistake(_A, "returns_reciprocal", "returns the scale factor 1/absmax instead of absmax",
            [("return scaled, absmax", "return scaled, torch.reciprocal(absmax.clamp(min=1e-38))")],
            says="scale factor 1 / absmax"),
    mistake(_A, "flat_scaled", "returns scaled flattened",
            [("return scaled, absmax", "return scaled.reshape(-1), absmax")],
            says="keep the blocks as rows"),
    mistake(_A, "only_scaled", "returns the scaled blocks only",
            [("return scaled, absmax", "return scaled")], says="return scaled, absmax"),
    mistake(_A, "in_place", "divides the view of w in place",
            [(_SCALED, "blocks /= absmax.clamp(min=1e-38).unsqueeze(1)\n    scaled = blocks")],
            says="changed its input w in place"),
    mistake(_A, "no_float", "keeps the weight's dtype",
            [(_BLOCKS, "blocks = w.reshape(-1, blocksize)")], says="compute in float32"),
    mistake(_A, "no_return", "forgets the return",
            [("return scaled, absmax", "scaled, absmax")], says="forget the `return`"),
    alternative(_A, "divide_where", "divides, all-zero blocks by torch.where",
                [(_SCALED, "scaled = torch.where(absmax[:, None] > 0, blocks / absmax[:, None], "
                           "torch.zeros_like(blocks))")]),
    alternative(_A, "nan_to_num", "divides, then turns the NaN of zero blocks into 0",
                [(_SCALED, "scaled = torch.nan_to_num(blocks / absmax.unsqueeze(1))")]),
    alternative(_A, "view_max", "float first, view, max of |x| via .max(dim=1).values",
                [(_BLOCKS, "blocks = w.float().reshape(-1, blocksize)"),
                 (_ABSMAX, "absmax = blocks.abs().max(dim=1).values")]),
    # -- nearest_level_code ---------------------------------------------------------------
    mistake(_N, "delegates", "calls course_lib's nearest_level",
            [(BLOCK, "return nf4.nearest_level(scaled, codebook)")], says=_OWN),
    mistake(_N, "levels_not_midpoints", "bucketize on the levels (first level >= x)",
            [(_BUCKET, "return torch.bucketize(scaled, codebook)")], says="first level >= each"),
    mistake(_N, "round_down", "the level below",
            [(_BUCKET, "return (torch.bucketize(scaled, codebook, right=True) - 1).clamp(min=0)")],
            says="rounded down"),
    mistake(_N, "returns_levels", "returns the level values, not the indices",
            [(_BUCKET, "return codebook[torch.bucketize(scaled, midpoints)]")],
            says="not their indices"),
    mistake(_N, "flattens", "returns flat codes",
            [(_BUCKET, "return torch.bucketize(scaled.reshape(-1), midpoints)")],
            says="in the shape of scaled"),
    mistake(_N, "argmin_wrong_dim", "argmin over the values, not the levels",
            [(BLOCK, "return (scaled.unsqueeze(-1) - codebook).abs().argmin(dim=0)")],
            says="reduced over the wrong dim"),
    mistake(_N, "no_abs", "signed distance, argmin without abs",
            [(BLOCK, "return (scaled.unsqueeze(-1) - codebook).argmin(dim=-1)")],
            says="has no .abs()"),
    mistake(_N, "ties_up", "exact midpoints take the upper level",
            [(_BUCKET, "return torch.bucketize(scaled, midpoints, right=True)")],
            says="exactly halfway"),
    mistake(_N, "unhalved", "midpoints not divided by 2",
            [(_MID, "midpoints = codebook[:-1] + codebook[1:]")], says="not halved"),
    mistake(_N, "hard_coded_nf4", "uses the NF4 levels whatever the codebook",
            [(_MID, "midpoints = (nf4_codebook()[:-1] + nf4_codebook()[1:]) / 2")],
            says="not with the `codebook` argument"),
    alternative(_N, "argmin", "argmin of |scaled - level| over the last dim",
                [(BLOCK, "return (scaled.unsqueeze(-1) - codebook).abs().argmin(dim=-1)")]),
    alternative(_N, "searchsorted", "searchsorted on the midpoints",
                [(_BUCKET, "return torch.searchsorted(midpoints, scaled.contiguous())")]),
    # -- pack_nibbles -----------------------------------------------------------------------
    mistake(_P, "delegates", "calls course_lib's pack_nibbles",
            [(BLOCK, "return nf4.pack_nibbles(codes)")], says=_OWN),
    mistake(_P, "swapped", "element 2i in the low nibble",
            [(_PACK, "return (codes[1::2] << 4) | codes[0::2]")], says="nibbles are swapped"),
    mistake(_P, "masked_high", "masks with 0xF after the shift",
            [(_PACK, "return ((codes[0::2] << 4) & 0xF) | codes[1::2]")],
            says="the high nibble is lost"),
    mistake(_P, "no_uint8", "keeps the codes' dtype",
            [(_FLAT, "codes = codes.reshape(-1)")], says="expected torch.uint8"),
    mistake(_P, "int8", "packs in signed int8",
            [(_FLAT, "codes = codes.reshape(-1).to(torch.int8)")], says="expected torch.uint8"),
    mistake(_P, "not_flattened", "pairs rows of a 2-D tensor",
            [(_FLAT, "codes = codes.to(torch.uint8)")], says="you paired rows"),
    mistake(_P, "shift_2", "shifts by 2 bits",
            [(_PACK, "return (codes[0::2] << 2) | codes[1::2]")], says="shifted by 2 bits"),
    mistake(_P, "not_combined", "stacks the two halves instead of combining them",
            [(_PACK, "return torch.cat([codes[0::2] << 4, codes[1::2]])")],
            says="two 4-bit codes share one byte"),
    alternative(_P, "times_16", "16 * high + low on a (n/2, 2) view",
                [(_PACK, "pairs = codes.view(-1, 2)\n    return pairs[:, 0] * 16 + pairs[:, 1]")]),
    # -- double_quantize ------------------------------------------------------------------------
    mistake(_D, "delegates", "calls course_lib's quantize_blockwise_8bit",
            [(BLOCK, "offset = absmax.mean()\n"
                     "codes, state2 = nf4.quantize_blockwise_8bit(absmax - offset, dynamic_map(), "
                     "blocksize)\nreturn codes, offset, state2.absmax")], says=_OWN),
    mistake(_D, "not_centred", "absmax scaled without subtracting the mean",
            [(_SCALE2, "blockwise_absmax_scale(absmax, blocksize)")],
            says="did not subtract the mean"),
    mistake(_D, "hard_coded_256", "second-level blocks of 256 whatever blocksize says",
            [(_SCALE2, "blockwise_absmax_scale(absmax - offset, 256)")],
            says="not a hard-coded 256"),
    mistake(_D, "nf4_codes", "codes with the NF4 codebook",
            [(_CODES, "codes = nearest_level_code(scaled, nf4_codebook()).to(torch.uint8)")],
            says="16-level NF4 codebook"),
    mistake(_D, "no_reshape", "codes left as (n_blocks, blocksize)",
            [(_RET2, "return codes, offset, absmax2")], says="reshape the codes"),
    mistake(_D, "int64_codes", "codes not converted to uint8",
            [(_CODES, "codes = nearest_level_code(scaled, dynamic_map())")],
            says="expected torch.uint8"),
    mistake(_D, "max_offset", "offset is the max, not the mean",
            [(_OFFSET, "offset = absmax.max()")], says="offset should be the mean"),
    mistake(_D, "swapped_return", "returns (codes, absmax2, offset)",
            [(_RET2, "return codes.reshape(absmax.shape), absmax2, offset")],
            says="offset and absmax2 are swapped"),
    # -- bits_per_parameter ----------------------------------------------------------------------
    mistake(_B, "delegates", "measures with course_lib's storage_bits_per_parameter",
            [(BLOCK, "packed, state = nf4.quantize_nf4(torch.zeros(64, 4096), blocksize, "
                     "double_quant)\nreturn nf4.storage_bits_per_parameter(state, packed)")],
            says=_OWN),
    mistake(_B, "no_constants", "forgets the absmax constants",
            [(_PLAIN, "return 4")], says="scaling constants are missing"),
    mistake(_B, "no_code_bits", "forgets the 4 bits of the code",
            [(_PLAIN, "return 32 / blocksize")], says="4 bits of the code itself"),
    mistake(_B, "fp16_constants", "16-bit absmax constants",
            [(_PLAIN, "return 4 + 16 / blocksize")], says="32 bits each, not 16"),
    mistake(_B, "no_second_level", "forgets double quantisation's absmax2",
            [(_DQ, "return 4 + 8 / blocksize")], says="second-level constants are missing"),
    mistake(_B, "dq_32_bits", "first-level constants still 32 bits under double quantisation",
            [(_DQ, "return 4 + 32 / blocksize + 32 / (blocksize * dq_blocksize)")],
            says="take 8 bits, not 32"),
    mistake(_B, "hard_coded_dq_256", "dq_blocksize hard-coded to 256",
            [(_DQ, "return 4 + 8 / blocksize + 32 / (blocksize * 256)")],
            says="not a hard-coded 256"),
    mistake(_B, "second_level_per_dq_block", "absmax2 bits spread over dq_blocksize weights",
            [(_DQ, "return 4 + 8 / blocksize + 32 / dq_blocksize")],
            says="blocksize * dq_blocksize weights"),
    mistake(_B, "floor_division", "integer division of the constants' bits",
            [(_PLAIN, "return 4 + 32 // blocksize")], says="scaling constants are missing"),
    mistake(_B, "bytes", "bytes instead of bits",
            [(_PLAIN, "return (4 + 32 / blocksize) / 8")], says="bytes, not bits"),
    alternative(_B, "bytes_times_8", "counts bytes per block, then converts to bits",
                [(BLOCK, "bits_per_block = 4 * blocksize + (8 + 32 / dq_blocksize "
                         "if double_quant else 32)\nreturn bits_per_block / blocksize")]),
    # -- build_qlora_model ----------------------------------------------------------------------
    mistake(_M, "lora_only", "apply_lora on the full-precision model",
            [(_RETM, "return apply_lora(base, adapters)")], says="should be a QLoRAModel"),
    mistake(_M, "fp4", "FP4 instead of NF4",
            [('bnb_4bit_quant_type="nf4",', 'bnb_4bit_quant_type="fp4",')], says="not NF4"),
    mistake(_M, "no_double_quant", "double quantisation off",
            [(_QC, "bnb_4bit_use_double_quant=False,")], says="not double-quantised"),
    mistake(_M, "double_quant_after", "the flag set on the config after building",
            [(_QC, "bnb_4bit_use_double_quant=False,"),
             (_RETM, "model = QLoRAModel(base, quantization, adapters).prepare_for_training()\n"
                     "    quantization.bnb_4bit_use_double_quant = True\n    return model")],
            says="a flag set afterwards changes nothing"),
    mistake(_M, "bf16_compute", "bfloat16 compute dtype",
            [("bnb_4bit_compute_dtype=torch.float32,", "bnb_4bit_compute_dtype=torch.bfloat16,")],
            says="computes in torch.bfloat16"),
    mistake(_M, "blocksize_128", "blocks of 128",
            [(_QC, _QC + "\n        blocksize=128,")], says="expected 64"),
    mistake(_M, "skips_k_proj", "k_proj kept in full precision",
            [(_QC, _QC + '\n        llm_int8_skip_modules=["lm_head", "k_proj"],')],
            says="not 4-bit"),
    mistake(_M, "rank_4", "rank 4", [(_LC, _LC.replace("r=8", "r=4"))], says="expected r=8"),
    mistake(_M, "alpha_8", "lora_alpha 8 (scaling 1)",
            [(_LC, _LC.replace("lora_alpha=16", "lora_alpha=8"))], says="lora_alpha / r = 16 / 8"),
    mistake(_M, "rslora", "rank-stabilised scaling",
            [(_LC, _LC.replace("r=8,", "r=8, use_rslora=True,"))], says="lora_alpha / r"),
    mistake(_M, "q_only", "LoRA on q_proj only",
            [(_LC, 'adapters = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj"])')],
            says="have no LoRA adapter"),
    mistake(_M, "all_linear", "LoRA on every linear layer",
            [(_LC, 'adapters = LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear")')],
            says="q_proj and v_proj only"),
    mistake(_M, "trains_norms", "norm weights left trainable",
            [(_RETM, "model = QLoRAModel(base, quantization, adapters).prepare_for_training()\n"
                     "    model.model.norm.weight.requires_grad_(True)\n    return model")],
            says="only LoRA parameters may be trainable"),
    mistake(_M, "no_return", "forgets the return",
            [(_RETM, "QLoRAModel(base, quantization, adapters).prepare_for_training()")],
            says="forget the `return`"),
    mistake(_M, "own_base", "loads its own pretrained model instead of wrapping base",
            [(_RETM, _RETM.replace("(base,", "(load_pretrained(),"))],
            says="does not wrap the `base` model"),
    alternative(_M, "torch_backend", "the course's NF4Linear backend",
                [(_QC, _QC + '\n        backend="torch",')]),
    alternative(_M, "string_dtype", "compute dtype given as a string, targets as a regex",
                [("bnb_4bit_compute_dtype=torch.float32,", 'bnb_4bit_compute_dtype="float32",'),
                 (_LC, 'adapters = LoRAConfig(r=8, lora_alpha=16, '
                       'target_modules=r".*\\.(q_proj|v_proj)")')]),
)
