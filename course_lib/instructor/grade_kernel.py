"""The Jupyter kernel of a graded notebook: forked from a warm process, started by nbval.

A fresh Python that imports torch and course_lib takes seconds; the grading worker
(:mod:`course_lib.instructor.grade_worker`) imports them once and forks every notebook's run
from itself. In that run, before pytest starts, :func:`start_zygote` forks the *zygote*: a
process that already holds the imports, in the run's sandbox, with no Python state of pytest or
nbval. When nbval starts its kernel, jupyter_client asks its kernel provisioner to launch
``python -m ipykernel_launcher -f <connection file>``; :class:`ZygoteProvisioner` instead sends
the zygote that command line, environment and working directory, and the zygote becomes that
kernel (:func:`_become_kernel`): a fresh IPython with an empty namespace, in a process of its
own, which no other notebook ever shares. Everything else is jupyter_client's: the connection
file and ports, interrupts (SIGINT to the kernel's process group), liveness, shutdown.

The grading plugin installs :class:`ZygoteProvisioner` with :func:`use_zygote`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid

from course_lib.instructor.grade_sandbox import default_signals, die_with_parent

ZYGOTE_OPTION = "--course-grade-zygote"  # the pytest option: PID:FD of the zygote


def start_zygote(close: tuple[int, ...] = ()) -> tuple[int, int]:
    """Fork the zygote; returns its PID and the pipe to send it the launch command on.

    ``close``: file descriptors the kernel must not inherit (the grader's result pipe).
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid != 0:
        os.close(read_fd)
        return pid, write_fd
    code = 1
    try:
        os.close(write_fd)
        for fd in close:
            os.close(fd)
        os.setsid()  # its own process group: nbval's interrupts reach the kernel only
        die_with_parent()
        chunks = []
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
        os.close(read_fd)
        if chunks:
            code = _become_kernel(json.loads(b"".join(chunks)))
    finally:
        os._exit(code)


def _become_kernel(launch: dict) -> int:
    """Turn this process into the kernel jupyter_client asked for (``argv``, ``env``, ``cwd``)."""
    argv, env, cwd = list(launch["argv"]), dict(launch["env"]), launch["cwd"]
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 2)  # nbval sends the kernel's stderr to /dev/null; stdout stays the log
    os.close(devnull)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if argv[1:3] != ["-m", "ipykernel_launcher"]:  # another kernel: start it the ordinary way
        os.execvpe(argv[0], argv, env)
    if sys.modules.get("rfc3987_syntax", 0) is None:  # kept out of pytest by grade_plugin
        del sys.modules["rfc3987_syntax"]
    default_signals()
    import ipykernel_launcher
    from ipykernel.kernelapp import IPKernelApp

    sys.argv = [ipykernel_launcher.__file__, *argv[3:]]
    # IPKernelApp reads these two from the environment when it is imported (in the worker,
    # without them): give them as a fresh Python would have read them
    IPKernelApp.launch_instance(argv=argv[3:],
                                parent_handle=int(env.get("JPY_PARENT_PID") or 0),
                                interrupt=int(env.get("JPY_INTERRUPT_EVENT") or 0))
    return 0


class _Child:
    """The part of :class:`subprocess.Popen` that jupyter_client's provisioner uses, for a
    process this one forked."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def use_zygote(pid: int, fd: int) -> None:
    """Make nbval's kernels start from the zygote ``pid`` (launch command sent on ``fd``)."""
    from jupyter_client.manager import KernelManager
    from jupyter_client.provisioning import LocalProvisioner
    from nbval import kernel as nbval_kernel

    class ZygoteProvisioner(LocalProvisioner):
        """jupyter_client's local provisioner, launching the kernel from the zygote."""

        async def launch_kernel(self, cmd, **kwargs):
            nonlocal fd
            if fd is None:
                raise RuntimeError("the grading kernel can be started once per notebook")
            env = dict(kwargs.get("env") or os.environ)
            env["JPY_PARENT_PID"] = str(os.getpid())  # as jupyter_client's launcher sets it
            launch = {"argv": list(cmd), "env": env, "cwd": str(kwargs.get("cwd") or os.getcwd())}
            data = json.dumps(launch).encode()
            while data:
                data = data[os.write(fd, data):]
            os.close(fd)
            fd = None
            self.process = _Child(pid)
            self.pid = self.pgid = pid
            self.cwd = launch["cwd"]
            return self.connection_info

    class ZygoteKernelManager(KernelManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kernel_id = self.kernel_id or str(uuid.uuid4())
            self.provisioner = ZygoteProvisioner(kernel_id=self.kernel_id,
                                                 kernel_spec=self.kernel_spec, parent=self)

    nbval_kernel.KernelManager = ZygoteKernelManager
