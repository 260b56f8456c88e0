"""The blocksize/outlier explorer of notebook 03: static figure, curves and interactive controls."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib.model.nf4 import codebook_roundtrip, nf4_codebook  # noqa: E402
from course_lib.widgets.dashboard import Dashboard  # noqa: E402
from course_lib.widgets.nf4 import (  # noqa: E402
    BLOCKSIZES,
    SHAPE,
    constant_bits,
    draw_nf4_error,
    make_weights,
    nf4_error_dashboard,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def curve(fig, axis: int, label: str):
    line = next(ln for ln in fig.axes[axis].lines if ln.get_label() == label)
    return list(line.get_xdata()), list(line.get_ydata())


def test_static_figure_titles_labels_and_summary(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Agg's "cannot show" from plt.show()
        fig = nf4_error_dashboard(interactive=False)
    out = capsys.readouterr().out.strip()
    assert out.startswith("blocksize=64, 131 outliers at 20 sigma: RMS error/std NF4 ")
    assert out.endswith("4.500 bits/param (4.127 with double quantisation)")
    assert "131 outliers" in fig._suptitle.get_text()
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_xscale() == "log" and ax.get_legend() is not None
    assert "bits per parameter" in fig.axes[1].get_ylabel()


def test_error_curves_are_measured_and_nf4_wins_on_normal_weights():
    fig = plt.figure()
    draw_nf4_error(fig, 64, 20.0, 0.0)
    xs, nf4 = curve(fig, 0, "NF4")
    _, int4 = curve(fig, 0, "int4")
    _, fp4 = curve(fig, 0, "FP4")
    assert xs == list(BLOCKSIZES)
    # The plotted point at blocksize 64 is the measured RMS error of the NF4 roundtrip.
    w = make_weights(20.0, 0.0)
    rms = (codebook_roundtrip(w, nf4_codebook(), 64) - w).pow(2).mean().sqrt().item() / 0.02
    assert nf4[BLOCKSIZES.index(64)] == pytest.approx(rms)
    # NormalFloat is the best 4-bit type for normal weights at every blocksize.
    assert all(a < b and a < c for a, b, c in zip(nf4, int4, fp4))


def test_outliers_hurt_large_blocks_more():
    fig = plt.figure()
    draw_nf4_error(fig, 64, 20.0, 0.001)
    _, with_outliers = curve(fig, 0, "NF4")
    fig2 = plt.figure()
    draw_nf4_error(fig2, 64, 20.0, 0.0)
    _, clean = curve(fig2, 0, "NF4")
    assert all(a > b for a, b in zip(with_outliers, clean))
    assert with_outliers == sorted(with_outliers), "error grows with the blocksize"
    small, large = BLOCKSIZES.index(32), BLOCKSIZES.index(4096)
    assert with_outliers[large] / clean[large] > with_outliers[small] / clean[small]


def test_constant_bits_curves_follow_the_formulas():
    assert constant_bits(64, False) == 0.5
    assert constant_bits(64, True) == pytest.approx(0.127, abs=5e-4)
    fig = plt.figure()
    summary = draw_nf4_error(fig, 256, 10.0, 0.01)
    _, plain = curve(fig, 1, "fp32 absmax")
    _, dq = curve(fig, 1, "double quantisation (8-bit)")
    assert plain == [32 / b for b in BLOCKSIZES]
    assert dq == pytest.approx([8 / b + 32 / (b * 256) for b in BLOCKSIZES])
    assert "4.125 bits/param (4.032 with double quantisation)" in summary
    assert f"{round(0.01 * SHAPE[0] * SHAPE[1]):,} outliers at 10 sigma" in summary


def test_make_weights_is_seeded_and_plants_outliers():
    a, b = make_weights(30.0, 0.001), make_weights(30.0, 0.001)
    assert torch.equal(a, b) and a.shape == SHAPE
    assert (a.abs() > 10 * 0.02).sum().item() == round(0.001 * a.numel())


def test_interactive_controls_redraw():
    board = nf4_error_dashboard(interactive=True)
    assert isinstance(board, Dashboard)
    assert set(board.controls) == {"blocksize", "outlier_sigma", "outlier_fraction"}
    assert "blocksize=64" in board.summary.value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        board.controls["blocksize"].value = 1024
        assert "blocksize=1024" in board.summary.value
        assert "4.031 bits/param" in board.summary.value
        board.controls["outlier_fraction"].value = 0.0
        assert "no outliers" in board.summary.value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocksize": 48}, "^blocksize must be one of"),
        ({"outlier_sigma": 1.0}, r"^outlier_sigma must be a number in \[2, 50\]"),
        ({"outlier_fraction": 0.5}, "^outlier_fraction must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nf4_error_dashboard(interactive=False, **kwargs)
