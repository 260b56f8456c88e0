"""The released student notebooks, executed as is, stop at the first fill-in with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from course_lib.instructor.execute import apply_notebook_env
from course_lib.instructor.protocol import is_check_cell, is_solution_cell

ROOT = Path(__file__).resolve().parents[1]
STUDENT_NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", STUDENT_NOTEBOOKS, ids=lambda p: p.name)
def test_unfilled_notebook_stops_at_first_fill_in(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    first_fill_in = next(
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and is_solution_cell(c)
    )
    grade_id = nb.cells[first_fill_in].metadata["nbgrader"]["grade_id"]
    # The first error must come from the first fill-in: the fill-in itself (a top-level
    # `raise`) or the check cell right after it (which calls the unfilled function).
    next_check = next(
        (i for i in range(first_fill_in + 1, len(nb.cells)) if is_check_cell(nb.cells[i])),
        first_fill_in,
    )
    nb.cells = nb.cells[: next_check + 1]
    apply_notebook_env()
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError) as info:
        client.execute()
    # the fill-in's own stub (a top-level `raise`), or the check cell's one friendly line
    # (course_lib.checks.core.call_student: "... is not filled in yet: fill in <name> above,
    # then run this cell again.")
    assert info.value.ename in ("NotImplementedError", "AssertionError", "CheckFailure")
    assert (f"Fill-in '{grade_id}' is not done yet" in info.value.evalue
            or "above, then run this cell again" in info.value.evalue), info.value.evalue
    failed = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failed and failed[0] >= first_fill_in, "a cell before the first fill-in failed"
    assert json.loads(path.read_text(encoding="utf-8"))  # the file itself is untouched
