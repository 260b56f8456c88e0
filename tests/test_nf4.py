"""NF4 in plain PyTorch (course_lib.model.nf4): properties, parity with bitsandbytes, bad input.

Parity tests compare against ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``
and ``dequantize_4bit`` on CPU and are skipped only when bitsandbytes is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.model import nf4
from course_lib.model.nf4 import (
    Blockwise8bitState,
    NF4State,
    dequantize_nf4,
    nf4_codebook,
    quantize_nf4,
    storage_bits_per_parameter,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# Element counts: even and a multiple of 64; odd (2145, 1935, 7); even but not a multiple of any
# blocksize (77100); shorter than one block (7); 1-D, 2-D and 3-D.
SHAPES = [(128, 256), (33, 65), (300, 257), (5, 3, 129), (7,)]


@pytest.fixture(scope="module")
def bnbf():
    """bitsandbytes.functional, or skip the parity tests when bitsandbytes is missing."""
    import course_lib  # noqa: F401  (installs the filter for bitsandbytes' hub-kernel warning)

    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    return F


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _bnb_dequantize(F, packed, state):
    """bitsandbytes' dequantize_4bit of ``(packed, state)``.

    bitsandbytes 0.50.2's compiled CPU kernel decodes wrong values when the tensor has several
    rows and a block spans two of them (last dimension not a multiple of the blocksize; seen
    with its AVX512 build, errors of several absmax). For those shapes we let it decode the
    same codes and constants as one flat row, which it gets right, and reshape.
    """
    shape = state.shape
    if len(shape) > 1 and shape[-1] % state.blocksize != 0:
        flat_state = F.QuantState(
            absmax=state.absmax,
            shape=torch.Size([math.prod(shape)]),
            dtype=state.dtype,
            blocksize=state.blocksize,
            code=state.code,
            quant_type="nf4",
            offset=state.offset,
            state2=state.state2,
        )
        return F.dequantize_4bit(packed, flat_state, quant_type="nf4").reshape(shape)
    return F.dequantize_4bit(packed, state, quant_type="nf4")


def _from_bnb_state(state) -> NF4State:
    state2 = None
    if state.state2 is not None:
        s2 = state.state2
        state2 = Blockwise8bitState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize)
    return NF4State(
        absmax=state.absmax,
        shape=state.shape,
        dtype=state.dtype,
        blocksize=state.blocksize,
        offset=state.offset,
        state2=state2,
    )


# --------------------------------------------------------------------------------------------
# The codebooks
# --------------------------------------------------------------------------------------------
def test_codebook_is_asymmetric_normal_quantiles():
    code = nf4_codebook()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.all(code[1:] > code[:-1]), "levels must be sorted and distinct"
    assert code[0].item() == -1.0 and code[-1].item() == 1.0
    assert code[7].item() == 0.0, "an exact zero at code 7"
    assert (code < 0).sum().item() == 7 and (code > 0).sum().item() == 8
    # The positive levels are quantiles of N(0, 1) at evenly spaced probabilities, rescaled:
    # Phi(level * Phi^-1(offset)) must be evenly spaced between 0.5 and the offset.
    top = torch.special.ndtri(torch.tensor(nf4.NF4_OFFSET, dtype=torch.float64))
    probs = torch.special.ndtr(code[7:].double() * top)
    steps = probs[1:] - probs[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (nf4.NF4_OFFSET - 0.5) / 8), atol=1e-6)


def test_codebook_is_a_fresh_copy():
    code = nf4_codebook()
    code.zero_()
    assert nf4_codebook()[0].item() == -1.0


def test_dynamic_map_structure():
    code = nf4.dynamic_map()
    assert code.shape == (256,) and torch.all(code[1:] >= code[:-1])
    assert code.max().item() == 1.0 and (code == 0).sum().item() == 1
    assert (code > 0).sum().item() == 128 and (code < 0).sum().item() == 127


def test_codebooks_equal_bitsandbytes(bnbf):
    assert torch.equal(nf4_codebook(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnbf.create_dynamic_map())
    # FP4: same set of values as bitsandbytes' table (which is stored in bit-pattern order).
    fp4_bnb = torch.unique(bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.allclose(nf4.fp4_codebook(), fp4_bnb)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def test_pack_nibbles_order_and_padding():
    codes = torch.tensor([1, 2, 15, 0, 9], dtype=torch.uint8)
    packed = nf4.pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x97], "element 2i in the high nibble, pad with 7"
    assert torch.equal(nf4.unpack_nibbles(packed, 5), codes)


def test_nearest_level_ties_go_down():
    code = nf4_codebook()
    mid = nf4.nf4_midpoints()
    assert torch.equal(nf4.nearest_level(mid, code), torch.arange(15, dtype=torch.int32))
    assert nf4.nearest_level(torch.tensor([-1.5, 1.5]), code).tolist() == [0, 15]


def test_blockwise_absmax_with_tail():
    x = torch.tensor([1.0, -3.0, 2.0, 0.5, -0.25])
    assert nf4.blockwise_absmax(x, 2).tolist() == [3.0, 2.0, 0.25]


def test_roundtrip_error_bounded_by_half_the_largest_gap():
    w = _weights((64, 128), torch.float32, seed=1)
    packed, state = quantize_nf4(w, 64)
    err = (dequantize_nf4(packed, state) - w).abs().view(-1, 64)
    code = nf4_codebook()
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    assert torch.all(err <= state.absmax.unsqueeze(1) * half_gap * (1 + 1e-6))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=700),
    log_bs=st.integers(min_value=5, max_value=12),
    seed=st.integers(min_value=0, max_value=2**16),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
)
def test_roundtrip_property(n, log_bs, seed, scale):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    packed, state = quantize_nf4(w, 2**log_bs)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
    out = dequantize_nf4(packed, state)
    assert out.shape == w.shape and torch.isfinite(out).all()
    # Every element keeps its block's scale: the error is at most half the largest gap between
    # levels (-1 to -0.696: 0.152) times the block's absmax.
    absmax = state.absmax.repeat_interleave(2**log_bs)[:n]
    assert torch.all((out - w).abs() <= 0.1521 * absmax)


def test_zero_blocks_dequantise_to_zero():
    w = _weights((4, 64), torch.float32)
    w[1] = 0.0  # one whole block of zeros
    for double_quant in (False, True):
        packed, state = quantize_nf4(w, 64, double_quant=double_quant)
        out = dequantize_nf4(packed, state)
        assert torch.isfinite(out).all()
        assert torch.equal(out[1], torch.zeros(64)), "an all-zero block must come back as zeros"
    zeros = torch.zeros(3, 100)
    for double_quant in (False, True):
        packed, state = quantize_nf4(zeros, 32, double_quant=double_quant)
        assert torch.equal(dequantize_nf4(packed, state), zeros)


def test_constant_tensor_with_double_quant():
    # All absmax constants equal: the centred constants are 0 and so is their second-level
    # absmax. The codes must decode to the offset again (no 0/0).
    w = torch.full((8, 64), 0.25)
    packed, state = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(state.state2.absmax, torch.zeros(1))
    assert torch.equal(dequantize_nf4(packed, state), w)


def test_state_fields_and_dtypes():
    w = _weights((10, 100), torch.bfloat16)
    packed, state = quantize_nf4(w, 128)
    assert state.shape == w.shape and state.dtype == torch.bfloat16 and state.blocksize == 128
    assert state.absmax.dtype == torch.float32 and state.absmax.shape == (8,)
    assert state.offset is None and state.state2 is None and not state.double_quant
    assert dequantize_nf4(packed, state).dtype == torch.bfloat16
    packed, state = quantize_nf4(w, 64, double_quant=True)
    assert state.double_quant and state.absmax.dtype == torch.uint8
    assert state.offset.dtype == torch.float32 and state.offset.dim() == 0
    assert state.state2.blocksize == 256 and state.state2.absmax.shape == (1,)


def test_dequantize_accepts_noncontiguous_and_2d_packed():
    w = _weights((16, 64), torch.float32)
    packed, state = quantize_nf4(w)
    ref = dequantize_nf4(packed, state)
    assert torch.equal(dequantize_nf4(packed.view(-1, 1), state), ref)
    padded = torch.zeros(packed.numel() * 2, dtype=torch.uint8)
    padded[::2] = packed
    assert torch.equal(dequantize_nf4(padded[::2], state), ref)
    odd_offset = torch.cat([torch.zeros(1, dtype=torch.uint8), packed])[1:]
    assert torch.equal(dequantize_nf4(odd_offset, state), ref)


def test_blockwise_8bit_roundtrip_with_the_default_map():
    x = torch.linspace(-3.0, 2.0, 300)
    q, state = nf4.quantize_blockwise_8bit(x, blocksize=128)
    assert q.dtype == torch.uint8 and q.shape == x.shape and state.absmax.shape == (3,)
    assert torch.equal(state.code, nf4.dynamic_map())
    back = nf4.dequantize_blockwise_8bit(q, state)
    # the dynamic map's largest relative gap near 1 is about 1/127: the error is below absmax/100
    scale = state.absmax.repeat_interleave(128)[:300]
    assert torch.all((back - x).abs() <= scale / 100)
    with pytest.raises(TypeError, match="blocksize must be a positive int"):
        nf4.quantize_blockwise_8bit(x, blocksize=2.0)
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        nf4.quantize_blockwise_8bit(x, blocksize=0)
    with pytest.raises(TypeError, match="q must be a uint8 tensor"):
        nf4.dequantize_blockwise_8bit(q.tolist(), state)
    with pytest.raises(ValueError, match="q must be a uint8 tensor"):
        nf4.dequantize_blockwise_8bit(q.int(), state)
    with pytest.raises(ValueError, match="state.absmax has 2 blocks but 299 values at blocksize 128 need 3"):
        nf4.dequantize_blockwise_8bit(q[:299], Blockwise8bitState(state.absmax[:2], state.code, 128))


def test_state_to_device_copies_every_tensor():
    packed, state = quantize_nf4(_weights((4, 64), torch.float32), 64, double_quant=True)
    moved = state.to("meta")
    assert moved.absmax.device.type == moved.offset.device.type == "meta"
    assert moved.state2.absmax.device.type == moved.state2.code.device.type == "meta"
    assert (moved.shape, moved.dtype, moved.blocksize) == (state.shape, state.dtype, 64)
    assert moved.state2 is not state.state2, "a new state, the original is unchanged"
    assert state.absmax.device.type == "cpu"
    _, plain = quantize_nf4(_weights((4, 64), torch.float32), 64)
    assert plain.to("meta").offset is None and plain.to("meta").state2 is None


def test_codebook_roundtrip_with_nf4_is_quantise_then_dequantise():
    w = _weights((33, 65), torch.float32, seed=4)
    for blocksize in (32, 64, 4096):
        ref = dequantize_nf4(*quantize_nf4(w, blocksize), fast=False)
        assert torch.equal(nf4.codebook_roundtrip(w, nf4_codebook(), blocksize), ref)
    # blocksize=None: one absmax for the whole tensor; any positive blocksize is allowed
    whole = nf4.codebook_roundtrip(w, nf4.int4_codebook(), None)
    assert whole.dtype == torch.float32 and whole.shape == w.shape
    assert whole.abs().max() == w.abs().max()  # the largest value is a level (k = 7)
    assert nf4.codebook_roundtrip(w, nf4.fp4_codebook(), 16).shape == w.shape
    with pytest.raises(TypeError, match="blocksize must be a positive int"):
        nf4.codebook_roundtrip(w, nf4_codebook(), "64")
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        nf4.codebook_roundtrip(w, nf4_codebook(), -1)


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------
def test_storage_bits_per_parameter_paper_numbers():
    w = _weights((1024, 1024), torch.float32)
    packed, state = quantize_nf4(w, 64)
    bits = storage_bits_per_parameter(state, packed)
    assert bits == pytest.approx(4.5, abs=1e-9)  # 4 + 32/64
    packed, state = quantize_nf4(w, 64, double_quant=True)
    bits_dq = storage_bits_per_parameter(state, packed)
    # 4 + 8/64 + 32/(64*256), plus one fp32 offset for the whole tensor
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel()
    assert bits_dq == pytest.approx(expected, rel=1e-12)
    assert bits_dq == pytest.approx(4.127, abs=1e-3)
    # Without `packed` the code bytes are what quantize_nf4 produces.
    assert storage_bits_per_parameter(state) == pytest.approx(bits_dq)
    with_tables = storage_bits_per_parameter(state, packed, include_codebooks=True)
    assert with_tables == pytest.approx(bits_dq + 8 * (16 * 4 + 256 * 4) / w.numel())


def test_storage_bits_measured_from_tensors():
    w = _weights((3, 100), torch.float16)  # 300 values, blocksize 128 -> 3 blocks (one partial)
    packed, state = quantize_nf4(w, 128)
    assert storage_bits_per_parameter(state, packed) == pytest.approx(8 * (150 + 3 * 4) / 300)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "w",
    [
        torch.arange(64),
        torch.ones(64, dtype=torch.int8),
        torch.ones(64, dtype=torch.bool),
        torch.ones(64, dtype=torch.float64),
        torch.ones(64, dtype=torch.complex64),
    ],
    ids=["int64", "int8", "bool", "float64", "complex64"],
)
def test_rejects_non_float_dtypes(w):
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("double_quant", [False, True])
def test_rejects_non_finite(bad, double_quant):
    w = torch.randn(3, 70)
    w[2, 5] = bad  # in the partial last block
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(w, 64, double_quant=double_quant)
    w = torch.randn(3, 70)
    w[0, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(w, 64, double_quant=double_quant)


@pytest.mark.parametrize("shape", [(0,), (0, 64), (4, 0)])
def test_rejects_empty(shape):
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(shape))


@pytest.mark.parametrize("blocksize", [0, -64, 16, 48, 100, 8192])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \{32, 64,"):
        quantize_nf4(torch.randn(128), blocksize)


@pytest.mark.parametrize("blocksize", [64.0, "64", True, None])
def test_rejects_blocksize_of_the_wrong_type(blocksize):
    with pytest.raises(TypeError, match=r"blocksize must be a power of two in \{32, 64,"):
        quantize_nf4(torch.randn(128), blocksize)


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_nf4([0.1, 0.2])
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        quantize_nf4(torch.randn(64), 64, double_quant="yes")
    packed, state = quantize_nf4(torch.randn(10, 64))
    with pytest.raises(ValueError, match="packed must be a uint8"):
        dequantize_nf4(packed.int(), state)
    with pytest.raises(TypeError, match="packed must be a uint8 tensor .* got list"):
        dequantize_nf4(packed.tolist(), state)
    with pytest.raises(TypeError, match="fast must be True or False"):
        dequantize_nf4(packed, state, fast=1)
    short = NF4State(state.absmax[:-1], state.shape, state.dtype, state.blocksize)
    with pytest.raises(ValueError, match="state.absmax has 9 blocks but 640 values at blocksize 64 need 10"):
        dequantize_nf4(packed, short)
    with pytest.raises(ValueError, match="packed has 319 bytes but shape"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(TypeError, match="state must be the NF4State"):
        dequantize_nf4(packed, {"absmax": state.absmax})
    with pytest.raises(TypeError, match="state must be the NF4State"):
        storage_bits_per_parameter(packed)


# --------------------------------------------------------------------------------------------
# Parity with bitsandbytes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_parity_with_bitsandbytes(bnbf, dtype, shape, blocksize):
    w = _weights(shape, dtype, seed=blocksize)
    w.view(-1)[3] = 0.31  # one outlier: its block gets a larger absmax than the others
    packed, state = quantize_nf4(w, blocksize)
    ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed, ref_packed.view(-1)), "packed codes must be byte-identical"
    assert torch.equal(state.absmax, ref_state.absmax), "absmax must be bit-identical"
    out = dequantize_nf4(packed, state)
    ref_out = _bnb_dequantize(bnbf, ref_packed, ref_state)
    assert out.dtype == ref_out.dtype == dtype and out.shape == ref_out.shape == w.shape
    assert torch.equal(out, ref_out), "dequantised tensors must be identical"
    assert torch.equal(dequantize_nf4(packed, state, fast=False), ref_out), "the reference too"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "blocksize"), [((512, 1024), 64), ((300, 257), 32), ((7,), 64)])
def test_double_quant_parity_with_bitsandbytes(bnbf, dtype, shape, blocksize):
    w = _weights(shape, dtype, seed=7)
    packed, state = quantize_nf4(w, blocksize, double_quant=True)
    ref_packed, ref_state = bnbf.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=True
    )
    assert torch.equal(packed, ref_packed.view(-1))
    assert torch.equal(state.offset, ref_state.offset), "offset (mean absmax) must be identical"
    assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
    assert torch.equal(state.state2.code, ref_state.state2.code)
    # Decoding is bit-exact: our dequantisation of bitsandbytes' own state equals its output.
    ref_out = _bnb_dequantize(bnbf, ref_packed, ref_state)
    for fast in (True, False):
        assert torch.equal(dequantize_nf4(ref_packed, _from_bnb_state(ref_state), fast=fast), ref_out)

    # The 8-bit codes of the constants: bitsandbytes' CPU kernel finds them with an approximate
    # lookup-table search, so a few per thousand are not the nearest level; ours always are.
    # Where the second-level absmax of a 256-block is 0 (all constants equal to the offset),
    # bitsandbytes codes 0/0 = NaN and any code decodes to the offset; skip those blocks.
    absmax = nf4.blockwise_absmax(w.reshape(-1), blocksize)
    scale = state.state2.absmax.repeat_interleave(256)[: absmax.numel()]
    valid = scale > 0
    ours, theirs = state.absmax[valid].long(), ref_state.absmax[valid].long()
    normed = ((absmax - state.offset)[valid]) / scale[valid]
    code = nf4.dynamic_map()
    differ = ours != theirs
    assert differ.sum().item() <= 0.01 * differ.numel(), "at most 1 % of the codes may differ"
    assert torch.all((ours - theirs).abs() <= 2), "and only by a level or two"
    dist_ours = (normed - code[ours]).abs()
    dist_theirs = (normed - code[theirs]).abs()
    assert torch.all(dist_ours <= dist_theirs + 1e-7), "our code is the nearest level"
    # So the decoded constants agree to within one step of the 8-bit map.
    ours_fp32, theirs_fp32 = state.fp32_absmax(), _from_bnb_state(ref_state).fp32_absmax()
    step = (code[1:] - code[:-1]).max() * state.state2.absmax.max()
    assert torch.all((ours_fp32 - theirs_fp32).abs() <= 2 * step)


def test_double_quant_code_difference_is_rare_on_a_large_tensor(bnbf):
    w = _weights((1024, 4096), torch.float32, seed=3)
    _, state = quantize_nf4(w, 64, double_quant=True)
    _, ref_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    per_thousand = 1000 * (state.absmax != ref_state.absmax).float().mean().item()
    assert per_thousand <= 5.0, f"{per_thousand:.2f} codes per thousand differ"
