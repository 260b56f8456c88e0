"""The fine-tuning budget dashboard of notebook 05: static figure, bars, interactive controls."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from course_lib.utils.memory import GB, MB, estimate_memory  # noqa: E402
from course_lib.widgets.budget import (  # noqa: E402
    DEFAULTS,
    budget_dashboard,
    budget_estimates,
    draw_budget,
    stacked_bars,
    targets_for,
)
from course_lib.widgets.dashboard import Dashboard  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def bar_totals(ax) -> list[float]:
    """Sum of the stacked bar heights at each x position (left to right)."""
    totals: dict[float, float] = {}
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2, 6)
        totals[x] = totals.get(x, 0.0) + patch.get_height()
    return [totals[x] for x in sorted(totals)]


def hlines(ax) -> list[float]:
    return sorted(
        float(line.get_ydata()[0]) for line in ax.lines if len(set(line.get_ydata())) == 1
    )


def test_static_figure_shows_three_methods_against_gpu_lines(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Agg's "cannot show" from plt.show()
        fig = budget_dashboard(interactive=False)
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("llama-65b qlora: 45.0 GB total = weights 35.0 GB")
    assert "fits 48 GB / 80 GB" in summary
    ax = fig.axes[0]
    assert "llama-65b" in ax.get_title() and "r=64" in ax.get_title()
    assert "GB" in ax.get_ylabel() and ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "full fine-tuning", "LoRA", "QLoRA (NF4 + DQ)",
    ]
    assert hlines(ax) == [24, 48, 80]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "weights" and "optimizer state" in legend and "activations" in legend


def test_bars_are_the_estimates_stacked():
    fig = plt.figure()
    values = {k: v for k, v in DEFAULTS.items() if k != "method"}
    draw_budget(fig, method="lora", **values)
    estimates = budget_estimates(**values)
    heights = bar_totals(fig.axes[0])
    assert heights == pytest.approx([estimates[m].total / GB for m in ("full", "lora", "qlora")])
    assert heights[0] > 780 and heights[2] < 48  # the lesson's two figures


def test_estimates_follow_the_settings():
    est = budget_estimates("llama-7b", 16, "q,v", 2, 256, False, "adamw8bit", "bf16")
    assert est["lora"] == estimate_memory(
        "llama-7b", "lora", weight_dtype="bf16", lora_rank=16, lora_targets=["q_proj", "v_proj"],
        batch_size=2, seq_len=256, optimizer="adamw8bit",
    )
    assert est["qlora"].weights_by_dtype.keys() == {"nf4", "bf16"}
    assert est["full"].trainable_parameters == est["full"].parameters


def test_course_model_is_drawn_in_megabytes_without_gpu_lines():
    fig = plt.figure()
    summary = draw_budget(fig, "tinygpt", "full", 8, "q,v", 64, 512, False, "adamw", "fp32")
    assert summary.endswith("(seq_len capped at 16)")
    assert "fits 24 GB / 48 GB / 80 GB" in summary
    ax = fig.axes[0]
    assert "MB" in ax.get_ylabel() and hlines(ax) == []
    full = estimate_memory("tinygpt", "full", batch_size=64, seq_len=16)
    assert bar_totals(ax)[0] == pytest.approx(full.total / MB)


def test_targets_menu_maps_to_each_architecture():
    assert targets_for("llama-7b", "q,v") == ["q_proj", "v_proj"]
    assert targets_for("tinygpt", "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert targets_for("gpt2-124m", "q,v") == ["c_attn"]
    assert targets_for("gpt2-124m", "attention") == ["c_attn", "attn.c_proj"]
    assert targets_for("gpt2-1.5b", "all-linear") == "all-linear"
    with pytest.raises(ValueError, match="targets must be one of"):
        targets_for("llama-7b", "mlp")


def test_full_finetuning_summary_has_no_lora_settings():
    fig = plt.figure()
    summary = draw_budget(fig, "llama-7b", "full", 8, "q,v", 1, 512, True, "adamw", "fp32")
    assert summary.startswith("llama-7b full: ")
    assert "weights 27.0 GB" in summary and "fits none of 24/48/80 GB" in summary
    assert "LoRA" not in fig.axes[0].get_title()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "adapter"}, r"^method must be one of \('full', 'lora', 'qlora'\)"),
    ({"rank": 3}, r"^rank must be one of \(1, 2, 4"),
    ({"preset": "llama-70b"}, r"^preset must be one of \('tinygpt'"),
    ({"colour": "red"}, r"^unknown setting\(s\) \['colour'\]"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        budget_dashboard(interactive=False, **kwargs)


def test_checkpointing_must_be_a_bool():
    with pytest.raises(TypeError, match="^checkpointing must be True or False"):
        budget_dashboard(interactive=False, checkpointing=1)


def test_interactive_controls_change_summary_and_plot():
    board = budget_dashboard(interactive=True)
    assert isinstance(board, Dashboard)
    assert set(board.controls) == set(DEFAULTS)
    assert "llama-65b qlora: 45.0 GB total" in board.summary.value
    figures = []
    draw = board.draw

    def capture(fig, **values):
        figures.append(fig)
        return draw(fig, **values)

    board.draw = capture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        board.controls["method"].value = "full"
        assert "llama-65b full: " in board.summary.value
        assert "fits none of 24/48/80 GB" in board.summary.value
        board.controls["preset"].value = "llama-7b"
        board.controls["checkpointing"].value = False
    assert "llama-7b full: " in board.summary.value
    assert "recompute" not in board.summary.value
    assert "llama-7b" in figures[-1].axes[0].get_title()


def test_stacked_bars_stack_each_category_and_check_highlight():
    from course_lib.utils.memory import MemoryBreakdown

    fig, ax = plt.subplots()
    a = MemoryBreakdown(weights=3 * MB, gradients=2 * MB, activations=5 * MB)
    b = MemoryBreakdown(weights=1 * MB, optimizer_state=4 * MB)
    stacked_bars(ax, {"a": a, "b": b}, scale=MB)
    assert bar_totals(ax) == pytest.approx([10, 5])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["weights", "gradients", "optimizer state", "activations"]
    assert len(ax.patches) == 5
    with pytest.raises(ValueError, match="highlight must be one of"):
        stacked_bars(ax, {"a": a}, highlight="c")
    with pytest.raises(ValueError, match="must not be empty"):
        stacked_bars(ax, {})
