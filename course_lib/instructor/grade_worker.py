"""A warm grading worker: imports torch and course_lib once, then runs notebooks, each in a
fresh sandboxed process forked from itself.

Started by the grader (:mod:`course_lib.instructor.grade_pool`) as
``python -m course_lib.instructor.grade_worker FD MODULES_JSON``, with ``FD`` a Unix socket
(``SOCK_SEQPACKET``) to the grader. It

1. imports the modules the graded notebooks' own cells import (their set-up cells, checks and
   course cells; never a student's fill-in), pytest, nbval, ipykernel and the grading plugin,
   then says ``{"ready": ...}``;
2. for each request (a JSON message carrying the write end of the run's result pipe), forks the
   run (:func:`_serve`): the child starts a session of its own, sends its output to the run's
   log, and enters the sandbox (:func:`~course_lib.instructor.grade_sandbox.run_isolated`:
   namespaces, PID 1 of its own PID namespace, memory limit) before anything of the notebook
   runs; there it takes the run's environment and working directory, forks the kernel zygote
   (:mod:`course_lib.instructor.grade_kernel`) and runs pytest + nbval in-process;
3. waits for the run, at most the notebook time limit, then kills its process group and every
   process carrying its marker, and answers ``{"returncode", "timed_out"}``.

The worker itself never runs notebook code: each run starts from the state the imports left,
so no student sees another's. It exits when the grader closes the socket.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
import traceback

from course_lib.instructor.grade_kernel import ZYGOTE_OPTION, start_zygote
from course_lib.instructor.grade_sandbox import (
    SANDBOX_FAILED,
    SandboxError,
    default_signals,
    end_run,
    kill_group,
    run_isolated,
)

# Not warmed although a notebook imports them: ipywidgets registers itself with the running
# kernel when it is imported, so the kernel must import it.
COLD_MODULES = ("ipywidgets",)
# What every run needs. Not the pytest plugins themselves (nbval.plugin, grade_plugin): pytest
# warns that it cannot rewrite the asserts of a plugin imported before it starts.
_SERVER_MODULES = ("pytest", "nbformat", "nbval.kernel", "jupyter_client", "ipykernel.kernelapp",
                   "ipykernel_launcher", "course_lib.instructor.grade_kernel")
MAX_MESSAGE = 1 << 20


def _warm_up(modules: list[str]) -> dict:
    """Import ``modules`` (``a.b`` or ``a.b:c`` for ``from a.b import c``); failures are only
    reported: the notebook's own import will fail the same way in the kernel."""
    started = time.monotonic()
    failed = {}
    for spec in [*modules, *_SERVER_MODULES]:
        name, _, attr = spec.partition(":")
        if name.split(".")[0] in COLD_MODULES:
            continue
        try:
            module = importlib.import_module(name)
            if attr and not hasattr(module, attr):  # `from a import b`, b a submodule
                importlib.import_module(f"{name}.{attr}")
        except Exception as exc:  # noqa: BLE001 - any import error is the notebook's to report
            failed[spec] = f"{type(exc).__name__}: {exc}"
    cold = sorted(m for m in sys.modules if m.split(".")[0] in COLD_MODULES)
    return {"ready": True, "seconds": round(time.monotonic() - started, 2), "failed": failed,
            "cold_modules_imported": cold}


def _run_pytest(request: dict, result_fd: int) -> int:
    """In the sandbox: the run's environment, the kernel zygote, then pytest + nbval."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    zygote, pipe = start_zygote(close=(result_fd,))
    try:
        import pytest

        args = [*request["args"], "--course-grade-fd", str(result_fd),
                ZYGOTE_OPTION, f"{zygote}:{pipe}"]
        code = int(pytest.main(args))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        kill_group(zygote)
    return code


def _child(request: dict, result_fd: int, control: socket.socket, worker: int) -> None:
    """The forked run; never returns."""
    code = 1
    try:
        control.close()
        os.setsid()  # a process group of its own: the worker kills the run with it
        default_signals()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(devnull)
        try:
            code = run_isolated(lambda: _run_pytest(request, result_fd), request["isolate_net"],
                                request["pid_ns"], request["memory"], parent=worker)
        except SandboxError as exc:
            print(f"course-grade-sandbox: {exc}", file=sys.stderr)
            code = SANDBOX_FAILED
    except BaseException:  # noqa: BLE001 - the log says what went wrong
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(request: dict, result_fd: int, control: socket.socket) -> dict:
    """Run one notebook in a forked, sandboxed child; wait for it at most its time limit."""
    worker = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(request, result_fd, control, worker)
    os.close(result_fd)
    deadline = time.monotonic() + float(request["timeout"])
    exited = None  # waitid with WNOWAIT: the child stays a zombie, so its group ID stays ours
    while exited is None and time.monotonic() < deadline:
        exited = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if exited is None:
            time.sleep(0.02)
    end_run(pid, request["env"]["COURSE_GRADE_RUN"])
    _, status = os.waitpid(pid, 0)
    if exited is None:
        return {"returncode": None, "timed_out": True}
    return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(argv[0]))
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.getcwd():
        del sys.path[0]  # `python -m` put the cwd first; the kernel adds its own (IPython does)
    control.send(json.dumps(_warm_up(json.loads(argv[1]))).encode())
    while True:
        message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 1)
        if not message:  # the grader closed the socket: done
            return 0
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"error": "a request needs one file descriptor"}).encode())
            continue
        control.send(json.dumps(_serve(json.loads(message), fds[0], control)).encode())


if __name__ == "__main__":
    sys.exit(main())
