"""Tests of course_lib.model.tinygpt: shapes, causality, names, checkpointing, weights I/O."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from course_lib.model import tinygpt
from course_lib.model.tinygpt import (
    MANIFEST_FILE,
    REGENERATE_COMMAND,
    WEIGHTS_FILE,
    ChecksumError,
    TinyGPT,
    TinyGPTConfig,
    causal_attention,
    lm_loss,
    load_pretrained,
    save_pretrained,
    sha256_file,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=11, block_size=12, n_layer=2, n_head=2, d_model=16, d_ff=32)


def tiny_model(seed: int = 0, **overrides) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(TinyGPTConfig(**{**TINY, **overrides}))


def test_forward_returns_logits_of_shape_b_t_vocab():
    model = tiny_model()
    idx = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(1))
    logits = model(idx)
    assert logits.shape == (3, 7, 11)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_layer_names_follow_llama_and_peft():
    model = tiny_model()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"blocks.{i}.attn.{proj}" in names
        for proj in ("up_proj", "down_proj"):
            assert f"blocks.{i}.mlp.{proj}" in names
    assert "lm_head" in names
    assert model.blocks[0].attn.q_proj.weight.shape == (16, 16)
    assert model.blocks[0].mlp.up_proj.weight.shape == (32, 16)
    assert model.blocks[0].mlp.down_proj.weight.shape == (16, 32)


def test_parameter_count_matches_the_architecture():
    model = tiny_model()
    d, f, v, t, L = 16, 32, 11, 12, 2
    per_block = 4 * d * d + 2 * d * f + 2 * d  # attention, MLP, two RMSNorm weights
    expected = v * d + t * d + L * per_block + d + d * v
    assert model.num_parameters() == expected
    model.lm_head.weight.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == expected - d * v


def test_future_tokens_do_not_change_past_logits():
    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 11, (2, 10), generator=gen)
    changed = idx.clone()
    changed[:, 6:] = torch.randint(0, 11, (2, 4), generator=gen)
    assert not torch.equal(idx[:, 6:], changed[:, 6:])
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])  # the later positions do see the change


def test_prefix_logits_equal_logits_of_the_truncated_sequence():
    model = tiny_model().eval()
    idx = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :5], model(idx[:, :5]), rtol=1e-5, atol=1e-6)


def test_causal_attention_matches_a_masked_softmax():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen) for _ in range(3))  # (B, nh, T, hs)
    scores = q @ k.transpose(-2, -1) / 2.0  # 1 / sqrt(hs)
    scores = scores.masked_fill(torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), float("-inf"))
    expected = scores.softmax(-1) @ v
    torch.testing.assert_close(causal_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)
    assert tinygpt.attention_implementation() == "auto"


def test_forward_rejects_bad_inputs_with_clear_messages():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size=12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.long"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="divisible by n_head"):
        TinyGPTConfig(d_model=10, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        TinyGPTConfig(n_layer=0)
    with pytest.raises(TypeError, match="TinyGPTConfig.d_model must be a positive int"):
        TinyGPTConfig(d_model=128.0)
    with pytest.raises(ValueError, match=r"TinyGPTConfig.dropout must be a number in \[0, 1\)"):
        TinyGPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="TinyGPTConfig.norm_eps must be a number > 0"):
        TinyGPTConfig(norm_eps=0.0)
    with pytest.raises(TypeError, match="TinyGPTConfig.gradient_checkpointing must be True"):
        TinyGPTConfig(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="unknown TinyGPTConfig field"):
        TinyGPTConfig.from_dict({"n_layers": 2})


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    idx = torch.randint(0, 11, (4, 10), generator=torch.Generator().manual_seed(5))
    targets = torch.roll(idx, -1, dims=1)
    grads = []
    for enable in (False, True):
        model = tiny_model(seed=6).train()
        if enable:
            model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing is enable
        loss = lm_loss(model(idx), targets)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_recomputes_blocks_in_backward():
    model = tiny_model().train()
    calls = []
    model.blocks[0].attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(7))
    model(idx).sum().backward()
    assert len(calls) == 1
    calls.clear()
    model.gradient_checkpointing_enable()
    model(idx).sum().backward()
    assert len(calls) == 2  # forward once, then again during backward
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_lm_loss_mean_sum_and_mask():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 5, generator=gen)
    targets = torch.randint(0, 5, (2, 3), generator=gen)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per_token = F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1), reduction="none")
    selected = per_token.view(2, 3)[mask]
    torch.testing.assert_close(lm_loss(logits, targets, mask), selected.mean())
    torch.testing.assert_close(lm_loss(logits, targets, mask, reduction="sum"), selected.sum())
    torch.testing.assert_close(lm_loss(logits, targets), per_token.mean())
    with pytest.raises(ValueError, match="reduction"):
        lm_loss(logits, targets, reduction="max")
    with pytest.raises(ValueError, match="no token"):
        lm_loss(logits, targets, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have the shape"):
        lm_loss(logits, targets, torch.ones(3, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Weights I/O (always on copies under tmp_path; the shipped asset is never modified)
# ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(seed=9)
    manifest = save_pretrained(model, tmp_path / "m.safetensors", extra={"note": "test"})
    assert manifest["sha256"] == sha256_file(tmp_path / "m.safetensors")
    assert json.loads((tmp_path / "m.json").read_text())["note"] == "test"
    loaded = load_pretrained(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    for (n0, p0), (n1, p1) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n0 == n1
        assert torch.equal(p0, p1)


def test_saving_the_same_weights_twice_gives_identical_bytes(tmp_path):
    save_pretrained(tiny_model(seed=10), tmp_path / "a.safetensors")
    save_pretrained(tiny_model(seed=10), tmp_path / "b.safetensors")
    assert sha256_file(tmp_path / "a.safetensors") == sha256_file(tmp_path / "b.safetensors")


def test_corrupted_weights_raise_a_checksum_error_naming_file_and_command(tmp_path):
    save_pretrained(tiny_model(seed=11), tmp_path / "m.safetensors")
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last tensor's data
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        load_pretrained(tmp_path / "m.safetensors")
    message = str(info.value)
    assert "m.safetensors" in message and REGENERATE_COMMAND in message
    load_pretrained(tmp_path / "m.safetensors", verify=False)  # the bytes still parse


def test_missing_weights_or_manifest_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors.*course_lib\.pretrain"):
        load_pretrained(tmp_path / "nothing.safetensors")
    save_pretrained(tiny_model(), tmp_path / "m.safetensors")
    (tmp_path / "m.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest not found.*m\.json"):
        load_pretrained(tmp_path / "m.safetensors")


@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason="pretrained asset not generated yet")
def test_shipped_asset_loads_and_a_corrupted_copy_is_rejected(tmp_path):
    model = load_pretrained()
    assert isinstance(model, TinyGPT) and not model.training
    assert WEIGHTS_FILE.stat().st_size < 5 * 2**20  # "a few MB at most"
    manifest = json.loads(MANIFEST_FILE.read_text())
    assert manifest["sha256"] == sha256_file(WEIGHTS_FILE)
    copy = tmp_path / WEIGHTS_FILE.name
    shutil.copy(WEIGHTS_FILE, copy)
    shutil.copy(MANIFEST_FILE, tmp_path / MANIFEST_FILE.name)
    load_pretrained(copy)  # an intact copy verifies
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=WEIGHTS_FILE.name):
        load_pretrained(copy)


def test_default_config_matches_the_course_tokenizer():
    from course_lib.data import TOKENIZER

    assert TinyGPTConfig().vocab_size == TOKENIZER.vocab_size


def test_pretrain_command_is_reproducible_and_reports_seed_steps_time(tmp_path, capsys):
    from course_lib import pretrain

    argv = ["--steps", "3", "--batch-size", "8", "--eval-examples", "8", "--no-progress"]
    first = pretrain.pretrain(
        pretrain.parse_args([*argv, "--out", str(tmp_path / "a.safetensors")])
    )
    out = capsys.readouterr().out
    assert "seed=0" in out and "steps=3" in out and "done in" in out and " s:" in out
    second = pretrain.pretrain(
        pretrain.parse_args([*argv, "--out", str(tmp_path / "b.safetensors")])
    )
    assert first["sha256"] == second["sha256"]  # byte-identical weights
    assert first["pretraining"]["seed"] == 0 and first["pretraining"]["steps"] == 3
    model = load_pretrained(tmp_path / "a.safetensors")
    assert model.config == TinyGPTConfig()
    third = pretrain.pretrain(
        pretrain.parse_args([*argv, "--seed", "1", "--out", str(tmp_path / "c.safetensors")])
    )
    assert third["sha256"] != first["sha256"]
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--steps", "0"])


def test_attention_goes_through_flash_attention_forward_and_its_backends(monkeypatch):
    from course_lib.utils import flash_attention as fa

    model = tiny_model(seed=12).eval()
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(13))
    assert tinygpt.flash_attention_forward is fa.flash_attention_forward  # imported plainly
    calls = []
    real = fa.naive_attention
    monkeypatch.setattr(fa, "naive_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        default = model(idx)
        assert calls == []  # SDPA by default
        with fa.attention_backend("naive"):
            assert tinygpt.attention_implementation() == "naive"
            naive = model(idx)
    assert len(calls) == model.config.n_layer  # one attention call per block
    torch.testing.assert_close(naive, default, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_with_a_frozen_base_and_lora():
    from course_lib.model.lora import LoRAConfig, apply_lora

    idx = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(14))
    targets = torch.roll(idx, -1, dims=1)
    results = []
    for enable in (False, True):
        model = tiny_model(seed=15)
        torch.manual_seed(16)
        apply_lora(model, LoRAConfig(r=2, lora_alpha=4))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.fill_(0.01)
        model.train()
        if enable:
            model.gradient_checkpointing_enable()
        lm_loss(model(idx), targets).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys() and len(results[0]) == 8  # 2 layers x q, v x A, B
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-7)
