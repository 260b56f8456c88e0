"""Checks for notebook 00_welcome: the LoRA parameter count and the savings factor.

Each check runs the student's function on square and rectangular shapes with different ranks
(so a hard-coded number or a square-only formula fails) and, on a wrong value, names the
mistake whose formula gives exactly that value (``d*k``, ``r*d*k``, one factor only, the
inverse, integer division, ...). ``VARIANTS`` lists those mistakes as edits of the solution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

from course_lib.checks import call_student, check, fail
from course_lib.checks.core import OWN_WORK_PREFIX
from course_lib.checks.variants import BLOCK, alternative, mistake
from course_lib.model.lora import lora_parameter_count, lora_savings

__all__ = ["check_param_count", "check_savings", "VARIANTS"]

# (d, k, r): square, rectangular both ways (a 7B model's MLP), rank 1, rank above min(d, k).
# d != k and r > 1 in most cases, so one-sided and square-only formulas give other numbers.
_CASES = [(4096, 4096, 8), (4096, 11008, 16), (11008, 4096, 4), (768, 3072, 1), (64, 32, 64),
          (10, 6, 3)]

_REFERENCES = ("course_lib.model.lora.lora_parameter_count", "course_lib.model.lora.lora_savings")


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _explain(exc: BaseException) -> str | None:
    if isinstance(exc, TypeError) and "argument" in str(exc):
        return "the function takes exactly three arguments, in the order (d, k, r)."
    if isinstance(exc, NameError):
        return "use the arguments d, k and r (and your own functions defined above)."
    if isinstance(exc, ZeroDivisionError):
        return "a division by zero: check what you divide by (it must be the LoRA count)."
    return None


# ---------------------------------------------------------------------------------------------
# lora_param_count(d, k, r) = r * (d + k)
# ---------------------------------------------------------------------------------------------


def _count_mistakes(d: int, k: int, r: int) -> list[tuple[Any, str]]:
    """``(value, diagnosis)`` of each known wrong formula for the count of a (d, k) weight."""
    return [
        (d * k, "that is d*k, the full weight's size: LoRA freezes W0 and trains only "
                "A (r x k) and B (d x r)"),
        (r * d * k, "that is r*d*k: the rank multiplies the two *edges* d and k, one per "
                    "factor, not their product"),
        (d + k, "the rank r is missing: A has r rows and B has r columns, so r*(d+k)"),
        (r * d, "you counted only B (d x r): add A's r*k entries"),
        (r * k, "you counted only A (r x k): add B's d*r entries"),
        (r * d + k, "r*d + k: the parentheses are missing, r must multiply both d and k: "
                    "r * (d + k)"),
        (d + r * k, "d + r*k: the parentheses are missing, r must multiply both d and k: "
                    "r * (d + k)"),
        (2 * r * d, "2*r*d holds only for a square weight (d = k): count A (r x k) and "
                    "B (d x r) separately"),
        (2 * r * k, "2*r*k holds only for a square weight (d = k): count A (r x k) and "
                    "B (d x r) separately"),
        (r * r * (d + k), "the rank is counted twice: r*(d+k), not r*r*(d+k)"),
        (d * r + r * r + r * k, "you added an r x r block: LoRA has only A (r x k) and B (d x r)"),
        (r * (d + k) * 2, "that is twice the count: each of A and B is counted once"),
    ]


@check("nb00_param_count", forbid=_REFERENCES)
def check_param_count(student_fn: Callable[..., Any]) -> None:
    """Check ``student_fn(d, k, r)`` returns ``r * (d + k)`` on several shapes and ranks."""
    answers: list[int] = []  # the right answers of the cases so far
    for d, k, r in _CASES:
        what = f"lora_param_count({d}, {k}, {r})"
        got = call_student(student_fn, d, k, r, what=what, explain=_explain)
        want = lora_parameter_count(d, k, r)
        if got is None:
            fail(f"{what} returned None: the function computes a value but does not give it "
                 f"back.", "add `return` in front of the formula (the missing return).")
        if not _is_number(got):
            fail(f"{what} returned a {type(got).__name__} ({got!r}), expected the int {want}.",
                 "return the number itself, not a string or a tuple.")
        if got == want:
            if not isinstance(got, int):
                fail(f"{what} returned {got!r}, a {type(got).__name__}: a parameter count is a "
                     f"whole number ({want}).",
                     "use only * and + on the ints d, k and r (no / or float()).")
            answers.append(want)
            continue
        if got in answers:
            fail(f"{what} returned {got:,}, the answer of an earlier case, expected {want:,}: "
                 f"the result does not depend on d, k and r.",
                 "compute the count from the arguments, nothing hard-coded.")
        found = {diagnosis for value, diagnosis in _count_mistakes(d, k, r)
                 if value != want and got == value}
        if len(found) > 1 and (d, k, r) != _CASES[-1]:
            continue  # two mistakes give this value here (e.g. only A or only B when d = k)
        for diagnosis in sorted(found)[:1]:
            fail(f"{what} returned {got:,}, expected {want:,}: {diagnosis}.",
                 "A (r x k) has r*k entries and B (d x r) has d*r entries; their sum is "
                 "r*(d+k).")
        fail(f"{what} returned {got!r}, expected {want:,}; no formula the check knows gives "
             f"{got!r} here.",
             "A (r x k) has r*k entries and B (d x r) has d*r entries: return their sum, for any "
             "d, k and r (nothing hard-coded).")


# ---------------------------------------------------------------------------------------------
# lora_savings_factor(d, k, r) = d*k / (r*(d+k))
# ---------------------------------------------------------------------------------------------


def _savings_mistakes(d: int, k: int, r: int) -> list[tuple[float, str, str]]:
    """``(value, diagnosis, hint)`` of each known wrong formula for the savings factor."""
    full, lora = d * k, r * (d + k)
    order = "divide the full count d*k by the LoRA count r*(d+k)"
    return [
        (lora / full, "that is the inverse, LoRA count / full count (a fraction below 1)", order),
        (full // lora, "that is integer division (//): it rounds the factor down to a whole "
                       "number", "use / (true division) so the factor keeps its decimals"),
        (float(full - lora), "that is the difference d*k - r*(d+k), not the ratio", order),
        (full / r * (d + k), "d*k / r*(d+k) multiplies by (d+k): the parentheses around the "
                             "denominator are missing", "write d*k / (r*(d+k))"),
        (full / (d + k), "the rank r is missing from the LoRA count", "the LoRA count is "
                                                                      "r*(d+k)"),
        (full / (r * d * k), "that divides by r*d*k, not by the LoRA count r*(d+k)", order),
        (min(d, k) / r, "that is the estimate min(d, k)/r, an upper bound, not the exact factor",
         order),
        (full / (2 * r * d), "2*r*d is the LoRA count of a square weight only", order),
        (full / (2 * r * k), "2*r*k is the LoRA count of a square weight only", order),
    ]


@check("nb00_savings", forbid=_REFERENCES)
def check_savings(student_fn: Callable[..., Any]) -> None:
    """Check ``student_fn(d, k, r)`` returns ``d*k / (r*(d+k))`` as a float."""
    answers: list[float] = []  # the right answers of the cases so far
    for d, k, r in _CASES:
        what = f"lora_savings_factor({d}, {k}, {r})"
        got = call_student(student_fn, d, k, r, what=what, explain=_explain)
        want = lora_savings(d, k, r)
        if got is None:
            fail(f"{what} returned None: the function computes a value but does not give it "
                 f"back.", "add `return` in front of the formula (the missing return).")
        if not _is_number(got):
            fail(f"{what} returned a {type(got).__name__} ({got!r}), expected the number "
                 f"{want:.6g}.", "return the ratio itself (a float), not a string or a tuple.")
        if math.isclose(got, want, rel_tol=1e-9):
            answers.append(want)
            continue
        if any(math.isclose(got, a, rel_tol=1e-9) for a in answers):
            fail(f"{what} returned {got:.6g}, the answer of an earlier case, expected "
                 f"{want:.6g}: the result does not depend on d, k and r.",
                 "compute the factor from the arguments, nothing hard-coded.")
        if got == int(want) and want != int(want):
            fail(f"{what} returned {got!r}, expected {want:.6g}: the factor was rounded down to "
                 f"a whole number (integer division // or int()).",
                 "use / (true division) and return the float as it is.")
        if got == round(want) and want != round(want):
            fail(f"{what} returned {got!r}, expected {want:.6g}: the factor was rounded.",
                 "return the exact ratio; round only when you print it.")
        found = {(diagnosis, hint) for value, diagnosis, hint in _savings_mistakes(d, k, r)
                 if not math.isclose(value, want, rel_tol=1e-9)
                 and math.isclose(got, value, rel_tol=1e-9)}
        if len(found) > 1 and (d, k, r) != _CASES[-1]:
            continue  # two mistakes give this value here: a later case tells them apart
        for diagnosis, hint in sorted(found)[:1]:
            fail(f"{what} returned {got:.6g}, expected {want:.6g}: {diagnosis}.", hint)
        fail(f"{what} returned {got:.6g}, expected {want:.6g}; no formula the check knows gives "
             f"that value here.",
             "divide the full count d*k by the LoRA count (your lora_param_count(d, k, r)), for "
             "any d, k and r (nothing hard-coded).")


# ---------------------------------------------------------------------------------------------
# The mistakes the checks know (tests/test_check_variants.py runs each through its check cell)
# ---------------------------------------------------------------------------------------------

_COUNT = "nb00_param_count_impl"
_SAVE = "nb00_savings_impl"
_OWN = OWN_WORK_PREFIX + " course_lib."

VARIANTS = (
    mistake(_COUNT, "full_weight", "returns d*k, the full weight's size",
            [("return r * (d + k)", "return d * k")], says="the full weight's size"),
    mistake(_COUNT, "r_times_dk", "returns r*d*k",
            [("return r * (d + k)", "return r * d * k")], says="that is r*d*k"),
    mistake(_COUNT, "no_rank", "forgets the rank: d + k",
            [("return r * (d + k)", "return d + k")], says="the rank r is missing"),
    mistake(_COUNT, "only_B", "counts only B (d x r)",
            [("return r * (d + k)", "return d * r")], says="you counted only B"),
    mistake(_COUNT, "only_A", "counts only A (r x k)",
            [("return r * (d + k)", "return r * k")], says="you counted only A"),
    mistake(_COUNT, "no_parentheses", "r * d + k: r multiplies only one side",
            [("return r * (d + k)", "return r * d + k")], says="the parentheses are missing"),
    mistake(_COUNT, "square_only", "2*r*d: assumes a square weight",
            [("return r * (d + k)", "return 2 * r * d")], says="square weight"),
    mistake(_COUNT, "missing_return", "computes the count but forgets `return`",
            [("return r * (d + k)", "count = r * (d + k)")], says="missing return"),
    mistake(_COUNT, "float_count", "divides somewhere and returns a float",
            [("return r * (d + k)", "return r * (d + k) / 1")], says="a whole number"),
    mistake(_COUNT, "hard_coded", "returns the count of the lesson's example (4096, 4096, 8)",
            [("return r * (d + k)", "return 65536")], says="nothing hard-coded"),
    mistake(_COUNT, "delegates", "calls course_lib's lora_parameter_count",
            [(BLOCK, "from course_lib.model.lora import lora_parameter_count\n"
                     "return lora_parameter_count(d, k, r)")], says=_OWN),
    alternative(_COUNT, "two_factors", "counts A and B separately",
                [("return r * (d + k)", "return r * k + d * r")]),
    mistake(_SAVE, "inverse", "returns the LoRA count over the full count",
            [("return (d * k) / lora_param_count(d, k, r)",
              "return lora_param_count(d, k, r) / (d * k)")], says="that is the inverse"),
    mistake(_SAVE, "integer_division", "uses // and loses the decimals",
            [("return (d * k) / lora_param_count(d, k, r)",
              "return (d * k) // lora_param_count(d, k, r)")], says="integer division"),
    mistake(_SAVE, "rounded", "rounds the factor",
            [("return (d * k) / lora_param_count(d, k, r)",
              "return round((d * k) / lora_param_count(d, k, r))")], says="was rounded"),
    mistake(_SAVE, "no_parentheses", "d*k / r*(d+k) without parentheses",
            [("return (d * k) / lora_param_count(d, k, r)", "return d * k / r * (d + k)")],
            says="parentheses around the denominator are missing"),
    mistake(_SAVE, "difference", "returns d*k - r*(d+k)",
            [("return (d * k) / lora_param_count(d, k, r)",
              "return float(d * k - lora_param_count(d, k, r))")], says="the difference"),
    mistake(_SAVE, "no_rank", "divides by d + k",
            [("return (d * k) / lora_param_count(d, k, r)", "return d * k / (d + k)")],
            says="the rank r is missing"),
    mistake(_SAVE, "estimate", "returns the estimate min(d, k) / r",
            [("return (d * k) / lora_param_count(d, k, r)", "return min(d, k) / r")],
            says="an upper bound"),
    mistake(_SAVE, "missing_return", "computes the factor but forgets `return`",
            [("return (d * k) / lora_param_count(d, k, r)",
              "factor = (d * k) / lora_param_count(d, k, r)")], says="missing return"),
    mistake(_SAVE, "string", "returns the formatted factor",
            [("return (d * k) / lora_param_count(d, k, r)",
              "return f'{(d * k) / lora_param_count(d, k, r):.1f}x'")],
            says="not a string"),
    mistake(_SAVE, "delegates", "calls course_lib's lora_savings",
            [(BLOCK, "from course_lib.model.lora import lora_savings\n"
                     "return lora_savings(d, k, r)")], says=_OWN),
    mistake(_SAVE, "delegates_count", "uses course_lib's lora_parameter_count for the count",
            [(BLOCK, "import course_lib.model.lora as lora_lib\n"
                     "return d * k / lora_lib.lora_parameter_count(d, k, r)")], says=_OWN),
    alternative(_SAVE, "inline_formula", "writes the LoRA count inline",
                [("return (d * k) / lora_param_count(d, k, r)",
                  "return d * k / (r * (d + k))")]),
)
