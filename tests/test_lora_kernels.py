"""The fused LoRA path (course_lib.kernels.lora) against its oracle, the plain forward.

``LinearWithLoRA(fused=False)`` computes ``base_layer(x) + lora(x)`` with plain PyTorch; every
test here builds the same layer twice, once per path, and compares outputs and gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib.kernels import lora as kernels
from course_lib.model.lora import LinearWithLoRA, LoRALayer


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


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 3, 12), (2, 1, 3, 12)],
                         ids=["1d", "2d", "3d", "4d"])
def test_fused_equals_plain_fp64(bias, shape):
    fused, plain = pair(bias=bias)
    x = torch.randn(shape, dtype=torch.float64)
    assert kernels.applies(fused.lora, x, fused.base_layer(x))
    assert_same(fused, plain, x)


def test_fused_equals_plain_fp32_with_scaling_variants():
    for kwargs in ({"r": 3, "lora_alpha": 6}, {"r": 4, "lora_alpha": 5, "use_rslora": True}):
        fused, plain = pair(32, 24, dtype=torch.float32, **kwargs)
        assert_same(fused, plain, torch.randn(4, 7, 32), atol=1e-5, rtol=1e-5)


def test_fused_equals_plain_with_dropout_same_mask():
    fused, plain = pair(16, 8, r=4, lora_alpha=8, lora_dropout=0.3)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert_same(fused.train(), plain.train(), x)
    got = run(fused, x, torch.ones(3, 5, 8, dtype=torch.float64))[0]
    assert not torch.equal(got, fused.eval()(x))  # the dropout did change the output


def test_fused_equals_plain_with_an_unfrozen_base():
    fused, plain = pair(6, 5, r=2, lora_alpha=4)
    for layer in (fused, plain):
        layer.base_layer.requires_grad_(True)  # e.g. full fine-tuning plus LoRA
    assert_same(fused, plain, torch.randn(7, 6, dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False])
def test_fused_gradcheck(bias):
    fused, _ = pair(6, 5, bias=bias, r=2, lora_alpha=4)
    fused.base_layer.requires_grad_(True)
    base = fused.base_layer
    inputs = [torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True), base.weight,
              fused.lora.lora_A, fused.lora.lora_B] + ([base.bias] if bias else [])
    assert torch.autograd.gradcheck(lambda *args: fused(args[0]), inputs)


def test_only_the_needed_gradients_are_computed():
    fused, plain = pair(8, 6, r=2)
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
    real = kernels.add_lora
    monkeypatch.setattr(kernels, "add_lora", lambda *args: calls.append(1) or real(*args))
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
    lora = LoRALayer(8, 6, r=2)
    x, result = torch.randn(3, 8), torch.randn(3, 6)
    assert kernels.applies(lora, x, result)
    assert not kernels.applies(lora, x, result.double())  # result not in the LoRA dtype
    assert not kernels.applies(lora, torch.randn(3, 7), result)  # wrong width
    assert not kernels.applies(lora, x, torch.randn(4, 6))  # shapes that do not line up
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.applies(lora, x, result)
    meta = LoRALayer(8, 6, r=2, device="meta")  # autocast does not know "meta": not on
    assert kernels.applies(meta, torch.empty(3, 8, device="meta"), torch.empty(3, 6, device="meta"))


def test_bf16_base_takes_the_plain_path_and_agrees():
    fused, plain = pair(16, 12, dtype=torch.bfloat16, r=4)
    x = torch.randn(5, 16).to(torch.bfloat16)
    assert not kernels.applies(fused.lora, x, fused.base_layer(x))  # bf16 result, fp32 LoRA
    assert torch.equal(fused(x), plain(x))


def test_base_forward_hooks_run_and_count_on_both_paths():
    fused, plain = pair(4, 4, dtype=torch.float32, r=2)
    for layer in (fused, plain):  # a hook that changes the base output
        layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    x = torch.randn(3, 4)
    base = fused.base_layer
    want = 2 * nn.functional.linear(x, base.weight, base.bias) + fused.lora(x)
    torch.testing.assert_close(fused(x), want)
    torch.testing.assert_close(plain(x), want)


def test_linear_like_base_uses_the_fused_path():
    class Dense(nn.Module):
        """A Linear-like module that is not an nn.Linear (as the course's NF4Linear)."""

        def __init__(self, i: int, o: int, bias: bool = True) -> None:
            super().__init__()
            self.in_features, self.out_features = i, o
            self.weight = nn.Parameter(torch.randn(o, i))
            self.bias = nn.Parameter(torch.randn(o)) if bias else None

        def forward(self, x):
            out = x @ self.weight.T
            return out if self.bias is None else out + self.bias

    fused, plain = pair(8, 6, dtype=torch.float64, base_cls=Dense, r=2)
    assert_same(fused, plain, torch.randn(2, 4, 8, dtype=torch.float64))


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
