"""Checks for notebook 03_qlora: the student's NF4 building blocks and QLoRA set-up.

Each check runs the student's function on small seeded inputs (several shapes, blocksizes and
optional arguments, so that a hard-coded default fails), compares it with
``course_lib.model.nf4`` (the reference implementation, bit-exact with bitsandbytes) and, on a
mismatch, names the most likely mistake by its signature (per-row instead of per-block absmax,
the maximum instead of the absolute maximum, division by zero in an all-zero block, the level
above instead of the nearest, nibbles swapped, mean not subtracted, ...). While the student's
code runs, the library's answers (``course_lib.model.nf4``'s quantisers, bitsandbytes'
``quantize_4bit`` / ``quantize_blockwise``) are refused by the own-work guard. The model check
reads the *built* layers (their quantisation, compute dtype, LoRA rank and scaling), not just the
configuration objects. The global random state is left untouched.

The mistakes and correct alternatives these checks know: :mod:`.qlora_variants`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from course_lib.checks import call_student, check, expect, fail
from course_lib.checks.qlora_variants import VARIANTS
from course_lib.model import nf4 as ref
from course_lib.model.lora import LinearWithLoRA
from course_lib.model.qlora import NF4Linear, QLoRAModel, _quantized_types, bitsandbytes_available

__all__ = [
    "check_blockwise_absmax_scale",
    "check_nearest_level",
    "check_pack_nibbles",
    "check_double_quantize",
    "check_bits_per_parameter",
    "check_qlora_model",
    "VARIANTS",
]

# The library's answers, captured now: the guard replaces the module attributes while the
# student's code runs, the check itself calls these.
_quantize_nf4 = ref.quantize_nf4
_nearest_level = ref.nearest_level
_storage_bits = ref.storage_bits_per_parameter
_nf4_codebook = ref.nf4_codebook
_int4_codebook = ref.int4_codebook
_dynamic_map = ref.dynamic_map
_nf4_midpoints = ref.nf4_midpoints

_NF4 = "course_lib.model.nf4."
_BNB = "bitsandbytes.functional."
_QUANTISERS = (_NF4 + "quantize_nf4", _NF4 + "quantize_blockwise_8bit") + (
    (_BNB + "quantize_4bit", _BNB + "quantize_nf4", _BNB + "quantize_blockwise")
    if bitsandbytes_available() else ()
)
_ABSMAX_FORBID = (_NF4 + "blockwise_absmax", _NF4 + "_scale_blocks", *_QUANTISERS)
_NEAREST_FORBID = (_NF4 + "nearest_level", *_QUANTISERS)
_PACK_FORBID = (_NF4 + "pack_nibbles", *_QUANTISERS)
_DQ_FORBID = _QUANTISERS
_BITS_FORBID = (_NF4 + "storage_bits_per_parameter", *_QUANTISERS)


def _weights(shape, seed: int, scale: float = 0.02) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def _as_tensor(value: Any, what: str, name: str) -> torch.Tensor:
    expect(value is not None, f"{what} returned None for {name}: did you forget the `return`?")
    expect(
        isinstance(value, torch.Tensor),
        f"{what} should return a torch.Tensor as {name}, got {type(value).__name__}.",
    )
    return value


def _pair(result: Any, what: str, names: tuple[str, ...]) -> tuple:
    expect(result is not None, f"{what} returned None: did you forget the `return`?")
    if isinstance(result, torch.Tensor) and len(names) == 2:
        fail(f"{what} returned one tensor of shape {tuple(result.shape)}; it should return a "
             f"tuple ({', '.join(names)}).",
             "you divided the blocks but did not return the absmax too: "
             "`return scaled, absmax`.")
    expect(
        isinstance(result, tuple) and len(result) == len(names),
        f"{what} should return a tuple ({', '.join(names)}), got {type(result).__name__}"
        + (f" of length {len(result)}" if isinstance(result, tuple) else "")
        + ".",
    )
    return result


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=0))


# ---------------------------------------------------------------------------------------------
# 1. Blockwise absmax scaling
# ---------------------------------------------------------------------------------------------


def _absmax_count_hint(w: torch.Tensor, got: int, n_blocks: int, bs: int) -> str:
    if w.dim() > 1 and got == w.shape[0] and got != n_blocks:
        return ("you took one absmax per row: blocks are `blocksize` consecutive values of the "
                "flattened weight, w.reshape(-1, blocksize)")
    if got == bs and got != n_blocks:
        return ("you took the max over the wrong dim (one value per position in the block): "
                "the blocks are the rows of w.reshape(-1, blocksize), so reduce over dim=1")
    for default in (64, 32, 128, 256):
        if default != bs and got == w.numel() // default:
            return (f"your blocks have {default} values although blocksize={bs}: use the "
                    f"`blocksize` argument, not a hard-coded {default}")
    return f"there are w.numel() / blocksize = {n_blocks} blocks"


@check("nb03_absmax_scale", forbid=_ABSMAX_FORBID)
def check_blockwise_absmax_scale(student_fn: Callable[..., Any]) -> None:
    """``student_fn(w, blocksize) -> (scaled, absmax)`` on the row-major flattened ``w``."""
    what = "blockwise_absmax_scale(w, blocksize)"
    zero_block = _weights((4, 64), 3)
    zero_block[2] = 0.0
    cases = [
        ("a (8, 128) weight, blocksize 64", _weights((8, 128), 0), 64),
        ("a (2, 3, 64) weight with an outlier, blocksize 32", _weights((2, 3, 64), 1), 32),
        ("a (16, 32) weight, blocksize 128 (blocks span rows)", _weights((16, 32), 2), 128),
        ("a (4, 64) weight whose third block is all zero, blocksize 64", zero_block, 64),
        ("a (4, 256) float16 weight, blocksize 256", _weights((4, 256), 4).half(), 256),
    ]
    cases[1][1][1, 2, 5] = 0.5
    cases[1][1][0, 1, 7] = -0.7  # a negative outlier: max and absmax differ
    for label, w, bs in cases:
        w_in = w.clone()
        result = call_student(
            student_fn, w_in, bs, what=what,
            explain=lambda exc: (
                "absmax must hold one value per block, shape (n_blocks,): if you reduced over "
                "the wrong dim it has blocksize values; reduce over dim=1 (the values of each "
                "block) and broadcast it with absmax[:, None]"),
        )
        scaled, absmax = _pair(result, what, ("scaled", "absmax"))
        scaled = _as_tensor(scaled, what, "scaled")
        absmax = _as_tensor(absmax, what, "absmax")
        expect(torch.equal(w_in, w),
               f"{what} on {label} changed its input w in place.",
               "w.reshape(...).float() of a float32 w is a view of w, so `/=` or `*=` on it "
               "writes into w: compute scaled = blocks / ... as a new tensor.")
        flat = w.reshape(-1).float()
        n_blocks = flat.numel() // bs
        blocks = flat.view(n_blocks, bs)
        want_absmax = blocks.abs().amax(dim=1)
        if absmax.numel() != n_blocks:
            fail(f"{what} on {label}: absmax has {absmax.numel()} values, expected {n_blocks}.",
                 _absmax_count_hint(w, absmax.numel(), n_blocks, bs) + ".")
        absmax = absmax.reshape(-1)
        expect(
            absmax.dtype == torch.float32,
            f"{what} on {label}: absmax has dtype {absmax.dtype}, expected torch.float32.",
            "you kept the weight's dtype: compute in float32 (w.float()), as bitsandbytes "
            "stores the constants in fp32.",
        )
        if not _close(absmax, want_absmax, 1e-6):
            nonzero = want_absmax > 0
            if _close(absmax, blocks.amax(dim=1), 1e-6):
                hint = ("you took the maximum, not the absolute maximum: negative values count "
                        "too (blocks.abs().amax(dim=1))")
            elif _close(absmax[nonzero], 1 / want_absmax[nonzero], 1e-5):
                hint = ("you returned the scale factor 1 / absmax; return absmax itself (the "
                        "constant that is stored) and use its reciprocal only to scale")
            else:
                hint = "absmax[i] = max |w| over block i of w.reshape(-1, blocksize)"
            fail(f"{what} on {label}: wrong absmax values (expected {want_absmax[:3].tolist()}, "
                 f"got {absmax[:3].tolist()} for the first blocks).", hint + ".")
        if scaled.numel() == n_blocks * bs and tuple(scaled.shape) != (n_blocks, bs):
            fail(f"{what} on {label}: scaled has shape {tuple(scaled.shape)}, expected "
                 f"(n_blocks, blocksize) = ({n_blocks}, {bs}).",
                 "keep the blocks as rows: return the (n_blocks, blocksize) tensor, not a "
                 "flattened or reshaped one.")
        expect(
            tuple(scaled.shape) == (n_blocks, bs),
            f"{what} on {label}: scaled has shape {tuple(scaled.shape)}, expected "
            f"(n_blocks, blocksize) = ({n_blocks}, {bs}).",
        )
        expect(
            bool(torch.isfinite(scaled).all()),
            f"{what} on {label}: scaled contains NaN or inf. An all-zero block has absmax 0, "
            f"and 0 / 0 is NaN.",
            "handle the all-zero block: divide by absmax.clamp(min=1e-38) (or use torch.where) "
            "so that it scales to zeros.",
        )
        want_scaled = blocks / want_absmax.clamp(min=1e-38).unsqueeze(1)
        if not torch.allclose(scaled.float(), want_scaled, rtol=1e-6, atol=1e-7):
            if torch.allclose(scaled.float(), blocks * want_absmax.unsqueeze(1), rtol=1e-5,
                              atol=1e-9):
                hint = ("you multiplied each block by its absmax; divide by it (or multiply "
                        "by its reciprocal) so that the values land in [-1, 1]")
            elif scaled.abs().max().item() > 1 + 1e-6:
                hint = ("your values leave [-1, 1]: divide each block by its own absmax, "
                        "absmax[:, None] broadcast over the block's values")
            else:
                hint = "divide each block by its own absmax: scaled = blocks / absmax[:, None]"
            fail(f"{what} on {label}: wrong scaled values.", hint + ".")


# ---------------------------------------------------------------------------------------------
# 2. Nearest-level coding
# ---------------------------------------------------------------------------------------------


def _nearest_ok(scaled: torch.Tensor, got: torch.Tensor, codebook: torch.Tensor,
                tol: float = 1e-7) -> torch.Tensor:
    """Elements whose code is a nearest level (1-ulp differences of the scaling accepted)."""
    want = _nearest_level(scaled, codebook).long()
    d_got = (scaled - codebook[got.clamp(0, codebook.numel() - 1)]).abs()
    d_want = (scaled - codebook[want]).abs()
    return (got == want) | ((d_got - d_want).abs() <= tol)


def _strictly_nearest(scaled: torch.Tensor, got: torch.Tensor, codebook: torch.Tensor):
    """Each code is the nearest level; on an exact tie, the lower one (as bitsandbytes)."""
    want = _nearest_level(scaled, codebook).long()
    d_got = (scaled - codebook[got]).abs()
    d_want = (scaled - codebook[want]).abs()
    return (got == want) | (d_got < d_want) | ((d_got == d_want) & (got < want))


def _nearest_hint(scaled, got, codebook, label) -> str:
    k = codebook.numel()
    s = scaled.contiguous()
    above = torch.searchsorted(codebook, s).clamp(max=k - 1)
    below = (torch.searchsorted(codebook, s, right=True) - 1).clamp(min=0)
    if torch.equal(got, torch.bucketize(s, (codebook[:-1] + codebook[1:]) / 2, right=True)):
        return ("a value exactly halfway between two levels must take the lower one (as "
                "bitsandbytes): torch.bucketize(..., right=False), the default")
    if torch.equal(got, above):
        return ("you found the first level >= each value (bucketize/searchsorted on the levels "
                "themselves); compare with the midpoints between neighbouring levels instead")
    if torch.equal(got, below):
        return "you rounded down to the level below; pick the nearest level"
    if torch.equal(got, torch.bucketize(s, codebook[:-1] + codebook[1:])):
        return ("your boundaries are codebook[:-1] + codebook[1:], not halved: the midpoint "
                "between two levels is their sum / 2")
    if bool((got == k - 1).all()) or bool((got == 0).all()):
        return ("every value got the same code: the distance has no .abs(), so argmin picks an "
                "end of the codebook; take |scaled - level|")
    return ("code[i] must be the index of the level closest to scaled[i], e.g. "
            "torch.bucketize(scaled, (codebook[:-1] + codebook[1:]) / 2)")


@check("nb03_nearest_level", forbid=_NEAREST_FORBID)
def check_nearest_level(student_fn: Callable[..., Any]) -> None:
    """``student_fn(scaled, codebook) -> codes``: index of the nearest level of each value."""
    what = "nearest_level_code(scaled, codebook)"
    nf4_code = _nf4_codebook()
    gen = torch.Generator().manual_seed(5)
    cases = [
        ("random values in [-1, 1] of shape (64, 32)", torch.rand(64, 32, generator=gen) * 2 - 1,
         nf4_code),
        ("the 16 NF4 levels themselves", nf4_code.clone(), nf4_code),
        ("values just above and below each midpoint",
         torch.cat([_nf4_midpoints() + 1e-4, _nf4_midpoints() - 1e-4]), nf4_code),
        ("the extremes -1 and 1", torch.tensor([-1.0, 1.0, 0.0]), nf4_code),
        ("values exactly on the midpoints (ties)", _nf4_midpoints(), nf4_code),
        ("random values of shape (5, 40) and the int4 codebook (k/7)",
         torch.rand(5, 40, generator=gen) * 2 - 1, _int4_codebook()),
        ("random values and the 256-level dynamic map", torch.rand(300, generator=gen) * 2 - 1,
         _dynamic_map()),
    ]
    for label, scaled, codebook in cases:
        k = codebook.numel()
        result = call_student(
            student_fn, scaled.clone(), codebook.clone(), what=what,
            explain=lambda exc: ("scaled may have any shape: compare scaled.unsqueeze(-1) with "
                                 "the codebook (or use torch.bucketize on the midpoints)"),
        )
        got = _as_tensor(result, what, "codes")
        if tuple(got.shape) != tuple(scaled.shape):
            dims = (*scaled.shape, k)
            other = [dims[:i] + dims[i + 1:] for i in range(len(dims) - 1)]
            hint = ("you reduced over the wrong dim: the distances have shape "
                    f"{dims} and the argmin must run over the last one (dim=-1), the levels"
                    if tuple(got.shape) in other else
                    "return one code per value, in the shape of scaled (do not flatten it)")
            fail(f"{what} on {label}: codes have shape {tuple(got.shape)}, expected the shape of "
                 f"scaled, {tuple(scaled.shape)}.", hint + ".")
        expect(
            not got.is_floating_point() and got.dtype != torch.bool,
            f"{what} on {label}: codes have dtype {got.dtype}: you returned the levels "
            f"themselves, not their indices.",
            "return integer indices into the codebook (torch.bucketize and argmin return "
            "int64), not codebook[index].",
        )
        got = got.long()
        if k != 16 and torch.equal(got, _nearest_level(scaled, nf4_code).long()):
            fail(f"{what} on {label}: the codes are those of the NF4 levels, but the codebook "
                 f"has {k} levels.",
                 "you coded with the NF4 levels, not with the `codebook` argument: the function "
                 "must work for any sorted codebook (section 4 uses it with 256 levels).")
        expect(
            int(got.min()) >= 0 and int(got.max()) < k,
            f"{what} on {label}: codes must be indices 0..{k - 1}, got values "
            f"from {int(got.min())} to {int(got.max())}.",
        )
        ok = _strictly_nearest(scaled, got, codebook)
        if not bool(ok.all()):
            bad = int((~ok).sum())
            fail(f"{what} on {label}: {bad} of {scaled.numel()} codes are not the nearest level.",
                 _nearest_hint(scaled, got, codebook, label) + ".")


# ---------------------------------------------------------------------------------------------
# 3. Nibble packing
# ---------------------------------------------------------------------------------------------


def _pack_hint(codes: torch.Tensor, got: torch.Tensor) -> str:
    flat = codes.reshape(-1).long()
    hi, lo = flat[0::2], flat[1::2]
    got = got.reshape(-1).long()
    if torch.equal(got, (lo << 4) | hi):
        return ("the nibbles are swapped: bitsandbytes puts element 2i in the HIGH nibble "
                "(codes[0::2] << 4) and element 2i+1 in the low one")
    if torch.equal(got, lo) or torch.equal(got, ((hi << 4) & 0xF) | lo):
        return ("the high nibble is lost: masking with 0xF after the shift (or keeping only "
                "codes[1::2]) clears it; `& 0xF` belongs to unpacking, not packing")
    if torch.equal(got, hi) or torch.equal(got, (hi << 4) & 0xFF):
        return "only the even-indexed codes are stored; the low nibble holds codes[1::2]"
    if codes.dim() > 1:
        rows = codes.long()
        if torch.equal(got, ((rows[0::2] << 4) | rows[1::2]).reshape(-1)):
            return ("you paired rows, not neighbouring codes: codes[0::2] on a 2-D tensor takes "
                    "every other row; flatten first (codes.reshape(-1))")
    for shift in (1, 2, 3, 8):
        if torch.equal(got, ((hi << shift) | lo) & 0xFF):
            return f"the high nibble is shifted by {shift} bits; a nibble is 4 bits (<< 4)"
    return "packed[i] = (codes[2i] << 4) | codes[2i+1] of the flattened codes"


@check("nb03_pack_nibbles", forbid=_PACK_FORBID)
def check_pack_nibbles(student_fn: Callable[..., Any]) -> None:
    """``student_fn(codes) -> packed``: two 4-bit codes per byte, element 2i in the high nibble."""
    what = "pack_nibbles(codes)"
    gen = torch.Generator().manual_seed(6)
    cases = [
        ("codes [1, 2, 15, 0]", torch.tensor([1, 2, 15, 0], dtype=torch.uint8)),
        ("1000 random codes", torch.randint(0, 16, (1000,), generator=gen, dtype=torch.uint8)),
        ("random int64 codes of shape (8, 6)", torch.randint(0, 16, (8, 6), generator=gen)),
        ("random int32 codes of shape (3, 10)",
         torch.randint(0, 16, (3, 10), generator=gen, dtype=torch.int32)),
    ]
    for label, codes in cases:
        result = call_student(student_fn, codes.clone(), what=what)
        got = _as_tensor(result, what, "packed")
        n = codes.numel()
        flat = codes.reshape(-1).to(torch.uint8)
        want = (flat[0::2] << 4) | flat[1::2]
        expect(
            got.dtype == torch.uint8,
            f"{what} on {label}: packed has dtype {got.dtype}, expected torch.uint8 (one byte "
            f"per pair of codes).",
            "convert the codes with .to(torch.uint8) before shifting (int8 would turn codes >= 8 "
            "in the high nibble negative; int64 takes 8 bytes per value).",
        )
        expect(
            got.numel() == n // 2,
            f"{what} on {label}: packed has {got.numel()} bytes for {n} codes, expected {n // 2}.",
            "two 4-bit codes share one byte: combine codes[0::2] and codes[1::2] into one value "
            "per pair (not a stack of both).",
        )
        if not torch.equal(got.reshape(-1), want):
            fail(f"{what} on {label}: wrong bytes (expected {want[:4].tolist()}..., got "
                 f"{got.reshape(-1)[:4].tolist()}...).", _pack_hint(codes, got) + ".")


# ---------------------------------------------------------------------------------------------
# 4. Double quantisation
# ---------------------------------------------------------------------------------------------


@check("nb03_double_quant", forbid=_DQ_FORBID)
def check_double_quantize(student_fn: Callable[..., Any]) -> None:
    """``student_fn(absmax, blocksize=256) -> (codes, offset, absmax2)`` with the dynamic map."""
    what = "double_quantize(absmax, blocksize)"
    code = _dynamic_map()
    cases = []
    for seed, (shape, bs) in enumerate([((256, 512), 256), ((128, 1024), 128), ((64, 512), 512)]):
        _, state = _quantize_nf4(_weights(shape, 10 + seed) * (1 + seed), 64)
        cases.append((f"the {state.absmax.numel()} absmax constants of a {shape} weight, "
                      f"blocksize {bs}", state.absmax, bs))
    for label, absmax, bs in cases:
        result = call_student(student_fn, absmax.clone(), bs, what=what)
        codes, offset, absmax2 = _pair(result, what, ("codes", "offset", "absmax2"))
        codes = _as_tensor(codes, what, "codes")
        offset = torch.as_tensor(offset, dtype=torch.float32)
        absmax2 = _as_tensor(absmax2, what, "absmax2").float().reshape(-1)
        want_offset = absmax.mean()
        n_blocks = absmax.numel() // bs
        if offset.numel() == n_blocks and n_blocks > 1 and absmax2.numel() == 1:
            fail(f"{what} on {label}: offset has {offset.numel()} values and absmax2 one.",
                 "offset and absmax2 are swapped: return (codes, offset, absmax2).")
        if not (offset.numel() == 1 and torch.allclose(offset.reshape(()), want_offset,
                                                       rtol=1e-5)):
            fail(f"{what} on {label}: offset should be the mean of absmax "
                 f"({want_offset.item():.6g}), got {offset.reshape(-1)[:3].tolist()}.",
                 "offset = absmax.mean(), one fp32 number for the whole tensor.")
        centred = absmax - want_offset
        if absmax2.numel() != n_blocks:
            hint = f"one absmax2 per block of `blocksize` = {bs} constants"
            if absmax2.numel() == absmax.numel() // 256 and bs != 256:
                hint = (f"your blocks have 256 constants although blocksize={bs}: pass the "
                        f"`blocksize` argument on, not a hard-coded 256")
            fail(f"{what} on {label}: absmax2 has {absmax2.numel()} values, expected "
                 f"{n_blocks}.", hint + ".")
        want_absmax2 = centred.view(n_blocks, bs).abs().amax(dim=1)
        if not _close(absmax2, want_absmax2):
            plain = absmax.view(n_blocks, bs).abs().amax(dim=1)
            hint = (
                "you did not subtract the mean: subtract offset before taking the second-level "
                "absmax (the constants are all positive)"
                if _close(absmax2, plain)
                else "absmax2[j] = max |absmax - offset| over block j of `blocksize` constants"
            )
            fail(f"{what} on {label}: wrong absmax2.", hint + ".")
        expect(
            tuple(codes.shape) == tuple(absmax.shape),
            f"{what} on {label}: codes have shape {tuple(codes.shape)}, expected one code per "
            f"constant, shaped like absmax {tuple(absmax.shape)}.",
            "the scaled values come back as (n_blocks, blocksize): reshape the codes to "
            "absmax.shape.",
        )
        expect(
            codes.dtype == torch.uint8,
            f"{what} on {label}: codes have dtype {codes.dtype}, expected torch.uint8.",
            "the codes are stored in 8 bits: .to(torch.uint8).",
        )
        scaled = centred.view(n_blocks, bs) / want_absmax2.unsqueeze(1)
        ok = _nearest_ok(scaled.reshape(-1), codes.long().reshape(-1), code)
        if not bool(ok.all()):
            if int(codes.max()) < 16 and bool(_nearest_ok(
                    scaled.reshape(-1), codes.long().reshape(-1), _nf4_codebook()).all()):
                hint = ("you coded with the 16-level NF4 codebook; the constants use the 8-bit "
                        "dynamic map, dynamic_map() (256 levels)")
            else:
                hint = ("scale each block of (absmax - offset) by its absmax2, then code it with "
                        "your nearest-level function and dynamic_map()")
            fail(f"{what} on {label}: {int((~ok).sum())} of {codes.numel()} codes are not the "
                 f"nearest level of the dynamic map.", hint + ".")


# ---------------------------------------------------------------------------------------------
# 5. Bits per parameter
# ---------------------------------------------------------------------------------------------


def _bits_hints(bs: int, dq: bool, d: int) -> list[tuple[float, str]]:
    want = 4 + (8 / bs + 32 / (bs * d) if dq else 32 / bs)
    hints = [
        (want - 4, "the 4 bits of the code itself are missing: add 4"),
        (4.0, "the scaling constants are missing (or `//` rounded their share to 0): one absmax "
              "per block adds its bits / blocksize, with true division"),
        (want / 8, "you computed bytes, not bits"),
        (4 + 32 * bs, "the constant's bits are multiplied by the blocksize; divide them by it"),
    ]
    if dq:
        hints += [
            (4 + 8 / bs, "double quantisation's second-level constants are missing: one fp32 "
                         "absmax2 per dq_blocksize first-level constants adds "
                         "32 / (blocksize * dq_blocksize)"),
            (4 + 32 / bs + 32 / (bs * d), "with double quantisation the first-level constants "
                                          "take 8 bits, not 32"),
            (4 + 32 / bs, "with double quantisation the first-level constants take 8 bits, not "
                          "32 (and the second level adds 32 / (blocksize * dq_blocksize))"),
            (4 + 8 / bs + 32 / (bs * 256), f"you used dq_blocksize 256 although it is {d}: use "
                                           f"the argument, not a hard-coded 256"),
            (4 + 8 / bs + 16 / (bs * d), "the second-level absmax2 is fp32: 32 bits, not 16"),
            (4 + 8 / bs + 32 / d, "the second level's 32 bits are shared by blocksize * "
                                  "dq_blocksize weights, not dq_blocksize"),
        ]
    else:
        hints += [
            (4 + 16 / bs, "the absmax constants are fp32: 32 bits each, not 16"),
            (4 + 8 / bs, "without double quantisation the constants are fp32 (32 bits), not 8"),
            (4 + 8 / bs + 32 / (bs * d), "with double_quant=False there is no second level: "
                                         "4 + 32 / blocksize"),
        ]
    return hints


@check("nb03_bits_per_param", forbid=_BITS_FORBID)
def check_bits_per_parameter(student_fn: Callable[..., Any]) -> None:
    """``student_fn(blocksize, double_quant, dq_blocksize=256)``: stored bits per weight."""
    what = "bits_per_parameter(blocksize, double_quant, dq_blocksize)"
    w = _weights((512, 1024), 20)
    cases = [(64, False, 256), (64, True, 256), (32, False, 256), (128, True, 256),
             (256, True, 256), (4096, False, 256), (64, True, 128), (32, True, 512)]
    for bs, dq, d in cases:
        got = call_student(student_fn, bs, dq, d, what=what)
        label = f"bits_per_parameter({bs}, {dq}, {d})"
        expect(got is not None, f"{label} returned None: did you forget the `return`?")
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        expect(
            isinstance(got, (int, float)) and not isinstance(got, bool),
            f"{label} returned a {type(got).__name__}; return a number of bits.",
        )
        want = 4 + (8 / bs + 32 / (bs * d) if dq else 32 / bs)
        if d == 256:  # the formula is what a real tensor stores (offset aside)
            packed, state = _quantize_nf4(w, bs, double_quant=dq)
            measured = _storage_bits(state, packed)
            assert abs(measured - want) < 1e-3, f"internal: measured {measured} vs {want}"
        if abs(got - want) > 1e-9:
            for value, hint in _bits_hints(bs, dq, d):
                if abs(got - value) < 1e-9:
                    fail(f"{label} returned {got:.6g}, expected {want:.6g}.", hint + ".")
            fail(f"{label} returned {got!r}, expected {want:.6g}.",
                 "count what is stored per weight: the 4-bit code, plus each constant's bits "
                 "spread over the weights it scales (an fp32 absmax per block; with double "
                 "quantisation an 8-bit code per block and an fp32 absmax2 per dq_blocksize "
                 "blocks).")
    got = call_student(student_fn, 64, True, what="bits_per_parameter(64, True)",
                       explain=lambda exc: "keep the signature bits_per_parameter(blocksize=64, "
                                           "double_quant=False, dq_blocksize=256)")
    expect(isinstance(got, (int, float)) and abs(got - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-9,
           f"bits_per_parameter(64, True) returned {got!r}: the default dq_blocksize must be "
           f"256, as in the signature.")


# ---------------------------------------------------------------------------------------------
# 6. Exercise 3: the QLoRA model
# ---------------------------------------------------------------------------------------------

_TARGETS = ("q_proj", "v_proj")
_WANT_R, _WANT_ALPHA = 8, 16


def _layer_quantisation(layer: nn.Module) -> tuple[str, bool, int, torch.dtype]:
    """``(quant_type, double_quant, blocksize, compute_dtype)`` read from a built 4-bit layer."""
    if isinstance(layer, NF4Linear):
        return "nf4", layer.double_quant, layer.blocksize, layer.compute_dtype
    qs = layer.weight.quant_state  # bitsandbytes.nn.Linear4bit
    return qs.quant_type, bool(qs.nested), int(qs.blocksize), layer.compute_dtype


@check("nb03_qlora_model")
def check_qlora_model(model: Any, make_base: Callable[[], nn.Module] | None = None) -> None:
    """Exercise 3's model: NF4 + double quantisation, fp32 compute, LoRA r=8, alpha=16 on every
    q_proj / v_proj and nothing else, only LoRA trainable. Reads the built layers.

    ``check_qlora_model(build_qlora_model, load_pretrained)`` builds the model from a fresh base
    (and checks that it wraps that base); ``check_qlora_model(model)`` checks a built model.
    """
    what = "the model of exercise 3 (build_qlora_model)"
    base = None
    if make_base is not None:
        base = make_base()
        model = call_student(model, base, what="build_qlora_model(base)")
    expect(model is not None, f"{what} is None: did you forget the `return`?")
    expect(
        isinstance(model, QLoRAModel),
        f"{what} should be a QLoRAModel(model, quantization_config, lora_config), got "
        f"{type(model).__name__}.",
        "apply_lora alone adds LoRA to a full-precision model; QLoRAModel quantises the base "
        "to 4 bits first.",
    )
    expect(base is None or model.model is base,
           f"{what} does not wrap the `base` model it was given.",
           "build it from the argument: QLoRAModel(base, ...), not from another model (a "
           "fresh load_pretrained() or one made elsewhere in the notebook).")
    inner = model.model
    quantized = _quantized_types(None)
    named = dict(inner.named_modules())
    lora = {n: m for n, m in named.items() if isinstance(m, LinearWithLoRA)}
    base = {n: (m.base_layer if n in lora else m) for n, m in named.items()
            if n.rpartition(".")[0] not in lora and (
                isinstance(m, (nn.Linear, *quantized)) or n in lora)}
    for name, layer in base.items():
        if name.endswith("lm_head"):
            continue
        expect(isinstance(layer, quantized),
               f"{what}: layer {name!r} is a {type(layer).__name__}, not 4-bit.",
               "every linear layer except the output head is quantised: do not list it in "
               "llm_int8_skip_modules.")
        quant_type, dq, blocksize, dtype = _layer_quantisation(layer)
        expect(quant_type == "nf4",
               f"{what}: layer {name!r} is quantised to {quant_type!r}, not NF4.",
               "bnb_4bit_quant_type='nf4' (NormalFloat, QLoRA's data type).")
        expect(dq,
               f"{what}: the weights of layer {name!r} are not double-quantised (its absmax "
               f"constants are fp32).",
               "pass bnb_4bit_use_double_quant=True in the QuantizationConfig *before* building "
               "the model: the layers are quantised when QLoRAModel is created, a flag set "
               "afterwards changes nothing.")
        expect(blocksize == 64,
               f"{what}: layer {name!r} uses blocks of {blocksize} weights, expected 64.",
               "keep QLoRA's blocksize 64 (the QuantizationConfig default).")
        expect(dtype == torch.float32,
               f"{what}: layer {name!r} computes in {dtype}, expected torch.float32.",
               "bnb_4bit_compute_dtype=torch.float32 (on this CPU; bfloat16 is the GPU choice).")
    qc = model.quantization_config
    expect(qc.bnb_4bit_use_double_quant and qc.bnb_4bit_quant_type == "nf4",
           f"{what}: its quantization_config says quant_type={qc.bnb_4bit_quant_type!r}, "
           f"double_quant={qc.bnb_4bit_use_double_quant}, unlike its layers.",
           "build the QuantizationConfig with the right values before QLoRAModel; do not edit "
           "it afterwards.")
    targets = sorted(n for n in base if n.rpartition(".")[2] in _TARGETS)
    extra = sorted(n for n in lora if n.rpartition(".")[2] not in _TARGETS)
    missing = [n for n in targets if n not in lora]
    expect(not extra,
           f"{what}: LoRA should sit on q_proj and v_proj only, but these layers have it too: "
           f"{extra[:4]}.",
           "target_modules=['q_proj', 'v_proj'] (not 'all-linear').")
    expect(not missing,
           f"{what}: these q_proj / v_proj layers have no LoRA adapter: {missing[:4]}.",
           "every requested target gets an adapter: target_modules=['q_proj', 'v_proj'].")
    for name, layer in lora.items():
        r, alpha, scaling = layer.lora.r, layer.lora.lora_alpha, layer.lora.scaling
        expect(r == _WANT_R, f"{what}: the adapter of {name!r} has rank r={r}, expected r=8.",
               "LoRAConfig(r=8, ...).")
        expect(abs(scaling - _WANT_ALPHA / _WANT_R) < 1e-12,
               f"{what}: the adapter of {name!r} scales by {scaling:g} (lora_alpha={alpha:g}, "
               f"r={r}), expected lora_alpha / r = 16 / 8 = 2.",
               "LoRAConfig(lora_alpha=16, ...) (and use_rslora off).")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    expect(
        bool(trainable) and all(".lora." in n for n in trainable),
        f"{what}: only LoRA parameters may be trainable, but these are too: "
        f"{[n for n in trainable if '.lora.' not in n][:4]}.",
        "call prepare_for_training() on the QLoRAModel (it freezes everything but LoRA).",
    )
    expect(model.training,
           f"{what} is in eval mode.",
           "return model.prepare_for_training(): it puts the model in training mode.")
