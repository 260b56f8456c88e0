"""Checks for notebook 03_qlora: the student's NF4 building blocks and QLoRA set-up.

Each check runs the student's function on small seeded inputs, compares it with
``course_lib.model.nf4`` (the reference implementation, bit-exact with bitsandbytes) and, on a
mismatch, names the most likely mistake (per-row instead of per-block absmax, division by zero
in an all-zero block, rounding to the level above instead of the nearest, nibbles swapped, mean
not subtracted, ...). The global random state is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from course_lib.checks import call_student, expect, passed
from course_lib.model import nf4 as ref

__all__ = [
    "check_blockwise_absmax_scale",
    "check_nearest_level",
    "check_pack_nibbles",
    "check_double_quantize",
    "check_bits_per_parameter",
    "check_qlora_model",
]


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
    expect(
        isinstance(result, tuple) and len(result) == len(names),
        f"{what} should return a tuple ({', '.join(names)}), got {type(result).__name__}"
        + (f" of length {len(result)}" if isinstance(result, tuple) else "")
        + ".",
    )
    return result


# ---------------------------------------------------------------------------------------------
# 1. Blockwise absmax scaling
# ---------------------------------------------------------------------------------------------


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
    for label, w, bs in cases:
        w_in = w.clone()
        result = call_student(student_fn, w_in, bs, what=what)
        scaled, absmax = _pair(result, what, ("scaled", "absmax"))
        scaled = _as_tensor(scaled, what, "scaled")
        absmax = _as_tensor(absmax, what, "absmax")
        expect(torch.equal(w_in, w), f"{what} changed its input w in place; leave w unchanged.")
        flat = w.reshape(-1).float()
        n_blocks = flat.numel() // bs
        want_absmax = flat.view(n_blocks, bs).abs().amax(dim=1)
        if absmax.numel() != n_blocks:
            rows = w.shape[0] if w.dim() > 1 else None
            hint = (
                "you took one absmax per row: blocks are `blocksize` consecutive values of the "
                "flattened weight, w.reshape(-1, blocksize)"
                if rows is not None and absmax.numel() == rows
                else f"there are w.numel() / blocksize = {n_blocks} blocks"
            )
            raise AssertionError(
                f"{what} on {label}: absmax has {absmax.numel()} values, expected {n_blocks}: "
                f"{hint}."
            )
        absmax = absmax.reshape(-1)
        expect(
            absmax.dtype == torch.float32,
            f"{what} on {label}: absmax has dtype {absmax.dtype}; compute in float32 "
            f"(w.float()), as bitsandbytes stores the constants in fp32.",
        )
        if not torch.allclose(absmax, want_absmax, rtol=1e-6, atol=0):
            signed = flat.view(n_blocks, bs).amax(dim=1)
            hint = (
                "you took the maximum, not the absolute maximum: negative values count too "
                "(x.abs().amax(...))"
                if torch.allclose(absmax, signed)
                else "absmax[i] = max |w| over block i of w.reshape(-1, blocksize)"
            )
            raise AssertionError(f"{what} on {label}: wrong absmax values: {hint}.")
        expect(
            tuple(scaled.shape) == (n_blocks, bs),
            f"{what} on {label}: scaled has shape {tuple(scaled.shape)}, expected "
            f"(n_blocks, blocksize) = ({n_blocks}, {bs}).",
        )
        expect(
            bool(torch.isfinite(scaled).all()),
            f"{what} on {label}: scaled contains NaN or inf. An all-zero block has absmax 0; "
            f"divide by absmax.clamp(min=1e-38) (or handle 0 otherwise) so it scales to zeros.",
        )
        want_scaled = flat.view(n_blocks, bs) / want_absmax.clamp(min=1e-38).unsqueeze(1)
        if not torch.allclose(scaled.float(), want_scaled, rtol=1e-6, atol=1e-7):
            hint = "divide each block by its own absmax: scaled = blocks / absmax[:, None]"
            if scaled.abs().max().item() > 1 + 1e-6:
                hint += " (your values leave [-1, 1], so some are not divided by their absmax)"
            raise AssertionError(f"{what} on {label}: wrong scaled values: {hint}.")
    passed("nb03_absmax_scale")


# ---------------------------------------------------------------------------------------------
# 2. Nearest-level coding
# ---------------------------------------------------------------------------------------------


def _nearest_ok(scaled: torch.Tensor, got: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Elements whose code is a nearest level (ties and 1-ulp differences accepted)."""
    want = ref.nearest_level(scaled, codebook).long()
    d_got = (scaled - codebook[got.clamp(0, codebook.numel() - 1)]).abs()
    d_want = (scaled - codebook[want]).abs()
    return (got == want) | ((d_got - d_want).abs() <= 1e-7)


def check_nearest_level(student_fn: Callable[..., Any]) -> None:
    """``student_fn(scaled, codebook) -> codes``: index of the nearest level of each value."""
    what = "nearest_level_code(scaled, codebook)"
    nf4_code = ref.nf4_codebook()
    gen = torch.Generator().manual_seed(5)
    cases = [
        ("random values in [-1, 1]", torch.rand(64, 32, generator=gen) * 2 - 1, nf4_code),
        ("the 16 NF4 levels themselves", nf4_code.clone(), nf4_code),
        ("values just above and below each midpoint",
         torch.cat([ref.nf4_midpoints() + 1e-4, ref.nf4_midpoints() - 1e-4]), nf4_code),
        ("the extremes -1 and 1", torch.tensor([-1.0, 1.0, 0.0]), nf4_code),
        ("random values and the int4 codebook (k/7)",
         torch.rand(200, generator=gen) * 2 - 1, ref.int4_codebook()),
    ]
    for label, scaled, codebook in cases:
        result = call_student(student_fn, scaled.clone(), codebook.clone(), what=what)
        got = _as_tensor(result, what, "codes")
        expect(
            tuple(got.shape) == tuple(scaled.shape),
            f"{what} on {label}: codes have shape {tuple(got.shape)}, expected the shape of "
            f"scaled, {tuple(scaled.shape)} (one code per value).",
        )
        expect(
            not got.is_floating_point() and got.dtype != torch.bool,
            f"{what} on {label}: codes have dtype {got.dtype}; return integer indices into "
            f"the codebook (e.g. torch.bucketize returns int64), not the levels themselves.",
        )
        got = got.long()
        expect(
            int(got.min()) >= 0 and int(got.max()) < codebook.numel(),
            f"{what} on {label}: codes must be indices 0..{codebook.numel() - 1}, got values "
            f"from {int(got.min())} to {int(got.max())}.",
        )
        ok = _nearest_ok(scaled, got, codebook)
        if not bool(ok.all()):
            above = torch.searchsorted(codebook, scaled.contiguous()).clamp(max=codebook.numel() - 1)
            below = (torch.searchsorted(codebook, scaled.contiguous(), right=True) - 1).clamp(min=0)
            if torch.equal(got, above):
                hint = (
                    "you found the first level >= each value (searchsorted on the levels); "
                    "compare with the midpoints between neighbouring levels instead"
                )
            elif torch.equal(got, below):
                hint = "you rounded down to the level below; pick the nearest level"
            else:
                hint = (
                    "code[i] must be the index of the level closest to scaled[i], e.g. "
                    "torch.bucketize(scaled, (codebook[:-1] + codebook[1:]) / 2)"
                )
            bad = int((~ok).sum())
            raise AssertionError(
                f"{what} on {label}: {bad} of {scaled.numel()} codes are not the nearest "
                f"level: {hint}."
            )
    passed("nb03_nearest_level")


# ---------------------------------------------------------------------------------------------
# 3. Nibble packing
# ---------------------------------------------------------------------------------------------


def check_pack_nibbles(student_fn: Callable[..., Any]) -> None:
    """``student_fn(codes) -> packed``: two 4-bit codes per byte, element 2i in the high nibble."""
    what = "pack_nibbles(codes)"
    gen = torch.Generator().manual_seed(6)
    cases = [
        ("codes [1, 2, 15, 0]", torch.tensor([1, 2, 15, 0], dtype=torch.uint8)),
        ("1000 random codes", torch.randint(0, 16, (1000,), generator=gen, dtype=torch.uint8)),
        ("random int64 codes of shape (8, 6)", torch.randint(0, 16, (8, 6), generator=gen)),
    ]
    for label, codes in cases:
        result = call_student(student_fn, codes.clone(), what=what)
        got = _as_tensor(result, what, "packed")
        n = codes.numel()
        flat = codes.reshape(-1).to(torch.uint8)
        want = (flat[0::2] << 4) | flat[1::2]
        expect(
            got.dtype == torch.uint8,
            f"{what} on {label}: packed has dtype {got.dtype}; store bytes as torch.uint8 "
            f"(.to(torch.uint8)).",
        )
        expect(
            got.numel() == n // 2,
            f"{what} on {label}: packed has {got.numel()} bytes, expected {n // 2}: two "
            f"4-bit codes share one byte.",
        )
        got = got.reshape(-1)
        if not torch.equal(got, want):
            swapped = (flat[1::2] << 4) | flat[0::2]
            hint = (
                "the nibbles are swapped: bitsandbytes puts element 2i in the HIGH nibble "
                "(codes[0::2] << 4) and element 2i+1 in the low one"
                if torch.equal(got, swapped)
                else "packed[i] = (codes[2i] << 4) | codes[2i+1]"
            )
            raise AssertionError(f"{what} on {label}: wrong bytes: {hint}.")
    passed("nb03_pack_nibbles")


# ---------------------------------------------------------------------------------------------
# 4. Double quantisation
# ---------------------------------------------------------------------------------------------


def check_double_quantize(student_fn: Callable[..., Any]) -> None:
    """``student_fn(absmax, blocksize=256) -> (codes, offset, absmax2)`` with the dynamic map."""
    what = "double_quantize(absmax, blocksize)"
    code = ref.dynamic_map()
    cases = []
    for seed, (shape, bs) in enumerate([((256, 512), 256), ((128, 1024), 128)]):
        _, state = ref.quantize_nf4(_weights(shape, 10 + seed) * (1 + seed), 64)
        cases.append((f"the {state.absmax.numel()} absmax constants of a {shape} weight, "
                      f"blocksize {bs}", state.absmax, bs))
    for label, absmax, bs in cases:
        result = call_student(student_fn, absmax.clone(), bs, what=what)
        codes, offset, absmax2 = _pair(result, what, ("codes", "offset", "absmax2"))
        codes = _as_tensor(codes, what, "codes")
        offset = torch.as_tensor(offset, dtype=torch.float32)
        absmax2 = _as_tensor(absmax2, what, "absmax2").float().reshape(-1)
        want_offset = absmax.mean()
        expect(
            offset.numel() == 1 and torch.allclose(offset.reshape(()), want_offset, rtol=1e-5),
            f"{what} on {label}: offset should be the mean of absmax ({want_offset.item():.6g}), "
            f"got {offset.reshape(-1)[:3].tolist()}.",
        )
        centred = absmax - want_offset
        n_blocks = absmax.numel() // bs
        expect(
            absmax2.numel() == n_blocks,
            f"{what} on {label}: absmax2 has {absmax2.numel()} values, expected one per block of "
            f"{bs} constants = {n_blocks}.",
        )
        want_absmax2 = centred.view(n_blocks, bs).abs().amax(dim=1)
        if not torch.allclose(absmax2, want_absmax2, rtol=1e-5):
            plain = absmax.view(n_blocks, bs).abs().amax(dim=1)
            hint = (
                "subtract the mean (offset) before taking the second-level absmax"
                if torch.allclose(absmax2, plain, rtol=1e-5)
                else "absmax2[j] = max |absmax - offset| over block j of `blocksize` constants"
            )
            raise AssertionError(f"{what} on {label}: wrong absmax2: {hint}.")
        expect(
            tuple(codes.shape) == tuple(absmax.shape) and codes.dtype == torch.uint8,
            f"{what} on {label}: codes should be uint8 with one code per constant "
            f"({absmax.numel()}), got {codes.dtype} of shape {tuple(codes.shape)}.",
        )
        scaled = centred.view(n_blocks, bs) / want_absmax2.unsqueeze(1)
        ok = _nearest_ok(scaled.reshape(-1), codes.long().reshape(-1), code)
        if not bool(ok.all()):
            raise AssertionError(
                f"{what} on {label}: {int((~ok).sum())} of {codes.numel()} codes are not the "
                f"nearest level of the dynamic map: scale each block of (absmax - offset) by "
                f"its absmax2, then code it with your nearest-level function and "
                f"dynamic_map()."
            )
        decoded = (code[codes.long()].view(n_blocks, bs) * absmax2.unsqueeze(1)).reshape(-1)
        decoded = decoded + offset.reshape(())
        rel = ((decoded - absmax).abs() / absmax).max().item()
        expect(
            rel < 0.05,
            f"{what} on {label}: decoding your codes gives constants off by up to "
            f"{100 * rel:.1f} %; check the offset and absmax2.",
        )
    passed("nb03_double_quant")


# ---------------------------------------------------------------------------------------------
# 5. Bits per parameter
# ---------------------------------------------------------------------------------------------


def check_bits_per_parameter(student_fn: Callable[..., Any]) -> None:
    """``student_fn(blocksize, double_quant, dq_blocksize=256)``: stored bits per weight."""
    what = "bits_per_parameter(blocksize, double_quant, dq_blocksize)"
    w = _weights((512, 1024), 20)
    for bs, dq in [(64, False), (64, True), (32, False), (128, True), (256, True), (4096, False)]:
        got = call_student(student_fn, bs, dq, 256, what=what)
        label = f"{what} with blocksize={bs}, double_quant={dq}"
        expect(got is not None, f"{label} returned None: did you forget the `return`?")
        expect(
            isinstance(got, (int, float)) and not isinstance(got, bool),
            f"{label} returned a {type(got).__name__}; return a number of bits.",
        )
        want = 4 + (8 / bs + 32 / (bs * 256) if dq else 32 / bs)
        packed, state = ref.quantize_nf4(w, bs, double_quant=dq)
        measured = ref.storage_bits_per_parameter(state, packed)
        if abs(got - want) > 1e-9:
            hints = [
                (want - 4, "add the 4 bits of the code itself"),
                (4 + 8 / bs if dq else None,
                 "the second-level constants are missing: one fp32 absmax per 256 first-level "
                 "constants adds 32 / (blocksize * 256)"),
                (4 + 32 / bs if dq else None,
                 "with double quantisation the first-level constants take 8 bits, not 32"),
                (4 + 8 * bs, "the constant's bits are divided by the blocksize, not multiplied"),
            ]
            for value, hint in hints:
                if value is not None and abs(got - value) < 1e-9:
                    raise AssertionError(f"{label} returned {got:.4f}, expected {want:.4f}: {hint}.")
            raise AssertionError(
                f"{label} returned {got!r}, expected {want:.4f} (measured on a real tensor: "
                f"{measured:.4f}): 4 bits per code + 32 bits per absmax block, or with double "
                f"quantisation 8 bits per block + 32 bits per 256 blocks."
            )
        expect(
            abs(measured - want) < 1e-3,
            f"internal: measured {measured} vs formula {want}",  # pragma: no cover
        )
    passed("nb03_bits_per_param")


# ---------------------------------------------------------------------------------------------
# 6. Exercise 3: the QLoRA model
# ---------------------------------------------------------------------------------------------


def check_qlora_model(model: Any) -> None:
    """Exercise 3's model: a QLoRAModel with NF4 + double quantisation, LoRA r=8 on q/v only."""
    from course_lib.model.lora import LinearWithLoRA
    from course_lib.model.qlora import QLoRAModel, _quantized_types

    what = "the model of exercise 3 (build_qlora_model)"
    expect(model is not None, f"{what} is None: did you forget the `return`?")
    expect(
        isinstance(model, QLoRAModel),
        f"{what} should be a QLoRAModel(model, quantization_config, lora_config), got "
        f"{type(model).__name__}.",
    )
    qc = model.quantization_config
    expect(
        qc.bnb_4bit_quant_type == "nf4",
        f"{what}: use bnb_4bit_quant_type='nf4' (NormalFloat), got {qc.bnb_4bit_quant_type!r}.",
    )
    expect(
        qc.bnb_4bit_use_double_quant,
        f"{what}: switch on double quantisation (bnb_4bit_use_double_quant=True).",
    )
    lc = model.lora_config
    expect(lc.r == 8, f"{what}: use LoRA rank r=8, got r={lc.r}.")
    quantized = _quantized_types(qc.backend)
    inner = model.model
    linears = {
        name: m for name, m in inner.named_modules() if isinstance(m, (nn.Linear, *quantized))
    }
    lora_names = sorted(n for n, m in inner.named_modules() if isinstance(m, LinearWithLoRA))
    expect(
        bool(lora_names) and all(n.endswith((".q_proj", ".v_proj")) for n in lora_names),
        f"{what}: LoRA should sit on q_proj and v_proj only (target_modules=['q_proj', "
        f"'v_proj']), got it on {lora_names[:6]}.",
    )
    for name, m in linears.items():
        if name.endswith("lm_head"):
            continue
        base = m
        expect(
            isinstance(base, quantized),
            f"{what}: layer {name!r} is a {type(base).__name__}, not 4-bit; every linear layer "
            f"except the output head should be quantised.",
        )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    expect(
        bool(trainable) and all(".lora." in n for n in trainable),
        f"{what}: only LoRA parameters may be trainable, but these are too: "
        f"{[n for n in trainable if '.lora.' not in n][:4]} (call prepare_for_training()).",
    )
    passed("nb03_qlora_model")
