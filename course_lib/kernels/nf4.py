"""Fast NF4 dequantisation: the same floats as the textbook gather, one lookup per byte.

The reference, :func:`course_lib.model.nf4.dequantize_nf4` with ``fast=False``, unpacks every byte
into its two 4-bit codes and computes ``codebook[codes] * absmax`` element by element. On a CPU
most of that time goes into the intermediate tensors (uint8 codes, int64 indices, a per-element
copy of the absmax). Here each packed byte indexes a 256-entry table that holds the *pair* of
NF4 levels the byte stands for (high nibble first), so one ``index_select`` writes two levels at
a time straight into the output, which is then scaled block by block in place.

The table rows are two float32 levels stored as one 8-byte integer: ``index_select`` only copies
them, so the floats come out bit for bit, and the memory layout (not the byte order of the
integer) decides which level comes first. ``tests/test_nf4.py`` checks this path against the
reference bit for bit. ``benchmarks/bench_nf4.py`` prints what it buys.
"""

from __future__ import annotations

import torch

__all__ = ["byte_table", "dequantize"]


def byte_table(codebook: torch.Tensor) -> torch.Tensor:
    """Row ``b`` (0..255): the levels of byte ``b``'s high and low nibble, as one int64 (256,)."""
    byte = torch.arange(256, device=codebook.device)
    pairs = codebook.float()[torch.stack([byte >> 4, byte & 0x0F], dim=1)]  # (256, 2) float32
    return pairs.contiguous().view(torch.int64).view(256)


def dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, table: torch.Tensor
) -> torch.Tensor:
    """``codebook[code] * absmax`` of the first ``n`` packed 4-bit codes, float32 ``(n,)``.

    ``table`` is :func:`byte_table` of the codebook on ``packed``'s device; ``absmax`` holds one
    float32 constant per block of ``blocksize`` codes (the last block may be shorter).
    """
    levels = table.index_select(0, packed.reshape(-1).int()).view(torch.float32)[:n]
    full = n - n % blocksize
    nb = full // blocksize
    levels[:full].view(nb, blocksize).mul_(absmax[:nb].unsqueeze(1))
    if full < n:
        levels[full:].mul_(absmax[nb])
    return levels
