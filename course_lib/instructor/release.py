"""``course release``: generate the student notebooks in ``notebooks/`` from ``solutions/``.

The release is a pure function of the solution notebook: solution blocks become a
``# YOUR CODE HERE`` stub, markdown answers become a placeholder, hidden tests are stripped,
outputs and execution counts are cleared, check cells are locked, and the file is written with
stable formatting so that re-running it is byte-identical. Every protocol problem in every
notebook is reported before anything is written.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.instructor.grade_plan import plan_problems
from course_lib.instructor.nbio import (  # re-exported: the public names of course release
    NOTEBOOK_NAME,
    atomic_write,
    dumps,
    load_json_notebook,
    notebook_paths,
)
from course_lib.instructor.protocol import (
    EXPERIMENT_TAG,
    HIDDEN_BEGIN,
    HIDDEN_END,
    KERNELSPEC,
    MD_ANSWER_PLACEHOLDER,
    MD_SOLUTION_BEGIN,
    MD_SOLUTION_END,
    SOLUTION_BEGIN,
    SOLUTION_END,
    Problem,
    ProtocolError,
    grade_id_of,
    has_marker,
    is_check_cell,
    is_solution_cell,
    nbgrader_meta,
    replace_blocks,
    set_tag,
    source_of,
    stub_lines,
)

__all__ = ["NOTEBOOK_NAME", "ReleaseReport", "atomic_write", "build_release", "dumps",
           "load_json_notebook", "release", "release_notebook", "student_cell"]


def _set_source(cell: dict, text: str) -> None:
    cell["source"] = text


def student_cell(cell: dict, nb_name: str, index: int) -> tuple[dict, list[Problem]]:
    """Return the student version of one solution-notebook cell, and any problems found."""
    out = copy.deepcopy(cell)
    src = source_of(cell)
    gid = grade_id_of(cell)
    problems: list[Problem] = []

    def problem(message: str) -> None:
        problems.append(Problem(nb_name, index, message, gid))

    meta = nbgrader_meta(cell)
    kind = cell.get("cell_type")
    if meta and gid is None:
        problem("nbgrader cell without a grade_id")

    if is_solution_cell(cell):
        if kind == "code":
            if has_marker(src, MD_SOLUTION_BEGIN, MD_SOLUTION_END):
                problem("markdown solution markers in a code cell (use '### BEGIN SOLUTION')")
            if not has_marker(src, SOLUTION_BEGIN, SOLUTION_END):
                problem(f"solution cell has no '{SOLUTION_BEGIN}' / '{SOLUTION_END}' block")
            new, errs = replace_blocks(
                src, SOLUTION_BEGIN, SOLUTION_END, lambda indent: stub_lines(indent, gid or "?")
            )
        else:
            if has_marker(src, SOLUTION_BEGIN, SOLUTION_END):
                problem("code solution markers in a markdown cell (use '<!-- BEGIN SOLUTION -->')")
            if not has_marker(src, MD_SOLUTION_BEGIN, MD_SOLUTION_END):
                problem(f"markdown answer cell has no '{MD_SOLUTION_BEGIN}' block")
            new, errs = replace_blocks(
                src, MD_SOLUTION_BEGIN, MD_SOLUTION_END, lambda indent: [MD_ANSWER_PLACEHOLDER]
            )
        for e in errs:
            problem(e)
        if has_marker(src, HIDDEN_BEGIN, HIDDEN_END):
            problem("hidden-test block in a solution cell (hidden tests belong in check cells)")
        _set_source(out, new)
    else:
        if has_marker(src, SOLUTION_BEGIN, SOLUTION_END, MD_SOLUTION_BEGIN, MD_SOLUTION_END):
            problem("solution block outside a solution cell (set metadata.nbgrader.solution: true)")
        if is_check_cell(cell):
            new, errs = replace_blocks(src, HIDDEN_BEGIN, HIDDEN_END, lambda indent: [])
            for e in errs:
                problem(e)
            _set_source(out, new)
            out.setdefault("metadata", {})
            out["metadata"]["editable"] = False
            out["metadata"]["deletable"] = False
        elif has_marker(src, HIDDEN_BEGIN, HIDDEN_END):
            problem("hidden-test block outside a check cell")

    if kind == "code":
        out["outputs"] = []
        out["execution_count"] = None
    set_tag(out, EXPERIMENT_TAG, False)  # for `course grade`; students need not see it
    out.get("metadata", {}).pop("execution", None)  # nbclient timestamps
    out.get("metadata", {}).pop("collapsed", None)
    out.get("metadata", {}).pop("scrolled", None)
    out["id"] = str(cell.get("id") or f"cell-{index}")
    return out, problems


def release_notebook(nb: dict, nb_name: str) -> tuple[dict, list[Problem]]:
    """Build the student notebook (a plain dict) from a solution notebook dict."""
    problems: list[Problem] = []
    if nb.get("nbformat") != 4:
        return nb, [Problem(nb_name, None, f"nbformat {nb.get('nbformat')!r} is not 4")]
    seen: dict[str, int] = {}
    cells = []
    for index, cell in enumerate(nb.get("cells", [])):
        gid = grade_id_of(cell)
        if gid is not None:
            if gid in seen:
                problems.append(
                    Problem(nb_name, index, f"duplicate grade_id (first used in cell {seen[gid]})", gid)
                )
            else:
                seen[gid] = index
        new_cell, cell_problems = student_cell(cell, nb_name, index)
        problems.extend(cell_problems)
        cells.append(new_cell)
    problems.extend(plan_problems(nb, nb_name))  # what `course grade` may leave out
    student = {
        "cells": cells,
        "metadata": {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": max(int(nb.get("nbformat_minor", 5)), 5),
    }
    return student, problems


@dataclass
class ReleaseReport:
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)
    extra: list[Path] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.stale or self.missing or self.extra)


def build_release(solutions_dir: Path) -> dict[str, str]:
    """Map of notebook file name -> student notebook text, or raise :class:`ProtocolError`."""
    solutions_dir = Path(solutions_dir)
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"solutions directory not found: {solutions_dir}")
    problems: list[Problem] = []
    outputs: dict[str, str] = {}
    paths = notebook_paths(solutions_dir)
    if not paths:
        raise FileNotFoundError(f"no NN_name.ipynb notebooks in {solutions_dir}")
    for path in paths:
        shown = str(path)
        try:
            nb = load_json_notebook(path)
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(Problem(shown, None, f"cannot read notebook: {exc}"))
            continue
        student, nb_problems = release_notebook(nb, shown)
        problems.extend(nb_problems)
        outputs[path.name] = dumps(student)
    if problems:
        raise ProtocolError(problems)
    return outputs


def release(solutions_dir: Path, notebooks_dir: Path, check: bool = False) -> ReleaseReport:
    """Generate (or, with ``check``, only compare) the student notebooks.

    Raises :class:`ProtocolError` (nothing written) when any solution notebook is malformed.
    """
    notebooks_dir = Path(notebooks_dir)
    outputs = build_release(Path(solutions_dir))
    report = ReleaseReport()
    for name, text in outputs.items():
        target = notebooks_dir / name
        if not target.exists():
            report.missing.append(target)
        elif target.read_text(encoding="utf-8") != text:
            report.stale.append(target)
        else:
            report.unchanged.append(target)
    if notebooks_dir.is_dir():
        report.extra = sorted(
            p for p in notebooks_dir.glob("*.ipynb") if p.name not in outputs
        )
    if not check:
        for target in [*report.missing, *report.stale]:
            atomic_write(target, outputs[target.name])
            report.written.append(target)
    return report
