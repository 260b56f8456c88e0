"""Tests of course_lib.utils.benchmark (timing, peak memory, formatting, growth fits)."""

from __future__ import annotations

import pytest
import torch

from course_lib.utils.benchmark import (
    Timing,
    compare,
    format_bytes,
    format_seconds,
    growth_exponent,
    peak_memory,
    speedups,
    time_fn,
    torch_threads,
)

MB4 = 1_000_000 * 4  # one float32 tensor of 1e6 elements


def test_time_fn_calls_warmup_plus_repeat_and_reports_min_and_median():
    calls = []
    timing = time_fn(lambda: calls.append(1), repeat=4, warmup=2)
    assert len(calls) == 6
    assert len(timing.times) == 4
    assert 0 <= timing.min <= timing.median
    assert "4 runs" in str(timing)


def test_compare_interleaves_repetitions():
    order = []
    result = compare({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                     repeat=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert set(result) == {"a", "b"} and all(len(t.times) == 3 for t in result.values())


def test_speedups_are_ratios_of_minima():
    timings = {"slow": Timing((4.0, 2.0, 3.0)), "fast": Timing((0.5, 0.25))}
    assert speedups(timings, "slow") == {"slow": 1.0, "fast": 8.0}
    assert Timing((3.0, 1.0, 2.0)).median == 2.0
    with pytest.raises(KeyError, match="baseline 'missing'"):
        speedups(timings, "missing")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: time_fn(42), TypeError, "fn must be callable"),
        (lambda: time_fn(lambda: None, repeat=0), ValueError, "repeat must be a positive int"),
        (lambda: time_fn(lambda: None, repeat=2.0), TypeError, "repeat must be a positive int"),
        (lambda: time_fn(lambda: None, warmup=-1), ValueError, "warmup must be a non-negative"),
        (lambda: compare({}), ValueError, "non-empty mapping"),
        (lambda: compare([lambda: None]), TypeError, "fns must be a mapping"),
        (lambda: compare({"x": None}), TypeError, r"fns\['x'\] must be callable"),
        (lambda: peak_memory(lambda: None, device="meta"), ValueError, "device must be"),
        (lambda: format_bytes(-1, "binary"), ValueError, "nbytes must be a non-negative"),
        (lambda: growth_exponent([1], [1]), ValueError, "at least 2"),
        (lambda: growth_exponent([1, 2], [0, 1]), ValueError, "positive"),
        (lambda: growth_exponent([2, 2], [1, 3]), ValueError, "not all be equal"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_peak_memory_counts_the_result_and_temporaries():
    def alive_result():
        return torch.empty(1_000_000)

    def two_at_once():
        a = torch.ones(1_000_000)
        b = torch.ones(1_000_000)
        return (a + b).sum()  # a, b and a + b alive together

    def one_at_a_time():
        total = 0.0
        for _ in range(3):
            total += torch.ones(1_000_000).sum().item()  # each freed before the next
        return total

    assert MB4 <= peak_memory(alive_result) < MB4 + 4096
    assert 3 * MB4 <= peak_memory(two_at_once) < 3 * MB4 + 4096
    assert MB4 <= peak_memory(one_at_a_time) < 2 * MB4


def test_peak_memory_ignores_what_existed_before_and_is_deterministic():
    existing = torch.ones(2_000_000)

    def view_and_small():
        return existing[:10].clone()

    first = peak_memory(view_and_small)
    assert first < 4096
    n = 256

    def quadratic():
        return torch.ones(n, n) @ torch.ones(n, n)

    assert peak_memory(quadratic) == peak_memory(quadratic)


def test_peak_memory_refuses_to_nest_inside_a_profiler():
    with torch.autograd.profiler.profile(use_cpu=True):
        with pytest.raises(RuntimeError, match="already active"):
            peak_memory(lambda: torch.ones(10))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_peak_memory_on_cuda_without_gpu_explains():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        peak_memory(lambda: None, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_cuda():
    assert MB4 <= peak_memory(lambda: torch.empty(1_000_000, device="cuda"), "cuda") < 2 * MB4


def test_growth_exponent_recovers_power_laws():
    sizes = [128, 256, 512, 1024]
    assert growth_exponent(sizes, [3 * n for n in sizes]) == pytest.approx(1.0)
    assert growth_exponent(sizes, [n * n + 0.0 for n in sizes]) == pytest.approx(2.0)


def test_formatting():
    from course_lib.utils import units

    assert format_bytes is units.format_bytes  # the one byte formatter, re-exported
    assert format_bytes(512, "binary") == "512 B"
    assert format_bytes(1536, "binary") == "1.50 KiB"
    assert format_bytes(3 * 1024**3, "binary") == "3.00 GiB"
    assert format_seconds(2.5) == "2.50 s"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(0.0000042) == "4 us"


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n must be a positive int"):
        with torch_threads(0):
            pass
