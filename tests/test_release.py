"""Tests of `course release`: the student notebooks generated from solutions/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from course_lib.cli import main
from course_lib.instructor.authoring import answer, check, code, md, notebook, solution, write
from course_lib.instructor.protocol import ProtocolError
from course_lib.instructor.release import build_release, release

ROOT = Path(__file__).resolve().parents[1]

FILL = '''class Thing:
    def method(self, x):
        """Docstring stays."""
        y = 1
        ### BEGIN SOLUTION
        secret_value = x * 42
        return secret_value + y
        ### END SOLUTION

def other():
    ### BEGIN SOLUTION
    return "second secret"
    ### END SOLUTION'''

CHECK = '''"""Checks Thing."""
assert Thing().method(1) == 43
### BEGIN HIDDEN TESTS
assert Thing().method(2) == 85  # hidden assert
### END HIDDEN TESTS
print("CHECK nb01_thing: PASS")'''


def good_notebook() -> dict:
    nb = notebook([
        md("# Title"),
        code("import math\nprint(math.pi)"),
        solution(FILL, "nb01_thing_impl"),
        check(CHECK, "nb01_thing", points=2),
        answer("Question?\n<!-- BEGIN SOLUTION -->\nThe answer is 42.\n<!-- END SOLUTION -->",
               "nb01_answer"),
    ])
    # pretend it was executed: outputs, counts and nbclient timing metadata
    for n, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            cell["execution_count"] = n
            cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": "out\n"}]
            cell["metadata"]["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00"}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.7"}
    return nb


def make_course(tmp_path: Path, notebooks: dict[str, dict]) -> tuple[Path, Path]:
    sol, stu = tmp_path / "solutions", tmp_path / "notebooks"
    for name, nb in notebooks.items():
        write(nb, sol / name)
    return sol, stu


def cells_of(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def test_solution_blocks_become_stubs_with_indentation(tmp_path):
    sol, stu = make_course(tmp_path, {"01_demo.ipynb": good_notebook()})
    release(sol, stu)
    cell = cells_of(stu / "01_demo.ipynb")[2]
    lines = cell["source"].split("\n")
    assert "        y = 1" in lines  # code outside the block is kept
    assert '        """Docstring stays."""' in lines
    i = lines.index("        # YOUR CODE HERE")
    assert lines[i + 1].startswith("        raise NotImplementedError(")
    j = lines.index("    # YOUR CODE HERE")  # second block, shallower indentation
    assert lines[j + 1].startswith("    raise NotImplementedError(")
    assert "nb01_thing_impl" in lines[i + 1]
    compile(cell["source"], "<cell>", "exec")  # the stub is valid Python


def test_no_solution_text_or_hidden_tests_leak(tmp_path):
    sol, stu = make_course(tmp_path, {"01_demo.ipynb": good_notebook()})
    release(sol, stu)
    text = (stu / "01_demo.ipynb").read_text(encoding="utf-8")
    for secret in ("secret_value", "second secret", "The answer is 42", "hidden assert",
                   "BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS"):
        assert secret not in text
    cells = cells_of(stu / "01_demo.ipynb")
    assert cells[3]["source"].split("\n") == [
        '"""Checks Thing."""', "assert Thing().method(1) == 43", 'print("CHECK nb01_thing: PASS")'
    ]
    assert "YOUR ANSWER HERE" in cells[4]["source"]
    assert cells[4]["source"].startswith("Question?\n")


def test_outputs_cleared_and_cells_locked(tmp_path):
    sol, stu = make_course(tmp_path, {"01_demo.ipynb": good_notebook()})
    release(sol, stu)
    nb = json.loads((stu / "01_demo.ipynb").read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "version" not in nb["metadata"]["language_info"]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            assert "execution" not in cell["metadata"]
    check_cell = nb["cells"][3]
    assert check_cell["metadata"]["editable"] is False
    assert check_cell["metadata"]["deletable"] is False
    assert check_cell["metadata"]["nbgrader"]["points"] == 2
    assert "editable" not in nb["cells"][2]["metadata"]  # fill-ins stay editable


def test_release_is_byte_identical_and_idempotent(tmp_path):
    sol, stu = make_course(tmp_path, {"01_demo.ipynb": good_notebook(), "02_x.ipynb": good_notebook()})
    first = release(sol, stu)
    assert sorted(p.name for p in first.written) == ["01_demo.ipynb", "02_x.ipynb"]
    before = {p.name: p.read_bytes() for p in stu.iterdir()}
    second = release(sol, stu)
    assert second.written == [] and len(second.unchanged) == 2
    assert {p.name: p.read_bytes() for p in stu.iterdir()} == before
    other = tmp_path / "other"
    release(sol, other)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_check_names_stale_missing_and_extra(tmp_path, capsys):
    sol, stu = make_course(tmp_path, {"01_demo.ipynb": good_notebook(), "02_x.ipynb": good_notebook()})
    release(sol, stu)
    assert main(["release", "--check", "--solutions", str(sol), "--notebooks", str(stu)]) == 0
    (stu / "01_demo.ipynb").write_text("{}", encoding="utf-8")
    (stu / "02_x.ipynb").unlink()
    (stu / "99_extra.ipynb").write_text("{}", encoding="utf-8")
    capsys.readouterr()
    assert main(["release", "--check", "--solutions", str(sol), "--notebooks", str(stu)]) == 1
    err = capsys.readouterr().err
    assert "stale: " in err and "01_demo.ipynb" in err
    assert "missing: " in err and "02_x.ipynb" in err
    assert "extra: " in err and "99_extra.ipynb" in err
    # --check writes nothing
    assert (stu / "01_demo.ipynb").read_text(encoding="utf-8") == "{}"
    assert not (stu / "02_x.ipynb").exists()


def test_release_never_deletes_extra_notebooks(tmp_path, capsys):
    sol, stu = make_course(tmp_path, {"01_demo.ipynb": good_notebook()})
    stu.mkdir()
    (stu / "07_mine.ipynb").write_text("student work", encoding="utf-8")
    assert main(["release", "--solutions", str(sol), "--notebooks", str(stu)]) == 0
    assert (stu / "07_mine.ipynb").read_text(encoding="utf-8") == "student work"
    assert "07_mine.ipynb has no solution notebook" in capsys.readouterr().err


def _broken(source: str, meta_cell=solution) -> dict:
    return notebook([md("# t"), meta_cell(source, "nb09_bad")])


@pytest.mark.parametrize(
    ("nb", "message"),
    [
        (_broken("x = 1\n### BEGIN SOLUTION\ny = 2"), "has no matching '### END SOLUTION'"),
        (_broken("### END SOLUTION\nx = 1"), "without a matching '### BEGIN SOLUTION'"),
        (_broken("### BEGIN SOLUTION\n### BEGIN SOLUTION\nx=1\n### END SOLUTION"), "nested"),
        (notebook([code("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")]),
         "solution block outside a solution cell"),
        (notebook([md("<!-- BEGIN SOLUTION -->\nx\n<!-- END SOLUTION -->")]),
         "solution block outside a solution cell"),
        (notebook([solution("### BEGIN SOLUTION\nx=1\n### END SOLUTION", "dup"),
                   check("print(1)", "dup")]), "duplicate grade_id"),
        (notebook([code("### BEGIN HIDDEN TESTS\nx=1\n### END HIDDEN TESTS")]),
         "hidden-test block outside a check cell"),
        (notebook([check("### BEGIN HIDDEN TESTS\nassert 1", "nb09_c")]),
         "has no matching '### END HIDDEN TESTS'"),
        (_broken("x = 1"), "solution cell has no '### BEGIN SOLUTION'"),
        (_broken("no markers", answer), "markdown answer cell has no '<!-- BEGIN SOLUTION -->'"),
    ],
)
def test_malformed_markers_are_errors_and_nothing_is_written(tmp_path, nb, message, capsys):
    sol, stu = make_course(tmp_path, {"01_good.ipynb": good_notebook(), "09_bad.ipynb": nb})
    with pytest.raises(ProtocolError) as info:
        build_release(sol)
    text = str(info.value)
    assert message in text
    assert "09_bad.ipynb" in text and ", cell " in text
    assert "01_good.ipynb" not in text
    assert main(["release", "--solutions", str(sol), "--notebooks", str(stu)]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert not stu.exists()  # not even the valid notebook


def test_error_names_grade_id_and_cell_index(tmp_path):
    nb = notebook([md("a"), md("b"), solution("### BEGIN SOLUTION\nx = 1", "nb03_named")])
    sol, _ = make_course(tmp_path, {"03_q.ipynb": nb})
    with pytest.raises(ProtocolError) as info:
        build_release(sol)
    (problem,) = info.value.problems
    assert problem.cell == 2 and problem.grade_id == "nb03_named"
    assert "cell 2 (grade_id 'nb03_named')" in str(problem)


def test_unreadable_notebook_is_reported(tmp_path):
    sol = tmp_path / "solutions"
    sol.mkdir()
    (sol / "01_broken.ipynb").write_text("{not json", encoding="utf-8")
    with pytest.raises(ProtocolError, match="01_broken.ipynb: cannot read notebook"):
        build_release(sol)


def test_missing_solutions_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["release", "--solutions", str(tmp_path / "nope"),
                 "--notebooks", str(tmp_path / "nb")]) == 2
    assert "solutions directory not found" in capsys.readouterr().err


def test_course_release_is_up_to_date():
    report = release(ROOT / "solutions", ROOT / "notebooks", check=True)
    assert report.clean, f"run `course release`: stale={report.stale} missing={report.missing}"
    assert len(report.unchanged) >= 1


def test_real_solutions_leak_nothing_into_student_notebooks():
    """No line of a solution block survives in the released cell of the same grade_id.

    (Prose may quote a formula on purpose, as a hint; the released fill-in cell itself must not.)
    """
    from course_lib.instructor.protocol import grade_id_of, source_of

    markers = {"### BEGIN SOLUTION": True, "<!-- BEGIN SOLUTION -->": True,
               "### END SOLUTION": False, "<!-- END SOLUTION -->": False}
    checked = 0
    for sol_path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        student_cells = {
            grade_id_of(c): source_of(c)
            for c in cells_of(ROOT / "notebooks" / sol_path.name) if grade_id_of(c)
        }
        for cell in cells_of(sol_path):
            gid = grade_id_of(cell)
            if gid is None:
                continue
            released = student_cells[gid]
            inside = False
            for line in source_of(cell).split("\n"):
                if line.strip() in markers:
                    inside = markers[line.strip()]
                elif inside and len(line.strip()) > 3 and not line.strip().startswith("#"):
                    checked += 1
                    assert line.strip() not in released, (
                        f"solution line leaked into notebooks/{sol_path.name} ({gid}): "
                        f"{line.strip()!r}"
                    )
    assert checked > 0


def test_run_fill_ins_runs_solution_or_stub(tmp_path):
    from notebook_fill_ins import run_fill_ins

    sol, _ = make_course(tmp_path, {"01_demo.ipynb": good_notebook()})
    ns = run_fill_ins(sol / "01_demo.ipynb", ["nb01_thing_impl"], {})
    assert ns["Thing"]().method(1) == 43 and ns["other"]() == "second secret"
    stub = run_fill_ins(sol / "01_demo.ipynb", ["nb01_thing_impl"], {}, released=True)
    with pytest.raises(NotImplementedError, match="Fill-in 'nb01_thing_impl' is not done yet"):
        stub["Thing"]().method(1)
    with pytest.raises(LookupError, match="no cell with grade_id 'nope'"):
        run_fill_ins(sol / "01_demo.ipynb", ["nope"], {})
