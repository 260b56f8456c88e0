"""Helpers to build notebooks that follow the cell protocol (used by tests and by authors).

Example::

    from course_lib.instructor.authoring import md, code, solution, check, notebook, write
    nb = notebook([
        md("## 1. 参数量 (Parameter count)"),
        solution("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION", "nb00_f"),
        check("'Checks f.'\nfrom course_lib.checks.welcome import check_f\ncheck_f(f)",
              "nb00_f_check", points=1),
    ])
    write(nb, "solutions/00_welcome.ipynb")
"""

from __future__ import annotations

from pathlib import Path

from course_lib.instructor.protocol import KERNELSPEC


def _cell(cell_type: str, source: str, metadata: dict | None = None) -> dict:
    cell: dict = {"cell_type": cell_type, "metadata": metadata or {}, "source": source}
    if cell_type == "code":
        cell["outputs"] = []
        cell["execution_count"] = None
    return cell


def md(source: str) -> dict:
    """A markdown cell."""
    return _cell("markdown", source)


def code(source: str) -> dict:
    """A plain (ungraded) code cell."""
    return _cell("code", source)


def solution(source: str, grade_id: str) -> dict:
    """A fill-in cell; ``source`` holds a ``### BEGIN SOLUTION`` … ``### END SOLUTION`` block."""
    meta = {"nbgrader": {"grade": False, "grade_id": grade_id, "locked": False,
                         "schema_version": 3, "solution": True}}
    return _cell("code", source, meta)


def answer(source: str, grade_id: str) -> dict:
    """A markdown answer cell with a ``<!-- BEGIN SOLUTION -->`` … block."""
    meta = {"nbgrader": {"grade": False, "grade_id": grade_id, "locked": False,
                         "schema_version": 3, "solution": True}}
    return _cell("markdown", source, meta)


def check(source: str, grade_id: str, points: float = 1) -> dict:
    """A check cell (locked, graded)."""
    meta = {"nbgrader": {"grade": True, "grade_id": grade_id, "locked": True,
                         "points": points, "schema_version": 3, "solution": False}}
    return _cell("code", source, meta)


def notebook(cells: list[dict]) -> dict:
    """A notebook dict (nbformat 4.5) with deterministic cell ids ``cell-<index>``."""
    cells = [dict(c, id=c.get("id") or f"cell-{i}") for i, c in enumerate(cells)]
    return {
        "cells": cells,
        "metadata": {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def write(nb: dict, path: str | Path) -> Path:
    """Write ``nb`` with the same stable formatting the release uses."""
    from course_lib.instructor.release import dumps

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(nb), encoding="utf-8")
    return path
