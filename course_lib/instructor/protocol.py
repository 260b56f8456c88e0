"""The cell protocol shared by ``course release`` and ``course grade`` (nbgrader-compatible).

- Fill-in (solution) cell: code cell, ``metadata.nbgrader = {solution: true, grade: false,
  locked: false, grade_id, schema_version: 3}``; its body sits between ``### BEGIN SOLUTION``
  and ``### END SOLUTION``.
- Check cell: code cell, ``metadata.nbgrader = {grade: true, solution: false, locked: true,
  grade_id, points, schema_version: 3}``; may hold ``### BEGIN HIDDEN TESTS`` /
  ``### END HIDDEN TESTS`` blocks that the release strips.
- Markdown answer: markdown cell with ``solution: true`` and a
  ``<!-- BEGIN SOLUTION -->`` … ``<!-- END SOLUTION -->`` block.
- Experiment cell: a code cell tagged ``course-experiment`` (``metadata.tags``) that only
  demonstrates or experiments; ``course grade`` leaves it out unless ``--full``
  (:mod:`course_lib.instructor.grade_plan`). The release removes the tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SOLUTION_BEGIN = "### BEGIN SOLUTION"
SOLUTION_END = "### END SOLUTION"
HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"
HIDDEN_END = "### END HIDDEN TESTS"
MD_SOLUTION_BEGIN = "<!-- BEGIN SOLUTION -->"
MD_SOLUTION_END = "<!-- END SOLUTION -->"

STUB_COMMENT = "# YOUR CODE HERE"
MD_ANSWER_PLACEHOLDER = "**YOUR ANSWER HERE** (在这里写下你的答案 / write your answer here)"

EXPERIMENT_TAG = "course-experiment"

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def stub_lines(indent: str, grade_id: str) -> list[str]:
    """The two lines that replace a solution block in the student notebook."""
    message = (
        f"Fill-in '{grade_id}' is not done yet: replace this line with your code, "
        "run the cell, then run the check cell below."
    )
    return [f"{indent}{STUB_COMMENT}", f"{indent}raise NotImplementedError({json.dumps(message)})"]


@dataclass(frozen=True)
class Problem:
    """One protocol violation, located precisely enough to fix."""

    notebook: str
    cell: int | None
    message: str
    grade_id: str | None = None

    def __str__(self) -> str:
        where = self.notebook
        if self.cell is not None:
            where += f", cell {self.cell}"
        if self.grade_id:
            where += f" (grade_id {self.grade_id!r})"
        return f"{where}: {self.message}"


class ProtocolError(Exception):
    """Raised with every problem found; nothing is written when it is raised."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def source_of(cell: Any) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def nbgrader_meta(cell: Any) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader")
    return dict(meta) if isinstance(meta, dict) else {}


def is_solution_cell(cell: Any) -> bool:
    return bool(nbgrader_meta(cell).get("solution"))


def is_check_cell(cell: Any) -> bool:
    meta = nbgrader_meta(cell)
    return cell.get("cell_type") == "code" and bool(meta.get("grade")) and not meta.get("solution")


def grade_id_of(cell: Any) -> str | None:
    gid = nbgrader_meta(cell).get("grade_id")
    return str(gid) if gid is not None else None


def points_of(cell: Any) -> float:
    try:
        return float(nbgrader_meta(cell).get("points", 0) or 0)
    except (TypeError, ValueError):
        return 0.0


def is_experiment_cell(cell: Any) -> bool:
    tags = cell.get("metadata", {}).get("tags")
    return isinstance(tags, list) and EXPERIMENT_TAG in tags


def set_tag(cell: dict, tag: str, on: bool) -> None:
    """Add or remove ``tag`` in ``metadata.tags``, leaving the metadata as it was when the tag
    is already as asked (a ``tags`` list that becomes empty is removed)."""
    meta = cell.setdefault("metadata", {})
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
    if (tag in tags) == on:
        return
    tags = [*tags, tag] if on else [t for t in tags if t != tag]
    if tags:
        meta["tags"] = tags
    else:
        meta.pop("tags", None)


def replace_blocks(
    source: str, begin: str, end: str, replacement: Any
) -> tuple[str, list[str]]:
    """Replace each ``begin`` … ``end`` block (marker lines matched after stripping).

    ``replacement(indent)`` returns the lines to put in place of a block, ``indent`` being the
    whitespace before its ``begin`` marker. Returns the new source and a list of problems
    (unbalanced or nested markers); the source is unchanged when there are problems.
    """
    lines = source.split("\n")
    out: list[str] = []
    problems: list[str] = []
    open_at: int | None = None
    indent = ""
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped == begin:
            if open_at is not None:
                problems.append(
                    f"nested '{begin}' on line {number} (the block opened on line {open_at} "
                    f"is not closed)"
                )
                continue
            open_at, indent = number, line[: len(line) - len(line.lstrip())]
            continue
        if stripped == end:
            if open_at is None:
                problems.append(f"'{end}' on line {number} without a matching '{begin}'")
                continue
            out.extend(replacement(indent))
            open_at = None
            continue
        if open_at is None:
            out.append(line)
    if open_at is not None:
        problems.append(f"'{begin}' on line {open_at} has no matching '{end}'")
    if problems:
        return source, problems
    return "\n".join(out), []


def has_marker(source: str, *markers: str) -> bool:
    return any(line.strip() in markers for line in source.split("\n"))
