"""Notebook 04's widget: memory of one attention layer against sequence length, naive vs flash.

``attention_memory_dashboard()`` shows controls for a model shape (batch, heads, head_dim), the
dtype, the longest sequence and the GPU's memory, plus presets of real models. It plots, on
log-log axes, the memory of one attention forward (``q``, ``k``, ``v``, output, and what each
algorithm adds: the ``N x N`` matrices ``S`` and ``P`` for naive attention, one fp32 log-sum-exp
per row for FlashAttention; see
:func:`course_lib.utils.flash_attention.attention_memory_bytes`) and the ratio between them.
Memory is an estimate, so it is shown in decimal GB (10^9 bytes), the unit of GPU budgets
(cards are sold as "80 GB"). With ``interactive=False`` (and under nbval or outside a Jupyter
kernel) the same drawing is a
static figure.
"""

from __future__ import annotations

import math

import numpy as np

from course_lib.utils.flash_attention import attention_memory_bytes
from course_lib.utils.units import GB, format_bytes
from course_lib.validation import check_choice, check_number, positive_int
from course_lib.widgets.dashboard import dashboard

__all__ = ["PRESETS", "CUSTOM", "DTYPES", "GPUS", "draw_attention_memory", "attention_memory_dashboard"]

CUSTOM = "custom (use the sliders)"
# (heads, head_dim) of one attention layer of real models.
PRESETS: dict[str, tuple[int, int]] = {
    "GPT-2 small (12 heads x 64)": (12, 64),
    "LLaMA-7B (32 heads x 128)": (32, 128),
    "LLaMA-65B (64 heads x 128)": (64, 128),
    "TinyGPT, this course's model (4 heads x 32)": (4, 32),
}
DTYPES: dict[str, int] = {"fp32 (4 bytes)": 4, "fp16 / bf16 (2 bytes)": 2}
MIN_SEQ_LEN = 256
MAX_SEQ_LENS = [2**p for p in range(10, 21)]  # 1k ... 1M tokens
HEAD_DIMS = [16, 32, 64, 80, 96, 128, 256]
# Memory of common GPUs, for the "does it fit" line.
GPUS: dict[str, float] = {
    "16 GB (T4, V100 16GB)": 16.0,
    "24 GB (RTX 4090, A10)": 24.0,
    "40 GB (A100 40GB)": 40.0,
    "80 GB (A100 / H100 80GB)": 80.0,
    "141 GB (H200)": 141.0,
}


def _dtype_name(dtype_bytes: int) -> str:
    return next(name for name, size in DTYPES.items() if size == dtype_bytes)


def _preset_for(heads: int, head_dim: int) -> str:
    return next((name for name, shape in PRESETS.items() if shape == (heads, head_dim)), CUSTOM)


def _validate(batch, heads, head_dim, dtype_bytes, max_seq_len, gpu_memory_gb) -> None:
    for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        positive_int(name, value)
    check_choice("dtype_bytes", dtype_bytes, sorted(DTYPES.values()))
    check_choice("max_seq_len", max_seq_len, MAX_SEQ_LENS)
    check_number("gpu_memory_gb", gpu_memory_gb, low=0.0, low_inclusive=False)


def _first_n_over(limit_bytes: float, batch: int, heads: int, head_dim: int,
                  dtype_bytes: int) -> int:
    """Smallest N whose naive attention memory exceeds ``limit_bytes``."""
    # naive(N) = 2 B H e N^2 + 4 B H d e N: solve the quadratic, then step to the integer.
    a, b = 2 * batch * heads * dtype_bytes, 4 * batch * heads * head_dim * dtype_bytes
    n = max(1, int((-b + math.sqrt(b * b + 4 * a * limit_bytes)) / (2 * a)))
    while n > 1 and a * (n - 1) ** 2 + b * (n - 1) > limit_bytes:
        n -= 1
    while a * n * n + b * n <= limit_bytes:
        n += 1
    return n


def draw_attention_memory(
    fig,
    batch: int,
    heads: int,
    head_dim: int,
    dtype_bytes: int,
    max_seq_len: int,
    gpu_memory_gb: float = 80.0,
    preset: str = CUSTOM,
) -> str:
    """Draw naive vs flash attention memory from N = 256 to ``max_seq_len``.

    Returns a one-line summary for the longest sequence: both memories, their ratio, and the
    first N at which naive attention no longer fits in ``gpu_memory_gb``.
    """
    _validate(batch, heads, head_dim, dtype_bytes, max_seq_len, gpu_memory_gb)
    lengths = np.unique(np.geomspace(MIN_SEQ_LEN, max_seq_len, 60).round().astype(np.int64))
    mems = [attention_memory_bytes(int(n), batch=batch, heads=heads, head_dim=head_dim,
                                   dtype_bytes=dtype_bytes) for n in lengths]
    naive = np.array([m["naive"] for m in mems], dtype=np.float64)
    flash = np.array([m["flash"] for m in mems], dtype=np.float64)
    gpu_bytes = gpu_memory_gb * GB

    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(lengths, naive / GB, color="C3", label="naive: q, k, v, O + S and P (N x N)")
    ax1.plot(lengths, flash / GB, color="C0", label="flash: q, k, v, O + log-sum-exp (N)")
    ax1.axhline(gpu_memory_gb, color="k", linestyle="--", linewidth=1,
                label=f"GPU memory: {gpu_memory_gb:g} GB")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("sequence length N (tokens, log scale)")
    ax1.set_ylabel("memory of one attention forward (GB = 10^9 bytes, log scale)")
    ax1.set_title("Attention memory vs sequence length")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(True, which="major", alpha=0.3)

    ratio = naive / flash
    ax2.plot(lengths, ratio, color="C2")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("sequence length N (tokens, log scale)")
    ax2.set_ylabel("naive memory / flash memory (x, log scale)")
    ax2.set_title("How many times less memory flash needs")
    ax2.grid(True, which="major", alpha=0.3)

    name = preset if PRESETS.get(preset) == (heads, head_dim) else f"{heads} heads x {head_dim}"
    fig.suptitle(f"One attention layer, {name}, batch {batch}, {_dtype_name(dtype_bytes)}")
    fig.tight_layout()

    last = attention_memory_bytes(max_seq_len, batch=batch, heads=heads, head_dim=head_dim,
                                  dtype_bytes=dtype_bytes)
    over = _first_n_over(gpu_bytes, batch, heads, head_dim, dtype_bytes)
    if over <= max_seq_len:
        ax1.axvline(over, color="C3", linestyle=":", linewidth=1)
        ax1.annotate(f"N={over:,}", (over, gpu_memory_gb), textcoords="offset points",
                     xytext=(4, -14), fontsize=8, color="C3")
    else:
        over = None
    fits = (f"naive exceeds {gpu_memory_gb:g} GB from N={over:,}" if over is not None
            else f"naive fits in {gpu_memory_gb:g} GB up to N={max_seq_len:,}")
    return (
        f"B={batch}, H={heads}, d={head_dim}, {dtype_bytes}-byte dtype, N={max_seq_len:,}: "
        f"naive {format_bytes(last['naive'], 'decimal')} vs flash "
        f"{format_bytes(last['flash'], 'decimal')} "
        f"({last['naive'] / last['flash']:,.0f}x less); {fits}"
    )


def attention_memory_dashboard(
    batch: int = 1,
    heads: int = 32,
    head_dim: int = 128,
    dtype_bytes: int = 2,
    max_seq_len: int = 65536,
    gpu_memory_gb: float = 80.0,
    interactive: bool | None = None,
):
    """The attention-memory dashboard (model preset, B, H, d, dtype, max N, GPU memory).

    ``interactive=None`` picks the interactive version inside a Jupyter kernel. Returns the
    :class:`~course_lib.widgets.dashboard.Dashboard` or the matplotlib figure.
    """
    _validate(batch, heads, head_dim, dtype_bytes, max_seq_len, gpu_memory_gb)
    preset = _preset_for(heads, head_dim)

    def controls():
        import ipywidgets as W

        style = {"description_width": "130px"}
        wide = W.Layout(width="560px")
        menu = W.Dropdown(options=[CUSTOM, *PRESETS], value=preset, description="model",
                          style=style, layout=wide)
        batch_s = W.IntSlider(value=batch, min=1, max=64, description="batch B", style=style,
                              layout=wide, continuous_update=False)
        heads_s = W.IntSlider(value=heads, min=1, max=128, description="heads H", style=style,
                              layout=wide, continuous_update=False)
        dim_d = W.Dropdown(options=sorted({*HEAD_DIMS, head_dim}), value=head_dim,
                           description="head_dim d", style=style, layout=wide)
        dtype_d = W.Dropdown(options=list(DTYPES.items()), value=dtype_bytes,
                             description="dtype", style=style, layout=wide)
        max_n = W.SelectionSlider(options=MAX_SEQ_LENS, value=max_seq_len,
                                  description="longest N", style=style, layout=wide,
                                  continuous_update=False)
        gpus = dict(GPUS)
        gpus.setdefault(f"{gpu_memory_gb:g} GB", gpu_memory_gb)
        gpu = W.Dropdown(options=list(gpus.items()), value=gpu_memory_gb,
                         description="GPU memory", style=style, layout=wide)

        def apply_preset(change) -> None:
            shape = PRESETS.get(change["new"])
            if shape is not None:
                heads_s.value, dim_d.value = shape

        menu.observe(apply_preset, names="value")
        return {"preset": menu, "batch": batch_s, "heads": heads_s, "head_dim": dim_d,
                "dtype_bytes": dtype_d, "max_seq_len": max_n, "gpu_memory_gb": gpu}

    return dashboard(
        draw_attention_memory,
        controls,
        defaults={"batch": batch, "heads": heads, "head_dim": head_dim,
                  "dtype_bytes": dtype_bytes, "max_seq_len": max_seq_len,
                  "gpu_memory_gb": gpu_memory_gb, "preset": preset},
        title="Attention memory vs sequence length: naive vs FlashAttention",
        interactive=interactive,
        figsize=(11, 4.2),
    )
