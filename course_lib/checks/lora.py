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

from course_lib.checks import call_student, expect, passed
from course_lib.model import lora as ref

__all__ = [
    "check_lora_trainable_params",
    "check_lora_layer_init",
    "check_lora_layer_forward",
    "check_linear_with_lora",
]

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
        ]
        for value, hint in hints:
            if value is not None and value != want and got == value:
                raise AssertionError(f"{label} returned {got:,}, expected {want:,}: {hint}.")
        raise AssertionError(
            f"{label} returned {got!r}, expected {want:,} = sum of r*(d+k) over the shapes."
        )
    passed("nb01_param_count")


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
    passed("nb01_lora_init")


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


def check_lora_layer_forward(cls: type) -> None:
    """``LoRALayer.forward``: returns ``scaling * (dropout(x) @ A.T) @ B.T`` with gradients."""
    in_f, out_f, r, alpha = 12, 10, 4, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = _build_lora(cls, in_f, out_f, r, alpha)
        A, B = _factors(layer, in_f, out_f, r)
        scaling = _scaling_of(layer, r, alpha)
        layer.eval()
        x = torch.randn(3, 5, in_f)
        out = call_student(layer, x, what="LoRALayer.forward")
        expect(
            isinstance(out, torch.Tensor),
            f"LoRALayer.forward returned {type(out).__name__}; return the update tensor.",
        )
        expect(
            tuple(out.shape) == (3, 5, out_f),
            f"LoRALayer.forward on x of shape (3, 5, {in_f}) returned shape {tuple(out.shape)}, "
            f"expected (3, 5, {out_f}) = (..., out_features): x @ A.T is (..., r), then @ B.T.",
        )
        expect(
            torch.count_nonzero(out.detach()).item() == 0,
            "with B = 0 (as initialised) the update must be exactly zero; forward should "
            "return only the LoRA branch scaling · B A x, not add x or anything else.",
        )
        _set_factors(A, B, seed=1)
        got = layer(x)
        want = _reference_update(A.detach(), B.detach(), r, alpha, x)
        _diagnose_update(got.detach(), want, scaling, alpha, "LoRALayer.forward")
        got.pow(2).sum().backward()
        for name, p in (("lora_A", A), ("lora_B", B)):
            expect(
                p.grad is not None and torch.count_nonzero(p.grad).item() > 0,
                f"no gradient reached self.{name}: use the parameter itself in forward (no "
                f".data, .detach() or torch.no_grad()).",
            )
        # dropout: active in training mode, off in eval mode
        drop = _build_lora(cls, in_f, out_f, r, alpha, dropout=0.5)
        dA, dB = _factors(drop, in_f, out_f, r)
        _set_factors(dA, dB, seed=2)
        want = _reference_update(dA.detach(), dB.detach(), r, alpha, x)
        drop.eval()
        _diagnose_update(drop(x).detach(), want, alpha / r, alpha,
                         "LoRALayer.forward in eval mode (dropout must be off)")
        drop.train()
        with torch.no_grad():
            outs = [drop(x) for _ in range(3)]
        expect(
            any(not torch.equal(outs[0], o) for o in outs[1:]) and not _close(outs[0], want),
            "with lora_dropout=0.5 in training mode the output never changes: create "
            "self.lora_dropout = nn.Dropout(lora_dropout) in __init__ (Step 3) and apply it to "
            "x in forward.",
        )
    passed("nb01_lora_forward")


# ---------------------------------------------------------------------------------------------
# 3. LinearWithLoRA
# ---------------------------------------------------------------------------------------------


def check_linear_with_lora(cls: type) -> None:
    """``LinearWithLoRA``: frozen ``base_layer`` + ``lora``; forward = base(x) + lora(x)."""
    in_f, out_f, r, alpha = 12, 10, 4, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = nn.Linear(in_f, out_f)
        w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
        layer = call_student(cls, base, r=r, lora_alpha=alpha, what="LinearWithLoRA.__init__")
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
        if isinstance(A, torch.Tensor) and tuple(A.shape) == (r, out_f):
            raise AssertionError(
                f"self.lora.lora_A has shape {tuple(A.shape)}: in_features and out_features are "
                f"swapped. The base maps {in_f} -> {out_f}, so use "
                f"LoRALayer(base_layer.in_features, base_layer.out_features, ...)."
            )
        A, B = _factors(lora, in_f, out_f, r, owner="self.lora")
        scaling = _scaling_of(lora, r, alpha)
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
        out = call_student(layer, x, what="LinearWithLoRA.forward")
        expect(
            isinstance(out, torch.Tensor) and tuple(out.shape) == (4, 3, out_f),
            f"LinearWithLoRA.forward on x of shape (4, 3, {in_f}) should return shape "
            f"(4, 3, {out_f}), got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.",
        )
        if not _close(out.detach(), base_out):
            if _close(out.detach(), torch.zeros_like(base_out)):
                raise AssertionError(
                    "LinearWithLoRA.forward returned only the LoRA update (zero at init): add "
                    "the frozen layer's output, self.base_layer(x) + self.lora(x)."
                )
            raise AssertionError(
                "right after wrapping (B = 0) LinearWithLoRA must compute exactly what the base "
                "layer computes; return self.base_layer(x) + self.lora(x)."
            )
        _set_factors(A, B, seed=3)
        update = _reference_update(A.detach(), B.detach(), r, alpha, x)
        got = layer(x)
        g = got.detach()
        if _close(g, base_out):
            raise AssertionError(
                "LinearWithLoRA.forward ignores the LoRA branch: return "
                "self.base_layer(x) + self.lora(x)."
            )
        if _close(g, update):
            raise AssertionError(
                "LinearWithLoRA.forward returns only the LoRA update: add self.base_layer(x)."
            )
        if _close(g, base_out + update * scaling):
            raise AssertionError(
                "the scaling is applied twice: self.lora(x) is already scaled, so forward is "
                "just self.base_layer(x) + self.lora(x)."
            )
        if _close(g, base_out + update / scaling):
            raise AssertionError(
                "the LoRA branch is not scaled: LoRALayer.forward must multiply by "
                "self.scaling (run its check again)."
            )
        _diagnose_update(g - base_out, update, scaling, alpha,
                         "LinearWithLoRA.forward(x) - base_layer(x)")
        got.pow(2).sum().backward()
        expect(
            base.weight.grad is None and base.bias.grad is None,
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
            torch.equal(base.weight.detach(), w0) and torch.equal(base.bias.detach(), b0),
            "the base layer's weight or bias changed: forward must not modify the pretrained "
            "weights.",
        )
    passed("nb01_linear_with_lora")
