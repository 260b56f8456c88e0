"""The warm grading workers (instructor/grade_pool.py, grade_worker.py, grade_kernel.py): each
notebook's kernel is a fresh process forked from a worker that imported everything once, inside
the sandbox, sharing nothing with another student's; a lost worker costs one run."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from course_lib.cli import main
from course_lib.instructor.authoring import check, code, md, notebook, solution, write
from course_lib.instructor.grade_demo import student_notebook
from course_lib.instructor.grade_pool import Worker, imported_modules, warm_modules
from course_lib.instructor.grade_rebuild import load_solutions, rebuild
from course_lib.instructor.grade_run import RunSettings, run_notebook
from course_lib.instructor.grade_sandbox import detect_sandbox, marked_processes
from course_lib.instructor.nbio import dumps
from course_lib.instructor.release import release_notebook

ROOT = Path(__file__).resolve().parents[1]

FILL = ("def value():\n    \"\"\"Return what the check wants.\"\"\"\n    ### BEGIN SOLUTION\n"
        "    return 42\n    ### END SOLUTION")
# The check reports what the kernel sees as its failure message (it never passes).
PROBE = '''"""Reports the kernel's sandbox."""
import json, os, resource, socket
facts = {"pid": os.getpid(), "cwd": sorted(os.listdir(".")), "value": value(),
         "data_limit": resource.getrlimit(resource.RLIMIT_DATA)[0],
         "marker": os.environ.get("COURSE_GRADE_RUN", ""),
         "cmdline": open("/proc/self/cmdline").read().split(chr(0)),
         "leak": getattr(json, "course_leak", None)}
json.course_leak = "set by an earlier student"
try:
    socket.create_connection(("192.0.2.1", 80), timeout=3).close()
    facts["network"] = "reachable"
except OSError as exc:
    facts["network"] = f"blocked ({exc.errno})"
raise AssertionError("FACTS " + json.dumps(facts))
print("CHECK nb01_probe: PASS")'''


def probe_course(root: Path) -> Path:
    nb = notebook([md("# 01 · Probe"), code("import json"), solution(FILL, "nb01_value_impl"),
                   check(PROBE, "nb01_probe")])
    nb["cells"][3]["outputs"] = [{"name": "stdout", "output_type": "stream",
                                  "text": "CHECK nb01_probe: PASS\n"}]
    nb["cells"][3]["execution_count"] = 1
    write(nb, root / "solutions" / "01_probe.ipynb")
    shutil.copy(ROOT / "nbval_sanitize.cfg", root / "nbval_sanitize.cfg")
    return root / "solutions"


def submit(root: Path, students: list[str]) -> Path:
    sol = json.loads((root / "solutions" / "01_probe.ipynb").read_text(encoding="utf-8"))
    student_nb = student_notebook(sol, "01_probe.ipynb",
                                  {"nb01_value_impl": "def value():\n    return 42"})
    for student in students:
        path = root / "subs" / student / "01_probe.ipynb"
        path.parent.mkdir(parents=True)
        path.write_text(dumps(student_nb), encoding="utf-8")
    return root / "subs"


def facts_of(data: dict, student: str) -> dict:
    message = data["students"][student]["notebooks"]["01_probe"]["checks"]["nb01_probe"]["message"]
    return json.loads(message.split("FACTS ", 1)[1])


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Three students graded by one worker (--jobs 1), one after the other."""
    root = tmp_path_factory.mktemp("probe")
    solutions = probe_course(root)
    subs = submit(root, ["a", "b", "c"])
    out = root / "out"
    assert main(["grade", str(subs), "--out", str(out), "--solutions", str(solutions),
                 "--jobs", "1", "--timeout", "60", "--memory-limit", "2G"]) == 0
    return json.loads((out / "gradebook.json").read_text(encoding="utf-8"))


def test_each_kernel_is_fresh_and_shares_nothing_with_the_previous_student(probed):
    for student in ("a", "b", "c"):
        facts = facts_of(probed, student)
        assert facts["value"] == 42  # the student's fill-in ran in this kernel
        assert facts["leak"] is None, student  # what the previous kernel changed is gone
        # forked from the warm worker, not a fresh `python -m ipykernel_launcher`
        assert "course_lib.instructor.grade_worker" in facts["cmdline"], facts["cmdline"]
        assert facts["cwd"] == ["01_probe.ipynb"]  # only its own notebook


def test_the_kernel_runs_inside_the_sandbox(probed):
    sandbox = detect_sandbox()
    facts = [facts_of(probed, s) for s in ("a", "b", "c")]
    assert {f["data_limit"] for f in facts} == {2 * 2**30}
    assert all(f["marker"].startswith(f"{os.getpid()}-") for f in facts)
    if sandbox.pid_ns:  # PID 1 is the run's pytest; the kernel is one of the first PIDs
        assert all(f["pid"] < 10 for f in facts), facts
    if sandbox.isolate_net:
        assert all(f["network"].startswith("blocked") for f in facts), facts
    else:
        pytest.skip(f"namespaces not permitted here: {sandbox.warnings}")


def test_a_lost_worker_costs_one_run_and_is_replaced(tmp_path):
    solutions = probe_course(tmp_path)
    sol = load_solutions(solutions)[0]
    submission = student_notebook(sol.nb, sol.filename, {
        "nb01_value_impl": "import time\ndef value():\n    time.sleep(600)"})
    settings = RunSettings(60, 120, None, False, False, None)
    worker = Worker(warm_modules([sol.nb]))
    try:
        killer = threading.Timer(5, lambda: os.killpg(worker.proc.pid, 9))
        killer.start()
        lost = run_notebook(rebuild(sol, submission).nb, sol.filename, settings, worker)
        killer.join()
        assert lost.lost and lost.returncode is None
        again = run_notebook(rebuild(sol, release_notebook(sol.nb, sol.filename)[0]).nb,
                             sol.filename, settings, worker)
        assert not again.lost and again.returncode == 1  # the probe check fails, as it should
        assert any(r.get("event") == "result" for r in again.records)
    finally:
        worker.close()
    assert marked_processes(worker.marker) == []  # every process of the worker ended with it


def test_workers_that_cannot_start_stop_grading_with_the_reason(tmp_path, monkeypatch, capsys):
    solutions = probe_course(tmp_path)
    subs = submit(tmp_path, ["a"])
    shadow = tmp_path / "shadow" / "course_lib"  # a course_lib without the grading worker
    (shadow / "instructor").mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "instructor" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    rc = main(["grade", str(subs), "--out", str(tmp_path / "out"), "--solutions", str(solutions)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "the grading worker could not start (its last output: " in err
    assert "No module named course_lib.instructor.grade_worker" in err
    assert not (tmp_path / "out" / "gradebook.json").exists()


def test_warm_modules_are_the_imports_of_the_cells_grading_runs():
    assert imported_modules("import a.b as c, d\nfrom e.f import g, h\nfrom . import x\n"
                            "def f():\n    import inner") == ["a.b", "d", "e.f:g", "e.f:h"]
    nb = notebook([code("import math\nimport torch"),
                   solution("### BEGIN SOLUTION\nimport secret_of_student\n### END SOLUTION",
                            "nb09_f"),
                   check("from course_lib.checks.welcome import check_f\ncheck_f(f)", "nb09_c"),
                   code("import matplotlib.pyplot as plt")])
    nb["cells"][3]["metadata"]["tags"] = ["course-experiment"]
    assert warm_modules([nb]) == ["math", "torch", "course_lib.checks.welcome:check_f"]
    assert warm_modules([nb], full=True)[-1] == "matplotlib.pyplot"
