"""Run one rebuilt notebook under nbval in an isolated subprocess, and read the check results.

Each run is forked by a warm grading worker (:mod:`course_lib.instructor.grade_pool`) and gets
a fresh temporary directory (the kernel's working directory holds only the notebook), the
course's notebook environment (:data:`~course_lib.instructor.execute.NOTEBOOK_ENV`), a fresh
``IPYTHONDIR`` (no instructor start-up scripts), nbval's per-cell timeout, a whole-notebook
timeout, a memory limit and, where the OS permits, no network and its own PID namespace
(:mod:`course_lib.instructor.grade_sandbox`). Per-cell results come back through a pipe from
:mod:`course_lib.instructor.grade_plugin`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.instructor.grade_pool import Worker, grading_environment
from course_lib.instructor.grade_rebuild import SolutionNotebook, success_line
from course_lib.instructor.grade_sandbox import MARKER_ENV, SANDBOX_FAILED  # noqa: F401
from course_lib.instructor.nbio import dumps

LOG_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class RunSettings:
    cell_timeout: float
    notebook_timeout: float
    memory_limit: int | None  # bytes, RLIMIT_DATA per process
    isolate_net: bool
    pid_ns: bool
    sanitize_with: Path | None
    kernel_startup_timeout: float = 60.0


@dataclass
class RunResult:
    records: list[dict]
    returncode: int | None
    timed_out: bool
    log_tail: str
    command: list[str] = field(default_factory=list)
    lost: str = ""  # why the grading worker was lost during this run, if it was


def _pytest_args(nb_path: Path, ini: Path, settings: RunSettings) -> list[str]:
    args = [
        str(nb_path),
        "-c", str(ini), "--rootdir", str(nb_path.parent), "--confcutdir", str(nb_path.parent),
        "-p", "course_lib.instructor.grade_plugin", "-p", "nbval.plugin",
        "-p", "no:cacheprovider", "-q", "--tb=no", "--color=no",
        "--nbval", "--nbval-current-env",
        f"--nbval-cell-timeout={settings.cell_timeout:g}",
        f"--nbval-kernel-startup-timeout={settings.kernel_startup_timeout:g}",
    ]
    if settings.sanitize_with is not None:
        args += ["--nbval-sanitize-with", str(settings.sanitize_with)]
    return args


def _read_records(fd: int, sink: list[dict]) -> None:
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as stream:
        for line in stream:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                sink.append(record)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return (f"[… first {size - LOG_TAIL_BYTES:,} bytes cut …]\n" if size > LOG_TAIL_BYTES else "") + text


def run_notebook(nb: dict, filename: str, settings: RunSettings, worker: Worker) -> RunResult:
    """Run the rebuilt notebook ``nb`` (written as ``filename``) under nbval, in a sandboxed
    process forked by the warm ``worker``; never raises for anything the notebook does."""
    tmp = Path(tempfile.mkdtemp(prefix="course-grade-"))
    try:
        work = tmp / "work"
        work.mkdir()
        nb_path = work / filename
        nb_path.write_text(dumps(nb), encoding="utf-8")
        ini = tmp / "pytest.ini"
        ini.write_text("[pytest]\naddopts =\n", encoding="utf-8")
        log_path = tmp / "pytest.log"
        args = _pytest_args(nb_path, ini, settings)
        request = {
            "args": args, "cwd": str(work), "log": str(log_path),
            "env": grading_environment(worker.marker, IPYTHONDIR=str(tmp / "ipython"),
                                       JUPYTER_RUNTIME_DIR=str(tmp / "runtime")),
            "isolate_net": settings.isolate_net, "pid_ns": settings.pid_ns,
            "memory": settings.memory_limit, "timeout": settings.notebook_timeout,
        }
        records: list[dict] = []
        read_fd, write_fd = os.pipe()
        reader = threading.Thread(target=_read_records, args=(read_fd, records), daemon=True)
        reader.start()
        try:
            outcome = worker.run(request, write_fd)
        finally:
            os.close(write_fd)  # the run holds its own copy; EOF once it is over
        reader.join(timeout=30)
        limits = [f"net isolated: {settings.isolate_net}", f"PID namespace: {settings.pid_ns}",
                  f"memory: {settings.memory_limit or 'unlimited'}"]
        command = ["pytest", *args, f"(in warm worker {worker.marker}; {', '.join(limits)})"]
        return RunResult(records, outcome.returncode, outcome.timed_out,
                         _tail(log_path) or outcome.lost, command, outcome.lost)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Interpretation of the records into per-check statuses

PASSED, FAILED, ERROR, TIMEOUT, MISSING = "passed", "failed", "error", "timeout", "missing"
STATUSES = (PASSED, FAILED, ERROR, TIMEOUT, MISSING)


@dataclass
class CheckResult:
    status: str
    points: float
    max_points: float
    message: str = ""

    def to_json(self) -> dict:
        return {"status": self.status, "points": self.points, "max_points": self.max_points,
                "message": self.message}

    @classmethod
    def from_json(cls, data: dict) -> CheckResult:
        return cls(data["status"], data["points"], data["max_points"], data["message"])


@dataclass
class Interpretation:
    checks: dict[str, CheckResult]
    cell_errors: list[str]
    problems: list[str]  # notebook-level: time limit, dead kernel, kernel start, grader crash


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _short(text: str, limit: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " …"


# IPython compiles each cell as a file named by a hash of its source (``1919612535.py``); the
# name means nothing to a student and, with the kernel's PID in the folder, is not stable.
_CELL_FILE = re.compile(r"(?:/tmp/ipykernel_\d+/)?\b\d{6,}\.py\b")


def message_cleaner(sanitize_with: Path | None):
    """A function that makes a message stable and readable: the course's nbval sanitizer
    patterns (memory addresses, ...) and cell file names."""
    patterns: list[tuple[str, str]] = []
    if sanitize_with is not None:
        try:
            text = Path(sanitize_with).read_text(encoding="utf-8")
            patterns = re.findall(r"^regex: (.*)$\n^replace: (.*)$", text, flags=re.MULTILINE)
        except OSError:
            patterns = []

    def clean(text: str) -> str:
        text = _CELL_FILE.sub("<cell>", text)
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    return clean


def interpret(solution: SolutionNotebook, run: RunResult, settings: RunSettings,
              memory_text: str) -> Interpretation:
    """Turn a run's per-cell records into a status, points and message for each check."""
    clean = message_cleaner(settings.sanitize_with)
    results: dict[int, dict] = {}
    setup_failure: dict | None = None
    started: list[int] = []
    for record in run.records:
        cell = record.get("cell")
        if record.get("event") == "start" and isinstance(cell, int):
            started.append(cell)
        elif record.get("event") == "result" and isinstance(cell, int):
            if record.get("phase") == "setup":
                setup_failure = setup_failure or record
                results.setdefault(cell, record)
            else:
                results[cell] = record

    problems: list[str] = []
    cell_errors: list[str] = []
    first_timeout: int | None = None
    first_death: int | None = None
    check_cells = {c.cell_index for c in solution.checks}
    for cell in sorted(results):
        record = results[cell]
        if record.get("phase") != "call":
            continue
        if record.get("timed_out") and first_timeout is None:
            first_timeout = cell
        if record.get("exception") == "KernelDiedError" and first_death is None:
            first_death = cell
        if cell not in check_cells and record.get("outcome") == "failed" \
                and not record.get("kernel_dead") and not record.get("timed_out"):
            error = record.get("error") or {}
            what = _exception_text(error.get("ename", ""), _short(error.get("evalue", ""), 300)) \
                if error else _first_line(record.get("message", ""))
            cell_errors.append(clean(f"{solution.describe_cell(cell)} raised {what}"))

    running = [c for c in started if c not in results]
    if setup_failure is not None:
        problems.append("the kernel could not start: "
                        + _short(_first_line(setup_failure.get("message", "")), 300))
    if first_timeout is not None:
        problems.append(f"{solution.describe_cell(first_timeout)} exceeded the per-cell time "
                        f"limit of {settings.cell_timeout:g} s and was interrupted")
    if first_death is not None:
        problems.append(f"the kernel died while running {solution.describe_cell(first_death)} "
                        f"(os._exit, a crash, or the memory limit of {memory_text}); the cells "
                        "after it could not run")
    if run.timed_out:
        where = f" while {solution.describe_cell(running[-1])} was running" if running else ""
        problems.append(f"the notebook exceeded the whole-notebook time limit of "
                        f"{settings.notebook_timeout:g} s{where}; it was stopped")
    elif run.returncode == SANDBOX_FAILED and not run.records:
        reason = next((line for line in run.log_tail.splitlines()
                       if line.startswith("course-grade-sandbox:")), "")
        problems.append(f"the sandbox could not start ({reason or 'see the log'})")
    elif run.lost:
        problems.append(f"the grading process stopped unexpectedly: {_first_line(run.lost)}; "
                        "see the log of this notebook")
    elif not run.records or (running and setup_failure is None and first_death is None):
        problems.append(f"the grading process stopped unexpectedly (exit code {run.returncode}); "
                        "see the log of this notebook")

    checks: dict[str, CheckResult] = {}
    for spec in solution.checks:
        record = results.get(spec.cell_index)
        status, message = _check_status(spec.grade_id, spec.cell_index, record, run, settings,
                                        first_timeout, first_death, setup_failure, memory_text,
                                        solution)
        checks[spec.grade_id] = CheckResult(status, spec.points if status == PASSED else 0.0,
                                            spec.points, clean(message))
    return Interpretation(checks, cell_errors, [clean(p) for p in problems])


def _exception_text(ename: str, evalue: str) -> str:
    evalue = evalue.strip()
    return f"{ename}: {evalue}" if evalue else ename


def _check_status(gid, index, record, run, settings, first_timeout, first_death, setup_failure,
                  memory_text, solution) -> tuple[str, str]:
    earlier_timeout = first_timeout is not None and first_timeout < index
    if record is None:
        if run.timed_out:
            return TIMEOUT, (f"this check did not run: the notebook exceeded its time limit of "
                             f"{settings.notebook_timeout:g} s before reaching it")
        if first_death is not None and first_death < index:
            return ERROR, (f"this check did not run: the kernel died earlier, in "
                           f"{solution.describe_cell(first_death)}")
        return ERROR, ("this check did not run: the grading process stopped unexpectedly "
                       f"(exit code {run.returncode})")
    if record.get("phase") == "setup":
        return ERROR, ("this check did not run: the kernel could not start ("
                       + _short(_first_line(record.get("message", "")), 300) + ")")
    stdout = record.get("stdout", "")
    line = success_line(gid)
    if record.get("outcome") == "passed":
        if line in stdout.splitlines():
            return PASSED, ""
        return FAILED, f"the check did not print its success line '{line}'"
    if record.get("timed_out"):
        return TIMEOUT, (f"this check exceeded the per-cell time limit of "
                         f"{settings.cell_timeout:g} s (an infinite loop, or much slower code "
                         "than needed?)")
    if record.get("kernel_dead"):
        if record.get("exception") == "KernelDiedError":
            return ERROR, (f"the kernel died while this check ran (os._exit, a crash, or the "
                           f"memory limit of {memory_text})")
        where = solution.describe_cell(first_death) if first_death is not None else \
            "an earlier cell"
        if earlier_timeout and (first_death is None or first_timeout <= first_death):
            return TIMEOUT, (f"this check did not run: {solution.describe_cell(first_timeout)} "
                             f"exceeded the per-cell time limit of {settings.cell_timeout:g} s "
                             "and could not be interrupted")
        return ERROR, f"this check did not run: the kernel died earlier, in {where}"
    error = record.get("error")
    prefix = ""
    if earlier_timeout:
        prefix = (f"{solution.describe_cell(first_timeout)} exceeded the per-cell time limit of "
                  f"{settings.cell_timeout:g} s and was interrupted; then ")
    if error:
        ename, evalue = error.get("ename", ""), error.get("evalue", "")
        if ename in ("AssertionError", "CheckFailure"):  # CheckFailure: course_lib.checks
            message = evalue.strip() or "an assertion failed (no message)"
            return (TIMEOUT if earlier_timeout else FAILED), prefix + message
        if ename == "NotImplementedError":  # a fill-in still holding the release stub
            return (TIMEOUT if earlier_timeout else FAILED), prefix + (
                f"not implemented yet (NotImplementedError: {evalue.strip()})")
        hint = ""
        if ename == "MemoryError":
            hint = f" (the memory limit is {memory_text} per process)"
        elif ename == "NameError":
            hint = " (did the fill-in cell that defines it run without errors?)"
        detail = _exception_text(ename, evalue)
        return (TIMEOUT if earlier_timeout else ERROR), prefix + f"the check raised {detail}{hint}"
    if line not in stdout.splitlines():
        seen = stdout.strip() or record.get("stderr", "").strip()
        extra = f" (it printed: {_short(seen, 300)})" if seen else ""
        return (TIMEOUT if earlier_timeout else FAILED), prefix + (
            f"the check did not report success: its output lacks the line '{line}'{extra}. "
            "A failure whose traceback is hidden still fails."
        )
    extra = "\n".join(x for x in stdout.splitlines() if x != line)
    extra = extra or record.get("stderr", "") or "; ".join(record.get("other_outputs", []))
    return FAILED, ("the check printed more than its success line, so its output does not match; "
                    "remove print statements and warnings from the graded code (extra output: "
                    f"{_short(extra, 300)})")
