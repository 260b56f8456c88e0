"""course_lib.checks.finetuning: each check passes on the solution and fails usefully on the
release stub and on typical mistakes. The solution and the stub are taken from
solutions/02_lora_finetuning.ipynb itself (the stub through the release's own transformation),
so the test follows the notebook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from notebook_fill_ins import run_fill_ins
from torch import nn

import course_lib.model.lora as lora_lib
import course_lib.train as train_lib
from course_lib.checks.core import CheckFailure
from course_lib.checks.finetuning import (
    VARIANTS,
    check_optimisation_step,
    check_select_trainable_parameters,
)
from course_lib.model.tinygpt import lm_loss
from course_lib.train import split_batch

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / "02_lora_finetuning.ipynb"
FILL_INS = ("nb02_select_trainable_impl", "nb02_optimisation_step_impl")


pytestmark = pytest.mark.usefixtures("one_thread")


def notebook_namespace(released: bool) -> dict:
    """Run the fill-in cells (solution or released stub) as the notebook would."""
    ns: dict = {"torch": torch, "nn": nn, "lm_loss": lm_loss, "split_batch": split_batch}
    return run_fill_ins(NOTEBOOK, tuple(FILL_INS), ns, released)


@pytest.fixture(scope="module")
def solution():
    return notebook_namespace(released=False)


@pytest.fixture(scope="module")
def stub():
    return notebook_namespace(released=True)


# ---------------------------------------------------------------------------------------------
# the solution passes, printing exactly the success line; the stub fails with a hint
# ---------------------------------------------------------------------------------------------


def test_select_trainable_passes_on_the_solution(solution, capsys):
    check_select_trainable_parameters(solution["select_trainable_parameters"])
    assert capsys.readouterr().out == "CHECK nb02_select_trainable: PASS\n"


def test_optimisation_step_passes_on_the_solution(solution, capsys):
    check_optimisation_step(solution["optimisation_step"])
    assert capsys.readouterr().out == "CHECK nb02_optimisation_step: PASS\n"


@pytest.mark.parametrize(
    "check, name",
    [
        (check_select_trainable_parameters, "select_trainable_parameters"),
        (check_optimisation_step, "optimisation_step"),
    ],
)
def test_checks_fail_on_the_release_stub(stub, capsys, check, name):
    with pytest.raises(AssertionError, match="is not filled in yet"):
        check(stub[name])
    assert "PASS" not in capsys.readouterr().out


def test_checks_leave_the_global_random_state_alone(solution):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_select_trainable_parameters(solution["select_trainable_parameters"])
    check_optimisation_step(solution["optimisation_step"])
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# typical mistakes get specific hints
# ---------------------------------------------------------------------------------------------


def _freeze_only_wrapped_bases(model):
    for name, p in model.named_parameters():
        if name.endswith("base_layer.weight"):
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _freeze_everything(model):
    model.requires_grad_(False)
    return []


def _leave_base_weights_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or "base_layer" in name)
    return [p for p in model.parameters() if p.requires_grad]


def _return_names(model):
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            names.append(name)
    return names


def _return_only_lora_A(model):
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_A" in name:
            out.append(p)
    return out


@pytest.mark.parametrize(
    "fn, hint",
    [
        (lambda model: None, "forget the `return`"),
        (_freeze_only_wrapped_bases, "embeddings, norms and lm_head too"),
        (_freeze_everything, "keep lora_A and lora_B"),
        (_leave_base_weights_trainable, "wrapped base weight"),
        (_return_names, "nn.Parameter objects themselves"),
        (_return_only_lora_A, "expected the"),
    ],
)
def test_select_trainable_mistakes(fn, hint, capsys):
    with pytest.raises(AssertionError, match=hint):
        check_select_trainable_parameters(fn)
    assert "PASS" not in capsys.readouterr().out


def _step(mode="tokens", zero=True, clip=True, step=True, as_tensor=False):
    def fn(model, optimizer, batch, grad_accum_steps=1, max_grad_norm=None):
        if zero:
            optimizer.zero_grad()
        micro = split_batch(batch, grad_accum_steps)
        total = 0.0
        for mb in micro:
            logits = model(mb.inputs)
            if mode == "tokens":
                loss = lm_loss(logits, mb.targets, mb.mask, reduction="sum") / batch.n_tokens
            elif mode == "mean_of_means":
                loss = lm_loss(logits, mb.targets, mb.mask) / len(micro)
            elif mode == "micro_tokens":  # normalised by the micro-batch's own token count
                loss = lm_loss(logits, mb.targets, mb.mask)
            elif mode == "zero_inside":
                optimizer.zero_grad()
                loss = lm_loss(logits, mb.targets, mb.mask, reduction="sum") / batch.n_tokens
            loss.backward()
            total = total + (loss.detach() if as_tensor else loss.item())
        if clip and max_grad_norm is not None:
            nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], max_grad_norm
            )
        if step:
            optimizer.step()
        return total

    return fn


@pytest.mark.parametrize(
    "fn, hint",
    [
        (_step(step=False), r"call optimizer\.step\(\)"),
        (_step(zero=False), "gradients of an earlier step"),
        (_step(clip=False), "not clipped"),
        (_step(mode="mean_of_means"), "pitfall 5"),
        (_step(mode="micro_tokens"), "unscaled"),
        (_step(mode="zero_inside"), "inside the micro-batch loop"),
    ],
)
def test_optimisation_step_mistakes(fn, hint, capsys):
    with pytest.raises(AssertionError, match=hint):
        check_optimisation_step(fn)
    assert "PASS" not in capsys.readouterr().out


def test_optimisation_step_accepts_a_tensor_loss_but_not_none(capsys):
    check_optimisation_step(_step(as_tensor=True))  # a 0-d tensor converts to float
    assert capsys.readouterr().out == "CHECK nb02_optimisation_step: PASS\n"
    correct = _step()

    def returns_none(*args):
        correct(*args)

    with pytest.raises(AssertionError, match="returned None"):
        check_optimisation_step(returns_none)


# ---------------------------------------------------------------------------------------------
# order mistakes, hard-coded arguments and delegation (issue 14)
# ---------------------------------------------------------------------------------------------


def _custom_step(*, zero_at="start", step_in_loop=False, split=True, clip_norm=None,
                 keep_graph=False):
    def fn(model, optimizer, batch, grad_accum_steps=1, max_grad_norm=None):
        if zero_at == "start":
            optimizer.zero_grad()
        total = 0.0
        for mb in split_batch(batch, grad_accum_steps if split else 1):
            logits = model(mb.inputs)
            loss = lm_loss(logits, mb.targets, mb.mask, reduction="sum") / batch.n_tokens
            loss.backward()
            total = total + (loss if keep_graph else loss.item())
            if step_in_loop:
                optimizer.step()
        norm = clip_norm if clip_norm is not None else max_grad_norm
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], norm)
        if zero_at == "before_step":
            optimizer.zero_grad()
        if not step_in_loop:
            optimizer.step()
        if zero_at == "end":
            optimizer.zero_grad()
        return total

    return fn


@pytest.mark.parametrize("fn, says", [
    (_custom_step(zero_at="before_step"), "zeroed after the backward passes, before "
                                          "optimizer.step()"),
    (_custom_step(zero_at="end"), "or it comes after optimizer.step()"),
    (_custom_step(step_in_loop=True), "optimizer.step() runs inside the micro-batch loop"),
    (_custom_step(split=False), "not split into micro-batches"),
    (_custom_step(clip_norm=1.0), "hard-coded"),
    (_custom_step(keep_graph=True), "holds the autograd graph"),
    (lambda model, opt, batch, n=1, norm=None: train_lib.train_step(model, opt, batch, n, norm),
     "write it instead of calling course_lib.train.train_step"),
    (lambda model, opt, batch, n=1, norm=None: train_lib.accumulate_gradients(
        model, split_batch(batch, n)),
     "write it instead of calling course_lib.train.accumulate_gradients"),
])
def test_optimisation_step_names_the_mistake(fn, says, capsys):
    with pytest.raises(CheckFailure) as info:
        check_optimisation_step(fn)
    assert says in str(info.value)
    assert capsys.readouterr().out == ""


def test_select_trainable_refuses_the_library():
    def delegate(model):
        lora_lib.mark_only_lora_as_trainable(model)
        return [p for p in model.parameters() if p.requires_grad]

    with pytest.raises(CheckFailure, match="course_lib.model.lora.mark_only_lora_as_trainable"):
        check_select_trainable_parameters(delegate)


def test_select_trainable_order_and_extras():
    def a_then_b(model):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        named = list(model.named_parameters())
        return ([p for n, p in named if n.endswith("lora_A")]
                + [p for n, p in named if n.endswith("lora_B")])

    with pytest.raises(CheckFailure, match="in another order"):
        check_select_trainable_parameters(a_then_b)

    def everything(model):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return list(model.parameters())

    with pytest.raises(CheckFailure, match="also holds parameters that are not LoRA"):
        check_select_trainable_parameters(everything)


def test_every_fill_in_lists_mistakes_and_delegation():
    for fill_in in FILL_INS:
        says = [v.says for v in VARIANTS if v.fill_in == fill_in and v.is_mistake]
        assert len(says) >= 5
        assert any("the check runs your own implementation" in s for s in says)
