"""NF4 (4-bit NormalFloat) from first principles, in plain PyTorch (see notebook 03_qlora).

QLoRA stores a frozen weight in three pieces:

1. **Blockwise absmax scaling.** The row-major flattened weight is cut into blocks of
   ``blocksize`` values (64 by default); each block is divided by its absolute maximum, so every
   value lands in [-1, 1] and an outlier only hurts the block it lives in.
2. **Nearest-level coding.** Each scaled value is replaced by the index (0..15) of the nearest of
   the 16 NormalFloat levels (:func:`nf4_codebook`), found by comparing against the 15 midpoints
   between neighbouring levels. Two 4-bit codes are packed into one byte, the even-indexed
   element in the high nibble.
3. **Double quantisation (optional).** The fp32 absmax constants (32 bits per 64 weights =
   0.5 bit/parameter) are themselves quantised: their mean is subtracted and the rest is coded
   with an 8-bit dynamic-exponent map in blocks of 256, leaving 8/64 + 32/(64*256) = 0.127
   bit/parameter for the constants.

The arithmetic mirrors bitsandbytes 0.50 on CPU step for step (which values are multiplied by a
reciprocal and which are divided, float32 everywhere, ties go to the lower level), so the packed
codes, the absmax constants and the dequantised tensors are bit-identical to
``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` / ``dequantize_4bit``.

One documented exception: with double quantisation, bitsandbytes' CPU kernel finds the 8-bit
code of each centred absmax through an approximate lookup-table search followed by a single
left/right correction. Where that search lands more than one level away, its code is not the
nearest level. This module always picks the exact nearest level, so a few 8-bit codes per
thousand can differ from bitsandbytes' (by one level); the offset and the second-level absmax
are identical.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

__all__ = [
    "NF4_OFFSET",
    "MIN_BLOCKSIZE",
    "MAX_BLOCKSIZE",
    "DQ_BLOCKSIZE",
    "NF4State",
    "Blockwise8bitState",
    "nf4_codebook",
    "nf4_midpoints",
    "dynamic_map",
    "fp4_codebook",
    "int4_codebook",
    "check_blocksize",
    "blockwise_absmax",
    "nearest_level",
    "pack_nibbles",
    "unpack_nibbles",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "quantize_nf4",
    "dequantize_nf4",
    "storage_bits_per_parameter",
    "codebook_roundtrip",
]

# The outermost quantile of the positive half. The QLoRA reference code takes the average of the
# two natural choices 1 - 1/(2*15) and 1 - 1/(2*16) (so that the extreme level is neither
# pinned to the last of 15 nor of 16 equal-probability bins) and publishes it rounded to seven
# decimals; the rounded constant is the one that reproduces the NF4 table bit for bit.
NF4_OFFSET = 0.9677083

MIN_BLOCKSIZE = 32  # smallest blocksize bitsandbytes' 4-bit kernels accept
MAX_BLOCKSIZE = 4096  # largest
DQ_BLOCKSIZE = 256  # blocksize of the second (8-bit) quantisation of the absmax constants

# Floats whose blockwise quantisation is defined (the dtypes bitsandbytes accepts).
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = 1e-38  # lower clamp of an absmax before taking its reciprocal (all-zero blocks)

_cache: dict[tuple[str, torch.device], torch.Tensor] = {}


def _cached(name: str, device: torch.device | str | None, build) -> torch.Tensor:
    device = torch.device("cpu" if device is None else device)
    key = (name, device)
    if key not in _cache:
        _cache[key] = build().to(device)
    return _cache[key]


# --------------------------------------------------------------------------------------------
# Codebooks
# --------------------------------------------------------------------------------------------
def _build_nf4_codebook() -> torch.Tensor:
    # Equal-probability quantile points of N(0, 1), from the outermost quantile down to the
    # median: 8 for the positive half, 7 for the negative half (the median itself would give 0,
    # which is added once, exactly). The points are float32, as in the reference code.
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]
    # Inverse normal CDF (the quantile function) evaluated in float64.
    positive = torch.special.ndtri(p_pos.double())
    negative = -torch.special.ndtri(p_neg.double())
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    levels = levels.float().sort().values
    # Normalise to [-1, 1] by the largest level; the most negative level is -1 as well because
    # both halves start at the same outermost quantile.
    return levels / levels.max()


def nf4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NormalFloat-4 levels, sorted, float32, in [-1, 1] (index = 4-bit code).

    Built from quantiles of the standard normal distribution: 7 negative levels, an exact zero
    and 8 positive levels (asymmetric, so that 0 is representable). Each level sits at a quantile
    of N(0, 1), so every code is used about equally often for normally distributed weights.
    Equal, in float32, to bitsandbytes' NF4 table. Returns a new tensor (safe to modify).
    """
    return _cached("nf4", device, _build_nf4_codebook).clone()


def nf4_midpoints(device: torch.device | str | None = None) -> torch.Tensor:
    """The 15 decision boundaries between neighbouring NF4 levels (float32)."""
    code = _cached("nf4", device, _build_nf4_codebook)
    return (code[:-1] + code[1:]) / 2


def _build_dynamic_map() -> torch.Tensor:
    # Signed 8-bit dynamic-exponent map (Dettmers, "8-bit approximations for parallelism"):
    # 1 sign bit; the position of the first 1 among the remaining bits picks a decade
    # 10^-6 ... 10^0, and the bits after it are a linear fraction in (0.1, 1). Decade i has
    # 2^i fraction values, so small magnitudes get few levels and large ones many.
    values: list[torch.Tensor] = []
    max_exponent_bits = 7
    for i in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0  # float32 centres of the bins
        magnitudes = centres * 10.0 ** (i - (max_exponent_bits - 1))  # float32 multiply
        values += [magnitudes, -magnitudes]
    values.append(torch.tensor([0.0, 1.0]))
    return torch.cat(values).sort().values


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 levels of the signed 8-bit dynamic map used for double quantisation (float32).

    127 positive and 127 negative magnitudes over seven decades, plus 0 and 1. Equal to
    ``bitsandbytes.functional.create_dynamic_map()``. Returns a new tensor.
    """
    return _cached("dynamic", device, _build_dynamic_map).clone()


def fp4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """Sorted levels of bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), in [-1, 1].

    Magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12 (exponent bias 2, one subnormal) divided by 12; +0
    and -0 coincide, so there are 15 distinct levels. Used to compare data types.
    """
    magnitudes = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12.0
    levels = torch.cat([-magnitudes[1:], magnitudes]).sort().values
    return levels.to(device or "cpu")


def int4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """Sorted levels of symmetric uniform int4 with absmax scaling: ``k / 7`` for k = -7..7."""
    return (torch.arange(-7, 8, dtype=torch.float32) / 7.0).to(device or "cpu")


# --------------------------------------------------------------------------------------------
# Building blocks (each one is a fill-in of notebook 03)
# --------------------------------------------------------------------------------------------
def check_blocksize(blocksize: object, name: str = "blocksize") -> int:
    """Return ``blocksize`` if it is a power of two in [32, 4096], else raise ValueError."""
    ok = (
        isinstance(blocksize, int)
        and not isinstance(blocksize, bool)
        and MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE
        and blocksize & (blocksize - 1) == 0
    )
    if not ok:
        allowed = ", ".join(str(2**k) for k in range(5, 13))
        raise ValueError(f"{name} must be a power of two in {{{allowed}}}, got {blocksize!r}")
    return blocksize


def _check_float_tensor(w: object, name: str) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating-point tensor of dtype float32, float16 or bfloat16, "
            f"got {w.dtype} (integer, bool, float64 and complex tensors are not quantised; "
            f"convert with .float())"
        )
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}); there is nothing to quantise")
    return w


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Absolute maximum of each block of ``blocksize`` consecutive values of a 1-D tensor.

    The last block may be shorter. Returns float32 of length ``ceil(n / blocksize)``.
    """
    flat = flat.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    # aminmax reads the data once and allocates no |x| copy; max(|min|, max) is exact.
    lo, hi = torch.aminmax(flat[:full].view(-1, blocksize), dim=1)
    absmax = torch.maximum(hi, lo.neg())
    if full < n:
        lo, hi = torch.aminmax(flat[full:])
        absmax = torch.cat([absmax, torch.maximum(hi, lo.neg()).reshape(1)])
    return absmax


def _scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    # Full blocks are multiplied by the float32 reciprocal of their absmax, the trailing partial
    # block is divided by its absmax: the two round differently in the last bit, and this is
    # exactly what bitsandbytes does, so we keep both to stay bit-identical.
    n = flat.numel()
    full = n - n % blocksize
    safe = absmax.clamp(min=_TINY)
    scaled = torch.empty(n, dtype=torch.float32, device=flat.device)
    nb = full // blocksize
    torch.mul(
        flat[:full].view(nb, blocksize),
        torch.reciprocal(safe[:nb]).unsqueeze(1),
        out=scaled[:full].view(nb, blocksize),
    )
    if full < n:
        torch.div(flat[full:], safe[nb], out=scaled[full:])
    return scaled


def nearest_level(scaled: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted ``codebook`` for each value (int32).

    Compares against the midpoints between neighbouring levels; a value exactly on a midpoint
    takes the lower level. Values outside [-1, 1] take the outermost level.
    """
    midpoints = (codebook[:-1] + codebook[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15) two per byte: element ``2i`` in the high nibble.

    An odd count is padded with the code of 0.0 (7, NF4's zero level), as bitsandbytes does.
    Returns a 1-D uint8 tensor of length ``ceil(n / 2)``.
    """
    codes = codes.reshape(-1)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    codes = codes.to(torch.uint8).view(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` 4-bit codes as uint8."""
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)
    return codes[:n]


# --------------------------------------------------------------------------------------------
# 8-bit blockwise quantisation (the second level of double quantisation)
# --------------------------------------------------------------------------------------------
@dataclass
class Blockwise8bitState:
    """How to undo :func:`quantize_blockwise_8bit`: per-block absmax, the 256-level map."""

    absmax: torch.Tensor  # float32, one per block of `blocksize` values
    code: torch.Tensor  # float32 (256,), the dynamic map
    blocksize: int = DQ_BLOCKSIZE


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = DQ_BLOCKSIZE
) -> tuple[torch.Tensor, Blockwise8bitState]:
    """Quantise a float32 tensor to 8-bit codes of ``code`` (default: :func:`dynamic_map`).

    Blockwise absmax scaling (every block divided by its absmax), then the exact nearest level.
    A block of zeros is coded as zeros. Returns ``(codes uint8 shaped like x, state)``.
    """
    x = _check_float_tensor(x, "x").float()
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    code = dynamic_map(x.device) if code is None else code.to(x.device, torch.float32)
    flat = x.reshape(-1)
    absmax = blockwise_absmax(flat, blocksize)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("x contains NaN or inf; only finite values can be quantised")
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    # Every block (the last one too) is divided by its absmax, as bitsandbytes' 8-bit kernel does.
    scaled = padded.view(nb, blocksize) / absmax.clamp(min=_TINY).unsqueeze(1)
    q = nearest_level(scaled.view(-1)[:n], code).to(torch.uint8)
    return q.view(x.shape), Blockwise8bitState(absmax=absmax, code=code, blocksize=blocksize)


def dequantize_blockwise_8bit(q: torch.Tensor, state: Blockwise8bitState) -> torch.Tensor:
    """``code[q] * absmax`` per block, float32, shaped like ``q``."""
    if q.dtype != torch.uint8:
        raise ValueError(f"q must be a uint8 tensor of 8-bit codes, got {q.dtype}")
    flat = state.code[q.reshape(-1).long()]
    n = flat.numel()
    expected_blocks = -(-n // state.blocksize)
    if state.absmax.numel() != expected_blocks:
        raise ValueError(
            f"state.absmax has {state.absmax.numel()} blocks but {n} codes at blocksize "
            f"{state.blocksize} need {expected_blocks}"
        )
    scale = state.absmax.repeat_interleave(state.blocksize)[:n]
    return (flat * scale).view(q.shape)


# --------------------------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------------------------
@dataclass
class NF4State:
    """Everything besides the packed codes that :func:`dequantize_nf4` needs.

    Without double quantisation ``absmax`` is float32 (one per block). With it, ``absmax`` holds
    the uint8 codes of ``absmax - offset``, ``offset`` is their float32 mean (0-d) and
    ``state2`` the 8-bit state (second-level absmax per 256 constants, the dynamic map).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    offset: torch.Tensor | None = None
    state2: Blockwise8bitState | None = None

    @property
    def double_quant(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def fp32_absmax(self) -> torch.Tensor:
        """The per-block absmax as float32 (decoded from 8 bits under double quantisation)."""
        if self.state2 is None:
            return self.absmax
        absmax = dequantize_blockwise_8bit(self.absmax, self.state2)
        absmax += self.offset
        return absmax

    def constants_nbytes(self, include_codebooks: bool = False) -> int:
        """Bytes of the quantisation constants (absmax, offset, second-level absmax).

        The 16-entry NF4 table and the 256-entry dynamic map are shared by every tensor of a
        model, so they are left out unless ``include_codebooks``.
        """
        tensors = [self.absmax]
        if self.state2 is not None:
            tensors += [self.offset, self.state2.absmax]
            if include_codebooks:
                tensors.append(self.state2.code)
        total = sum(t.numel() * t.element_size() for t in tensors)
        if include_codebooks:
            total += 16 * 4
        return total

    def to(self, device: torch.device | str) -> NF4State:
        """A copy of the state on ``device``."""
        state2 = None
        if self.state2 is not None:
            state2 = Blockwise8bitState(
                self.state2.absmax.to(device), self.state2.code.to(device), self.state2.blocksize
            )
        offset = None if self.offset is None else self.offset.to(device)
        return NF4State(
            self.absmax.to(device), self.shape, self.dtype, self.blocksize, offset, state2
        )


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, NF4State]:
    """Quantise ``w`` to NF4: blockwise absmax over the row-major flattened tensor, nearest level.

    Args:
        w: float32, float16 or bfloat16 tensor of any shape (not empty, all finite).
        blocksize: values per absmax block, a power of two from 32 to 4096.
        double_quant: also quantise the absmax constants to 8 bits (blocks of 256, mean removed).

    Returns:
        ``(packed, state)``: ``packed`` is 1-D uint8 of length ``ceil(w.numel() / 2)`` (two
        codes per byte, element ``2i`` in the high nibble); ``state`` is an :class:`NF4State`.
    """
    w = _check_float_tensor(w, "w")
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    flat = w.reshape(-1).float()
    absmax = blockwise_absmax(flat, blocksize)  # (n_blocks,) float32
    # NaN and inf propagate into their block's absmax, so checking the few constants is enough.
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w contains NaN or inf; only finite weights can be quantised")
    scaled = _scale_blocks(flat, absmax, blocksize)  # in [-1, 1]
    codes = nearest_level(scaled, _cached("nf4", w.device, _build_nf4_codebook))
    packed = pack_nibbles(codes)
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        q_absmax, state2 = quantize_blockwise_8bit(
            absmax - offset, _cached("dynamic", w.device, _build_dynamic_map), DQ_BLOCKSIZE
        )
        state.absmax, state.offset, state.state2 = q_absmax, offset, state2
    return packed, state


def dequantize_nf4(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """Reverse :func:`quantize_nf4`: ``codebook[code] * absmax`` in float32, then ``state.dtype``.

    Returns a tensor of shape ``state.shape``; a block of zeros comes back as zeros.
    """
    if not isinstance(state, NF4State):
        raise TypeError(f"state must be the NF4State returned by quantize_nf4, got {state!r}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a uint8 tensor of packed 4-bit codes, got {got}")
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but shape {tuple(state.shape)} needs {(n + 1) // 2}"
        )
    absmax = state.fp32_absmax()
    blocksize = state.blocksize
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"state has {absmax.numel()} absmax values but {n} elements at blocksize "
            f"{blocksize} need {-(-n // blocksize)}"
        )
    # The levels are written into one fresh buffer and scaled in place: on CPU, touching a new
    # 64 MiB buffer costs as much as the gather itself, so we allocate only once.
    values = _decode_levels(packed.reshape(-1))[:n]  # NF4 level of every element, float32
    full = n - n % blocksize
    nb = full // blocksize
    values[:full].view(nb, blocksize).mul_(absmax[:nb].unsqueeze(1))
    if full < n:
        values[full:].mul_(absmax[nb])
    return values.view(state.shape).to(state.dtype)


def _build_quad_table() -> torch.Tensor:
    # Row u (0..65535) holds the four NF4 levels coded by the two bytes that the 16-bit word u
    # consists of in memory: (high, low nibble of the first byte, high, low nibble of the second).
    code = _cached("nf4", "cpu", _build_nf4_codebook)
    word = torch.arange(65536)
    low, high = word & 0xFF, word >> 8
    first, second = (low, high) if sys.byteorder == "little" else (high, low)
    nibbles = torch.stack([first >> 4, first & 0x0F, second >> 4, second & 0x0F], dim=1)
    return code[nibbles]  # (65536, 4) float32, 1 MiB


def _decode_levels(packed: torch.Tensor) -> torch.Tensor:
    """NF4 level of every packed code, float32, length ``2 * packed.numel()``.

    Same result as ``nf4_codebook()[unpack_nibbles(packed, n)]``, but one gather per two bytes:
    each 16-bit word indexes a 65536 x 4 table of levels. The table's rows are moved as
    complex128 (16 bytes), which only copies bits, so the values are exact.
    """
    if packed.numel() % 2 or packed.storage_offset() % 2 or not packed.is_contiguous():
        # A fresh, aligned, contiguous copy with an even number of bytes.
        packed = torch.cat([packed, packed.new_zeros(packed.numel() % 2)])
    table = _cached("nf4_quad", packed.device, _build_quad_table).view(torch.complex128).view(-1)
    words = packed.view(torch.uint16)  # converted to int32 indices chunk by chunk below
    out = torch.empty(words.numel(), dtype=torch.complex128, device=packed.device)
    _index_select(table, words, out)
    return out.view(torch.float32)


_PARALLEL_MIN_WORDS = 1 << 18  # below this a single gather is fast enough
_pool: ThreadPoolExecutor | None = None


def _index_select(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = table[index[i]]`` (any integer ``index``), split over ``torch.get_num_threads()`` threads on CPU.

    On CPU ``torch.index_select`` runs on one thread, and writing a fresh output buffer is
    dominated by first-touch page faults; chunks gathered by several threads (PyTorch releases
    the GIL inside the op) bring that down to what a parallel fill of the buffer costs.
    """
    n_threads = torch.get_num_threads()
    if out.device.type != "cpu" or n_threads < 2 or index.numel() < _PARALLEL_MIN_WORDS:
        torch.index_select(table, 0, index.int(), out=out)
        return
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="nf4")
    chunks = zip(index.chunk(n_threads), out.chunk(n_threads))
    list(_pool.map(lambda pair: torch.index_select(table, 0, pair[0].int(), out=pair[1]), chunks))


def storage_bits_per_parameter(
    state: NF4State, packed: torch.Tensor | None = None, include_codebooks: bool = False
) -> float:
    """Bits per weight actually stored: packed codes plus quantisation constants.

    Measured from the tensors (``numel * element_size``): ``packed`` if given, else the
    ``ceil(n / 2)`` bytes :func:`quantize_nf4` produces; the constants from ``state``. About
    4.5 without double quantisation and 4.127 with it at blocksize 64 (256 for the constants).
    """
    if not isinstance(state, NF4State):
        raise TypeError(f"state must be the NF4State returned by quantize_nf4, got {state!r}")
    n = state.numel
    code_bytes = (n + 1) // 2 if packed is None else packed.numel() * packed.element_size()
    total = code_bytes + state.constants_nbytes(include_codebooks=include_codebooks)
    return 8.0 * total / n


def codebook_roundtrip(
    w: torch.Tensor, codebook: torch.Tensor, blocksize: int | None = 64
) -> torch.Tensor:
    """Quantise and dequantise ``w`` with any sorted ``codebook`` and blockwise absmax scaling.

    For comparing data types (NF4, FP4, int4) and blocksizes; ``blocksize=None`` uses one absmax
    for the whole tensor. Any positive blocksize is allowed here. Returns float32 like ``w``.
    """
    w = _check_float_tensor(w, "w")
    flat = w.reshape(-1).float()
    n = flat.numel()
    if blocksize is None:
        blocksize = n
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int or None, got {blocksize!r}")
    codebook = codebook.to(flat.device, torch.float32)
    absmax = blockwise_absmax(flat, blocksize)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w contains NaN or inf; only finite weights can be quantised")
    scaled = _scale_blocks(flat, absmax, blocksize)
    levels = codebook.index_select(0, nearest_level(scaled, codebook))
    full = n - n % blocksize
    nb = full // blocksize
    levels[:full].view(nb, blocksize).mul_(absmax[:nb].unsqueeze(1))
    if full < n:
        levels[full:].mul_(absmax[nb])
    return levels.view(w.shape)
