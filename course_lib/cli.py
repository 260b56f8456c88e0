"""The ``course`` command: instructor tools for the workbook.

    course release [--check]        solutions/ -> notebooks/ (student versions)
    course execute NOTEBOOK...      run solution notebooks and store their outputs
    course plan [NOTEBOOK...] [--mark]   which cells grading runs; --mark tags experiment cells
    course grade SUBMISSIONS --out GRADEBOOK   grade student submissions with nbval
    course gradebook merge SHARD... --out GRADEBOOK   combine the gradebooks of --shard runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _project_root() -> Path:
    return Path.cwd()


def cmd_release(args: argparse.Namespace) -> int:
    from course_lib.instructor.protocol import ProtocolError
    from course_lib.instructor.release import release

    try:
        report = release(args.solutions, args.notebooks, check=args.check)
    except ProtocolError as exc:
        print("error: the solution notebooks break the cell protocol; nothing was written:",
              file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for path in report.stale:
            print(f"stale: {path} differs from what `course release` generates", file=sys.stderr)
        for path in report.missing:
            print(f"missing: {path} (run `course release`)", file=sys.stderr)
        for path in report.extra:
            print(f"extra: {path} has no solution notebook in {args.solutions}", file=sys.stderr)
        if report.clean:
            print(f"release is up to date: {len(report.unchanged)} student notebooks")
            return 0
        print("error: notebooks/ is out of date; run `course release` (or `make release`)",
              file=sys.stderr)
        return 1
    for path in report.written:
        print(f"wrote {path}")
    print(f"{len(report.written)} written, {len(report.unchanged)} unchanged")
    for path in report.extra:
        print(f"warning: {path} has no solution notebook (left untouched)", file=sys.stderr)
    return 0


def cmd_execute(args: argparse.Namespace) -> int:
    from course_lib.instructor.execute import execute_notebook

    for path in args.notebooks:
        if not path.is_file():
            print(f"error: notebook not found: {path}", file=sys.stderr)
            return 2
    for path in args.notebooks:
        print(f"executing {path} ...", flush=True)
        execute_notebook(path, timeout=args.timeout)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from course_lib.instructor.grade_plan import grading_plan, mark_experiments, plan_problems
    from course_lib.instructor.nbio import (
        atomic_write,
        dumps,
        load_json_notebook,
        notebook_paths,
    )

    paths = args.notebooks or notebook_paths(Path("solutions"))
    if not paths:
        print("error: no notebooks given and no NN_name.ipynb in solutions/", file=sys.stderr)
        return 2
    failed = False
    for path in paths:
        if not path.is_file():
            print(f"error: notebook not found: {path}", file=sys.stderr)
            return 2
        nb = load_json_notebook(path)
        if args.mark:
            before = dumps(nb)
            mark_experiments(nb)
            if dumps(nb) != before:
                atomic_write(path, dumps(nb))
                print(f"tagged the experiment cells of {path}")
        plan = grading_plan(nb["cells"])
        print(f"{path}: grading {plan.describe()}")
        for problem in plan_problems(nb, str(path)):
            print(f"  - {problem}", file=sys.stderr)
            failed = True
    return 2 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("release", help="generate notebooks/ from solutions/")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming each stale, missing or extra notebook")
    p.add_argument("--solutions", type=Path, default=Path("solutions"),
                   help="folder of solution notebooks (default: solutions)")
    p.add_argument("--notebooks", type=Path, default=Path("notebooks"),
                   help="folder of student notebooks (default: notebooks)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("execute", help="run solution notebooks and store their outputs")
    p.add_argument("notebooks", type=Path, nargs="+", metavar="NOTEBOOK")
    p.add_argument("--timeout", type=int, default=600, help="per-cell timeout in seconds")
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser("plan", help="show which cells `course grade` runs; --mark tags the "
                                    "experiment cells of solution notebooks",
                       description="Show, per solution notebook, the code cells `course grade` "
                                   "runs and the experiment cells (tag course-experiment) it "
                                   "leaves out. With --mark, first tag exactly the cells that "
                                   "neither the set-up cell, the fill-ins nor the checks need "
                                   "(a name analysis of every cell), and untag the others.")
    p.add_argument("notebooks", type=Path, nargs="*", metavar="NOTEBOOK",
                   help="solution notebooks (default: solutions/NN_name.ipynb)")
    p.add_argument("--mark", action="store_true",
                   help="rewrite the course-experiment tags (metadata only) before showing")
    p.set_defaults(func=cmd_plan)

    try:
        from course_lib.instructor import grade
    except ImportError:  # pragma: no cover - grading lands with its own module
        grade = None
    if grade is not None and hasattr(grade, "add_parser"):
        grade.add_parser(sub)
        from course_lib.instructor import grade_merge

        grade_merge.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
