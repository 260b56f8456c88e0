"""``course gradebook merge``: the gradebooks of ``course grade --shard K/N`` runs, as one.

    course gradebook merge SHARD_DIR... --out GRADEBOOK_DIR

Each shard's ``gradebook.json`` holds its students' complete results and says which slice of
which class it is (``shard``: ``index``, ``count`` and the whole ``class``). The merge checks
that the shards are the ``N`` slices of one class, graded the same way (same notebooks, checks
and settings), and that every student is in exactly one of them; then it writes the same
``gradebook.csv``, ``gradebook.json`` and ``feedback/`` a single run would have written, and
copies each student's ``logs/``. Exit status 0 when merged, 2 (saying why) when not.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from course_lib.instructor.grade_rebuild import CheckSpec, GradeSetupError
from course_lib.instructor.grade_report import (
    FORMAT_VERSION,
    NotebookGrade,
    check_gradebook_dir,
    clear_gradebook_dir,
    write_gradebook,
)
from course_lib.instructor.grade_students import shard_students

# Settings that describe the machine a shard ran on: the merged gradebook keeps the weakest.
MACHINE_SETTINGS = ("network_isolated", "pid_namespace")


@dataclass(frozen=True)
class GradedNotebook:
    """What the gradebook says of a notebook: its name and checks (as the report needs)."""

    name: str
    checks: list[CheckSpec]

    @property
    def max_points(self) -> float:
        return sum(c.points for c in self.checks)


def _read_shard(folder: Path) -> dict:
    path = Path(folder) / "gradebook.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GradeSetupError([f"{path}: cannot read a gradebook ({exc})"]) from None
    if data.get("format") != FORMAT_VERSION:
        raise GradeSetupError([f"{path}: gradebook format {data.get('format')!r}, expected "
                               f"{FORMAT_VERSION} (made by another version of course grade?)"])
    if not isinstance(data.get("shard"), dict):
        raise GradeSetupError([f"{path}: not the gradebook of a shard (graded without "
                               "--shard K/N); there is nothing to merge it with"])
    return data


def _differ(shards: dict[Path, dict], project, what: str) -> list[str]:
    (first_dir, first), *rest = shards.items()
    return [f"{folder}: {what} differ from {first_dir}'s" for folder, data in rest
            if project(data) != project(first)]


def check_shards(shards: dict[Path, dict]) -> list[str]:
    """Why ``shards`` (folder -> gradebook.json) are not the slices of one class, if they are
    not: every problem, for the instructor to fix before merging."""
    problems = _differ(shards, lambda d: d["notebooks"], "the notebooks or their checks")
    problems += _differ(shards, lambda d: (d["shard"]["count"], d["shard"]["class"]),
                        "the class or its number of shards")
    problems += _differ(shards, lambda d: {k: v for k, v in d["settings"].items()
                                           if k not in MACHINE_SETTINGS}, "the settings")
    if problems:
        return problems
    first = next(iter(shards.values()))["shard"]
    count, everyone = first["count"], first["class"]
    seen: dict[int, Path] = {}
    owner: dict[str, Path] = {}
    for folder, data in shards.items():
        index = data["shard"]["index"]
        if index in seen:
            problems.append(f"{folder}: shard {index}/{count} again (also {seen[index]})")
        seen[index] = folder
        if sorted(data["students"]) != shard_students(everyone, index, count):
            problems.append(f"{folder}: its students are not slice {index}/{count} of the class")
        for student in data["students"]:
            if student in owner:
                problems.append(f"student {student!r} is in {owner[student]} and in {folder}")
            owner.setdefault(student, folder)
    missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in seen]
    if missing:
        problems.append(f"shard(s) {', '.join(missing)} missing")
    uncovered = [s for s in everyone if s not in owner]
    if uncovered:
        problems.append(f"{len(uncovered)} student(s) in no shard: {', '.join(uncovered[:20])}"
                        + (" …" if len(uncovered) > 20 else ""))
    return problems


def merge_gradebooks(shard_dirs: list[Path], out: Path) -> dict[str, dict[str, NotebookGrade]]:
    """Merge the shard gradebooks in ``shard_dirs`` into ``out``; returns the grades.

    Raises :class:`GradeSetupError` (nothing written) when they are not one class's slices.
    """
    out = Path(out)
    given = [Path(folder).resolve() for folder in shard_dirs]
    twice = sorted({str(f) for f in given if given.count(f) > 1})
    if twice:
        raise GradeSetupError([f"{folder} is given more than once" for folder in twice])
    shards = {Path(folder): _read_shard(folder) for folder in shard_dirs}
    for folder in shards:
        if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
            raise GradeSetupError([f"--out: {out} is (inside) the shard {folder}; choose "
                                   "another folder"])
    check_gradebook_dir(out)
    problems = check_shards(shards)
    if problems:
        raise GradeSetupError(problems)
    first = next(iter(shards.values()))
    notebooks = [GradedNotebook(nb["name"], [CheckSpec(c["grade_id"], c["points"], -1)
                                             for c in nb["checks"]]) for nb in first["notebooks"]]
    settings = dict(first["settings"])
    for key in MACHINE_SETTINGS:
        settings[key] = all(d["settings"].get(key) for d in shards.values())
    warnings = list(dict.fromkeys(w for d in shards.values() for w in d["warnings"]))
    grades = {student: {name: NotebookGrade.from_json(name, nb)
                        for name, nb in row["notebooks"].items()}
              for d in shards.values() for student, row in d["students"].items()}
    clear_gradebook_dir(out)
    for folder, data in shards.items():
        for student in data["students"]:
            if (folder / "logs" / student).is_dir():
                shutil.copytree(folder / "logs" / student, out / "logs" / student)
    write_gradebook(out, notebooks, grades, settings, warnings)
    return grades


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``course gradebook merge`` on the ``course`` command's sub-parsers."""
    p = subparsers.add_parser("gradebook", help="work with gradebooks: merge the shards of a class",
                              description="Work with the gradebooks `course grade` writes.")
    sub = p.add_subparsers(dest="gradebook_command", required=True, metavar="COMMAND")
    m = sub.add_parser("merge", help="combine the gradebooks of `course grade --shard K/N` runs",
                       description="Combine the gradebooks of `course grade --shard K/N` runs "
                                   "into the gradebook one run would have written, after "
                                   "checking that they cover every student exactly once.")
    m.add_argument("shards", nargs="+", type=Path, metavar="SHARD_DIR",
                   help="the --out folders of the shard runs")
    m.add_argument("--out", type=Path, required=True, metavar="GRADEBOOK_DIR",
                   help="where the merged gradebook.csv, gradebook.json, feedback/ and logs/ go")
    m.set_defaults(func=cmd_merge)
    return p


def cmd_merge(args: argparse.Namespace) -> int:
    try:
        grades = merge_gradebooks(args.shards, args.out)
    except GradeSetupError as exc:
        return exc.report("the shards cannot be merged")
    print(f"merged {len(args.shards)} shards, {len(grades)} students: wrote "
          f"{args.out / 'gradebook.csv'}, {args.out / 'gradebook.json'} and "
          f"{args.out / 'feedback'}/")
    return 0
