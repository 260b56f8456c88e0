"""Every check knows its mistakes: each listed mistake fails with the words that name it, each
correct alternative and the solution pass, and every fill-in has its list (issue 14).

The variants live next to their checks (``VARIANTS`` in ``course_lib/checks/<module>.py`` or
``<module>_variants.py``); the notebooks run as grading runs them (``tests/notebook_variants.py``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from functools import cache
from pathlib import Path

import pytest
from notebook_variants import GradedNotebook, solution_notebooks

import course_lib.checks
from course_lib.checks.core import OWN_WORK_PREFIX
from course_lib.checks.variants import Variant

OWN_WORK = OWN_WORK_PREFIX  # "the check runs your own implementation: ..."

# Fill-ins that cannot delegate to a reference (the student writes down numbers they worked
# out); every other fill-in must list at least one variant that calls the library's answer.
NO_DELEGATION = {
    # "grade_id": "why",
    "nb03_qlora_model_impl": "the exercise is to configure course_lib's QLoRAModel: calling it "
                             "is the work, there is no library answer to refuse",
}


def _all_variants() -> list[Variant]:
    found: dict[int, tuple[Variant, ...]] = {}  # a check module re-exports its *_variants list
    for info in pkgutil.iter_modules(course_lib.checks.__path__):
        module = importlib.import_module(f"course_lib.checks.{info.name}")
        variants = getattr(module, "VARIANTS", ())
        found[id(variants)] = variants
    return [v for variants in found.values() for v in variants]


VARIANTS = _all_variants()


def _notebook_path(grade_id: str) -> Path:
    match = re.match(r"nb(\d\d)_", grade_id)
    assert match, f"grade_id {grade_id!r} does not start with nbNN_"
    paths = [p for p in solution_notebooks() if p.name.startswith(match.group(1) + "_")]
    assert len(paths) == 1, f"no solution notebook for {grade_id!r}"
    return paths[0]


@cache
def notebook(path: Path) -> GradedNotebook:
    return GradedNotebook(path)


def _fill_ins() -> list[str]:
    return [g for p in solution_notebooks() for g in notebook(p).fill_ins()]


def _checks() -> list[tuple[str, str]]:
    """``(fill-in before the check, check)`` for every check cell of every notebook."""
    pairs = []
    for path in solution_notebooks():
        nb = notebook(path)
        for check in nb.checks():
            index = nb.index(check)
            before = [f for f in nb.fill_ins() if nb.index(f) < index]
            if before:
                pairs.append((before[-1], check))
    return pairs


def test_variant_ids_are_unique():
    ids = [v.id for v in VARIANTS]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("fill_in", _fill_ins())
def test_every_fill_in_lists_its_mistakes(fill_in):
    mistakes = [v for v in VARIANTS if v.fill_in == fill_in and v.is_mistake]
    assert mistakes, (
        f"fill-in {fill_in} has no mistakes listed: add mistake(...) entries to VARIANTS in its "
        f"check module (course_lib/checks/)"
    )
    if fill_in not in NO_DELEGATION:
        assert any(OWN_WORK in v.says for v in mistakes), (
            f"fill-in {fill_in} has no delegation variant (a mistake whose body calls the "
            f"library's answer, says={OWN_WORK!r})"
        )


@pytest.mark.parametrize("fill_in, check", _checks(), ids=[c for _, c in _checks()])
def test_the_solution_passes(fill_in, check):
    outcome = notebook(_notebook_path(check)).outcome(None, fill_in, check)
    assert outcome.passed, outcome.text
    assert f"CHECK {check}: PASS" in outcome.text.splitlines()


MISTAKES = [v for v in VARIANTS if v.is_mistake]
ALTERNATIVES = [v for v in VARIANTS if not v.is_mistake]


@pytest.mark.parametrize("variant", MISTAKES, ids=[v.id for v in MISTAKES])
def test_each_mistake_is_caught_and_named(variant):
    nb = notebook(_notebook_path(variant.fill_in))
    check = variant.check or nb.default_check(variant.fill_in)
    outcome = nb.outcome(variant, variant.fill_in, check)
    assert not outcome.passed, f"{variant.id} ({variant.description}) passes check {check}"
    assert not outcome.text.startswith("the check cell raised"), outcome.text
    assert variant.says in outcome.text, (
        f"{variant.id} ({variant.description}) fails {check}, but the message does not name "
        f"it (expected {variant.says!r}):\n{outcome.text}"
    )


@pytest.mark.parametrize("variant", ALTERNATIVES, ids=[v.id for v in ALTERNATIVES])
def test_each_correct_alternative_passes_every_later_check(variant):
    nb = notebook(_notebook_path(variant.fill_in))
    later = [c for c in nb.checks() if nb.index(c) > nb.index(variant.fill_in)]
    for check in later:
        outcome = nb.outcome(variant, variant.fill_in, check)
        assert outcome.passed, f"{variant.id} ({variant.description}) fails {check}:\n{outcome.text}"
