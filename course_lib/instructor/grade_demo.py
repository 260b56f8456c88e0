"""Demo submissions built from the course itself: ``course grade --demo``, tests, benchmarks.

A demo student's notebook is the released student notebook with some fill-ins solved
(:func:`demo_notebook`): ``correct`` solves every fill-in, ``empty`` none (the release as it
is), ``partial`` every other code fill-in (the 1st, 3rd, ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from course_lib.instructor.grade_rebuild import (
    GradeSetupError,
    SolutionNotebook,
    strip_solution_markers,
)
from course_lib.instructor.nbio import dumps
from course_lib.instructor.protocol import is_solution_cell
from course_lib.instructor.release import release_notebook

DEMO_STUDENTS = ("demo_correct", "demo_empty", "demo_partial")
DEMO_MARKER = ".course-grade-demo"


def demo_notebook(solution: SolutionNotebook, kind: str) -> dict:
    """The student notebook as a student of ``kind`` (correct, empty, partial) would submit it."""
    student, _ = release_notebook(solution.nb, solution.filename)
    fill_in = 0
    for sol_cell, cell in zip(solution.nb["cells"], student["cells"]):
        if not is_solution_cell(sol_cell):
            continue
        solved = kind == "correct"
        if kind == "partial" and sol_cell.get("cell_type") == "code":
            solved = fill_in % 2 == 0  # every other fill-in: 1st, 3rd, ...
        if sol_cell.get("cell_type") == "code":
            fill_in += 1
        if solved:
            src = sol_cell.get("source", "")
            cell["source"] = strip_solution_markers("".join(src) if isinstance(src, list) else src)
    return student


def build_demo(out: Path, solutions: list[SolutionNotebook]) -> Path:
    """Write ``OUT/submissions/<demo student>/<NN_name>.ipynb``; returns the submissions folder."""
    subs = Path(out) / "submissions"
    if subs.exists():
        if not (subs / DEMO_MARKER).exists():
            raise GradeSetupError([f"--demo: {subs} exists and was not made by --demo; choose "
                                   "another OUT folder"])
        shutil.rmtree(subs)
    subs.mkdir(parents=True)
    (subs / DEMO_MARKER).write_text("made by `course grade --demo`; replaced on each run\n",
                                    encoding="utf-8")
    for student, kind in zip(DEMO_STUDENTS, ("correct", "empty", "partial")):
        for sol in solutions:
            path = subs / student / sol.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(demo_notebook(sol, kind)), encoding="utf-8")
    return subs
