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

from course_lib.checks import call_student, check, expect, fail
from course_lib.checks.core import OWN_WORK_PREFIX
from course_lib.checks.variants import BLOCK, alternative, mistake
from course_lib.data import Example, make_batch
from course_lib.model.lora import LoRAConfig, apply_lora
from course_lib.model.tinygpt import TinyGPT, TinyGPTConfig, lm_loss
from course_lib.train import split_batch

__all__ = ["check_select_trainable_parameters", "check_optimisation_step", "VARIANTS"]

_SELECT_REF = ("course_lib.model.lora.mark_only_lora_as_trainable",
               "course_lib.model.lora.apply_lora")
_STEP_REF = ("course_lib.train.accumulate_gradients", "course_lib.train.train_step")

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


@check("nb02_select_trainable", forbid=_SELECT_REF)
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
            extra = [n for n, p in names.items() if id(p) in set(got_ids) - want_ids]
            if extra:
                fail(f"{label} returned {len(got)} parameters, {len(extra)} of them frozen "
                     f"(e.g. {extra[0]!r}): the list also holds parameters that are not LoRA "
                     f"factors.",
                     "return only the lora_A / lora_B parameters, the ones you left trainable; "
                     "the list is what the optimiser updates.")
            missing = [n for n in lora_names if id(names[n]) not in set(got_ids)]
            if missing:
                kinds = {n.rsplit(".", 1)[-1] for n in missing}
                fail(f"{label} returned {len(got)} parameters, expected the {len(want_ids)} LoRA "
                     f"factors: {len(missing)} are missing, e.g. {missing[0]!r}"
                     + (f" (every {kinds.pop()} is missing)" if len(kinds) == 1
                        and len(missing) * 2 == len(lora_names) else "") + ".",
                     "return every lora_A and every lora_B (the ones that train), nothing else.")
            order = [id(names[n]) for n in lora_names]
            expect(
                got_ids == order,
                f"{label} returned the right parameters in another order: return them in the "
                f"order of model.named_parameters() (lora_A, lora_B of each layer in turn).",
                "build the list in the same loop over model.named_parameters() that sets "
                "requires_grad.",
            )
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------------
# 2. One optimisation step with gradient accumulation
# ---------------------------------------------------------------------------------------------


def _reference_step(
    model, optimizer, batch, n_micro, max_norm=None, mode="tokens", zero="start", clip="end",
    step="end",
):
    """The correct step (the defaults) and the classic mistakes, for diagnosis.

    ``zero``: "start", "none", "loop" (each micro-batch) or "before_step" (after the backward
    passes); ``clip``: "end", "none" or "loop"; ``step``: "end" or "loop"; ``mode``: how each
    micro-batch's loss is normalised.
    """
    if zero == "start":
        optimizer.zero_grad(set_to_none=True)
    micro = split_batch(batch, n_micro)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for mb in micro:
        if zero == "loop":
            optimizer.zero_grad(set_to_none=True)
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
        if clip == "loop" and max_norm is not None:
            nn.utils.clip_grad_norm_(trainable, max_norm)
        if step == "loop":
            optimizer.step()
    if clip == "end" and max_norm is not None:
        nn.utils.clip_grad_norm_(trainable, max_norm)
    if zero == "before_step":
        optimizer.zero_grad(set_to_none=True)
    if step == "end":
        optimizer.step()
    return total


def _run(step_fn, n_micro, max_norm=None, *, stale_grads=False, **kwargs):
    """One SGD step of ``step_fn`` from a fixed start: ``(loss, parameters after, their .grad,
    batch sizes of the model's forward calls)``."""
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
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    model.train()
    try:
        loss = step_fn(model, optimizer, make_batch(_UNEVEN), n_micro, max_norm, **kwargs)
    finally:
        hook.remove()
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    return loss, [p.detach().clone() for p in params], grads, calls


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))


_ORDER = ("Steps: zero the gradients once; for each micro-batch of split_batch(batch, "
          "grad_accum_steps), backward(sum of its answer-token losses / batch.n_tokens); clip if "
          "max_grad_norm is set; optimizer.step() once.")

# (reference keyword arguments, diagnosis, hint): the mistakes the check recognises by the
# parameters they produce after one step.
_MISTAKES = [
    (dict(zero="none"),
     "the gradients of an earlier step were added to this one: optimizer.zero_grad() is missing "
     "(or it comes after optimizer.step())",
     "call optimizer.zero_grad() at the start of the step, once, before the first micro-batch."),
    (dict(zero="loop"),
     "optimizer.zero_grad() runs inside the micro-batch loop, so each micro-batch wipes the "
     "gradients of the ones before and only the last micro-batch's gradient is left",
     "zero the gradients once, before the loop."),
    (dict(step="loop"),
     "optimizer.step() runs inside the micro-batch loop: that is one update per micro-batch, "
     "not gradient accumulation",
     "call optimizer.step() once, after the loop (and after clipping)."),
    (dict(clip="loop"),
     "the gradients were clipped inside the loop, after each backward pass; clip the "
     "accumulated gradient once",
     "call clip_grad_norm_ after the loop, just before optimizer.step()."),
    (dict(clip="none"),
     "the gradients were not clipped (or clipped at a norm other than max_grad_norm: is it "
     "hard-coded?)",
     "after all backward passes and before optimizer.step(), call torch.nn.utils."
     "clip_grad_norm_(trainable parameters, max_grad_norm) when max_grad_norm is not None."),
    (dict(mode="mean_of_means"),
     "you averaged each micro-batch's *mean* loss over the micro-batches. Micro-batches hold "
     "different numbers of answer tokens, so that weights tokens unequally (pitfall 5)",
     "divide each micro-batch's *summed* token loss by the number of answer tokens in the "
     "whole batch (batch.n_tokens)."),
    (dict(mode="unscaled_means"),
     "each micro-batch's loss was divided by its own token count (micro.n_tokens, or the mean "
     "of lm_loss) and backpropagated unscaled, so the gradient grows with grad_accum_steps",
     "divide each micro-batch's summed token loss by batch.n_tokens of the whole batch."),
    (dict(mode="sum"),
     "the summed token loss was never divided",
     "divide it by the number of answer tokens in the whole batch (batch.n_tokens)."),
]


def _explain_step(exc: BaseException) -> str | None:
    text = str(exc)
    if "backward through the graph a second time" in text:
        return ("a graph was backpropagated twice: call loss.backward() once per micro-batch, "
                "on that micro-batch's loss only.")
    if "does not require grad" in text:
        return "the loss has no graph: compute it from model(micro.inputs), not under no_grad."
    if "dividing the batch size" in text:
        return "split_batch(batch, grad_accum_steps) needs the number of micro-batches."
    return None


@check("nb02_optimisation_step", forbid=_STEP_REF)
def check_optimisation_step(student_fn: Callable[..., Any]) -> None:
    """``student_fn(model, optimizer, batch, grad_accum_steps, max_grad_norm)``: one step."""
    what = "optimisation_step(model, optimizer, batch, grad_accum_steps, max_grad_norm)"
    state = torch.random.get_rng_state()

    def student(model, optimizer, batch, n_micro, max_norm):
        return call_student(student_fn, model, optimizer, batch, n_micro, max_norm, what=what,
                            explain=_explain_step)

    try:
        start = _run(lambda *args: 0.0, 1)[1]
        # max_grad_norm=0.01 and 0.02 are below this setup's gradient norm (about 0.03):
        # clipping acts, and a hard-coded norm fails one of them
        for n_micro, max_norm in ((1, None), (2, None), (4, None), (2, 0.01), (4, 0.02)):
            label = f"{what} with grad_accum_steps={n_micro}, max_grad_norm={max_norm}"
            want_loss, want, _, _ = _run(_reference_step, n_micro, max_norm)
            got_loss, got, grads, calls = _run(student, n_micro, max_norm, stale_grads=True)
            n_rows = len(_UNEVEN)
            if calls and calls != [n_rows // n_micro] * n_micro:
                if calls == [n_rows]:
                    diagnosis = ("the whole batch went through the model at once: it was not "
                                 "split into micro-batches")
                else:
                    diagnosis = (f"the model saw batches of sizes {calls}, expected "
                                 f"{n_micro} micro-batches of {n_rows // n_micro}")
                fail(f"{label}: {diagnosis}.",
                     "loop over split_batch(batch, grad_accum_steps), one forward and one "
                     "backward per micro-batch.")
            if not _same(got, want):
                if _same(got, start):
                    if all(g is None or not bool(g.any()) for g in grads):
                        fail(f"{label} did not change the parameters: the gradients were "
                             f"zeroed after the backward passes, before optimizer.step(), so "
                             f"the step had nothing to apply.",
                             "call optimizer.zero_grad() at the start of the step, before the "
                             "first micro-batch, never between backward and step.")
                    fail(f"{label} did not change the parameters, although gradients were "
                         f"computed: optimizer.step() is missing.",
                         "call optimizer.step() once, after the backward passes (and the "
                         "clipping).")
                for kwargs, diagnosis, hint in _MISTAKES:
                    stale = kwargs.get("zero") == "none"
                    if max_norm is None and "clip" in kwargs:
                        continue
                    wrong = _run(_reference_step, n_micro, max_norm, stale_grads=stale, **kwargs)
                    if _same(got, wrong[1]):
                        fail(f"{label}: {diagnosis}.", hint)
                fail(f"{label} updated the parameters differently from one optimiser step on the "
                     f"whole batch.", _ORDER)
            if got_loss is None:
                fail(f"{label} returned None: the batch loss is missing.",
                     "return the batch loss (a float): the sum of the micro-batch losses' "
                     ".item().")
            if isinstance(got_loss, torch.Tensor) and got_loss.requires_grad:
                fail(f"{label} returned a tensor that still holds the autograd graph (you added "
                     f"up the losses themselves).",
                     "add up loss.item() of each micro-batch: a float keeps no graph alive.")
            try:
                value = float(got_loss)
            except (TypeError, ValueError):
                fail(f"{label} returned a {type(got_loss).__name__}.",
                     "return the batch loss as a float (add up the micro-batch losses' .item()).")
            if abs(value - want_loss) > 1e-4 * max(1.0, abs(want_loss)):
                hint = ("the loss is the mean over all answer tokens of the batch: add up the "
                        "micro-batch losses you backpropagated (each already divided by "
                        "batch.n_tokens), not only the last one.")
                fail(f"{label} returned the loss {value:.6f}, expected {want_loss:.6f}.", hint)
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------------
# The mistakes the checks know (tests/test_check_variants.py runs each through its check cell)
# ---------------------------------------------------------------------------------------------

_SELECT = "nb02_select_trainable_impl"
_STEP = "nb02_optimisation_step_impl"
_OWN = OWN_WORK_PREFIX + " course_lib."
_IS_LORA = 'is_lora = ".lora_A" in name or ".lora_B" in name'
_ZERO = "optimizer.zero_grad(set_to_none=True)\n"
_LOSS = 'loss = lm_loss(logits, micro.targets, micro.mask, reduction="sum") / n_tokens'
_STEP_CALL = "optimizer.step()  # one update with the gradient of the whole batch\n"
_CLIP = "torch.nn.utils.clip_grad_norm_(params, max_grad_norm)"
_SPLIT = "split_batch(batch, grad_accum_steps)"

VARIANTS = (
    # select_trainable_parameters(model)
    mistake(_SELECT, "only_wrapped_bases", "freezes only the wrapped base weights",
            [(_IS_LORA, 'is_lora = "base_layer" not in name')],
            says="embeddings, norms and lm_head too"),
    mistake(_SELECT, "nothing_frozen", "never freezes anything",
            [("param.requires_grad_(is_lora)", "pass")], says="W0 must be frozen"),
    mistake(_SELECT, "everything_frozen", "freezes the LoRA factors too",
            [("param.requires_grad_(is_lora)", "param.requires_grad_(False)")],
            says="keep lora_A and lora_B"),
    mistake(_SELECT, "only_A", "keeps only lora_A trainable",
            [(_IS_LORA, 'is_lora = ".lora_A" in name')], says="keep lora_A and lora_B"),
    mistake(_SELECT, "returns_all", "returns every parameter, frozen ones too",
            [("        if is_lora:\n            trainable.append(param)",
              "        trainable.append(param)")], says="also holds parameters that are not"),
    mistake(_SELECT, "returns_names", "returns the names",
            [("trainable.append(param)", "trainable.append(name)")],
            says="nn.Parameter objects themselves"),
    mistake(_SELECT, "returns_only_A", "freezes right but returns only the lora_A factors",
            [("        if is_lora:", '        if ".lora_A" in name:')],
            says="(every lora_B is missing)"),
    mistake(_SELECT, "A_then_B", "returns all lora_A, then all lora_B",
            [("    return trainable", "    return ([p for p in trainable if p.shape[0] == 2]\n"
                                       "            + [p for p in trainable if p.shape[0] != 2])")],
            says="in another order"),
    mistake(_SELECT, "missing_return", "freezes but returns nothing",
            [("    return trainable", "    pass")], says="forget the `return`"),
    mistake(_SELECT, "delegates", "calls course_lib's mark_only_lora_as_trainable",
            [(BLOCK, "from course_lib.model.lora import mark_only_lora_as_trainable\n"
                     "mark_only_lora_as_trainable(model)\n"
                     "return [p for p in model.parameters() if p.requires_grad]")], says=_OWN),
    alternative(_SELECT, "freeze_then_unfreeze", "freezes the model, then unfreezes lora_*",
                [(BLOCK, "model.requires_grad_(False)\n"
                         "trainable = []\n"
                         "for name, param in model.named_parameters():\n"
                         "    if name.rsplit('.', 1)[-1] in ('lora_A', 'lora_B'):\n"
                         "        param.requires_grad = True\n"
                         "        trainable.append(param)\n"
                         "return trainable")]),
    # optimisation_step(model, optimizer, batch, grad_accum_steps, max_grad_norm)
    mistake(_STEP, "no_zero_grad", "never zeroes the gradients",
            [("    " + _ZERO, "")], says="optimizer.zero_grad() is missing"),
    mistake(_STEP, "zero_grad_before_step", "zeroes the gradients between backward and step",
            [("    " + _ZERO, ""), ("    " + _STEP_CALL, "    " + _ZERO + "    " + _STEP_CALL)],
            says="zeroed after the backward passes, before optimizer.step()"),
    mistake(_STEP, "zero_grad_after_step", "zeroes the gradients at the end of the step",
            [("    " + _ZERO, ""), ("    return total", "    " + _ZERO + "    return total")],
            says="or it comes after optimizer.step()"),
    mistake(_STEP, "zero_grad_in_loop", "zeroes the gradients for every micro-batch",
            [("        logits = model(micro.inputs)",
              "        " + _ZERO + "        logits = model(micro.inputs)")],
            says="inside the micro-batch loop"),
    mistake(_STEP, "no_step", "forgets optimizer.step()", [("    " + _STEP_CALL, "")],
            says="optimizer.step() is missing"),
    mistake(_STEP, "step_in_loop", "steps after every micro-batch",
            [("    " + _STEP_CALL, ""),
             ("        total += loss.item()\n",
              "        total += loss.item()\n        optimizer.step()\n")],
            says="optimizer.step() runs inside the micro-batch loop"),
    mistake(_STEP, "mean_of_means", "averages the micro-batch means",
            [(_LOSS, "loss = lm_loss(logits, micro.targets, micro.mask) / grad_accum_steps")],
            says="pitfall 5"),
    mistake(_STEP, "micro_tokens", "divides by the micro-batch's own token count",
            [(_LOSS, 'loss = lm_loss(logits, micro.targets, micro.mask, reduction="sum") '
                     '/ micro.n_tokens')], says="divided by its own token count"),
    mistake(_STEP, "never_divided", "backpropagates the summed token loss",
            [(_LOSS, 'loss = lm_loss(logits, micro.targets, micro.mask, reduction="sum")')],
            says="never divided"),
    mistake(_STEP, "no_clipping", "ignores max_grad_norm",
            [("        " + _CLIP + "\n", "        pass\n")], says="not clipped"),
    mistake(_STEP, "hard_coded_norm", "clips at a hard-coded norm 1.0",
            [(_CLIP, "torch.nn.utils.clip_grad_norm_(params, 1.0)")], says="hard-coded"),
    mistake(_STEP, "clip_in_loop", "clips after every backward pass",
            [("        total += loss.item()\n",
              "        total += loss.item()\n        if max_grad_norm is not None:\n"
              "            torch.nn.utils.clip_grad_norm_(\n"
              "                [p for p in model.parameters() if p.requires_grad], max_grad_norm)\n"),
             ("        " + _CLIP + "\n", "        pass\n")],
            says="clipped inside the loop"),
    mistake(_STEP, "not_split", "runs the whole batch at once",
            [(_SPLIT, "split_batch(batch, 1)")], says="not split into micro-batches"),
    mistake(_STEP, "tensor_loss", "adds up the loss tensors instead of .item()",
            [("total += loss.item()", "total += loss")], says="holds the autograd graph"),
    mistake(_STEP, "last_loss", "returns only the last micro-batch's loss",
            [("total += loss.item()", "total = loss.item()")], says="not only the last one"),
    mistake(_STEP, "delegates_accumulate", "calls course_lib's accumulate_gradients",
            [(BLOCK, "optimizer.zero_grad(set_to_none=True)\n"
                     "total = accumulate_gradients(model, split_batch(batch, grad_accum_steps))\n"
                     "if max_grad_norm is not None:\n"
                     "    torch.nn.utils.clip_grad_norm_(\n"
                     "        [p for p in model.parameters() if p.requires_grad], max_grad_norm)\n"
                     "optimizer.step()\n"
                     "return total")], says=_OWN),
    mistake(_STEP, "delegates_train_step", "calls course_lib's train_step",
            [(BLOCK, "from course_lib.train import train_step\n"
                     "return train_step(model, optimizer, batch, grad_accum_steps, "
                     "max_grad_norm)")], says=_OWN),
    alternative(_STEP, "zero_grad_default", "zero_grad() without set_to_none, all parameters "
                                            "clipped",
                [(_ZERO, "optimizer.zero_grad()\n"),
                 (_CLIP, "torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)")]),
    alternative(_STEP, "loss_per_token_mean", "mean loss times the micro-batch's token share",
                [(_LOSS, "loss = lm_loss(logits, micro.targets, micro.mask) * "
                         "(micro.n_tokens / n_tokens)")]),
)
