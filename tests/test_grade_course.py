"""Grading the real course the fast way gives the same gradebook: on a reference class (the demo
class plus generated partial, wrong and mixed students) and notebooks 00 and 01, the fast mode's
per-check scores equal --full's, and the class graded serially in two shards and merged
(`course gradebook merge`) equals one parallel run. Also: what the merge refuses.

The solution notebooks are copied and their experiment cells tagged by `course plan --mark`'s
rule (instructor/grade_plan.py), so the fast mode leaves cells out whatever the tags in
solutions/ are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from course_lib.cli import main
from course_lib.instructor.grade_demo import DEMO_STUDENTS, build_demo, write_class
from course_lib.instructor.grade_plan import mark_experiments
from course_lib.instructor.grade_rebuild import load_solutions
from course_lib.instructor.grade_report import check_scores
from course_lib.instructor.nbio import dumps, load_json_notebook

pytestmark = pytest.mark.slow  # about 4 minutes: it grades the class four times

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("00_welcome", "01_lora")
GENERATED = {"gen_partial_odd": "partial_odd", "gen_wrong": "wrong", "gen_mixed": "mixed"}
FILES = ("gradebook.csv", "gradebook.json")


def grade(subs: Path, out: Path, solutions: Path, *extra: str) -> dict:
    assert main(["grade", str(subs), "--out", str(out), "--solutions", str(solutions),
                 "--timeout", "300", *extra]) == 0
    return json.loads((out / "gradebook.json").read_text(encoding="utf-8"))


def same_files(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    feedback = sorted(p.name for p in (a / "feedback").iterdir())
    assert feedback == sorted(p.name for p in (b / "feedback").iterdir())
    for name in feedback:
        assert (a / "feedback" / name).read_bytes() == (b / "feedback" / name).read_bytes(), name


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    for name in NOTEBOOKS:
        nb = load_json_notebook(ROOT / "solutions" / f"{name}.ipynb")
        assert mark_experiments(nb)  # both notebooks have cells grading leaves out
        (root / "solutions").mkdir(exist_ok=True)
        (root / "solutions" / f"{name}.ipynb").write_text(dumps(nb), encoding="utf-8")
    shutil.copy(ROOT / "nbval_sanitize.cfg", root / "nbval_sanitize.cfg")
    solutions = load_solutions(root / "solutions")
    subs = build_demo(root / "demo", solutions)
    write_class(subs, solutions, GENERATED)
    fast = grade(subs, root / "fast", root / "solutions", "--jobs", "2")
    return {"root": root, "subs": subs, "fast": fast}



def test_the_reference_class_gets_the_expected_totals(course):
    totals = {s: row["total"] for s, row in course["fast"]["students"].items()}
    assert sorted(totals) == sorted([*DEMO_STUDENTS, *GENERATED])
    assert totals["demo_correct"] == 6 and totals["demo_empty"] == 0
    assert totals["demo_partial"] == 2  # 00: 1 of 2, 01: 1 of 4 (as in docs/GRADING.md)
    assert totals["gen_wrong"] == 0 and 0 < totals["gen_partial_odd"] < 6
    log = (course["root"] / "fast" / "logs" / "demo_correct" / "01_lora.log").read_text()
    assert "experiment cells left out: 3, 6," in log


def test_fast_mode_scores_equal_full_mode(course):
    full = grade(course["subs"], course["root"] / "full", course["root"] / "solutions",
                 "--jobs", "2", "--full")
    assert full["settings"]["mode"] == "full"
    assert check_scores(course["fast"]) == check_scores(full)


@pytest.fixture(scope="module")
def shards(course):
    """The class graded in two shards, each serially (--jobs 1)."""
    root = course["root"]
    for k in (1, 2):
        data = grade(course["subs"], root / f"shard{k}", root / "solutions", "--jobs", "1",
                     "--shard", f"{k}/2")
        assert data["shard"] == {"index": k, "count": 2,
                                 "class": sorted(course["fast"]["students"])}
    return [root / "shard1", root / "shard2"]


def test_serial_shards_merged_equal_one_parallel_run(course, shards, capsys):
    """Byte for byte: so a serial run gives what a parallel one gives, and shards merged what
    one run gives."""
    out = course["root"] / "merged"
    assert main(["gradebook", "merge", *map(str, shards), "--out", str(out)]) == 0
    assert "merged 2 shards, 6 students" in capsys.readouterr().out
    same_files(out, course["root"] / "fast")
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(course["fast"]["students"])


def _merge_error(capsys, *argv) -> str:
    assert main(["gradebook", "merge", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_merge_refuses_what_is_not_one_class_covered_once(course, shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert "shard(s) 2/2 missing" in _merge_error(capsys, shards[0], "--out", out)
    assert "is given more than once" in _merge_error(capsys, shards[0], shards[0], "--out", out)
    again = tmp_path / "again"
    shutil.copytree(shards[0], again)
    err = _merge_error(capsys, shards[0], again, "--out", out)
    assert "shard 1/2 again" in err and "is in" in err
    assert "not the gradebook of a shard" in _merge_error(
        capsys, shards[0], course["root"] / "fast", "--out", out)
    edited = tmp_path / "edited"
    shutil.copytree(shards[1], edited)
    data = json.loads((edited / "gradebook.json").read_text())
    data["settings"]["cell_timeout_s"] = 1
    (edited / "gradebook.json").write_text(json.dumps(data))
    assert "the settings differ" in _merge_error(capsys, shards[0], edited, "--out", out)
    data["settings"]["cell_timeout_s"] = 300
    moved = sorted(data["students"])[0]
    del data["students"][moved]
    (edited / "gradebook.json").write_text(json.dumps(data))
    err = _merge_error(capsys, shards[0], edited, "--out", out)
    assert "its students are not slice 2/2" in err and f"student(s) in no shard: {moved}" in err
    assert "is (inside) the shard" in _merge_error(capsys, *shards, "--out", shards[0])
    assert not out.exists()  # nothing written


def test_shard_option_errors(tmp_path, capsys):
    for argv, needle in [
        (["--shard", "3/2"], "argument --shard: expected K/N with whole numbers 1 <= K <= N"),
        (["--shard", "x"], "argument --shard: expected K/N"),
    ]:
        with pytest.raises(SystemExit):
            main(["grade", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["grade", "--demo", str(tmp_path / "d"), "--shard", "1/2"])
    assert "--shard needs SUBMISSIONS_DIR" in capsys.readouterr().err
