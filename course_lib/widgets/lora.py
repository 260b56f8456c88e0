"""Exercise 1 of notebook 01_lora: how many parameters LoRA saves, as a function of the rank r.

``rank_savings_dashboard()`` shows sliders for the weight shape ``d x k`` and the rank ``r``,
plus presets of real layer shapes; it plots LoRA's trainable parameters ``r(d+k)`` and the
savings factor ``dk / (r(d+k))`` against ``r`` on log scales. With ``interactive=False`` (and
under nbval or outside a Jupyter kernel) the same drawing is a static figure.
"""

from __future__ import annotations

import numpy as np

from course_lib.model.lora import lora_parameter_count, lora_savings
from course_lib.validation import positive_int
from course_lib.widgets.dashboard import dashboard

__all__ = ["PRESETS", "CUSTOM", "draw_rank_savings", "rank_savings_dashboard"]

CUSTOM = "custom (use the d and k sliders)"
# Weight shapes d x k (out_features x in_features) of real models' linear layers.
PRESETS: dict[str, tuple[int, int]] = {
    "LLaMA-7B attention q/k/v/o_proj (4096 x 4096)": (4096, 4096),
    "LLaMA-7B MLP gate/up_proj (11008 x 4096)": (11008, 4096),
    "LLaMA-7B MLP down_proj (4096 x 11008)": (4096, 11008),
    "LLaMA-65B attention q/k/v/o_proj (8192 x 8192)": (8192, 8192),
    "GPT-2 small attention projection (768 x 768)": (768, 768),
    "TinyGPT q_proj, this course's model (128 x 128)": (128, 128),
}
D_RANGE = (64, 16384, 64)  # min, max, step of the d and k sliders
R_RANGE = (1, 512)  # min, max of the r slider


def _preset_for(d: int, k: int) -> str:
    return next((name for name, shape in PRESETS.items() if shape == (d, k)), CUSTOM)


def draw_rank_savings(fig, d: int, k: int, r: int, preset: str = CUSTOM) -> str:
    """Draw parameters and savings against the rank for a ``d x k`` weight; mark rank ``r``.

    Returns the one-line summary of the marked point.
    """
    ranks = np.unique(np.geomspace(1, max(min(d, k), 2) * 2, 200).astype(np.int64))
    lora = ranks * (d + k)
    savings = d * k / lora
    full = d * k
    n_lora = lora_parameter_count(d, k, r)
    factor = lora_savings(d, k, r)
    name = preset if PRESETS.get(preset) == (d, k) else f"a {d} x {k} weight"

    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ranks, lora, color="C0", label="LoRA: r(d+k)")
    ax1.axhline(full, color="C3", linestyle="--", label=f"full fine-tuning: d·k = {full:,}")
    ax1.plot([r], [n_lora], "o", color="C1", markersize=8, label=f"r = {r}: {n_lora:,}")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("rank r (log scale)")
    ax1.set_ylabel("trainable parameters (count, log scale)")
    ax1.set_title("Trainable parameters")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(True, which="major", alpha=0.3)

    ax2.plot(ranks, savings, color="C2", label="dk / (r(d+k))")
    ax2.axhline(1.0, color="C3", linestyle="--", label="break-even (no saving)")
    ax2.plot([r], [factor], "o", color="C1", markersize=8, label=f"r = {r}: {factor:,.1f}x")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("rank r (log scale)")
    ax2.set_ylabel("savings factor (x fewer parameters, log scale)")
    ax2.set_title("Savings factor vs full fine-tuning")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(True, which="major", alpha=0.3)

    fig.suptitle(f"LoRA on {name}: parameters and savings against the rank r")
    fig.tight_layout()
    note = " (r > min(d, k): no saving)" if r > min(d, k) else ""
    return (
        f"d={d}, k={k}, r={r}: {n_lora:,} LoRA params vs {full:,} full "
        f"({factor:,.1f}x fewer, {100 * n_lora / full:.2f}% of the weight){note}"
    )


def rank_savings_dashboard(
    d: int = 4096, k: int = 4096, r: int = 8, interactive: bool | None = None
):
    """The rank-vs-savings dashboard (sliders d, k, r and a preset menu), or a static figure.

    ``interactive=None`` picks the interactive version inside a Jupyter kernel. Returns the
    :class:`~course_lib.widgets.dashboard.Dashboard` or the matplotlib figure.
    """
    ranges = {"d": (d, D_RANGE[:2]), "k": (k, D_RANGE[:2]), "r": (r, R_RANGE)}
    for name, (value, (low, high)) in ranges.items():
        if positive_int(name, value) < low or value > high:
            raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    preset = _preset_for(d, k)

    def controls():
        import ipywidgets as W

        style = {"description_width": "110px"}
        wide = W.Layout(width="560px")
        d_slider = W.IntSlider(value=d, min=D_RANGE[0], max=D_RANGE[1], step=D_RANGE[2],
                               description="d (out_features)", style=style, layout=wide,
                               continuous_update=False)
        k_slider = W.IntSlider(value=k, min=D_RANGE[0], max=D_RANGE[1], step=D_RANGE[2],
                               description="k (in_features)", style=style, layout=wide,
                               continuous_update=False)
        r_slider = W.IntSlider(value=r, min=R_RANGE[0], max=R_RANGE[1], description="rank r",
                               style=style, layout=wide, continuous_update=False)
        menu = W.Dropdown(options=[CUSTOM, *PRESETS], value=preset, description="preset",
                          style=style, layout=wide)

        def apply_preset(change) -> None:
            shape = PRESETS.get(change["new"])
            if shape is not None:
                d_slider.value, k_slider.value = shape

        menu.observe(apply_preset, names="value")
        return {"preset": menu, "d": d_slider, "k": k_slider, "r": r_slider}

    return dashboard(
        draw_rank_savings,
        controls,
        defaults={"d": d, "k": k, "r": r, "preset": preset},
        title="LoRA: trainable parameters and savings vs rank (exercise 1)",
        interactive=interactive,
        figsize=(11, 4.2),
    )
