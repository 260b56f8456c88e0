"""Tests of `course grade`: rebuild from the solution, nbval in a sandbox, gradebook.

A small fixture course (plain Python, no torch) is built in a temporary folder with
`course_lib.instructor.authoring`; one class of submissions covering every hostile or broken case
is graded once (module-scoped fixture) and each test asserts on that run. The real course is
exercised by `course grade --demo` on solutions/00_welcome.ipynb only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib.cli import main
from course_lib.instructor.authoring import answer, check, code, md, notebook, solution, write
from course_lib.instructor.grade import parse_memory
from course_lib.instructor.grade_demo import student_notebook
from course_lib.instructor.grade_rebuild import load_solutions, rebuild
from course_lib.instructor.grade_sandbox import marked_processes
from course_lib.instructor.release import dumps

ROOT = Path(__file__).resolve().parents[1]

SQUARE = '''def square(x):
    """Return x squared."""
    ### BEGIN SOLUTION
    return x * x
    ### END SOLUTION'''
SQUARE_CHECK = '''"""Checks square on a visible and a hidden case."""
assert square(3) == 9, f"square(3) returned {square(3)!r}, expected 9"
### BEGIN HIDDEN TESTS
assert square(-4) == 16, f"square(-4) returned {square(-4)!r}, expected 16 (hidden test)"
### END HIDDEN TESTS
print("CHECK nb01_square: PASS")'''
GREET = '''def greet(name):
    """Return 'Hello, <name>!'."""
    ### BEGIN SOLUTION
    return f"Hello, {name}!"
    ### END SOLUTION'''
GREET_CHECK = '''"""Checks greet."""
assert greet("Ada") == "Hello, Ada!", f"greet('Ada') returned {greet('Ada')!r}, expected 'Hello, Ada!'"
print("CHECK nb01_greet: PASS")'''
CUBE = '''def cube(x):
    """Return x cubed."""
    ### BEGIN SOLUTION
    return x ** 3
    ### END SOLUTION'''
CUBE_CHECK = '''"""Checks cube."""
assert cube(2) == 8, f"cube(2) returned {cube(2)!r}, expected 8"
print("CHECK nb02_cube: PASS")'''

POINTS = {"nb01_square": 2.0, "nb01_greet": 1.0, "nb02_cube": 1.0}
GOOD_SQUARE = "def square(x):\n    return x * x"
GOOD_GREET = 'def greet(name):\n    return f"Hello, {name}!"'
GOOD_CUBE = "def cube(x):\n    return x ** 3"


def _executed(nb: dict, outputs: dict[int, str]) -> dict:
    """Store outputs as `course execute` would (check cells print their success line)."""
    for n, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            cell["execution_count"] = n
            if n in outputs:
                cell["outputs"] = [{"name": "stdout", "output_type": "stream",
                                    "text": outputs[n]}]
    return nb


def make_course(root: Path) -> Path:
    """solutions/01_basics.ipynb (2 checks, 3 points) and 02_extra.ipynb (1 check, 1 point)."""
    nb01 = _executed(notebook([
        md("# 01 · Basics"),
        code("import math"),
        solution(SQUARE, "nb01_square_impl"),
        check(SQUARE_CHECK, "nb01_square", points=2),
        solution(GREET, "nb01_greet_impl"),
        check(GREET_CHECK, "nb01_greet", points=1),
        code("print(square(3), greet('Bo'))"),
        answer("Why?\n<!-- BEGIN SOLUTION -->\nBecause.\n<!-- END SOLUTION -->", "nb01_why"),
    ]), {3: "CHECK nb01_square: PASS\n", 5: "CHECK nb01_greet: PASS\n",
         6: "9 Hello, Bo!\n"})
    nb02 = _executed(notebook([
        md("# 02 · Extra"),
        solution(CUBE, "nb02_cube_impl"),
        check(CUBE_CHECK, "nb02_cube", points=1),
    ]), {2: "CHECK nb02_cube: PASS\n"})
    write(nb01, root / "solutions" / "01_basics.ipynb")
    write(nb02, root / "solutions" / "02_extra.ipynb")
    shutil.copy(ROOT / "nbval_sanitize.cfg", root / "nbval_sanitize.cfg")
    return root / "solutions"


def student_nb(solutions: Path, name: str, fills: dict[str, str] | None = None,
               edit=None) -> dict:
    """The released notebook with some fill-in sources replaced, optionally edited further."""
    sol = json.loads((solutions / f"{name}.ipynb").read_text(encoding="utf-8"))
    nb = student_notebook(sol, name, fills or {})
    if edit is not None:
        edit(nb)
    return nb


def put(subs: Path, student: str, name: str, content: dict | str) -> None:
    path = subs / student / f"{name}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else dumps(content), encoding="utf-8")


def _cells_with_gid(nb: dict, gid: str) -> list[dict]:
    return [c for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == gid]


def make_class(solutions: Path, subs: Path) -> None:
    """One student per case; the expected statuses are in EXPECTED. To keep the run short, only
    some students submit 02_extra (the others get `missing` there)."""
    good01 = {"nb01_square_impl": GOOD_SQUARE, "nb01_greet_impl": GOOD_GREET}
    good02 = {"nb02_cube_impl": GOOD_CUBE}

    def one(student, fills01, edit01=None):
        put(subs, student, "01_basics", student_nb(solutions, "01_basics", fills01, edit01))

    def both(student, fills01, fills02=good02, edit01=None, edit02=None):
        one(student, fills01, edit01)
        put(subs, student, "02_extra", student_nb(solutions, "02_extra", fills02, edit02))

    both("correct", good01)
    both("empty", {}, {})
    one("wrong_and_hidden", {"nb01_square_impl": "def square(x):\n    return abs(x) * x",
                             "nb01_greet_impl": 'def greet(name):\n    return "Hi " + name'})
    one("traceback_hider", {
        "nb01_square_impl": "get_ipython().showtraceback = lambda *a, **k: None\n"
                            "def square(x):\n    return x + x",
        "nb01_greet_impl": GOOD_GREET})

    def tamper(nb):
        _cells_with_gid(nb, "nb01_square")[0]["source"] = 'assert True\nprint("CHECK nb01_square: PASS")'

    one("tamper_assert", {"nb01_square_impl": "def square(x):\n    return x + x",
                          "nb01_greet_impl": GOOD_GREET}, edit01=tamper)

    def duplicate_square(nb):
        first = _cells_with_gid(nb, "nb01_square_impl")[0]
        nb["cells"].append(dict(first, source="def square(x):\n    return 0", id="dup"))

    one("print_pass", {"nb01_square_impl": GOOD_SQUARE,
                       "nb01_greet_impl": 'def greet(name):\n    return "nope"\n'
                                          'print("CHECK nb01_greet: PASS")'},
        edit01=duplicate_square)

    def delete_checks(nb):
        nb["cells"] = [c for c in nb["cells"]
                       if not c.get("metadata", {}).get("nbgrader", {}).get("grade")]

    both("deleted_checks", {"nb01_square_impl": GOOD_SQUARE,
                            "nb01_greet_impl": 'def greet(name):\n    return "Hello"'},
         edit01=delete_checks, edit02=delete_checks)
    both("crash", {"nb01_square_impl": "def square(x)\n    return x * x",
                   "nb01_greet_impl": GOOD_GREET},
         {"nb02_cube_impl": 'raise RuntimeError("my code crashed")\ndef cube(x):\n    return x ** 3'})
    put(subs, "malformed_json", "01_basics",
        dumps(student_nb(solutions, "01_basics", good01))[:200])
    put(subs, "malformed_json", "02_extra", student_nb(solutions, "02_extra", good02))

    def nbformat3(nb):
        nb["nbformat"] = 3

    both("wrong_nbformat", good01, edit01=nbformat3)
    put(subs, "missing", "02_extra", student_nb(solutions, "02_extra", good02))
    one("dead_kernel", {"nb01_square_impl": "import os\ndef square(x):\n    os._exit(1)",
                        "nb01_greet_impl": GOOD_GREET})
    one("infinite_loop", {"nb01_square_impl": "def square(x):\n    while True:\n        pass",
                          "nb01_greet_impl": GOOD_GREET})
    # one allocation over the limit: MemoryError at once, long before the cell's time limit
    one("memory_bomb", {
        "nb01_square_impl": "def square(x):\n    hog = bytearray(2 * 2**30)\n    return x * x",
        "nb01_greet_impl": GOOD_GREET})
    # 2 MB: 20 times what nbval compares (COMPARE_CAP), in well under a second
    one("huge_output", {"nb01_square_impl": GOOD_SQUARE,
                        "nb01_greet_impl": 'def greet(name):\n    print("spam " * 400_000)\n'
                                           '    return f"Hello, {name}!"'})


# student -> {check: status}; points follow from the status (POINTS when passed, else 0)
EXPECTED = {
    "correct": {"nb01_square": "passed", "nb01_greet": "passed", "nb02_cube": "passed"},
    "empty": {"nb01_square": "failed", "nb01_greet": "failed", "nb02_cube": "failed"},
    "wrong_and_hidden": {"nb01_square": "failed", "nb01_greet": "failed", "nb02_cube": "missing"},
    "traceback_hider": {"nb01_square": "failed", "nb01_greet": "passed", "nb02_cube": "missing"},
    "tamper_assert": {"nb01_square": "failed", "nb01_greet": "passed", "nb02_cube": "missing"},
    "print_pass": {"nb01_square": "passed", "nb01_greet": "failed", "nb02_cube": "missing"},
    "deleted_checks": {"nb01_square": "passed", "nb01_greet": "failed", "nb02_cube": "passed"},
    "crash": {"nb01_square": "error", "nb01_greet": "passed", "nb02_cube": "error"},
    "malformed_json": {"nb01_square": "error", "nb01_greet": "error", "nb02_cube": "passed"},
    "wrong_nbformat": {"nb01_square": "error", "nb01_greet": "error", "nb02_cube": "passed"},
    "missing": {"nb01_square": "missing", "nb01_greet": "missing", "nb02_cube": "passed"},
    "dead_kernel": {"nb01_square": "error", "nb01_greet": "error", "nb02_cube": "missing"},
    "infinite_loop": {"nb01_square": "timeout", "nb01_greet": "passed", "nb02_cube": "missing"},
    "memory_bomb": {"nb01_square": "error", "nb01_greet": "passed", "nb02_cube": "missing"},
    "huge_output": {"nb01_square": "passed", "nb01_greet": "failed", "nb02_cube": "missing"},
}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# The per-cell limit is far above what any cell but the infinite loop needs, even on a machine
# busy with other work (they take milliseconds): only that student's check may hit it.
CELL_TIMEOUT = 10
GRADE_ARGS = ["--timeout", str(CELL_TIMEOUT), "--notebook-timeout", "180", "--memory-limit", "1G"]


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The class graded once with --jobs 2; the originals' hashes taken before grading."""
    root = tmp_path_factory.mktemp("course")
    solutions = make_course(root)
    subs = root / "submissions"
    make_class(solutions, subs)
    before = tree_hashes(subs)
    out = root / "gradebook"
    rc = main(["grade", str(subs), "--out", str(out), "--solutions", str(solutions),
               "--jobs", "2", *GRADE_ARGS])
    data = json.loads((out / "gradebook.json").read_text(encoding="utf-8"))
    return {"root": root, "solutions": solutions, "subs": subs, "out": out, "rc": rc,
            "before": before, "data": data}


def _nb(graded, student, name):
    return graded["data"]["students"][student]["notebooks"][name]


def _check(graded, student, gid):
    name = "01_basics" if gid.startswith("nb01") else "02_extra"
    return _nb(graded, student, name)["checks"][gid]


# --------------------------------------------------------------------------- the graded class


def test_grading_completes_with_exit_status_zero(graded):
    assert graded["rc"] == 0
    assert sorted(graded["data"]["students"]) == sorted(EXPECTED)


@pytest.mark.parametrize("student", sorted(EXPECTED))
def test_each_case_gets_its_statuses_and_points(graded, student):
    for gid, status in EXPECTED[student].items():
        got = _check(graded, student, gid)
        assert got["status"] == status, (student, gid, got)
        assert got["points"] == (POINTS[gid] if status == "passed" else 0.0), (student, gid)
        assert got["max_points"] == POINTS[gid]
        if status != "passed":
            assert got["message"], (student, gid)
    want_total = sum(POINTS[g] for g, s in EXPECTED[student].items() if s == "passed")
    assert graded["data"]["students"][student]["total"] == want_total


def test_gradebook_csv_has_one_row_per_student_and_totals(graded):
    rows = list(csv.DictReader((graded["out"] / "gradebook.csv").open(encoding="utf-8")))
    assert [r["student"] for r in rows] == sorted(EXPECTED)
    header = list(rows[0])
    assert header[:4] == ["student", "nb01_square", "nb01_greet", "01_basics total"]
    assert header[4:] == ["nb02_cube", "02_extra total", "total", "max total", "notes"]
    by_student = {r["student"]: r for r in rows}
    assert by_student["correct"]["total"] == "4" and by_student["correct"]["max total"] == "4"
    assert by_student["tamper_assert"]["nb01_square"] == "0"
    assert by_student["tamper_assert"]["01_basics total"] == "1"
    assert by_student["infinite_loop"]["total"] == "1"
    assert "01_basics: missing" in by_student["missing"]["notes"]
    assert "malformed" in by_student["malformed_json"]["notes"]
    assert by_student["correct"]["notes"] == ""


def test_hidden_tests_are_restored(graded):
    message = _check(graded, "wrong_and_hidden", "nb01_square")["message"]
    assert "square(-4) returned -16, expected 16 (hidden test)" in message
    greet = _check(graded, "wrong_and_hidden", "nb01_greet")["message"]
    assert "greet('Ada') returned 'Hi Ada'" in greet


def test_hidden_traceback_does_not_pass_a_failing_check(graded):
    got = _check(graded, "traceback_hider", "nb01_square")
    assert "lacks the line 'CHECK nb01_square: PASS'" in got["message"]
    flags = _nb(graded, "traceback_hider", "01_basics")["review_flags"]
    assert any("changes how IPython runs cells or shows exceptions" in f for f in flags)


def test_tampered_and_deleted_check_cells_are_replaced_by_the_originals(graded):
    tampered = _nb(graded, "tamper_assert", "01_basics")
    assert any("'nb01_square' was edited" in w for w in tampered["warnings"])
    assert "square(3) returned 6" in tampered["checks"]["nb01_square"]["message"]
    deleted = _nb(graded, "deleted_checks", "01_basics")
    assert any("'nb01_square' was deleted" in w for w in deleted["warnings"])
    assert any("'nb01_greet' was deleted" in w for w in deleted["warnings"])
    assert "greet('Ada') returned 'Hello'" in deleted["checks"]["nb01_greet"]["message"]


def test_printed_success_line_in_own_cell_does_not_count_and_duplicates_take_the_first(graded):
    nb = _nb(graded, "print_pass", "01_basics")
    assert "returned 'nope'" in nb["checks"]["nb01_greet"]["message"]
    assert any("prints a check's success line" in f for f in nb["review_flags"])
    assert any("'nb01_square_impl' appears 2 times" in w for w in nb["warnings"])


def test_crashing_cells_give_errors_with_the_reason(graded):
    nb = _nb(graded, "crash", "01_basics")
    assert "NameError" in nb["checks"]["nb01_square"]["message"]
    assert any("'nb01_square_impl' raised SyntaxError" in e for e in nb["cell_errors"])
    nb2 = _nb(graded, "crash", "02_extra")
    assert any("RuntimeError: my code crashed" in e for e in nb2["cell_errors"])


def test_malformed_and_missing_notebooks_are_graded_rows(graded):
    bad = _nb(graded, "malformed_json", "01_basics")
    assert bad["status"] == "malformed" and "not valid JSON" in bad["reason"]
    old = _nb(graded, "wrong_nbformat", "01_basics")
    assert old["status"] == "malformed" and "nbformat 3" in old["reason"]
    gone = _nb(graded, "missing", "01_basics")
    assert gone["status"] == "missing" and "no 01_basics.ipynb" in gone["reason"]


def test_dead_kernel_is_reported_and_later_checks_do_not_run(graded):
    nb = _nb(graded, "dead_kernel", "01_basics")
    assert "kernel died while this check ran" in nb["checks"]["nb01_square"]["message"]
    assert "kernel died earlier" in nb["checks"]["nb01_greet"]["message"]


def test_infinite_loop_times_out_and_later_checks_still_run(graded):
    nb = _nb(graded, "infinite_loop", "01_basics")
    assert f"per-cell time limit of {CELL_TIMEOUT} s" in nb["checks"]["nb01_square"]["message"]
    assert nb["checks"]["nb01_greet"]["status"] == "passed"


def test_memory_bomb_hits_the_memory_limit(graded):
    message = _check(graded, "memory_bomb", "nb01_square")["message"]
    assert "MemoryError" in message and "memory limit is 1G" in message


def test_huge_output_fails_its_check_quickly_with_a_short_message(graded):
    message = _check(graded, "huge_output", "nb01_greet")["message"]
    assert "printed more than its success line" in message
    assert len(message) < 1000
    feedback = (graded["out"] / "feedback" / "huge_output.md").read_text(encoding="utf-8")
    assert len(feedback) < 20_000


def test_feedback_lists_each_failed_check_with_its_message(graded):
    text = (graded["out"] / "feedback" / "wrong_and_hidden.md").read_text(encoding="utf-8")
    assert "**Total: 0 / 4 points**" in text
    assert "### `nb01_square`: failed, 0 / 2" in text
    assert "square(-4) returned -16" in text
    assert "### `nb01_greet`: failed, 0 / 1" in text
    assert "**Not graded (missing):** no 02_extra.ipynb" in text
    partial = (graded["out"] / "feedback" / "infinite_loop.md").read_text(encoding="utf-8")
    assert "Passed: `nb01_greet`" in partial
    correct = (graded["out"] / "feedback" / "correct.md").read_text(encoding="utf-8")
    assert "did not pass" not in correct and "all checks passed" in correct


def test_originals_are_never_modified(graded):
    assert tree_hashes(graded["subs"]) == graded["before"]


SERIAL_SUBSET = ("correct", "crash", "dead_kernel", "infinite_loop", "traceback_hider")


def test_serial_run_gives_identical_results(graded, tmp_path):
    """A serial run (--jobs 1) of a subset of the class gives the same per-student results,
    byte for byte, as the parallel run (--jobs 2) of the whole class."""
    subs = tmp_path / "subs"
    for student in SERIAL_SUBSET:
        shutil.copytree(graded["subs"] / student, subs / student)
    out = tmp_path / "serial"
    rc = main(["grade", str(subs), "--out", str(out), "--solutions",
               str(graded["solutions"]), "--jobs", "1", *GRADE_ARGS])
    assert rc == 0
    serial = json.loads((out / "gradebook.json").read_text(encoding="utf-8"))
    parallel = graded["data"]
    assert {k: v for k, v in serial.items() if k != "students"} == \
        {k: v for k, v in parallel.items() if k != "students"}
    assert serial["students"] == {s: parallel["students"][s] for s in SERIAL_SUBSET}
    serial_rows = (out / "gradebook.csv").read_text(encoding="utf-8").splitlines()
    parallel_rows = (graded["out"] / "gradebook.csv").read_text(encoding="utf-8").splitlines()
    assert serial_rows[0] == parallel_rows[0]
    assert set(serial_rows[1:]) <= set(parallel_rows[1:]) and len(serial_rows) == 6
    for student in SERIAL_SUBSET:
        name = f"{student}.md"
        assert (out / "feedback" / name).read_bytes() == \
            (graded["out"] / "feedback" / name).read_bytes()


def own_grading_processes() -> list[int]:
    """The processes of the grading runs of this test session, and only those: every process of
    a run carries COURSE_GRADE_RUN=<grader pid>-..., and the grader is this process (another
    `course grade` on the machine has another PID)."""
    return marked_processes(f"{os.getpid()}-", prefix=True)


def test_no_grading_process_outlives_the_run(graded):
    assert own_grading_processes() == []


# --------------------------------------------------------------------------- other runs


def test_whole_notebook_timeout_stops_a_loop_that_ignores_interrupts(graded, tmp_path):
    stubborn = ("import time\nwhile True:\n    try:\n        print('.', end='', flush=True)\n"
                "        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass")
    subs = tmp_path / "subs"
    put(subs, "stubborn", "01_basics",
        student_nb(graded["solutions"], "01_basics", {"nb01_square_impl": stubborn}))
    out = tmp_path / "out"
    rc = main(["grade", str(subs), "--out", str(out), "--solutions", str(graded["solutions"]),
               "--notebook", "01_basics", "--timeout", "2", "--notebook-timeout", "10"])
    assert rc == 0
    nb = json.loads((out / "gradebook.json").read_text())["students"]["stubborn"]["notebooks"]
    checks = nb["01_basics"]["checks"]
    assert {c["status"] for c in checks.values()} == {"timeout"}
    assert any("whole-notebook time limit of 10 s" in p for p in nb["01_basics"]["problems"])
    assert own_grading_processes() == []


def test_nbgrader_layout_and_grading_without_namespaces(graded, tmp_path, monkeypatch, capsys):
    """nbgrader's submitted/<student>/<assignment>/ layout; also where namespaces are refused
    (as in many containers) grading still works and warns that the network is not isolated."""
    import course_lib.instructor.grade_sandbox as grade_module

    monkeypatch.setattr(grade_module, "_probe", lambda *flags: (False, "unshare: Operation "
                                                                "not permitted"))
    course = tmp_path / "nbgrader_course"
    sub = course / "submitted" / "bob"
    put(sub, "lesson11", "01_basics", student_nb(graded["solutions"], "01_basics", {
        "nb01_square_impl": GOOD_SQUARE}))
    put(sub, "extra", "02_extra", student_nb(graded["solutions"], "02_extra", {
        "nb02_cube_impl": GOOD_CUBE}))
    (course / "source").mkdir()  # nbgrader's other folders are not students
    out = tmp_path / "out"
    assert main(["grade", str(course), "--out", str(out), "--solutions",
                 str(graded["solutions"])]) == 0
    data = json.loads((out / "gradebook.json").read_text())
    assert data["settings"]["network_isolated"] is False
    assert "submissions run WITH network access" in data["warnings"][0]
    assert "warning: network isolation is not permitted here" in capsys.readouterr().err
    assert data["settings"]["layout"] == "nbgrader"
    assert list(data["students"]) == ["bob"]
    bob = data["students"]["bob"]
    assert bob["total"] == 3
    assert bob["notebooks"]["01_basics"]["source"] == "bob/lesson11/01_basics.ipynb"


def test_demo_on_the_real_course(tmp_path):
    """`course grade --demo` on solutions/00_welcome.ipynb: correct 2/2, empty 0/2, partial 1/2."""
    out = tmp_path / "demo"
    rc = main(["grade", "--demo", str(out), "--solutions", str(ROOT / "solutions"),
               "--notebook", "00_welcome", "--jobs", "2"])
    assert rc == 0
    rows = {r["student"]: r for r in
            csv.DictReader((out / "gradebook" / "gradebook.csv").open(encoding="utf-8"))}
    assert {s: rows[s]["total"] for s in rows} == {
        "demo_correct": "2", "demo_empty": "0", "demo_partial": "1"}
    assert rows["demo_partial"]["nb00_param_count"] == "1"
    data = json.loads((out / "gradebook" / "gradebook.json").read_text())
    assert data["settings"]["sanitizer"] == "nbval_sanitize.cfg"
    empty = data["students"]["demo_empty"]["notebooks"]["00_welcome"]["checks"]
    assert "is not filled in yet" in empty["nb00_param_count"]["message"]


# --------------------------------------------------------------------------- rebuild (no kernel)


def test_rebuild_keeps_authoritative_checks_and_ignores_other_outputs(tmp_path):
    solutions = make_course(tmp_path)
    sol = load_solutions(solutions, ["01_basics"])[0]

    def hostile(nb):
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": "x\n"}]
                cell["metadata"]["tags"] = ["nbval-skip"]
        nb["cells"].insert(0, {"cell_type": "code", "metadata": {}, "source": "print(1)",
                               "outputs": [], "execution_count": None})

    sub = student_nb(solutions, "01_basics", {"nb01_square_impl": GOOD_SQUARE}, hostile)
    rebuilt = rebuild(sol, sub)
    cells = rebuilt.nb["cells"]
    assert len(cells) == len(sol.nb["cells"])  # the student's extra cell is dropped
    assert cells[2]["source"] == GOOD_SQUARE
    assert "### BEGIN HIDDEN TESTS" in cells[3]["source"]  # hidden tests restored
    assert cells[3]["outputs"][0]["text"] == "CHECK nb01_square: PASS\n"
    assert cells[3]["execution_count"] is not None and "nbval-skip" not in cells[3]["metadata"]["tags"]
    assert cells[4]["source"].count("raise NotImplementedError") == 1  # untouched -> stub
    for cell in (cells[1], cells[2], cells[6]):
        assert cell["outputs"] == [] and cell["execution_count"] is None
        assert "nbval-ignore-output" in cell["metadata"]["tags"]
    assert cells[7]["source"] == "Why?\n**YOUR ANSWER HERE** (在这里写下你的答案 / write your answer here)"


# --------------------------------------------------------------------------- errors (no kernel)


@pytest.mark.parametrize("value,bytes_", [("4G", 4 * 2**30), ("512M", 512 * 2**20),
                                          ("1.5GiB", int(1.5 * 2**30)), ("none", None)])
def test_parse_memory(value, bytes_):
    assert parse_memory(value) == bytes_


def _error_of(capsys, argv) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--jobs", "0"], "argument --jobs: expected an integer >= 1, got 0"),
    (["--jobs", "two"], "argument --jobs: expected an integer >= 1, got 'two'"),
    (["--memory-limit", "lots"], "argument --memory-limit: expected a size like 4G, 512M"),
    (["--memory-limit", "10M"], "below the minimum of 256M"),
    (["--timeout", "-1"], "argument --timeout: expected a number of seconds > 0"),
    (["--notebook-timeout", "soon"], "argument --notebook-timeout: expected a number"),
])
def test_bad_arguments_name_the_argument_and_allowed_values(tmp_path, capsys, argv, needle):
    (tmp_path / "subs" / "a").mkdir(parents=True)
    rc, err = _error_of(capsys, ["grade", str(tmp_path / "subs"), "--out",
                                 str(tmp_path / "out"), *argv])
    assert rc == 2 and needle in err


def test_grading_that_cannot_run_exits_non_zero_with_a_message(tmp_path, capsys):
    solutions = make_course(tmp_path)
    subs = tmp_path / "subs"
    (subs / "alice").mkdir(parents=True)
    base = ["--solutions", str(solutions)]
    cases = [
        (["grade", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *base],
         "SUBMISSIONS_DIR: folder not found"),
        (["grade", str(subs), *base], "--out GRADEBOOK_DIR is required"),
        (["grade", *base], "SUBMISSIONS_DIR is required"),
        (["grade", str(subs), "--demo", str(tmp_path / "d"), *base], "not both"),
        (["grade", str(subs), "--out", str(subs / "gb"), *base], "the folder of student folders"),
        (["grade", str(subs), "--out", str(tmp_path / "o"), "--solutions", str(subs)],
         "no NN_name.ipynb solution notebooks"),
        (["grade", str(subs), "--out", str(tmp_path / "o"), *base, "--notebook", "07_nope"],
         "allowed values: 01_basics, 02_extra"),
        (["grade", str(tmp_path / "solutions"), "--out", str(tmp_path / "o"), *base],
         "no student folders"),
    ]
    for argv, needle in cases:
        rc, err = _error_of(capsys, argv)
        assert rc == 2 and needle in err, (argv, err)
    # a solution notebook whose check has no stored success line cannot be graded
    sol = json.loads((solutions / "02_extra.ipynb").read_text())
    sol["cells"][2]["outputs"] = []
    (solutions / "02_extra.ipynb").write_text(dumps(sol))
    rc, err = _error_of(capsys, ["grade", str(subs), "--out", str(tmp_path / "o"), *base])
    assert rc == 2 and "lacks the success line 'CHECK nb02_cube: PASS'" in err
    # an existing folder that is not a gradebook is not overwritten
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, err = _error_of(capsys, ["grade", str(subs), "--out", str(other), *base])
    assert rc == 2 and "holds no gradebook.json" in err
    assert (other / "keep.txt").read_text() == "mine"


def _sandboxed(*args: str, code: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "course_lib.instructor.grade_sandbox", *args, "--",
           sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_sandbox_blocks_the_network_but_keeps_loopback():
    from course_lib.instructor.grade import detect_sandbox

    sandbox = detect_sandbox()
    if not sandbox.isolate_net:
        assert any("network" in w for w in sandbox.warnings)  # degraded, and says so
        pytest.skip(f"network namespaces not permitted here: {sandbox.warnings}")
    code = ("import socket\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "socket.create_connection(s.getsockname(), timeout=5).close()\n"
            "try:\n    socket.create_connection(('192.0.2.1', 80), timeout=5)\n"
            "except OSError as e:\n    print('blocked', e.errno)\n")
    done = _sandboxed("--isolate-net", code=code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("blocked")


def test_sandbox_memory_limit_raises_memory_error():
    done = _sandboxed("--memory", str(512 * 2**20),
                      code="try:\n    bytearray(2 * 2**30)\nexcept MemoryError:\n    print('capped')")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "capped"


# --------------------------------------------------------------------------- interpretation


def _interpret(tmp_path, records, returncode=1, timed_out=False):
    from course_lib.instructor.grade_run import RunResult, RunSettings, interpret

    solutions = make_course(tmp_path)
    sol = load_solutions(solutions, ["01_basics"])[0]
    settings = RunSettings(5, 60, None, False, False, tmp_path / "nbval_sanitize.cfg")
    return interpret(sol, RunResult(records, returncode, timed_out, ""), settings, "none")


def test_interpret_a_process_that_died_before_reporting(tmp_path):
    result = _interpret(tmp_path, [])
    assert {c.status for c in result.checks.values()} == {"error"}
    assert "stopped unexpectedly (exit code 1)" in result.checks["nb01_square"].message
    assert any("see the log" in p for p in result.problems)


def test_interpret_a_kernel_that_could_not_start(tmp_path):
    records = [{"event": "start", "cell": c} for c in (1, 2, 3)] + [
        {"event": "result", "cell": c, "phase": "setup", "outcome": "failed",
         "message": "RuntimeError: Kernel died before replying to kernel_info"} for c in (1, 2, 3)]
    result = _interpret(tmp_path, records)
    assert result.checks["nb01_square"].status == "error"
    assert "kernel could not start (RuntimeError: Kernel died" in result.checks["nb01_square"].message
    assert any("kernel could not start" in p for p in result.problems)


def test_interpret_a_whole_notebook_timeout_names_the_running_cell(tmp_path):
    ok = {"event": "result", "phase": "call", "outcome": "passed", "stdout": ""}
    records = [{"event": "start", "cell": 1}, dict(ok, cell=1), {"event": "start", "cell": 2}]
    result = _interpret(tmp_path, records, returncode=None, timed_out=True)
    assert result.checks["nb01_square"].status == "timeout"
    assert any("while your fill-in cell 'nb01_square_impl' was running" in p
               for p in result.problems)


def test_interpret_messages_are_sanitised(tmp_path):
    records = [{"event": "result", "cell": 3, "phase": "call", "outcome": "failed",
                "stdout": "", "error": {"ename": "AssertionError",
                                        "evalue": "got <function f at 0x7f3a2b1c9d80>"}},
               {"event": "result", "cell": 2, "phase": "call", "outcome": "failed", "stdout": "",
                "error": {"ename": "SyntaxError", "evalue": "invalid (1919612535.py, line 1)"}}]
    result = _interpret(tmp_path, records, returncode=1)
    assert result.checks["nb01_square"].message == "got <function f at 0xADDRESS>"
    assert result.cell_errors == [
        "your fill-in cell 'nb01_square_impl' raised SyntaxError: invalid (<cell>, line 1)"]
