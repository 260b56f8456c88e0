"""Test helper: run a solution notebook's fill-in cells (as solved, or as released) in a namespace.

The check tests (``tests/test_checks_*.py``) take each fill-in from the solution notebook itself,
so they always follow the notebook as it is: a check must pass on the solution and fail usefully
on the release's stub.
"""

from __future__ import annotations

from pathlib import Path

from course_lib.instructor.nbio import load_json_notebook
from course_lib.instructor.protocol import ProtocolError, grade_id_of, source_of
from course_lib.instructor.release import student_cell


def run_fill_ins(
    notebook: Path, grade_ids: list[str] | tuple[str, ...], namespace: dict, released: bool = False
) -> dict:
    """Execute the fill-in cells ``grade_ids`` of a solution notebook in ``namespace``.

    With ``released=True`` the cells run as students first see them (the release's stubs), so a
    test can check that each check function fails usefully on the stub and passes on the
    solution, always following the notebook as it is. Returns ``namespace``.
    """
    notebook = Path(notebook)
    nb = load_json_notebook(notebook)
    cells = {grade_id_of(cell): (index, cell) for index, cell in enumerate(nb["cells"])}
    for grade_id in grade_ids:
        if grade_id not in cells:
            raise LookupError(f"{notebook.name} has no cell with grade_id {grade_id!r}")
        index, cell = cells[grade_id]
        if released:
            cell, problems = student_cell(cell, notebook.name, index)
            if problems:
                raise ProtocolError(problems)
        exec(compile(source_of(cell), f"<{notebook.name}:{grade_id}>", "exec"), namespace)
    return namespace
