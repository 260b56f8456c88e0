"""course_lib's adapter files and PEFT's are interchangeable (skipped when peft is missing)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import course_lib  # noqa: F401  (before peft: keeps bitsandbytes' hub-kernel warning quiet)
from course_lib.model import adapters
from course_lib.model.lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    save_adapter,
)

peft = pytest.importorskip("peft")


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(torch.tanh(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class TinyStack(nn.Module):
    """Two attention blocks with LLaMA's layer names and an output head."""

    def __init__(self, d: int = 16, vocab: int = 7) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Attention(d) for _ in range(2)])
        self.up_proj = nn.Linear(d, 3 * d)
        self.down_proj = nn.Linear(3 * d, d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        x = x + self.down_proj(torch.relu(self.up_proj(x)))
        return self.lm_head(x)


def base_model(seed: int = 0) -> TinyStack:
    torch.manual_seed(seed)
    return TinyStack()


def trained_like(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.lora_B.copy_(torch.randn(layer.lora.lora_B.shape, generator=gen) * 0.3)


CONFIGS = [
    LoRAConfig(r=4, lora_alpha=8),  # the default targets q_proj, v_proj
    LoRAConfig(r=2, lora_alpha=16, target_modules=["q_proj", "up_proj"], use_rslora=True),
    LoRAConfig(r=3, lora_alpha=6, target_modules=r"layers\.1\.(k|o)_proj"),
    LoRAConfig(r=2, lora_alpha=4, target_modules="all-linear"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["q_v", "rslora", "regex", "all_linear"])
def test_peft_loads_our_adapter_and_computes_the_same(config, tmp_path):
    ours = apply_lora(base_model(), config)
    trained_like(ours)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(x)
        plain = base_model()(x)
    assert not torch.allclose(want, plain)  # the adapter does change the output
    save_adapter(ours, tmp_path, config)

    peft_model = peft.PeftModel.from_pretrained(base_model(), str(tmp_path))
    peft_model.eval()
    with torch.no_grad():
        got = peft_model(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    loaded = peft_model.peft_config["default"]
    assert loaded.r == config.r and loaded.lora_alpha == config.lora_alpha
    assert loaded.use_rslora == config.use_rslora


def test_we_load_an_adapter_saved_by_peft(tmp_path):
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    peft_model = peft.get_peft_model(base_model(), peft_config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(tmp_path))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(x)

    ours = load_adapter(base_model(), tmp_path)
    assert sorted(name for name, _ in lora_layers(ours)) == [
        "down_proj", "layers.0.q_proj", "layers.1.q_proj",
    ]
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# adapter_config.json fields that change the computation are refused
# --------------------------------------------------------------------------------------------
# A value that is not peft.LoraConfig's default, for every field course_lib does not implement.
NOT_DEFAULT = {
    "use_dora": True, "fan_in_fan_out": True, "bias": "lora_only", "lora_bias": True,
    "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 2}, "modules_to_save": ["lm_head"],
    "layers_to_transform": [0], "layers_pattern": "layers", "layer_replication": [[0, 1]],
    "exclude_modules": ["layers.0.q_proj"], "target_parameters": ["weight"],
    "trainable_token_indices": [1, 2], "megatron_config": {"tensor_model_parallel_size": 2},
    "alora_invocation_tokens": [1, 2], "use_qalora": True, "velora_config": {"rank": 2},
    "monteclora_config": {"n": 2}, "use_bdlora": {"blocks": 2}, "arrow_config": {"top_k": 2},
    "kasa_config": {"r": 2}, "ensure_weight_tying": True,
}


def peft_saved_adapter(path, **fields):
    """A PEFT adapter of TinyStack saved in ``path``, then ``fields`` written into its config."""
    peft_model = peft.get_peft_model(
        base_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(path))
    config_file = path / adapters.ADAPTER_CONFIG_NAME
    data = json.loads(config_file.read_text())
    data.update(fields)
    config_file.write_text(json.dumps(data))
    return data


def test_every_peft_lora_field_is_classified():
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    known = set(adapters._UNSUPPORTED) | set(adapters._METADATA) | set(adapters._IMPLEMENTED)
    assert peft_fields - known == set()
    assert set(NOT_DEFAULT) == set(adapters._UNSUPPORTED)
    defaults = peft.LoraConfig()
    for name, allowed in adapters._UNSUPPORTED.items():
        if name in peft_fields:
            assert getattr(defaults, name) in allowed, name  # PEFT's default loads


def test_peft_adapter_with_alora_tokens_is_refused(tmp_path):
    peft_config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                   alora_invocation_tokens=[3, 4])
    peft.get_peft_model(base_model(), peft_config).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[3, 4\] is not supported"):
        load_adapter(base_model(), tmp_path)


@pytest.mark.parametrize("field", sorted(NOT_DEFAULT))
def test_adapter_with_an_unimplemented_field_is_refused(field, tmp_path):
    peft_saved_adapter(tmp_path, **{field: NOT_DEFAULT[field]})
    with pytest.raises(ValueError) as info:
        load_adapter(base_model(), tmp_path)
    message = str(info.value)
    assert f"{field}={NOT_DEFAULT[field]!r} is not supported by course_lib's LoRA" in message
    assert "allowed:" in message and "implements plain LoRA with r, lora_alpha" in message


def test_adapter_with_an_unknown_field_is_refused(tmp_path):
    peft_saved_adapter(tmp_path, lora_shuffle=True)
    with pytest.raises(ValueError, match=r"unknown adapter field lora_shuffle=True"):
        load_adapter(base_model(), tmp_path)


def test_adapter_with_default_and_metadata_fields_loads(tmp_path):
    data = peft_saved_adapter(tmp_path, init_lora_weights="gaussian", task_type="CAUSAL_LM",
                              revision="main")
    assert set(NOT_DEFAULT) <= set(data)  # PEFT writes every field at its default
    ours = load_adapter(base_model(), tmp_path)
    assert len(list(lora_layers(ours))) == 4
