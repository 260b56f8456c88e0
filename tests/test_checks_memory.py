"""course_lib.checks.memory: each check passes on the solution and fails usefully on the stub and
on typical mistakes. The solution and the stub are taken from
solutions/05_memory_compute_tradeoffs.ipynb itself (the stub through the release's own
transformation), so the test follows the notebook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from notebook_fill_ins import run_fill_ins
from torch import nn
from torch.utils.checkpoint import checkpoint

from course_lib.checks.memory import (
    check_adamw8bit_bytes,
    check_checkpointed_forward,
    check_micro_batch_loss,
    check_saved_bytes,
)

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / "05_memory_compute_tradeoffs.ipynb"
FILL_INS = {
    "nb05_saved_bytes_impl": "saved_activation_bytes",
    "nb05_checkpointing_impl": "checkpointed_forward",
    "nb05_grad_accum_impl": "micro_batch_loss",
    "nb05_adam8bit_impl": "adamw8bit_state_bytes",
}


def notebook_namespace(released: bool) -> dict:
    """Run the four fill-in cells (solution or released stub) as the notebook would."""
    ns: dict = {"torch": torch, "nn": nn, "F": F, "checkpoint": checkpoint}
    return run_fill_ins(NOTEBOOK, tuple(FILL_INS), ns, released)


@pytest.fixture(scope="module")
def solution():
    return notebook_namespace(released=False)


@pytest.fixture(scope="module")
def stub():
    return notebook_namespace(released=True)


CHECKS = [
    (check_saved_bytes, "saved_activation_bytes", "nb05_saved_bytes_impl",
     "saved_activation_bytes(model, fn)"),
    (check_checkpointed_forward, "checkpointed_forward", "nb05_checkpointing_impl",
     "checkpointed_forward(blocks, x)"),
    (check_micro_batch_loss, "micro_batch_loss", "nb05_grad_accum_impl",
     "micro_batch_loss(logits, targets, mask, total_tokens)"),
    (check_adamw8bit_bytes, "adamw8bit_state_bytes", "nb05_adam8bit_impl",
     "adamw8bit_state_bytes(numel)"),
]


def test_solution_passes_every_check(solution, capsys):
    for check, name, _, _ in CHECKS:
        check(solution[name])
    assert capsys.readouterr().out == (
        "CHECK nb05_saved_bytes: PASS\nCHECK nb05_checkpointing: PASS\n"
        "CHECK nb05_grad_accum: PASS\nCHECK nb05_adam8bit: PASS\n"
    )


@pytest.mark.parametrize(("check", "name", "grade_id", "what"), CHECKS)
def test_stub_fails_with_not_implemented_message(stub, capsys, check, name, grade_id, what):
    with pytest.raises(AssertionError) as info:
        check(stub[name])
    message = str(info.value)
    assert f"{what} is not filled in yet" in message
    assert "then run this cell again" in message
    assert capsys.readouterr().out == ""


def test_checks_do_not_change_the_global_random_state(solution):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    for check, name, _, _ in CHECKS:
        check(solution[name])
    assert torch.equal(torch.rand(3), want)


# ---------------------------------------------------------------------------------------------
# typical mistakes: saved activations
# ---------------------------------------------------------------------------------------------


def _saved_variant(dedupe: bool = True, exclude_params: bool = True, nbytes=None):
    def saved_activation_bytes(model, fn):
        state = {t.untyped_storage().data_ptr() for t in model.parameters()}
        saved = []
        keys = set()

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if (not exclude_params or ptr not in state) and (not dedupe or ptr not in keys):
                keys.add(ptr)
                saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        del out
        size = nbytes or (lambda t: t.untyped_storage().nbytes())
        return sum(size(t) for t in saved)

    return saved_activation_bytes


@pytest.mark.parametrize(("fn", "match"), [
    (_saved_variant(dedupe=False), "count each storage once"),
    (_saved_variant(exclude_params=False), "leave out the storages of model.parameters"),
    (_saved_variant(nbytes=lambda t: t.numel()), "x.sin\\(\\) \\+ x.cos\\(\\)"),
    (lambda model, fn: None, "forget the `return`"),
    (lambda model, fn: 1.5, "as an int"),
])
def test_saved_bytes_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_saved_bytes(fn)


def test_saved_bytes_passes_a_different_correct_implementation(capsys):
    from course_lib.utils.memory import SavedTensorsMeter

    def via_meter(model, fn):
        with SavedTensorsMeter(model) as meter:
            out = fn()
        del out
        return meter.nbytes

    check_saved_bytes(via_meter)
    assert capsys.readouterr().out == "CHECK nb05_saved_bytes: PASS\n"


# ---------------------------------------------------------------------------------------------
# typical mistakes: checkpointing
# ---------------------------------------------------------------------------------------------


def _no_checkpoint(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def _only_first(blocks, x):
    x = checkpoint(blocks[0], x, use_reentrant=False)
    for block in blocks[1:]:
        x = block(x)
    return x


def _no_grad(blocks, x):
    with torch.no_grad():
        for block in blocks:
            x = block(x)
    return x


def _reversed(blocks, x):
    for block in reversed(blocks):
        x = checkpoint(block, x, use_reentrant=False)
    return x


@pytest.mark.parametrize(("fn", "match"), [
    (_no_checkpoint, "as much as the plain forward"),
    (_only_first, "Checkpoint each block separately"),
    (_no_grad, "does not require grad"),
    (_reversed, "different output from applying the blocks in order"),
    (lambda blocks, x: None, "return the output of the last block"),
    (lambda blocks, x: x.sum(), "should return a tensor of shape"),
])
def test_checkpointing_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_checkpointed_forward(fn)


def test_reentrant_checkpointing_is_accepted(capsys):
    def reentrant(blocks, x):
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=True)
        return x

    check_checkpointed_forward(reentrant)
    assert capsys.readouterr().out == "CHECK nb05_checkpointing: PASS\n"


# ---------------------------------------------------------------------------------------------
# typical mistakes: gradient accumulation
# ---------------------------------------------------------------------------------------------


def _per_token(logits, targets):
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)


@pytest.mark.parametrize(("fn", "match"), [
    (lambda lg, t, m, n: (_per_token(lg, t) * m).sum() / m.sum(), "Pitfall 5"),
    (lambda lg, t, m, n: _per_token(lg, t).sum() / n, "multiply the per-token losses by the mask"),
    (lambda lg, t, m, n: (_per_token(lg, t) * m).sum(), "divide by total_tokens"),
    (lambda lg, t, m, n: _per_token(lg, t) * m / n, "scalar tensor"),
    (lambda lg, t, m, n: None, "return the loss tensor"),
    (lambda lg, t, m, n: ((_per_token(lg, t) * m).sum() / n).detach(), "differentiable"),
])
def test_micro_batch_loss_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_micro_batch_loss(fn)


def test_micro_batch_loss_with_the_course_loss_passes(capsys):
    from course_lib.model.tinygpt import lm_loss

    check_micro_batch_loss(lambda lg, t, m, n: lm_loss(lg, t, m, reduction="sum") / n)
    assert capsys.readouterr().out == "CHECK nb05_grad_accum: PASS\n"


# ---------------------------------------------------------------------------------------------
# typical mistakes: 8-bit optimiser state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fn", "match"), [
    (lambda n: 2 * n + 8 * -(-n // 256), "fewer than 4096 elements keep 32-bit state"),
    (lambda n: 8 * n if n < 4096 else 2 * n, "add the absmax constants"),
    (lambda n: 8 * n if n < 4096 else 2 * n + 8 * (n // 256), "round the block count up"),
    (lambda n: 8 * n if n < 4096 else n + 4 * -(-n // 256), "two states"),
    (lambda n: 8 * n, r"numel >= 4096: 2 bytes per element"),
    (lambda n: None, "forget the `return`"),
    (lambda n: float(8 * n), "should return an int"),
])
def test_adamw8bit_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_adamw8bit_bytes(fn)
