"""Tests of course_lib.train: gradient accumulation, generation, exact match, the loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib.data import TOKENIZER, Example, make_batch, make_split
from course_lib.model.tinygpt import TinyGPT, TinyGPTConfig, lm_loss
from course_lib.train import (
    TrainConfig,
    accumulate_gradients,
    count_parameters,
    exact_match,
    greedy_generate,
    predict,
    progress_disabled,
    split_batch,
    train,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(
    vocab_size=TOKENIZER.vocab_size, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64
)


def tiny_model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(TinyGPTConfig(**TINY))


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------------------
# Gradient accumulation (pitfall 5)
# ---------------------------------------------------------------------------------------------

# Answers of different lengths, so micro-batches hold different numbers of answer tokens: the
# case where averaging each micro-batch's mean loss would give the wrong gradient.
UNEVEN = [
    Example("1+1=", "2"),
    Example("12+30=", "42"),
    Example("5+5=", "10"),
    Example("99+1=", "100"),
    Example("7+0=", "7"),
    Example("250+250=", "500"),
    Example("8+8=", "16"),
    Example("999+999=", "1998"),
]


@pytest.mark.parametrize("n_micro", [2, 4, 8])
def test_accumulated_gradient_equals_the_large_batch_gradient(n_micro):
    batch = make_batch(UNEVEN)
    model = tiny_model(seed=1)
    full_loss = accumulate_gradients(model, [batch])
    full = grads(model)
    model.zero_grad()
    micro = split_batch(batch, n_micro)
    assert len({mb.n_tokens for mb in micro}) > 1  # uneven token counts across micro-batches
    acc_loss = accumulate_gradients(model, micro)
    assert acc_loss == pytest.approx(full_loss, rel=1e-6)
    for g_full, g_acc in zip(full, grads(model)):
        torch.testing.assert_close(g_acc, g_full, rtol=1e-5, atol=1e-7)
    # and the big-batch gradient is the gradient of the mean loss over all answer tokens
    model.zero_grad()
    lm_loss(model(batch.inputs), batch.targets, batch.mask).backward()
    for g_full, g_ref in zip(full, grads(model)):
        torch.testing.assert_close(g_full, g_ref, rtol=1e-5, atol=1e-7)


def test_averaging_micro_batch_means_would_be_wrong():
    """The pitfall the correct normalisation avoids: mean of means != mean over tokens."""
    batch = make_batch(UNEVEN)
    model = tiny_model(seed=2)
    accumulate_gradients(model, [batch])
    full = grads(model)
    model.zero_grad()
    micro = split_batch(batch, 4)
    for mb in micro:
        (lm_loss(model(mb.inputs), mb.targets, mb.mask) / len(micro)).backward()
    naive = grads(model)
    assert max((a - b).abs().max().item() for a, b in zip(full, naive)) > 1e-4


def test_train_step_with_accumulation_matches_a_single_large_step():
    batch = make_batch(UNEVEN)
    models = [tiny_model(seed=3), tiny_model(seed=3)]
    for model, n_micro in zip(models, (1, 4)):
        # SGD is linear in the gradient, so equal gradients give equal parameters (AdamW would
        # amplify rounding noise of near-zero gradients through g / sqrt(v)).
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            train_step(model, opt, batch, grad_accum_steps=n_micro, grad_clip=1.0)
    for p1, p4 in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p1, p4, rtol=1e-5, atol=1e-6)


def test_split_batch_validates_its_argument():
    batch = make_batch(UNEVEN)
    assert [len(mb) for mb in split_batch(batch, 4)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="dividing the batch size 8"):
        split_batch(batch, 3)
    with pytest.raises(ValueError, match="n must be a positive int"):
        split_batch(batch, 0)
    with pytest.raises(TypeError, match="n must be a positive int"):
        split_batch(batch, 2.0)
    with pytest.raises(ValueError, match="micro_batches must not be empty"):
        accumulate_gradients(tiny_model(), [])


# ---------------------------------------------------------------------------------------------
# Generation and exact match on a hand-made model
# ---------------------------------------------------------------------------------------------


class LookupModel(nn.Module):
    """Predicts the next token from the current one through a fixed table (no learning)."""

    def __init__(self, table: dict[str, str]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        nxt = torch.full((TOKENIZER.vocab_size,), TOKENIZER.eos_id)
        for cur, new in table.items():
            nxt[TOKENIZER.stoi[cur]] = TOKENIZER.eos_id if new == "<eos>" else TOKENIZER.stoi[new]
        self.register_buffer("next_token", nxt)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.one_hot(self.next_token[idx], TOKENIZER.vocab_size).float()
        return logits * self.scale  # (B, T, V)


def test_greedy_generation_follows_the_arg_max_and_stops_at_eos():
    model = LookupModel({"=": "4", "4": "2", "2": "<eos>", "+": "7", "7": "7"})
    prompts = torch.tensor([TOKENIZER.encode("1+1="), TOKENIZER.encode("1+1+")])
    new = greedy_generate(model, prompts, max_new_tokens=5, eos_id=TOKENIZER.eos_id)
    assert new.shape == (2, 5)
    assert TOKENIZER.decode(new[0]) == "42"
    assert new[0, 2:].tolist() == [TOKENIZER.eos_id] * 3  # finished rows stay at <eos>
    assert TOKENIZER.decode(new[1]) == "77777"  # never emits <eos>: runs to max_new_tokens


def test_exact_match_on_a_hand_made_case():
    model = LookupModel({"=": "4", "4": "2", "2": "<eos>", "-": "9", "9": "<eos>"})
    examples = [
        Example("1+1=", "42"),  # correct
        Example("20+22=", "42"),  # correct, prompt of another length
        Example("3+3=", "6"),  # wrong answer
        Example("2+2=", "4"),  # prefix of the prediction "42": not an exact match
        Example("5-4-", "9"),  # correct
    ]
    assert predict(model, [e.prompt for e in examples], 4) == ["42", "42", "42", "42", "9"]
    assert exact_match(model, examples) == pytest.approx(3 / 5)
    assert exact_match(model, examples, batch_size=2) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="must not be empty"):
        exact_match(model, [])


def test_predict_restores_the_training_mode():
    model = tiny_model().train()
    predict(model, ["1+2="], 3)
    assert model.training
    model.eval()
    predict(model, ["1+2="], 3)
    assert not model.training


def test_a_model_returning_an_object_with_logits_works():
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return type("Output", (), {"logits": self.inner(idx)})()

    model = LookupModel({"=": "5", "5": "<eos>"})
    assert exact_match(Wrapped(model), [Example("2+3=", "5")]) == 1.0


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def test_training_reduces_the_loss_and_only_updates_trainable_parameters():
    train_set, val_set = make_split("addition", 256, 32, seed=0)
    model = tiny_model(seed=4)
    model.tok_emb.weight.requires_grad_(False)
    frozen_before = model.tok_emb.weight.clone()
    config = TrainConfig(steps=40, batch_size=32, lr=3e-3, eval_every=20, seed=0)
    history = train(model, train_set, config, val_examples=val_set, progress=False)
    assert len(history.losses) == 40 and history.steps[-1] == 40
    assert sum(history.losses[-5:]) / 5 < 0.7 * sum(history.losses[:5]) / 5
    assert history.eval_steps == [20, 40]
    assert all(0.0 <= a <= 1.0 for a in history.val_accuracy)
    assert history.trainable_params == count_parameters(model, trainable_only=True) == model.num_parameters(True)
    assert history.total_params - history.trainable_params == model.tok_emb.weight.numel()
    assert torch.equal(model.tok_emb.weight, frozen_before)
    assert history.train_seconds > 0
    assert not model.training


def test_training_is_deterministic_for_a_fixed_seed():
    train_set, _ = make_split("addition", 64, 0, seed=0)
    config = TrainConfig(steps=5, batch_size=16, lr=1e-3, grad_accum_steps=2)
    runs = [train(tiny_model(seed=5), train_set, config, progress=False).losses for _ in range(2)]
    assert runs[0] == runs[1]


def test_train_needs_trainable_parameters():
    model = tiny_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, make_split("addition", 16, 0)[0], TrainConfig(steps=1, batch_size=8))


def test_train_config_validates_and_schedules():
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(batch_size=10, grad_accum_steps=3)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    bad = [
        ({"steps": 10.0}, TypeError, "TrainConfig.steps must be a positive int"),
        ({"warmup_steps": -1}, ValueError, "TrainConfig.warmup_steps must be a non-negative int"),
        ({"lr": 0}, ValueError, "TrainConfig.lr must be a number > 0"),
        ({"lr": "1e-3"}, TypeError, "TrainConfig.lr must be a number > 0"),
        ({"weight_decay": -0.1}, ValueError, "TrainConfig.weight_decay must be a number >= 0"),
        ({"min_lr_ratio": 2.0}, ValueError, r"min_lr_ratio must be a number in \[0, 1\]"),
        ({"grad_clip": 0.0}, ValueError, r"TrainConfig.grad_clip must be a number > 0 \(or None\)"),
        ({"eval_examples": 0}, ValueError, "TrainConfig.eval_examples must be a positive int"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            TrainConfig(**kwargs)
    assert TrainConfig(grad_clip=None, eval_examples=None).grad_clip is None
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(99) == pytest.approx(0.1, abs=1e-3)
    assert TrainConfig(lr=0.5).lr_at(50) == 0.5


def test_progress_bar_is_silent_when_tqdm_disable_is_set(monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_disabled(True)
    train_set, _ = make_split("addition", 16, 0)
    train(tiny_model(), train_set, TrainConfig(steps=2, batch_size=8))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not progress_disabled(True)
    assert progress_disabled(False)
    train(tiny_model(), train_set, TrainConfig(steps=2, batch_size=8), desc="bar-test")
    assert "bar-test" in capsys.readouterr().err


def test_a_custom_step_function_replaces_train_step():
    train_set, _ = make_split("addition", 64, 0, seed=1)
    config = TrainConfig(steps=4, batch_size=16, grad_accum_steps=2, grad_clip=0.5)
    calls = []

    def my_step(model, optimizer, batch, grad_accum_steps, grad_clip):
        calls.append((len(batch), grad_accum_steps, grad_clip))
        return train_step(model, optimizer, batch, grad_accum_steps, grad_clip)

    custom = train(tiny_model(seed=6), train_set, config, progress=False, step_fn=my_step)
    plain = train(tiny_model(seed=6), train_set, config, progress=False)
    assert calls == [(16, 2, 0.5)] * 4
    assert custom.losses == plain.losses
