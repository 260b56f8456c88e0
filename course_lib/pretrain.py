"""Pretrain TinyGPT on the addition task and write the course's weights asset.

Run from the repository root::

    python -m course_lib.pretrain            # writes course_lib/assets/tinygpt.safetensors + .json

It is reproducible: the seed fixes the initial weights and the training examples, training runs
in fp32 on the CPU, and the thread count is fixed (``--threads``, default 1: floating-point sums
split over a different number of threads round differently, and one thread also keeps the run
fast on a busy machine). A rerun on the same machine writes a byte-identical file (compare the
``sha256`` it prints with the manifest's). It prints the seed, the number of steps and the time
taken; the manifest ``tinygpt.json`` records them together with the model config and the checksum
that :func:`course_lib.model.tinygpt.load_pretrained` verifies.

On the course's 2-core machine the default run (1500 steps of 128 questions, one thread) took
3.5 to 5 minutes depending on the other load, and reaches 100 % exact match on the validation
questions.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from course_lib.data import ADAPT_TASK, PRETRAIN_TASK, TOKENIZER, make_split
from course_lib.model.tinygpt import WEIGHTS_FILE, TinyGPT, TinyGPTConfig, save_pretrained
from course_lib.train import TrainConfig, exact_match, train

DEFAULTS = dict(
    steps=1500,  # optimiser steps
    batch_size=128,  # examples per step; every example is a fresh question (one epoch in all)
    lr=2e-3,  # peak learning rate (linear warm-up, then cosine decay to 10 %)
    warmup_steps=100,
    weight_decay=0.1,
    seed=0,  # seeds the initial weights and which training questions are drawn
    threads=1,  # torch.set_num_threads: the result bits depend on it, so it is fixed
    eval_examples=1024,  # validation questions scored at the end
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.pretrain",
        description="Pretrain TinyGPT on 3-digit addition and write its safetensors asset.",
    )
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    parser.add_argument("--eval-examples", type=int, default=DEFAULTS["eval_examples"])
    parser.add_argument(
        "--out",
        type=Path,
        default=WEIGHTS_FILE,
        help="weights file to write; the manifest goes next to it with a .json suffix "
        "(default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "eval_examples"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive int")
    return args


def pretrain(args: argparse.Namespace) -> dict:
    """Train from scratch with ``args`` and write the weights; returns the manifest.

    Uses ``args.threads`` threads and restores the previous thread count afterwards.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _pretrain(args)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    config = TinyGPTConfig(vocab_size=TOKENIZER.vocab_size)
    model = TinyGPT(config)
    train_set, val_set = make_split(
        PRETRAIN_TASK, args.steps * args.batch_size, args.eval_examples, seed=args.seed
    )
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=DEFAULTS["warmup_steps"],
        schedule="cosine",
        weight_decay=DEFAULTS["weight_decay"],
        grad_clip=1.0,
        seed=args.seed,
    )
    print(
        f"pretraining TinyGPT ({model.num_parameters():,} parameters) on {PRETRAIN_TASK!r}: "
        f"seed={args.seed} steps={args.steps} batch_size={args.batch_size} lr={args.lr} "
        f"threads={args.threads}",
        flush=True,
    )
    start = time.perf_counter()
    history = train(
        model,
        train_set,
        train_config,
        val_examples=val_set,
        progress=not args.no_progress,
        desc="pretrain",
    )
    seconds = time.perf_counter() - start
    _, adapt_val = make_split(ADAPT_TASK, 0, args.eval_examples)
    adapt_accuracy = exact_match(model, adapt_val)
    manifest = save_pretrained(
        model,
        args.out,
        extra={
            "pretraining": {
                "command": "python -m course_lib.pretrain",
                "task": PRETRAIN_TASK,
                "seed": args.seed,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "threads": args.threads,
                "final_loss": round(history.final_loss, 6),
                "val_accuracy": history.final_accuracy,
                f"{ADAPT_TASK}_accuracy": adapt_accuracy,
                "val_examples": args.eval_examples,
                "seconds": round(seconds, 1),
                "torch": torch.__version__,
                "machine": platform.machine(),
            }
        },
    )
    print(
        f"done in {seconds:.1f} s: final loss {history.final_loss:.4f}, exact match "
        f"{history.final_accuracy:.1%} on {args.eval_examples} validation questions of "
        f"{PRETRAIN_TASK!r} ({adapt_accuracy:.1%} on {ADAPT_TASK!r} before fine-tuning)"
    )
    print(
        f"wrote {args.out} ({manifest['bytes'] / 2**20:.2f} MiB, sha256 {manifest['sha256']}) "
        f"and {Path(args.out).with_suffix('.json').name}"
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    pretrain(parse_args(argv))


if __name__ == "__main__":
    main()
