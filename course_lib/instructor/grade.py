"""``course grade``: grade a folder of student submissions with nbval into a gradebook.

    course grade SUBMISSIONS_DIR --out GRADEBOOK_DIR [--jobs N] [--timeout SECONDS]
                 [--notebook-timeout SECONDS] [--memory-limit SIZE] [--solutions DIR]
                 [--notebook NN_name ...]
    course grade --demo OUT

Input layouts (see docs/GRADING.md):

- ``SUBMISSIONS_DIR/<student>/<NN_name>.ipynb``;
- nbgrader's ``submitted/<student>/<assignment>/<NN_name>.ipynb``, given either the nbgrader
  course folder (the one holding ``submitted/``) or ``submitted/`` itself.

Each submitted notebook is rebuilt from the solution notebook (:mod:`.grade_rebuild`), run under
nbval in a sandboxed subprocess (:mod:`.grade_run`), and every check gets a status (passed,
failed, error, timeout, missing) and points. The originals are only read. The exit status is 0
whenever grading completed, whatever the scores; 2 when grading could not run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from course_lib.instructor.grade_rebuild import (
    GradeSetupError,
    MalformedNotebook,
    SolutionNotebook,
    load_solutions,
    read_submission,
    rebuild,
    strip_solution_markers,
)
from course_lib.instructor.grade_report import NotebookGrade, fmt, write_gradebook
from course_lib.instructor.grade_run import (
    ERROR,
    MISSING,
    CheckResult,
    RunSettings,
    interpret,
    kill_all_running,
    run_notebook,
)
from course_lib.instructor.protocol import is_solution_cell
from course_lib.instructor.release import dumps, release_notebook

DEFAULT_CELL_TIMEOUT = 180.0
DEFAULT_NOTEBOOK_TIMEOUT = 900.0
DEFAULT_MEMORY_LIMIT = "4G"
MIN_MEMORY = 256 * 2**20
DEMO_STUDENTS = ("demo_correct", "demo_empty", "demo_partial")
DEMO_MARKER = ".course-grade-demo"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


# ---------------------------------------------------------------------------------------------
# Argument parsing


def parse_memory(text: str) -> int | None:
    """``"4G"`` -> bytes (binary units; K, M, G, T, optional ``B``/``iB``); ``"none"`` -> None."""
    if str(text).strip().lower() in ("none", "unlimited", "off"):
        return None
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"expected a size like 4G, 512M or 'none', got {text!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < MIN_MEMORY:
        raise ValueError(f"{text!r} is below the minimum of 256M (a Jupyter kernel needs more "
                         "to start); use e.g. 1G, or 'none' for no limit")
    return value


def _memory_arg(text: str) -> str:
    try:
        parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _jobs_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


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
    p.add_argument("--jobs", type=_jobs_arg, default=1, metavar="N",
                   help="notebooks graded in parallel (integer >= 1; default 1)")
    p.add_argument("--timeout", type=_seconds_arg, default=DEFAULT_CELL_TIMEOUT,
                   metavar="SECONDS",
                   help=f"per-cell time limit (default {DEFAULT_CELL_TIMEOUT:g})")
    p.add_argument("--notebook-timeout", type=_seconds_arg, default=DEFAULT_NOTEBOOK_TIMEOUT,
                   metavar="SECONDS",
                   help=f"whole-notebook time limit (default {DEFAULT_NOTEBOOK_TIMEOUT:g})")
    p.add_argument("--memory-limit", type=_memory_arg, default=DEFAULT_MEMORY_LIMIT,
                   metavar="SIZE",
                   help="memory each grading process may use, like 4G or 512M, or 'none' "
                        f"(default {DEFAULT_MEMORY_LIMIT})")
    p.add_argument("--solutions", type=Path, default=Path("solutions"), metavar="DIR",
                   help="folder of solution notebooks (default: solutions)")
    p.add_argument("--notebook", action="append", metavar="NN_name", dest="notebooks",
                   help="grade only this notebook (repeatable; default: all of them)")
    p.add_argument("--sanitize-with", type=Path, default=None, metavar="CFG",
                   help="nbval sanitizer file (default: nbval_sanitize.cfg next to --solutions)")
    p.set_defaults(func=cmd_grade, grade_parser=p)
    return p


# ---------------------------------------------------------------------------------------------
# Submissions


def student_root(submissions: Path) -> tuple[Path, str]:
    """The folder holding one folder per student, and the layout's name."""
    if (submissions / "submitted").is_dir():
        return submissions / "submitted", "nbgrader"
    if submissions.name == "submitted":
        return submissions, "nbgrader"
    return submissions, "plain"


def find_students(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith((".", "__")))


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


# ---------------------------------------------------------------------------------------------
# Sandbox detection


@dataclass(frozen=True)
class Sandbox:
    isolate_net: bool
    pid_ns: bool
    warnings: tuple[str, ...]


def _probe(*flags: str) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "course_lib.instructor.grade_sandbox", "--probe", *flags]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        return bool(report.get("ok")), str(report.get("error") or "")
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError) as exc:
        return False, f"probe failed: {exc}"


def detect_sandbox() -> Sandbox:
    """Find which isolation this OS permits; warn about what is missing."""
    if not sys.platform.startswith("linux"):
        return Sandbox(False, False, (
            f"network isolation and PID namespaces need Linux (this is {sys.platform}): "
            "submissions run with network access",))
    ok, error = _probe("--isolate-net", "--pid-ns")
    if ok:
        return Sandbox(True, True, ())
    ok_net, error_net = _probe("--isolate-net")
    if ok_net:
        return Sandbox(True, False, (f"no PID namespace ({error}); stray processes are killed "
                                     "by environment marker instead",))
    ok_pid, _ = _probe("--pid-ns")
    return Sandbox(False, ok_pid, (
        f"network isolation is not permitted here ({error_net or error}): submissions run WITH "
        "network access (in Docker, allow unprivileged user namespaces to enable it)",))


# ---------------------------------------------------------------------------------------------
# Grading


@dataclass(frozen=True)
class GradeOptions:
    jobs: int = 1
    cell_timeout: float = DEFAULT_CELL_TIMEOUT
    notebook_timeout: float = DEFAULT_NOTEBOOK_TIMEOUT
    memory_limit: str = DEFAULT_MEMORY_LIMIT
    solutions: Path = Path("solutions")
    notebooks: tuple[str, ...] | None = None
    sanitize_with: Path | None = None
    progress: bool = True


def _empty_checks(solution: SolutionNotebook, status: str, message: str) -> dict[str, CheckResult]:
    return {c.grade_id: CheckResult(status, 0.0, c.points, message) for c in solution.checks}


def grade_notebook(student: str, student_dir: Path, submissions: Path,
                   solution: SolutionNotebook, settings: RunSettings, memory_text: str,
                   log_dir: Path | None) -> NotebookGrade:
    """Grade one student's copy of one notebook. Never raises."""
    try:
        path, warnings = locate(student_dir, solution.filename)
        if path is None:
            reason = f"no {solution.filename} in {student_dir.name}/ (or {student_dir.name}/*/)"
            return NotebookGrade(solution.name, MISSING, reason, None,
                                 _empty_checks(solution, MISSING, "the notebook was not submitted"))
        source = str(path.relative_to(submissions))
        try:
            submission = read_submission(path)
        except MalformedNotebook as exc:
            return NotebookGrade(solution.name, "malformed", str(exc), source,
                                 _empty_checks(solution, ERROR, f"not graded: {exc}"), warnings)
        rebuilt = rebuild(solution, submission)
        run = run_notebook(rebuilt.nb, solution.filename, settings)
        if log_dir is not None:
            log = log_dir / student / f"{solution.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"$ {' '.join(run.command)}\nexit code: {run.returncode}, "
                           f"notebook time limit hit: {run.timed_out}\n\n{run.log_tail}",
                           encoding="utf-8")
        result = interpret(solution, run, settings, memory_text)
        return NotebookGrade(solution.name, "graded", "", source, result.checks,
                             warnings + rebuilt.warnings, result.problems, result.cell_errors,
                             rebuilt.flags, rebuilt.answers)
    except Exception as exc:  # a grader bug must cost one notebook, never the run
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return NotebookGrade(solution.name, ERROR, f"internal grader error: {detail}", None,
                             _empty_checks(solution, ERROR, f"not graded: internal grader "
                                                            f"error ({detail})"))


@dataclass
class GradeRun:
    solutions: list[SolutionNotebook]
    grades: dict[str, dict[str, NotebookGrade]]
    settings: dict
    warnings: list[str]


def _check_out_dir(out: Path, root: Path) -> None:
    out_r, root_r = out.resolve(), root.resolve()
    if out_r == root_r or root_r in out_r.parents:
        raise GradeSetupError([f"--out: {out} is inside {root}, the folder of student folders; "
                               "it would be taken for a student next time: choose another folder"])
    if out.exists() and not out.is_dir():
        raise GradeSetupError([f"--out: {out} exists and is not a folder"])
    if out.is_dir() and any(out.iterdir()) and not (out / "gradebook.json").exists():
        raise GradeSetupError([f"--out: {out} is not empty and holds no gradebook.json; choose "
                               "a new or empty folder (an earlier gradebook folder is replaced)"])


def grade_submissions(submissions: Path, out: Path, options: GradeOptions) -> GradeRun:
    """Grade every student under ``submissions`` into ``out``; raise :class:`GradeSetupError`
    only when grading cannot run at all."""
    submissions, out = Path(submissions), Path(out)
    if not submissions.is_dir():
        raise GradeSetupError([f"SUBMISSIONS_DIR: folder not found: {submissions}"])
    root, layout = student_root(submissions)
    students = find_students(root)
    if not students:
        raise GradeSetupError([
            f"SUBMISSIONS_DIR: no student folders in {root} (expected "
            f"{submissions}/<student>/NN_name.ipynb or "
            f"{submissions}/submitted/<student>/<assignment>/NN_name.ipynb)"])
    _check_out_dir(out, root)
    memory_bytes = parse_memory(options.memory_limit)
    solutions = load_solutions(options.solutions, list(options.notebooks or []) or None)
    sanitize = options.sanitize_with
    if sanitize is None:
        default = Path(options.solutions).resolve().parent / "nbval_sanitize.cfg"
        sanitize = default if default.is_file() else None
    elif not Path(sanitize).is_file():
        raise GradeSetupError([f"--sanitize-with: file not found: {sanitize}"])
    _preflight()

    sandbox = detect_sandbox()
    warnings = list(sandbox.warnings)
    if memory_bytes is None:
        warnings.append("--memory-limit none: submissions may use all the memory of this machine")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    settings = RunSettings(options.cell_timeout, options.notebook_timeout, memory_bytes,
                           sandbox.isolate_net, sandbox.pid_ns,
                           Path(sanitize).resolve() if sanitize else None)
    memory_text = options.memory_limit if memory_bytes else "none"

    for sub in ("feedback", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(student, sol) for student in students for sol in solutions]
    grades: dict[str, dict[str, NotebookGrade]] = {s: {} for s in students}
    bar = _progress(len(tasks), options.progress)
    pool = ThreadPoolExecutor(max_workers=options.jobs)
    try:
        futures = {
            pool.submit(grade_notebook, student, root / student, root, sol, settings,
                        memory_text, out / "logs"): (student, sol)
            for student, sol in tasks
        }
        for future in as_completed(futures):
            student, sol = futures[future]
            grades[student][sol.name] = future.result()
            if bar is not None:
                bar.set_postfix_str(f"{student}/{sol.name}", refresh=False)
                bar.update(1)
    except BaseException:  # Ctrl-C: stop the running notebooks instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
        kill_all_running()
        raise
    finally:
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    grades = {s: {sol.name: grades[s][sol.name] for sol in solutions} for s in students}
    run_settings = {
        "layout": layout,
        "notebooks": [sol.name for sol in solutions],
        "cell_timeout_s": options.cell_timeout,
        "notebook_timeout_s": options.notebook_timeout,
        "memory_limit": memory_text,
        "network_isolated": sandbox.isolate_net,
        "pid_namespace": sandbox.pid_ns,
        "sanitizer": Path(sanitize).name if sanitize else None,
    }
    write_gradebook(out, solutions, grades, run_settings, warnings)
    return GradeRun(solutions, grades, run_settings, warnings)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="grading", unit="notebook", file=sys.stderr)


def _preflight() -> None:
    missing = []
    for module in ("nbval", "ipykernel", "pytest"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise GradeSetupError([f"{', '.join(missing)} not installed in {sys.executable}'s "
                               "environment; install the course's dev extra: "
                               "pip install -e '.[dev]'"])


# ---------------------------------------------------------------------------------------------
# Demo class


def demo_notebook(solution: SolutionNotebook, kind: str) -> dict:
    """The student notebook as a student of ``kind`` (correct, empty, partial) would submit it."""
    student, _ = release_notebook(solution.nb, solution.filename)
    fill_in = 0
    for sol_cell, cell in zip(solution.nb["cells"], student["cells"]):
        if not is_solution_cell(sol_cell):
            continue
        solved = kind == "correct"
        if kind == "partial" and sol_cell.get("cell_type") == "code":
            solved = fill_in % 2 == 0  # every other fill-in: 1st, 3rd, ...
        if sol_cell.get("cell_type") == "code":
            fill_in += 1
        if solved:
            src = sol_cell.get("source", "")
            cell["source"] = strip_solution_markers("".join(src) if isinstance(src, list) else src)
    return student


def build_demo(out: Path, solutions: list[SolutionNotebook]) -> Path:
    """Write ``OUT/submissions/<demo student>/<NN_name>.ipynb``; returns the submissions folder."""
    subs = Path(out) / "submissions"
    if subs.exists():
        if not (subs / DEMO_MARKER).exists():
            raise GradeSetupError([f"--demo: {subs} exists and was not made by --demo; choose "
                                   "another OUT folder"])
        shutil.rmtree(subs)
    subs.mkdir(parents=True)
    (subs / DEMO_MARKER).write_text("made by `course grade --demo`; replaced on each run\n",
                                    encoding="utf-8")
    for student, kind in zip(DEMO_STUDENTS, ("correct", "empty", "partial")):
        for sol in solutions:
            path = subs / student / sol.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(demo_notebook(sol, kind)), encoding="utf-8")
    return subs


# ---------------------------------------------------------------------------------------------
# Command


def cmd_grade(args: argparse.Namespace) -> int:
    parser = args.grade_parser
    if args.demo is not None and args.submissions is not None:
        parser.error("give either SUBMISSIONS_DIR or --demo OUT, not both")
    if args.demo is None and args.submissions is None:
        parser.error("SUBMISSIONS_DIR is required (or --demo OUT to grade a demo class)")
    if args.demo is None and args.out is None:
        parser.error("--out GRADEBOOK_DIR is required: the folder for gradebook.csv, "
                     "gradebook.json and feedback/")
    options = GradeOptions(
        jobs=args.jobs, cell_timeout=args.timeout, notebook_timeout=args.notebook_timeout,
        memory_limit=args.memory_limit, solutions=args.solutions,
        notebooks=tuple(args.notebooks) if args.notebooks else None,
        sanitize_with=args.sanitize_with,
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
        print("error: grading could not run:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
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
    width = max(len(s) for s in result.grades)
    for student, grades in result.grades.items():
        total = sum(g.score for g in grades.values())
        issues = [f"{name}: {g.status}" for name, g in grades.items() if g.status != "graded"]
        issues += [f"{name}: {p}" for name, g in grades.items() for p in g.problems[:1]]
        note = f"  ({'; '.join(issues)})" if issues else ""
        print(f"{student:<{width}}  {fmt(total):>5} / {fmt(max_total)}{note}")
    print(f"wrote {out / 'gradebook.csv'}, {out / 'gradebook.json'} and {out / 'feedback'}/")
