"""NF4 speed: course_lib.model.nf4 (plain reference and fast path) vs bitsandbytes on CPU.

1. Quantise and dequantise fp32 weights at blocksize 64, three implementations side by side:
   **plain** (the lesson's reference: ``dequantize_nf4(..., fast=False)``, the textbook gather
   ``codebook[codes] * absmax``), **fast** (the default path, ``course_lib.kernels.nf4``: one
   lookup per byte) and **bitsandbytes**. Quantising has one path only (the reference is also the
   default), so its "fast" column is empty. Every result is checked for bit-equality before
   anything is timed. Shapes: 4096 x 4096 (a LLaMA-7B projection, COURSE_DESIGN.md's target:
   quantise <= 1.5x and dequantise <= 2.0x bitsandbytes' CPU time), 1024 x 4096 (notebook 03)
   and 128 x 512 (an MLP layer of the course's TinyGPT, dequantised on every forward pass).
2. Forward time of a 4096 -> 4096 linear layer: course_lib's NF4Linear and bitsandbytes'
   Linear4bit (both dequantise the weight on the fly) vs a dense fp32 nn.Linear, for a few
   token counts: with few tokens the dequantisation dominates, with many the matmul does.

Every variant is timed once per round, rounds interleave the variants and the minimum is
reported (this machine is noisy). Prints tables of times and ratios; asserts nothing.

    python benchmarks/bench_nf4.py [--rounds N] [--shapes 4096x4096,128x512] [--skip-linear]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import course_lib  # noqa: F401  (first: keeps bitsandbytes' hub-kernel warning off stderr)
from course_lib.model.nf4 import dequantize_nf4, quantize_nf4
from course_lib.utils.benchmark import compare, format_seconds

SHAPES = "4096x4096,1024x4096,128x512"


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        return None, None
    return bnb, F


def _rounds_for(numel: int, rounds: int) -> int:
    # Small tensors take microseconds: more rounds cost nothing and steady the minimum.
    return rounds if numel >= 1 << 22 else rounds * 10


def bench_shape(shape: tuple[int, int], rounds: int) -> list[str]:
    """Table rows (quantise, dequantise) for one shape; checks bit-exactness first."""
    _, F = _bnb()
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    packed, state = quantize_nf4(w, 64)
    fns = {
        "q plain": lambda: quantize_nf4(w, 64),
        "d plain": lambda: dequantize_nf4(packed, state, fast=False),
        "d fast": lambda: dequantize_nf4(packed, state),
    }
    same = torch.equal(fns["d plain"](), fns["d fast"]())
    if F is not None:
        ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        same = same and torch.equal(packed, ref_packed.view(-1))
        same = same and torch.equal(state.absmax, ref_state.absmax)
        same = same and torch.equal(
            fns["d fast"](), F.dequantize_4bit(ref_packed, ref_state, quant_type="nf4")
        )
        fns["q bnb"] = lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        fns["d bnb"] = lambda: F.dequantize_4bit(ref_packed, ref_state, quant_type="nf4")
    t = {name: timing.min for name, timing in compare(fns, repeat=_rounds_for(w.numel(), rounds)).items()}
    label = f"{shape[0]} x {shape[1]}"
    exact = "yes" if same else "**NO**"

    def row(step: str, plain: float, fast: float | None, bnb: float | None, target: str) -> str:
        fast_cells = "— | —" if fast is None else f"{format_seconds(fast)} | {plain / fast:.2f}x"
        used = plain if fast is None else fast  # what quantize_nf4 / dequantize_nf4 run by default
        if bnb is None:
            return f"| {label} | {step} | {format_seconds(plain)} | {fast_cells} | n/a | n/a | {exact} |"
        return (
            f"| {label} | {step} | {format_seconds(plain)} | {fast_cells} | {format_seconds(bnb)} "
            f"| {used / bnb:.2f}x ({target}) | {exact} |"
        )

    return [
        row("quantise", t["q plain"], None, t.get("q bnb"), "<= 1.5x"),
        row("dequantise", t["d plain"], t["d fast"], t.get("d bnb"), "<= 2.0x"),
    ]


def bench_quantise(shapes: list[tuple[int, int]], rounds: int) -> None:
    _, F = _bnb()
    print(f"\n## NF4 quantise / dequantise, fp32, blocksize 64, min of {rounds} rounds "
          f"({10 * rounds} below 4M weights)")
    if F is None:
        print("bitsandbytes is not installed: its columns read n/a")
    print("| shape | step | plain (reference) | fast (default) | plain / fast | bitsandbytes "
          "| default / bitsandbytes (target) | bit-exact |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for line in bench_shape(shape, rounds):
            print(line)


def _bnb_linear4bit(bnb, dense: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        bias=dense.bias is not None,
        compute_dtype=torch.float32,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=64
    )._quantize("cpu")
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    return layer


def bench_linear(size: int, rounds: int, tokens: list[int]) -> None:
    from course_lib.model.qlora import NF4Linear

    bnb, _ = _bnb()
    torch.manual_seed(0)
    dense = nn.Linear(size, size).requires_grad_(False)
    ours = NF4Linear.from_linear(dense, compute_dtype=torch.float32)
    theirs = _bnb_linear4bit(bnb, dense) if bnb is not None else None
    print(f"\n## Linear forward {size} -> {size}, fp32 activations, min of {rounds}")
    print("| tokens | nn.Linear | NF4Linear | ratio | bnb Linear4bit | ratio |")
    print("|---|---|---|---|---|---|")
    for n in tokens:
        x = torch.randn(n, size)
        fns = {"dense": lambda x=x: dense(x), "nf4": lambda x=x: ours(x)}
        if theirs is not None:
            fns["bnb"] = lambda x=x: theirs(x)
        with torch.no_grad():
            t = compare(fns, repeat=rounds)
        base = t["dense"].min
        row = f"| {n} | {format_seconds(base)} | {format_seconds(t['nf4'].min)} | "
        row += f"{t['nf4'].min / base:.2f}x |"
        if theirs is not None:
            row += f" {format_seconds(t['bnb'].min)} | {t['bnb'].min / base:.2f}x |"
        else:
            row += " n/a | n/a |"
        print(row)


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(side) for side in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes must look like 4096x4096,128x512, got {text!r}")
    return shapes  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--shapes", type=_shapes, default=_shapes(SHAPES), help=f"default {SHAPES}")
    parser.add_argument("--size", type=int, default=4096, help="linear layer side (default 4096)")
    parser.add_argument("--skip-linear", action="store_true", help="only quantise/dequantise")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_quantise(args.shapes, args.rounds)
    if not args.skip_linear:
        bench_linear(args.size, max(3, args.rounds // 3), tokens=[8, 128, 2048])


if __name__ == "__main__":
    main()
