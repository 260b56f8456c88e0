"""Checks for notebook 05_memory_compute_tradeoffs.

- :func:`check_saved_bytes`: the student's ``saved_activation_bytes(model, fn)`` measures what
  autograd saves for backward (unique storages, parameters excluded), compared with
  ``course_lib.utils.memory.SavedTensorsMeter``.
- :func:`check_checkpointed_forward`: ``checkpointed_forward(blocks, x)`` gives the plain
  forward's output and gradients while saving only the blocks' inputs.
- :func:`check_micro_batch_loss`: ``micro_batch_loss(logits, targets, mask, total_tokens)``
  makes accumulated gradients equal the large batch's (pitfall 5).
- :func:`check_adamw8bit_bytes`: ``adamw8bit_state_bytes(numel)`` follows bitsandbytes' rule.

Each check uses small seeded inputs and restores the global random state afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks import call_student, expect, passed
from course_lib.utils.memory import (
    ADAMW8BIT_BLOCKSIZE,
    ADAMW8BIT_MIN_SIZE,
    SavedTensorsMeter,
    adamw_state_bytes,
)

__all__ = [
    "check_saved_bytes",
    "check_checkpointed_forward",
    "check_micro_batch_loss",
    "check_adamw8bit_bytes",
    "ResidualMLP",
]


class _Seeded:
    """Run a block with ``torch.manual_seed(seed)`` and restore the global RNG afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.state)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# 1. Measuring saved activations
# ---------------------------------------------------------------------------------------------


def _saved_cases() -> list[tuple[str, nn.Module, Callable[[], torch.Tensor], str]]:
    """``(description, model, fn, hint if wrong)`` cases with known saved bytes."""
    x = torch.randn(100, requires_grad=True)
    empty = nn.Module()
    lin = nn.Linear(30, 20)
    inp = torch.randn(5, 30, requires_grad=True)  # so the layer also saves its weight
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    mlp_in = torch.randn(6, 8)
    frozen = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).requires_grad_(False)
    return [
        ("x.sin() + x.cos() for a 100-element x", empty,
         lambda: (x.sin() + x.cos()).sum(),
         "sin and cos both save the same x: count each storage once (key it by "
         "t.untyped_storage().data_ptr()), not once per saved tensor"),
        ("x[:50].exp()", empty, lambda: x[:50].exp().sum(),
         "exp saves its result (a new 50-element tensor); count the bytes of its storage, "
         "t.untyped_storage().nbytes()"),
        ("a Linear(30, 20) layer on a (5, 30) input that requires grad", lin,
         lambda: lin(inp).sum(),
         "the layer saves its weight and its input: the weight is a parameter of `model`, "
         "not an activation, so leave out the storages of model.parameters()"),
        ("an MLP Linear-GELU-Linear", mlp, lambda: mlp(mlp_in).pow(2).sum(),
         "compare with torch.autograd.graph.saved_tensors_hooks: every packed tensor whose "
         "storage is not a parameter counts, once"),
        ("a frozen MLP on an input without grad", frozen, lambda: frozen(mlp_in).sum(),
         "nothing requires grad, so autograd saves nothing: the answer is 0"),
        ("under torch.no_grad()", mlp, lambda: _no_grad(mlp, mlp_in),
         "under torch.no_grad() no graph is built and nothing is saved: the answer is 0"),
    ]


def _no_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).sum()


def check_saved_bytes(student_fn: Callable[..., Any]) -> None:
    """``student_fn(model, fn)``: bytes autograd saves while ``fn()`` runs (unique storages,
    ``model``'s parameters and buffers excluded)."""
    what = "saved_activation_bytes(model, fn)"
    with _Seeded(0):
        cases = _saved_cases()
        for description, model, fn, hint in cases:
            with SavedTensorsMeter(model) as meter:
                out = fn()
            want = meter.nbytes
            del out
            got = call_student(student_fn, model, fn, what=what)
            expect(got is not None, f"{what} returned None: did you forget the `return`?")
            expect(
                _is_int(got),
                f"{what} should return the number of bytes as an int, got {type(got).__name__}.",
            )
            expect(
                got == want,
                f"{what} for {description} returned {got:,} bytes, expected {want:,}. {hint}.",
            )
    passed("nb05_saved_bytes")


# ---------------------------------------------------------------------------------------------
# 2. Gradient checkpointing
# ---------------------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """A small residual block ``x + W2 gelu(W1 norm(x))`` for the checkpointing check."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


def _plain(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def check_checkpointed_forward(student_fn: Callable[..., Any]) -> None:
    """``student_fn(blocks, x)``: the blocks applied in order, each under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``."""
    what = "checkpointed_forward(blocks, x)"
    with _Seeded(0):
        d, hidden, n_blocks = 16, 64, 4
        blocks = nn.ModuleList(ResidualMLP(d, hidden) for _ in range(n_blocks))
        x = torch.randn(8, 10, d)

        with SavedTensorsMeter(blocks) as plain_meter:
            ref_out = _plain(blocks, x.clone().requires_grad_(True))
        ref_out.pow(2).mean().backward()
        ref_grads = [p.grad.clone() for p in blocks.parameters()]
        blocks.zero_grad(set_to_none=True)

        blocks.train()
        x_in = x.clone().requires_grad_(True)
        with SavedTensorsMeter(blocks) as meter:
            out = call_student(student_fn, blocks, x_in, what=what)
        expect(out is not None, f"{what} returned None: return the output of the last block.")
        expect(
            isinstance(out, torch.Tensor) and out.shape == ref_out.shape,
            f"{what} should return a tensor of shape {tuple(ref_out.shape)} (the input's shape), "
            f"got {getattr(out, 'shape', type(out).__name__)}.",
        )
        expect(
            torch.allclose(out, ref_out, atol=1e-6, rtol=1e-5),
            f"{what} returned a different output from applying the blocks in order "
            "(x = block(x) for each block): checkpointing must not change the result.",
        )
        expect(
            out.requires_grad,
            f"the output of {what} does not require grad: did you run the blocks under "
            "torch.no_grad()? checkpoint() itself takes care of not saving activations.",
        )
        out.pow(2).mean().backward()
        for (name, p), want in zip(blocks.named_parameters(), ref_grads):
            expect(
                p.grad is not None and torch.allclose(p.grad, want, atol=1e-6, rtol=1e-4),
                f"after backward through {what}, the gradient of {name} differs from the plain "
                "forward's: recomputation must reproduce the same activations.",
            )
        blocks.zero_grad(set_to_none=True)
        block_input = x.numel() * x.element_size()
        expect(
            meter.nbytes < plain_meter.nbytes,
            f"{what} saved {meter.nbytes:,} bytes for backward, as much as the plain forward "
            f"({plain_meter.nbytes:,}): wrap each block call in "
            "torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).",
        )
        expect(
            meter.nbytes <= n_blocks * block_input,
            f"{what} saved {meter.nbytes:,} bytes for backward; checkpointing every block keeps "
            f"only the {n_blocks} block inputs ({n_blocks * block_input:,} bytes). Checkpoint "
            "each block separately (not only some of them).",
        )
    passed("nb05_checkpointing")


# ---------------------------------------------------------------------------------------------
# 3. Gradient accumulation (pitfall 5)
# ---------------------------------------------------------------------------------------------


def _reference_loss(logits, targets, mask, total_tokens):
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return (per_token * mask.to(per_token.dtype)).sum() / total_tokens


def check_micro_batch_loss(student_fn: Callable[..., Any]) -> None:
    """``student_fn(logits, targets, mask, total_tokens)``: the micro-batch's summed masked
    cross-entropy divided by the token count of the *whole* batch."""
    what = "micro_batch_loss(logits, targets, mask, total_tokens)"
    with _Seeded(0):
        B, T, V = 8, 6, 11
        head = nn.Linear(5, V)
        feats = torch.randn(B, T, 5)
        targets = torch.randint(0, V, (B, T))
        # unequal numbers of counted tokens per example, so per-micro-batch means are wrong
        lengths = torch.tensor([1, 6, 2, 5, 3, 6, 1, 4])
        mask = torch.arange(T)[None, :] < lengths[:, None]
        total = int(mask.sum())

        # value on one micro-batch
        logits = head(feats[:4])
        got = call_student(student_fn, logits, targets[:4], mask[:4], total, what=what)
        expect(got is not None, f"{what} returned None: return the loss tensor.")
        expect(
            isinstance(got, torch.Tensor) and got.dim() == 0,
            f"{what} should return a scalar tensor (0-d), got "
            f"{getattr(got, 'shape', type(got).__name__)}: sum the per-token losses.",
        )
        want = _reference_loss(logits, targets[:4], mask[:4], total)
        micro_tokens = int(mask[:4].sum())
        if not torch.allclose(got, want, atol=1e-6, rtol=1e-5):
            mean_micro = _reference_loss(logits, targets[:4], mask[:4], micro_tokens)
            unmasked = F.cross_entropy(logits.reshape(-1, V), targets[:4].reshape(-1),
                                       reduction="sum") / total
            if torch.allclose(got, mean_micro, atol=1e-6, rtol=1e-5):
                hint = (
                    "that is the mean over this micro-batch's own tokens. Pitfall 5: divide by "
                    "total_tokens (all micro-batches together), so every token weighs the same"
                )
            elif torch.allclose(got, unmasked, atol=1e-6, rtol=1e-5):
                hint = "every position was counted: multiply the per-token losses by the mask"
            else:
                hint = (
                    "compute F.cross_entropy(..., reduction='none') per token, multiply by the "
                    "mask, sum, and divide by total_tokens"
                )
            raise AssertionError(
                f"{what} on a micro-batch with {micro_tokens} of {total} tokens returned "
                f"{got.item():.6f}, expected {want.item():.6f}: {hint}."
            )
        expect(got.requires_grad, f"{what} must stay differentiable (do not call .item()).")

        # accumulated gradients equal the large batch's gradient
        head.zero_grad(set_to_none=True)
        _reference_loss(head(feats), targets, mask, total).backward()
        want_grad = head.weight.grad.clone()
        head.zero_grad(set_to_none=True)
        for sl in (slice(0, 2), slice(2, 5), slice(5, 8)):
            loss = call_student(student_fn, head(feats[sl]), targets[sl], mask[sl], total,
                                what=what)
            loss.backward()
        expect(
            torch.allclose(head.weight.grad, want_grad, atol=1e-6, rtol=1e-4),
            f"the gradients accumulated from three micro-batches with {what} differ from the "
            "gradient of the whole batch's mean loss.",
        )
    passed("nb05_grad_accum")


# ---------------------------------------------------------------------------------------------
# 4. 8-bit optimiser state
# ---------------------------------------------------------------------------------------------

_NUMELS = [16, 4095, 4096, 4097, 16384, 128 * 37, 4096 * 11008]


def check_adamw8bit_bytes(student_fn: Callable[..., Any]) -> None:
    """``student_fn(numel)``: bytes of bitsandbytes' AdamW8bit state for one tensor (without the
    shared quantisation maps)."""
    what = "adamw8bit_state_bytes(numel)"
    for n in _NUMELS:
        got = call_student(student_fn, n, what=what)
        expect(got is not None, f"{what} returned None: did you forget the `return`?")
        expect(_is_int(got), f"{what} should return an int, got {type(got).__name__}.")
        want = adamw_state_bytes([n], "adamw8bit") - (
            2 * 256 * 4 if n >= ADAMW8BIT_MIN_SIZE else 0
        )
        if got == want:
            continue
        blocks = -(-n // ADAMW8BIT_BLOCKSIZE)
        if n < ADAMW8BIT_MIN_SIZE and got == 2 * n + 8 * blocks:
            hint = (
                f"tensors with fewer than {ADAMW8BIT_MIN_SIZE} elements keep 32-bit state "
                "(8 bytes per element) in bitsandbytes"
            )
        elif n >= ADAMW8BIT_MIN_SIZE and got == 2 * n:
            hint = (
                f"add the absmax constants: one fp32 per block of {ADAMW8BIT_BLOCKSIZE} elements "
                "for each of the two states"
            )
        elif n >= ADAMW8BIT_MIN_SIZE and got == 2 * n + 8 * (n // ADAMW8BIT_BLOCKSIZE):
            hint = "a partial last block still needs its absmax: round the block count up"
        elif n >= ADAMW8BIT_MIN_SIZE and got == n + 4 * blocks:
            hint = "AdamW has two states (m and v), each 1 byte per element plus its absmax"
        else:
            hint = (
                f"numel >= {ADAMW8BIT_MIN_SIZE}: 2 bytes per element + 2 * 4 bytes per block of "
                f"{ADAMW8BIT_BLOCKSIZE}; smaller tensors: 8 bytes per element"
            )
        raise AssertionError(f"{what} for numel={n:,} returned {got:,}, expected {want:,}: {hint}.")
    passed("nb05_adam8bit")
