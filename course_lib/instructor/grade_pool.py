"""The grader's side of the warm workers: one per job, started once, reused for every notebook.

Each :class:`Worker` is a ``python -m course_lib.instructor.grade_worker`` process in a session
of its own, talking to the grader over a Unix socket; :mod:`.grade_worker` says what it does
with a run. Every process a worker starts carries its marker
(``COURSE_GRADE_RUN=<grader pid>-<random>``, :func:`new_marker`) in its environment, so that
after each run, and when the grader stops, every process of it can be found and killed.

A worker that dies or stops answering costs the run it had (the notebook is graded ``error``:
the grading process stopped unexpectedly) and is started afresh for the next one.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from course_lib.instructor.execute import NOTEBOOK_ENV
from course_lib.instructor.grade_plan import grading_plan, python_source
from course_lib.instructor.grade_sandbox import MARKER_ENV, end_run
from course_lib.instructor.protocol import is_solution_cell, source_of

READY_TIMEOUT = 600.0  # seconds a worker may take to import everything (a cold disk, a busy CPU)
REPLY_GRACE = 60.0  # seconds past the notebook time limit before a silent worker counts as lost
MAX_MESSAGE = 1 << 20
# Environment variables that would let the instructor's shell change how pytest or the kernel runs.
_DROPPED_ENV = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONSTARTUP", "PYTHONINSPECT",
                "JUPYTER_PATH", "JUPYTER_CONFIG_DIR", "IPYTHONDIR", "COV_CORE_SOURCE")


def new_marker() -> str:
    """A marker for the processes of one worker; it starts with this grader's PID, so that the
    processes of one grading run can be told from another's: ``<grader pid>-<random>``."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def grading_environment(marker: str, **extra: str) -> dict[str, str]:
    """The environment of the worker and of every run: the course's notebook environment, the
    grader's own without what would reconfigure pytest, the marker, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(NOTEBOOK_ENV)
    env.update({
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # what ipykernel sets when it starts: set before matplotlib is imported (in the worker)
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        MARKER_ENV: marker,
    })
    env.update(extra)
    return env


def imported_modules(source: str) -> list[str]:
    """The modules a cell imports at its top level: ``a.b``, or ``a.b:c`` for
    ``from a.b import c`` (``c`` may be a submodule)."""
    try:
        tree = ast.parse(python_source(source))
    except SyntaxError:
        return []
    found = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            found += [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
            found += [stmt.module if a.name == "*" else f"{stmt.module}:{a.name}"
                      for a in stmt.names]
    return found


def warm_modules(notebooks: list[dict], full: bool = False) -> list[str]:
    """What the workers import before any run: the imports of the cells grading runs, taken
    from the solution notebooks (the instructor's code: never a fill-in)."""
    modules: dict[str, None] = {}
    for nb in notebooks:
        cells = nb["cells"]
        for index in grading_plan(cells, full).run:
            if not is_solution_cell(cells[index]):
                modules.update(dict.fromkeys(imported_modules(source_of(cells[index]))))
    return list(modules)


@dataclass(frozen=True)
class Outcome:
    """How a run ended: the run's exit status (None when it was killed at its time limit or
    lost), whether it hit the whole-notebook time limit, and why the worker was lost, if it was."""

    returncode: int | None
    timed_out: bool
    lost: str = ""


class Worker:
    """One warm worker process (started at once; it imports while the grader prepares)."""

    def __init__(self, modules: list[str]):
        self.modules = list(modules)
        self.marker = new_marker()
        self._home = Path(tempfile.mkdtemp(prefix="course-grade-worker-"))
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.ready: dict | None = None
        self._spawn()

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log = open(self._home / "worker.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "course_lib.instructor.grade_worker",
                 str(theirs.fileno()), json.dumps(self.modules)],
                cwd=self._home, env=grading_environment(self.marker), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(theirs.fileno(),),
                start_new_session=True)
        finally:
            theirs.close()
            log.close()
        self.sock, self.ready = ours, None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self._home / "worker.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _receive(self, timeout: float) -> dict | None:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except OSError:  # a timeout, or the worker went away
            return None
        return json.loads(data) if data else None

    def wait_ready(self) -> str:
        """Wait until the worker has imported everything (starting it afresh if it died);
        returns why it could not start, or ``""``."""
        if self.proc is None or self.proc.poll() is not None or self.sock is None:
            self.kill()
            self._spawn()
        if self.ready is None:
            self.ready = self._receive(READY_TIMEOUT)
            if self.ready is None:
                return self._lost("the grading worker could not start").lost
        return ""

    def run(self, request: dict, result_fd: int) -> Outcome:
        """Run one notebook (``request``: see :mod:`.grade_worker`); ``result_fd`` is the write
        end of the run's result pipe. Never raises for anything the notebook does."""
        failure = self.wait_ready()
        if failure:
            return Outcome(None, False, failure)
        try:
            socket.send_fds(self.sock, [json.dumps(request).encode()], [result_fd])
        except OSError as exc:
            return self._lost(f"the grading worker went away ({exc})")
        reply = self._receive(float(request["timeout"]) + REPLY_GRACE)
        if reply is None or "returncode" not in reply:
            return self._lost("the grading worker stopped answering"
                              + (f" ({reply['error']})" if reply and "error" in reply else ""))
        return Outcome(reply["returncode"], bool(reply["timed_out"]))

    def _lost(self, reason: str) -> Outcome:
        last = self.log_tail(1).strip()
        self.kill()
        return Outcome(None, False, reason + (f" (its last output: {last})" if last else ""))

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def kill(self) -> None:
        """Kill the worker and every process of it, now."""
        self._close_socket()
        end_run(self.proc.pid if self.proc is not None else None, self.marker)
        if self.proc is not None:
            self.proc.wait()
        self.ready = None

    def close(self) -> None:
        """Let the worker finish (it exits when the socket closes); kill what is left."""
        self._close_socket()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        shutil.rmtree(self._home, ignore_errors=True)


class WorkerPool:
    """``size`` warm workers; a grading thread leases one for each notebook."""

    def __init__(self, size: int, modules: list[str]):
        self.workers = [Worker(modules) for _ in range(size)]
        self._idle: queue.Queue[Worker] = queue.Queue()
        for worker in self.workers:
            self._idle.put(worker)

    @contextmanager
    def lease(self) -> Iterator[Worker]:
        worker = self._idle.get()
        try:
            yield worker
        finally:
            self._idle.put(worker)

    def wait_ready(self) -> list[str]:
        """Wait until every worker has imported everything; returns why some could not start."""
        return [failure for worker in self.workers if (failure := worker.wait_ready())]

    def kill(self) -> None:
        for worker in self.workers:
            worker.kill()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
