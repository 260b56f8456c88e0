"""Submissions built from the course itself: ``course grade --demo``, tests, benchmarks.

A built student's notebook is the released student notebook with each code fill-in
``correct`` (the solution), ``empty`` (the release's stub) or ``wrong`` (every solution block
replaced by ``pass``: it runs, and gives nothing) (:func:`built_notebook`); only a ``correct``
student writes the solution's written answers. The kinds of students:

- ``correct``, ``empty``, ``wrong``: every fill-in so;
- ``partial``: every other code fill-in correct (the 1st, 3rd, ...), the others empty;
  ``partial_odd`` the other way round (the 2nd, 4th, ...);
- ``mixed``: each fill-in correct, empty or wrong at random (seeded by the student's name).

``course grade --demo`` grades ``demo_correct``, ``demo_empty`` and ``demo_partial``;
:func:`class_kinds` cycles through all kinds, for a benchmark class of any size.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from course_lib.instructor.grade_rebuild import (
    GradeSetupError,
    SolutionNotebook,
    strip_solution_markers,
)
from course_lib.instructor.nbio import dumps
from course_lib.instructor.protocol import (
    SOLUTION_BEGIN,
    SOLUTION_END,
    ProtocolError,
    grade_id_of,
    is_solution_cell,
    replace_blocks,
)
from course_lib.instructor.release import release_notebook

DEMO_STUDENTS = ("demo_correct", "demo_empty", "demo_partial")
DEMO_MARKER = ".course-grade-demo"


def student_notebook(solution_nb: dict, filename: str, sources: dict[str, str]) -> dict:
    """The released student notebook with the fill-in cells ``sources`` (``grade_id`` ->
    source) written in, as a student would submit it."""
    student, problems = release_notebook(solution_nb, filename)
    if problems:
        raise ProtocolError(problems)
    for cell in student["cells"]:
        gid = grade_id_of(cell)
        if gid in sources:
            cell["source"] = sources[gid]
    return student


KINDS = ("correct", "empty", "partial", "wrong", "partial_odd", "mixed")


def _choice(kind: str, fill_in: int, rng: random.Random) -> str:
    if kind in ("partial", "partial_odd"):
        return "correct" if fill_in % 2 == (kind == "partial_odd") else "empty"
    if kind == "mixed":
        return rng.choice(("correct", "empty", "wrong"))
    return kind


def built_notebook(solution: SolutionNotebook, kind: str, seed: str = "") -> dict:
    """The student notebook a student of ``kind`` (one of :data:`KINDS`) would submit;
    ``seed`` (e.g. the student's name) drives a ``mixed`` student's choices."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = random.Random(f"{seed}/{solution.name}")
    sources: dict[str, str] = {}
    fill_in = 0
    for cell in solution.nb["cells"]:
        if not is_solution_cell(cell):
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if cell.get("cell_type") == "code":
            how = _choice(kind, fill_in, rng)
            fill_in += 1
        else:  # a written answer
            how = "correct" if kind == "correct" else "empty"
        if how == "correct":
            sources[grade_id_of(cell)] = strip_solution_markers(src)
        elif how == "wrong":
            sources[grade_id_of(cell)] = replace_blocks(
                src, SOLUTION_BEGIN, SOLUTION_END, lambda indent: [f"{indent}pass"])[0]
    return student_notebook(solution.nb, solution.filename, sources)


def demo_notebook(solution: SolutionNotebook, kind: str) -> dict:
    """The student notebook as a student of ``kind`` (correct, empty, partial) would submit it."""
    return built_notebook(solution, kind)


def class_kinds(size: int) -> dict[str, str]:
    """``size`` students named ``s001_<kind>``, ... cycling through :data:`KINDS`."""
    return {f"s{n + 1:03d}_{KINDS[n % len(KINDS)]}": KINDS[n % len(KINDS)] for n in range(size)}


def write_class(folder: Path, solutions: list[SolutionNotebook], kinds: dict[str, str]) -> Path:
    """Write ``folder/<student>/<NN_name>.ipynb`` for each student of ``kinds`` (student -> kind)."""
    for student, kind in kinds.items():
        for sol in solutions:
            path = Path(folder) / student / sol.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(built_notebook(sol, kind, seed=student)), encoding="utf-8")
    return Path(folder)


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
    write_class(subs, solutions, dict(zip(DEMO_STUDENTS, ("correct", "empty", "partial"))))
    return subs
