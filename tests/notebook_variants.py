"""Test helper: run a solution notebook the way grading does, with one fill-in edited.

Grading's fast mode runs the set-up cell, the fill-ins, the check cells and the cells they need
(:func:`course_lib.instructor.grade_plan.grading_plan`). :class:`GradedNotebook` runs those same
cells in-process (no kernel: fast enough to try every variant of every check), in order, with the
solution of every fill-in except the one a :class:`~course_lib.checks.variants.Variant` edits,
and reports what the variant's check cell did: passed (its success line) or failed (the
:class:`~course_lib.checks.core.CheckFailure` text).

The cells before a fill-in do not depend on it, so their namespace is computed once per fill-in
and copied (shallowly) for each variant.
"""

from __future__ import annotations

import contextlib
import io
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from course_lib.checks.variants import Variant, apply_edits
from course_lib.instructor.grade_plan import grading_plan, python_source
from course_lib.instructor.nbio import load_json_notebook
from course_lib.instructor.protocol import (
    grade_id_of,
    is_check_cell,
    is_solution_cell,
    source_of,
)

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"


@dataclass(frozen=True)
class Outcome:
    """What a check cell did: ``passed`` with its stdout, or the failure's text."""

    passed: bool
    text: str


@contextlib.contextmanager
def _notebook_process_state():
    """Keep what notebook cells change in the test process (torch threads, RNG, stdout)."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            torch.set_num_threads(threads)


class GradedNotebook:
    """One solution notebook, runnable cell by cell as grading runs it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.nb = load_json_notebook(self.path)
        self.cells = self.nb["cells"]
        self.run = list(grading_plan(self.cells).run)  # indices of the code cells grading runs
        self.by_id = {grade_id_of(c): i for i, c in enumerate(self.cells) if grade_id_of(c)}
        self._prefix: dict[int, dict] = {}

    # -- cells ------------------------------------------------------------------------------

    def fill_ins(self) -> list[str]:
        return [grade_id_of(c) for c in self.cells
                if c.get("cell_type") == "code" and is_solution_cell(c)]

    def checks(self) -> list[str]:
        return [grade_id_of(c) for c in self.cells if is_check_cell(c)]

    def index(self, grade_id: str) -> int:
        if grade_id not in self.by_id:
            raise LookupError(f"{self.path.name} has no cell with grade_id {grade_id!r}")
        return self.by_id[grade_id]

    def default_check(self, fill_in: str) -> str:
        """The first check cell after ``fill_in``."""
        start = self.index(fill_in)
        for i in range(start + 1, len(self.cells)):
            if is_check_cell(self.cells[i]):
                return grade_id_of(self.cells[i])
        raise LookupError(f"{self.path.name}: no check cell after {fill_in!r}")

    def _exec(self, index: int, namespace: dict, source: str | None = None) -> None:
        source = source_of(self.cells[index]) if source is None else source
        code = compile(python_source(source), f"<{self.path.name} cell {index}>", "exec")
        exec(code, namespace)

    # -- running ----------------------------------------------------------------------------

    def _prefix_namespace(self, fill_index: int) -> dict:
        """The namespace after every running cell before ``fill_index`` (solutions throughout)."""
        if fill_index not in self._prefix:
            namespace: dict = {"__name__": "__main__"}
            with _notebook_process_state(), contextlib.redirect_stdout(io.StringIO()):
                for index in self.run:
                    if index >= fill_index:
                        break
                    self._run_quietly(index, namespace)
            self._prefix[fill_index] = namespace
        return dict(self._prefix[fill_index])

    def _run_quietly(self, index: int, namespace: dict) -> None:
        """Run a cell; a failing *check* cell is recorded by grading, not fatal: go on."""
        try:
            self._exec(index, namespace)
        except AssertionError:
            if not is_check_cell(self.cells[index]):
                raise

    def outcome(self, variant: Variant | None, fill_in: str, check: str | None = None) -> Outcome:
        """Run the notebook up to ``check`` (default: the first check after ``fill_in``) with
        ``fill_in`` edited by ``variant`` (``None``: the solution) and return what the check
        cell did."""
        fill_index = self.index(fill_in)
        check_index = self.index(check or self.default_check(fill_in))
        namespace = self._prefix_namespace(fill_index)
        source = source_of(self.cells[fill_index])
        if variant is not None:
            source = apply_edits(source, variant)
        with _notebook_process_state():
            with contextlib.redirect_stdout(io.StringIO()):
                self._exec(fill_index, namespace, source)
                for index in self.run:
                    if fill_index < index < check_index:
                        self._run_quietly(index, namespace)
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    self._exec(check_index, namespace)
            except AssertionError as exc:
                return Outcome(False, str(exc))
            except Exception:  # a check that crashes is a bug of the check: show it whole
                return Outcome(False, "the check cell raised\n" + traceback.format_exc())
        return Outcome(True, out.getvalue())


def solution_notebooks() -> list[Path]:
    return sorted(SOLUTIONS.glob("[0-9][0-9]_*.ipynb"))
