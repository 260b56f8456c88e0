"""Argument checks shared by the whole library (each one exists only here).

Conventions, everywhere in ``course_lib``:

- a value of the wrong *type* raises ``TypeError``; a value of the right type that is not allowed
  raises ``ValueError``;
- the message names the argument and says what is allowed, e.g.
  ``r must be a positive int, got 0`` or ``backend must be one of ('auto', 'naive'), got 'fast'``;
- ``bool`` is not accepted where a number is expected (``True`` is not a rank).

Each function returns the checked value, so a caller can write
``self.r = positive_int("r", r)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = [
    "positive_int",
    "non_negative_int",
    "check_bool",
    "check_number",
    "check_probability",
    "check_choice",
]

T = TypeVar("T")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` (default 1).

    ``TypeError`` for a non-int (including ``bool`` and ``8.0``), ``ValueError`` below ``minimum``.
    """
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if not _is_int(value):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def non_negative_int(name: str, value: object) -> int:
    """``value`` if it is an int ``>= 0`` (``TypeError`` / ``ValueError`` otherwise)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be a non-negative int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (``TypeError`` otherwise: ``1`` is not a bool)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    hint: str = "",
) -> float:
    """``value`` as a float if it is a finite real number in the given range.

    ``low`` / ``high`` bound the range (``None``: unbounded), inclusive unless
    ``low_inclusive`` / ``high_inclusive`` is False. ``hint`` is appended to the message
    (e.g. ``"e.g. 16"`` or ``"0 turns dropout off"``). ``TypeError`` for a non-number or a bool,
    ``ValueError`` for NaN, infinities and values outside the range.
    """
    lo = "" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
    if low is None and high is None:
        allowed = "a finite number"
    elif high is None:
        allowed = f"a number {'>=' if low_inclusive else '>'} {low:g}"
    elif low is None:
        allowed = f"a number {'<=' if high_inclusive else '<'} {high:g}"
    else:
        allowed = f"a number in {lo}, {hi}"
    suffix = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}{suffix}, got {value!r} ({type(value).__name__})")
    number = float(value)
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number >= low if low_inclusive else number > low
    if ok and high is not None:
        ok = number <= high if high_inclusive else number < high
    if not ok:
        raise ValueError(f"{name} must be {allowed}{suffix}, got {value!r}")
    return number


def check_probability(name: str, value: object, *, hint: str = "") -> float:
    """A dropout-style probability in ``[0, 1)`` (``1`` would drop everything)."""
    return check_number(name, value, low=0.0, high=1.0, high_inclusive=False, hint=hint)


def check_choice(name: str, value: T, allowed: Iterable[Any]) -> T:
    """``value`` if it is one of ``allowed`` (compared with ``==``; ``True`` never equals ``1``).

    ``ValueError`` naming the allowed values otherwise.
    """
    options = tuple(allowed)
    for option in options:
        same_kind = isinstance(option, bool) == isinstance(value, bool)
        if same_kind and value == option:
            return value
    raise ValueError(f"{name} must be one of {options}, got {value!r}")
