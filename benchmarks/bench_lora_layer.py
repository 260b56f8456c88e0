"""LoRA layer speed: plain vs fused LinearWithLoRA, a frozen nn.Linear and PEFT's LoRA layer.

Shapes from COURSE_DESIGN.md's performance targets: d = k = 1024, r = 8, 4096 tokens, fp32,
2 threads. Three tables, each timed in one run with interleaved rounds (every round calls every
variant once, the order rotates between blocks of rounds) and the minimum over rounds reported
(this machine is shared and noisy):

1. forward + backward of one layer (input needs grad, base frozen): frozen ``nn.Linear``,
   ``LinearWithLoRA(fused=False)`` (the plain formula), ``LinearWithLoRA(fused=True)`` (the
   :mod:`course_lib.kernels.lora` path) on an ``nn.Linear`` (one node with the base GEMM) and on
   an ``nn.Linear`` subclass (the node that adds the update to any other base's output, as for
   QLoRA's quantised layers), and PEFT's ``lora.Linear``;
2. inference under ``torch.no_grad``: a plain layer vs LoRA unmerged (both paths) and merged;
3. one training step of the course's TinyGPT with LoRA on q_proj / v_proj (notebook 02's
   recipe: 64 questions, AdamW), plain vs fused.

Prints times and ratios; asserts nothing.

    python benchmarks/bench_lora_layer.py [--rounds N] [--threads T]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import course_lib  # noqa: F401  (first: keeps bitsandbytes' hub-kernel warning off stderr)
from course_lib.model.lora import LinearWithLoRA, LoRAConfig, apply_lora, lora_layers
from course_lib.utils.benchmark import compare

D = K = 1024
R = 8
TOKENS = 4096
ALPHA = 16


class SubLinear(nn.Linear):
    """Not an nn.Linear itself, so the fused path runs it and adds the update to its output."""


def peft_layer(base: nn.Linear) -> nn.Module | None:
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


def backward_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(grad)

    return step


def no_grad_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)

    return step


def min_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Minimum seconds of each function over (at least) ``rounds`` interleaved rounds, split
    over every rotation of the order, so that no variant always runs after the same one."""
    names = list(fns)
    best = dict.fromkeys(names, float("inf"))
    for i in range(len(names)):
        order = names[i:] + names[:i]
        times = compare({n: fns[n] for n in order}, repeat=-(-rounds // len(names)))
        best = {n: min(best[n], times[n].min) for n in names}
    return best


def print_rows(title: str, times: dict[str, float], ratios: list[tuple[str, str, str]]) -> None:
    print(title)
    for name, seconds in times.items():
        print(f"  {name:<28s} {seconds * 1e3:9.2f} ms")
    for a, b, target in ratios:
        label = f"{a} / {b}"
        print(f"  {label:<50s} {times[a] / times[b]:6.3f}x  {target}")


def bench_layer(rounds: int) -> None:
    torch.manual_seed(0)
    frozen = nn.Linear(K, D).requires_grad_(False)  # (out=d, in=k) with bias, as a projection
    layers = {}
    for name, base_cls, fused in (("plain LoRA", nn.Linear, False),
                                  ("fused LoRA", nn.Linear, True),
                                  ("fused LoRA, other base", SubLinear, True)):
        base = base_cls(K, D)
        base.load_state_dict(frozen.state_dict())
        layers[name] = LinearWithLoRA(base, r=R, lora_alpha=ALPHA, fused=fused)
    plain, fused = layers["plain LoRA"], layers["fused LoRA"]
    with torch.no_grad():  # a trained-looking adapter (B != 0), the same in every variant
        plain.lora.lora_B.normal_(0, 0.01)
        for layer in layers.values():
            layer.lora.load_state_dict(plain.lora.state_dict())
    peft_base = nn.Linear(K, D)
    peft_base.load_state_dict(frozen.state_dict())
    peft = peft_layer(peft_base)
    if peft is not None:
        with torch.no_grad():
            peft.lora_A["default"].weight.copy_(plain.lora.lora_A)
            peft.lora_B["default"].weight.copy_(plain.lora.lora_B)

    x = torch.randn(TOKENS, K, requires_grad=True)  # as inside a network: x needs a gradient
    grad = torch.randn(TOKENS, D)
    variants = {"frozen nn.Linear": frozen, **layers}
    if peft is not None:
        variants["PEFT LoRA"] = peft
    t = min_times({n: backward_step(m, x, grad) for n, m in variants.items()}, rounds)
    ratios = [("plain LoRA", "frozen nn.Linear", "(target <= 1.30x)"),
              ("fused LoRA", "frozen nn.Linear", "(target <= 1.30x)"),
              ("fused LoRA, other base", "frozen nn.Linear", ""),
              ("plain LoRA", "fused LoRA", "(fused kept only if >= 1.10x)"),
              ("plain LoRA", "fused LoRA, other base", "(fused kept only if >= 1.10x)")]
    if peft is not None:
        ratios += [("plain LoRA", "PEFT LoRA", "(target <= 1.00x)"),
                   ("fused LoRA", "PEFT LoRA", "(target <= 1.00x)")]
    print_rows(f"forward+backward, input needs grad, base frozen (min of {rounds}):", t, ratios)
    if peft is None:
        print("  PEFT not installed: no PEFT row")

    merged = LinearWithLoRA(nn.Linear(K, D), r=R, lora_alpha=ALPHA)
    merged.load_state_dict(fused.state_dict())
    merged.merge()
    inference = {"plain nn.Linear": frozen, "LoRA unmerged, plain": plain,
                 "LoRA unmerged, fused": fused, "LoRA merged": merged}
    t = min_times({n: no_grad_step(m, x) for n, m in inference.items()}, 3 * rounds)
    print_rows(f"inference, torch.no_grad (min of {3 * rounds}):", t, [
        ("LoRA merged", "plain nn.Linear", "(target <= 1.05x)"),
        ("LoRA unmerged, plain", "plain nn.Linear", ""),
        ("LoRA unmerged, fused", "plain nn.Linear", ""),
    ])
    with torch.no_grad():
        print(f"  max |merged - unmerged| output: {(merged(x) - fused(x)).abs().max().item():.2e}"
              f", max |fused - plain|: {(fused(x) - plain(x)).abs().max().item():.2e}")


def bench_tinygpt(rounds: int) -> None:
    from course_lib.data import ADAPT_TASK, make_batch, make_split
    from course_lib.model.tinygpt import load_pretrained
    from course_lib.train import TrainConfig, make_optimizer, train_step

    examples, _ = make_split(ADAPT_TASK, n_train=64, n_val=1, seed=0)
    batch = make_batch(examples)
    steps = {}
    for name, fused in (("TinyGPT step, plain LoRA", False), ("TinyGPT step, fused LoRA", True)):
        torch.manual_seed(0)
        model = apply_lora(load_pretrained(), LoRAConfig(r=8, lora_alpha=16))
        for _, layer in lora_layers(model):
            layer.fused = fused
        optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
        steps[name] = lambda model=model, optimizer=optimizer: train_step(model, optimizer, batch)
    t = min_times(steps, rounds)
    print_rows(f"TinyGPT training step, 64 questions, LoRA r=8 on q_proj/v_proj "
               f"(min of {rounds}):", t,
               [("TinyGPT step, plain LoRA", "TinyGPT step, fused LoRA", "")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40,
                        help="interleaved repetitions (default 40)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    if args.rounds <= 0 or args.threads <= 0:
        parser.error("--rounds and --threads must be positive ints")
    torch.set_num_threads(args.threads)
    print(f"LoRA layer benchmark: d=k={D}, r={R}, {TOKENS} tokens, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    bench_layer(args.rounds)
    bench_tinygpt(args.rounds)


if __name__ == "__main__":
    main()
