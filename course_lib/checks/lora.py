"""Checks for notebook 01_lora: the student's parameter count, LoRALayer and LinearWithLoRA.

Each check runs the student's code on small seeded inputs, compares it with
``course_lib.model.lora`` (the reference implementation) and, on a mismatch, names the most
likely mistake (wrong shape, B not zero, scaling missing, base not frozen, ...). The global
random state is restored afterwards, so a check never changes what later cells draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from course_lib.checks import call_student, check, expect, fail
from course_lib.checks.core import OWN_WORK_PREFIX
from course_lib.checks.variants import alternative, block, mistake
from course_lib.model import lora as ref

__all__ = [
    "check_lora_trainable_params",
    "check_lora_layer_init",
    "check_lora_layer_forward",
    "check_linear_with_lora",
    "VARIANTS",
]

_COUNT_REF = ("course_lib.model.lora.lora_parameter_count",)
_LAYER_REF = ("course_lib.model.lora.LoRALayer", "course_lib.model.lora.LinearWithLoRA")

# A 7B model (LLaMA-7B): 32 blocks, d_model 4096, MLP width 11008.
_QV_7B = [(4096, 4096), (4096, 4096)] * 32
_ALL_7B = ([(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]) * 32


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return a.shape == b.shape and bool(
        torch.allclose(a.double(), b.double(), atol=tol * (1 + b.abs().max().item()), rtol=tol)
    )


# ---------------------------------------------------------------------------------------------
# 1. Parameter count
# ---------------------------------------------------------------------------------------------


@check("nb01_param_count", forbid=_COUNT_REF)
def check_lora_trainable_params(student_fn: Callable[..., Any]) -> None:
    """``student_fn(layer_shapes, r)``: ``sum(r * (d + k))`` over the ``(d, k)`` shapes."""
    what = "lora_trainable_params(layer_shapes, r)"
    cases = [
        ([(4096, 4096)], 8),
        ([(4096, 11008)], 16),
        ([(64, 32), (32, 64), (10, 10)], 4),
        (_QV_7B, 8),
        (_ALL_7B, 16),
        ([], 8),
    ]
    for shapes, r in cases:
        got = call_student(student_fn, list(shapes), r, what=what)
        want = sum(ref.lora_parameter_count(d, k, r) for d, k in shapes)
        label = f"{what} with {len(shapes)} layer(s) and r={r}"
        expect(got is not None, f"{label} returned None: did you forget the `return`?")
        expect(
            isinstance(got, (int, float)) and not isinstance(got, bool),
            f"{label} returned a {type(got).__name__}; return a number (an int).",
        )
        if got == want:
            continue
        full = sum(d * k for d, k in shapes)
        first = ref.lora_parameter_count(*shapes[0], r) if shapes else None
        only_a, only_b = sum(r * k for d, k in shapes), sum(r * d for d, k in shapes)
        hints = [
            (full, "that is the full weights' size d*k: LoRA trains only A (r x k) and B (d x r)"),
            (r * full, "r*d*k is not a LoRA count: A has r*k entries and B has d*r"),
            (only_a, "you counted only A (r x k); add B (d x r)" if only_a != only_b else
             "you counted only one of A (r x k) and B (d x r); LoRA trains both"),
            (only_b, "you counted only B (d x r); add A (r x k)"),
            (sum(d + k for d, k in shapes),
             "the rank r is missing: A has r rows and B has r columns"),
            (first, "you counted only the first layer: add up r*(d+k) over all (d, k) shapes"),
            (sum(8 * (d + k) for d, k in shapes),
             f"that is the count for r=8: the rank is hard-coded, use the argument r (here {r})"),
        ]
        for value, hint in hints:
            if value is not None and value != want and got == value:
                raise AssertionError(f"{label} returned {got:,}, expected {want:,}: {hint}.")
        raise AssertionError(
            f"{label} returned {got!r}, expected {want:,} = sum of r*(d+k) over the shapes."
        )


# ---------------------------------------------------------------------------------------------
# 2. LoRALayer
# ---------------------------------------------------------------------------------------------


def _build_lora(cls: type, in_f: int, out_f: int, r: int, alpha: float, dropout: float = 0.0):
    layer = call_student(
        cls, in_f, out_f, r=r, lora_alpha=alpha, lora_dropout=dropout,
        what="LoRALayer.__init__",
    )
    expect(
        isinstance(layer, nn.Module),
        f"LoRALayer(...) gave a {type(layer).__name__}; the class must subclass nn.Module.",
    )
    return layer


def _factors(layer: nn.Module, in_f: int, out_f: int, r: int, owner: str = "LoRALayer"):
    """``(A, B)`` after checking they exist, are Parameters and have the right shapes."""
    found = []
    for name, shape, role in [
        ("lora_A", (r, in_f), "(r, in_features)"),
        ("lora_B", (out_f, r), "(out_features, r)"),
    ]:
        p = getattr(layer, name, None)
        expect(
            p is not None,
            f"{owner} has no attribute self.{name}: create it in __init__ (Step 2) as an "
            f"nn.Parameter of shape {role}.",
        )
        expect(
            isinstance(p, nn.Parameter),
            f"self.{name} is a {type(p).__name__}, not an nn.Parameter: wrap it, "
            f"nn.Parameter(...), so that it is trained and shows up in .parameters().",
        )
        if tuple(p.shape) == shape[::-1] and shape[0] != shape[1]:
            raise AssertionError(
                f"self.{name} has shape {tuple(p.shape)}, the transpose of the expected {role} = "
                f"{shape}: swap the two dimensions."
            )
        expect(
            tuple(p.shape) == shape,
            f"self.{name} has shape {tuple(p.shape)}, expected {role} = {shape} "
            f"for in_features={in_f}, out_features={out_f}, r={r}.",
        )
        expect(p.requires_grad, f"self.{name} has requires_grad=False: LoRA must train it.")
        found.append(p)
    return found[0], found[1]


def _scaling_of(layer: nn.Module, r: int, alpha: float) -> float:
    scaling = getattr(layer, "scaling", None)
    expect(
        scaling is not None,
        "self.scaling is missing: store scaling = lora_alpha / r in __init__ (Step 1).",
    )
    try:
        value = float(scaling)
    except (TypeError, ValueError):
        raise AssertionError(f"self.scaling should be a number, got {scaling!r}.") from None
    want = alpha / r
    if not math.isclose(value, want, rel_tol=1e-6):
        if math.isclose(value, alpha, rel_tol=1e-6):
            hint = "you stored lora_alpha itself; divide it by r"
        elif math.isclose(value, r / alpha, rel_tol=1e-6):
            hint = "it is upside down: lora_alpha / r, not r / lora_alpha"
        elif math.isclose(value, alpha / math.sqrt(r), rel_tol=1e-6):
            hint = "that is rsLoRA's lora_alpha / sqrt(r); this layer uses lora_alpha / r"
        elif math.isclose(value, 1.0):
            hint = "scaling = 1 ignores lora_alpha and r"
        else:
            hint = "use lora_alpha / r"
        raise AssertionError(
            f"self.scaling = {value:g} for r={r}, lora_alpha={alpha}, expected "
            f"lora_alpha / r = {want:g}: {hint}."
        )
    return value


@check("nb01_lora_init", forbid=_LAYER_REF)
def check_lora_layer_init(cls: type) -> None:
    """``LoRALayer.__init__``: lora_A (r, in) random, lora_B (out, r) zero, scaling alpha / r."""
    with torch.random.fork_rng(devices=[]):
        for in_f, out_f, r, alpha in [(12, 10, 4, 8), (7, 20, 2, 16), (16, 16, 8, 8)]:
            torch.manual_seed(0)
            layer = _build_lora(cls, in_f, out_f, r, alpha)
            A, B = _factors(layer, in_f, out_f, r)
            expect(
                torch.count_nonzero(B.detach()).item() == 0,
                f"lora_B is not zero ({torch.count_nonzero(B.detach()).item()} non-zero entries): "
                f"B must start at zero (torch.zeros) so that B·A = 0 and the wrapped layer starts "
                f"exactly like the pretrained one.",
            )
            A_ = A.detach()
            expect(
                bool(torch.isfinite(A_).all()),
                "lora_A contains inf or nan: initialise it with finite random values.",
            )
            expect(
                torch.count_nonzero(A_).item() > 0,
                "lora_A is all zero: A must be random (e.g. torch.randn or "
                "nn.init.kaiming_uniform_). With A = 0 and B = 0 both gradients stay zero and "
                "LoRA never learns.",
            )
            expect(
                torch.unique(A_).numel() > 1,
                "lora_A has the same value everywhere: initialise it with random numbers.",
            )
            _scaling_of(layer, r, alpha)
            expect(
                getattr(layer, "r", None) == r,
                f"self.r should hold the rank ({r}), got {getattr(layer, 'r', None)!r}.",
            )


def _set_factors(A: torch.Tensor, B: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        A.copy_(torch.randn(A.shape, generator=gen) / math.sqrt(A.shape[1]))
        B.copy_(torch.randn(B.shape, generator=gen))


def _reference_update(A, B, r: int, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """The library's LoRALayer with the student's factors (dropout off)."""
    layer = ref.LoRALayer(A.shape[1], B.shape[0], r=r, lora_alpha=alpha).eval()
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        return layer(x)


def _diagnose_update(got, want, scaling: float, alpha: float, what: str) -> None:
    if _close(got, want):
        return
    s = scaling
    candidates = [
        (want / s, "the scaling is missing: multiply the low-rank branch by self.scaling"),
        (want * s, "the scaling is applied twice: multiply by self.scaling once"),
        (want / s * alpha,
         "you multiplied by lora_alpha; multiply by self.scaling = lora_alpha / r"),
        (torch.zeros_like(want),
         "the update is zero: use self.lora_B (and self.lora_A) in forward"),
    ]
    for value, hint in candidates:
        if _close(got, value):
            raise AssertionError(f"{what}: {hint}.")
    diff = (got.double() - want.double()).abs().max().item()
    raise AssertionError(
        f"{what} differs from scaling · (x @ A.T) @ B.T by up to {diff:.3g}. Compute "
        f"x @ self.lora_A.T (shape (..., r)), then @ self.lora_B.T (shape (..., out_features)), "
        f"then multiply by self.scaling."
    )


def _explain_forward(exc: BaseException) -> str | None:
    text = str(exc)
    if "shapes cannot be multiplied" in text or "size of tensor" in text or "match" in text:
        return ("a shape clash: x is (..., in_features) and self.lora_A is (r, in_features), so "
                "x @ self.lora_A needs a transpose: x @ self.lora_A.T is (..., r), then "
                "@ self.lora_B.T gives (..., out_features).")
    if isinstance(exc, AttributeError):
        return "forward uses the attributes __init__ creates: self.lora_A, self.lora_B, " \
               "self.scaling and self.lora_dropout."
    return None


def _forward(layer: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    out = call_student(layer, x, what=what, explain=_explain_forward)
    expect(
        isinstance(out, torch.Tensor),
        f"{what} returned {type(out).__name__}; return the update tensor.",
    )
    return out


# Forward cases: (in_features, out_features, r, lora_alpha, input shape without the last dim)
_FORWARD_CASES = [(12, 10, 4, 8, (3, 5)), (7, 20, 2, 16, (6,)), (16, 16, 8, 4, (2, 3, 2))]
_DROP_ROWS = 4000  # rows of ones in the dropout probes: rates to about +-0.01


def _dropout_rate_probe(cls: type, p: float) -> tuple[float, float]:
    """``(fraction of zeros, mean kept value)`` of the update with A = B = I and scaling 1."""
    n = 16
    layer = _build_lora(cls, n, n, n, n, dropout=p)
    A, B = _factors(layer, n, n, n)
    with torch.no_grad():
        A.copy_(torch.eye(n))
        B.copy_(torch.eye(n))
    layer.train()
    with torch.no_grad():
        out = _forward(layer, torch.ones(_DROP_ROWS, n),
                       f"LoRALayer.forward in training mode (lora_dropout={p})")
    zero = (out == 0).double().mean().item()
    kept = out[out != 0]
    return zero, (kept.double().mean().item() if kept.numel() else float("nan"))


def _dropout_site(cls: type, p: float) -> str | None:
    """Where the dropout acts: None (on x, right), or a diagnosis of the wrong tensor.

    With r = 1, A = ones (1, 16) and B = ones (8, 1) on rows of ones: dropout on x gives rows of
    equal entries with many levels (how many of the 16 inputs were kept); on A x only the levels
    0 and 16/(1-p); on the output, entries that differ within a row; on the weights, one mask for
    the whole batch (all rows equal).
    """
    in_f, out_f = 16, 8
    layer = _build_lora(cls, in_f, out_f, 1, 1, dropout=p)
    A, B = _factors(layer, in_f, out_f, 1)
    with torch.no_grad():
        A.fill_(1.0)
        B.fill_(1.0)
    layer.train()
    with torch.no_grad():
        out = _forward(layer, torch.ones(_DROP_ROWS, in_f),
                       f"LoRALayer.forward in training mode (lora_dropout={p})")
    out = out.double()
    if not bool((out == out[:, :1]).all()):
        return ("the dropout acts on the output (after B): entries of one output row are "
                "dropped separately. Apply self.lora_dropout to the input x, before lora_A")
    if bool((out == out[:1]).all()):
        return ("every row of the batch got the same dropout mask: you dropped entries of the "
                "weights (lora_A or lora_B), not of the input. Apply self.lora_dropout to x")
    if torch.unique(out[:, 0]).numel() <= 2:
        return ("the dropout acts on x @ lora_A.T (the r-dimensional hidden vector), not on "
                "x: apply self.lora_dropout to the input x, before lora_A")
    return None


@check("nb01_lora_forward", forbid=_LAYER_REF)
def check_lora_layer_forward(cls: type) -> None:
    """``LoRALayer.forward``: returns ``scaling * (dropout(x) @ A.T) @ B.T`` with gradients."""
    with torch.random.fork_rng(devices=[]):
        for seed, (in_f, out_f, r, alpha, lead) in enumerate(_FORWARD_CASES):
            torch.manual_seed(seed)
            case = f"LoRALayer({in_f}, {out_f}, r={r}, lora_alpha={alpha})"
            layer = _build_lora(cls, in_f, out_f, r, alpha)
            A, B = _factors(layer, in_f, out_f, r)
            scaling = _scaling_of(layer, r, alpha)
            layer.eval()
            x = torch.randn(*lead, in_f)
            what = f"{case}.forward(x) on x of shape {tuple(x.shape)}"
            out = _forward(layer, x, "LoRALayer.forward")
            expect(
                tuple(out.shape) == (*lead, out_f),
                f"{what} returned shape {tuple(out.shape)}, expected {(*lead, out_f)} = "
                f"(..., out_features): x @ A.T is (..., r), then @ B.T.",
            )
            expect(
                torch.count_nonzero(out.detach()).item() == 0,
                "with B = 0 (as initialised) the update must be exactly zero; forward should "
                "return only the LoRA branch scaling · B A x, not add x or anything else.",
            )
            _set_factors(A, B, seed=1 + seed)
            got = _forward(layer, x, "LoRALayer.forward")
            want = _reference_update(A.detach(), B.detach(), r, alpha, x)
            _diagnose_update(got.detach(), want, scaling, alpha, what)
            got.pow(2).sum().backward()
            for name, p in (("lora_A", A), ("lora_B", B)):
                expect(
                    p.grad is not None and torch.count_nonzero(p.grad).item() > 0,
                    f"no gradient reached self.{name}: use the parameter itself in forward (no "
                    f".data, .detach() or torch.no_grad()).",
                )
        # dropout: off in eval mode ...
        in_f, out_f, r, alpha = 12, 10, 4, 8
        x = torch.randn(3, 5, in_f)
        drop = _build_lora(cls, in_f, out_f, r, alpha, dropout=0.5)
        dA, dB = _factors(drop, in_f, out_f, r)
        _set_factors(dA, dB, seed=7)
        want = _reference_update(dA.detach(), dB.detach(), r, alpha, x)
        drop.eval()
        _diagnose_update(_forward(drop, x, "LoRALayer.forward in eval mode").detach(), want,
                         alpha / r, alpha, "LoRALayer.forward in eval mode (dropout must be off)")
        # ... on in training mode, on the input x, at the rate lora_dropout
        probes = {p: _dropout_rate_probe(cls, p) for p in (0.25, 0.6)}
        if min(zero for zero, _ in probes.values()) < 0.01:
            fail("in training mode (lora_dropout=0.25 and 0.6) the update is never dropped: the "
                 "dropout is missing.",
                 "create self.lora_dropout = nn.Dropout(lora_dropout) in __init__ (Step 3) and "
                 "apply it to x in forward: self.lora_dropout(x) @ self.lora_A.T.")
        site = _dropout_site(cls, 0.5)
        if site is not None:
            fail(f"with lora_dropout=0.5 in training mode {site}.",
                 "forward: h = self.lora_dropout(x) @ self.lora_A.T, then "
                 "(h @ self.lora_B.T) * self.scaling.")
        for p, (zero, kept) in probes.items():
            label = f"with lora_dropout={p} in training mode"
            if abs(zero - p) > 0.03:
                if abs(zero - (1 - p)) <= 0.03:
                    diagnosis = (f"you used the keep probability 1 - lora_dropout = {1 - p:g}: "
                                 f"nn.Dropout(p) zeroes each entry with probability p, so pass "
                                 f"lora_dropout itself")
                elif abs(zero - 0.5) <= 0.03:
                    diagnosis = ("that is nn.Dropout's default p = 0.5: the rate is hard-coded; "
                                 "pass lora_dropout, nn.Dropout(lora_dropout)")
                else:
                    diagnosis = "use nn.Dropout(lora_dropout) with the rate you were given"
                fail(f"{label} about {zero:.0%} of the entries were dropped, expected "
                     f"{p:.0%}: {diagnosis}.",
                     "self.lora_dropout = nn.Dropout(lora_dropout) in __init__ (Step 3).")
            if not math.isclose(kept, 1 / (1 - p), rel_tol=0.01):
                fail(f"{label} the kept entries are scaled by {kept:.3g}, expected 1 / (1 - p) = "
                     f"{1 / (1 - p):.3g}: a hand-made mask must also rescale what it keeps.",
                     "use nn.Dropout(lora_dropout): it zeroes with probability p and divides the "
                     "rest by 1 - p.")


# ---------------------------------------------------------------------------------------------
# 3. LinearWithLoRA
# ---------------------------------------------------------------------------------------------


def _explain_linear(exc: BaseException) -> str | None:
    text = str(exc)
    if "shapes cannot be multiplied" in text or "size of tensor" in text:
        return ("a shape clash: the LoRA branch must map in_features -> out_features like the "
                "base, so create LoRALayer(base_layer.in_features, base_layer.out_features, r, "
                "lora_alpha, lora_dropout) in that order.")
    if isinstance(exc, TypeError) and "argument" in text:
        return ("LinearWithLoRA(base_layer, r=8, lora_alpha=16, lora_dropout=0.0) passes r, "
                "lora_alpha and lora_dropout on to your LoRALayer.")
    return None


# (in_features, out_features, r, lora_alpha, lora_dropout, bias of the base)
_LINEAR_CASES = [(12, 10, 4, 8, 0.0, True), (7, 20, 2, 16, 0.3, False)]


@check("nb01_linear_with_lora", forbid=_LAYER_REF)
def check_linear_with_lora(cls: type) -> None:
    """``LinearWithLoRA``: frozen ``base_layer`` + ``lora``; forward = base(x) + lora(x)."""
    with torch.random.fork_rng(devices=[]):
        for seed, case in enumerate(_LINEAR_CASES):
            torch.manual_seed(seed)
            _check_linear_case(cls, *case, seed=seed)


def _check_linear_case(cls, in_f, out_f, r, alpha, dropout, bias, *, seed):
    base = nn.Linear(in_f, out_f, bias=bias)
    originals = [p.detach().clone() for p in base.parameters()]
    call = (f"LinearWithLoRA(nn.Linear({in_f}, {out_f}, bias={bias}), r={r}, lora_alpha={alpha}, "
            f"lora_dropout={dropout})")
    layer = call_student(cls, base, r=r, lora_alpha=alpha, lora_dropout=dropout,
                         what="LinearWithLoRA.__init__", explain=_explain_linear)
    expect(
        isinstance(layer, nn.Module),
        f"LinearWithLoRA(...) gave a {type(layer).__name__}; subclass nn.Module.",
    )
    expect(
        getattr(layer, "base_layer", None) is base,
        "self.base_layer must be the nn.Linear you were given (store it: "
        "self.base_layer = base_layer).",
    )
    lora = getattr(layer, "lora", None)
    expect(
        isinstance(lora, nn.Module),
        "self.lora is missing: create LoRALayer(base_layer.in_features, "
        "base_layer.out_features, r, lora_alpha, lora_dropout) in __init__.",
    )
    A = getattr(lora, "lora_A", None)
    if isinstance(A, torch.Tensor) and tuple(A.shape) == (r, out_f) and in_f != out_f:
        fail(f"{call}: self.lora.lora_A has shape {tuple(A.shape)}: in_features and "
             f"out_features are swapped. The base maps {in_f} -> {out_f}.",
             "use LoRALayer(base_layer.in_features, base_layer.out_features, ...).")
    if isinstance(A, torch.Tensor) and A.dim() == 2 and A.shape[0] != r and A.shape[0] == 8:
        fail(f"{call}: self.lora.lora_A has {A.shape[0]} rows, expected r = {r}: the rank was "
             f"not passed on, so LoRALayer used its default r=8.",
             "pass r on: LoRALayer(base_layer.in_features, base_layer.out_features, r, "
             "lora_alpha, lora_dropout).")
    A, B = _factors(lora, in_f, out_f, r, owner="self.lora")
    got_alpha = getattr(lora, "lora_alpha", alpha)
    if got_alpha != alpha:
        fail(f"{call}: self.lora.lora_alpha is {got_alpha!r}, expected {alpha}: lora_alpha was "
             f"not passed on to LoRALayer.",
             "pass lora_alpha on: LoRALayer(..., r, lora_alpha, lora_dropout).")
    scaling = _scaling_of(lora, r, alpha)
    drop = getattr(lora, "lora_dropout", None)
    if isinstance(drop, nn.Dropout) and not math.isclose(drop.p, dropout):
        fail(f"{call}: self.lora.lora_dropout has p = {drop.p:g}, expected {dropout:g}: "
             f"lora_dropout was not passed on to LoRALayer.",
             "pass lora_dropout on: LoRALayer(..., r, lora_alpha, lora_dropout).")
    frozen = [n for n, p in base.named_parameters() if p.requires_grad]
    expect(
        not frozen,
        f"the base is not frozen: base_layer.{frozen[0] if frozen else ''} still has "
        f"requires_grad=True. In __init__, freeze the pretrained layer: "
        f"for p in self.base_layer.parameters(): p.requires_grad = False.",
    )
    layer.eval()
    x = torch.randn(4, 3, in_f)
    with torch.no_grad():
        base_out = base(x)
    what = "LinearWithLoRA.forward"
    out = call_student(layer, x, what=what, explain=_explain_linear)
    expect(
        isinstance(out, torch.Tensor) and tuple(out.shape) == (4, 3, out_f),
        f"LinearWithLoRA.forward on x of shape (4, 3, {in_f}) should return shape "
        f"(4, 3, {out_f}), got "
        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.",
    )
    if not _close(out.detach(), base_out):
        if _close(out.detach(), torch.zeros_like(base_out)):
            fail("LinearWithLoRA.forward returned only the LoRA update (zero at init): the frozen "
                 "layer's output is missing.", "return self.base_layer(x) + self.lora(x).")
        fail("right after wrapping (B = 0) LinearWithLoRA must compute exactly what the base "
             "layer computes.", "return self.base_layer(x) + self.lora(x).")
    _set_factors(A, B, seed=3 + seed)
    update = _reference_update(A.detach(), B.detach(), r, alpha, x)
    got = call_student(layer, x, what=what, explain=_explain_linear)
    g = got.detach()
    if _close(g, base_out):
        fail("LinearWithLoRA.forward ignores the LoRA branch.",
             "return self.base_layer(x) + self.lora(x).")
    if _close(g, update):
        fail("LinearWithLoRA.forward returns only the LoRA update: the base output is missing.",
             "add self.base_layer(x).")
    if _close(g, base_out + update * scaling):
        fail("the scaling is applied twice: self.lora(x) is already scaled.",
             "forward is just self.base_layer(x) + self.lora(x).")
    if _close(g, base_out + update / scaling):
        fail("the LoRA branch is not scaled: LoRALayer.forward must multiply by self.scaling "
             "(run its check again).")
    _diagnose_update(g - base_out, update, scaling, alpha,
                     "LinearWithLoRA.forward(x) - base_layer(x)")
    got.pow(2).sum().backward()
    expect(
        all(p.grad is None for p in base.parameters()),
        "a gradient reached base_layer's weight or bias: the base must stay frozen "
        "(requires_grad=False on all its parameters).",
    )
    for name, p in (("lora_A", A), ("lora_B", B)):
        expect(
            p.grad is not None and torch.count_nonzero(p.grad).item() > 0,
            f"no gradient reached self.lora.{name}: keep the LoRA parameters trainable "
            f"(freeze only self.base_layer's parameters).",
        )
    expect(
        all(torch.equal(p.detach(), p0) for p, p0 in zip(base.parameters(), originals)),
        "the base layer's weight or bias changed: forward must not modify the pretrained "
        "weights.",
    )


# ---------------------------------------------------------------------------------------------
# The mistakes the checks know (tests/test_check_variants.py runs each through its check cell)
# ---------------------------------------------------------------------------------------------

_COUNT = "nb01_param_count_impl"
_LAYER = "nb01_lora_layer_impl"
_LINEAR = "nb01_linear_with_lora_impl"
_OWN = OWN_WORK_PREFIX + " course_lib."
_SUM = "return sum(r * (d + k) for d, k in layer_shapes)"
_H = "h = self.lora_dropout(x) @ self.lora_A.T  # (..., r)"
_RET = "return (h @ self.lora_B.T) * self.scaling  # (..., out_features)"
_LAYER_END = _RET + "\n        ### END SOLUTION"
_KAIMING = "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))"
_ARGS = "base_layer.in_features, base_layer.out_features, r, lora_alpha, lora_dropout"
_FWD = "return self.base_layer(x) + self.lora(x)"
_FWD_CHECK = "nb01_lora_forward"

VARIANTS = (
    # lora_trainable_params(layer_shapes, r)
    mistake(_COUNT, "full_weights", "adds up d*k", [(_SUM, "return sum(d * k for d, k in layer_shapes)")],
            says="full weights' size"),
    mistake(_COUNT, "r_times_dk", "adds up r*d*k",
            [(_SUM, "return sum(r * d * k for d, k in layer_shapes)")], says="r*d*k is not"),
    mistake(_COUNT, "no_rank", "adds up d + k", [(_SUM, "return sum(d + k for d, k in layer_shapes)")],
            says="the rank r is missing"),
    mistake(_COUNT, "one_factor", "counts only A (r x k)",
            [(_SUM, "return sum(r * k for d, k in layer_shapes)")], says="counted only one of A"),
    mistake(_COUNT, "first_layer", "counts only the first layer",
            [(_SUM, "d, k = layer_shapes[0] if layer_shapes else (0, 0)\n    return r * (d + k)")],
            says="only the first layer"),
    mistake(_COUNT, "rank_8", "hard-codes the rank 8",
            [(_SUM, "return sum(8 * (d + k) for d, k in layer_shapes)")], says="the rank is hard-coded"),
    mistake(_COUNT, "missing_return", "computes the sum but does not return it",
            [(_SUM, "total = sum(r * (d + k) for d, k in layer_shapes)")],
            says="forget the `return`"),
    mistake(_COUNT, "delegates", "calls course_lib's lora_parameter_count",
            [(_SUM, "return sum(lora_lib.lora_parameter_count(d, k, r) for d, k in layer_shapes)")],
            says=_OWN),
    alternative(_COUNT, "loop", "adds r*d + r*k in a loop",
                [(_SUM, "total = 0\n    for d, k in layer_shapes:\n        total += r * d + r * k\n"
                        "    return total")]),
    # LoRALayer.__init__
    mistake(_LAYER, "B_random", "initialises B randomly",
            [("torch.zeros(out_features, r)", "torch.randn(out_features, r)")],
            says="lora_B is not zero"),
    mistake(_LAYER, "A_zero", "initialises A with zeros", [(_KAIMING, "nn.init.zeros_(self.lora_A)")],
            says="lora_A is all zero"),
    mistake(_LAYER, "A_transposed", "A of shape (in_features, r)",
            [("torch.empty(r, in_features)", "torch.empty(in_features, r)")],
            says="the transpose of the expected"),
    mistake(_LAYER, "B_transposed", "B of shape (r, out_features)",
            [("torch.zeros(out_features, r)", "torch.zeros(r, out_features)")],
            says="the transpose of the expected"),
    mistake(_LAYER, "A_not_parameter", "A is a plain tensor",
            [("nn.Parameter(torch.empty(r, in_features))", "torch.empty(r, in_features)")],
            says="not an nn.Parameter"),
    mistake(_LAYER, "scaling_alpha", "scaling = lora_alpha",
            [("self.scaling = lora_alpha / r", "self.scaling = lora_alpha")],
            says="you stored lora_alpha itself"),
    mistake(_LAYER, "scaling_inverted", "scaling = r / lora_alpha",
            [("self.scaling = lora_alpha / r", "self.scaling = r / lora_alpha")], says="upside down"),
    mistake(_LAYER, "scaling_rslora", "scaling = lora_alpha / sqrt(r)",
            [("self.scaling = lora_alpha / r", "self.scaling = lora_alpha / math.sqrt(r)")],
            says="rsLoRA"),
    mistake(_LAYER, "delegates", "LoRALayer = course_lib's LoRALayer",
            [(_LAYER_END, _LAYER_END + "\n\n\nLoRALayer = lora_lib.LoRALayer")], says=_OWN),
    mistake(_LAYER, "subclasses", "subclasses course_lib's LoRALayer",
            [("class LoRALayer(nn.Module):", "class LoRALayer(lora_lib.LoRALayer):"),
             ("        super().__init__()\n", "        nn.Module.__init__(self)\n")], says=_OWN),
    # LoRALayer.forward
    mistake(_LAYER, "no_scaling", "forgets the scaling", [(_RET, "return h @ self.lora_B.T")],
            says="the scaling is missing", check=_FWD_CHECK),
    mistake(_LAYER, "scaling_twice", "scales twice",
            [(_RET, "return (h @ self.lora_B.T) * self.scaling * self.scaling")],
            says="the scaling is applied twice", check=_FWD_CHECK),
    mistake(_LAYER, "no_transpose", "x @ A without the transpose",
            [(_H, "h = self.lora_dropout(x) @ self.lora_A")], says="needs a transpose",
            check=_FWD_CHECK),
    mistake(_LAYER, "returns_hidden", "returns the (..., r) hidden vector",
            [(_RET, "return h * self.scaling")], says="(..., out_features)", check=_FWD_CHECK),
    mistake(_LAYER, "detached_A", "detaches A in forward",
            [(_H, "h = self.lora_dropout(x) @ self.lora_A.detach().T")],
            says="no gradient reached self.lora_A", check=_FWD_CHECK),
    mistake(_LAYER, "no_dropout", "never applies the dropout", [(_H, "h = x @ self.lora_A.T")],
            says="the dropout is missing", check=_FWD_CHECK),
    mistake(_LAYER, "dropout_on_output", "applies the dropout to the output",
            [(_H, "h = x @ self.lora_A.T"),
             (_RET, "return self.lora_dropout((h @ self.lora_B.T) * self.scaling)")],
            says="acts on the output", check=_FWD_CHECK),
    mistake(_LAYER, "dropout_on_hidden", "applies the dropout to A x",
            [(_H, "h = self.lora_dropout(x @ self.lora_A.T)")], says="acts on x @ lora_A.T",
            check=_FWD_CHECK),
    mistake(_LAYER, "dropout_on_A", "applies the dropout to the weights A",
            [(_H, "h = x @ self.lora_dropout(self.lora_A).T")], says="the same dropout mask",
            check=_FWD_CHECK),
    mistake(_LAYER, "dropout_keep_probability", "nn.Dropout(1 - lora_dropout)",
            [("nn.Dropout(lora_dropout)", "nn.Dropout(1 - lora_dropout)")],
            says="keep probability 1 - lora_dropout", check=_FWD_CHECK),
    mistake(_LAYER, "dropout_default_rate", "nn.Dropout() with its default rate",
            [("nn.Dropout(lora_dropout)", "nn.Dropout()")], says="default p = 0.5",
            check=_FWD_CHECK),
    mistake(_LAYER, "dropout_always_on", "F.dropout with training=True",
            [(_H, "h = nn.functional.dropout(x, self.lora_dropout.p, training=True) "
                  "@ self.lora_A.T")], says="eval mode", check=_FWD_CHECK),
    mistake(_LAYER, "mask_not_rescaled", "a hand-made mask that does not rescale",
            [(_H, "keep = (torch.rand_like(x) >= self.lora_dropout.p) if self.training else 1\n"
                  "        h = (x * keep) @ self.lora_A.T")], says="must also rescale",
            check=_FWD_CHECK),
    alternative(_LAYER, "normal_init", "Gaussian init of A (as in the lecture)",
                [(_KAIMING, "nn.init.normal_(self.lora_A, std=1 / r)")]),
    alternative(_LAYER, "randn_init", "A = randn * 0.01 in one line",
                [("nn.Parameter(torch.empty(r, in_features))",
                  "nn.Parameter(torch.randn(r, in_features) * 0.01)"),
                 ("        " + _KAIMING + "\n", "")]),
    alternative(_LAYER, "functional_linear", "F.linear twice, scaling first",
                [(block(2), "x = self.lora_dropout(x)\n"
                            "return self.scaling * nn.functional.linear("
                            "nn.functional.linear(x, self.lora_A), self.lora_B)")]),
    alternative(_LAYER, "manual_mask", "a hand-made inverted-dropout mask",
                [(_H, "if self.training and self.lora_dropout.p > 0:\n"
                      "            p = self.lora_dropout.p\n"
                      "            x = x * (torch.rand_like(x) >= p) / (1 - p)\n"
                      "        h = x @ self.lora_A.T")]),
    # LinearWithLoRA
    mistake(_LINEAR, "not_frozen", "forgets to freeze the base",
            [("            p.requires_grad = False", "            pass")],
            says="the base is not frozen"),
    mistake(_LINEAR, "swapped_features", "LoRALayer(out_features, in_features, ...)",
            [(_ARGS, "base_layer.out_features, base_layer.in_features, r, lora_alpha, "
                     "lora_dropout")], says="swapped"),
    mistake(_LINEAR, "rank_not_passed", "LoRALayer(in, out) with the default rank",
            [(_ARGS, "base_layer.in_features, base_layer.out_features")],
            says="the rank was not passed on"),
    mistake(_LINEAR, "alpha_not_passed", "forgets lora_alpha",
            [(_ARGS, "base_layer.in_features, base_layer.out_features, r")],
            says="lora_alpha was not passed on"),
    mistake(_LINEAR, "dropout_not_passed", "forgets lora_dropout",
            [(_ARGS, "base_layer.in_features, base_layer.out_features, r, lora_alpha")],
            says="lora_dropout was not passed on"),
    mistake(_LINEAR, "only_update", "returns only the LoRA update", [(_FWD, "return self.lora(x)")],
            says="returned only the LoRA update"),
    mistake(_LINEAR, "only_base", "returns only the base", [(_FWD, "return self.base_layer(x)")],
            says="ignores the LoRA branch"),
    mistake(_LINEAR, "scaled_again", "multiplies the update by the scaling again",
            [(_FWD, "return self.base_layer(x) + self.lora(x) * self.lora.scaling")],
            says="the scaling is applied twice"),
    mistake(_LINEAR, "delegates", "LinearWithLoRA = course_lib's LinearWithLoRA",
            [(_FWD + "\n        ### END SOLUTION",
              _FWD + "\n        ### END SOLUTION\n\n\nLinearWithLoRA = lora_lib.LinearWithLoRA")],
            says=_OWN),
    mistake(_LINEAR, "library_layer", "builds course_lib's LoRALayer instead of its own",
            [("self.lora = LoRALayer(", "self.lora = lora_lib.LoRALayer(")], says=_OWN),
    alternative(_LINEAR, "requires_grad_", "freezes with requires_grad_(False), update first",
                [("for p in self.base_layer.parameters():  # freeze the pretrained weights\n"
                  "            p.requires_grad = False",
                  "self.base_layer.requires_grad_(False)"),
                 (_FWD, "return self.lora(x) + self.base_layer(x)")]),
)
