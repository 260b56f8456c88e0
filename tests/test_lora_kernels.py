"""The fused LoRA path (course_lib.kernels.lora) against its oracle, the plain forward.

``LinearWithLoRA(fused=False)`` computes ``base_layer(x) + lora(x)`` with plain PyTorch; every
test here builds the same layer twice, once per path, and compares outputs and gradients. The
fused path has two nodes: one for a plain ``nn.Linear`` base (base GEMM included) and one that
adds the update to any other base's output (an ``nn.Linear`` subclass, a Linear-like module, a
base with hooks or in another dtype); both are covered.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib.kernels import lora as kernels
from course_lib.model.lora import LinearWithLoRA


class SubLinear(nn.Linear):
    """Not an nn.Linear itself: the fused path adds the update to its output."""


class Dense(nn.Module):
    """A Linear-like module that is not an nn.Linear (as the course's NF4Linear)."""

    def __init__(self, i: int, o: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = i, o
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)  # nn.Linear's scale
        self.bias = nn.Parameter(torch.randn(o) / i**0.5) if bias else None

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


BASES = [nn.Linear, SubLinear, Dense]


class FixedMaskDropout(nn.Dropout):
    """Dropout with one fixed mask, so that gradcheck's repeated calls see one function."""

    def __init__(self, p: float, shape: tuple[int, ...]) -> None:
        super().__init__(p)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("mask", (torch.rand(shape, generator=gen) > p).double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask / (1 - self.p) if self.training else x


def pair(in_f=12, out_f=10, *, bias=True, dtype=torch.float64, seed=0, base_cls=nn.Linear,
         **lora_kwargs):
    """Two LinearWithLoRA with the same weights and a non-zero B: (fused, plain)."""
    torch.manual_seed(seed)
    base = base_cls(in_f, out_f, bias=bias).to(dtype)
    layers = []
    for fused in (True, False):
        copy = base_cls(in_f, out_f, bias=bias).to(dtype)
        copy.load_state_dict(base.state_dict())
        layers.append(LinearWithLoRA(copy, fused=fused, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    B = torch.randn(layers[0].lora.lora_B.shape, generator=gen, dtype=dtype)
    A = layers[0].lora.lora_A.detach()
    with torch.no_grad():
        for layer in layers:
            layer.lora.lora_A.copy_(A)
            layer.lora.lora_B.copy_(B)
    return layers


def run(layer, x, grad, seed=7):
    """Output and gradients of x, A, B (and of the base weight/bias if they require grad)."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask for both paths
    out = layer(x)
    out.backward(grad)
    params = [layer.lora.lora_A, layer.lora.lora_B]
    params += [p for p in layer.base_layer.parameters() if p.requires_grad]
    return [out.detach(), x.grad] + [p.grad for p in params]


def assert_same(fused, plain, x, **tolerance):
    grad = torch.randn(*x.shape[:-1], fused.out_features, dtype=x.dtype,
                       generator=torch.Generator().manual_seed(3))
    got, want = run(fused, x, grad), run(plain, x, grad)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("base_cls", BASES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 3, 12), (2, 1, 3, 12)],
                         ids=["1d", "2d", "3d", "4d"])
def test_fused_equals_plain_fp64(base_cls, bias, shape):
    fused, plain = pair(bias=bias, base_cls=base_cls, r=4)
    x = torch.randn(shape, dtype=torch.float64)
    assert kernels.applies(fused, x)
    assert_same(fused, plain, x)


@pytest.mark.parametrize("base_cls", BASES)
def test_fused_equals_plain_fp32_with_scaling_variants(base_cls):
    for kwargs in ({"r": 3, "lora_alpha": 6}, {"r": 4, "lora_alpha": 5, "use_rslora": True}):
        fused, plain = pair(32, 24, dtype=torch.float32, base_cls=base_cls, **kwargs)
        # fp32: the two paths sum in different orders; grads reach ~50 here, so ~1e-5 apart
        assert_same(fused, plain, torch.randn(4, 7, 32), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("base_cls", BASES)
def test_fused_equals_plain_with_dropout_same_mask(base_cls):
    fused, plain = pair(16, 8, base_cls=base_cls, r=4, lora_alpha=8, lora_dropout=0.3)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert_same(fused.train(), plain.train(), x)
    got = run(fused, x, torch.ones(3, 5, 8, dtype=torch.float64))[0]
    assert not torch.equal(got, fused.eval()(x))  # the dropout did change the output


@pytest.mark.parametrize("base_cls", BASES)
def test_fused_equals_plain_with_an_unfrozen_base(base_cls):
    fused, plain = pair(6, 5, base_cls=base_cls, r=2, lora_alpha=4)
    for layer in (fused, plain):
        layer.base_layer.requires_grad_(True)  # e.g. full fine-tuning plus LoRA
    assert_same(fused, plain, torch.randn(7, 6, dtype=torch.float64))


@pytest.mark.parametrize("base_cls", BASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fused_gradcheck(base_cls, bias, dropout):
    fused, _ = pair(6, 5, bias=bias, base_cls=base_cls, r=2, lora_alpha=4, lora_dropout=dropout)
    fused.base_layer.requires_grad_(True)
    if dropout:  # gradcheck calls the function many times: one fixed mask
        fused.lora.lora_dropout = FixedMaskDropout(dropout, (6,))  # one mask per feature
    base = fused.base_layer
    inputs = [torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True), base.weight,
              fused.lora.lora_A, fused.lora.lora_B] + ([base.bias] if bias else [])
    assert torch.autograd.gradcheck(lambda *args: fused(args[0]), inputs)


@pytest.mark.parametrize("base_cls", BASES)
def test_only_the_needed_gradients_are_computed(base_cls):
    fused, plain = pair(8, 6, base_cls=base_cls, r=2)
    for layer in (fused, plain):
        layer.lora.lora_A.requires_grad_(False)
    x = torch.randn(4, 8, dtype=torch.float64)  # no grad for x either
    outs = []
    for layer in (fused, plain):
        out = layer(x)
        out.sum().backward()
        outs.append((out, layer.lora.lora_A.grad, layer.lora.lora_B.grad))
    assert outs[0][1] is None and outs[1][1] is None
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][2], outs[1][2])


def test_fused_path_is_taken_only_where_it_applies(monkeypatch):
    calls = []
    real = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *args: calls.append(1) or real(*args))
    fused, plain = pair(8, 6, dtype=torch.float32, r=2)
    x = torch.randn(3, 8)
    fused(x)
    assert calls == [1]
    plain(x)  # fused=False: never
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the plain path
        out = fused(x)
    assert calls == [1] and out.dtype == torch.bfloat16
    fused.merge()  # merged: only the base layer
    fused(x)
    assert calls == [1]


def test_applies():
    layer = LinearWithLoRA(nn.Linear(8, 6), r=2)
    x = torch.randn(3, 8)
    assert kernels.applies(layer, x) and kernels.applies(layer, x.double())
    assert not kernels.applies(layer, torch.randn(3, 7))  # wrong width: the plain path's error
    with pytest.raises(RuntimeError):
        layer(torch.randn(3, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.applies(layer, x)
    meta = LinearWithLoRA(nn.Linear(8, 6, device="meta"), r=2)  # autocast does not know "meta"
    assert kernels.applies(meta, torch.empty(3, 8, device="meta"))
    assert meta(torch.empty(3, 8, device="meta")).shape == (3, 6)


def test_plain_linear_node_only_for_a_plain_linear_in_the_lora_dtype():
    linear = nn.Linear(8, 6)
    assert kernels._is_plain_linear(linear, torch.randn(2, 8), torch.float32)
    assert not kernels._is_plain_linear(linear, torch.randn(2, 8).double(), torch.float32)
    assert not kernels._is_plain_linear(linear, torch.randn(2, 8), torch.float64)
    assert not kernels._is_plain_linear(SubLinear(8, 6), torch.randn(2, 8), torch.float32)
    hooked = nn.Linear(8, 6)
    hooked.register_forward_pre_hook(lambda module, args: None)
    assert not kernels._is_plain_linear(hooked, torch.randn(2, 8), torch.float32)
    mixed = nn.Linear(8, 6)
    mixed.bias.data = mixed.bias.data.double()
    assert not kernels._is_plain_linear(mixed, torch.randn(2, 8), torch.float32)


@pytest.mark.parametrize("base_cls", BASES)
def test_bf16_base_with_fp32_lora_agrees(base_cls):
    fused, plain = pair(16, 12, dtype=torch.bfloat16, base_cls=base_cls, r=4)
    assert fused.lora.lora_A.dtype == torch.float32
    x = torch.randn(5, 16).to(torch.bfloat16)
    got, want = fused(x), plain(x)
    assert got.dtype == want.dtype == torch.bfloat16
    # the fused path adds the update in fp32 before rounding to bf16, the plain one after
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
    got.float().sum().backward()
    assert fused.lora.lora_B.grad.dtype == torch.float32


def test_base_forward_hooks_run_and_count_on_both_paths():
    fused, plain = pair(4, 4, dtype=torch.float32, r=2)
    for layer in (fused, plain):  # a hook that changes the base output
        layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    x = torch.randn(3, 4)
    base = fused.base_layer
    want = 2 * nn.functional.linear(x, base.weight, base.bias) + fused.lora(x)
    torch.testing.assert_close(fused(x), want)
    torch.testing.assert_close(plain(x), want)


def test_double_backward_needs_the_plain_path():
    fused, plain = pair(5, 4, r=2)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: plain(x), (x,))
    (g,) = torch.autograd.grad(fused(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward"):
        g.sum().backward()


def test_fused_must_be_a_bool():
    with pytest.raises(TypeError, match="^fused must be True or False"):
        LinearWithLoRA(nn.Linear(4, 4), r=2, fused=1)
