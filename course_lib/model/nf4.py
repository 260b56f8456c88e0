"""NF4 (4-bit NormalFloat) from first principles, in plain PyTorch (see notebook 03_qlora).

QLoRA stores a frozen weight in three pieces:

1. **Blockwise absmax scaling.** The row-major flattened weight is cut into blocks of
   ``blocksize`` values (64 by default); each block is divided by its absolute maximum, so every
   value lands in [-1, 1] and an outlier only hurts the block it lives in.
2. **Nearest-level coding.** Each scaled value is replaced by the index (0..15) of the nearest of
   the 16 NormalFloat levels (:func:`nf4_codebook`, quantiles of a normal distribution), found by
   comparing against the 15 midpoints between neighbouring levels. **Packing:** two 4-bit codes
   share one byte, the even-indexed element in the high nibble.
3. **Double quantisation (optional).** The fp32 absmax constants (32 bits per 64 weights =
   0.5 bit/parameter) are themselves quantised: their mean is subtracted and the rest is coded
   with an 8-bit dynamic-exponent map in blocks of 256, leaving 8/64 + 32/(64*256) = 0.127
   bit/parameter for the constants.

Dequantisation is the textbook gather ``w_hat[i] = codebook[code[i]] * absmax[i // blocksize]``.
:func:`dequantize_nf4` computes exactly that (``fast=False``, the reference and test oracle), or by
default the same floats through ``course_lib.kernels.nf4`` (one table lookup per byte).

The arithmetic mirrors bitsandbytes 0.50 on CPU step for step (which values are multiplied by a
reciprocal and which are divided, float32 everywhere, ties go to the lower level), so the packed
codes, the absmax constants and the dequantised tensors are bit-identical to
``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` / ``dequantize_4bit``.
One documented exception: with double quantisation, bitsandbytes' CPU kernel finds the 8-bit code
of each centred absmax through an approximate lookup-table search, which now and then lands one
level away from the nearest. This module always picks the exact nearest level, so a few 8-bit
codes per thousand can differ from bitsandbytes'; the offset and second-level absmax are identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from course_lib.kernels import nf4 as nf4_kernels
from course_lib.validation import check_bool, positive_int

__all__ = [
    "NF4_OFFSET", "MIN_BLOCKSIZE", "MAX_BLOCKSIZE", "DQ_BLOCKSIZE",
    "NF4State", "Blockwise8bitState",
    "nf4_codebook", "nf4_midpoints", "dynamic_map", "fp4_codebook", "int4_codebook",
    "check_blocksize", "blockwise_absmax", "nearest_level", "pack_nibbles", "unpack_nibbles",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "quantize_nf4", "dequantize_nf4",
    "storage_bits_per_parameter", "codebook_roundtrip",
]

# The outermost quantile of the positive half. The QLoRA reference code takes the average of the
# two natural choices 1 - 1/(2*15) and 1 - 1/(2*16) and publishes it rounded to seven decimals;
# the rounded constant is the one that reproduces the NF4 table bit for bit.
NF4_OFFSET = 0.9677083
MIN_BLOCKSIZE = 32  # smallest blocksize bitsandbytes' 4-bit kernels accept
MAX_BLOCKSIZE = 4096  # largest
DQ_BLOCKSIZE = 256  # blocksize of the second (8-bit) quantisation of the absmax constants


# --------------------------------------------------------------------------------------------
# The lesson: the codebook, quantise, dequantise
# --------------------------------------------------------------------------------------------
def nf4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NormalFloat-4 levels, sorted, float32, in [-1, 1] (index = 4-bit code).

    Quantiles of the standard normal distribution: 7 negative levels, an exact zero and 8
    positive levels (asymmetric, so that 0 is representable), so every code is used about equally
    often by normally distributed weights. Equal, in float32, to bitsandbytes' NF4 table.
    Returns a new tensor (safe to modify).
    """
    return _cached("nf4", device, _build_nf4_codebook).clone()


def _build_nf4_codebook() -> torch.Tensor:
    # Equal-probability points from the outermost quantile down to the median: 8 for the positive
    # half, 7 for the negative half (the median itself would give 0, added once, exactly).
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]
    positive = torch.special.ndtri(p_pos.double())  # inverse normal CDF, in float64
    negative = -torch.special.ndtri(p_neg.double())
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()  # normalise to [-1, 1]; both ends are +-1


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
    check_bool("double_quant", double_quant)
    codebook = _cached("nf4", w.device, _build_nf4_codebook)  # (16,)
    flat = w.reshape(-1).float()
    absmax = blockwise_absmax(flat, blocksize, name="w")  # 1. one absmax per block: (n_blocks,)
    scaled = _scale_blocks(flat, absmax, blocksize)  # every value divided by it: in [-1, 1]
    codes = nearest_level(scaled, codebook)  # 2. index of the nearest level, 0..15: (n,)
    packed = pack_nibbles(codes)  # two 4-bit codes per byte: (ceil(n / 2),) uint8
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if double_quant:  # 3. code the constants themselves with 8 bits
        offset = absmax.mean()
        dynamic = _cached("dynamic", w.device, _build_dynamic_map)
        q_absmax, state2 = quantize_blockwise_8bit(absmax - offset, dynamic, DQ_BLOCKSIZE)
        state.absmax, state.offset, state.state2 = q_absmax, offset, state2
    return packed, state


def dequantize_nf4(packed: torch.Tensor, state: NF4State, *, fast: bool = True) -> torch.Tensor:
    """Reverse :func:`quantize_nf4`: ``codebook[code] * absmax`` in float32, then ``state.dtype``.

    ``fast=False`` runs the textbook gather below; the default computes the same floats, bit for
    bit, through ``course_lib.kernels.nf4`` (one lookup per byte instead of per code). Returns a
    tensor of shape ``state.shape``; a block of zeros comes back as zeros.
    """
    n = _check_packed(packed, state)
    check_bool("fast", fast)
    absmax = state.fp32_absmax()  # (n_blocks,) float32 (decoded from 8 bits with double quant)
    if fast:  # speed only: the same floats from a table of level pairs, one lookup per byte
        table = _cached("nf4_bytes", packed.device, lambda: nf4_kernels.byte_table(nf4_codebook()))
        values = nf4_kernels.dequantize(packed, absmax, n, state.blocksize, table)
    else:  # the reference: w_hat[i] = codebook[code[i]] * absmax[i // blocksize]
        codes = unpack_nibbles(packed, n).long()  # (n,) 4-bit codes
        codebook = _cached("nf4", packed.device, _build_nf4_codebook)
        values = codebook[codes] * _per_element(absmax, state.blocksize, n)
    return values.view(state.shape).to(state.dtype)


# --------------------------------------------------------------------------------------------
# Building blocks (each one is a fill-in of notebook 03)
# --------------------------------------------------------------------------------------------
def check_blocksize(blocksize: object, name: str = "blocksize") -> int:
    """``blocksize`` if it is a power of two in [32, 4096]: ``TypeError`` for a non-int,
    ``ValueError`` for another int."""
    allowed = "a power of two in {" + ", ".join(str(2**k) for k in range(5, 13)) + "}"
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be {allowed}, got {blocksize!r} ({type(blocksize).__name__})")
    if not (MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"{name} must be {allowed}, got {blocksize!r}")
    return blocksize


def blockwise_absmax(flat: torch.Tensor, blocksize: int, *, name: str = "flat") -> torch.Tensor:
    """Absolute maximum of each block of ``blocksize`` consecutive values of a 1-D tensor.

    The last block may be shorter. Returns float32 of length ``ceil(n / blocksize)``. NaN and
    inf propagate into their block's absmax, so a ``ValueError`` naming ``name`` is raised for
    them: only finite values can be quantised.
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
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{name} contains NaN or inf; only finite values can be quantised")
    return absmax


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


def _scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    # Full blocks are multiplied by the float32 reciprocal of their absmax, the trailing partial
    # block is divided by its absmax: the two round differently in the last bit, and this is
    # exactly what bitsandbytes does, so we keep both to stay bit-identical. An all-zero block
    # (absmax 0) is scaled by the reciprocal of a tiny number instead, and stays zero.
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


def _per_element(absmax: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """The absmax of each element's block: ``absmax[i // blocksize]`` for ``i < n``."""
    return absmax.repeat_interleave(blocksize)[:n]


# --------------------------------------------------------------------------------------------
# The other codebooks
# --------------------------------------------------------------------------------------------
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
    blocksize = positive_int("blocksize", blocksize)
    code = dynamic_map(x.device) if code is None else code.to(x.device, torch.float32)
    flat = x.reshape(-1)
    absmax = blockwise_absmax(flat, blocksize, name="x")
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
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a uint8 tensor of 8-bit codes, got {type(q).__name__}")
    if q.dtype != torch.uint8:
        raise ValueError(f"q must be a uint8 tensor of 8-bit codes, got {q.dtype}")
    n = q.numel()
    _check_block_count(state.absmax, n, state.blocksize, "state.absmax")
    flat = state.code[q.reshape(-1).long()]
    return (flat * _per_element(state.absmax, state.blocksize, n)).view(q.shape)


# --------------------------------------------------------------------------------------------
# The quantisation state and its storage
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


def storage_bits_per_parameter(
    state: NF4State, packed: torch.Tensor | None = None, include_codebooks: bool = False
) -> float:
    """Bits per weight actually stored: packed codes plus quantisation constants.

    Measured from the tensors (``numel * element_size``): ``packed`` if given, else the
    ``ceil(n / 2)`` bytes :func:`quantize_nf4` produces; the constants from ``state``. About
    4.5 without double quantisation and 4.127 with it at blocksize 64 (256 for the constants).
    """
    _check_state(state)
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
    blocksize = n if blocksize is None else positive_int("blocksize", blocksize)
    codebook = codebook.to(flat.device, torch.float32)
    absmax = blockwise_absmax(flat, blocksize, name="w")
    codes = nearest_level(_scale_blocks(flat, absmax, blocksize), codebook).long()
    return (codebook[codes] * _per_element(absmax, blocksize, n)).view(w.shape)


# --------------------------------------------------------------------------------------------
# Plumbing: argument checks and the per-device cache of the tables
# --------------------------------------------------------------------------------------------
# Floats whose blockwise quantisation is defined (the dtypes bitsandbytes accepts).
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = 1e-38  # lower clamp of an absmax before taking its reciprocal (all-zero blocks)
_cache: dict[tuple[str, torch.device], torch.Tensor] = {}


def _cached(name: str, device: torch.device | str | None, build) -> torch.Tensor:
    """``build()`` on ``device``, built once per (name, device); callers must not modify it."""
    device = torch.device("cpu" if device is None else device)
    key = (name, device)
    if key not in _cache:
        _cache[key] = build().to(device)
    return _cache[key]


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


def _check_state(state: object) -> None:
    if not isinstance(state, NF4State):
        raise TypeError(f"state must be the NF4State returned by quantize_nf4, got {state!r}")


def _check_block_count(absmax: torch.Tensor, n: int, blocksize: int, what: str) -> None:
    expected = -(-n // blocksize)
    if absmax.numel() != expected:
        raise ValueError(
            f"{what} has {absmax.numel()} blocks but {n} values at blocksize {blocksize} "
            f"need {expected}"
        )


def _check_packed(packed: object, state: object) -> int:
    """Check ``dequantize_nf4``'s arguments; return the number of elements ``n``."""
    _check_state(state)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(
            f"packed must be a uint8 tensor of packed 4-bit codes, got {type(packed).__name__}"
        )
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor of packed 4-bit codes, got {packed.dtype}")
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but shape {tuple(state.shape)} needs {(n + 1) // 2}"
        )
    _check_block_count(state.absmax, n, state.blocksize, "state.absmax")
    return n
