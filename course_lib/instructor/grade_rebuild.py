"""Rebuild, never trust: the notebook ``course grade`` runs is built from the solution notebook.

For each submitted notebook the grader starts from a copy of the solution notebook and takes only
the *sources* of the student's fill-in cells (matched by ``grade_id``) from the submission. Check
cells stay the authoritative ones, hidden tests and stored ``CHECK <grade_id>: PASS`` output
included; every other cell is the solution's own. Cells the student added are not run.

Unless ``full`` is asked for, the experiment cells that no cell of the rebuilt notebook (the
student's fill-ins included) needs are left out (:mod:`course_lib.instructor.grade_plan`).

In the rebuilt copy only check cells are compared by nbval: they keep the solution's stored
output and an execution count, while every other code cell has no stored output, no execution
count and the ``nbval-ignore-output`` tag (nbval does not compare such cells, but still reports
their exceptions).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.instructor.grade_plan import Plan, grading_plan
from course_lib.instructor.nbio import notebook_paths
from course_lib.instructor.protocol import (
    MD_SOLUTION_BEGIN,
    MD_SOLUTION_END,
    SOLUTION_BEGIN,
    SOLUTION_END,
    grade_id_of,
    is_check_cell,
    is_solution_cell,
    points_of,
    source_of,
)
from course_lib.instructor.release import release_notebook, student_cell

MAX_NOTEBOOK_BYTES = 100 * 2**20  # a submitted notebook larger than this is not read
NBVAL_MARKERS = ("NBVAL_SKIP", "NBVAL_IGNORE_OUTPUT", "NBVAL_RAISES_EXCEPTION",
                 "PYTEST_VALIDATE_IGNORE_OUTPUT")
NBVAL_TAGS = ("nbval-skip", "nbval-ignore-output", "nbval-raises-exception",
              "raises-exception", "nbval-check-output", "pytest-validate-ignore-output")

# Patterns in a student's fill-in code worth a look by the instructor. They change no score:
# the rebuilt notebook already defeats them, but a student who tries is worth talking to.
REVIEW_PATTERNS = [
    (re.compile(r"showtraceback|set_custom_exc|excepthook|get_ipython|input_transformers|"
                r"ast_transformers|events\.register|register_magic"),
     "changes how IPython runs cells or shows exceptions"),
    (re.compile(r"course_lib\.checks|from\s+course_lib\s+import\s+checks"),
     "touches the check functions"),
    (re.compile(r"CHECK\s+\S+:\s*PASS"), "prints a check's success line"),
    (re.compile(r"\bsys\.modules\b|\bbuiltins\b|__builtins__"), "patches modules or builtins"),
    (re.compile(r"\bos\._exit\b|\bos\.kill\b"), "kills the kernel"),
    (re.compile(r"\bsys\.stdout\b|\bsys\.stderr\b"), "replaces the output streams"),
]


class GradeSetupError(Exception):
    """Grading cannot run at all (bad solutions folder, broken solution notebook, ...)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def report(self, heading: str) -> int:
        """Print ``heading`` and every problem to stderr; returns the exit status, 2."""
        print(f"error: {heading}:", file=sys.stderr)
        for problem in self.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2


class MalformedNotebook(Exception):
    """A submitted file that cannot be graded as a notebook; the message says why."""


def success_line(grade_id: str) -> str:
    return f"CHECK {grade_id}: PASS"


@dataclass(frozen=True)
class CheckSpec:
    grade_id: str
    points: float
    cell_index: int


@dataclass
class SolutionNotebook:
    name: str  # "00_welcome"
    path: Path
    nb: dict
    checks: list[CheckSpec]
    fillins: list[str]  # grade_ids of code fill-in cells, in notebook order
    answers: list[str]  # grade_ids of markdown answer cells
    released: dict[str, str] = field(default_factory=dict)  # grade_id -> student-version source

    @property
    def filename(self) -> str:
        return f"{self.name}.ipynb"

    @property
    def max_points(self) -> float:
        return sum(c.points for c in self.checks)

    def describe_cell(self, index: int) -> str:
        """Human description of cell ``index`` (0-based among all cells)."""
        cell = self.nb["cells"][index]
        gid = grade_id_of(cell)
        if is_solution_cell(cell):
            return f"your fill-in cell '{gid}'"
        if is_check_cell(cell):
            return f"check cell '{gid}'"
        first = next((line.strip() for line in source_of(cell).splitlines()
                      if line.strip() and not line.strip().startswith("#")), "")
        if len(first) > 60:
            first = first[:57] + "..."
        return f"course cell {index + 1} (`{first}`)" if first else f"course cell {index + 1}"


def _stored_stdout(cell: dict) -> str:
    text = []
    for out in cell.get("outputs", []) or []:
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            src = out.get("text", "")
            text.append("".join(src) if isinstance(src, list) else str(src))
    return "".join(text)


def _comment_markers(source: str, markers: tuple[str, ...]) -> list[str]:
    comments = {line.strip().lstrip("#").strip() for line in source.splitlines()
                if line.strip().startswith("#")}
    return [m for m in markers if m in comments]


def _nbval_markers(cell: dict) -> list[str]:
    found = _comment_markers(source_of(cell), NBVAL_MARKERS)
    tags = cell.get("metadata", {}).get("tags", [])
    if isinstance(tags, list):
        found += [t for t in tags if t in NBVAL_TAGS]
    return found


def load_solution(path: Path) -> tuple[SolutionNotebook | None, list[str]]:
    """Read and validate one solution notebook; returns it and a list of problems."""
    shown = str(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{shown}: cannot read the solution notebook: {exc}"]
    released, protocol_problems = release_notebook(nb, shown)
    problems = [str(p) for p in protocol_problems]
    if problems:
        return None, problems
    checks, fillins, answers = [], [], []
    released_sources: dict[str, str] = {}
    for index, cell in enumerate(nb["cells"]):
        gid = grade_id_of(cell)
        if gid is None:
            continue
        released_sources[gid] = source_of(released["cells"][index])
        if is_solution_cell(cell):
            (fillins if cell.get("cell_type") == "code" else answers).append(gid)
        elif is_check_cell(cell):
            where = f"{shown}, cell {index} (check '{gid}')"
            line = success_line(gid)
            if line not in _stored_stdout(cell).splitlines():
                problems.append(
                    f"{where}: its stored output lacks the success line '{line}', so a pass "
                    f"cannot be told from a hidden failure; run `course execute {shown}`"
                )
            markers = _nbval_markers(cell)
            if markers:
                problems.append(
                    f"{where}: carries {', '.join(markers)}; a check cell must run and have its "
                    "output compared to be graded: remove the marker"
                )
            checks.append(CheckSpec(gid, points_of(cell), index))
    solution = SolutionNotebook(path.stem, path, nb, checks, fillins, answers, released_sources)
    return solution, problems


def load_solutions(solutions_dir: Path, only: list[str] | None = None) -> list[SolutionNotebook]:
    """All ``NN_name.ipynb`` solution notebooks (or the ``only`` ones), validated."""
    solutions_dir = Path(solutions_dir)
    if not solutions_dir.is_dir():
        raise GradeSetupError([f"--solutions: folder not found: {solutions_dir}"])
    paths = notebook_paths(solutions_dir)
    if not paths:
        raise GradeSetupError([f"--solutions: no NN_name.ipynb solution notebooks in {solutions_dir}"])
    if only:
        available = {p.stem: p for p in paths}
        unknown = [n for n in only if n.removesuffix(".ipynb") not in available]
        if unknown:
            raise GradeSetupError([
                f"--notebook: unknown notebook(s) {', '.join(unknown)}; "
                f"allowed values: {', '.join(sorted(available))}"
            ])
        wanted = {n.removesuffix(".ipynb") for n in only}
        paths = [p for p in paths if p.stem in wanted]
    solutions, problems = [], []
    for path in paths:
        solution, found = load_solution(path)
        problems += found
        if solution is not None:
            solutions.append(solution)
    if problems:
        raise GradeSetupError(problems)
    return solutions


def read_submission(path: Path) -> dict:
    """Parse a submitted notebook, or raise :class:`MalformedNotebook` saying what is wrong."""
    if not path.is_file():
        raise MalformedNotebook(f"{path.name} is not a regular file")
    size = path.stat().st_size
    if size > MAX_NOTEBOOK_BYTES:
        raise MalformedNotebook(
            f"{path.name} is {size / 2**20:.0f} MiB, over the {MAX_NOTEBOOK_BYTES // 2**20} MiB "
            "limit (clear the outputs before submitting)"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MalformedNotebook(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        nb = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedNotebook(
            f"{path.name} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "was it edited outside Jupyter or truncated?"
        ) from exc
    if not isinstance(nb, dict):
        raise MalformedNotebook(f"{path.name} is JSON but not a notebook (top level is a "
                                f"{type(nb).__name__}, expected an object)")
    if nb.get("nbformat") != 4:
        raise MalformedNotebook(
            f"{path.name} has nbformat {nb.get('nbformat')!r}; only nbformat 4 notebooks can be "
            "graded (open and save it with Jupyter 4 or later)"
        )
    if not isinstance(nb.get("cells"), list):
        raise MalformedNotebook(f"{path.name} has no list of cells")
    return nb


@dataclass
class Rebuilt:
    nb: dict
    warnings: list[str]
    answers: dict[str, str]
    flags: list[str]
    plan: Plan  # the code cells that run (indices of the solution notebook's cells)


def _safe_gid(cell) -> str | None:
    if not isinstance(cell, dict) or not isinstance(cell.get("metadata", {}), dict):
        return None
    return grade_id_of(cell)


def _cell_source(cell: dict) -> str | None:
    src = cell.get("source", "")
    if isinstance(src, str):
        return src
    if isinstance(src, list) and all(isinstance(s, str) for s in src):
        return "".join(src)
    return None


def _normalise(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def rebuild(solution: SolutionNotebook, submission: dict, full: bool = False) -> Rebuilt:
    """Build the notebook to run from ``solution`` and the fill-in sources of ``submission``;
    with ``full`` every code cell runs, otherwise only those the checks need."""
    warnings: list[str] = []
    by_gid: dict[str, list[tuple[int, dict]]] = {}
    for index, cell in enumerate(submission["cells"]):
        gid = _safe_gid(cell)
        if gid is not None:
            by_gid.setdefault(gid, []).append((index, cell))

    cells = []
    answers: dict[str, str] = {}
    flags: list[str] = []
    for index, sol_cell in enumerate(solution.nb["cells"]):
        cell = copy.deepcopy(sol_cell)
        gid = grade_id_of(sol_cell)
        kind = sol_cell.get("cell_type")
        if is_solution_cell(sol_cell):
            what = "fill-in cell" if kind == "code" else "written answer"
            candidates = []
            for stu_index, stu_cell in by_gid.get(gid, []):
                source = _cell_source(stu_cell)
                if stu_cell.get("cell_type") != kind:
                    warnings.append(f"{what} '{gid}' (cell {stu_index + 1}) was turned into a "
                                    f"{stu_cell.get('cell_type')} cell; it was not used")
                elif source is None:
                    warnings.append(f"{what} '{gid}' (cell {stu_index + 1}) has an unreadable "
                                    "source; it was not used")
                else:
                    candidates.append((stu_index, source))
            if candidates:
                source = candidates[0][1]
                if len(candidates) > 1:
                    cells_at = ", ".join(str(i + 1) for i, _ in candidates)
                    warnings.append(f"{what} '{gid}' appears {len(candidates)} times (cells "
                                    f"{cells_at}); the first one was graded")
            else:
                source = student_cell(sol_cell, solution.filename, index)[0]["source"]
                warnings.append(f"{what} '{gid}' is missing from the submission; the empty "
                                "stub from the student notebook was used")
            cell["source"] = source
            if kind == "code":
                for pattern, reason in REVIEW_PATTERNS:
                    if pattern.search(source):
                        flags.append(f"fill-in '{gid}' {reason}")
            else:
                answers[gid] = source
        elif is_check_cell(sol_cell):
            copies = by_gid.get(gid, [])
            released = _normalise(solution.released[gid])
            if not copies:
                warnings.append(f"check cell '{gid}' was deleted from the submission; the "
                                "original check was run")
            elif any(_normalise(_cell_source(c) or "") != released or not is_check_cell(c)
                     for _, c in copies):
                warnings.append(f"check cell '{gid}' was edited in the submission; the edits "
                                "were ignored and the original check was run")
            elif len(copies) > 1:
                warnings.append(f"check cell '{gid}' appears {len(copies)} times in the "
                                "submission; the original check was run once")
        if kind == "code":
            meta = cell.setdefault("metadata", {})
            for key in ("execution", "collapsed", "scrolled"):
                meta.pop(key, None)
            meta["course_grade"] = {"index": index}
            tags = [t for t in meta.get("tags", []) if isinstance(t, str)] \
                if isinstance(meta.get("tags"), list) else []
            if is_check_cell(sol_cell):
                meta["tags"] = [t for t in tags if t not in NBVAL_TAGS]
                if not isinstance(cell.get("execution_count"), int):
                    cell["execution_count"] = 1
            else:
                # No stored output and no execution count: nbval does not compare this cell.
                # The tag says so explicitly, unless a comment marker already decides it
                # (nbval warns when both are present).
                cell["outputs"] = []
                cell["execution_count"] = None
                if not _comment_markers(source_of(cell), (*NBVAL_MARKERS, "NBVAL_CHECK_OUTPUT")):
                    meta["tags"] = [*[t for t in tags if t != "nbval-ignore-output"],
                                    "nbval-ignore-output"]
        cells.append(cell)
    plan = grading_plan(cells, full)
    left_out = set(plan.skipped)
    nb = copy.deepcopy({k: v for k, v in solution.nb.items() if k != "cells"})
    nb["cells"] = [cell for index, cell in enumerate(cells) if index not in left_out]
    nb.setdefault("metadata", {}).pop("widgets", None)
    return Rebuilt(nb, warnings, answers, flags, plan)


def strip_solution_markers(source: str) -> str:
    """The solution source with its BEGIN/END SOLUTION marker lines removed (what a student writes)."""
    markers = {SOLUTION_BEGIN, SOLUTION_END, MD_SOLUTION_BEGIN, MD_SOLUTION_END}
    return "\n".join(line for line in source.split("\n") if line.strip() not in markers)
