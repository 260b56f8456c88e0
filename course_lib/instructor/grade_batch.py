"""Grade a class: find the students, grade every (student, notebook) pair, write the gradebook.

:func:`grade_submissions` is what ``course grade`` runs. Each submitted notebook is rebuilt from
the solution notebook (:mod:`.grade_rebuild`), run under nbval in a sandbox (:mod:`.grade_run`),
and every check gets a status (passed, failed, error, timeout, missing) and points
(:mod:`.grade_report` writes them). The submitted files are only read.
"""

from __future__ import annotations

import sys
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from course_lib.instructor.grade_options import GradeOptions, parse_memory
from course_lib.instructor.grade_pool import WorkerPool, warm_modules
from course_lib.instructor.grade_rebuild import (
    GradeSetupError,
    MalformedNotebook,
    SolutionNotebook,
    load_solutions,
    read_submission,
    rebuild,
)
from course_lib.instructor.grade_report import (
    NotebookGrade,
    check_gradebook_dir,
    clear_gradebook_dir,
    write_gradebook,
)
from course_lib.instructor.grade_run import (
    ERROR,
    MISSING,
    CheckResult,
    RunSettings,
    interpret,
    run_notebook,
)
from course_lib.instructor.grade_sandbox import detect_sandbox
from course_lib.instructor.grade_students import (
    find_students,
    locate,
    shard_students,
    student_root,
)


def _empty_checks(solution: SolutionNotebook, status: str, message: str) -> dict[str, CheckResult]:
    return {c.grade_id: CheckResult(status, 0.0, c.points, message) for c in solution.checks}


def grade_notebook(student: str, student_dir: Path, submissions: Path,
                   solution: SolutionNotebook, settings: RunSettings, memory_text: str,
                   log_dir: Path | None, workers: WorkerPool, full: bool = False) -> NotebookGrade:
    """Grade one student's copy of one notebook on one of ``workers`` (``full``: every cell
    runs). Never raises."""
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
        rebuilt = rebuild(solution, submission, full)
        with workers.lease() as worker:
            run = run_notebook(rebuilt.nb, solution.filename, settings, worker)
        if log_dir is not None:
            log = log_dir / student / f"{solution.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"$ {' '.join(run.command)}\ncells: {rebuilt.plan.describe()}\n"
                           f"exit code: {run.returncode}, notebook time limit hit: "
                           f"{run.timed_out}\n\n{run.log_tail}", encoding="utf-8")
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


def check_out_dir(out: Path, root: Path) -> None:
    """``out`` may hold the gradebook: not inside the student folders, new, empty or an earlier
    gradebook folder."""
    out_r, root_r = out.resolve(), root.resolve()
    if out_r == root_r or root_r in out_r.parents:
        raise GradeSetupError([f"--out: {out} is inside {root}, the folder of student folders; "
                               "it would be taken for a student next time: choose another folder"])
    check_gradebook_dir(out)


def grade_submissions(submissions: Path, out: Path, options: GradeOptions) -> GradeRun:
    """Grade every student under ``submissions`` into ``out``; raise :class:`GradeSetupError`
    only when grading cannot run at all."""
    submissions, out = Path(submissions), Path(out)
    if not submissions.is_dir():
        raise GradeSetupError([f"SUBMISSIONS_DIR: folder not found: {submissions}"])
    root, layout = student_root(submissions)
    everyone = find_students(root)
    if not everyone:
        raise GradeSetupError([
            f"SUBMISSIONS_DIR: no student folders in {root} (expected "
            f"{submissions}/<student>/NN_name.ipynb or "
            f"{submissions}/submitted/<student>/<assignment>/NN_name.ipynb)"])
    students, shard = everyone, None
    if options.shard is not None:
        students = shard_students(everyone, *options.shard)
        shard = {"index": options.shard[0], "count": options.shard[1], "class": everyone}
    check_out_dir(out, root)
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

    clear_gradebook_dir(out)
    tasks = [(student, sol) for student in students for sol in solutions]
    grades: dict[str, dict[str, NotebookGrade]] = {s: {} for s in students}
    workers = WorkerPool(min(options.jobs, len(tasks)),
                         warm_modules([sol.nb for sol in solutions], options.full))
    try:
        failures = workers.wait_ready()
    except BaseException:
        workers.kill()
        raise
    if failures:
        workers.close()
        raise GradeSetupError(sorted(set(failures)))
    bar = _progress(len(tasks), options.progress)
    pool = ThreadPoolExecutor(max_workers=options.jobs)
    try:
        futures = {
            pool.submit(grade_notebook, student, root / student, root, sol, settings,
                        memory_text, out / "logs", workers, options.full): (student, sol)
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
        workers.kill()
        raise
    finally:
        pool.shutdown(wait=True)
        workers.close()
        if bar is not None:
            bar.close()
    grades = {s: {sol.name: grades[s][sol.name] for sol in solutions} for s in students}
    run_settings = {
        "mode": "full" if options.full else "fast",
        "layout": layout,
        "notebooks": [sol.name for sol in solutions],
        "cell_timeout_s": options.cell_timeout,
        "notebook_timeout_s": options.notebook_timeout,
        "memory_limit": memory_text,
        "network_isolated": sandbox.isolate_net,
        "pid_namespace": sandbox.pid_ns,
        "sanitizer": Path(sanitize).name if sanitize else None,
    }
    write_gradebook(out, solutions, grades, run_settings, warnings, shard)
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
