"""Notebook 03_qlora: how blocksize and outliers change the 4-bit quantisation error.

``nf4_error_dashboard()`` has a blocksize slider, an outlier-size slider (in standard deviations
of the weights) and an outlier-fraction menu. It quantises the same seeded normally distributed
weight matrix (with the chosen outliers planted) with NF4, uniform int4 and FP4, each with
blockwise absmax scaling, and draws

- left: the error (RMS error relative to the weights' standard deviation) against the blocksize
  for the three data types, the chosen blocksize marked;
- right: what the scaling constants cost, in bits per parameter, against the blocksize, with
  and without double quantisation.

Small blocks keep an outlier from stretching the scale of many weights (lower error) but store
more constants; double quantisation makes small blocks cheap. With ``interactive=False`` (and
under nbval or outside a Jupyter kernel) the same drawing is a static figure.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from course_lib.model.nf4 import codebook_roundtrip, fp4_codebook, int4_codebook, nf4_codebook
from course_lib.validation import check_choice, check_number
from course_lib.widgets.dashboard import dashboard

__all__ = [
    "BLOCKSIZES",
    "OUTLIER_FRACTIONS",
    "SHAPE",
    "DTYPES",
    "make_weights",
    "quantization_errors",
    "constant_bits",
    "draw_nf4_error",
    "nf4_error_dashboard",
]

BLOCKSIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
OUTLIER_FRACTIONS = (0.0, 0.0001, 0.001, 0.01)  # share of weights replaced by outliers
SHAPE = (128, 1024)  # the weight matrix every curve is measured on (131,072 values)
SIGMA_RANGE = (2.0, 50.0)  # outlier size, in standard deviations of the weights
DTYPES = {"NF4": nf4_codebook, "int4": int4_codebook, "FP4": fp4_codebook}
COLORS = {"NF4": "C0", "int4": "C1", "FP4": "C2"}
STD = 0.02  # standard deviation of the weights (a typical initialisation scale)


def make_weights(outlier_sigma: float, outlier_fraction: float, seed: int = 0) -> torch.Tensor:
    """Seeded N(0, 0.02^2) weights of shape :data:`SHAPE` with planted outliers.

    ``round(outlier_fraction * n)`` randomly chosen weights are set to
    ``+-outlier_sigma * 0.02`` (random signs).
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=gen) * STD
    n_out = round(outlier_fraction * SHAPE[0] * SHAPE[1])
    if n_out:
        idx = torch.randperm(w.numel(), generator=gen)[:n_out]
        signs = torch.randint(0, 2, (n_out,), generator=gen).float() * 2 - 1
        w.view(-1)[idx] = signs * outlier_sigma * STD
    return w


def quantization_errors(w: torch.Tensor, blocksizes=BLOCKSIZES) -> dict[str, np.ndarray]:
    """RMS quantisation error / std of the normal weights, per data type and blocksize."""
    errors = {}
    for name, codebook in DTYPES.items():
        values = []
        for bs in blocksizes:
            err = codebook_roundtrip(w, codebook(), bs) - w
            values.append(err.pow(2).mean().sqrt().item() / STD)
        errors[name] = np.array(values)
    return errors


@lru_cache(maxsize=64)
def _errors_for(outlier_sigma: float, outlier_fraction: float) -> dict[str, np.ndarray]:
    # Moving the blocksize slider only moves the markers: the curves are cached.
    return quantization_errors(make_weights(outlier_sigma, outlier_fraction))


def constant_bits(blocksize: int, double_quant: bool, dq_blocksize: int = 256) -> float:
    """Bits per parameter spent on scaling constants: 32/b, or 8/b + 32/(b*256) with DQ."""
    if double_quant:
        return 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return 32 / blocksize


def _check(blocksize: int, outlier_sigma: float, outlier_fraction: float) -> None:
    check_choice("blocksize", blocksize, BLOCKSIZES)
    check_number("outlier_sigma", outlier_sigma, low=SIGMA_RANGE[0], high=SIGMA_RANGE[1])
    check_choice("outlier_fraction", outlier_fraction, OUTLIER_FRACTIONS)


def draw_nf4_error(fig, blocksize: int, outlier_sigma: float, outlier_fraction: float) -> str:
    """Draw error vs blocksize (three data types) and constant bits vs blocksize.

    Returns the one-line summary of the chosen blocksize.
    """
    _check(blocksize, outlier_sigma, outlier_fraction)
    errors = _errors_for(float(outlier_sigma), float(outlier_fraction))
    at = BLOCKSIZES.index(blocksize)

    ax1, ax2 = fig.subplots(1, 2)
    for name, values in errors.items():
        ax1.plot(BLOCKSIZES, values, "-o", color=COLORS[name], markersize=3, label=name)
        ax1.plot([blocksize], [values[at]], "o", color=COLORS[name], markersize=9, alpha=0.6)
    ax1.axvline(blocksize, color="grey", linestyle=":", linewidth=1)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("blocksize (values per absmax constant, log scale)")
    ax1.set_ylabel("RMS error / std of the weights (ratio)")
    ax1.set_title("4-bit quantisation error")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.grid(True, alpha=0.3)

    plain = [constant_bits(bs, False) for bs in BLOCKSIZES]
    dq = [constant_bits(bs, True) for bs in BLOCKSIZES]
    ax2.plot(BLOCKSIZES, plain, "-o", color="C3", markersize=3, label="fp32 absmax")
    ax2.plot(BLOCKSIZES, dq, "-o", color="C4", markersize=3, label="double quantisation (8-bit)")
    ax2.plot([blocksize], [plain[at]], "o", color="C3", markersize=9, alpha=0.6)
    ax2.plot([blocksize], [dq[at]], "o", color="C4", markersize=9, alpha=0.6)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("blocksize (values per absmax constant, log scale)")
    ax2.set_ylabel("constants (bits per parameter, log scale)")
    ax2.set_title("Cost of the scaling constants")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(True, which="major", alpha=0.3)

    n_out = round(outlier_fraction * SHAPE[0] * SHAPE[1])
    outliers = f"{n_out:,} outliers at {outlier_sigma:g} sigma" if n_out else "no outliers"
    fig.suptitle(f"{SHAPE[0]} x {SHAPE[1]} normal weights, {outliers}: error vs storage")
    fig.tight_layout()
    errs = ", ".join(f"{name} {values[at]:.3f}" for name, values in errors.items())
    return (
        f"blocksize={blocksize}, {outliers}: RMS error/std {errs}; "
        f"{4 + plain[at]:.3f} bits/param ({4 + dq[at]:.3f} with double quantisation)"
    )


def nf4_error_dashboard(
    blocksize: int = 64,
    outlier_sigma: float = 20.0,
    outlier_fraction: float = 0.001,
    interactive: bool | None = None,
):
    """The blocksize/outlier explorer (sliders and a menu), or a static figure.

    ``interactive=None`` picks the interactive version inside a Jupyter kernel. Returns the
    :class:`~course_lib.widgets.dashboard.Dashboard` or the matplotlib figure.
    """
    _check(blocksize, outlier_sigma, outlier_fraction)

    def controls():
        import ipywidgets as W

        style = {"description_width": "150px"}
        wide = W.Layout(width="560px")
        return {
            "blocksize": W.SelectionSlider(
                options=list(BLOCKSIZES), value=blocksize, description="blocksize",
                style=style, layout=wide, continuous_update=False,
            ),
            "outlier_sigma": W.FloatSlider(
                value=outlier_sigma, min=SIGMA_RANGE[0], max=SIGMA_RANGE[1], step=1.0,
                description="outlier size (sigma)", style=style, layout=wide,
                continuous_update=False,
            ),
            "outlier_fraction": W.Dropdown(
                options=[(f"{100 * f:g} %", f) for f in OUTLIER_FRACTIONS],
                value=outlier_fraction, description="outlier share", style=style, layout=wide,
            ),
        }

    return dashboard(
        draw_nf4_error,
        controls,
        defaults={
            "blocksize": blocksize,
            "outlier_sigma": outlier_sigma,
            "outlier_fraction": outlier_fraction,
        },
        title="NF4 vs int4 vs FP4: blocksize, outliers and quantisation error",
        interactive=interactive,
        figsize=(11, 4.2),
    )
