"""LoRA rank sweep on TinyGPT (the lesson's exercise 2), as a table.

Fine-tunes the course's pretrained TinyGPT on the adaptation task (carry-less addition) with
the recipe of notebook 02 — 60 AdamW steps of 64 questions, warm-up + cosine schedule, gradient
clipping 1.0, LoRA with ``lora_alpha = 2r`` — for every rank, plus full fine-tuning as the
reference and "q/v only vs all linear layers" at an equal parameter budget (q/v r=9 and
all-linear r=2 train exactly 18,432 parameters each). Prints one row per run: rank, target
modules, trainable parameters, share of full fine-tuning's, exact-match accuracy on 512
validation questions, and seconds (training steps only, evaluation excluded).

Accuracies are deterministic for a fixed thread count; seconds vary with the machine's load.

    python benchmarks/bench_lora_sweep.py [--ranks 1,2,4,8,16,32,64] [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from course_lib.data import ADAPT_TASK, make_split
from course_lib.model.lora import LoRAConfig, apply_lora
from course_lib.model.tinygpt import load_pretrained
from course_lib.train import TrainConfig, exact_match, train

QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
FULL_LR, LORA_LR = 1e-3, 1e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64", help="comma-separated ranks")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--n-val", type=int, default=512, help="validation questions")
    parser.add_argument("--skip-budget", action="store_true", help="skip q/v vs all-linear")
    args = parser.parse_args(argv)
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        parser.error(f"--ranks must be comma-separated positive ints, got {args.ranks!r}")
    if any(r <= 0 for r in args.ranks):
        parser.error(f"--ranks must be positive, got {args.ranks}")
    for name in ("steps", "threads", "n_val"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive int")
    return args


def run(train_set, val_set, steps: int, r: int | None, targets: list[str] | None) -> tuple:
    """One fine-tuning run; ``r=None`` is full fine-tuning. Returns (params, accuracy, seconds)."""
    torch.manual_seed(0)
    model = load_pretrained()
    if r is None:
        model.requires_grad_(True)
        lr = FULL_LR
    else:
        apply_lora(model, LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets))
        lr = LORA_LR
    config = TrainConfig(
        steps=steps,
        batch_size=64,
        grad_accum_steps=2,
        lr=lr,
        warmup_steps=10,
        schedule="cosine",
        grad_clip=1.0,
        seed=0,
    )
    hist = train(model, train_set, config, val_examples=val_set, progress=False)
    return hist.trainable_params, hist.final_accuracy, hist.train_seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, val_set = make_split(ADAPT_TASK, n_train=2048, n_val=args.n_val, seed=0)
    base_acc = exact_match(load_pretrained(), val_set)
    print(
        f"LoRA rank sweep: TinyGPT on {ADAPT_TASK!r}, {args.steps} steps x 64 questions, "
        f"{len(val_set)} validation questions, {args.threads} thread(s), torch {torch.__version__}"
    )
    print(f"pretrained model before fine-tuning: {base_acc:.1%}\n")
    header = f"{'run':<22s} {'rank':>4s} {'trainable params':>17s} {'% of full':>9s} "
    header += f"{'accuracy':>9s} {'seconds':>8s}"
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    full_params, full_acc, full_s = run(train_set, val_set, args.steps, None, None)

    def row(name: str, r: int | str, params: int, acc: float, seconds: float) -> None:
        print(
            f"{name:<22s} {r!s:>4s} {params:17,d} {params / full_params:9.2%} {acc:9.1%} "
            f"{seconds:8.1f}"
        )

    row("full fine-tuning", "-", full_params, full_acc, full_s)
    for r in args.ranks:
        row("LoRA q, v", r, *run(train_set, val_set, args.steps, r, QV))
    if not args.skip_budget:
        print("equal parameter budget:")
        row("LoRA q, v", 9, *run(train_set, val_set, args.steps, 9, QV))
        row("LoRA all linear", 2, *run(train_set, val_set, args.steps, 2, ALL_LINEAR))
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
