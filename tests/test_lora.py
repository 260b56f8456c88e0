"""Unit tests of course_lib.model.lora: layers, merging, apply_lora's matching rules, adapters."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import course_lib
from course_lib.model import lora as lora_mod
from course_lib.model.lora import (
    LinearWithLoRA,
    LoRAConfig,
    LoRALayer,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_parameter_count,
    lora_savings,
    mark_only_lora_as_trainable,
    merge_lora,
    save_adapter,
    trainable_parameters_summary,
    unmerge_lora,
)

# ---------------------------------------------------------------------------------------------
# Small models with the names the course uses
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(torch.tanh(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = Attention(d)
        self.mlp = MLP(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Toy(nn.Module):
    """A two-block toy transformer: blocks.{0,1}.attn.{q,k,v,o}_proj, mlp.{up,down}_proj, lm_head."""

    def __init__(self, d: int = 8, vocab: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def toy(seed: int = 0, d: int = 8) -> Toy:
    torch.manual_seed(seed)
    return Toy(d)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(seed))


def randomise_lora(model: nn.Module, seed: int = 2) -> None:
    """Give every LoRA layer a non-zero B (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.lora_B.copy_(torch.randn(layer.lora.lora_B.shape, generator=gen) * 0.5)


def wrapped_names(model: nn.Module) -> list[str]:
    return sorted(name for name, _ in lora_layers(model))


def ref_update(x: torch.Tensor, layer: LoRALayer) -> torch.Tensor:
    """scaling * B A x in float64, straight from the formula."""
    A, B = layer.lora_A.double(), layer.lora_B.double()
    return layer.scaling * (x.double() @ (B @ A).T)


# ---------------------------------------------------------------------------------------------
# The lesson's formulas (used by notebook 00: names and errors must not change)
# ---------------------------------------------------------------------------------------------


def test_parameter_count_and_savings_formulas():
    assert lora_parameter_count(4096, 4096, 8) == 65_536
    assert lora_parameter_count(4096, 11008, 16) == 16 * (4096 + 11008)
    assert lora_savings(4096, 4096, 8) == 256.0
    assert lora_savings(4096, 11008, 16) == pytest.approx(4096 * 11008 / (16 * 15104))


@pytest.mark.parametrize(("bad", "error"), [
    (0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("8", TypeError),
    (None, TypeError),
])
def test_formulas_reject_bad_rank(bad, error):
    with pytest.raises(error, match=r"^r must be a positive int"):
        lora_parameter_count(16, 16, bad)
    with pytest.raises(error, match=r"^r must be a positive int"):
        lora_savings(16, 16, bad)


# ---------------------------------------------------------------------------------------------
# LoRALayer
# ---------------------------------------------------------------------------------------------


def test_lora_layer_shapes_and_parameters():
    layer = LoRALayer(12, 10, r=4, lora_alpha=8)
    assert isinstance(layer.lora_A, nn.Parameter) and isinstance(layer.lora_B, nn.Parameter)
    assert layer.lora_A.shape == (4, 12)  # (r, in_features)
    assert layer.lora_B.shape == (10, 4)  # (out_features, r)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert [n for n, _ in layer.named_parameters()] == ["lora_A", "lora_B"]
    for shape in [(12,), (5, 12), (2, 3, 12), (2, 1, 3, 12)]:
        assert layer(torch.randn(shape)).shape == (*shape[:-1], 10)


def test_lora_layer_rejects_wrong_input_width():
    with pytest.raises(ValueError, match="in_features=12"):
        LoRALayer(12, 10, r=4)(torch.randn(3, 11))


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_b_starts_at_zero_so_the_update_is_zero(init):
    torch.manual_seed(0)
    layer = LoRALayer(12, 10, r=4, init_lora_weights=init)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    assert torch.count_nonzero(layer(torch.randn(7, 12))) == 0


def test_default_init_is_kaiming_uniform_with_a_sqrt5():
    torch.manual_seed(0)
    layer = LoRALayer(400, 400, r=64)
    bound = 1 / math.sqrt(400)  # gain sqrt(2/(1+5)) * sqrt(3/fan_in)
    A = layer.lora_A.detach()
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.98 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    layer = LoRALayer(500, 10, r=8, init_lora_weights="gaussian")
    A = layer.lora_A.detach()
    assert A.std().item() == pytest.approx(1 / 8, rel=0.03)
    assert A.mean().abs().item() < 0.01


def test_init_false_makes_b_random():
    torch.manual_seed(0)
    layer = LoRALayer(12, 10, r=4, init_lora_weights=False)
    assert torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()
    assert layer(torch.randn(3, 12)).abs().sum() > 0


@pytest.mark.parametrize(
    ("r", "alpha", "rslora", "scaling"),
    [(8, 16, False, 2.0), (4, 4, False, 1.0), (16, 8, False, 0.5), (16, 8, True, 2.0),
     (4, 16, True, 8.0), (3, 1.5, False, 0.5)],
)
def test_scaling(r, alpha, rslora, scaling):
    layer = LoRALayer(20, 20, r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False)
    assert layer.scaling == pytest.approx(scaling)
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x).double(), ref_update(x, layer), atol=1e-5, rtol=1e-5)


def test_forward_matches_formula_and_gradients_match_autograd():
    torch.manual_seed(0)
    layer = LoRALayer(12, 10, r=3, lora_alpha=6, init_lora_weights=False).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: layer(x), (x, layer.lora_A, layer.lora_B))
    # the same numbers as autograd through the naive formula
    g = torch.randn(2, 5, 10, dtype=torch.float64)
    layer(x).backward(g)
    ours = [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    (layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)).backward(g)
    for got, want in zip(ours, [x.grad, layer.lora_A.grad, layer.lora_B.grad]):
        torch.testing.assert_close(got, want)


def test_dropout_only_in_training_and_skipped_at_zero():
    torch.manual_seed(0)
    layer = LoRALayer(64, 32, r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(16, 64)
    layer.eval()
    clean = layer(x)
    torch.testing.assert_close(clean.double(), ref_update(x, layer), atol=1e-5, rtol=1e-5)
    assert torch.equal(layer(x), clean)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, clean) and not torch.equal(a, b)
    many = x[:1].expand(4000, 64)  # one input, 4000 independent dropout masks
    mean = layer(many).mean(0)  # inverted dropout: unbiased
    assert (mean - clean[0]).abs().mean() < 0.1 * clean[0].abs().mean()
    no_drop = LoRALayer(64, 32, r=4, lora_dropout=0.0, init_lora_weights=False).train()
    assert torch.equal(no_drop(x), no_drop(x))


def test_delta_weight_is_scaling_b_a():
    torch.manual_seed(0)
    layer = LoRALayer(12, 10, r=4, lora_alpha=8, init_lora_weights=False)
    want = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(layer.delta_weight(), want)
    assert layer.delta_weight().shape == (10, 12)


# ---------------------------------------------------------------------------------------------
# LinearWithLoRA
# ---------------------------------------------------------------------------------------------


def test_wrapped_layer_starts_identical_to_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    x = torch.randn(4, 3, 12)
    want = base(x)
    layer = LinearWithLoRA(base, r=4, lora_alpha=8)
    assert layer.base_layer is base
    assert torch.equal(layer(x), want)
    assert (layer.in_features, layer.out_features) == (12, 10)
    assert layer.weight is base.weight and layer.bias is base.bias


def test_base_is_frozen_and_gradients_reach_only_lora():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LinearWithLoRA(base, r=4)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    randomise_lora(nn.ModuleList([layer]))
    x = torch.randn(5, 12, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora.lora_A.grad.abs().sum() > 0 and layer.lora.lora_B.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_at_init_only_b_gets_a_gradient():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(12, 10), r=4)
    layer(torch.randn(5, 12)).sum().backward()
    assert torch.count_nonzero(layer.lora.lora_A.grad) == 0  # B = 0 blocks A's gradient
    assert layer.lora.lora_B.grad.abs().sum() > 0


def test_wrapped_forward_is_base_plus_update_with_grads_like_autograd():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(12, 10).double(), r=3, lora_alpha=6)
    randomise_lora(nn.ModuleList([layer]))
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    want = layer.base_layer(x) + ref_update(x, layer.lora)
    torch.testing.assert_close(layer(x), want)
    assert torch.autograd.gradcheck(
        lambda x, A, B: layer(x), (x, layer.lora.lora_A, layer.lora.lora_B)
    )


class SubLinear(nn.Linear):
    """An nn.Linear subclass (as bitsandbytes' Linear4bit is one)."""


@pytest.mark.parametrize("bias", [True, False])
def test_fused_and_generic_paths_agree(bias):
    torch.manual_seed(0)
    fused = LinearWithLoRA(nn.Linear(12, 10, bias=bias).double(), r=3, lora_alpha=6)
    generic = LinearWithLoRA(SubLinear(12, 10, bias=bias).double(), r=3, lora_alpha=6,
                             fused=False)
    generic.load_state_dict(fused.state_dict())
    randomise_lora(nn.ModuleList([fused, generic]))
    with torch.no_grad():
        generic.lora.lora_B.copy_(fused.lora.lora_B)
    grads = []
    for layer in (fused, generic):
        x = torch.randn(2, 4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5),
                        requires_grad=True)
        out = layer(x)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), x.grad, layer.lora.lora_A.grad, layer.lora.lora_B.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_path_gradients_including_an_unfrozen_base(bias):
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(6, 5, bias=bias).double(), r=2, lora_alpha=4)
    randomise_lora(nn.ModuleList([layer]))
    layer.base_layer.requires_grad_(True)  # e.g. full fine-tuning plus LoRA
    base = layer.base_layer
    inputs = [torch.randn(7, 6, dtype=torch.float64, requires_grad=True), base.weight,
              layer.lora.lora_A, layer.lora.lora_B] + ([base.bias] if bias else [])
    assert torch.autograd.gradcheck(lambda *args: layer(args[0]), inputs)


def test_fused_path_with_dropout_matches_the_formula():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 8).double(), r=4, lora_alpha=8, lora_dropout=0.3)
    randomise_lora(nn.ModuleList([layer]))
    layer.train()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    out.backward(torch.ones_like(out))
    got = (out.detach(), x.grad.clone(), layer.lora.lora_A.grad.clone(),
           layer.lora.lora_B.grad.clone())
    x.grad = layer.lora.lora_A.grad = layer.lora.lora_B.grad = None
    torch.manual_seed(7)  # the same dropout mask
    dropped = nn.functional.dropout(x.reshape(-1, 16), 0.3, training=True).view(3, 5, 16)
    A, B = layer.lora.lora_A, layer.lora.lora_B
    want = layer.base_layer(x) + layer.lora.scaling * (dropped @ A.T @ B.T)
    want.backward(torch.ones_like(want))
    for a, b in zip(got, (want.detach(), x.grad, A.grad, B.grad)):
        torch.testing.assert_close(a, b)
    assert not torch.equal(got[0], layer.eval()(x))  # dropout did change the output


def test_base_forward_hooks_still_run():
    calls = []
    base = nn.Linear(4, 4)
    base.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    layer = LinearWithLoRA(base, r=2)
    layer(torch.randn(3, 4))
    assert calls == [torch.Size([3, 4])]


def test_autocast_bf16_on_cpu():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 8), r=4)
    randomise_lora(nn.ModuleList([layer]))
    x = torch.randn(5, 16)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        update = layer.lora(x)
    assert out.dtype == torch.bfloat16 and update.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert layer.lora.lora_A.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora.lora_B.grad).all()


def test_linear_like_base_is_accepted():
    class QuantisedLike(nn.Module):
        """Linear-like: in/out features and a (packed, non-float) weight; not an nn.Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = 12, 10
            torch.manual_seed(0)
            self.dense = nn.Parameter(torch.randn(10, 12), requires_grad=False)
            self.register_buffer("weight", torch.zeros(60, dtype=torch.uint8))

        def forward(self, x):
            return x @ self.dense.T

    base = QuantisedLike()
    layer = LinearWithLoRA(base, r=2)
    assert layer.lora.lora_A.dtype == torch.float32  # non-float base: fp32 adapters
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x))
    with pytest.raises(TypeError, match="cannot merge into QuantisedLike"):
        layer.merge()
    assert not layer.merged


# ---------------------------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------------------------


def test_merge_equals_unmerged_and_unmerge_restores():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(32, 24), r=4, lora_alpha=8)
    randomise_lora(nn.ModuleList([layer]))
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(7, 32)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    want_w = w0 + layer.lora.delta_weight()
    torch.testing.assert_close(layer.base_layer.weight.detach(), want_w)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


def test_merged_forward_uses_only_the_base_weight():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(8, 8), r=2)
    randomise_lora(nn.ModuleList([layer]))
    layer.merge()
    x = torch.randn(3, 8)
    before = layer(x)
    with torch.no_grad():
        layer.lora.lora_B.zero_()
    assert torch.equal(layer(x), before)
    assert torch.equal(before, layer.base_layer(x))


def test_second_merge_or_unmerge_warns_and_changes_nothing():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(8, 8), r=2)
    randomise_lora(nn.ModuleList([layer]))
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)
    layer.merge()
    merged_w = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged_w)
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, atol=1e-6, rtol=0)


def test_unmerge_removes_what_was_merged_even_if_lora_changed():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(8, 8), r=2)
    randomise_lora(nn.ModuleList([layer]))
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        layer.lora.lora_A.mul_(3)
        layer.lora.lora_B.add_(1)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, atol=1e-6, rtol=0)


def test_merge_refuses_non_finite_result():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(8, 8), r=2)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora.lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, w0)
    with torch.no_grad():
        layer.lora.lora_B.fill_(1e38)  # finite factors, overflowing product
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_train_and_eval_do_not_merge():
    layer = LinearWithLoRA(nn.Linear(8, 8), r=2)
    layer.eval()
    assert not layer.merged
    layer.merge()
    layer.train()
    assert layer.merged


def test_merge_lora_and_unmerge_lora_on_a_model():
    model = apply_lora(toy(), LoRAConfig(r=2, target_modules="all-linear"))
    randomise_lora(model)
    idx = tokens()
    want = model(idx)
    assert merge_lora(model) == 12
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
    assert merge_lora(model) == 0  # already merged: nothing to do, no warning
    assert unmerge_lora(model) == 12
    torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(toy())
    with pytest.raises(ValueError, match="no LoRA layers"):
        unmerge_lora(toy())


# ---------------------------------------------------------------------------------------------
# dtypes and devices
# ---------------------------------------------------------------------------------------------


def test_bf16_base_gets_fp32_lora_and_returns_bf16():
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = LinearWithLoRA(base, r=4)
    assert layer.lora.lora_A.dtype == torch.float32 and layer.lora.lora_B.dtype == torch.float32
    randomise_lora(nn.ModuleList([layer]))
    x = torch.randn(5, 16).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    want = base(x).float() + ref_update(x.float(), layer.lora).float()
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.02)
    out.float().sum().backward()
    assert layer.lora.lora_B.grad.dtype == torch.float32
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x).float(), out.float(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_base_keeps_its_dtype(dtype):
    layer = LinearWithLoRA(nn.Linear(8, 8).to(dtype), r=2)
    assert layer.lora.lora_A.dtype == dtype
    assert layer(torch.randn(2, 8, dtype=dtype)).dtype == dtype


def test_explicit_lora_dtype():
    layer = LinearWithLoRA(nn.Linear(8, 8), r=2, lora_dtype=torch.float64)
    assert layer.lora.lora_B.dtype == torch.float64
    assert layer(torch.randn(2, 8)).dtype == torch.float32
    with pytest.raises(TypeError, match="lora_dtype"):
        LinearWithLoRA(nn.Linear(8, 8), r=2, lora_dtype=torch.int8)


def test_lora_parameters_follow_the_base_device():
    base = nn.Linear(8, 6, device="meta")
    layer = LinearWithLoRA(base, r=2)
    assert layer.lora.lora_A.device.type == "meta" and layer.lora.lora_B.device.type == "meta"
    assert layer(torch.empty(3, 8, device="meta")).shape == (3, 6)


# ---------------------------------------------------------------------------------------------
# apply_lora: PEFT's matching rules
# ---------------------------------------------------------------------------------------------


def test_default_targets_are_q_and_v():
    assert LoRAConfig().target_modules == ["q_proj", "v_proj"]
    model = apply_lora(toy())
    assert wrapped_names(model) == [
        "blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj",
        "blocks.1.attn.v_proj",
    ]


def test_list_entry_matches_exact_name_or_dotted_suffix_only():
    class Names(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(4, 4)
            self.xq_proj = nn.Linear(4, 4)
            self.q_proj_extra = nn.Linear(4, 4)
            self.inner = nn.Module()
            self.inner.q_proj = nn.Linear(4, 4)

    model = apply_lora(Names(), LoRAConfig(r=1, target_modules=["q_proj"]))
    assert wrapped_names(model) == ["inner.q_proj", "q_proj"]


def test_list_entry_with_dots_matches_a_longer_suffix():
    model = apply_lora(toy(), LoRAConfig(r=2, target_modules=["1.attn.q_proj", "mlp.up_proj"]))
    assert wrapped_names(model) == [
        "blocks.0.mlp.up_proj", "blocks.1.attn.q_proj", "blocks.1.mlp.up_proj",
    ]
    exact = apply_lora(toy(), LoRAConfig(r=2, target_modules=["blocks.0.attn.k_proj"]))
    assert wrapped_names(exact) == ["blocks.0.attn.k_proj"]


def test_string_is_a_full_match_regex():
    model = apply_lora(toy(), LoRAConfig(r=2, target_modules=r"blocks\.0\.attn\.(q|k)_proj"))
    assert wrapped_names(model) == ["blocks.0.attn.k_proj", "blocks.0.attn.q_proj"]
    model = apply_lora(toy(), LoRAConfig(r=2, target_modules=r".*_proj"))
    assert len(wrapped_names(model)) == 12
    with pytest.raises(ValueError, match="matched no module"):  # a partial match is no match
        apply_lora(toy(), LoRAConfig(r=2, target_modules="q_pro"))


def test_all_linear_skips_the_output_head():
    model = apply_lora(toy(), LoRAConfig(r=2, target_modules="all-linear"))
    names = wrapped_names(model)
    assert len(names) == 12 and "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear)


def test_all_linear_skips_get_output_embeddings():
    class WithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def get_output_embeddings(self):
            return self.out

    model = apply_lora(WithHead(), LoRAConfig(r=1, target_modules="all-linear"))
    assert wrapped_names(model) == ["proj"]


def test_no_match_lists_the_linear_layers():
    with pytest.raises(ValueError) as info:
        apply_lora(toy(), LoRAConfig(target_modules=["query", "value"]))
    message = str(info.value)
    assert "['query', 'value']" in message
    assert ("13 layers named q_proj (x2), k_proj (x2), v_proj (x2), o_proj (x2), up_proj (x2), "
            "down_proj (x2), lm_head, e.g. 'blocks.0.attn.q_proj'") in message
    small = nn.Module()
    small.proj, small.head = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Linear layers: proj, head. A list entry"):
        apply_lora(small, LoRAConfig())


def test_regex_matching_a_non_linear_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"'blocks.0.attn', a Attention"):
        apply_lora(toy(), LoRAConfig(target_modules=r"blocks\.0\.attn"))
    with pytest.raises(TypeError, match="'emb', a Embedding"):
        apply_lora(toy(), LoRAConfig(target_modules=["emb"]))


def test_apply_twice_is_refused_but_other_layers_can_be_added():
    model = apply_lora(toy(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(r=2))
    apply_lora(model, LoRAConfig(r=2, target_modules=["k_proj"]))
    assert len(wrapped_names(model)) == 6
    with pytest.raises(TypeError, match="already has a LoRA adapter"):
        LinearWithLoRA(model.blocks[0].attn.q_proj)


def test_apply_lora_keeps_outputs_and_freezes_everything_else():
    model = toy()
    idx = tokens()
    want = model(idx)
    apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    assert torch.equal(model(idx), want)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith(("lora.lora_A", "lora.lora_B")) for n in trainable)
    assert len(trainable) == 24


def test_custom_layer_types_for_linear_like_modules():
    class FakeQuantLinear(nn.Module):
        def __init__(self, i: int, o: int) -> None:
            super().__init__()
            self.in_features, self.out_features = i, o
            self.weight = nn.Parameter(torch.randn(o, i))

        def forward(self, x):
            return x @ self.weight.T

    model = nn.Module()
    model.q_proj = FakeQuantLinear(4, 4)
    with pytest.raises(TypeError, match="LoRA wraps only Linear"):
        apply_lora(model, LoRAConfig(r=1, target_modules=["q_proj"]))
    apply_lora(model, LoRAConfig(r=1, target_modules=["q_proj"]),
               layer_types=(nn.Linear, FakeQuantLinear))
    assert isinstance(model.q_proj, LinearWithLoRA)
    with pytest.raises(TypeError, match="layer_types"):
        apply_lora(toy(), LoRAConfig(), layer_types=("Linear",))
    single = nn.Module()
    single.q_proj = FakeQuantLinear(4, 4)
    apply_lora(single, LoRAConfig(r=1, target_modules=["q_proj"]), layer_types=FakeQuantLinear)
    assert isinstance(single.q_proj, LinearWithLoRA)  # one class is taken as a 1-tuple


def test_target_modules_normalisation_and_errors():
    assert LoRAConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
    assert LoRAConfig(target_modules=("k_proj",)).target_modules == ["k_proj"]
    for bad, error in [([], ValueError), (["q_proj", 3], ValueError), (5, TypeError),
                       (None, TypeError)]:
        with pytest.raises(error, match="^target_modules must be"):
            LoRAConfig(target_modules=bad)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LoRAConfig(target_modules="(q_proj")


def test_apply_lora_argument_types():
    with pytest.raises(TypeError, match="^model must be an nn.Module"):
        apply_lora("model", LoRAConfig())
    with pytest.raises(TypeError, match="^config must be a LoRAConfig"):
        apply_lora(toy(), {"r": 8})


# ---------------------------------------------------------------------------------------------
# trainable parameters
# ---------------------------------------------------------------------------------------------


def test_mark_only_lora_as_trainable_and_summary():
    model = toy()
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():
        p.requires_grad_(True)
    assert mark_only_lora_as_trainable(model) is model
    summary = trainable_parameters_summary(model)
    lora_params = 4 * lora_parameter_count(8, 8, 2)  # q and v in two blocks
    assert summary.trainable == lora_params
    assert summary.total == total + lora_params
    assert summary.percent == pytest.approx(100 * lora_params / (total + lora_params))
    assert str(summary) == (
        f"trainable params: {lora_params:,d} || all params: {total + lora_params:,d} || "
        f"trainable%: {100 * lora_params / (total + lora_params):.4f}"
    )
    with pytest.raises(ValueError, match="no LoRA layers"):
        mark_only_lora_as_trainable(toy())


def test_summary_counts_shared_parameters_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    summary = trainable_parameters_summary(model)
    assert (summary.trainable, summary.total) == (20, 20)


# ---------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------


def test_save_writes_peft_layout(tmp_path):
    model = apply_lora(toy(), LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomise_lora(model)
    save_adapter(model, tmp_path / "adapter", LoRAConfig(r=2, lora_alpha=4))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 4, 0.0)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["use_rslora"] is False and config["bias"] == "none"
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.blocks.{i}.attn.{p}_proj.lora_{m}.weight"
        for i in (0, 1) for p in "qv" for m in "AB"
    )
    assert tensors["base_model.model.blocks.1.attn.v_proj.lora_A.weight"].shape == (2, 8)
    assert torch.equal(
        tensors["base_model.model.blocks.1.attn.v_proj.lora_B.weight"],
        model.blocks[1].attn.v_proj.lora.lora_B.detach(),
    )


def test_round_trip_restores_outputs_exactly(tmp_path):
    config = LoRAConfig(r=3, lora_alpha=5, target_modules=["q_proj", "up_proj"], use_rslora=True)
    model = apply_lora(toy(seed=0), config)
    randomise_lora(model)
    idx = tokens()
    want = model(idx)
    save_adapter(model, tmp_path, config)
    fresh = toy(seed=0)  # same base weights, no LoRA yet
    load_adapter(fresh, tmp_path)
    assert wrapped_names(fresh) == wrapped_names(model)
    assert torch.equal(fresh(idx), want)
    # into a model that already has the LoRA layers (freshly initialised)
    again = apply_lora(toy(seed=0), config)
    assert not torch.equal(again(idx), want)
    load_adapter(again, tmp_path)
    assert torch.equal(again(idx), want)


def test_all_linear_is_saved_as_the_wrapped_paths(tmp_path):
    model = apply_lora(toy(), LoRAConfig(r=2, target_modules="all-linear"))
    randomise_lora(model)
    save_adapter(model, tmp_path)  # config inferred from the layers
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == wrapped_names(model)
    fresh = toy()
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(tokens()), model(tokens()))


def test_save_checks_the_config_against_the_layers(tmp_path):
    model = apply_lora(toy(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="'blocks.0.attn.q_proj' has r=2"):
        save_adapter(model, tmp_path, LoRAConfig(r=4))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(toy(), tmp_path)
    with pytest.raises(TypeError, match="config must be a LoRAConfig"):
        save_adapter(model, tmp_path, {"r": 2})


def test_load_errors_name_the_module(tmp_path):
    model = apply_lora(toy(d=8), LoRAConfig(r=2))
    save_adapter(model, tmp_path / "a")
    # shape mismatch: same names, wider model
    with pytest.raises(ValueError, match=r"lora_A of module 'blocks.0.attn.q_proj' has shape \(2, 8\)"):
        load_adapter(toy(d=16), tmp_path / "a")
    # name mismatch: the model's LoRA layers sit elsewhere
    other = apply_lora(toy(), LoRAConfig(r=2, target_modules=["k_proj", "v_proj"]))
    with pytest.raises(ValueError, match="module 'blocks.0.attn.q_proj', but the model has no LoRA"):
        load_adapter(other, tmp_path / "a")
    more = apply_lora(toy(), LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "k_proj"]))
    with pytest.raises(ValueError, match="LoRA layer 'blocks.0.attn.k_proj' has no weights"):
        load_adapter(more, tmp_path / "a")
    # a different rank on an already wrapped model
    with pytest.raises(ValueError, match="has r=4"):
        load_adapter(apply_lora(toy(), LoRAConfig(r=4)), tmp_path / "a")
    # merged layers
    merged = apply_lora(toy(), LoRAConfig(r=2))
    merge_lora(merged)
    with pytest.raises(ValueError, match="is merged"):
        load_adapter(merged, tmp_path / "a")


def test_load_leaves_the_model_unchanged_on_error(tmp_path):
    model = apply_lora(toy(), LoRAConfig(r=2, target_modules=["q_proj"]))
    randomise_lora(model)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.blocks.1.attn.q_proj.lora_B.weight"] = torch.zeros(8, 3)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    target = apply_lora(toy(), LoRAConfig(r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="blocks.1.attn.q_proj"):
        load_adapter(target, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(toy(), tmp_path)
    model = apply_lora(toy(), LoRAConfig(r=2))
    save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for change, match in [({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
                          ({"use_dora": True}, "use_dora=True is not supported"),
                          ({"r": 0}, "^r must be a positive int")]:
        config_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            load_adapter(toy(), tmp_path)
    config_path.write_text(json.dumps(good))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.blocks.0.attn.q_proj.weight"] = torch.zeros(8, 8)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unexpected key 'base_model.model.blocks.0.attn.q_proj.weight'"):
        load_adapter(toy(), tmp_path)
    del tensors["base_model.model.blocks.0.attn.q_proj.weight"]
    del tensors["base_model.model.blocks.0.attn.q_proj.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="module 'blocks.0.attn.q_proj' has no lora_B"):
        load_adapter(toy(), tmp_path)


def test_load_rejects_malformed_config_files(tmp_path):
    save_adapter(apply_lora(toy(), LoRAConfig(r=2)), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for text, match in [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                        (json.dumps({**good, "target_modules": None}), "target_modules is missing")]:
        config_path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_adapter(toy(), tmp_path)


def test_save_refuses_a_bare_layer(tmp_path):
    with pytest.raises(ValueError, match="not a bare LinearWithLoRA"):
        save_adapter(LinearWithLoRA(nn.Linear(4, 4), r=2), tmp_path)


def test_adapter_names_are_importable_from_both_modules():
    from course_lib.model import adapters

    for name in ("save_adapter", "load_adapter", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"):
        assert getattr(lora_mod, name) is getattr(adapters, name)
    assert lora_mod.ADAPTER_CONFIG_NAME == "adapter_config.json"
    assert lora_mod.ADAPTER_WEIGHTS_NAME == "adapter_model.safetensors"
    with pytest.raises(AttributeError, match="no attribute 'save_adapters'"):
        lora_mod.save_adapters  # noqa: B018


def test_config_scaling_and_peft_dict_round_trip():
    config = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"])
    assert config.scaling == 2.0
    assert LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA" and data["target_modules"] == ["q_proj"]
    assert LoRAConfig.from_peft_dict(data) == config
    assert LoRAConfig.from_peft_dict({**data, "task_type": "CAUSAL_LM"}) == config  # ignored
    with pytest.raises(ValueError, match=r"^x.json: bias='all' is not supported"):
        LoRAConfig.from_peft_dict({**data, "bias": "all"}, source="x.json")


def test_reprs_show_the_hyperparameters():
    layer = LinearWithLoRA(nn.Linear(8, 6, bias=False), r=2, lora_alpha=4)
    text = repr(layer)
    assert text.startswith("LinearWithLoRA(\n  merged=False\n")
    assert ("in_features=8, out_features=6, r=2, lora_alpha=4, scaling=2, lora_dropout=0.0, "
            "use_rslora=False") in text
    layer.merge()
    assert "merged=True" in repr(layer)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "error"), [
    (0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("8", TypeError),
    (None, TypeError),
])
def test_bad_rank(bad, error):
    with pytest.raises(error, match="^r must be a positive int"):
        LoRALayer(8, 8, r=bad)
    with pytest.raises(error, match="^r must be a positive int"):
        LinearWithLoRA(nn.Linear(8, 8), r=bad)
    with pytest.raises(error, match="^r must be a positive int"):
        LoRAConfig(r=bad)


@pytest.mark.parametrize(("bad", "error"), [
    (0, ValueError), (-2, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("16", TypeError), (True, TypeError), (None, TypeError),
])
def test_bad_alpha(bad, error):
    with pytest.raises(error, match=r"^lora_alpha must be a number > 0 \(e.g. 16\)"):
        LoRALayer(8, 8, r=2, lora_alpha=bad)
    with pytest.raises(error, match=r"^lora_alpha must be a number > 0 \(e.g. 16\)"):
        LoRAConfig(lora_alpha=bad)


@pytest.mark.parametrize(("bad", "error"), [
    (-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), ("0.1", TypeError), (None, TypeError),
])
def test_bad_dropout(bad, error):
    with pytest.raises(error, match=r"^lora_dropout must be"):
        LoRALayer(8, 8, r=2, lora_dropout=bad)
    with pytest.raises(error, match=r"^lora_dropout must be"):
        LoRAConfig(lora_dropout=bad)


@pytest.mark.parametrize("bad", [nn.Conv1d(4, 4, 1), nn.Embedding(4, 4), nn.Sequential(),
                                 torch.zeros(4, 4), None, "q_proj"])
def test_base_must_be_linear(bad):
    with pytest.raises(TypeError, match=r"^base_layer must be an nn.Linear"):
        LinearWithLoRA(bad)


def test_base_linear_with_inconsistent_weight():
    base = nn.Linear(4, 3)
    base.weight = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"base_layer.weight has shape \(4, 3\)"):
        LinearWithLoRA(base)


def test_bad_init_rslora_and_sizes():
    allowed = r"^init_lora_weights must be one of \(True, False, 'gaussian'\)"
    with pytest.raises(ValueError, match=allowed):
        LoRALayer(8, 8, r=2, init_lora_weights="kaiming")
    with pytest.raises(ValueError, match=allowed):
        LoRAConfig(init_lora_weights=1)
    with pytest.raises(TypeError, match="^use_rslora must be True or False"):
        LoRALayer(8, 8, r=2, use_rslora="yes")
    with pytest.raises(ValueError, match="^in_features must be a positive int"):
        LoRALayer(0, 8)
    with pytest.raises(TypeError, match="^out_features must be a positive int"):
        LoRALayer(8, 2.0)


def test_rank_above_min_dimension_warns():
    with pytest.warns(UserWarning, match="no saving"):
        LoRALayer(16, 4, r=5)
    with pytest.warns(UserWarning, match=r"min\(out_features, in_features\)=4"):
        LinearWithLoRA(nn.Linear(16, 4), r=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRALayer(16, 4, r=4)  # r == min(d, k): allowed without a warning


def test_course_lib_reexports_the_lesson_names():
    from course_lib.utils import params

    assert course_lib.LoRALayer is LoRALayer
    assert course_lib.LinearWithLoRA is LinearWithLoRA
    assert lora_mod.TrainableSummary is params.TrainableSummary
    assert trainable_parameters_summary is params.trainable_parameters_summary
    assert set(lora_mod.__all__) >= {
        "LoRALayer", "LinearWithLoRA", "LoRAConfig", "apply_lora", "mark_only_lora_as_trainable",
        "trainable_parameters_summary", "merge_lora", "unmerge_lora", "save_adapter",
        "load_adapter",
    }


def test_config_fields_have_help_text():
    from dataclasses import fields

    for f in fields(LoRAConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


# ---------------------------------------------------------------------------------------------
# property tests over random (d, k, r)
# ---------------------------------------------------------------------------------------------


@st.composite
def shapes(draw):
    d = draw(st.integers(1, 40))
    k = draw(st.integers(1, 40))
    r = draw(st.integers(1, min(d, k)))
    alpha = draw(st.sampled_from([1, 2, 8, 16, 0.5, 32.0]))
    rslora = draw(st.booleans())
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    seed = draw(st.integers(0, 2**16))
    return d, k, r, alpha, rslora, tuple(lead), seed


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_property_layer_matches_formula(case):
    d, k, r, alpha, rslora, lead, seed = case
    torch.manual_seed(seed)
    base = nn.Linear(k, d)
    layer = LinearWithLoRA(base, r=r, lora_alpha=alpha, use_rslora=rslora)
    x = torch.randn(*lead, k)
    assert torch.equal(layer(x), base(x))  # zero at init
    randomise_lora(nn.ModuleList([layer]), seed)
    out = layer(x)
    assert out.shape == (*lead, d)
    want = base(x).double() + ref_update(x, layer.lora)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    expected_scaling = alpha / math.sqrt(r) if rslora else alpha / r
    assert layer.lora.scaling == pytest.approx(expected_scaling)
    n_lora = sum(p.numel() for p in layer.lora.parameters())
    assert n_lora == lora_parameter_count(d, k, r) == r * (d + k)
    assert lora_savings(d, k, r) == pytest.approx(d * k / n_lora)
    layer.merge()
    torch.testing.assert_close(layer(x), out, atol=1e-4, rtol=1e-4)
    layer.unmerge()
    torch.testing.assert_close(layer(x), out, atol=1e-4, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(shapes())
def test_property_gradients_only_reach_lora(case):
    d, k, r, alpha, rslora, lead, seed = case
    torch.manual_seed(seed)
    layer = LinearWithLoRA(nn.Linear(k, d), r=r, lora_alpha=alpha, use_rslora=rslora)
    randomise_lora(nn.ModuleList([layer]), seed)
    x = torch.randn(*lead, k, requires_grad=True)
    g = torch.randn(*lead, d)
    layer(x).backward(g)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    A, B, s = layer.lora.lora_A.detach(), layer.lora.lora_B.detach(), layer.lora.scaling
    x2, g2 = x.detach().reshape(-1, k).double(), g.reshape(-1, d).double()
    want_B = s * g2.T @ (x2 @ A.double().T)
    want_A = s * (g2 @ B.double()).T @ x2
    torch.testing.assert_close(layer.lora.lora_B.grad.double(), want_B, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.lora.lora_A.grad.double(), want_A, atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(shapes())
def test_property_adapter_round_trip(tmp_path_factory, case):
    d, k, r, alpha, rslora, lead, seed = case
    torch.manual_seed(seed)
    model = nn.Module()
    model.q_proj = nn.Linear(k, d)
    base_state = {k_: v.clone() for k_, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj"]))
    randomise_lora(model, seed)
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(model, directory)
    fresh = nn.Module()
    fresh.q_proj = nn.Linear(k, d)
    fresh.load_state_dict(base_state)
    load_adapter(fresh, directory)
    x = torch.randn(*lead, k)
    assert torch.equal(fresh.q_proj(x), model.q_proj(x))
