"""Checks for notebook 05_memory_compute_tradeoffs.

- :func:`check_saved_bytes`: the student's ``saved_activation_bytes(model, fn)`` measures what
  autograd saves for backward (each storage once and whole, as it is really kept; ``model``'s
  parameters and buffers excluded), compared with ``course_lib.utils.memory.SavedTensorsMeter``.
- :func:`check_checkpointed_forward`: ``checkpointed_forward(blocks, x)`` gives the plain
  forward's output and gradients, also for an input without grad (frozen embeddings), while
  saving only the blocks' inputs and recomputing each block on its own.
- :func:`check_micro_batch_loss`: ``micro_batch_loss(logits, targets, mask, total_tokens)``
  makes accumulated gradients equal the large batch's (pitfall 5).
- :func:`check_adamw8bit_bytes`: ``adamw8bit_state_bytes(numel, min_8bit_size, blocksize)``
  follows bitsandbytes' rule, for varied thresholds and block sizes.

Each check uses small seeded inputs and restores the global random state afterwards. Each
failure names the mistake it recognises by its signature on the check's inputs; those mistakes
(and correct alternatives) are listed in :mod:`.memory_variants`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks import call_student, check, expect, fail
from course_lib.checks.memory_variants import VARIANTS
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
    "VARIANTS",
]

_QMAPS = 2 * 256 * 4  # the two shared quantisation maps, not part of one tensor's state


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


class _Scaled(nn.Module):
    """``exp(x * scale)`` with ``scale`` a buffer: ``mul`` saves the buffer for x's gradient."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).exp()


def _no_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).sum()


def _saved_cases() -> list[tuple[str, nn.Module, Callable[[], torch.Tensor]]]:
    """``(description, model, fn)`` cases: repeated saves, views of a larger storage, two views
    of one storage, parameters, buffers, nothing saved."""
    x = torch.randn(100, requires_grad=True)
    empty = nn.Module()
    lin = nn.Linear(30, 20)
    inp = torch.randn(5, 30, requires_grad=True)  # so the layer also saves its weight
    scaled = _Scaled(30)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    mlp_in = torch.randn(6, 8)
    frozen = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).requires_grad_(False)

    def two_views() -> torch.Tensor:
        a = x[:30]
        return a.sin().sum() + a.cos().sum() + x[60:].sin().sum()

    return [
        ("x.sin() + x.cos() for a 100-element x (both save the same x)", empty,
         lambda: (x.sin() + x.cos()).sum()),
        ("x[:50].exp() (exp saves its new 50-element result)", empty,
         lambda: x[:50].exp().sum()),
        ("x[:25].sin() (sin saves the view x[:25], which keeps all of x's 100 elements alive)",
         empty, lambda: x[:25].sin().sum()),
        ("a = x[:30]; a.sin() + a.cos() + x[60:].sin() (three saves, two views, one storage)",
         empty, two_views),
        ("a Linear(30, 20) layer on a (5, 30) input that requires grad (it saves its weight)",
         lin, lambda: lin(inp).sum()),
        ("a module computing exp(x * self.scale) with `scale` a registered buffer", scaled,
         lambda: scaled(inp).sum()),
        ("an MLP Linear-GELU-Linear", mlp, lambda: mlp(mlp_in).pow(2).sum()),
        ("a frozen MLP on an input without grad (nothing requires grad)", frozen,
         lambda: frozen(mlp_in).sum()),
        ("an MLP run under torch.no_grad()", mlp, lambda: _no_grad(mlp, mlp_in)),
    ]


def _packed(fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor autograd packs while ``fn()`` runs (repeats and views included)."""
    seen: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return seen


def _count(
    tensors: list[torch.Tensor], excluded: set[int], key: Callable[[torch.Tensor], Any] | None,
    size: Callable[[torch.Tensor], int],
) -> int:
    keys: set[Any] = set()
    total = 0
    for t in tensors:
        if t.untyped_storage().data_ptr() in excluded:
            continue
        if key is not None:
            k = key(t)
            if k in keys:
                continue
            keys.add(k)
        total += size(t)
    return total


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _view_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _saved_signatures(
    model: nn.Module, tensors: list[torch.Tensor]
) -> list[tuple[int, str]]:
    """``(bytes, diagnosis)`` of the mistakes the check knows, on one case's packed tensors."""
    params = {_storage_ptr(p) for p in model.parameters()}
    buffers = {_storage_ptr(b) for b in model.buffers()}
    state = params | buffers
    return [
        (_count(tensors, state, None, _storage_bytes),
         "that counts every saved tensor, also a storage saved again or through another view: "
         "count each storage once (key a dict by t.untyped_storage().data_ptr())"),
        (_count(tensors, state, lambda t: t.data_ptr(), _storage_bytes),
         "two views of one storage were counted twice: t.data_ptr() is where the view starts, "
         "so different views differ; key by t.untyped_storage().data_ptr(), the storage's "
         "address"),
        (_count(tensors, state, _storage_ptr, _view_bytes),
         "that counts only the elements of each saved view (t.numel() * t.element_size()); "
         "a saved view keeps its whole storage alive: count t.untyped_storage().nbytes()"),
        (_count(tensors, params, _storage_ptr, _storage_bytes),
         "the model's buffers were counted: buffers (like this `scale`) are state of the model, "
         "not activations; leave out model.buffers() as well as model.parameters()"),
        (_count(tensors, set(), _storage_ptr, _storage_bytes),
         "the parameters (and buffers) of `model` were counted: they are weights, not "
         "activations; leave out the storages of model.parameters() and model.buffers()"),
        (_count(tensors, buffers, _storage_ptr, _storage_bytes),
         "the parameters of `model` were counted (the layer saves its weight for the input's "
         "gradient): leave out the storages of model.parameters()"),
    ]


@check("nb05_saved_bytes", forbid=(
    "course_lib.utils.memory.SavedTensorsMeter",
    "course_lib.utils.memory.unique_storage_bytes",
    "course_lib.utils.memory.measure_training_step",
))
def check_saved_bytes(student_fn: Callable[..., Any]) -> None:
    """``student_fn(model, fn)``: bytes autograd saves while ``fn()`` runs (unique storages,
    whole, ``model``'s parameters and buffers excluded)."""
    what = "saved_activation_bytes(model, fn)"
    with _Seeded(0):
        for description, model, fn in _saved_cases():
            with SavedTensorsMeter(model) as meter:
                out = fn()
            want = meter.nbytes
            del out
            got = call_student(
                student_fn, model, fn, what=what,
                explain=lambda exc: (
                    "call fn() inside `with torch.autograd.graph.saved_tensors_hooks(pack, "
                    "unpack):`, where pack(t) records t and returns it and unpack(t) returns t"
                ),
            )
            expect(got is not None, f"{what} returned None.",
                   hint="return the total number of bytes (did you forget the `return`?)")
            if isinstance(got, torch.Tensor) and got.numel() == 1:
                fail(f"{what} returned a tensor ({got.item():g}), not an int.",
                     "return a Python int: int(...) of the sum, or sum the ints of "
                     "t.untyped_storage().nbytes()")
            expect(_is_int(got), f"{what} returned a {type(got).__name__}, not an int.",
                   hint="the number of bytes is a Python int (t.untyped_storage().nbytes() is one)")
            if got == want:
                continue
            message = f"{what} for {description} returned {got:,} bytes, expected {want:,}."
            if got == 0:
                fail(message, "nothing was counted: call fn() inside the `with "
                     "torch.autograd.graph.saved_tensors_hooks(pack, unpack):` block, and let "
                     "pack(t) record every tensor it receives")
            if want == 0:
                fail(message, "nothing requires grad here (or no graph is built under "
                     "torch.no_grad()), so autograd saves nothing: count only what the pack "
                     "hook of saved_tensors_hooks receives, while fn() runs")
            for value, diagnosis in _saved_signatures(model, _packed(fn)):
                if value == got and value != want:
                    fail(message, diagnosis)
            fail(message, "count, once per storage, the bytes of every tensor the pack hook "
                 "receives while fn() runs, except the storages of the model's parameters and "
                 "buffers; keep the tensors (not just their sizes) until you have counted")


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


def _recording(forward: Callable[..., Any], i: int, calls: list[int]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        calls.append(i)
        return forward(*args, **kwargs)

    return run


def _explain_checkpoint(exc: BaseException) -> str | None:
    text = str(exc)
    if "object is not callable" in text:
        return ("checkpoint takes the function and its inputs separately: "
                "checkpoint(block, x, use_reentrant=False), not checkpoint(block(x), ...)")
    if "not iterable" in text or "subscriptable" in text:
        return "`blocks` is an nn.ModuleList: loop over it (for block in blocks) in order"
    return None


def _run_checkpointed(student_fn, blocks, x, what, calls):
    """The student's forward under a meter; ``(output, meter, forward calls, warnings)``."""
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with SavedTensorsMeter(blocks) as meter:
            out = call_student(student_fn, blocks, x, what=what, explain=_explain_checkpoint)
    forward = list(calls)
    calls.clear()
    return out, meter, forward, [str(w.message) for w in caught]


def _expect_output(out, ref_out, what, case, blocks, x):
    expect(out is not None, f"{what} returned None.",
           hint="return the output of the last block (x after the loop)")
    expect(
        isinstance(out, torch.Tensor) and out.shape == ref_out.shape,
        f"{what} should return a tensor of shape {tuple(ref_out.shape)} (the input's shape), "
        f"got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.",
        hint="apply each block to the previous block's output and return the last output",
    )
    if not torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4):
        message = f"{what} {case} returned a different output from applying the blocks in order"
        if torch.equal(out, x):
            fail(message + ": it returned its input x unchanged.",
                 "assign each block's output back to x (x = checkpoint(block, x, ...)), so the "
                 "next block gets it, and return the last x")
        with torch.no_grad():
            backwards = _plain(nn.ModuleList(reversed(blocks)), x)
        if torch.allclose(out, backwards, atol=1e-5, rtol=1e-4):
            fail(message + ": it equals the blocks applied last to first.",
                 "loop over the blocks in their order (for block in blocks), not reversed")
        fail(message + ".",
             "checkpointing must not change the result: x = checkpoint(block, x, ...) for each "
             "block, in order, each block once, and return the last x")


@check("nb05_checkpointing", forbid=("torch.utils.checkpoint.checkpoint_sequential",))
def check_checkpointed_forward(student_fn: Callable[..., Any]) -> None:
    """``student_fn(blocks, x)``: the blocks applied in order, each under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; also for an input without
    grad (frozen embeddings, the normal LoRA case)."""
    what = "checkpointed_forward(blocks, x)"
    with _Seeded(0):
        d, hidden, n_blocks = 16, 64, 4
        blocks = nn.ModuleList(ResidualMLP(d, hidden) for _ in range(n_blocks))
        calls: list[int] = []
        for i, block in enumerate(blocks):  # record each call, also block.forward(x)
            block.forward = _recording(block.forward, i, calls)
        try:
            x = torch.randn(8, 10, d)
            block_input = x.numel() * x.element_size()
            blocks.train()
            for needs_grad in (True, False):
                case = ("on an input that requires grad" if needs_grad else
                        "on an input that does not require grad (frozen embeddings, as in LoRA)")
                ref_out = _plain(blocks, x.clone().requires_grad_(needs_grad))
                ref_out.pow(2).mean().backward()
                ref_grads = {n: p.grad.clone() for n, p in blocks.named_parameters()}
                blocks.zero_grad(set_to_none=True)
                calls.clear()

                x_in = x.clone().requires_grad_(needs_grad)
                out, meter, forward, caught = _run_checkpointed(student_fn, blocks, x_in, what,
                                                                calls)
                _expect_output(out, ref_out, what, case, blocks, x_in)
                reentrant = any("None of the inputs have requires_grad" in w for w in caught)
                default = any("use_reentrant parameter should be passed" in w for w in caught)
                if not out.requires_grad:
                    if reentrant:
                        fail(
                            f"the output of {what} {case} does not require grad, so backward "
                            "would give the blocks no gradients (torch warned: \"None of the "
                            "inputs have requires_grad=True. Gradients will be None\").",
                            ("checkpoint(block, x) without use_reentrant uses the reentrant "
                             "version (its default is use_reentrant=True), which "
                             if default else "use_reentrant=True ")
                            + "needs an input that requires grad; pass use_reentrant=False so "
                            "the parameters inside the block get their gradients",
                        )
                    fail(f"the output of {what} {case} does not require grad.",
                         "did you run the blocks under torch.no_grad() or detach the output? "
                         "checkpoint() itself takes care of not saving the activations")
                out.pow(2).mean().backward()
                backward = list(calls)
                for name, p in blocks.named_parameters():
                    if p.grad is None:
                        fail(f"after backward through {what} {case}, {name} has no gradient.",
                             "the graph is cut between the blocks (a .detach() or a block run "
                             "under torch.no_grad()?): pass each block's output on as it is")
                    if not torch.allclose(p.grad, ref_grads[name], atol=1e-6, rtol=1e-4):
                        fail(f"after backward through {what} {case}, the gradient of {name} "
                             "differs from the plain forward's.",
                             "recomputation must reproduce the same activations: checkpoint "
                             "the block itself, with the same input it got in the forward")
                blocks.zero_grad(set_to_none=True)
                expect(forward == list(range(n_blocks)),
                       f"{what} ran the blocks {forward} in the forward pass, expected "
                       f"{list(range(n_blocks))}.",
                       hint="run each block once, in order")

                saved = f"{what} saved {meter.nbytes:,} bytes for backward"
                if not backward:
                    fail(f"{saved} and recomputed no block in backward: nothing was "
                         "checkpointed.",
                         "wrap each block call in torch.utils.checkpoint.checkpoint(block, x, "
                         "use_reentrant=False)")
                if backward == list(range(n_blocks)) and n_blocks > 1:
                    fail(f"{saved} (one block input) and recomputed all {n_blocks} blocks "
                         "together in backward: the whole stack is one checkpointed segment, so "
                         "backward holds every block's activations at once again.",
                         "checkpoint each block separately, inside the loop: "
                         "x = checkpoint(block, x, use_reentrant=False)")
                missing = sorted(set(range(n_blocks)) - set(backward))
                if missing:
                    fail(f"{saved}; backward recomputed only blocks {sorted(set(backward))}: "
                         f"blocks {missing} were not checkpointed and kept all their "
                         "activations.", "checkpoint every block, not only some of them")
                expect(backward == list(reversed(range(n_blocks))),
                       f"backward recomputed the blocks {backward}, expected each once, last "
                       f"first {list(reversed(range(n_blocks)))}.",
                       hint="checkpoint each block once, separately (no nested checkpoints)")
                expect(meter.nbytes <= n_blocks * block_input,
                       f"{saved}; checkpointing every block keeps only the {n_blocks} block "
                       f"inputs ({n_blocks * block_input:,} bytes).",
                       hint="checkpoint whole blocks and keep nothing else for backward")
        finally:
            for block in blocks:
                del block.forward


# ---------------------------------------------------------------------------------------------
# 3. Gradient accumulation (pitfall 5)
# ---------------------------------------------------------------------------------------------


def _per_token(logits, targets):
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)


def _reference_loss(logits, targets, mask, total_tokens):
    return (_per_token(logits, targets) * mask.to(logits.dtype)).sum() / total_tokens


def _explain_loss(exc: BaseException) -> str | None:
    text = str(exc)
    if "Expected target size" in text or "Expected input batch_size" in text:
        return ("F.cross_entropy takes logits of shape (N, V) and targets of shape (N,): "
                "flatten them with logits.reshape(-1, logits.size(-1)) and targets.reshape(-1) "
                "(or move the vocabulary to dim 1 with logits.transpose(1, 2))")
    if "must match the size" in text or "shape" in text:
        return ("reduction='none' gives one loss per position, flattened to (B*T,): reshape "
                "it to the mask's shape (B, T) with .view_as(targets) before multiplying")
    return None


def _loss_signatures(logits, targets, mask, total, V):
    per = _per_token(logits, targets)
    m = mask.to(per.dtype)
    masked = (per * m).sum()
    micro = int(mask.sum())
    return [
        (masked / micro,
         "that is the mean over this micro-batch's own tokens. Pitfall 5: divide by "
         "total_tokens (all micro-batches together), so every token weighs the same"),
        (per.sum() / total,
         "every position was counted, padding too: multiply the per-token losses by the mask "
         "before summing"),
        (masked,
         "that is the masked sum, not divided by total_tokens: the accumulated gradient would "
         "be total_tokens times too large"),
        (F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)),
         "that is F.cross_entropy's default reduction='mean' over every position (padding "
         "included, not divided by total_tokens): use reduction='none', mask, sum, divide"),
        (masked / mask.numel(),
         "that divides by the number of positions in the micro-batch (mask.numel(), padding "
         "included): divide by total_tokens"),
        (torch.floor(masked / total),
         "that is floor division (//): it rounds the loss down and has no gradient; divide "
         "with /"),
        (masked / micro / total,
         "that divides twice (by this micro-batch's tokens and by total_tokens): divide the "
         "masked sum by total_tokens only"),
        (((per * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / total,
         "that averages each sequence over its own tokens first: sum the token losses of "
         "the micro-batch, then divide by total_tokens once"),
    ]


@check("nb05_grad_accum", forbid=(
    "course_lib.model.tinygpt.lm_loss",
    "course_lib.train.accumulate_gradients",
))
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

        # value on one micro-batch (9 of 28 tokens, 18 positions)
        logits = head(feats[:3])
        got = call_student(student_fn, logits, targets[:3], mask[:3], total, what=what,
                           explain=_explain_loss)
        expect(got is not None, f"{what} returned None.", hint="return the loss tensor")
        expect(
            isinstance(got, torch.Tensor) and got.dim() == 0,
            f"{what} should return a scalar tensor (0-d), got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.",
            hint="sum the masked per-token losses to one number (a 0-d tensor) before dividing"
            if isinstance(got, torch.Tensor) else
            "return the loss tensor itself (not .item() or a Python number): backward needs it",
        )
        want = _reference_loss(logits, targets[:3], mask[:3], total)
        micro_tokens = int(mask[:3].sum())
        if not torch.allclose(got, want, atol=1e-6, rtol=1e-5):
            message = (f"{what} on a micro-batch with {micro_tokens} of total_tokens={total} "
                       f"tokens (18 positions) returned {got.item():.6f}, expected "
                       f"{want.item():.6f}.")
            for value, diagnosis in _loss_signatures(logits, targets[:3], mask[:3], total, V):
                if torch.allclose(got, value, atol=1e-6, rtol=1e-5):
                    fail(message, diagnosis)
            fail(message, "the value matches no mistake the check knows: the loss is the "
                 "cross-entropy of every counted (mask) position, summed over the micro-batch, "
                 "divided by total_tokens")
        expect(got.requires_grad, f"{what} returned a loss that does not require grad.",
               hint="keep it a tensor of the graph: no .item(), .detach() or torch.tensor(...)")

        # accumulated gradients equal the large batch's gradient
        head.zero_grad(set_to_none=True)
        _reference_loss(head(feats), targets, mask, total).backward()
        want_grad = head.weight.grad.clone()
        head.zero_grad(set_to_none=True)
        for sl in (slice(0, 2), slice(2, 5), slice(5, 8)):
            loss = call_student(student_fn, head(feats[sl]), targets[sl], mask[sl], total,
                                what=what, explain=_explain_loss)
            loss.backward()
        expect(
            torch.allclose(head.weight.grad, want_grad, atol=1e-6, rtol=1e-4),
            f"the gradients accumulated from three micro-batches with {what} differ from the "
            "gradient of the whole batch's loss.",
            hint="the loss of each micro-batch must depend only on its own logits, targets and "
                 "mask, and on total_tokens",
        )


# ---------------------------------------------------------------------------------------------
# 4. 8-bit optimiser state
# ---------------------------------------------------------------------------------------------

# (numel, min_8bit_size, blocksize): defaults, borders and varied optional arguments
_ADAM_CASES = [
    (16, None, None), (4095, None, None), (4096, None, None), (4097, None, None),
    (16384, None, None), (128 * 37, None, None), (4096 * 11008, None, None),
    (3000, 2048, None), (5000, 8192, None), (2048, 2048, None),
    (4097, None, 128), (1000, 512, 64), (70000, 65536, 1024),
]


def _adam_bytes(n: int, m: int, bs: int, *, le: bool = False, ceil: bool = True,
                states: int = 2, absmax: int = 4, small: int = 8) -> int:
    if (n <= m) if le else (n < m):
        return small * n
    blocks = -(-n // bs) if ceil else n // bs
    return states * n + states * absmax * blocks


def _adam_signatures(n: int, m: int, bs: int) -> list[tuple[int, str]]:
    return [
        (_adam_bytes(n, ADAMW8BIT_MIN_SIZE, bs),
         f"that uses the threshold {ADAMW8BIT_MIN_SIZE} instead of the argument "
         f"min_8bit_size={m}: use min_8bit_size, not the default's value"),
        (_adam_bytes(n, m, ADAMW8BIT_BLOCKSIZE),
         f"that uses blocks of {ADAMW8BIT_BLOCKSIZE} instead of the argument blocksize={bs}: "
         "use blocksize, not the default's value"),
        (_adam_bytes(n, ADAMW8BIT_MIN_SIZE, ADAMW8BIT_BLOCKSIZE),
         f"that is the answer for the default arguments (4096, 256), not for "
         f"min_8bit_size={m}, blocksize={bs}: use the arguments"),
        (_adam_bytes(n, m, bs, le=True),
         f"a tensor of exactly min_8bit_size={m} elements already gets 8-bit state in "
         "bitsandbytes (only numel < min_8bit_size stays 32-bit): compare with <, not <="),
        (_adam_bytes(n, 0, bs),
         f"tensors with fewer than min_8bit_size={m} elements keep 32-bit state (two fp32 "
         "moments, 8 bytes per element) in bitsandbytes"),
        (_adam_bytes(n, m, bs, absmax=0),
         f"add the absmax constants: one fp32 (4 bytes) per block of blocksize={bs} elements, "
         "for each of the two states"),
        (_adam_bytes(n, m, bs, ceil=False),
         "a partial last block still needs its absmax: round the block count up "
         "(-(-numel // blocksize))"),
        (_adam_bytes(n, m, bs, states=1),
         "AdamW has two states (m and v), each 1 byte per element plus its own absmax per block"),
        (_adam_bytes(n, m, bs, small=4),
         "a small tensor keeps two fp32 states (m and v): 8 bytes per element, not 4"),
        (_adam_bytes(n, m, bs) + (_QMAPS if n >= m else 0),
         "the two 256-entry quantisation maps (2 * 256 * 4 bytes) are shared by all tensors: "
         "leave them out of one tensor's state"),
        (2 * n + 4 * -(-n // bs) if n >= m else 8 * n,
         "each of the two states has its own absmax per block: 2 * 4 bytes per block, not 4"),
        (_adam_bytes(n, m, bs) + (4 if n < m else 0),
         "bitsandbytes keeps the step count as a Python int, not a 4-byte tensor: 8 bytes per "
         "element for a small tensor, nothing more"),
    ]


def _explain_adam(exc: BaseException) -> str | None:
    if isinstance(exc, TypeError) and "argument" in str(exc):
        return ("keep the signature adamw8bit_state_bytes(numel, min_8bit_size=4096, "
                "blocksize=256): the check passes other thresholds and block sizes")
    return None


@check("nb05_adam8bit", forbid=("course_lib.utils.memory.adamw_state_bytes",
                                "course_lib.utils.memory.estimate_memory"))
def check_adamw8bit_bytes(student_fn: Callable[..., Any]) -> None:
    """``student_fn(numel, min_8bit_size=4096, blocksize=256)``: bytes of bitsandbytes'
    AdamW8bit state for one tensor (without the shared quantisation maps), for the default and
    for other thresholds and block sizes."""
    for n, m, bs in _ADAM_CASES:
        kwargs = {}
        if m is not None:
            kwargs["min_8bit_size"] = m
        if bs is not None:
            kwargs["blocksize"] = bs
        args = ", ".join([f"{n:_}", *(f"{k}={v}" for k, v in kwargs.items())])
        what = f"adamw8bit_state_bytes({args})"
        m = ADAMW8BIT_MIN_SIZE if m is None else m
        bs = ADAMW8BIT_BLOCKSIZE if bs is None else bs
        got = call_student(student_fn, n, what=what, explain=_explain_adam, **kwargs)
        expect(got is not None, f"{what} returned None.",
               hint="return the number of bytes (did you forget the `return`?)")
        want = adamw_state_bytes([n], "adamw8bit", min_8bit_size=m, blocksize=bs) - (
            _QMAPS if n >= m else 0
        )
        if isinstance(got, float) and not isinstance(got, bool):
            exact = 2 * n + 8 * n / bs
            fail(f"{what} returned the float {got!r}, expected the int {want:,}.",
                 "numel / blocksize is a float and a partial block is not rounded up: count "
                 "whole blocks with -(-numel // blocksize) (or math.ceil)"
                 if n >= m and abs(got - exact) < 1e-6 else
                 "return an int: use // (or math.ceil) for the block count, not /")
        expect(_is_int(got), f"{what} returned a {type(got).__name__}, expected the int {want:,}.",
               hint="return the number of bytes as a Python int")
        if got == want:
            continue
        message = f"{what} returned {got:,}, expected {want:,}."
        for value, diagnosis in _adam_signatures(n, m, bs):
            if value == got:
                fail(message, diagnosis)
        fail(message, "the value matches no mistake the check knows: compare numel with "
             "min_8bit_size, then count the 8-bit states and the absmax of each state's blocks "
             "of blocksize elements")
