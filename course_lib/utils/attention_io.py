"""How many bytes attention moves and holds: the FlashAttention IO model and a memory model.

- :func:`attention_hbm_accesses` -- the FlashAttention paper's IO model (Dao et al., 2022,
  Theorem 2): standard attention reads/writes ``Theta(N d + N^2)`` elements of HBM,
  FlashAttention ``Theta(N^2 d^2 / M)`` for an SRAM of ``M`` elements.
- :func:`attention_memory_bytes` -- the memory of one attention forward: ``q, k, v`` and the
  output, plus the ``N x N`` matrices of standard attention or FlashAttention's per-row
  statistics.

Both are estimates from shapes (bytes in decimal units when printed, as every estimate of the
course); :mod:`course_lib.utils.flash_attention` re-exports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from course_lib.validation import positive_int

__all__ = ["AttentionIO", "attention_hbm_accesses", "attention_memory_bytes"]


@dataclass(frozen=True)
class AttentionIO:
    """HBM traffic of one head's attention forward, in elements (the FlashAttention IO model).

    ``standard`` = ``4 N d + 4 N^2`` (Algorithm 0: read Q, K, write S; read S, write P;
    read P, V, write O). ``flash`` = ``2 N d + T_c (3 N d + 4 N)`` (Algorithm 1: K and V read
    once; for each of the ``T_c`` K/V blocks, every Q block, O block and its ``l``, ``m``
    statistics are read and O, ``l``, ``m`` written back). ``block_c = ceil(M / 4d)`` keys and
    ``block_r = min(block_c, d)`` queries per tile, with ``M`` the SRAM size in elements.
    """

    seq_len: int
    head_dim: int
    sram_elements: int
    block_c: int
    block_r: int
    t_c: int
    t_r: int
    standard: int
    flash: int
    bytes_per_element: int

    @property
    def ratio(self) -> float:
        """How many times less HBM traffic FlashAttention needs than standard attention."""
        return self.standard / self.flash

    @property
    def standard_bytes(self) -> int:
        return self.standard * self.bytes_per_element

    @property
    def flash_bytes(self) -> int:
        return self.flash * self.bytes_per_element


def attention_hbm_accesses(
    seq_len: int, head_dim: int, sram_bytes: int, bytes_per_element: int = 2
) -> AttentionIO:
    """The paper's IO model for sequence length ``N``, head dim ``d`` and SRAM of ``sram_bytes``.

    Standard attention moves ``Theta(N d + N^2)`` elements between HBM and the chip,
    FlashAttention ``Theta(N^2 d^2 / M)`` with ``M = sram_bytes / bytes_per_element``
    (Dao et al., 2022, Theorem 2); see :class:`AttentionIO` for the exact counts used. Requires
    ``d <= M`` (a row of Q must fit on chip). Example: an A100 SM has 192 KiB of SRAM; with
    fp16 and ``d = 64``, ``N = 4096``: ``attention_hbm_accesses(4096, 64, 192 * 1024)``.
    """
    n = positive_int("seq_len", seq_len)
    d = positive_int("head_dim", head_dim)
    sram_bytes = positive_int("sram_bytes", sram_bytes)
    bpe = positive_int("bytes_per_element", bytes_per_element)
    m = sram_bytes // bpe
    if m < d:
        raise ValueError(
            f"sram_bytes={sram_bytes} holds {m} elements of {bpe} bytes, fewer than head_dim={d}: "
            "the IO model needs at least one row of Q on chip"
        )
    block_c = math.ceil(m / (4 * d))
    block_r = min(block_c, d)
    t_c = math.ceil(n / block_c)
    t_r = math.ceil(n / block_r)
    standard = 4 * n * d + 4 * n * n
    flash = 2 * n * d + t_c * (3 * n * d + 4 * n)
    return AttentionIO(n, d, m, block_c, block_r, t_c, t_r, standard, flash, bpe)


def attention_memory_bytes(
    seq_len: int,
    *,
    batch: int = 1,
    heads: int = 1,
    head_dim: int = 64,
    dtype_bytes: int = 2,
    materialised_matrices: int = 2,
) -> dict[str, int]:
    """Memory of one attention forward: inputs/output, and what each algorithm adds.

    - ``"qkvo"``: ``q``, ``k``, ``v`` and the output, ``4 B H N d`` elements.
    - ``"naive_extra"``: the ``B H N^2`` score matrix ``S`` and probabilities ``P`` that
      standard attention materialises (``materialised_matrices=2``: both are alive when the
      softmax finishes).
    - ``"flash_extra"``: FlashAttention's per-row statistics, ``B H N`` fp32 log-sum-exps
      (its tiles live in on-chip SRAM).
    - ``"naive"`` / ``"flash"``: ``qkvo`` plus the algorithm's extra.
    """
    n = positive_int("seq_len", seq_len)
    b = positive_int("batch", batch)
    h = positive_int("heads", heads)
    d = positive_int("head_dim", head_dim)
    e = positive_int("dtype_bytes", dtype_bytes)
    mats = positive_int("materialised_matrices", materialised_matrices)
    qkvo = 4 * b * h * n * d * e
    naive_extra = mats * b * h * n * n * e
    flash_extra = b * h * n * 4
    return {
        "qkvo": qkvo,
        "naive_extra": naive_extra,
        "flash_extra": flash_extra,
        "naive": qkvo + naive_extra,
        "flash": qkvo + flash_extra,
    }
