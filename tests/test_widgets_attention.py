"""The attention-memory dashboard of notebook 04: static figure and interactive controls."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from course_lib.utils.flash_attention import attention_memory_bytes  # noqa: E402
from course_lib.utils.units import GB  # noqa: E402
from course_lib.widgets.attention import (  # noqa: E402
    GPUS,
    PRESETS,
    attention_memory_dashboard,
    draw_attention_memory,
)
from course_lib.widgets.dashboard import Dashboard  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_static_figure_has_titles_labels_and_log_scales(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Agg's "cannot show" from plt.show()
        fig = attention_memory_dashboard(interactive=False)
    out = capsys.readouterr().out
    assert out.strip() == (
        "B=1, H=32, d=128, 2-byte dtype, N=65,536: naive 552 GB vs flash 2.16 GB "
        "(256x less); naive exceeds 80 GB from N=24,873"
    )
    assert "LLaMA-7B" in fig._suptitle.get_text()
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "GB = 10^9 bytes" in fig.axes[0].get_ylabel() and "tokens" in fig.axes[0].get_xlabel()
    assert fig.axes[0].get_legend() is not None


def test_curves_follow_the_memory_model():
    fig = plt.figure()
    draw_attention_memory(fig, batch=2, heads=8, head_dim=64, dtype_bytes=4, max_seq_len=4096)
    naive, flash = fig.axes[0].lines[0], fig.axes[0].lines[1]
    n = naive.get_xdata()
    assert n[0] == 256 and n[-1] == 4096
    for i in (0, len(n) // 2, len(n) - 1):
        mem = attention_memory_bytes(int(n[i]), batch=2, heads=8, head_dim=64, dtype_bytes=4)
        assert naive.get_ydata()[i] == pytest.approx(mem["naive"] / GB)
        assert flash.get_ydata()[i] == pytest.approx(mem["flash"] / GB)
    ratio = fig.axes[1].lines[0].get_ydata()
    assert ratio[-1] == pytest.approx(naive.get_ydata()[-1] / flash.get_ydata()[-1])
    assert list(ratio) == sorted(ratio)  # the gap widens with N


def test_gpu_crossing_is_exact_and_reported_only_in_range():
    fig = plt.figure()
    summary = draw_attention_memory(fig, 1, 32, 128, 2, 65536, gpu_memory_gb=80.0)
    crossing = 24_873
    mem = [attention_memory_bytes(n, heads=32, head_dim=128, dtype_bytes=2)["naive"]
           for n in (crossing - 1, crossing)]
    assert mem[0] <= 80 * GB < mem[1]  # decimal GB, as every memory budget of the course
    assert summary.endswith(f"naive exceeds 80 GB from N={crossing:,}")
    fig2 = plt.figure()
    small = draw_attention_memory(fig2, 1, 4, 32, 4, 4096, gpu_memory_gb=16.0)
    assert small.endswith("naive fits in 16 GB up to N=4,096")
    assert all(name.startswith(f"{size:g} GB") for name, size in GPUS.items())


def test_interactive_controls_change_summary_and_plot():
    board = attention_memory_dashboard(interactive=True)
    assert isinstance(board, Dashboard)
    assert set(board.controls) == {"preset", "batch", "heads", "head_dim", "dtype_bytes",
                                   "max_seq_len", "gpu_memory_gb"}
    assert "H=32, d=128" in board.summary.value
    figures = []
    draw = board.draw

    def capture(fig, **values):
        figures.append(fig)
        return draw(fig, **values)

    board.draw = capture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        board.controls["dtype_bytes"].value = 4
        assert "4-byte dtype" in board.summary.value and "1.10 TB" in board.summary.value
        board.controls["preset"].value = "GPT-2 small (12 heads x 64)"
        assert (board.controls["heads"].value, board.controls["head_dim"].value) == (12, 64)
        assert "H=12, d=64" in board.summary.value
        board.controls["max_seq_len"].value = 4096
    assert "N=4,096" in board.summary.value
    assert figures[-1].axes[0].lines[0].get_xdata()[-1] == 4096
    assert "GPT-2 small" in figures[-1]._suptitle.get_text()


def test_presets_are_real_shapes():
    assert PRESETS["LLaMA-7B (32 heads x 128)"] == (32, 128)
    assert PRESETS["GPT-2 small (12 heads x 64)"] == (12, 64)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"heads": 0}, ValueError, "^heads must be a positive int"),
    ({"batch": 1.5}, TypeError, "^batch must be a positive int"),
    ({"dtype_bytes": 3}, ValueError, r"^dtype_bytes must be one of \(2, 4\)"),
    ({"max_seq_len": 5000}, ValueError, "^max_seq_len must be one of"),
    ({"gpu_memory_gb": 0}, ValueError, "^gpu_memory_gb must be a number > 0"),
    ({"gpu_memory_gb": "80"}, TypeError, "^gpu_memory_gb must be a number > 0"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        attention_memory_dashboard(interactive=False, **kwargs)
