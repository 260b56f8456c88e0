"""NF4 speed: course_lib.model.nf4 vs bitsandbytes on CPU, and 4-bit linear layers vs dense.

1. Quantise and dequantise one 4096 x 4096 fp32 tensor at blocksize 64 (COURSE_DESIGN.md's
   target: quantise <= 1.5x and dequantise <= 2.0x bitsandbytes' CPU time, bit-exact). The
   results are checked for bit-equality before anything is timed.
2. Forward time of a 4096 -> 4096 linear layer: course_lib's NF4Linear and bitsandbytes'
   Linear4bit (both dequantise the weight on the fly) vs a dense fp32 nn.Linear, for a few
   token counts: with few tokens the dequantisation dominates, with many the matmul does.

Every variant is timed once per round, rounds interleave the variants and the minimum is
reported (this machine is noisy). Prints tables of times and ratios; asserts nothing.

    python benchmarks/bench_nf4.py [--rounds N] [--size N] [--skip-linear]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import course_lib  # noqa: F401  (first: keeps bitsandbytes' hub-kernel warning off stderr)
from course_lib.model.nf4 import dequantize_nf4, quantize_nf4
from course_lib.utils.benchmark import compare, format_seconds


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        return None, None
    return bnb, F


def bench_quantise(size: int, rounds: int) -> None:
    bnb, F = _bnb()
    torch.manual_seed(0)
    w = torch.randn(size, size) * 0.02
    packed, state = quantize_nf4(w, 64)
    print(f"\n## NF4 quantise / dequantise, {size} x {size} fp32, blocksize 64, min of {rounds}")
    if F is None:
        print("bitsandbytes is not installed: timing course_lib only")
        t = compare(
            {"q": lambda: quantize_nf4(w, 64), "d": lambda: dequantize_nf4(packed, state)},
            repeat=rounds,
        )
        print(f"quantise {format_seconds(t['q'].min)}, dequantise {format_seconds(t['d'].min)}")
        return
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    same = torch.equal(packed, ref_packed.view(-1)) and torch.equal(state.absmax, ref_state.absmax)
    same_out = torch.equal(
        dequantize_nf4(packed, state), F.dequantize_4bit(ref_packed, ref_state, quant_type="nf4")
    )
    print(f"bit-exact: codes+absmax {same}, dequantised {same_out}")
    t = compare(
        {
            "course_lib quantise": lambda: quantize_nf4(w, 64),
            "bitsandbytes quantise": lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"),
            "course_lib dequantise": lambda: dequantize_nf4(packed, state),
            "bitsandbytes dequantise": lambda: F.dequantize_4bit(
                ref_packed, ref_state, quant_type="nf4"
            ),
        },
        repeat=rounds,
    )
    q = t["course_lib quantise"].min / t["bitsandbytes quantise"].min
    d = t["course_lib dequantise"].min / t["bitsandbytes dequantise"].min
    print("| step | course_lib | bitsandbytes | ratio (target) |")
    print("|---|---|---|---|")
    print(
        f"| quantise | {format_seconds(t['course_lib quantise'].min)} | "
        f"{format_seconds(t['bitsandbytes quantise'].min)} | {q:.2f}x (<= 1.5x) |"
    )
    print(
        f"| dequantise | {format_seconds(t['course_lib dequantise'].min)} | "
        f"{format_seconds(t['bitsandbytes dequantise'].min)} | {d:.2f}x (<= 2.0x) |"
    )


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
    try:
        from course_lib.model.qlora import NF4Linear
    except ImportError as exc:  # qlora.py not written yet
        print(f"\n## 4-bit linear forward: skipped ({exc})")
        return
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    parser.add_argument("--skip-linear", action="store_true", help="only quantise/dequantise")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_quantise(args.size, args.rounds)
    if not args.skip_linear:
        bench_linear(args.size, max(3, args.rounds // 3), tokens=[8, 128, 2048])


if __name__ == "__main__":
    main()
