"""Timing and peak-memory helpers shared by ``benchmarks/`` and the notebooks.

Timing on a shared, noisy machine (identical runs vary by +-20 %): warm up, repeat, and report
the **minimum** (the run least disturbed by other processes) next to the median. To compare
implementations, :func:`compare` interleaves their repetitions (A, B, C, A, B, C, ...) so a burst
of background load hits all of them alike, and :func:`speedups` turns the minima into ratios.

Peak memory: :func:`peak_memory` measures how many bytes a function allocates on top of what
was already allocated, at its high-water mark. On CUDA it reads
``torch.cuda.max_memory_allocated``; on CPU it records every allocation and free of PyTorch's CPU
allocator with the autograd profiler's memory events (deterministic: the same code allocates the
same bytes, unlike the process RSS). Only PyTorch tensors are counted, not Python objects.

Example::

    from course_lib.utils.benchmark import compare, speedups, peak_memory
    times = compare({"naive": lambda: naive(q, k, v), "sdpa": lambda: sdpa(q, k, v)}, repeat=5)
    print(speedups(times, baseline="naive"))       # {"naive": 1.0, "sdpa": 9.7}
    print(format_bytes(peak_memory(lambda: naive(q, k, v)), "binary"))  # e.g. '1.00 GiB'

Measured bytes are printed in binary units (``format_bytes(n, "binary")``: KiB, MiB, GiB);
``format_bytes`` is :func:`course_lib.utils.units.format_bytes`, re-exported here.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from course_lib.utils.units import format_bytes
from course_lib.validation import non_negative_int, positive_int

__all__ = [
    "Timing",
    "time_fn",
    "compare",
    "speedups",
    "peak_memory",
    "format_bytes",
    "format_seconds",
    "growth_exponent",
    "torch_threads",
]


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated calls, in seconds."""

    times: tuple[float, ...]

    @property
    def min(self) -> float:
        """The fastest run: the least disturbed by other load; use it for ratios."""
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def __str__(self) -> str:
        return (
            f"min {format_seconds(self.min)}, median {format_seconds(self.median)} "
            f"({len(self.times)} runs)"
        )


def _synchronize(sync: bool | None) -> None:
    if sync is None:
        sync = torch.cuda.is_available() and torch.cuda.is_initialized()
    if sync:
        torch.cuda.synchronize()


def _check_callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable (a function taking no arguments), got {fn!r}")


def time_fn(
    fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, *, sync: bool | None = None
) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeat`` times timed.

    ``sync`` waits for queued CUDA work before reading the clock (default: when CUDA is in use),
    so GPU kernels are timed and not just launched. Returns a :class:`Timing`.
    """
    _check_callable("fn", fn)
    return compare({"fn": fn}, repeat=repeat, warmup=warmup, sync=sync)["fn"]


def compare(
    fns: Mapping[str, Callable[[], Any]],
    repeat: int = 5,
    warmup: int = 1,
    *,
    sync: bool | None = None,
) -> dict[str, Timing]:
    """Time several functions with interleaved repetitions; return ``{name: Timing}``.

    Each round calls every function once, in order, so background load hits all of them alike
    and the ratios of their minima are fair. Each result is dropped before the next call, so
    one function's output does not inflate the next one's memory.
    """
    if not isinstance(fns, Mapping):
        raise TypeError(f"fns must be a mapping of name -> function, got {type(fns).__name__}")
    if not fns:
        raise ValueError("fns must be a non-empty mapping of name -> function")
    for name, fn in fns.items():
        _check_callable(f"fns[{name!r}]", fn)
    repeat = positive_int("repeat", repeat)
    warmup = non_negative_int("warmup", warmup)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            _synchronize(sync)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _synchronize(sync)
            start = time.perf_counter()
            result = fn()
            _synchronize(sync)
            times[name].append(time.perf_counter() - start)
            del result
    return {name: Timing(tuple(ts)) for name, ts in times.items()}


def speedups(timings: Mapping[str, Timing], baseline: str) -> dict[str, float]:
    """How many times faster than ``baseline`` each entry is (ratio of minima)."""
    if baseline not in timings:
        raise KeyError(f"baseline {baseline!r} is not one of {list(timings)}")
    base = timings[baseline].min
    return {name: base / t.min for name, t in timings.items()}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count.

    Loops of many small tensor ops (tiled attention with small blocks, checks on tiny inputs)
    run much faster on one thread than on several when other processes share the cores: the
    threads of each small op wait for each other at every barrier.
    """
    n = positive_int("n", n)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) by PyTorch's CPU allocator while ``fn`` runs.

    Uses the legacy autograd profiler (``ProfilerState.CPU``): it records each allocation and
    free as a ``memory_alloc`` event, per thread, in order, and prints nothing (the Kineto
    profiler writes log lines to stderr, which would fail a notebook under nbval).
    """
    from torch.autograd import _disable_profiler_legacy, _enable_profiler_legacy
    from torch.autograd.profiler import ProfilerConfig, ProfilerState

    if torch.autograd.profiler._is_profiler_enabled:
        raise RuntimeError("peak_memory cannot run while a torch profiler is already active")
    experimental = torch._C._profiler._ExperimentalConfig()
    config = ProfilerConfig(ProfilerState.CPU, False, True, False, False, False, experimental)
    _enable_profiler_legacy(config)
    try:
        result = fn()
    finally:
        records = _disable_profiler_legacy()
    del result
    start = next((r for thread in records for r in thread if r.name() == "__start_profile"), None)
    if start is None:  # pragma: no cover - the profiler always records its start marker
        raise RuntimeError("the profiler returned no start marker; cannot order memory events")
    # Merge the per-thread event lists by time; within a thread, keep the recorded order.
    per_thread = [
        [(start.cpu_elapsed_us(r), i, r.cpu_memory_usage()) for i, r in enumerate(thread)
         if r.kind() == "memory_alloc"]
        for thread in records
    ]
    current = peak = 0
    for _, _, nbytes in heapq.merge(*per_thread):
        current += nbytes
        peak = max(peak, current)
    return peak


def _cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return max(peak, 0)


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Bytes that ``fn()`` allocates above what was allocated before, at the high-water mark.

    Includes ``fn``'s result (it is alive when ``fn`` returns) and every temporary.
    ``device="cpu"`` counts PyTorch's CPU allocations through the profiler's memory events;
    ``device="cuda"`` (or ``"cuda:1"``) uses ``torch.cuda.max_memory_allocated``. Deterministic
    on CPU: the same code on the same shapes gives the same number.
    """
    _check_callable("fn", fn)
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cpu":
        return _cpu_peak_bytes(fn)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("peak_memory(device='cuda') needs a CUDA GPU; none is available")
        return _cuda_peak_bytes(fn, dev)
    raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {device!r}")


# --------------------------------------------------------------------------------------------
# Formatting times, fitting growth
# --------------------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """``0.0123`` -> ``'12.3 ms'``."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def growth_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(sizes)``.

    ``~1`` means the values grow linearly with the size, ``~2`` quadratically. Needs at least
    two distinct positive sizes and positive values.
    """
    if len(sizes) != len(values) or len(sizes) < 2:
        raise ValueError("sizes and values must have the same length, at least 2")
    if min(sizes) <= 0 or min(values) <= 0:
        raise ValueError("sizes and values must be positive to fit a power law")
    xs = [math.log(s) for s in sizes]
    ys = [math.log(v) for v in values]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("sizes must not all be equal")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
