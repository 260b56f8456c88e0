"""What `course grade` runs of a notebook (instructor/grade_plan.py): the names each cell binds
and reads, the experiment cells left out, the release check that a cell that runs never needs
one, `course plan --mark`, and a graded class whose fast and --full scores are the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from course_lib.cli import main
from course_lib.instructor.authoring import check, code, md, notebook, solution, write
from course_lib.instructor.grade_demo import student_notebook
from course_lib.instructor.grade_plan import (
    cell_names,
    experiment_cells,
    grading_plan,
    mark_experiments,
    plan_problems,
)
from course_lib.instructor.grade_rebuild import load_solutions, rebuild
from course_lib.instructor.grade_report import check_scores
from course_lib.instructor.nbio import dumps, load_json_notebook, notebook_paths
from course_lib.instructor.protocol import EXPERIMENT_TAG, is_experiment_cell, set_tag
from course_lib.instructor.release import release_notebook

ROOT = Path(__file__).resolve().parents[1]


def names(source: str) -> tuple[set, set, set]:
    found = cell_names(source)
    return set(found.binds), set(found.reads), set(found.deferred)


# --------------------------------------------------------------------------- cell_names


def test_binds_and_reads_follow_the_order_of_statements():
    assert names("x = y + 1\nz = x") == ({"x", "z"}, {"y"}, set())
    assert names("model = model.to('cpu')") == ({"model"}, {"model"}, set())  # reads the old one
    assert names("import torch.nn as nn, math\nfrom a.b import c as d") == (
        {"nn", "math", "d"}, set(), set())
    assert names("for i in items:\n    total += i") == ({"i", "total"}, {"items", "total"}, set())
    assert names("with open(p) as fh:\n    data = fh.read()") == ({"fh", "data"}, {"open", "p"},
                                                                set())
    assert names("try:\n    import x\nexcept ImportError as e:\n    x = e") == (
        {"x", "e"}, {"ImportError"}, set())
    assert names("cfg.lr = 0.1\nrows[0] = 1") == (set(), {"cfg", "rows"}, set())
    assert names("del old") == ({"old"}, set(), set())


def test_function_bodies_are_deferred_and_their_locals_are_not_globals():
    binds, reads, deferred = names(
        "def f(a, b=DEFAULT):\n"
        "    local = a + b\n"
        "    return helper(local) + CONST\n"
        "g = lambda q: q * SCALE\n")
    assert binds == {"f", "g"}
    assert reads == {"DEFAULT"}  # a default value is evaluated at once
    assert deferred == {"helper", "CONST", "SCALE"}
    # a function reading a global the same cell defines needs no other cell
    assert names("def f():\n    return LIMIT\nLIMIT = 3")[2] == set()


def test_comprehensions_and_class_bodies_run_at_once():
    assert names("squares = [x * k for x in data]") == ({"squares"}, {"data", "k"}, set())
    binds, reads, deferred = names(
        "class Net(Base):\n    width = WIDTH\n    def forward(self, x):\n        return act(x)")
    assert (binds, reads, deferred) == ({"Net"}, {"Base", "WIDTH"}, {"act"})
    assert names("def setup():\n    global STATE\n    STATE = 1")[0] == {"setup", "STATE"}


def test_ipython_syntax_star_imports_and_broken_cells():
    assert names("%matplotlib inline\nx = 1")[0] == {"x"}
    assert cell_names("from math import *").star
    assert names("def f(:\n    pass") == (set(), set(), set())  # IPython runs none of it


# --------------------------------------------------------------------------- the plan


def course_cells(*sources, tags=()):
    """A notebook's cells: each source a code cell; ("fill", src) a fill-in, ("check", src) a
    check; cells whose index is in ``tags`` are tagged as experiments."""
    cells = []
    for n, src in enumerate(sources):
        if isinstance(src, tuple) and src[0] == "fill":
            cell = solution(f"### BEGIN SOLUTION\n{src[1]}\n### END SOLUTION", f"nb09_fill{n}")
        elif isinstance(src, tuple):
            cell = check(src[1] + f'\nprint("CHECK nb09_check{n}: PASS")', f"nb09_check{n}")
        else:
            cell = code(src)
        if n in tags:
            set_tag(cell, EXPERIMENT_TAG, True)
        cells.append(cell)
    return cells


def test_tagged_cells_are_left_out_and_full_runs_everything():
    cells = course_cells("import math", "sweep = [1, 2]", ("fill", "def f(x):\n    return x"),
                         ("check", "assert f(1) == 1"), "plot(sweep)", tags={1, 4})
    plan = grading_plan(cells)
    assert plan.run == (0, 2, 3) and plan.skipped == (1, 4) and plan.needed == ()
    assert grading_plan(cells, full=True).run == (0, 1, 2, 3, 4)
    assert "experiment cells left out: 1, 4" in plan.describe()


def test_an_experiment_cell_a_running_cell_needs_runs():
    # the fill-in (as a student wrote it) reads OFFSET, which experiment cell 1 defines
    cells = course_cells("import math", "OFFSET = 100", "unused = 1",
                         ("fill", "def f(x):\n    return x + OFFSET"),
                         ("check", "assert f(1) == 101"), tags={1, 2})
    plan = grading_plan(cells)
    assert plan.run == (0, 1, 3, 4) and plan.skipped == (2,)
    assert [(n.cell, n.name, n.reader) for n in plan.needed] == [(1, "OFFSET", 3)]


def test_a_function_reads_globals_where_it_is_called():
    # the check calls f after experiment cell 3 re-defined SCALE: under --full f sees 10
    cells = course_cells("SCALE = 1", ("fill", "def f(x):\n    return x * SCALE"),
                         ("check", "assert f(1) == 1"), "SCALE = 10", ("check", "f(2)"),
                         tags={3})
    plan = grading_plan(cells)
    assert 3 in plan.run and [(n.cell, n.name) for n in plan.needed] == [(3, "SCALE")]


def test_experiment_cells_is_the_closure_of_what_the_checks_need():
    cells = course_cells("import math", "N = 4", "M = N * 2", "fig = M", "print(fig)",
                         ("fill", "def f():\n    return M"), ("check", "assert f() == 8"))
    assert experiment_cells(cells) == [3, 4]  # M (and so N) are needed, the figure is not
    nb = notebook(cells)
    assert mark_experiments(nb) == [3, 4]
    assert [is_experiment_cell(c) for c in nb["cells"]] == [False] * 3 + [True] * 2 + [False] * 2
    assert plan_problems(nb, "09_x.ipynb") == []
    again = json.loads(dumps(nb))
    mark_experiments(again)
    assert dumps(again) == dumps(nb)  # idempotent


def test_set_tag_leaves_other_metadata_as_it_was():
    cell = code("x = 1")
    cell["metadata"] = {"tags": ["keep"]}
    set_tag(cell, EXPERIMENT_TAG, True)
    set_tag(cell, EXPERIMENT_TAG, True)
    assert cell["metadata"]["tags"] == ["keep", EXPERIMENT_TAG]
    set_tag(cell, EXPERIMENT_TAG, False)
    assert cell["metadata"] == {"tags": ["keep"]}
    plain = code("y = 2")
    set_tag(plain, EXPERIMENT_TAG, True)
    set_tag(plain, EXPERIMENT_TAG, False)
    assert plain["metadata"] == {}


# --------------------------------------------------------------------------- release check


def test_release_rejects_a_cell_that_needs_an_experiment_naming_cell_and_name(tmp_path, capsys):
    cells = course_cells("import math", "TABLE = {1: 2}", ("fill", "def f(x):\n    return x"),
                         ("check", "assert f(TABLE[1]) == 2"), tags={1})
    write(notebook([md("# 09"), *cells]), tmp_path / "solutions" / "09_plan.ipynb")
    rc = main(["release", "--check", "--solutions", str(tmp_path / "solutions"),
               "--notebooks", str(tmp_path / "notebooks")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "09_plan.ipynb, cell 4 (grade_id 'nb09_check3'): reads `TABLE`, which experiment " \
           "cell 2 (tagged 'course-experiment') defines" in err
    assert "remove the tag from cell 2" in err


def test_release_rejects_tags_on_cells_that_always_run():
    cells = course_cells("import math", ("fill", "def f(x):\n    return x"),
                         ("check", "assert f(1) == 1"), tags={0, 1})
    problems = [str(p) for p in plan_problems(notebook(cells), "09_x.ipynb")]
    assert any("cell 0: tagged 'course-experiment', but the set-up cell" in p for p in problems)
    assert any("cell 1: tagged 'course-experiment', but fill-in and check cells" in p
               for p in problems)


def test_release_removes_the_tag_from_student_notebooks():
    cells = course_cells("import math", "plot = 1", ("fill", "def f(x):\n    return x"),
                         ("check", "assert f(1) == 1"), tags={1})
    student, problems = release_notebook(notebook(cells), "09_x.ipynb")
    assert problems == []
    assert not any(is_experiment_cell(c) for c in student["cells"])
    assert student["cells"][1]["metadata"] == {}


def test_the_course_tags_are_safe():
    """Every solution notebook passes the plan check (also part of `course release --check`)."""
    for path in notebook_paths(ROOT / "solutions"):
        assert plan_problems(load_json_notebook(path), path.name) == []


def test_course_plan_mark_rewrites_tags_only(tmp_path, capsys):
    target = tmp_path / "00_welcome.ipynb"
    shutil.copy(ROOT / "solutions" / "00_welcome.ipynb", target)
    before = load_json_notebook(target)
    assert main(["plan", "--mark", str(target)]) == 0
    after = load_json_notebook(target)
    out = capsys.readouterr().out
    assert f"{target}: grading runs" in out
    for old, new in zip(before["cells"], after["cells"]):
        old_meta = {k: v for k, v in old["metadata"].items() if k != "tags"}
        assert {k: v for k, v in new["metadata"].items() if k != "tags"} == old_meta
        assert {k: v for k, v in old.items() if k != "metadata"} == \
            {k: v for k, v in new.items() if k != "metadata"}
    marked = [i for i, c in enumerate(after["cells"]) if is_experiment_cell(c)]
    assert marked == experiment_cells(after["cells"]) and marked  # 00 has experiment cells


# --------------------------------------------------------------------------- graded: fast = full

ADD = "def add(x, y):\n    \"\"\"x + y.\"\"\"\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION"
ADD_CHECK = '"""Checks add."""\nassert add(2, 3) == 5, f"add(2, 3) returned {add(2, 3)!r}"\n' \
            'print("CHECK nb09_add: PASS")'
TWICE = "def twice(x):\n    \"\"\"2 x.\"\"\"\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"
TWICE_CHECK = '"""Checks twice."""\nassert twice(4) == 8, f"twice(4) returned {twice(4)!r}"\n' \
              'print("CHECK nb09_twice: PASS")'


def plan_course(root: Path) -> Path:
    cells = [md("# 09 · Plan"), code("import math"), code("OFFSET = 100"),
             solution(ADD, "nb09_add_impl"), check(ADD_CHECK, "nb09_add"),
             code("raise RuntimeError('the experiment cell ran')"),
             solution(TWICE, "nb09_twice_impl"), check(TWICE_CHECK, "nb09_twice")]
    for index in (2, 5):
        set_tag(cells[index], EXPERIMENT_TAG, True)
    nb = notebook(cells)
    for index, gid in ((4, "nb09_add"), (7, "nb09_twice")):
        nb["cells"][index]["outputs"] = [{"name": "stdout", "output_type": "stream",
                                          "text": f"CHECK {gid}: PASS\n"}]
        nb["cells"][index]["execution_count"] = index
    write(nb, root / "solutions" / "09_plan.ipynb")
    shutil.copy(ROOT / "nbval_sanitize.cfg", root / "nbval_sanitize.cfg")
    return root / "solutions"


STUDENTS = {
    "correct": {"nb09_add_impl": "def add(x, y):\n    return x + y",
                "nb09_twice_impl": "def twice(x):\n    return x * 2"},
    "empty": {},
    # reads OFFSET, defined only in an experiment cell: that cell runs for this student
    "uses_offset": {"nb09_add_impl": "def add(x, y):\n    return x + y + OFFSET - 100"},
    "wrong": {"nb09_add_impl": "def add(x, y):\n    return x - y",
              "nb09_twice_impl": "def twice(x):\n    return x"},
}


@pytest.fixture(scope="module")
def fast_and_full(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    solutions = plan_course(root)
    sol = json.loads((solutions / "09_plan.ipynb").read_text(encoding="utf-8"))
    for student, fills in STUDENTS.items():
        path = root / "subs" / student / "09_plan.ipynb"
        path.parent.mkdir(parents=True)
        path.write_text(dumps(student_notebook(sol, "09_plan.ipynb", fills)), encoding="utf-8")
    books = {}
    for mode in ("fast", "full"):
        out = root / mode
        argv = ["grade", str(root / "subs"), "--out", str(out), "--solutions", str(solutions),
                "--jobs", "2", "--timeout", "60"] + (["--full"] if mode == "full" else [])
        assert main(argv) == 0
        books[mode] = (json.loads((out / "gradebook.json").read_text(encoding="utf-8")), out)
    return root, books



def test_fast_mode_gives_the_scores_of_full_mode(fast_and_full):
    _, books = fast_and_full
    fast, full = books["fast"][0], books["full"][0]
    assert check_scores(fast) == check_scores(full)
    assert fast["settings"]["mode"] == "fast" and full["settings"]["mode"] == "full"
    got = {s: row["total"] for s, row in fast["students"].items()}
    assert got == {"correct": 2, "empty": 0, "uses_offset": 1, "wrong": 0}


def test_fast_mode_leaves_out_the_experiment_cells(fast_and_full):
    _, books = fast_and_full
    (fast, fast_out), (full, _) = books["fast"], books["full"]
    ran = "the experiment cell ran"
    for student in STUDENTS:
        assert not any(ran in e for e in fast["students"][student]["notebooks"]["09_plan"]
                       ["cell_errors"])
        assert any(ran in e for e in full["students"][student]["notebooks"]["09_plan"]
                   ["cell_errors"])
    log = (fast_out / "logs" / "correct" / "09_plan.log").read_text(encoding="utf-8")
    assert "cells: runs 5 of 7 code cells (experiment cells left out: 2, 5)" in log
    log = (fast_out / "logs" / "uses_offset" / "09_plan.log").read_text(encoding="utf-8")
    assert "(experiment cells left out: 5)" in log


def test_rebuild_leaves_out_only_the_planned_cells(tmp_path):
    solutions = plan_course(tmp_path)
    sol = load_solutions(solutions)[0]
    submission, _ = release_notebook(sol.nb, sol.filename)
    rebuilt = rebuild(sol, submission)
    kept = [c["metadata"].get("course_grade", {}).get("index") for c in rebuilt.nb["cells"]]
    assert kept == [None, 1, 3, 4, 6, 7]  # the markdown title, then the code cells that run
    assert len(rebuild(sol, submission, full=True).nb["cells"]) == len(sol.nb["cells"])
