"""Checks for notebook 02_lora_finetuning: selecting the trainable parameters and one step.

Each check runs the student's function on a small seeded TinyGPT, compares the result with the
reference in ``course_lib.train`` / ``course_lib.model.lora`` and, on a mismatch, names the
most likely mistake (base weights still trainable, LoRA frozen, gradients not zeroed, loss
averaged per micro-batch instead of per token, ...). The global random state is restored
afterwards, so a check never changes what later cells draw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from course_lib.checks import call_student, expect, passed
from course_lib.data import Example, make_batch
from course_lib.model.lora import LoRAConfig, apply_lora
from course_lib.model.tinygpt import TinyGPT, TinyGPTConfig, lm_loss
from course_lib.train import split_batch

__all__ = ["check_select_trainable_parameters", "check_optimisation_step"]

_TINY = dict(vocab_size=15, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32)

# Answers of different lengths: micro-batches then hold different numbers of answer tokens,
# which is exactly when "mean of the micro-batch means" differs from the large-batch loss.
_UNEVEN = [
    Example("1+1=", "2"),
    Example("12+30=", "42"),
    Example("5+5=", "10"),
    Example("99+1=", "100"),
    Example("7+0=", "7"),
    Example("250+250=", "500"),
    Example("8+8=", "16"),
    Example("999+999=", "1998"),
]


def _tiny_lora_model(seed: int, targets: list[str] | str) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyGPT(TinyGPTConfig(**_TINY))
    apply_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=targets))
    return model


def _is_lora(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name or name.startswith(("lora_A", "lora_B"))


# ---------------------------------------------------------------------------------------------
# 1. Freezing the base model, selecting the LoRA parameters
# ---------------------------------------------------------------------------------------------


def check_select_trainable_parameters(student_fn: Callable[[nn.Module], Any]) -> None:
    """``student_fn(model)`` freezes everything but ``lora_A``/``lora_B`` and returns those."""
    what = "select_trainable_parameters(model)"
    state = torch.random.get_rng_state()
    try:
        for targets in (["q_proj", "v_proj"], "all-linear"):
            model = _tiny_lora_model(0, targets)
            model.requires_grad_(True)  # as in the notebook: start with everything trainable
            got = call_student(student_fn, model, what=what)
            label = f"{what} on a TinyGPT with LoRA on {targets!r}"
            expect(got is not None, f"{label} returned None: did you forget the `return`?")
            expect(
                not isinstance(got, (nn.Parameter, torch.Tensor)) and hasattr(got, "__iter__"),
                f"{label} returned a {type(got).__name__}; return a list of the trainable "
                f"nn.Parameter objects (e.g. [p for n, p in model.named_parameters() if ...]).",
            )
            got = list(got)
            names = dict(model.named_parameters())
            lora_names = [n for n in names if _is_lora(n)]
            frozen_lora = [n for n in lora_names if not names[n].requires_grad]
            expect(
                not frozen_lora,
                f"{label}: LoRA parameter {frozen_lora[0] if frozen_lora else ''!r} has "
                f"requires_grad=False. Freeze the base model, but keep lora_A and lora_B "
                f"trainable: they are the only thing LoRA trains.",
            )
            still = [n for n in names if not _is_lora(n) and names[n].requires_grad]
            if still:
                base = [n for n in still if n.endswith("base_layer.weight")]
                if base:
                    hint = (
                        f"the wrapped base weight {base[0]!r} is still trainable: W0 must be "
                        f"frozen (requires_grad_(False)), only lora_A / lora_B learn"
                    )
                else:
                    hint = (
                        f"{still[0]!r} is still trainable: freeze *every* parameter that is not "
                        f"a LoRA factor — embeddings, norms and lm_head too, not only the "
                        f"layers LoRA wraps"
                    )
                raise AssertionError(
                    f"{label}: {len(still)} non-LoRA parameter(s) would be trained; {hint}."
                )
            odd = [p for p in got if not isinstance(p, nn.Parameter)]
            expect(
                not odd,
                f"{label} returned {type(odd[0]).__name__ if odd else ''} items; return the "
                f"nn.Parameter objects themselves (not names or copies).",
            )
            want_ids = {id(names[n]) for n in lora_names}
            got_ids = [id(p) for p in got]
            expect(
                len(got_ids) == len(set(got_ids)),
                f"{label} returned some parameters twice; return each trainable one once.",
            )
            expect(
                set(got_ids) == want_ids,
                f"{label} returned {len(got)} parameters, expected the {len(want_ids)} LoRA "
                f"factors (every lora_A and lora_B, nothing else). The returned list is what "
                f"the optimiser will update, so it must match what requires_grad says.",
            )
    finally:
        torch.random.set_rng_state(state)
    passed("nb02_select_trainable")


# ---------------------------------------------------------------------------------------------
# 2. One optimisation step with gradient accumulation
# ---------------------------------------------------------------------------------------------


def _reference_step(
    model, optimizer, batch, n_micro, max_norm=None, mode="tokens", zero=True, clip=True
):
    """The correct step (``mode="tokens"``) and the classic mistakes, for diagnosis."""
    if zero:
        optimizer.zero_grad(set_to_none=True)
    micro = split_batch(batch, n_micro)
    total = 0.0
    for mb in micro:
        logits = model(mb.inputs)
        if mode == "tokens":
            loss = lm_loss(logits, mb.targets, mb.mask, reduction="sum") / batch.n_tokens
        elif mode == "mean_of_means":
            loss = lm_loss(logits, mb.targets, mb.mask) / len(micro)
        elif mode == "unscaled_means":
            loss = lm_loss(logits, mb.targets, mb.mask)
        else:  # "sum": token losses added up, never divided
            loss = lm_loss(logits, mb.targets, mb.mask, reduction="sum")
        loss.backward()
        total += loss.item()
    if clip and max_norm is not None:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    optimizer.step()
    return total


def _run(step_fn, n_micro, max_norm=None, *, stale_grads=False, **kwargs):
    """Parameters after one SGD step of ``step_fn`` from a fixed start (and the loss)."""
    model = _tiny_lora_model(1, ["q_proj", "v_proj"])
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # move B away from zero so that every LoRA factor gets a gradient
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(params, lr=0.5)
    if stale_grads:  # gradients left over from an earlier step
        for p in params:
            p.grad = torch.full_like(p, 0.25)
    model.train()
    loss = step_fn(model, optimizer, make_batch(_UNEVEN), n_micro, max_norm, **kwargs)
    return loss, [p.detach().clone() for p in params]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))


_MISTAKES = [
    (
        "mean_of_means",
        "you averaged each micro-batch's *mean* loss over the micro-batches. Micro-batches hold "
        "different numbers of answer tokens, so that weights tokens unequally (pitfall 5): "
        "divide each micro-batch's *summed* token loss by the number of answer tokens in the "
        "whole batch (batch.n_tokens)",
    ),
    (
        "unscaled_means",
        "each micro-batch's mean loss was backpropagated unscaled, so the gradient grows with "
        "grad_accum_steps: divide each micro-batch's summed token loss by batch.n_tokens of the "
        "whole batch",
    ),
    (
        "sum",
        "the summed token loss was never divided: divide it by the number of answer tokens in "
        "the whole batch (batch.n_tokens)",
    ),
]


def check_optimisation_step(student_fn: Callable[..., Any]) -> None:
    """``student_fn(model, optimizer, batch, grad_accum_steps, max_grad_norm)``: one step."""
    what = "optimisation_step(model, optimizer, batch, grad_accum_steps, max_grad_norm)"
    state = torch.random.get_rng_state()

    def student(model, optimizer, batch, n_micro, max_norm):
        return call_student(student_fn, model, optimizer, batch, n_micro, max_norm, what=what)

    try:
        start = _run(lambda *args: 0.0, 1)[1]
        # max_grad_norm=0.01 is well below this setup's gradient norm (about 0.03): clipping acts
        for n_micro, max_norm in ((1, None), (2, None), (4, None), (2, 0.01)):
            label = f"{what} with grad_accum_steps={n_micro}, max_grad_norm={max_norm}"
            want_loss, want = _run(_reference_step, n_micro, max_norm)
            got_loss, got = _run(student, n_micro, max_norm, stale_grads=True)
            if not _same(got, want):
                if _same(got, start):
                    raise AssertionError(
                        f"{label} did not change the parameters: call optimizer.step() after "
                        f"the backward passes."
                    )
                stale = _run(_reference_step, n_micro, max_norm, stale_grads=True, zero=False)
                if _same(got, stale[1]):
                    raise AssertionError(
                        f"{label}: the gradients of an earlier step were added to this one. "
                        f"Call optimizer.zero_grad() at the start of the step (once, before "
                        f"the first micro-batch, not inside the loop)."
                    )
                if max_norm is not None:
                    unclipped = _run(_reference_step, n_micro, max_norm, clip=False)
                    if _same(got, unclipped[1]):
                        raise AssertionError(
                            f"{label}: the gradients were not clipped. After all backward "
                            f"passes and before optimizer.step(), call torch.nn.utils."
                            f"clip_grad_norm_(trainable parameters, max_grad_norm) when "
                            f"max_grad_norm is not None."
                        )
                for mode, hint in _MISTAKES:
                    wrong = _run(_reference_step, n_micro, max_norm, mode=mode)
                    if _same(got, wrong[1]):
                        raise AssertionError(f"{label}: {hint}.")
                raise AssertionError(
                    f"{label} updated the parameters differently from one optimiser step on the "
                    f"whole batch. Steps: zero the gradients; for each micro-batch of "
                    f"split_batch(batch, grad_accum_steps), backward(sum of its answer-token "
                    f"losses / batch.n_tokens); clip if max_grad_norm is set; optimizer.step()."
                )
            expect(got_loss is not None, f"{label} returned None: return the batch loss (a float).")
            try:
                value = float(got_loss)
            except (TypeError, ValueError):
                raise AssertionError(
                    f"{label} returned a {type(got_loss).__name__}; return the batch loss as "
                    f"a float (add up the micro-batch losses' .item())."
                ) from None
            expect(
                abs(value - want_loss) <= 1e-4 * max(1.0, abs(want_loss)),
                f"{label} returned the loss {value:.6f}, expected {want_loss:.6f}: the mean over "
                f"all answer tokens of the batch (add up the micro-batch losses you "
                f"backpropagated).",
            )
    finally:
        torch.random.set_rng_state(state)
    passed("nb02_optimisation_step")
