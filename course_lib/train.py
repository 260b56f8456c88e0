"""A small, readable training loop: AdamW, gradient accumulation, exact-match evaluation.

Works with any ``nn.Module`` whose forward maps token ids ``(B, T)`` to logits
``(B, T, vocab)`` (or returns an object with a ``.logits`` attribute, as Hugging Face and PEFT
models do), and trains only the parameters with ``requires_grad=True`` — freeze the base model
and wrap it with LoRA, and the same loop does LoRA fine-tuning.

Gradient accumulation (pitfall 5 of the lesson): a step over ``batch_size`` examples is split
into ``grad_accum_steps`` micro-batches. Each micro-batch's loss is the *sum* over its answer
tokens divided by the number of answer tokens in the *whole* batch, so the accumulated gradient
equals the gradient of the large batch exactly — averaging each micro-batch's mean instead would
weight tokens of short micro-batches more. Memory then scales with the micro-batch, while the
optimiser sees the effective batch ``batch_size``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from course_lib.data import TOKENIZER, Batch, CharTokenizer, Example, iterate_batches
from course_lib.model.tinygpt import lm_loss
from course_lib.utils.params import count_parameters
from course_lib.validation import (
    check_bool,
    check_choice,
    check_number,
    non_negative_int,
    positive_int,
)

__all__ = [
    "TrainConfig",
    "TrainHistory",
    "logits_of",
    "trainable_parameters",
    "count_parameters",
    "split_batch",
    "accumulate_gradients",
    "make_optimizer",
    "train_step",
    "greedy_generate",
    "predict",
    "exact_match",
    "progress_disabled",
    "train",
]

SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    steps: int = 200  # optimiser steps
    batch_size: int = 64  # examples per optimiser step (the effective batch size)
    grad_accum_steps: int = 1  # micro-batches per step; must divide batch_size
    lr: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW's decoupled weight decay, applied to every trainable tensor
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW's moment decay rates
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (decays to min_lr_ratio*lr)
    min_lr_ratio: float = 0.1  # final learning rate of the cosine schedule, as a fraction of lr
    grad_clip: float | None = 1.0  # clip the global gradient norm to this value (None: no clip)
    eval_every: int = 0  # evaluate exact match every this many steps (0: only after the last)
    eval_examples: int | None = None  # validation examples per evaluation (None: all)
    seed: int = 0  # seed of the batch order

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum_steps"):
            positive_int(f"TrainConfig.{name}", getattr(self, name))
        for name in ("warmup_steps", "eval_every"):
            non_negative_int(f"TrainConfig.{name}", getattr(self, name))
        if self.batch_size % self.grad_accum_steps != 0:
            raise ValueError(
                f"TrainConfig.grad_accum_steps ({self.grad_accum_steps}) must divide "
                f"batch_size ({self.batch_size})"
            )
        positive = {"low": 0.0, "low_inclusive": False}
        check_number("TrainConfig.lr", self.lr, **positive)
        check_number("TrainConfig.weight_decay", self.weight_decay, low=0.0)
        check_choice("TrainConfig.schedule", self.schedule, SCHEDULES)
        check_number("TrainConfig.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        if self.grad_clip is not None:
            check_number("TrainConfig.grad_clip", self.grad_clip, **positive, hint="or None")
        if self.eval_examples is not None:
            positive_int("TrainConfig.eval_examples", self.eval_examples)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        ratio = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
        return self.lr * ratio


@dataclass
class TrainHistory:
    """What :func:`train` measured. ``val_accuracy[i]`` was measured after ``eval_steps[i]`` steps."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    train_seconds: float = 0.0  # time spent in training steps (evaluation excluded)
    config: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    @property
    def final_accuracy(self) -> float:
        return self.val_accuracy[-1] if self.val_accuracy else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Parameters and gradients
# --------------------------------------------------------------------------------------------


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)`` as a logits tensor, unwrapping a ``.logits`` attribute if present."""
    out = model(inputs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(
            "the model must return logits of shape (B, T, vocab) or an object with .logits; "
            f"got {type(out).__name__}"
        )
    return logits


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad=True`` (what the optimiser updates)."""
    return [p for p in model.parameters() if p.requires_grad]


def split_batch(batch: Batch, n: int) -> list[Batch]:
    """Split ``batch`` into ``n`` micro-batches of equal size along the batch dimension."""
    if len(batch) % positive_int("n", n) != 0:
        raise ValueError(f"n must be a positive int dividing the batch size {len(batch)}, got {n!r}")
    size = len(batch) // n
    return [
        Batch(batch.inputs[i : i + size], batch.targets[i : i + size], batch.mask[i : i + size])
        for i in range(0, len(batch), size)
    ]


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[Batch]) -> float:
    """Backpropagate ``micro_batches`` so the summed ``.grad`` equals the full batch's gradient.

    Every micro-batch contributes ``sum of its token losses / tokens in all micro-batches``.
    Gradients are *added* to the existing ``.grad`` (zero them before). Returns the loss of the
    whole batch (mean over its answer tokens).
    """
    if len(micro_batches) == 0:
        raise ValueError("micro_batches must not be empty")
    device = next(model.parameters()).device
    total_tokens = sum(mb.n_tokens for mb in micro_batches)
    if total_tokens == 0:
        raise ValueError("the batch has no answer tokens to train on")
    total_loss = 0.0
    for mb in micro_batches:
        mb = mb.to(device)
        logits = logits_of(model, mb.inputs)  # (b, T, V)
        loss = lm_loss(logits, mb.targets, mb.mask, reduction="sum") / total_tokens
        loss.backward()
        total_loss += loss.item()
    return total_loss


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen ones get no optimiser state)."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            "the model has no trainable parameters: every parameter has requires_grad=False"
        )
    return torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    grad_accum_steps: int = 1,
    grad_clip: float | None = None,
) -> float:
    """One optimiser step on ``batch`` (split into ``grad_accum_steps`` micro-batches).

    zero the gradients -> accumulate them -> clip the global norm -> ``optimizer.step()``.
    Returns the batch loss.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, split_batch(batch, grad_accum_steps))
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(trainable_parameters(model), grad_clip)
    optimizer.step()
    return loss


# --------------------------------------------------------------------------------------------
# Greedy generation and exact-match evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` greedy (arg-max) tokens to ``prompts`` ``(B, T0)``.

    Returns the new tokens ``(B, max_new_tokens)``. Once a row has produced ``eos_id`` its later
    tokens are ``eos_id`` too, and generation stops early when every row has finished.
    ``block_size`` crops the context to the last ``block_size`` tokens (default: the model's
    ``config.block_size`` when it has one).
    """
    if prompts.dim() != 2 or prompts.size(1) == 0:
        raise ValueError(
            f"prompts must be a (B, T0) tensor with T0 > 0, got {tuple(prompts.shape)}"
        )
    if block_size is None:
        block_size = getattr(getattr(model, "config", None), "block_size", None)
    seq = prompts
    finished = torch.zeros(prompts.size(0), dtype=torch.bool, device=prompts.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        context = seq if block_size is None else seq[:, -block_size:]
        logits = logits_of(model, context)  # (B, T, V)
        nxt = logits[:, -1, :].argmax(dim=-1)  # (B,)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        new_tokens.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    out = torch.stack(new_tokens, dim=1) if new_tokens else prompts[:, :0]
    if out.size(1) < max_new_tokens:  # stopped early: pad the rest with eos
        pad = torch.full(
            (out.size(0), max_new_tokens - out.size(1)), eos_id, dtype=out.dtype, device=out.device
        )
        out = torch.cat([out, pad], dim=1)
    return out


def predict(
    model: nn.Module,
    prompts: Sequence[str],
    max_new_tokens: int,
    tokenizer: CharTokenizer = TOKENIZER,
    batch_size: int = 512,
) -> list[str]:
    """The model's greedy answer to each prompt (text generated before ``<eos>``)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not a single string")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str | None] = [None] * len(prompts)
    try:
        # Prompts of equal length are generated together, so no padding enters the context.
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for length in sorted(by_length):
            rows = by_length[length]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                ids = torch.tensor([tokenizer.encode(prompts[i]) for i in chunk], device=device)
                new = greedy_generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_id)
                for i, row in zip(chunk, new.tolist()):
                    answers[i] = tokenizer.decode(row, strict=False)
    finally:
        model.train(was_training)
    return answers  # type: ignore[return-value]


def exact_match(
    model: nn.Module,
    examples: Sequence[Example],
    tokenizer: CharTokenizer = TOKENIZER,
    batch_size: int = 512,
) -> float:
    """Fraction of ``examples`` whose greedy answer equals ``example.answer`` exactly."""
    if len(examples) == 0:
        raise ValueError("examples must not be empty")
    max_new = max(len(ex.answer) for ex in examples) + 1  # answer + <eos>
    preds = predict(model, [ex.prompt for ex in examples], max_new, tokenizer, batch_size)
    return sum(p == ex.answer for p, ex in zip(preds, examples)) / len(examples)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def progress_disabled(progress: bool = True) -> bool:
    """Whether progress bars are off: ``progress=False`` or ``TQDM_DISABLE`` set (not ``0``).

    Checked here explicitly because ``tqdm.auto``'s notebook bar ignores ``TQDM_DISABLE``.
    """
    check_bool("progress", progress)
    flag = os.environ.get("TQDM_DISABLE", "").strip().lower()
    return not progress or flag not in ("", "0", "false", "no")


def train(
    model: nn.Module,
    train_examples: Sequence[Example],
    config: TrainConfig | None = None,
    val_examples: Sequence[Example] | None = None,
    tokenizer: CharTokenizer = TOKENIZER,
    progress: bool = True,
    desc: str = "train",
    step_fn: Callable[..., float] | None = None,
) -> TrainHistory:
    """Train the trainable parameters of ``model`` on ``train_examples``; return the history.

    Each step draws ``config.batch_size`` examples (seeded shuffling, epoch by epoch), runs
    :func:`train_step` with ``config.grad_accum_steps`` micro-batches and the learning-rate
    schedule, and every ``config.eval_every`` steps (and after the last) measures exact match
    on ``val_examples``. The ``tqdm.auto`` progress bar is silent when ``TQDM_DISABLE=1``
    is set (or ``progress=False``).

    ``step_fn(model, optimizer, batch, grad_accum_steps, grad_clip) -> loss`` replaces
    :func:`train_step` (which has that signature), e.g. with a step written in a notebook.
    """
    from tqdm.auto import tqdm

    config = config if config is not None else TrainConfig()
    optimizer = make_optimizer(model, config)
    history = TrainHistory(
        trainable_params=count_parameters(model, trainable_only=True),
        total_params=count_parameters(model),
        config=asdict(config),
    )
    val = list(val_examples)[: config.eval_examples] if val_examples else None
    batches = iterate_batches(
        train_examples, config.batch_size, seed=config.seed, tokenizer=tokenizer
    )
    do_step = train_step if step_fn is None else step_fn
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=progress_disabled(progress))
    for step in bar:
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        batch = next(batches)
        loss = float(do_step(model, optimizer, batch, config.grad_accum_steps, config.grad_clip))
        history.train_seconds += time.perf_counter() - start
        history.steps.append(step + 1)
        history.losses.append(loss)
        history.lrs.append(lr)
        last = step + 1 == config.steps
        if val and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            acc = exact_match(model, val, tokenizer)
            history.eval_steps.append(step + 1)
            history.val_accuracy.append(acc)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    model.eval()
    return history
