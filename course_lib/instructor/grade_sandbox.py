"""Process sandbox for ``course grade``: no network, own PID namespace, memory limit, then exec.

:func:`run_isolated` isolates a Python function (the warm grading worker runs each notebook
that way, :mod:`course_lib.instructor.grade_worker`); as a command,
``python -m course_lib.instructor.grade_sandbox [options] -- COMMAND ...``, it

1. with ``--isolate-net`` and/or ``--pid-ns``, enters a new user namespace (mapping the caller's
   uid/gid to themselves, so files keep their owners) plus a network namespace, in which only
   the loopback interface exists, and brings loopback up (the Jupyter kernel talks to nbval over
   127.0.0.1 TCP), and/or a PID namespace, so that every process the submission starts dies with
   the command (``PR_SET_PDEATHSIG``);
2. with ``--memory BYTES``, sets ``RLIMIT_DATA`` (see :func:`apply_memory_limit`);
3. replaces itself with ``COMMAND``.

``--probe`` tries the requested isolation, opens a loopback TCP connection inside it, and prints
one JSON object saying what works; :func:`detect_sandbox` runs the probes, so that the grader can
degrade with a warning on systems where unprivileged namespaces are not permitted (many
containers). A real run that asks for isolation it cannot get exits with :data:`SANDBOX_FAILED`
and a message rather than running unisolated.

Namespaces are Linux-only; elsewhere only the memory limit applies.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SANDBOX_FAILED = 97
# Every process of a grading run carries COURSE_GRADE_RUN=<marker> in its environment, the
# marker starting with the grader's PID: ``<grader pid>-<random>``.
MARKER_ENV = "COURSE_GRADE_RUN"

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


class SandboxError(Exception):
    """The requested isolation is not available here."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _unshare(flags: int) -> None:
    if not sys.platform.startswith("linux"):
        raise SandboxError(f"namespaces are Linux-only (this is {sys.platform})")
    unshare = getattr(os, "unshare", None)  # Python >= 3.12
    if unshare is not None:
        try:
            unshare(flags)
        except OSError as exc:
            raise SandboxError(f"unshare: {exc.strerror or exc}") from exc
        return
    if _libc().unshare(ctypes.c_int(flags)) != 0:
        code = ctypes.get_errno()
        raise SandboxError(f"unshare: {os.strerror(code)} (errno {errno.errorcode.get(code, code)})")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise SandboxError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _loopback_up() -> None:
    """``ip link set lo up`` without needing the ``ip`` tool."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sh", b"lo", 0)
            flags = struct.unpack("16sh", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    except OSError as exc:
        raise SandboxError(f"cannot bring the loopback interface up: {exc.strerror or exc}") from exc


def enter_namespaces(isolate_net: bool, pid_ns: bool) -> None:
    """Enter a user namespace plus the requested network / PID namespaces (this process)."""
    if not (isolate_net or pid_ns):
        return
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | (CLONE_NEWNET if isolate_net else 0) | (CLONE_NEWPID if pid_ns else 0)
    _unshare(flags)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    if isolate_net:
        _loopback_up()


def apply_memory_limit(limit: int | None) -> None:
    """Cap this process (and what it starts) at ``limit`` bytes of data memory.

    ``RLIMIT_DATA`` counts the memory a process can actually write (heap, anonymous mappings,
    thread stacks), so a memory bomb gets ``MemoryError``; unlike ``RLIMIT_AS`` it does not count
    address space that is only reserved (glibc's per-thread malloc arenas, CUDA's mappings), which
    would make the same limit fail on a machine with more cores. Each process gets its own limit.
    """
    if not limit:
        return
    try:
        import resource
    except ImportError as exc:  # pragma: no cover - non-POSIX
        raise SandboxError("resource limits are not available on this platform") from exc
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _loopback_roundtrip() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                if conn.recv(4) != b"ping":
                    raise SandboxError("loopback round trip lost data")


def _external_unreachable() -> bool:
    """True when no route leaves the machine (what a network namespace should give)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: needs a route, sends nothing
        return False
    except OSError:
        return True


def probe(isolate_net: bool, pid_ns: bool) -> dict:
    """Try the isolation in a child process; report what works."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: try everything, report through the pipe, never return
        os.close(read_fd)
        report: dict = {"ok": True, "error": None}
        try:
            enter_namespaces(isolate_net, pid_ns)
            if pid_ns:  # the first child of the caller is PID 1 of the new namespace
                grandchild = os.fork()
                if grandchild == 0:
                    os._exit(0 if os.getpid() == 1 else 3)
                _, status = os.waitpid(grandchild, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    raise SandboxError("the PID namespace did not take effect")
            _loopback_roundtrip()
            if isolate_net and not _external_unreachable():
                raise SandboxError("a route to the outside still exists inside the namespace")
        except (SandboxError, OSError) as exc:
            report = {"ok": False, "error": str(exc)}
        os.write(write_fd, json.dumps(report).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks) or b"{}") or {"ok": False, "error": "probe died"}
    except json.JSONDecodeError:
        return {"ok": False, "error": "probe died"}


@dataclass(frozen=True)
class Sandbox:
    """The isolation this machine permits, and what the grader warns about."""

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


def die_with_parent() -> None:
    """SIGKILL this process when the process that started it dies (kept across exec)."""
    if sys.platform.startswith("linux"):
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def default_signals() -> None:
    """Signal handling as a fresh Python has it (a forked process inherits its parent's)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_isolated(target: Callable[[], int], isolate_net: bool, pid_ns: bool,
                 memory: int | None, parent: int | None = None) -> int:
    """Run ``target()`` isolated, in this process or a child; returns its exit status.

    In order: die with the parent (``parent``: its PID, checked, so a parent that is already
    gone is noticed), enter the namespaces, and in a new PID namespace fork the process that
    runs ``target`` as its PID 1 (when PID 1 exits, the kernel kills everything else in the
    namespace); there, set the memory limit, then call ``target``. Nothing runs ``target``'s
    code before all of that is in place. ``target`` may also replace the process (exec).
    """
    die_with_parent()
    if parent is not None and os.getppid() != parent:  # the parent died before that took effect
        return SANDBOX_FAILED
    enter_namespaces(isolate_net, pid_ns)
    if not pid_ns:
        apply_memory_limit(memory)
        return target()
    child = os.fork()
    if child == 0:
        code = 127
        try:
            die_with_parent()
            apply_memory_limit(memory)
            code = target()
        finally:
            os._exit(code)

    def forward(signum, _frame):
        try:
            os.kill(child, signal.SIGKILL if signum == signal.SIGTERM else signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def marked_processes(marker: str, prefix: bool = False) -> list[int]:
    """The processes (but this one) whose environment carries ``MARKER_ENV=marker`` (with
    ``prefix``: a marker that starts with ``marker``, e.g. all of one grader's runs)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - non-Linux: rely on the process group
        return []
    me, found = os.getpid(), []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(var.startswith(needle) if prefix else var == needle for var in environ):
            found.append(int(entry.name))
    return found


def _sigkill(send: Callable[[int, int], None], target: int) -> None:
    try:
        send(target, signal.SIGKILL)
    except OSError:  # gone already
        pass


def kill_group(pgid: int) -> None:
    """SIGKILL the process group ``pgid`` (nothing if it is gone)."""
    _sigkill(os.killpg, pgid)


def end_run(pgid: int | None, marker: str) -> None:
    """SIGKILL the process group ``pgid`` and every process carrying ``marker``: the second line
    of defence after the PID namespace, and the only one without it (a kernel runs in a session
    of its own, out of reach of its parent's group). Twice: a process may fork while we kill."""
    for _ in range(2):
        if pgid is not None:
            kill_group(pgid)
        for pid in marked_processes(marker):
            _sigkill(os.kill, pid)


def _exec(command: list[str]) -> int:
    os.execvp(command[0], command)
    return 127  # pragma: no cover - execvp does not return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.instructor.grade_sandbox")
    parser.add_argument("--isolate-net", action="store_true")
    parser.add_argument("--pid-ns", action="store_true")
    parser.add_argument("--memory", type=int, default=None, help="RLIMIT_DATA in bytes")
    parser.add_argument("--parent", type=int, default=None,
                        help="PID of the grader; exit at once if it is already gone")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.isolate_net, args.pid_ns)))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a COMMAND is required after --")
    try:
        return run_isolated(lambda: _exec(command), args.isolate_net, args.pid_ns, args.memory,
                            args.parent)
    except SandboxError as exc:
        print(f"course-grade-sandbox: {exc}", file=sys.stderr)
        return SANDBOX_FAILED


if __name__ == "__main__":
    sys.exit(main())
