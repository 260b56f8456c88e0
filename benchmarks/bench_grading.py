"""Grading a generated class with `course grade`: time per student, extrapolated to 100.

Generates N students from the course itself (instructor/grade_demo.py: correct, empty, partial,
wrong, the other half of partial, and mixed submissions of every notebook, in turn), grades them
with ``--jobs 2`` (the default fast mode: the set-up cell, the fill-ins and the checks), and
prints the wall time, the time per student and ``100 x`` that (an upper bound for 100
students: the workers' start-up, paid once, is counted in every student's share). Then, on
request, the same for a sample with ``--full`` (and whether its per-check scores are the same),
and a serial run (whether its gradebook is byte-identical).

    python benchmarks/bench_grading.py [--students 6] [--jobs 2] [--full-sample K]
                                       [--serial-check] [--notebook NN_name ...] [--keep DIR]

The issue's target: 100 students, all six notebooks, --jobs 2, within 60 minutes on 2 cores
(`--students 100 --full-sample 10 --serial-check` on a quiet machine checks all of it). Times
depend on the machine's load: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from course_lib.instructor.grade_batch import grade_submissions
from course_lib.instructor.grade_demo import class_kinds, write_class
from course_lib.instructor.grade_options import GradeOptions
from course_lib.instructor.grade_plan import grading_plan
from course_lib.instructor.grade_rebuild import load_solutions
from course_lib.instructor.grade_report import check_scores
from course_lib.validation import positive_int

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=6, help="students to generate")
    parser.add_argument("--jobs", type=int, default=2, help="course grade --jobs")
    parser.add_argument("--full-sample", type=int, default=0, metavar="K",
                        help="also grade the first K students with --full and compare scores")
    parser.add_argument("--serial-check", action="store_true",
                        help="also grade with --jobs 1 and compare the gradebooks")
    parser.add_argument("--notebook", action="append", dest="notebooks", metavar="NN_name",
                        help="only this notebook (repeatable; default: all)")
    parser.add_argument("--solutions", type=Path, default=ROOT / "solutions")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep the class and gradebooks in DIR (default: a temporary folder)")
    args = parser.parse_args(argv)
    try:
        positive_int("--students", args.students)
        positive_int("--jobs", args.jobs)
        if args.full_sample:
            positive_int("--full-sample", args.full_sample)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def timed_grade(subs: Path, out: Path, options: GradeOptions) -> tuple[float, dict]:
    start = time.perf_counter()
    grade_submissions(subs, out, options)
    seconds = time.perf_counter() - start
    return seconds, json.loads((out / "gradebook.json").read_text(encoding="utf-8"))



def notebook_seconds(out: Path) -> dict[str, float]:
    """Median pytest time per notebook, from the logs (kernel start + the cells that ran)."""
    times: dict[str, list[float]] = {}
    for log in out.glob("logs/*/*.log"):
        found = re.findall(r" in ([\d.]+)s", log.read_text(encoding="utf-8", errors="replace"))
        if found:
            times.setdefault(log.stem, []).append(float(found[-1]))
    return {name: statistics.median(values) for name, values in sorted(times.items())}


def report(label: str, seconds: float, students: int, data: dict, out: Path) -> None:
    per = seconds / students
    counts: dict[str, int] = {}
    for status, _ in check_scores(data).values():
        counts[status] = counts.get(status, 0) + 1
    print(f"{label:<28s} {students:>4d} students  {seconds:8.1f} s  {per:6.1f} s/student  "
          f"100 students <= {per * 100 / 60:5.1f} min")
    print(f"{'':28s} checks: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    medians = notebook_seconds(out)
    print(f"{'':28s} median s/notebook: " + ", ".join(f"{k[:2]} {v:.1f}" for k, v in
                                                     medians.items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-grading-"))
    work.mkdir(parents=True, exist_ok=True)
    solutions = load_solutions(args.solutions, args.notebooks)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (a shared "
          "machine makes every time an upper bound)")
    for sol in solutions:
        print(f"  {sol.name}: grading {grading_plan(sol.nb['cells']).describe()}")
    kinds = class_kinds(args.students)
    subs = write_class(work / "submissions", solutions, kinds)
    notebooks = tuple(sol.name for sol in solutions)
    base = dict(solutions=args.solutions, notebooks=notebooks, progress=False)
    failures = 0
    try:
        seconds, fast = timed_grade(subs, work / "fast", GradeOptions(jobs=args.jobs, **base))
        report(f"fast, --jobs {args.jobs}", seconds, args.students, fast, work / "fast")
        if args.full_sample:
            sample = work / "sample"
            for student in list(kinds)[:args.full_sample]:
                shutil.copytree(subs / student, sample / student, dirs_exist_ok=True)
            k = len(list(sample.iterdir()))
            full_s, full = timed_grade(sample, work / "full",
                                       GradeOptions(jobs=args.jobs, full=True, **base))
            report(f"--full, --jobs {args.jobs}", full_s, k, full, work / "full")
            same = check_scores(full) == {key: v for key, v in check_scores(fast).items()
                                    if key[0] in full["students"]}
            failures += not same
            print(f"{'':28s} per-check scores equal to the fast mode's: {same}; fast mode "
                  f"{full_s / k / (seconds / args.students):.1f}x faster per student")
        if args.serial_check:
            serial_s, _ = timed_grade(subs, work / "serial", GradeOptions(jobs=1, **base))
            same = all((work / "serial" / f).read_bytes() == (work / "fast" / f).read_bytes()
                       for f in ("gradebook.csv", "gradebook.json"))
            failures += not same
            print(f"{'serial, --jobs 1':<28s} {args.students:>4d} students  {serial_s:8.1f} s  "
                  f"gradebook identical to --jobs {args.jobs}: {same}")
    finally:
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"class and gradebooks kept in {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
