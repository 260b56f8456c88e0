"""Checks for notebook 00_welcome."""

from __future__ import annotations

from course_lib.checks import call_student, expect, passed
from course_lib.model.lora import lora_parameter_count, lora_savings

# (d, k, r) cases: square, rectangular (a 7B model's MLP), rank 1 and a large rank.
_CASES = [(4096, 4096, 8), (4096, 11008, 16), (768, 3072, 1), (64, 32, 64)]


def check_param_count(student_fn) -> None:
    """Check ``student_fn(d, k, r)`` returns ``r * (d + k)``."""
    for d, k, r in _CASES:
        got = call_student(student_fn, d, k, r, what="lora_param_count(d, k, r)")
        want = lora_parameter_count(d, k, r)
        expect(
            got is not None,
            "lora_param_count returned None: did you forget the `return` statement?",
        )
        expect(
            got != d * k,
            f"lora_param_count({d}, {k}, {r}) returned d*k = {got}: that is the full weight's "
            "size. LoRA trains A (r x k) and B (d x r) instead.",
        )
        expect(
            got == want,
            f"lora_param_count({d}, {k}, {r}) returned {got!r}, expected {want}. "
            "A has r*k entries and B has d*r entries; add them up.",
        )
    passed("nb00_param_count")


def check_savings(student_fn) -> None:
    """Check ``student_fn(d, k, r)`` returns ``d*k / (r*(d+k))``."""
    for d, k, r in _CASES:
        got = call_student(student_fn, d, k, r, what="lora_savings_factor(d, k, r)")
        want = lora_savings(d, k, r)
        expect(got is not None, "lora_savings_factor returned None: add a `return` statement.")
        expect(
            isinstance(got, (int, float)) and not isinstance(got, bool),
            f"lora_savings_factor should return a number, got {type(got).__name__}.",
        )
        if abs(got - 1 / want) <= 1e-9 * max(1.0, 1 / want):
            raise AssertionError(
                f"lora_savings_factor({d}, {k}, {r}) returned {got:.6g}, the inverse of the "
                f"expected {want:.6g}: divide the full count d*k by the LoRA count r*(d+k)."
            )
        expect(
            abs(got - want) <= 1e-9 * want,
            f"lora_savings_factor({d}, {k}, {r}) returned {got!r}, expected {want:.6g} "
            "= (d*k) / (r*(d+k)). Did you use integer division (//)?",
        )
    passed("nb00_savings")
