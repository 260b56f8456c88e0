"""LoRA layer speed: course_lib's LinearWithLoRA vs a frozen nn.Linear and vs PEFT's LoRA layer.

Shapes from COURSE_DESIGN.md's performance targets: d = k = 1024, r = 8, 4096 tokens, fp32,
2 threads. Every variant is timed once per round, rounds interleave the variants, and the
minimum over rounds is reported (this machine is noisy). Prints ratios; asserts nothing.

    python benchmarks/bench_lora_layer.py [--rounds N]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch
from torch import nn

import course_lib  # noqa: F401  (first: keeps bitsandbytes' hub-kernel warning off stderr)
from course_lib.model.lora import LinearWithLoRA

D = K = 1024
R = 8
TOKENS = 4096
ALPHA = 16


def _peft_layer(base: nn.Linear) -> nn.Module | None:
    """PEFT's LoRA layer around ``base`` (None when peft is not installed)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = get_peft_model(Holder(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"]))
    return model.base_model.model.proj


def _time_rounds(variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Minimum time of each variant over ``rounds`` rounds; every round runs each variant once,
    in a freshly shuffled order (so no variant always follows the same one)."""
    best = {name: float("inf") for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            variants[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40,
                        help="interleaved repetitions (default 40)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    base = nn.Linear(K, D)  # (out=d, in=k) with bias, as in a typical projection
    base.requires_grad_(False)
    ours = LinearWithLoRA(nn.Linear(K, D), r=R, lora_alpha=ALPHA)
    ours.base_layer.load_state_dict(base.state_dict())
    peft_base = nn.Linear(K, D)
    peft_base.load_state_dict(base.state_dict())
    peft = _peft_layer(peft_base)
    with torch.no_grad():  # a trained-looking adapter (B != 0) so merging changes the weight
        ours.lora.lora_B.normal_(0, 0.01)
        if peft is not None:
            peft.lora_A["default"].weight.copy_(ours.lora.lora_A)
            peft.lora_B["default"].weight.copy_(ours.lora.lora_B)

    x = torch.randn(TOKENS, K, requires_grad=True)  # as inside a network: x needs a gradient
    g = torch.randn(TOKENS, D)

    def train_step(layer: nn.Module) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            layer(x).backward(g)

        return step

    def infer(layer: nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                layer(x)

        return step

    train = {"frozen nn.Linear": train_step(base), "course_lib LoRA": train_step(ours)}
    if peft is not None:
        train["PEFT LoRA"] = train_step(peft)
    t = _time_rounds(train, args.rounds)

    merged = LinearWithLoRA(nn.Linear(K, D), r=R, lora_alpha=ALPHA)
    merged.load_state_dict(ours.state_dict())
    merged.merge()
    inference = {
        "plain nn.Linear": infer(base),
        "LoRA unmerged": infer(ours),
        "LoRA merged": infer(merged),
    }
    i = _time_rounds(inference, 3 * args.rounds)  # each is cheap: more rounds, a steadier min

    with torch.no_grad():
        check = (merged(x) - ours(x)).abs().max().item()
    print(f"LoRA layer benchmark: d=k={D}, r={R}, {TOKENS} tokens, fp32, "
          f"{torch.get_num_threads()} threads, min of {args.rounds} interleaved rounds")
    print("forward+backward (input needs grad, base frozen):")
    for name, seconds in t.items():
        print(f"  {name:<18s} {seconds * 1e3:8.2f} ms")
    print(f"  course_lib LoRA / frozen nn.Linear : {t['course_lib LoRA'] / t['frozen nn.Linear']:.3f}x"
          "  (target <= 1.30x)")
    if peft is not None:
        print(f"  course_lib LoRA / PEFT LoRA       : {t['course_lib LoRA'] / t['PEFT LoRA']:.3f}x"
              "  (target <= 1.00x)")
    else:
        print("  PEFT not installed: no PEFT comparison")
    print(f"inference (torch.no_grad, min of {3 * args.rounds} rounds):")
    for name, seconds in i.items():
        print(f"  {name:<18s} {seconds * 1e3:8.2f} ms")
    print(f"  merged / plain nn.Linear           : {i['LoRA merged'] / i['plain nn.Linear']:.3f}x"
          "  (target <= 1.05x)")
    print(f"  unmerged / plain nn.Linear         : {i['LoRA unmerged'] / i['plain nn.Linear']:.3f}x")
    print(f"  max |merged - unmerged| output     : {check:.2e}")


if __name__ == "__main__":
    main()
