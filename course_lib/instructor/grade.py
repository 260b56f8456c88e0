"""``course grade``: grade a folder of student submissions with nbval into a gradebook.

    course grade SUBMISSIONS_DIR --out GRADEBOOK_DIR [--jobs N] [--timeout SECONDS]
                 [--notebook-timeout SECONDS] [--memory-limit SIZE] [--solutions DIR]
                 [--notebook NN_name ...] [--shard K/N] [--full]
    course grade --demo OUT
    course gradebook merge SHARD_DIR... --out GRADEBOOK_DIR

This module is the command (its arguments, Ctrl-C / SIGTERM handling and the summary it prints);
the work is done by

- :mod:`.grade_options`  the options, their defaults and converters;
- :mod:`.grade_students` which students a submissions folder holds (plain or nbgrader layout);
- :mod:`.grade_batch`    grading every (student, notebook) pair into a gradebook;
- :mod:`.grade_rebuild`  the notebook that runs, rebuilt from the solution ("never trust");
- :mod:`.grade_plan`     which of its cells run (only what the checks need, unless --full);
- :mod:`.grade_run`      one sandboxed nbval run, and its records read into check statuses;
- :mod:`.grade_sandbox`  the isolation (namespaces, memory limit) and its detection;
- :mod:`.grade_report`   ``gradebook.csv``, ``gradebook.json`` and ``feedback/``;
- :mod:`.grade_merge`    ``course gradebook merge``: the gradebooks of ``--shard`` runs as one;
- :mod:`.grade_pool`     the warm workers (:mod:`.grade_worker`, :mod:`.grade_kernel`);
- :mod:`.grade_demo`     the demo class built from the course itself.

The exit status is 0 whenever grading completed, whatever the scores; 2 when grading could not
run; 130 when interrupted. See docs/GRADING.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from course_lib.instructor.grade_batch import (  # noqa: F401  (re-exported: the public API)
    GradeRun,
    check_out_dir,
    grade_notebook,
    grade_submissions,
)
from course_lib.instructor.grade_demo import (  # noqa: F401
    DEMO_MARKER,
    DEMO_STUDENTS,
    build_demo,
    demo_notebook,
)
from course_lib.instructor.grade_options import (  # noqa: F401
    DEFAULT_CELL_TIMEOUT,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_NOTEBOOK_TIMEOUT,
    MIN_MEMORY,
    GradeOptions,
    jobs_arg,
    memory_arg,
    parse_memory,
    parse_shard,
    seconds_arg,
    shard_arg,
)
from course_lib.instructor.grade_rebuild import GradeSetupError, load_solutions
from course_lib.instructor.grade_report import fmt
from course_lib.instructor.grade_sandbox import Sandbox, detect_sandbox  # noqa: F401
from course_lib.instructor.grade_students import (  # noqa: F401
    find_students,
    locate,
    student_root,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``course grade`` on the ``course`` command's sub-parsers."""
    p = subparsers.add_parser(
        "grade", help="grade student submissions with nbval into a gradebook",
        description="Rebuild each submitted notebook from the solution notebook, run it under "
                    "nbval in a sandbox, and write gradebook.csv, gradebook.json and feedback/. "
                    "Exit status 0 when grading completed (whatever the scores), 2 when it "
                    "could not run. See docs/GRADING.md.",
    )
    p.add_argument("submissions", nargs="?", type=Path, metavar="SUBMISSIONS_DIR",
                   help="<student>/<NN_name>.ipynb folders, or nbgrader's submitted/ layout")
    p.add_argument("--out", type=Path, metavar="GRADEBOOK_DIR",
                   help="where gradebook.csv, gradebook.json, feedback/ and logs/ go "
                        "(required with SUBMISSIONS_DIR; default with --demo: OUT/gradebook)")
    p.add_argument("--demo", type=Path, metavar="OUT",
                   help="build demo submissions from the course itself (a correct, an empty and "
                        "a partial student) in OUT/submissions and grade them into OUT/gradebook")
    p.add_argument("--jobs", type=jobs_arg, default=1, metavar="N",
                   help="notebooks graded in parallel (integer >= 1; default 1)")
    p.add_argument("--timeout", type=seconds_arg, default=DEFAULT_CELL_TIMEOUT,
                   metavar="SECONDS",
                   help=f"per-cell time limit (default {DEFAULT_CELL_TIMEOUT:g})")
    p.add_argument("--notebook-timeout", type=seconds_arg, default=DEFAULT_NOTEBOOK_TIMEOUT,
                   metavar="SECONDS",
                   help=f"whole-notebook time limit (default {DEFAULT_NOTEBOOK_TIMEOUT:g})")
    p.add_argument("--memory-limit", type=memory_arg, default=DEFAULT_MEMORY_LIMIT,
                   metavar="SIZE",
                   help="memory each grading process may use, like 4G or 512M, or 'none' "
                        f"(default {DEFAULT_MEMORY_LIMIT})")
    p.add_argument("--solutions", type=Path, default=Path("solutions"), metavar="DIR",
                   help="folder of solution notebooks (default: solutions)")
    p.add_argument("--notebook", action="append", metavar="NN_name", dest="notebooks",
                   help="grade only this notebook (repeatable; default: all of them)")
    p.add_argument("--sanitize-with", type=Path, default=None, metavar="CFG",
                   help="nbval sanitizer file (default: nbval_sanitize.cfg next to --solutions)")
    p.add_argument("--shard", type=shard_arg, default=None, metavar="K/N",
                   help="grade only the K-th of N slices of the class (every N-th student from "
                        "the K-th, in name order); `course gradebook merge` combines the N "
                        "gradebooks")
    p.add_argument("--full", action="store_true",
                   help="run every cell of each notebook; by default the cells tagged "
                        "course-experiment that no check needs are left out (same scores, "
                        "much faster)")
    p.set_defaults(func=cmd_grade, grade_parser=p)
    return p


def cmd_grade(args: argparse.Namespace) -> int:
    parser = args.grade_parser
    if args.demo is not None and args.submissions is not None:
        parser.error("give either SUBMISSIONS_DIR or --demo OUT, not both")
    if args.demo is None and args.submissions is None:
        parser.error("SUBMISSIONS_DIR is required (or --demo OUT to grade a demo class)")
    if args.demo is not None and args.shard is not None:
        parser.error("--shard needs SUBMISSIONS_DIR: build the demo class once (--demo), then "
                     "grade OUT/submissions in shards")
    if args.demo is None and args.out is None:
        parser.error("--out GRADEBOOK_DIR is required: the folder for gradebook.csv, "
                     "gradebook.json and feedback/")
    options = GradeOptions(
        jobs=args.jobs, cell_timeout=args.timeout, notebook_timeout=args.notebook_timeout,
        memory_limit=args.memory_limit, solutions=args.solutions,
        notebooks=tuple(args.notebooks) if args.notebooks else None,
        sanitize_with=args.sanitize_with, full=args.full, shard=args.shard,
    )
    previous = _sigterm_as_interrupt()
    try:
        if args.demo is not None:
            solutions = load_solutions(args.solutions, args.notebooks)
            submissions = build_demo(args.demo, solutions)
            print(f"demo submissions: {submissions} ({', '.join(DEMO_STUDENTS)})")
            out = args.out or args.demo / "gradebook"
        else:
            submissions, out = args.submissions, args.out
        result = grade_submissions(submissions, out, options)
    except GradeSetupError as exc:
        return exc.report("grading could not run")
    except KeyboardInterrupt:
        print("interrupted: grading stopped, no gradebook was written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    _print_summary(result, out)
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """Make SIGTERM stop grading like Ctrl-C (running notebooks are killed); returns the previous
    handler, or None where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _print_summary(result: GradeRun, out: Path) -> None:
    max_total = sum(sol.max_points for sol in result.solutions)
    width = max((len(s) for s in result.grades), default=0)
    for student, grades in result.grades.items():
        total = sum(g.score for g in grades.values())
        issues = [f"{name}: {g.status}" for name, g in grades.items() if g.status != "graded"]
        issues += [f"{name}: {p}" for name, g in grades.items() for p in g.problems[:1]]
        note = f"  ({'; '.join(issues)})" if issues else ""
        print(f"{student:<{width}}  {fmt(total):>5} / {fmt(max_total)}{note}")
    print(f"wrote {out / 'gradebook.csv'}, {out / 'gradebook.json'} and {out / 'feedback'}/")
