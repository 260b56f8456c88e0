"""The rank-vs-savings dashboard of notebook 01: static figure and interactive controls."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from course_lib.widgets.dashboard import Dashboard  # noqa: E402
from course_lib.widgets.lora import PRESETS, draw_rank_savings, rank_savings_dashboard  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def marked_point(fig, axis: int) -> tuple[float, float]:
    """The (r, value) of the orange marker on one of the two axes."""
    line = [ln for ln in fig.axes[axis].lines if ln.get_marker() == "o"][0]
    return float(line.get_xdata()[0]), float(line.get_ydata()[0])


def test_static_figure_has_titles_labels_and_log_scales(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Agg's "cannot show" from plt.show()
        fig = rank_savings_dashboard(interactive=False)
    out = capsys.readouterr().out
    assert out.strip() == (
        "d=4096, k=4096, r=8: 65,536 LoRA params vs 16,777,216 full (256.0x fewer, "
        "0.39% of the weight)"
    )
    assert "LLaMA-7B attention" in fig._suptitle.get_text()
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert ax.get_legend() is not None
    assert "count" in fig.axes[0].get_ylabel() and "rank r" in fig.axes[0].get_xlabel()
    assert marked_point(fig, 0) == (8, 65_536)
    assert marked_point(fig, 1) == (8, 256.0)


def test_drawn_curves_follow_the_formulas():
    fig = plt.figure()
    summary = draw_rank_savings(fig, d=4096, k=11008, r=16)
    assert "d=4096, k=11008, r=16: 241,664 LoRA params" in summary and "186.6x fewer" in summary
    curve = fig.axes[0].lines[0]
    ranks, params = curve.get_xdata(), curve.get_ydata()
    assert ranks[0] == 1 and ranks[-1] >= 4096
    assert list(params[:3]) == [r * (4096 + 11008) for r in ranks[:3]]
    savings = fig.axes[1].lines[0].get_ydata()
    assert savings[0] == pytest.approx(4096 * 11008 / 15104)


def test_rank_above_min_dimension_is_flagged():
    fig = plt.figure()
    assert draw_rank_savings(fig, d=128, k=128, r=256).endswith("(r > min(d, k): no saving)")


def test_interactive_sliders_change_summary_and_plot():
    board = rank_savings_dashboard(interactive=True)
    assert isinstance(board, Dashboard)
    assert set(board.controls) == {"preset", "d", "k", "r"}
    assert "r=8: 65,536 LoRA params" in board.summary.value
    figures = []
    draw = board.draw

    def capture(fig, **values):
        figures.append(fig)
        return draw(fig, **values)

    board.draw = capture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        board.controls["r"].value = 64
        assert "r=64: 524,288 LoRA params" in board.summary.value
        assert "32.0x fewer" in board.summary.value
        assert marked_point(figures[-1], 1) == (64, 32.0)
        board.controls["preset"].value = "LLaMA-7B MLP down_proj (4096 x 11008)"
    assert (board.controls["d"].value, board.controls["k"].value) == (4096, 11008)
    assert "d=4096, k=11008, r=64" in board.summary.value
    assert marked_point(figures[-1], 0) == (64, 64 * (4096 + 11008))
    assert "LLaMA-7B MLP down_proj" in figures[-1]._suptitle.get_text()


def test_presets_are_real_shapes_within_the_slider_range():
    assert PRESETS["LLaMA-7B attention q/k/v/o_proj (4096 x 4096)"] == (4096, 4096)
    assert (4096, 11008) in PRESETS.values()
    for d, k in PRESETS.values():
        assert 64 <= d <= 16384 and 64 <= k <= 16384 and d % 64 == 0 and k % 64 == 0


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"r": 0}, ValueError, "^r must be a positive int"),
    ({"r": 8.0}, TypeError, "^r must be a positive int"),
    ({"d": 10}, ValueError, r"^d must be an int in \[64, 16384\]"),
    ({"k": 20000}, ValueError, r"^k must be an int in \[64, 16384\]"),
    ({"r": 1000}, ValueError, r"^r must be an int in \[1, 512\]"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        rank_savings_dashboard(interactive=False, **kwargs)
