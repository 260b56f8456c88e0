"""The gradebook ``course grade`` writes: ``gradebook.csv``, ``gradebook.json``, ``feedback/``.

Everything written here is a pure function of the grades (sorted students, notebooks in course
order, no timings, no temporary paths), so a serial and a parallel run give identical files.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.instructor.grade_rebuild import GradeSetupError, SolutionNotebook
from course_lib.instructor.grade_run import PASSED, CheckResult
from course_lib.instructor.nbio import atomic_write

FORMAT_VERSION = 1


@dataclass
class NotebookGrade:
    """One student's result on one notebook."""

    notebook: str
    status: str  # "graded", "missing", "malformed", "error"
    reason: str = ""
    source: str | None = None  # path of the submitted file, relative to SUBMISSIONS_DIR
    checks: dict[str, CheckResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    cell_errors: list[str] = field(default_factory=list)
    review_flags: list[str] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return sum(c.points for c in self.checks.values())

    @property
    def max_points(self) -> float:
        return sum(c.max_points for c in self.checks.values())

    @classmethod
    def from_json(cls, notebook: str, data: dict) -> NotebookGrade:
        """The grade :meth:`to_json` wrote (``course gradebook merge`` reads shards back)."""
        return cls(notebook, data["status"], data["reason"], data["source"],
                   {gid: CheckResult.from_json(c) for gid, c in data["checks"].items()},
                   data["warnings"], data["problems"], data["cell_errors"],
                   data["review_flags"], data["answers"])

    def to_json(self) -> dict:
        return {
            "status": self.status, "reason": self.reason, "source": self.source,
            "score": self.score, "max_points": self.max_points,
            "checks": {gid: c.to_json() for gid, c in self.checks.items()},
            "warnings": self.warnings, "problems": self.problems,
            "cell_errors": self.cell_errors, "review_flags": self.review_flags,
            "answers": self.answers,
        }


def fmt(points: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5"."""
    return f"{points:g}"


def columns(solutions: list[SolutionNotebook]) -> dict[tuple[str, str], str]:
    """CSV column of each (notebook, grade_id): the grade_id, qualified only if it repeats."""
    counts: dict[str, int] = {}
    for sol in solutions:
        for check in sol.checks:
            counts[check.grade_id] = counts.get(check.grade_id, 0) + 1
    return {(sol.name, c.grade_id): c.grade_id if counts[c.grade_id] == 1
            else f"{sol.name}:{c.grade_id}" for sol in solutions for c in sol.checks}


def check_scores(gradebook: dict) -> dict[tuple[str, str, str], tuple[str, float]]:
    """(student, notebook, grade_id) -> (status, points) of a ``gradebook.json``'s data: what
    two ways of grading the same class must agree on."""
    return {(student, name, gid): (check["status"], check["points"])
            for student, row in gradebook["students"].items()
            for name, grade in row["notebooks"].items()
            for gid, check in grade["checks"].items()}


def notes_for(grades: dict[str, NotebookGrade]) -> str:
    """The CSV ``notes`` cell: one short phrase per notebook that needs a look."""
    notes = []
    for name, grade in grades.items():
        bits = []
        if grade.status != "graded":
            bits.append(f"{grade.status}: {grade.reason}")
        bits += grade.problems
        if any(w.startswith("check cell") for w in grade.warnings):
            bits.append("check cells deleted or edited (originals run)")
        if grade.review_flags:
            bits.append("review: " + "; ".join(grade.review_flags))
        if bits:
            notes.append(f"{name}: " + "; ".join(bits))
    return " | ".join(notes)


def gradebook_csv(solutions: list[SolutionNotebook],
                  grades: dict[str, dict[str, NotebookGrade]]) -> str:
    cols = columns(solutions)
    header = ["student"]
    for sol in solutions:
        header += [cols[(sol.name, c.grade_id)] for c in sol.checks] + [f"{sol.name} total"]
    header += ["total", "max total", "notes"]
    max_total = sum(sol.max_points for sol in solutions)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for student in sorted(grades):
        row = [student]
        total = 0.0
        for sol in solutions:
            grade = grades[student][sol.name]
            row += [fmt(grade.checks[c.grade_id].points) for c in sol.checks]
            row.append(fmt(grade.score))
            total += grade.score
        row += [fmt(total), fmt(max_total), notes_for(grades[student])]
        writer.writerow(row)
    return buf.getvalue()


def gradebook_json(solutions: list[SolutionNotebook],
                   grades: dict[str, dict[str, NotebookGrade]], settings: dict,
                   warnings: list[str], shard: dict | None = None) -> str:
    max_total = sum(sol.max_points for sol in solutions)
    data = {
        "format": FORMAT_VERSION,
        "settings": settings,
        "warnings": warnings,
        "notebooks": [
            {"name": sol.name, "max_points": sol.max_points,
             "checks": [{"grade_id": c.grade_id, "points": c.points} for c in sol.checks]}
            for sol in solutions
        ],
        "max_total": max_total,
        "students": {
            student: {
                "total": sum(g.score for g in grades[student].values()),
                "max_total": max_total,
                "notebooks": {name: g.to_json() for name, g in grades[student].items()},
            }
            for student in sorted(grades)
        },
    }
    if shard is not None:  # {"index": K, "count": N, "class": [every student of the class]}
        data["shard"] = shard
    return json.dumps(data, indent=1, sort_keys=False, ensure_ascii=False) + "\n"


def _block(text: str) -> list[str]:
    fence = "```"
    while fence in text:
        fence += "`"
    return [f"{fence}text", text.rstrip(), fence]


def feedback_markdown(student: str, solutions: list[SolutionNotebook],
                      grades: dict[str, NotebookGrade]) -> str:
    total = sum(g.score for g in grades.values())
    max_total = sum(sol.max_points for sol in solutions)
    lines = [f"# Feedback for {student}", "", f"**Total: {fmt(total)} / {fmt(max_total)} points**",
             "", "| Notebook | Score | Status |", "|---|---|---|"]
    for sol in solutions:
        grade = grades[sol.name]
        status = grade.status if grade.status != "graded" else (
            "all checks passed" if grade.score == grade.max_points else "graded")
        lines.append(f"| {sol.name} | {fmt(grade.score)} / {fmt(sol.max_points)} | {status} |")
    for sol in solutions:
        grade = grades[sol.name]
        lines += ["", f"## {sol.name}: {fmt(grade.score)} / {fmt(sol.max_points)}", ""]
        if grade.status != "graded":
            lines += [f"**Not graded ({grade.status}):** {grade.reason}", ""]
        problems = grade.problems + grade.warnings
        if problems:
            lines.append("What happened while grading:")
            lines += [f"- {p}" for p in problems]
            lines.append("")
        failed = [(gid, c) for gid, c in grade.checks.items() if c.status != PASSED]
        passed = [gid for gid, c in grade.checks.items() if c.status == PASSED]
        if passed:
            lines += ["Passed: " + ", ".join(f"`{gid}`" for gid in passed), ""]
        if failed and grade.status == "graded":
            lines.append("Checks that did not pass:")
            lines.append("")
            for gid, check in failed:
                lines.append(f"### `{gid}`: {check.status}, 0 / {fmt(check.max_points)}")
                lines += _block(check.message) + [""]
        elif failed:
            lines += ["Checks not passed: " + ", ".join(f"`{gid}`" for gid, _ in failed), ""]
        if grade.cell_errors:
            lines.append("Errors in other cells (they often explain a failed check):")
            lines += [f"- {e}" for e in grade.cell_errors]
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


def check_gradebook_dir(out: Path) -> None:
    """``out`` may receive a gradebook: a new or empty folder, or an earlier gradebook's."""
    if out.exists() and not out.is_dir():
        raise GradeSetupError([f"--out: {out} exists and is not a folder"])
    if out.is_dir() and any(out.iterdir()) and not (out / "gradebook.json").exists():
        raise GradeSetupError([f"--out: {out} is not empty and holds no gradebook.json; choose "
                               "a new or empty folder (an earlier gradebook folder is replaced)"])


def clear_gradebook_dir(out: Path) -> None:
    """Remove an earlier gradebook's feedback/ and logs/ (its files are replaced on writing)."""
    for sub in ("feedback", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def write_gradebook(out: Path, solutions: list[SolutionNotebook],
                    grades: dict[str, dict[str, NotebookGrade]], settings: dict,
                    warnings: list[str], shard: dict | None = None) -> None:
    """``gradebook.csv``, ``gradebook.json`` and ``feedback/<student>.md`` in ``out``.

    ``solutions`` need only ``name``, ``checks`` (``grade_id``, ``points``) and ``max_points``.
    """
    out = Path(out)
    atomic_write(out / "gradebook.csv", gradebook_csv(solutions, grades), newline="")
    atomic_write(out / "gradebook.json",
                 gradebook_json(solutions, grades, settings, warnings, shard))
    for student in sorted(grades):
        atomic_write(out / "feedback" / f"{student}.md",
                      feedback_markdown(student, solutions, grades[student]))
