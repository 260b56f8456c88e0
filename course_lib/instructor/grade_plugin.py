"""pytest plugin used by ``course grade``: record each nbval cell's result as one JSON line.

Loaded with ``-p course_lib.instructor.grade_plugin --course-grade-fd N``. For every notebook cell
nbval runs, it writes to file descriptor ``N`` (a pipe the grader reads; the Jupyter kernel does
not inherit it, so code in a submission cannot write fake results into it):

- ``{"event": "start", "cell": K}`` when cell ``K`` (0-based index among *all* cells, taken from
  the ``course_grade`` metadata the grader puts on each code cell) starts;
- ``{"event": "result", "cell": K, "phase": "setup"|"call", "outcome": "passed"|"failed"|
  "skipped", "exception": ..., "message": ..., "timed_out": bool, "kernel_dead": bool,
  "stdout": ..., "stderr": ..., "error": {"ename", "evalue"} | None, "other_outputs": [...]}``.

With ``--course-grade-zygote PID:FD`` nbval's kernel is the pre-forked warm process ``PID``
(:mod:`course_lib.instructor.grade_kernel`) instead of a fresh Python.

It also makes two of nbval's behaviours fit grading (nbval 0.11):

- a kernel that dies (``os._exit``, a segfault, the OOM killer) is noticed within a second,
  instead of nbval waiting for the whole cell timeout for a reply that never comes;
- a cell's output text is cut to :data:`COMPARE_CAP` characters before nbval compares it with the
  stored output, so a huge output fails quickly instead of pytest diffing megabytes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from queue import Empty

import pytest

from course_lib.instructor.grade_kernel import ZYGOTE_OPTION, use_zygote

# jsonschema (imported by nbformat, imported by nbval) imports ``rfc3987_syntax`` when it is
# installed, which builds a parser at import time: about a second of CPU in every grading process.
# Notebook schemas use no IRI formats, so it is kept out (this plugin is loaded before nbval).
sys.modules.setdefault("rfc3987_syntax", None)

COMPARE_CAP = 100_000  # characters of one output field compared by nbval
RECORD_CAP = 4_000  # characters of one output field kept in the record
POLL_S = 0.5  # how often a waiting cell checks that the kernel is still alive

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class KernelDiedError(RuntimeError):
    """The Jupyter kernel process exited while a cell was running."""


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def cap(text: str, limit: int = RECORD_CAP) -> str:
    """Keep the head and tail of ``text`` when it is longer than ``limit`` characters."""
    if len(text) <= limit:
        return text
    head = limit * 3 // 4
    tail = limit - head
    return f"{text[:head]}\n… [{len(text) - limit:,} characters cut] …\n{text[-tail:]}"


def pytest_addoption(parser):
    parser.addoption("--course-grade-fd", type=int, default=None,
                     help="file descriptor to write per-cell JSON results to (course grade)")
    parser.addoption(ZYGOTE_OPTION, default=None, metavar="PID:FD",
                     help="start the kernel from this pre-forked warm process (course grade)")


class _Recorder:
    def __init__(self, fd: int):
        self.stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def write(self, record: dict) -> None:
        try:
            self.stream.write(json.dumps(record, sort_keys=True) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # the grader went away; nothing else to do
            pass


_recorder: _Recorder | None = None


def pytest_configure(config):
    global _recorder
    fd = config.getoption("course_grade_fd")
    if fd is None:
        return
    _recorder = _Recorder(fd)
    _patch_nbval()
    zygote = config.getoption(ZYGOTE_OPTION.lstrip("-").replace("-", "_"))
    if zygote:
        pid, _, pipe = zygote.partition(":")
        use_zygote(int(pid), int(pipe))


def _patch_nbval() -> None:
    from nbval import kernel as nbval_kernel
    from nbval import plugin as nbval_plugin

    if getattr(nbval_kernel.RunningKernel, "_course_grade_patched", False):
        return

    def await_reply(self, msg_id, timeout=None):
        """nbval's ``await_reply``, polling in short slices so a dead kernel is seen at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Empty
            try:
                msg = self.get_message(
                    stream="shell", timeout=POLL_S if remaining is None else min(POLL_S, remaining)
                )
            except Empty:
                if not self.is_alive():
                    raise KernelDiedError(
                        "the kernel died while running this cell (its process exited: "
                        "os._exit, a crash in compiled code, or killed for using too much memory)"
                    ) from None
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                if msg["content"]["status"] == "aborted":
                    raise RuntimeError("Kernel aborted execution request")
                return

    original_compare = nbval_plugin.IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        return original_compare(self, [_capped_output(o) for o in test], ref, skip_compare)

    nbval_kernel.RunningKernel.await_reply = await_reply
    nbval_kernel.RunningKernel._course_grade_patched = True
    nbval_plugin.IPyNbCell.compare_outputs = compare_outputs


def _capped_output(output):
    from nbformat import NotebookNode

    def capped(value):
        if isinstance(value, str) and len(value) > COMPARE_CAP:
            return value[:COMPARE_CAP] + f"… [{len(value) - COMPARE_CAP:,} characters cut]"
        return value

    out = NotebookNode(output)
    for key, value in list(out.items()):
        if key == "data" and isinstance(value, dict):
            out[key] = NotebookNode({k: capped(v) for k, v in value.items()})
        else:
            out[key] = capped(value)
    return out


def _cell_index(item) -> int | None:
    cell = getattr(item, "cell", None)
    if cell is None:
        return None
    meta = cell.get("metadata", {}).get("course_grade", {})
    index = meta.get("index") if isinstance(meta, dict) else None
    return index if isinstance(index, int) else None


def _summarise_outputs(outputs) -> dict:
    stdout, stderr, error, other = [], [], None, []
    for out in outputs or []:
        kind = out.get("output_type")
        if kind == "stream":
            (stderr if out.get("name") == "stderr" else stdout).append(str(out.get("text", "")))
        elif kind == "error":
            error = {"ename": str(out.get("ename", "")),
                     "evalue": cap(strip_ansi(str(out.get("evalue", ""))))}
        else:
            data = out.get("data", {})
            other.append(cap(str(data.get("text/plain", "")) or ", ".join(sorted(data)), 500))
    return {"stdout": cap("".join(stdout)), "stderr": cap(strip_ansi("".join(stderr))),
            "error": error, "other_outputs": other}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _recorder is not None:
        _recorder.write({"event": "start", "cell": _cell_index(item)})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if _recorder is None or call.when == "teardown":
        return
    report = outcome.get_result()
    excinfo = call.excinfo
    if call.when == "setup" and excinfo is None:
        return
    exc = excinfo.value if excinfo is not None else None
    message = ""
    if exc is not None:
        message = str(exc)
        inner = getattr(exc, "inner_traceback", None)
        if inner:
            message += "\n" + strip_ansi(str(inner))
    record = {
        "event": "result",
        "cell": _cell_index(item),
        "phase": call.when,
        "outcome": "passed" if exc is None else ("skipped" if report.skipped and
                                                 not hasattr(report, "wasxfail") else "failed"),
        "exception": type(exc).__name__ if exc is not None else None,
        "message": cap(message),
        "timed_out": exc is not None and str(exc).startswith("Timeout of"),
        "kernel_dead": isinstance(exc, KernelDiedError)
        or (isinstance(exc, RuntimeError) and str(exc) == "Kernel dead on test start"),
    }
    record.update(_summarise_outputs(getattr(item, "test_outputs", None)))
    _recorder.write(record)
