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

``VARIANTS`` lists the mistakes and correct alternatives these checks know (see
:mod:`course_lib.checks.variants`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from course_lib.checks import call_student, check, expect, fail
from course_lib.checks.variants import BLOCK, alternative, mistake
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


# ---------------------------------------------------------------------------------------------
# The mistakes (and correct alternatives) these checks know
# ---------------------------------------------------------------------------------------------

_A = "nb03_absmax_scale_impl"
_N = "nb03_nearest_level_impl"
_P = "nb03_pack_nibbles_impl"
_D = "nb03_double_quant_impl"
_B = "nb03_bits_per_param_impl"
_M = "nb03_qlora_model_impl"
_OWN = "the check runs your own implementation: write it instead of calling"
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
