"""course_lib.checks.lora: each check passes on the solution and fails usefully on the stub and
on typical mistakes. The solution and the stub are taken from solutions/01_lora.ipynb itself
(the stub through the release's own transformation), so the test follows the notebook."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from notebook_fill_ins import run_fill_ins
from torch import nn

from course_lib.checks.core import CheckFailure
from course_lib.checks.lora import (
    check_linear_with_lora,
    check_lora_layer_forward,
    check_lora_layer_init,
    check_lora_trainable_params,
)
from course_lib.model import lora as ref

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / "01_lora.ipynb"


def notebook_namespace(released: bool) -> dict:
    """Run the three fill-in cells (solution or released stub) as the notebook would."""
    ns: dict = {"torch": torch, "nn": nn, "math": math}
    fill_ins = ("nb01_param_count_impl", "nb01_lora_layer_impl", "nb01_linear_with_lora_impl")
    return run_fill_ins(NOTEBOOK, fill_ins, ns, released)


@pytest.fixture(scope="module")
def solution():
    return notebook_namespace(released=False)


@pytest.fixture(scope="module")
def stub():
    return notebook_namespace(released=True)


# ---------------------------------------------------------------------------------------------
# the solution passes, printing exactly the success line
# ---------------------------------------------------------------------------------------------


def test_solution_passes_every_check(solution, capsys):
    check_lora_trainable_params(solution["lora_trainable_params"])
    check_lora_layer_init(solution["LoRALayer"])
    check_lora_layer_forward(solution["LoRALayer"])
    check_linear_with_lora(solution["LinearWithLoRA"])
    assert capsys.readouterr().out == (
        "CHECK nb01_param_count: PASS\nCHECK nb01_lora_init: PASS\n"
        "CHECK nb01_lora_forward: PASS\nCHECK nb01_linear_with_lora: PASS\n"
    )


@pytest.mark.parametrize(("check", "cls", "name"), [
    (check_lora_layer_init, ref.LoRALayer, "course_lib.model.lora.LoRALayer"),
    (check_lora_layer_forward, ref.LoRALayer, "course_lib.model.lora.LoRALayer"),
    (check_linear_with_lora, ref.LinearWithLoRA, "course_lib.model.lora.LinearWithLoRA"),
])
def test_library_classes_are_refused(check, cls, name, capsys):
    """Handing in course_lib's class (or a subclass of it) is not the student's own work."""

    class Sub(cls):
        pass

    for student in (cls, Sub):
        with pytest.raises(CheckFailure) as info:
            check(student)
        assert (f"the check runs your own implementation: write it instead of calling {name}"
                in str(info.value))
    assert capsys.readouterr().out == ""


def test_delegating_inside_the_student_code_is_refused(solution):
    def count(shapes, r):
        return sum(ref.lora_parameter_count(d, k, r) for d, k in shapes)

    with pytest.raises(CheckFailure, match="course_lib.model.lora.lora_parameter_count"):
        check_lora_trainable_params(count)

    class Wrapper(nn.Module):
        def __init__(self, base_layer, r=8, lora_alpha=16, lora_dropout=0.0):
            super().__init__()
            self.base_layer = base_layer.requires_grad_(False)
            self.lora = ref.LoRALayer(base_layer.in_features, base_layer.out_features, r,
                                      lora_alpha, lora_dropout)

        def forward(self, x):
            return self.base_layer(x) + self.lora(x)

    with pytest.raises(CheckFailure, match="course_lib.model.lora.LoRALayer"):
        check_linear_with_lora(Wrapper)
    assert ref.LoRALayer(4, 4, r=2).lora_A.shape == (2, 4)  # the guard is lifted afterwards


def test_checks_do_not_change_the_global_random_state(solution):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    check_lora_layer_forward(solution["LoRALayer"])
    check_linear_with_lora(solution["LinearWithLoRA"])
    assert torch.equal(torch.rand(3), want)


# ---------------------------------------------------------------------------------------------
# the released stub fails with the "is not filled in yet" message
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("check", "name", "grade_id", "what"), [
    (check_lora_trainable_params, "lora_trainable_params", "nb01_param_count_impl",
     "lora_trainable_params(layer_shapes, r)"),
    (check_lora_layer_init, "LoRALayer", "nb01_lora_layer_impl", "LoRALayer.__init__"),
    (check_lora_layer_forward, "LoRALayer", "nb01_lora_layer_impl", "LoRALayer.__init__"),
    (check_linear_with_lora, "LinearWithLoRA", "nb01_linear_with_lora_impl",
     "LinearWithLoRA.__init__"),
])
def test_stub_fails_with_not_implemented_message(stub, capsys, check, name, grade_id, what):
    with pytest.raises(AssertionError) as info:
        check(stub[name])
    message = str(info.value)
    assert f"{what} is not filled in yet" in message
    assert "then run this cell again" in message
    assert capsys.readouterr().out == ""


def test_forward_stub_alone_is_reported_as_forward(solution, stub):
    """A student who finished __init__ but not forward is pointed at forward."""

    class Half(solution["LoRALayer"]):
        forward = stub["LoRALayer"].forward

    with pytest.raises(AssertionError, match="LoRALayer.forward is not filled in yet"):
        check_lora_layer_forward(Half)
    check_lora_layer_init(Half)  # __init__ is fine

    class HalfLinear(solution["LinearWithLoRA"]):
        forward = stub["LinearWithLoRA"].forward

    with pytest.raises(AssertionError, match="LinearWithLoRA.forward is not filled in yet"):
        check_linear_with_lora(HalfLinear)


# ---------------------------------------------------------------------------------------------
# typical mistakes: parameter count
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fn", "match"), [
    (lambda shapes, r: sum(d * k for d, k in shapes), "full weights' size d\\*k"),
    (lambda shapes, r: sum(r * d * k for d, k in shapes), "r\\*d\\*k is not a LoRA count"),
    (lambda shapes, r: sum(r * k for d, k in shapes), "counted only one of A .* and B"),
    (lambda shapes, r: sum(r * d for d, k in shapes), "counted only one of A .* and B"),
    (lambda shapes, r: sum(r * (d + k) if d == k else r * k for d, k in shapes),
     r"counted only A \(r x k\); add B"),
    (lambda shapes, r: sum(r * (d + k) if d == k else r * d for d, k in shapes),
     r"counted only B \(d x r\); add A"),
    (lambda shapes, r: sum(d + k for d, k in shapes), "rank r is missing"),
    (lambda shapes, r: r * (shapes[0][0] + shapes[0][1]) if shapes else 0, "only the first layer"),
    (lambda shapes, r: None, "forget the `return`"),
    (lambda shapes, r: str(sum(r * (d + k) for d, k in shapes)), "return a number"),
    (lambda shapes, r: sum(r * (d + k) for d, k in shapes) + 1, "expected 65,536"),
])
def test_param_count_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_lora_trainable_params(fn)


# ---------------------------------------------------------------------------------------------
# typical mistakes: LoRALayer
# ---------------------------------------------------------------------------------------------


class GoodLoRA(nn.Module):
    """A correct student LoRALayer that the mistakes below modify one at a time."""

    def __init__(self, in_features, out_features, r=8, lora_alpha=16, lora_dropout=0.0):
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, in_features) / r)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.lora_dropout = nn.Dropout(lora_dropout)

    def forward(self, x):
        return self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T * self.scaling


def test_good_student_layer_passes(capsys):
    check_lora_layer_init(GoodLoRA)
    check_lora_layer_forward(GoodLoRA)
    assert capsys.readouterr().out.count("PASS") == 2


def _variant(init=None, forward=None):
    """GoodLoRA with a modified __init__ tail and/or forward."""

    class Variant(GoodLoRA):
        def __init__(self, in_features, out_features, r=8, lora_alpha=16, lora_dropout=0.0):
            super().__init__(in_features, out_features, r, lora_alpha, lora_dropout)
            if init is not None:
                init(self, in_features, out_features, r, lora_alpha)

    if forward is not None:
        Variant.forward = forward
    return Variant


def _set(name, fn):
    def init(self, i, o, r, a):
        delattr(self, name)
        setattr(self, name, fn(i, o, r, a))
    return init


INIT_MISTAKES = [
    (_set("lora_B", lambda i, o, r, a: nn.Parameter(torch.randn(o, r))), "lora_B is not zero"),
    (_set("lora_A", lambda i, o, r, a: nn.Parameter(torch.zeros(r, i))), "lora_A is all zero"),
    (_set("lora_A", lambda i, o, r, a: nn.Parameter(torch.full((r, i), 0.1))),
     "same value everywhere"),
    (_set("lora_A", lambda i, o, r, a: nn.Parameter(torch.randn(i, r))),
     r"transpose of the expected \(r, in_features\)"),
    (_set("lora_B", lambda i, o, r, a: nn.Parameter(torch.zeros(r, o))),
     r"transpose of the expected \(out_features, r\)"),
    (_set("lora_A", lambda i, o, r, a: nn.Parameter(torch.randn(r, i + 1))),
     r"lora_A has shape \(4, 13\), expected \(r, in_features\) = \(4, 12\)"),
    (_set("lora_A", lambda i, o, r, a: torch.randn(r, i)), "not an nn.Parameter"),
    (_set("lora_B", lambda i, o, r, a: nn.Parameter(torch.zeros(o, r), requires_grad=False)),
     "requires_grad=False"),
    (_set("scaling", lambda i, o, r, a: a), "you stored lora_alpha itself"),
    (_set("scaling", lambda i, o, r, a: r / a), "upside down"),
    (_set("scaling", lambda i, o, r, a: a / math.sqrt(r)), "rsLoRA"),
    (_set("scaling", lambda i, o, r, a: 1.0), "ignores lora_alpha and r"),
    (_set("scaling", lambda i, o, r, a: "2"), "expected lora_alpha / r|should be a number"),
    (_set("r", lambda i, o, r, a: None), "self.r should hold the rank"),
]


@pytest.mark.parametrize(("init", "match"), INIT_MISTAKES)
def test_init_mistakes(init, match, capsys):
    with pytest.raises(AssertionError, match=match):
        check_lora_layer_init(_variant(init=init))
    assert capsys.readouterr().out == ""


def test_missing_attributes():
    class NoB(nn.Module):
        def __init__(self, in_features, out_features, r=8, lora_alpha=16, lora_dropout=0.0):
            super().__init__()
            self.r, self.scaling = r, lora_alpha / r
            self.lora_A = nn.Parameter(torch.randn(r, in_features))

    with pytest.raises(AssertionError, match="no attribute self.lora_B"):
        check_lora_layer_init(NoB)

    class NoScaling(GoodLoRA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self.scaling

    with pytest.raises(AssertionError, match="self.scaling is missing"):
        check_lora_layer_init(NoScaling)

    class NotAModule:
        def __init__(self, *args, **kwargs):
            pass

    with pytest.raises(AssertionError, match="must subclass nn.Module"):
        check_lora_layer_init(NotAModule)


FORWARD_MISTAKES = [
    (lambda self, x: x @ self.lora_A.T @ self.lora_B.T, "scaling is missing"),
    (lambda self, x: x @ self.lora_A.T @ self.lora_B.T * self.scaling ** 2,
     "scaling is applied twice"),
    (lambda self, x: x @ self.lora_A.T @ self.lora_B.T * self.lora_alpha,
     "multiplied by lora_alpha"),
    (lambda self, x: (x @ self.lora_A.T @ self.lora_B.T * self.scaling)[..., :5],
     r"expected \(3, 5, 10\)"),
    (lambda self, x: None, "returned NoneType"),
    (lambda self, x: x @ self.lora_A.T @ self.lora_B.T * self.scaling + x[..., :10],
     "update must be exactly zero"),
    (lambda self, x: x @ self.lora_A.detach().T @ self.lora_B.T * self.scaling,
     "no gradient reached self.lora_A"),
    (lambda self, x: x @ self.lora_A.T @ self.lora_B.T * self.scaling + 0.01 * self.lora_B.sum(),
     "differs from scaling"),
    (lambda self, x: x @ self.lora_A.T @ self.lora_B.T * self.scaling, None),  # no dropout: below
]


@pytest.mark.parametrize(("forward", "match"), FORWARD_MISTAKES[:-1])
def test_forward_mistakes(forward, match, capsys):
    with pytest.raises(AssertionError, match=match):
        check_lora_layer_forward(_variant(forward=forward))
    assert capsys.readouterr().out == ""


def test_forward_without_dropout_fails():
    forward = FORWARD_MISTAKES[-1][0]
    with pytest.raises(AssertionError, match="the dropout is missing"):
        check_lora_layer_forward(_variant(forward=forward))


def test_dropout_always_on_fails_in_eval_mode():
    def forward(self, x):
        x = torch.nn.functional.dropout(x, self.lora_dropout.p, training=True)
        return x @ self.lora_A.T @ self.lora_B.T * self.scaling

    with pytest.raises(AssertionError, match="eval mode"):
        check_lora_layer_forward(_variant(forward=forward))


# ---------------------------------------------------------------------------------------------
# typical mistakes: LinearWithLoRA
# ---------------------------------------------------------------------------------------------


class GoodLinear(nn.Module):
    def __init__(self, base_layer, r=8, lora_alpha=16, lora_dropout=0.0):
        super().__init__()
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad = False
        self.lora = GoodLoRA(base_layer.in_features, base_layer.out_features, r, lora_alpha,
                             lora_dropout)

    def forward(self, x):
        return self.base_layer(x) + self.lora(x)


def _linear_variant(init=None, forward=None):
    class Variant(GoodLinear):
        def __init__(self, base_layer, r=8, lora_alpha=16, lora_dropout=0.0):
            super().__init__(base_layer, r, lora_alpha, lora_dropout)
            if init is not None:
                init(self, base_layer, r, lora_alpha)

    if forward is not None:
        Variant.forward = forward
    return Variant


def _unfreeze(self, base, r, a):
    base.weight.requires_grad_(True)


def _swap(self, base, r, a):
    self.lora = GoodLoRA(base.out_features, base.in_features, r, a)


def _copy_base(self, base, r, a):
    self.base_layer = nn.Linear(base.in_features, base.out_features)


def _freeze_all(self, base, r, a):
    for p in self.parameters():
        p.requires_grad = False


def _no_lora(self, base, r, a):
    del self.lora


LINEAR_MISTAKES = [
    (_unfreeze, "the base is not frozen: base_layer.weight"),
    (_swap, "in_features and out_features are swapped"),
    (_copy_base, "must be the nn.Linear you were given"),
    (_freeze_all, "requires_grad=False: LoRA must train it"),
    (_no_lora, "self.lora is missing"),
]


def test_good_student_linear_passes(capsys):
    check_linear_with_lora(GoodLinear)
    assert capsys.readouterr().out == "CHECK nb01_linear_with_lora: PASS\n"


@pytest.mark.parametrize(("init", "match"), LINEAR_MISTAKES)
def test_linear_init_mistakes(init, match, capsys):
    with pytest.raises(AssertionError, match=match):
        check_linear_with_lora(_linear_variant(init=init))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("forward", "match"), [
    (lambda self, x: self.base_layer(x), "ignores the LoRA branch"),
    (lambda self, x: self.lora(x), "returned only the LoRA update"),
    (lambda self, x: self.base_layer(x) + self.lora(x) * self.lora.scaling,
     "scaling is applied twice"),
    (lambda self, x: self.base_layer(x) + self.lora(x) / self.lora.scaling,
     "the LoRA branch is not scaled"),
    (lambda self, x: self.base_layer(x) + self.lora(x) + 0.5, "must compute exactly what the base"),
    (lambda self, x: self.base_layer(x) + 2 * self.lora(x) + self.lora(x) ** 2,
     "differs from scaling"),
    (lambda self, x: self.base_layer(x)[..., :3], r"should return shape \(4, 3, 10\)"),
])
def test_linear_forward_mistakes(forward, match):
    with pytest.raises(AssertionError, match=match):
        check_linear_with_lora(_linear_variant(forward=forward))


def test_base_that_is_trained_through_is_caught():
    def forward(self, x):
        return nn.functional.linear(x, self.base_layer.weight.requires_grad_(True),
                                    self.base_layer.bias) + self.lora(x)

    with pytest.raises(AssertionError, match="gradient reached base_layer"):
        check_linear_with_lora(_linear_variant(forward=forward))


def test_forward_that_modifies_the_base_is_caught():
    def forward(self, x):
        with torch.no_grad():
            self.base_layer.weight.mul_(1.0 + 1e-3)
        return self.base_layer(x) + self.lora(x)

    with pytest.raises(AssertionError):
        check_linear_with_lora(_linear_variant(forward=forward))


# ---------------------------------------------------------------------------------------------
# dropout: on the wrong tensor, at the wrong rate (issue 14)
# ---------------------------------------------------------------------------------------------


def _drop_init(make):
    def init(self, i, o, r, a):
        self.lora_dropout = make(self.lora_dropout.p)
    return init


DROPOUT_MISTAKES = [
    (None, lambda self, x: self.lora_dropout(x @ self.lora_A.T @ self.lora_B.T * self.scaling),
     "acts on the output"),
    (None, lambda self, x: self.lora_dropout(x @ self.lora_A.T) @ self.lora_B.T * self.scaling,
     r"acts on x @ lora_A.T"),
    (None, lambda self, x: x @ self.lora_dropout(self.lora_A).T @ self.lora_B.T * self.scaling,
     "the same dropout mask"),
    (_drop_init(lambda p: nn.Dropout(1 - p)), None, "keep probability 1 - lora_dropout"),
    (_drop_init(lambda p: nn.Dropout()), None, "default p = 0.5"),
    (_drop_init(lambda p: nn.Dropout(p / 2)), None, "with the rate you were given"),
    (None, lambda self, x: (x * (torch.rand_like(x) >= self.lora_dropout.p) if self.training
                            else x) @ self.lora_A.T @ self.lora_B.T * self.scaling,
     "must also rescale"),
]


@pytest.mark.parametrize(("init", "forward", "match"), DROPOUT_MISTAKES)
def test_dropout_mistakes_are_named(init, forward, match, capsys):
    with pytest.raises(CheckFailure, match=match):
        check_lora_layer_forward(_variant(init=init, forward=forward))
    assert capsys.readouterr().out == ""


def test_a_hand_made_inverted_dropout_passes(capsys):
    def forward(self, x):
        p = self.lora_dropout.p
        if self.training and p > 0:
            x = x * (torch.rand_like(x) >= p) / (1 - p)
        return self.scaling * torch.nn.functional.linear(
            torch.nn.functional.linear(x, self.lora_A), self.lora_B)

    check_lora_layer_forward(_variant(forward=forward))
    assert capsys.readouterr().out == "CHECK nb01_lora_forward: PASS\n"


def test_a_missing_transpose_is_explained():
    with pytest.raises(CheckFailure, match="needs a transpose"):
        check_lora_layer_forward(_variant(forward=lambda self, x: x @ self.lora_A @ self.lora_B))


@pytest.mark.parametrize(("make", "match"), [
    (lambda b, r, a, p: GoodLoRA(b.in_features, b.out_features), "the rank was not passed on"),
    (lambda b, r, a, p: GoodLoRA(b.in_features, b.out_features, r), "lora_alpha was not passed"),
    (lambda b, r, a, p: GoodLoRA(b.in_features, b.out_features, r, a),
     "lora_dropout was not passed"),
])
def test_linear_arguments_not_passed_on(make, match):
    class Linear(GoodLinear):
        def __init__(self, base_layer, r=8, lora_alpha=16, lora_dropout=0.0):
            super().__init__(base_layer, r, lora_alpha, lora_dropout)
            self.lora = make(base_layer, r, lora_alpha, lora_dropout)

    with pytest.raises(CheckFailure, match=match):
        check_linear_with_lora(Linear)


def test_every_fill_in_lists_mistakes_and_delegation():
    from course_lib.checks.lora import VARIANTS

    for fill_in in ("nb01_param_count_impl", "nb01_lora_layer_impl", "nb01_linear_with_lora_impl"):
        says = [v.says for v in VARIANTS if v.fill_in == fill_in and v.is_mistake]
        assert len(says) >= 5
        assert any("the check runs your own implementation" in s for s in says)
