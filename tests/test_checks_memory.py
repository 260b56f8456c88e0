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
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from course_lib.checks import CheckFailure
from course_lib.checks.memory import (
    VARIANTS,
    check_adamw8bit_bytes,
    check_checkpointed_forward,
    check_micro_batch_loss,
    check_saved_bytes,
)

# the library's answers, imported where a student's cell would put them (globals), so the
# own-work guard finds them
from course_lib.model.tinygpt import lm_loss  # noqa: E402
from course_lib.utils.memory import SavedTensorsMeter, adamw_state_bytes  # noqa: E402

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
    with pytest.raises(CheckFailure) as info:
        check(stub[name])
    message = str(info.value)
    assert "is not filled in yet" in message
    assert f"fill in {name} above, then run this cell again" in message
    assert message.count("fill in") == 1
    assert info.value.check_id == grade_id.removesuffix("_impl")
    assert capsys.readouterr().out == ""


def test_checks_do_not_change_the_global_random_state(solution):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    for check, name, _, _ in CHECKS:
        check(solution[name])
    assert torch.equal(torch.rand(3), want)


def test_every_fill_in_has_variants_with_a_delegation_mistake():
    for fill_in in FILL_INS:
        mistakes = [v for v in VARIANTS if v.fill_in == fill_in and v.is_mistake]
        assert len(mistakes) >= 5, fill_in
        assert any("the check runs your own implementation" in v.says for v in mistakes)


# ---------------------------------------------------------------------------------------------
# saved activations
# ---------------------------------------------------------------------------------------------


def _saved_variant(key="storage", exclude=("parameters", "buffers"), nbytes=None):
    def saved_activation_bytes(model, fn):
        state = {t.untyped_storage().data_ptr()
                 for name in exclude for t in getattr(model, name)()}
        saved = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            k = {"storage": ptr, "view": t.data_ptr(), "none": len(saved)}[key]
            if ptr not in state:
                saved[k] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        size = nbytes or (lambda t: t.untyped_storage().nbytes())
        total = sum(size(t) for t in saved.values())
        del out
        return total

    return saved_activation_bytes


@pytest.mark.parametrize(("fn", "match"), [
    (_saved_variant(key="none"), "count each storage once"),
    (_saved_variant(key="view"), "two views of one storage were counted twice"),
    (_saved_variant(nbytes=lambda t: t.numel() * t.element_size()),
     "a saved view keeps its whole storage alive"),
    (_saved_variant(exclude=()), r"the parameters \(and buffers\) of `model` were counted"),
    (_saved_variant(exclude=("parameters",)), "the model's buffers were counted"),
    (lambda model, fn: 0, "nothing was counted"),
    (lambda model, fn: None, "forget the `return`"),
    (lambda model, fn: 1.5, "not an int"),
    (lambda model, fn: torch.tensor(400), "a tensor"),
])
def test_saved_bytes_mistakes(fn, match):
    with pytest.raises(CheckFailure, match=match):
        check_saved_bytes(fn)


def test_saved_bytes_refuses_the_library_meter(capsys):
    def via_meter(model, fn):
        with SavedTensorsMeter(model) as meter:
            out = fn()
        del out
        return meter.nbytes

    with pytest.raises(CheckFailure, match="the check runs your own implementation: write it "
                       "instead of calling course_lib.utils.memory.SavedTensorsMeter"):
        check_saved_bytes(via_meter)
    assert capsys.readouterr().out == ""
    with SavedTensorsMeter() as meter:  # the guard is gone after the check
        torch.ones(3, requires_grad=True).exp()
    assert meter.nbytes == 12


# ---------------------------------------------------------------------------------------------
# checkpointing
# ---------------------------------------------------------------------------------------------


def _each(blocks, x, **kwargs):
    for block in blocks:
        x = checkpoint(block, x, **kwargs)
    return x


def _only_first(blocks, x):
    x = checkpoint(blocks[0], x, use_reentrant=False)
    for block in blocks[1:]:
        x = block(x)
    return x


def _one_segment(blocks, x):
    def run(h):
        for block in blocks:
            h = block(h)
        return h

    return checkpoint(run, x, use_reentrant=False)


def _no_grad(blocks, x):
    with torch.no_grad():
        for block in blocks:
            x = block(x)
    return x


@pytest.mark.parametrize(("fn", "match"), [
    (lambda blocks, x: _plain(blocks, x), "nothing was checkpointed"),
    (lambda blocks, x: _each(blocks, x, use_reentrant=True), "pass use_reentrant=False"),
    (lambda blocks, x: _each(blocks, x), "its default is use_reentrant=True"),
    (_one_segment, "the whole stack is one checkpointed segment"),
    (_only_first, r"blocks \[1, 2, 3\] were not checkpointed"),
    (_no_grad, "torch.no_grad()"),
    (lambda blocks, x: _each(reversed(blocks), x, use_reentrant=False), "last to first"),
    (lambda blocks, x: x, "returned its input x unchanged"),
    (lambda blocks, x: checkpoint(blocks[0](x), use_reentrant=False), r"not checkpoint\(block"),
    (lambda blocks, x: None, "return the output of the last block"),
    (lambda blocks, x: x.sum(), "should return a tensor of shape"),
])
def test_checkpointing_mistakes(fn, match):
    with pytest.raises(CheckFailure, match=match):
        check_checkpointed_forward(fn)


def _plain(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def test_checkpointing_refuses_checkpoint_sequential():
    with pytest.raises(CheckFailure, match="instead of calling "
                       "torch.utils.checkpoint.checkpoint_sequential"):
        check_checkpointed_forward(
            lambda blocks, x: checkpoint_sequential(blocks, len(blocks), x, use_reentrant=False))
    import torch.utils.checkpoint as tuc
    assert tuc.checkpoint_sequential is checkpoint_sequential


def test_checkpointing_of_block_forward_passes(capsys):
    check_checkpointed_forward(
        lambda blocks, x: _each([b.forward for b in blocks], x, use_reentrant=False))
    assert capsys.readouterr().out == "CHECK nb05_checkpointing: PASS\n"


# ---------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------


def _per_token(logits, targets):
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)


@pytest.mark.parametrize(("fn", "match"), [
    (lambda lg, t, m, n: (_per_token(lg, t) * m).sum() / m.sum(), "Pitfall 5"),
    (lambda lg, t, m, n: _per_token(lg, t).sum() / n, "multiply the per-token losses by the mask"),
    (lambda lg, t, m, n: (_per_token(lg, t) * m).sum(), "not divided by total_tokens"),
    (lambda lg, t, m, n: F.cross_entropy(lg.reshape(-1, lg.size(-1)), t.reshape(-1)),
     "default reduction='mean'"),
    (lambda lg, t, m, n: (_per_token(lg, t) * m).sum() / m.numel(), "mask.numel()"),
    (lambda lg, t, m, n: (_per_token(lg, t) * m).sum() // n, "floor division"),
    (lambda lg, t, m, n: (_per_token(lg, t) * m).sum() / m.sum() / n, "divides twice"),
    (lambda lg, t, m, n: ((_per_token(lg, t) * m).sum(-1) / m.sum(-1)).sum() / n,
     "averages each sequence"),
    (lambda lg, t, m, n: _per_token(lg, t) * m / n, "scalar tensor"),
    (lambda lg, t, m, n: F.cross_entropy(lg, t, reduction="none"), "flatten them"),
    (lambda lg, t, m, n: None, "return the loss tensor"),
    (lambda lg, t, m, n: ((_per_token(lg, t) * m).sum() / n).item(), "not .item()"),
    (lambda lg, t, m, n: ((_per_token(lg, t) * m).sum() / n).detach(), "does not require grad"),
])
def test_micro_batch_loss_mistakes(fn, match):
    with pytest.raises(CheckFailure, match=match):
        check_micro_batch_loss(fn)


def test_micro_batch_loss_refuses_the_course_loss():
    with pytest.raises(CheckFailure, match="instead of calling course_lib.model.tinygpt.lm_loss"):
        check_micro_batch_loss(lambda lg, t, m, n: lm_loss(lg, t, m, reduction="sum") / n)


def test_micro_batch_loss_alternative_passes(capsys):
    check_micro_batch_loss(
        lambda lg, t, m, n: F.cross_entropy(lg[m], t[m], reduction="sum") / n)
    assert capsys.readouterr().out == "CHECK nb05_grad_accum: PASS\n"


# ---------------------------------------------------------------------------------------------
# 8-bit optimiser state
# ---------------------------------------------------------------------------------------------


def _adam(n, min_8bit_size=4096, blocksize=256, *, m=None, bs=None, le=False, ceil=True,
          per_block=8, small=8, extra=0):
    m = min_8bit_size if m is None else m
    bs = blocksize if bs is None else bs
    if (n <= m) if le else (n < m):
        return small * n
    blocks = -(-n // bs) if ceil else n // bs
    return 2 * n + per_block * blocks + extra


@pytest.mark.parametrize(("fn", "match"), [
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, blocksize=blocksize, m=4096),
     "instead of the argument min_8bit_size=2048"),
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, min_8bit_size, bs=256),
     "instead of the argument blocksize=128"),
    (lambda n: _adam(n), "keep the signature"),
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, min_8bit_size, blocksize, le=True),
     "compare with <, not <="),
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, min_8bit_size, blocksize, m=0),
     "keep 32-bit state"),
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, min_8bit_size, blocksize,
                                                       per_block=0), "add the absmax constants"),
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, min_8bit_size, blocksize,
                                                       ceil=False), "round the block count up"),
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, min_8bit_size, blocksize,
                                                       per_block=4), "its own absmax per block"),
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, min_8bit_size, blocksize, small=4),
     "not 4"),
    (lambda n, min_8bit_size=4096, blocksize=256: _adam(n, min_8bit_size, blocksize,
                                                       extra=2048), "shared by all tensors"),
    (lambda n, min_8bit_size=4096, blocksize=256: 8 * n if n < min_8bit_size
     else 2 * n + 8 * n / blocksize, "numel / blocksize is a float"),
    (lambda n, min_8bit_size=4096, blocksize=256: None, "forget the `return`"),
])
def test_adamw8bit_mistakes(fn, match):
    with pytest.raises(CheckFailure, match=match):
        check_adamw8bit_bytes(fn)


def test_adamw8bit_refuses_the_library_formula():
    with pytest.raises(CheckFailure, match="instead of calling "
                       "course_lib.utils.memory.adamw_state_bytes"):
        check_adamw8bit_bytes(lambda n, min_8bit_size=4096, blocksize=256: adamw_state_bytes(
            [n], "adamw8bit", min_8bit_size=min_8bit_size, blocksize=blocksize) - 2048)
