"""The course in JupyterLab in headless Chromium: fill-in stubs, run-all, widgets.

Run with ``make test-e2e`` (fails without a browser) or as part of ``make test`` (skipped, with
the reason, without one). A new widget notebook joins by adding a row to ``WIDGETS``;
``test_every_widget_notebook_is_in_the_table`` fails until it has one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from labdriver import E2EError, NotebookPage, WidgetCase, check_widget_reacts

from course_lib.instructor.protocol import grade_id_of, is_check_cell, is_solution_cell

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

# Student notebooks whose first fill-in is run in the browser without being filled in.
STUDENT_NOTEBOOKS = [
    "notebooks/00_welcome.ipynb",
    "notebooks/01_lora.ipynb",
]

# Solution notebooks without a widget that are run with Run All Cells (widget notebooks are
# run all by their widget test).
RUN_ALL = [
    "solutions/00_welcome.ipynb",
]

# One row per interactive course widget: its solution notebook and the slider the test moves
# (Run All Cells first, unless run_only names the cells to run).
WIDGETS: list[WidgetCase] = [
    WidgetCase("solutions/01_lora.ipynb", slider="rank r", summary_mentions="r={value}:"),
    # Run whole, 04's benchmarks took over 2 minutes in the browser on 2 cores, so 03, 04 and 05
    # run only the cells that import and show their widget (nbval runs them whole).
    WidgetCase("solutions/03_qlora.ipynb", slider="blocksize", summary_mentions="blocksize={value},",
               run_only=r"nf4_error_dashboard"),
    WidgetCase("solutions/04_flash_attention.ipynb", slider="batch B", summary_mentions="B={value},",
               run_only=r"attention_memory_dashboard"),
    WidgetCase("solutions/05_memory_compute_tradeoffs.ipynb", slider="LoRA rank r",
               run_only=r"budget_dashboard"),
]


def _cells(notebook: str) -> list[dict]:
    return json.loads((ROOT / notebook).read_text(encoding="utf-8"))["cells"]


def test_every_widget_notebook_is_in_the_table():
    """Every solution notebook that uses course_lib.widgets has a row in WIDGETS."""
    using = {
        f"solutions/{path.name}"
        for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
        if any(
            c["cell_type"] == "code" and "course_lib.widgets" in "".join(c["source"])
            for c in _cells(f"solutions/{path.name}")
        )
    }
    listed = {case.notebook for case in WIDGETS}
    missing = sorted(using - listed)
    assert not missing, (
        f"{missing} use course_lib.widgets but have no row in WIDGETS in {Path(__file__).name}: "
        "add WidgetCase(notebook, slider=<label of the slider to move>) so the browser test "
        "checks that the widget redraws"
    )
    gone = sorted(n for n in listed | set(STUDENT_NOTEBOOKS) | set(RUN_ALL)
                  if not (ROOT / n).exists())
    assert not gone, f"{gone} are listed in {Path(__file__).name} but do not exist"


@pytest.mark.parametrize("notebook", STUDENT_NOTEBOOKS)
def test_unfilled_fill_in_shows_not_implemented(open_notebook, notebook):
    """Running the student notebook top to bottom stops at the first fill-in with its message."""
    cells = _cells(notebook)
    fill_in = next(
        (i for i, c in enumerate(cells) if c["cell_type"] == "code" and is_solution_cell(c)), None
    )
    assert fill_in is not None, f"{notebook} has no fill-in cell"
    grade_id = grade_id_of(cells[fill_in])
    check = next((i for i in range(fill_in + 1, len(cells)) if is_check_cell(cells[i])), None)
    assert check is not None, f"{notebook}: no check cell after the fill-in {grade_id!r}"
    nb: NotebookPage = open_notebook(notebook)
    # the check cell says so in one line (course_lib.checks.core.call_student), without a
    # traceback; a fill-in whose stub runs at the top level raises the stub's own message
    messages = ("is not filled in yet", f"Fill-in '{grade_id}' is not done yet")
    for i in range(check + 1):
        if cells[i]["cell_type"] != "code":
            continue
        state = nb.run_cell(i)
        if state["stderr"]:
            error = "\n".join(state["stderr"])
            assert i in (fill_in, check), f"cell {i}, before the first fill-in, failed:\n{error}"
            assert any(m in error for m in messages), (
                f"cell {i} failed without the fill-in message {messages}:\n{error}"
            )
            nb.screenshot("fill-in-message", nb.cell_locator(i))
            return
    raise nb.fail(
        f"ran cells 0..{check} (fill-in {grade_id!r} at {fill_in}, its check at {check}) "
        "and none showed the fill-in message"
    )


@pytest.mark.parametrize("notebook", RUN_ALL)
def test_solution_runs_all(open_notebook, notebook):
    """Run All Cells on the solution notebook: every cell runs, checks print PASS, no errors."""
    nb = open_notebook(notebook)
    cells = nb.run_all()
    nb.screenshot("run-all")
    source = _cells(notebook)
    for i, c in enumerate(source):
        if c["cell_type"] == "code" and is_check_cell(c):
            expected = f"CHECK {grade_id_of(c)}: PASS"
            assert expected in cells[i]["text"], f"cell {i}: no {expected!r} in {cells[i]['text']!r}"


NEWS_SETTINGS = "@jupyterlab/apputils-extension:notification"
NEWS_TOAST = "Would you like to get notified about official Jupyter news?"
HEADING = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedMarkdown h1"


def test_chinese_renders_and_no_news_toast(open_notebook):
    """A student's first view: the Chinese heading is drawn with a real font (not boxes), and
    the course's JupyterLab settings keep the news toast away (make setup installs them)."""
    nb = open_notebook("notebooks/00_welcome.ipynb")
    glyphs = nb.glyphs(HEADING)
    nb.screenshot("chinese-heading", nb.page.locator(HEADING).first)
    assert glyphs["missing_identical"], (
        f"control failed: two code points no font has were drawn differently ({glyphs}), so "
        "this browser does not draw missing glyphs as one box and the check below means nothing"
    )
    assert glyphs["characters"], f"no Chinese characters in the heading {glyphs['text']!r}"
    assert glyphs["distinct"] and not glyphs["like_missing"], (
        f"Chinese characters {glyphs['like_missing'] or glyphs['characters']} of the heading "
        f"{glyphs['text']!r} are drawn as boxes in {glyphs['font']!r}: install a CJK font "
        "(Debian/Ubuntu: apt-get install fonts-noto-cjk)"
    )
    assert not nb.shows_text(NEWS_TOAST, timeout_ms=5_000), (
        "JupyterLab asked about official Jupyter news: the course's overrides "
        "(jupyter/lab/settings/overrides.d/course_lib.json) are not installed in the venv; "
        "run `make setup`"
    )


def test_news_toast_check_sees_the_toast(open_notebook, lab_server):
    """Control for the test above: with the user setting back at JupyterLab's own default
    ("ask"), the same check finds the toast."""
    lab_server.set_user_settings(NEWS_SETTINGS, {"fetchNews": "none"})
    try:
        nb = open_notebook("notebooks/00_welcome.ipynb")
        assert nb.shows_text(NEWS_TOAST, timeout_ms=30_000), "the news toast did not appear"
    finally:
        lab_server.set_user_settings(NEWS_SETTINGS, {})


@pytest.mark.parametrize("case", WIDGETS, ids=lambda c: c.id)
def test_widget_redraws_when_slider_moves(open_notebook, case):
    """Run the solution notebook (all, or the row's cells); its widget shows sliders + figure
    and redraws, with the slider's new value in its summary line."""
    to_run = case.cells_to_run(_cells(case.notebook))
    nb = open_notebook(case.notebook)
    if to_run is None:
        nb.run_all()
    else:
        nb.run_cells(to_run)
    nb.screenshot("ran")
    check_widget_reacts(nb, case)


BROKEN_WIDGETS = r'''
import ipywidgets as W
from course_lib.widgets.dashboard import dashboard


def draw(fig, rank):
    ax = fig.add_subplot()
    ax.bar(range(1, rank + 1), [2**i for i in range(rank)])
    ax.set_title(f"rank {rank}")
    ax.set_xlabel("index")
    ax.set_ylabel("value")
    return f"rank={rank}: total {2**rank - 1}"


def make(title):
    controls = lambda: {"rank": W.IntSlider(value=3, min=1, max=8, description="rank r")}
    return dashboard(draw, controls, {"rank": 3}, title, interactive=True, figsize=(4, 2.5))
'''

UNWIRED = '''
unwired = make("unwired dashboard")
for control in unwired.controls.values():
    control.unobserve(unwired._on_change, names="value")  # the slider no longer redraws
unwired
'''

STALE = '''
stale = make("stale-figure dashboard")


def summary_only():  # updates the summary line but leaves the old figure in place
    stale.summary.value = f"<code>rank={stale.values()['rank']} (figure not redrawn)</code>"


stale.redraw = summary_only
stale
'''


def test_widget_check_catches_broken_wiring(open_notebook, course_copy):
    """The widget check passes on a working dashboard and fails on two broken ones."""
    cells = [BROKEN_WIDGETS, 'make("working dashboard")', UNWIRED, STALE]
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(src.strip()) for src in cells],
        metadata={"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                 "name": "python3"}},
    )
    (course_copy / "e2e").mkdir(exist_ok=True)
    nbformat.write(notebook, course_copy / "e2e" / "broken_widgets.ipynb")
    nb = open_notebook("e2e/broken_widgets.ipynb")
    nb.run_all()

    def case(title):
        return WidgetCase("e2e/broken_widgets.ipynb", slider="rank", title=title,
                          summary_mentions="rank={value}:")

    check_widget_reacts(nb, case("working dashboard"), change_ms=15_000)
    with pytest.raises(E2EError, match="summary line to change"):
        check_widget_reacts(nb, case("unwired dashboard"), change_ms=5_000)
    with pytest.raises(E2EError, match="figure to be redrawn"):
        check_widget_reacts(nb, case("stale-figure dashboard"), change_ms=5_000)


# Issue 14, "the hint first": the unfilled check's output at a laptop-sized window.
SMALL_VIEWPORT = {"width": 1280, "height": 800}
HINT_FIRST = ["notebooks/01_lora.ipynb", "notebooks/04_flash_attention.ipynb"]
TRACEBACK_MARKS = ("Traceback", "course_lib/", 'File "')


@pytest.mark.parametrize("notebook", HINT_FIRST)
def test_unfilled_check_shows_the_hint_first(open_notebook, notebook):
    """Run the student notebook up to the first check cell whose fill-in is unfilled: its
    output shows the check's "not passed yet" title and the "fill in ... above, then run this
    cell again" line (and the Hint, where there is one) inside a 1280x800 window without
    scrolling, and no traceback lines."""
    cells = _cells(notebook)
    fill_in = next(i for i, c in enumerate(cells) if c["cell_type"] == "code"
                   and is_solution_cell(c))
    check = next(i for i in range(fill_in + 1, len(cells)) if is_check_cell(cells[i]))
    check_id = grade_id_of(cells[check])
    nb: NotebookPage = open_notebook(notebook, viewport=SMALL_VIEWPORT)
    for i in range(check):
        if cells[i]["cell_type"] == "code":
            state = nb.run_cell(i)
            if state["stderr"]:
                raise nb.fail(f"cell {i}, before the check cell {check}, failed:\n"
                              + "\n".join(state["stderr"]))
    problems = _hint_first_problems(nb, check, check_id, "hint-first")
    assert not problems, "\n".join(problems)


def _hint_first_problems(nb: NotebookPage, check: int, check_id: str, label: str) -> list[str]:
    """Run check cell ``check`` with it at the top of the view; what keeps its failing output
    from showing the title, the fill-in line and the hint at once, without traceback lines."""
    nb.scroll_to_top_of_view(check)  # where a student running the cells has the check cell
    state = nb.run_cell(check)
    nb.screenshot(label)
    if not state["stderr"]:
        return [f"the check cell {check} ({check_id}) did not fail: {state['text']!r}"]
    text = "\n".join(state["stderr"])
    title = f"CHECK {check_id}: not passed yet" if f"CHECK {check_id}:" in text else (
        "Check not passed yet")
    if title not in text:
        return [f"no 'not passed yet' title in the failing output:\n{text}"]
    line = re.search(r"fill in \S+ above, then run this cell again", text)
    if not line:
        return [f"no 'fill in ... above, then run this cell again' line in:\n{text}"]
    needles = [title, line.group(0)] + (["Hint:"] if "Hint:" in text else [])
    found = nb.output_text_positions(check, needles)
    view, problems = found["view"], []
    for needle in needles:
        box = found["rects"][needle]
        if box is None:
            problems.append(f"{needle!r} is not drawn in the output of cell {check}")
        elif not (box["top"] >= view["top"] and box["bottom"] <= view["bottom"]
                  and box["left"] >= view["left"] and box["right"] <= view["right"]):
            problems.append(f"{needle!r} is drawn at {box}, outside the part of the notebook "
                            f"visible without scrolling {view} ({nb.page.viewport_size})")
    marks = [m for m in TRACEBACK_MARKS if m in found["text"]]
    if marks:
        problems.append(f"the failing output shows traceback lines ({marks}):\n"
                        f"{found['text'][:2000]}")
    return problems


CHAINED = """
def lora_trainable_params(layer_shapes, r):
    raise NotImplementedError("Fill-in 'x_impl' is not done yet")


def check(fn):  # the old way: a chained traceback, the friendly line at its end
    try:
        fn([(4, 4)] * 40, 2)
    except NotImplementedError as exc:
        def deep(n):
            if n == 0:
                raise AssertionError(
                    "CHECK x: not passed yet\\nlora_trainable_params is not filled in yet: fill "
                    "in lora_trainable_params above, then run this cell again.") from exc
            deep(n - 1)
        deep(30)


check(lora_trainable_params)
"""


def test_hint_first_check_sees_a_traceback_below_the_fold(open_notebook, course_copy):
    """Control for the test above: a chained 30-frame traceback whose friendly line comes last
    fails it, for the traceback lines and for the line below the fold."""
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(CHAINED.strip())],
        metadata={"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                 "name": "python3"}},
    )
    (course_copy / "e2e").mkdir(exist_ok=True)
    nbformat.write(notebook, course_copy / "e2e" / "chained_traceback.ipynb")
    nb = open_notebook("e2e/chained_traceback.ipynb", viewport=SMALL_VIEWPORT)
    problems = _hint_first_problems(nb, 0, "x", "chained-traceback")
    assert any("traceback lines" in p for p in problems), problems
    assert any("outside the part of the notebook" in p for p in problems), problems
