"""course_lib.kernels.nf4: the fast dequantisation equals the textbook gather bit for bit.

The oracle is ``dequantize_nf4(..., fast=False)``: ``codebook[codes] * absmax`` per element.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.kernels import nf4 as nf4_kernels
from course_lib.model.nf4 import (
    NF4State,
    dequantize_nf4,
    nf4_codebook,
    quantize_nf4,
    unpack_nibbles,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _weights(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def test_byte_table_holds_both_levels_of_every_byte_high_nibble_first():
    code = nf4_codebook()
    table = nf4_kernels.byte_table(code)
    assert table.dtype == torch.int64 and table.shape == (256,)
    levels = table.view(torch.float32).view(256, 2)
    byte = torch.arange(256)
    assert torch.equal(levels[:, 0], code[byte >> 4])
    assert torch.equal(levels[:, 1], code[byte & 0x0F])
    assert levels[0x7F].tolist() == [0.0, 1.0]  # code 7 is the zero level, 15 the top


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    ("shape", "blocksize"),
    [((128, 512), 64), ((33, 65), 32), ((300, 257), 128), ((5, 3, 129), 4096), ((7,), 64),
     ((1,), 32)],
    ids=str,
)
def test_fast_equals_reference(dtype, double_quant, shape, blocksize):
    w = _weights(shape, dtype, seed=blocksize)
    w.view(-1)[0] = 0.4  # an outlier in the first block
    packed, state = quantize_nf4(w, blocksize, double_quant=double_quant)
    fast = dequantize_nf4(packed, state)
    plain = dequantize_nf4(packed, state, fast=False)
    assert fast.dtype == plain.dtype == dtype and fast.shape == plain.shape == w.shape
    assert torch.equal(_bits(fast), _bits(plain)), "bit for bit, signed zeros included"


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=300),
    odd=st.booleans(),
    log_bs=st.integers(min_value=5, max_value=8),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_fast_equals_reference_on_any_bytes(data, odd, log_bs, seed):
    # Any byte pattern (all 256 values occur across examples), any number of codes, any absmax,
    # zeros and negative-zero products included.
    packed = torch.tensor(list(data), dtype=torch.uint8)
    n = 2 * packed.numel() - (1 if odd else 0)
    blocksize = 2**log_bs
    n_blocks = -(-n // blocksize)
    g = torch.Generator().manual_seed(seed)
    absmax = torch.rand(n_blocks, generator=g) * 10.0 ** torch.randint(-30, 5, (1,), generator=g)
    absmax[torch.rand(n_blocks, generator=g) < 0.2] = 0.0
    state = NF4State(absmax=absmax, shape=torch.Size([n]), dtype=torch.float32, blocksize=blocksize)
    fast = dequantize_nf4(packed, state)
    plain = dequantize_nf4(packed, state, fast=False)
    assert torch.equal(_bits(fast), _bits(plain))
    # and the reference is the textbook formula itself
    codes = unpack_nibbles(packed, n).long()
    textbook = nf4_codebook()[codes] * absmax[torch.arange(n) // blocksize]
    assert torch.equal(_bits(plain), _bits(textbook))


def test_fast_path_accepts_any_layout_of_packed():
    w = _weights((16, 64))
    packed, state = quantize_nf4(w)
    ref = dequantize_nf4(packed, state, fast=False)
    strided = torch.zeros(packed.numel() * 2, dtype=torch.uint8)
    strided[::2] = packed
    odd_offset = torch.cat([torch.zeros(1, dtype=torch.uint8), packed])[1:]
    for layout in (packed.view(-1, 1), strided[::2], odd_offset):
        assert torch.equal(dequantize_nf4(layout, state), ref)


def test_large_tensor_starts_no_threads():
    # The former fast path kept a module-global thread pool alive above 2^20 weights.
    w = _weights((1024, 1040))  # 1,064,960 weights, above 2^20
    packed, state = quantize_nf4(w)
    before = threading.active_count()
    out = dequantize_nf4(packed, state)
    assert threading.active_count() == before
    assert torch.equal(out, dequantize_nf4(packed, state, fast=False))
