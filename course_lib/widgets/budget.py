"""The fine-tuning budget of notebook 05: will this fine-tune fit on a 24, 48 or 80 GB card?

``budget_dashboard()`` lets a student pick a model (the course's TinyGPT, LLaMA-7B ... 65B,
GPT-2 sizes), a method (full fine-tuning, LoRA, QLoRA), the LoRA rank and target layers, the
batch size, the sequence length, gradient checkpointing, the optimiser and the precision. It
draws one stacked bar per method -- weights, quantisation constants, gradients, optimiser state,
fp32 master weights, activations, the block being recomputed -- from
:func:`course_lib.utils.memory.estimate_memory`, the chosen method in full colour, the other two
faded for comparison, against horizontal lines at 24, 48 and 80 GB. With ``interactive=False``
(and under nbval or outside a Jupyter kernel) the same drawing is a static figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.patches import Patch

from course_lib.utils.memory import (
    CATEGORIES,
    CATEGORY_LABELS,
    METHODS,
    OPTIMIZERS,
    MemoryBreakdown,
    estimate_memory,
    get_preset,
    preset_names,
)
from course_lib.utils.units import GB, MB, format_bytes
from course_lib.validation import check_bool, check_choice
from course_lib.widgets.dashboard import dashboard

__all__ = [
    "GPU_LINES",
    "TARGET_CHOICES",
    "PRECISIONS",
    "RANKS",
    "BATCH_SIZES",
    "SEQ_LENS",
    "DEFAULTS",
    "targets_for",
    "budget_estimates",
    "stacked_bars",
    "draw_budget",
    "budget_dashboard",
]

GPU_LINES = {24: "24 GB (RTX 3090/4090)", 48: "48 GB (A6000, L40S)", 80: "80 GB (A100/H100)"}
TARGET_CHOICES = ("q,v", "attention", "all-linear")
PRECISIONS = ("bf16", "fp32")
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
SEQ_LENS = (16, 64, 128, 256, 512, 1024, 2048, 4096)
METHOD_LABELS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (NF4 + DQ)"}
COLORS = {
    "weights": "#4C72B0",
    "quant_constants": "#8172B2",
    "gradients": "#DD8452",
    "optimizer_state": "#C44E52",
    "master_weights": "#937860",
    "activations": "#55A868",
    "recompute": "#A1D99B",
}
DEFAULTS: dict[str, Any] = {
    "preset": "llama-65b",
    "method": "qlora",
    "rank": 64,
    "targets": "all-linear",
    "batch_size": 1,
    "seq_len": 512,
    "checkpointing": True,
    "optimizer": "adamw",
    "precision": "bf16",
}


def targets_for(preset: str, choice: str) -> list[str] | str:
    """The LoRA ``target_modules`` that a menu ``choice`` means for ``preset``'s layer names.

    ``"q,v"``: the query and value projections (GPT-2's fused ``c_attn`` holds q, k and v);
    ``"attention"``: every attention projection; ``"all-linear"``: every block linear.
    """
    check_choice("targets", choice, TARGET_CHOICES)
    spec = get_preset(preset)
    if choice == "all-linear":
        return "all-linear"
    if spec.arch == "gpt2":
        return ["c_attn"] if choice == "q,v" else ["c_attn", "attn.c_proj"]
    return ["q_proj", "v_proj"] if choice == "q,v" else ["q_proj", "k_proj", "v_proj", "o_proj"]


def budget_estimates(
    preset: str, rank: int, targets: str, batch_size: int, seq_len: int, checkpointing: bool,
    optimizer: str, precision: str,
) -> dict[str, MemoryBreakdown]:
    """``{method: estimate}`` for full fine-tuning, LoRA and QLoRA with the same settings.

    ``precision`` is the dtype of the trained weights, the activations and (for LoRA) the frozen
    base; QLoRA's base is NF4 with double quantisation. ``seq_len`` is capped at the model's
    context for models with learned positions.
    """
    check_choice("precision", precision, PRECISIONS)
    spec = get_preset(preset)
    if spec.learned_positions:
        seq_len = min(seq_len, spec.max_seq_len)
    common = dict(
        batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
        gradient_checkpointing=checkpointing,
    )
    lora = dict(lora_rank=rank, lora_targets=targets_for(preset, targets))
    return {
        "full": estimate_memory(spec, "full", weight_dtype=precision, **common),
        "lora": estimate_memory(spec, "lora", weight_dtype=precision, **lora, **common),
        "qlora": estimate_memory(
            spec, "qlora", weight_dtype="nf4-dq", compute_dtype=precision, **lora, **common
        ),
    }


def stacked_bars(
    ax, breakdowns: Mapping[str, MemoryBreakdown], scale: float = GB,
    highlight: str | None = None, legend: bool = True,
) -> None:
    """One stacked bar per breakdown (categories in :data:`CATEGORIES` order, heights in bytes
    divided by ``scale``), its total written on top. ``highlight`` names the bar drawn in full
    colour; the others are faded (all are full colour when it is ``None``)."""
    if not breakdowns:
        raise ValueError("breakdowns must not be empty")
    if highlight is not None:
        check_choice("highlight", highlight, breakdowns)
    x = np.arange(len(breakdowns))
    for i, (name, b) in enumerate(breakdowns.items()):
        chosen = highlight is None or name == highlight
        bottom = 0.0
        for cat in CATEGORIES:
            value = getattr(b, cat) / scale
            if value <= 0:
                continue
            ax.bar(
                x[i], value, bottom=bottom, width=0.6, color=COLORS[cat],
                alpha=1.0 if chosen else 0.35, edgecolor="black" if chosen else "none",
                linewidth=1.2 if chosen and highlight is not None else (0.6 if chosen else 0),
            )
            bottom += value
        ax.text(x[i], bottom, format_bytes(b.total, "decimal"), ha="center", va="bottom",
                fontsize=9, fontweight="bold" if highlight is not None and chosen else "normal")
    ax.set_xticks(x, list(breakdowns))
    ax.set_xlim(-0.6, len(breakdowns) - 0.4)
    if legend:
        used = [c for c in CATEGORIES if any(getattr(b, c) > 0 for b in breakdowns.values())]
        handles = [
            Patch(facecolor=COLORS[c], edgecolor="black", label=CATEGORY_LABELS[c]) for c in used
        ]
        ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)


def draw_budget(
    fig, preset: str, method: str, rank: int, targets: str, batch_size: int, seq_len: int,
    checkpointing: bool, optimizer: str, precision: str,
) -> str:
    """Draw the three stacked bars into ``fig``; return a one-line summary of ``method``'s bar."""
    check_choice("method", method, METHODS)
    estimates = budget_estimates(
        preset, rank, targets, batch_size, seq_len, checkpointing, optimizer, precision
    )
    spec = get_preset(preset)
    shown_seq = min(seq_len, spec.max_seq_len) if spec.learned_positions else seq_len
    largest = max(e.total for e in estimates.values())
    unit, scale = ("GB", GB) if largest >= 0.5 * GB else ("MB", MB)

    ax = fig.subplots(1, 1)
    stacked_bars(
        ax, {METHOD_LABELS[m]: estimates[m] for m in METHODS}, scale=scale,
        highlight=METHOD_LABELS[method],
    )
    if unit == "GB":
        for gb, name in GPU_LINES.items():
            ax.axhline(gb, color="black", linestyle="--", linewidth=0.9, alpha=0.7)
            ax.text(-0.57, gb, name, ha="left", va="bottom", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5})
        ax.set_ylim(0, max(largest / scale, 80) * 1.12)
    else:
        ax.set_ylim(0, largest / scale * 1.15)
    ax.set_ylabel(f"memory ({unit}, 1 {unit} = 10^{9 if unit == 'GB' else 6} bytes)")
    ax.set_xlabel("fine-tuning method")
    settings = (
        f"b={batch_size}, s={shown_seq}, {precision}, {optimizer}"
        + (f", LoRA r={rank} on {targets}" if method != "full" else "")
        + (", checkpointing" if checkpointing else "")
    )
    ax.set_title(f"Fine-tuning memory of {preset}: {settings}", fontsize=10)
    fig.tight_layout()

    est = estimates[method]
    fits = [f"{gb} GB" for gb in GPU_LINES if est.fits(gb)]
    parts = ", ".join(
        f"{CATEGORY_LABELS[c]} {format_bytes(getattr(est, c), 'decimal')}"
        for c in CATEGORIES if getattr(est, c) > 0
    )
    verdict = f"fits {' / '.join(fits)}" if fits else "fits none of 24/48/80 GB"
    capped = f" (seq_len capped at {shown_seq})" if shown_seq != seq_len else ""
    return (
        f"{preset} {method}: {format_bytes(est.total, 'decimal')} total = {parts}; {verdict}; "
        f"{est.trainable_parameters:,} trainable of {est.parameters:,} parameters{capped}"
    )


def budget_dashboard(interactive: bool | None = None, **values: Any):
    """The fine-tuning budget dashboard, or its static figure (``interactive=False``).

    Keyword arguments override :data:`DEFAULTS` (``preset``, ``method``, ``rank``, ``targets``,
    ``batch_size``, ``seq_len``, ``checkpointing``, ``optimizer``, ``precision``).
    """
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    start = {**DEFAULTS, **values}
    allowed = {
        "preset": preset_names(), "method": METHODS, "rank": RANKS, "targets": TARGET_CHOICES,
        "batch_size": BATCH_SIZES, "seq_len": SEQ_LENS, "optimizer": OPTIMIZERS,
        "precision": PRECISIONS,
    }
    check_bool("checkpointing", start["checkpointing"])
    for name, options in allowed.items():
        check_choice(name, start[name], options)

    def controls():
        import ipywidgets as W

        style = {"description_width": "120px"}
        wide = W.Layout(width="520px")

        def select(name, options, description, **kw):
            return W.SelectionSlider(
                options=list(options), value=start[name], description=description,
                style=style, layout=wide, continuous_update=False, **kw,
            )

        return {
            "preset": W.Dropdown(options=list(preset_names()), value=start["preset"],
                                 description="model", style=style, layout=wide),
            "method": W.ToggleButtons(
                options=[(METHOD_LABELS[m], m) for m in METHODS], value=start["method"],
                description="method", style=style,
            ),
            "rank": select("rank", RANKS, "LoRA rank r"),
            "targets": W.Dropdown(options=list(TARGET_CHOICES), value=start["targets"],
                                  description="LoRA targets", style=style, layout=wide),
            "batch_size": select("batch_size", BATCH_SIZES, "batch size"),
            "seq_len": select("seq_len", SEQ_LENS, "sequence length"),
            "checkpointing": W.Checkbox(value=start["checkpointing"],
                                        description="gradient checkpointing", style=style),
            "optimizer": W.Dropdown(options=list(OPTIMIZERS), value=start["optimizer"],
                                    description="optimizer", style=style, layout=wide),
            "precision": W.Dropdown(options=list(PRECISIONS), value=start["precision"],
                                    description="precision", style=style, layout=wide),
        }

    return dashboard(
        draw_budget,
        controls,
        defaults=start,
        title="Fine-tuning budget: where the memory goes (full vs LoRA vs QLoRA)",
        interactive=interactive,
        figsize=(10, 5),
    )
