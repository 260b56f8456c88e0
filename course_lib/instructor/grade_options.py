"""The options of ``course grade``: their defaults, and the converters that check each value.

The argparse converters (``*_arg``) turn a command-line string into a value or raise
``argparse.ArgumentTypeError`` with a message that says what is allowed (argparse prefixes it
with the argument's name); :class:`GradeOptions` checks the same values when grading is called
from Python.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from course_lib.utils.units import GiB, KiB, MiB, TiB
from course_lib.validation import check_bool, check_number, positive_int

DEFAULT_CELL_TIMEOUT = 180.0
DEFAULT_NOTEBOOK_TIMEOUT = 900.0
DEFAULT_MEMORY_LIMIT = "4G"
MIN_MEMORY = 256 * MiB

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_memory(text: str) -> int | None:
    """``"4G"`` -> bytes (binary units; K, M, G, T, optional ``B``/``iB``); ``"none"`` -> None."""
    if str(text).strip().lower() in ("none", "unlimited", "off"):
        return None
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"expected a size like 4G, 512M or 'none', got {text!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < MIN_MEMORY:
        raise ValueError(f"{text!r} is below the minimum of 256M (a Jupyter kernel needs more "
                         "to start); use e.g. 1G, or 'none' for no limit")
    return value


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/5"`` -> ``(2, 5)``: the second of five slices of the class (``1 <= K <= N``)."""
    match = _SHARD.match(str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"expected K/N with whole numbers 1 <= K <= N (e.g. 2/5), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def memory_arg(text: str) -> str:
    try:
        parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _number_arg(text: str, convert, valid, allowed: str):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text.strip()}")
    return value


def jobs_arg(text: str) -> int:
    return _number_arg(text, int, lambda v: v >= 1, "an integer >= 1")


def seconds_arg(text: str) -> float:
    return _number_arg(text, float, lambda v: 0 < v < float("inf"), "a number of seconds > 0")


@dataclass(frozen=True)
class GradeOptions:
    """How ``course grade`` runs (the command-line options, as values)."""

    jobs: int = 1  # notebooks graded in parallel
    cell_timeout: float = DEFAULT_CELL_TIMEOUT  # seconds per cell, then the cell is interrupted
    notebook_timeout: float = DEFAULT_NOTEBOOK_TIMEOUT  # seconds per notebook, then it is killed
    memory_limit: str = DEFAULT_MEMORY_LIMIT  # per process, as parse_memory reads it
    solutions: Path = Path("solutions")
    notebooks: tuple[str, ...] | None = None  # NN_name of the notebooks to grade; None: all
    sanitize_with: Path | None = None  # nbval sanitizer; None: nbval_sanitize.cfg next to solutions
    progress: bool = True  # a progress bar on stderr
    full: bool = False  # run every cell (True) or only what the checks need (False)
    shard: tuple[int, int] | None = None  # (K, N): grade the K-th of N slices of the class

    def __post_init__(self) -> None:
        positive_int("jobs", self.jobs)
        check_number("cell_timeout", self.cell_timeout, low=0, low_inclusive=False)
        check_number("notebook_timeout", self.notebook_timeout, low=0, low_inclusive=False)
        try:
            parse_memory(self.memory_limit)
        except ValueError as exc:
            raise ValueError(f"memory_limit: {exc}") from None
        check_bool("progress", self.progress)
        check_bool("full", self.full)
        if self.shard is not None:
            if not (isinstance(self.shard, tuple) and len(self.shard) == 2):
                raise TypeError(f"shard must be a (K, N) tuple, got {self.shard!r}")
            index, count = positive_int("shard K", self.shard[0]), positive_int("shard N",
                                                                                  self.shard[1])
            if index > count:
                raise ValueError(f"shard must be (K, N) with 1 <= K <= N, got {self.shard!r}")
