"""Which students ``course grade`` finds in a submissions folder, and which file it grades.

Two layouts are recognised (see docs/GRADING.md):

- ``SUBMISSIONS_DIR/<student>/<NN_name>.ipynb``;
- nbgrader's ``submitted/<student>/<assignment>/<NN_name>.ipynb``, given either the nbgrader
  course folder (the one holding ``submitted/``) or ``submitted/`` itself.
"""

from __future__ import annotations

from pathlib import Path


def student_root(submissions: Path) -> tuple[Path, str]:
    """The folder holding one folder per student, and the layout's name."""
    if (submissions / "submitted").is_dir():
        return submissions / "submitted", "nbgrader"
    if submissions.name == "submitted":
        return submissions, "nbgrader"
    return submissions, "plain"


def find_students(root: Path) -> list[str]:
    """The student folders in ``root``, sorted (hidden ``.x`` and ``__x`` folders are not)."""
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith((".", "__")))


def shard_students(students: list[str], index: int, count: int) -> list[str]:
    """Slice ``index`` of ``count`` (1-based) of the sorted ``students``: every ``count``-th
    student from the ``index``-th, so the slices differ in size by one at most, and together
    hold every student exactly once."""
    return sorted(students)[index - 1::count]


def locate(student_dir: Path, filename: str) -> tuple[Path | None, list[str]]:
    """``<student>/<filename>`` or ``<student>/<assignment>/<filename>`` (nbgrader)."""
    found = [student_dir / filename] if (student_dir / filename).exists() else []
    found += sorted(p for p in student_dir.glob(f"*/{filename}")
                    if not p.parent.name.startswith("."))
    if not found:
        return None, []
    warnings = []
    if len(found) > 1:
        rel = ", ".join(str(p.relative_to(student_dir)) for p in found)
        warnings.append(f"{len(found)} copies of {filename} were submitted ({rel}); "
                        f"{found[0].relative_to(student_dir)} was graded")
    return found[0], warnings
