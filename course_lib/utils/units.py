"""Byte units and the one byte formatter of the course.

Two unit systems, one per kind of quantity (the README states the same convention):

- **decimal** (``kB``, ``MB``, ``GB``, ``TB`` = 10^3, 10^6, 10^9, 10^12 bytes) for budgets and
  estimates of GPU memory: the lesson's "a 7B model needs 28 GB", GPU sizes (24 GB, 48 GB, 80 GB)
  and :mod:`course_lib.utils.memory`'s estimates;
- **binary** (``KiB``, ``MiB``, ``GiB``, ``TiB`` = 2^10, 2^20, 2^30, 2^40 bytes) for tensors and
  peaks measured on this machine (:mod:`course_lib.utils.benchmark`, ``memory_footprint()``).

:func:`format_bytes` makes the caller say which: ``format_bytes(n, "decimal")`` or
``format_bytes(n, "binary")``.
"""

from __future__ import annotations

import math
import numbers

from course_lib.validation import check_choice, positive_int

__all__ = ["KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "UNIT_SYSTEMS", "format_bytes"]

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

_UNITS = {
    "decimal": (("TB", TB), ("GB", GB), ("MB", MB), ("kB", KB)),
    "binary": (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)),
}
UNIT_SYSTEMS = tuple(_UNITS)


def format_bytes(nbytes: float, units: str, digits: int = 3) -> str:
    """``nbytes`` in the largest unit of ``units`` that keeps it >= 1, with ``digits``
    significant digits (whole bytes below the smallest unit).

    >>> format_bytes(26_953_662_464, "decimal")
    '27.0 GB'
    >>> format_bytes(1536, "binary")
    '1.50 KiB'
    >>> format_bytes(999, "decimal")
    '999 B'
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Real):
        raise TypeError(f"nbytes must be a non-negative number, got {nbytes!r}")
    if not (math.isfinite(nbytes) and nbytes >= 0):
        raise ValueError(f"nbytes must be a non-negative number, got {nbytes!r}")
    check_choice("units", units, UNIT_SYSTEMS)
    positive_int("digits", digits)
    larger = None  # the next larger unit, for a value that rounds up to 1000
    for unit, scale in _UNITS[units]:
        if nbytes >= scale:
            text = _significant(nbytes / scale, digits)
            if float(text) >= 1000 and larger is not None:
                unit, scale = larger
                text = _significant(nbytes / scale, digits)
            return f"{text} {unit}"
        larger = (unit, scale)
    return f"{int(nbytes)} B"


def _significant(value: float, digits: int) -> str:
    rounded = float(f"{value:.{digits - 1}e}")  # round to `digits` significant digits first
    decimals = max(0, digits - 1 - int(math.floor(math.log10(rounded))))
    return f"{rounded:.{decimals}f}"
