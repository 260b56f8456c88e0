"""What the lesson claims about trained results, checked with honest tolerances.

A trained accuracy or loss is not the same on every CPU. The SIMD kernels PyTorch and MKL pick
(AVX-512, AVX2, ARM NEON, or PyTorch's portable ones) change the last bits of sums and matrix
products, and a few dozen optimiser steps amplify those bits into visible differences: LoRA r=8
in notebook 02 reaches 97.3 % on one kernel path of the course's machine and 99.0 % on another.
A notebook therefore prints the measured figures in an ``# NBVAL_IGNORE_OUTPUT`` cell, and then,
in a compared cell, the claims below: what the lesson says about those figures (an ordering, a
threshold, a ratio band), one line ``<statement>: True`` each::

    print(finetuning_claims(base_accuracy=0.156, full_accuracy=1.0, lora_accuracy=0.973,
                            lora_params=16_384, full_params=793_472))

Every threshold leaves room for the spread a correct implementation shows across CPUs and seeds
(the ranges measured are given next to each constant) and still fails a broken implementation:
``tests/test_claims.py`` trains the broken ones (LoRA with a frozen B or a 4x too small
scaling, QLoRA with a broken dequantisation, gradient accumulation that loses micro-batches)
and shows that their results do not pass. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from course_lib.validation import check_number, positive_int

__all__ = [
    "Claim",
    "Claims",
    "finetuning_claims",
    "rank_sweep_claims",
    "budget_claims",
    "merge_claims",
    "quantised_base_claims",
    "qlora_claims",
    "accumulation_claims",
    "optimizer_8bit_claims",
]


@dataclass(frozen=True)
class Claim:
    """One statement about measured results and whether they bear it out."""

    statement: str
    holds: bool

    def __str__(self) -> str:
        return f"{self.statement}: {self.holds}"


@dataclass(frozen=True)
class Claims:
    """The claims a notebook cell prints, one per line; ``holds`` is True when all of them hold."""

    items: tuple[Claim, ...]

    @property
    def holds(self) -> bool:
        return all(claim.holds for claim in self.items)

    def failed(self) -> list[str]:
        """The statements that do not hold."""
        return [claim.statement for claim in self.items if not claim.holds]

    def __str__(self) -> str:
        return "\n".join(str(claim) for claim in self.items)


def _claims(*pairs: tuple[str, bool]) -> Claims:
    return Claims(tuple(Claim(statement, bool(holds)) for statement, holds in pairs))


def _accuracy(name: str, value: object) -> float:
    return check_number(name, value, low=0.0, high=1.0, hint="a fraction, e.g. 0.97")


def _accuracies(name: str, values: Mapping[int, float], needed: Sequence[int]) -> dict[int, float]:
    if not isinstance(values, Mapping):
        raise TypeError(f"{name} must be a mapping rank -> accuracy, got {type(values).__name__}")
    missing = [r for r in needed if r not in values]
    if missing:
        raise ValueError(f"{name} must have the ranks {list(needed)}, missing {missing}")
    return {r: _accuracy(f"{name}[{r}]", a) for r, a in values.items()}


def _losses(name: str, values: Sequence[float]) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty sequence of losses, got {values!r}")
    return [check_number(f"{name}[{i}]", v, low=0.0) for i, v in enumerate(values)]


# --------------------------------------------------------------------------------------------
# Notebook 02: LoRA fine-tuning of TinyGPT on carry-less addition (60 steps, 512 questions)
# --------------------------------------------------------------------------------------------

# Before fine-tuning the model answers only the questions without a carry (15.6 %).
BASE_MAX = 0.30
# Full fine-tuning: 100 % for seeds 0-2 and on every kernel path tried.
FULL_MIN = 0.95
# LoRA r=8 on q, v as a share of full fine-tuning: 96.3-100 % over seeds 0-8 and four kernel
# paths. A frozen B stays at 15.6 %; a 4x too small scaling (r/alpha instead of alpha/r) gives
# 88.3-92.8 %. (Scaling off by 2x only acts like a smaller learning rate: 90.8-96.5 %, which no
# honest threshold separates from a correct run; the check cells of notebook 01 catch it.)
LORA_SHARE_MIN = 0.95
# The lesson's parameter budget for that accuracy.
LORA_PARAMS_MAX = 0.05
# r=1 is too small a rank: 68.6-76.4 %, at least 20 points below r=8.
LOW_RANK_GAP = 0.10
# r=64 trains 8x the parameters of r=8 for at most 2.1 points more (seeds 0-2, kernel paths).
HIGH_RANK_GAIN_MAX = 0.05
# Same parameter budget, q/v r=9 vs all linear layers r=2: 98.6-99.8 %, at most 1 point apart.
BUDGET_GAP_MAX = 0.03


def finetuning_claims(
    base_accuracy: float,
    full_accuracy: float,
    lora_accuracy: float,
    lora_params: int,
    full_params: int,
) -> Claims:
    """Full fine-tuning works, and LoRA r=8 gets close to it with a small share of parameters."""
    base = _accuracy("base_accuracy", base_accuracy)
    full = _accuracy("full_accuracy", full_accuracy)
    lora = _accuracy("lora_accuracy", lora_accuracy)
    lora_n = positive_int("lora_params", lora_params)
    full_n = positive_int("full_params", full_params)
    return _claims(
        (
            f"full fine-tuning lifts the accuracy from under {BASE_MAX:.0%} to at least "
            f"{FULL_MIN:.0%}",
            base < BASE_MAX and full >= FULL_MIN,
        ),
        (
            f"LoRA r=8 on q, v reaches at least {LORA_SHARE_MIN:.0%} of full fine-tuning's "
            f"accuracy with under {LORA_PARAMS_MAX:.0%} of its trainable parameters",
            full > 0 and lora >= LORA_SHARE_MIN * full and lora_n < LORA_PARAMS_MAX * full_n,
        ),
    )


def rank_sweep_claims(accuracy_by_rank: Mapping[int, float], full_accuracy: float) -> Claims:
    """Exercise 2: accuracy rises with the rank, then saturates (pitfall 1: bigger is not better).

    ``accuracy_by_rank`` must hold the ranks 1, 8 and 64 (others are allowed).
    """
    acc = _accuracies("accuracy_by_rank", accuracy_by_rank, (1, 8, 64))
    full = _accuracy("full_accuracy", full_accuracy)
    high = [r for r in acc if r >= 8]
    return _claims(
        (
            f"r=1 is at least {100 * LOW_RANK_GAP:.0f} points below r=8 (too little capacity)",
            acc[8] - acc[1] >= LOW_RANK_GAP,
        ),
        (
            f"every rank from r=8 on reaches at least {LORA_SHARE_MIN:.0%} of full "
            f"fine-tuning's accuracy",
            all(acc[r] >= LORA_SHARE_MIN * full for r in high),
        ),
        (
            f"r=64 trains 8x the parameters of r=8 but gains at most "
            f"{100 * HIGH_RANK_GAIN_MAX:.0f} points",
            acc[64] - acc[8] <= HIGH_RANK_GAIN_MAX,
        ),
    )


def budget_claims(qv_accuracy: float, all_linear_accuracy: float, full_accuracy: float) -> Claims:
    """Exercise 2 (c): at the same parameter budget, q/v only is as good as all linear layers."""
    qv = _accuracy("qv_accuracy", qv_accuracy)
    every = _accuracy("all_linear_accuracy", all_linear_accuracy)
    full = _accuracy("full_accuracy", full_accuracy)
    return _claims(
        (
            f"both reach at least {LORA_SHARE_MIN:.0%} of full fine-tuning's accuracy",
            min(qv, every) >= LORA_SHARE_MIN * full,
        ),
        (
            f"they are at most {100 * BUDGET_GAP_MAX:.0f} points apart",
            abs(qv - every) <= BUDGET_GAP_MAX,
        ),
    )


def merge_claims(unmerged_accuracy: float, merged_accuracy: float, n_examples: int) -> Claims:
    """Merging ``W0 + scaling * B A`` changes the model only by fp32 rounding."""
    before = _accuracy("unmerged_accuracy", unmerged_accuracy)
    after = _accuracy("merged_accuracy", merged_accuracy)
    n = positive_int("n_examples", n_examples)
    changed = round(abs(before - after) * n)
    return _claims(
        (
            f"merging changes at most one of the {n} answers (fp32 rounding can tip a close call)",
            changed <= 1,
        ),
    )


# --------------------------------------------------------------------------------------------
# Notebook 03: NF4 base model, QLoRA vs fp32 LoRA (exercise 3: 150 steps, 256 questions)
# --------------------------------------------------------------------------------------------

# Addition (the pretraining task) after quantising to NF4 + double quantisation: 100 %, as fp32.
QUANTISED_MIN = 0.95
QUANTISED_GAP_MAX = 0.02
# Exercise 3: fp32 LoRA and QLoRA both at 100 % for seeds 0-2 (both backends).
EX3_MIN = 0.95
EX3_GAP_MAX = 0.03
# The NF4 model is 6.2x smaller than the fp32 one (exact bytes: 3,239,424 vs 525,600).
EX3_SHRINK_MIN = 5.0


def quantised_base_claims(fp32_accuracy: float, quantised: Mapping[str, float]) -> Claims:
    """A 4-bit NF4 base keeps the pretrained model's ability (before any fine-tuning).

    ``quantised`` maps a label (e.g. the backend) to that model's accuracy on the pretraining task.
    """
    fp32 = _accuracy("fp32_accuracy", fp32_accuracy)
    if not isinstance(quantised, Mapping) or not quantised:
        raise TypeError(f"quantised must be a non-empty mapping label -> accuracy, got {quantised!r}")
    acc = {str(k): _accuracy(f"quantised[{k!r}]", v) for k, v in quantised.items()}
    return _claims(*(
        (
            f"{label}: at least {QUANTISED_MIN:.0%} on addition, within "
            f"{100 * QUANTISED_GAP_MAX:.0f} points of the fp32 model",
            a >= QUANTISED_MIN and fp32 - a <= QUANTISED_GAP_MAX,
        )
        for label, a in acc.items()
    ))


def qlora_claims(
    base_accuracy: float,
    lora_accuracy: float,
    qlora_accuracy: float,
    lora_bytes: int,
    qlora_bytes: int,
) -> Claims:
    """Exercise 3: QLoRA matches fp32 LoRA's accuracy with a several times smaller model."""
    base = _accuracy("base_accuracy", base_accuracy)
    lora = _accuracy("lora_accuracy", lora_accuracy)
    qlora = _accuracy("qlora_accuracy", qlora_accuracy)
    lora_b = positive_int("lora_bytes", lora_bytes)
    qlora_b = positive_int("qlora_bytes", qlora_bytes)
    return _claims(
        (
            f"fp32 LoRA and QLoRA both lift the accuracy from under {BASE_MAX:.0%} to at least "
            f"{EX3_MIN:.0%}",
            base < BASE_MAX and min(lora, qlora) >= EX3_MIN,
        ),
        (
            f"QLoRA is at most {100 * EX3_GAP_MAX:.0f} points below fp32 LoRA",
            lora - qlora <= EX3_GAP_MAX,
        ),
        (
            f"with a model at least {EX3_SHRINK_MIN:.0f}x smaller in memory",
            lora_b >= EX3_SHRINK_MIN * qlora_b,
        ),
    )


# --------------------------------------------------------------------------------------------
# Notebook 05: gradient accumulation and the 8-bit optimiser on short runs
# --------------------------------------------------------------------------------------------

# The same 5 steps with 1 and with 4 micro-batches: losses equal to ~1e-7 (summation order).
ACCUMULATION_TOL = 1e-5  # the statement below says 1e-5
# 12 steps of full fine-tuning: fp32 AdamW and AdamW8bit end within a few % of each other
# (0.48 vs 0.47 nats), far below the first step's loss (about 3.3 nats).
OPT8_REL_GAP_MAX = 0.25
OPT8_FALL_MIN = 0.5


def accumulation_claims(plain_losses: Sequence[float], accumulated_losses: Sequence[float]) -> Claims:
    """Gradient accumulation trains exactly like the large batch (pitfall 5)."""
    plain = _losses("plain_losses", plain_losses)
    accumulated = _losses("accumulated_losses", accumulated_losses)
    same_length = len(plain) == len(accumulated)
    gap = max(abs(a - b) for a, b in zip(plain, accumulated)) if same_length else float("inf")
    return _claims(
        (
            f"the two runs' losses agree to within 1e-5 at every one of the {len(plain)} steps",
            same_length and gap < ACCUMULATION_TOL,
        ),
    )


def optimizer_8bit_claims(fp32_losses: Sequence[float], int8_losses: Sequence[float]) -> Claims:
    """8-bit optimiser state trains about as well as fp32 state on a short run."""
    fp32 = _losses("fp32_losses", fp32_losses)
    int8 = _losses("int8_losses", int8_losses)
    fell = all(run[-1] <= OPT8_FALL_MIN * run[0] for run in (fp32, int8))
    gap = abs(int8[-1] - fp32[-1]) / max(fp32[-1], 1e-12)
    return _claims(
        (
            f"both optimisers bring the loss below {OPT8_FALL_MIN:.0%} of the first step's",
            fell,
        ),
        (
            f"AdamW8bit's last loss is within {OPT8_REL_GAP_MAX:.0%} of fp32 AdamW's",
            gap <= OPT8_REL_GAP_MAX,
        ),
    )
