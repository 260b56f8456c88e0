"""The notebooks' claims (course_lib.claims) fail on broken implementations.

A correct implementation passing them is what the solution notebooks show under nbval (on this
machine's kernels and, with `make test-portable`, on two others). Here each claim is fed the
results of a broken implementation trained with the notebook's own recipe, and must not hold:
a claim that a broken LoRA or QLoRA also passes would prove nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from course_lib.claims import (
    Claim,
    Claims,
    accumulation_claims,
    budget_claims,
    finetuning_claims,
    merge_claims,
    optimizer_8bit_claims,
    qlora_claims,
    quantised_base_claims,
    rank_sweep_claims,
)
from course_lib.data import ADAPT_TASK, PRETRAIN_TASK, make_batch, make_split
from course_lib.model.lora import LoRAConfig, apply_lora, lora_layers, merge_lora
from course_lib.model.qlora import NF4Linear, QLoRAModel, QuantizationConfig
from course_lib.model.tinygpt import WEIGHTS_FILE, lm_loss, load_pretrained
from course_lib.train import TrainConfig, exact_match, split_batch, train

SOLUTIONS = Path(__file__).resolve().parents[1] / "solutions"
QV = ["q_proj", "v_proj"]

needs_weights = pytest.mark.skipif(
    not WEIGHTS_FILE.is_file(), reason="run `python -m course_lib.pretrain`"
)


def _notebook_source(name: str) -> str:
    cells = json.loads((SOLUTIONS / name).read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


# --------------------------------------------------------------------------------------------
# The claim objects and their arguments
# --------------------------------------------------------------------------------------------


def test_claims_print_one_line_each_and_hold_only_together():
    claims = Claims((Claim("first", True), Claim("second", False)))
    assert str(claims) == "first: True\nsecond: False"
    assert not claims.holds
    assert claims.failed() == ["second"]
    assert Claims((Claim("only", True),)).holds


def test_a_correct_looking_result_passes_and_prints_true():
    claims = finetuning_claims(0.156, 1.0, 0.973, 16_384, 793_472)
    assert claims.holds
    assert str(claims).splitlines() == [
        "full fine-tuning lifts the accuracy from under 30% to at least 95%: True",
        "LoRA r=8 on q, v reaches at least 95% of full fine-tuning's accuracy with under 5% "
        "of its trainable parameters: True",
    ]


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: finetuning_claims(15.6, 1.0, 0.97, 1, 2), ValueError, "base_accuracy"),
        (lambda: finetuning_claims("0.2", 1.0, 0.97, 1, 2), TypeError, "base_accuracy"),
        (lambda: finetuning_claims(0.2, 1.0, 0.97, 0, 2), ValueError, "lora_params"),
        (lambda: rank_sweep_claims({1: 0.7, 8: 0.97}, 1.0), ValueError, r"missing \[64\]"),
        (lambda: rank_sweep_claims([0.7, 0.97], 1.0), TypeError, "accuracy_by_rank"),
        (lambda: merge_claims(0.9, 0.9, 0), ValueError, "n_examples"),
        (lambda: quantised_base_claims(1.0, {}), TypeError, "quantised"),
        (lambda: accumulation_claims([], [1.0]), TypeError, "plain_losses"),
        (lambda: optimizer_8bit_claims([1.0, -0.5], [1.0, 0.5]), ValueError, r"fp32_losses\[1\]"),
    ],
)
def test_bad_arguments_name_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()


# --------------------------------------------------------------------------------------------
# Notebook 02: the recipe the notebook trains with
# --------------------------------------------------------------------------------------------

RECIPE_02 = (
    "STEPS, BATCH, ACCUM = 60, 64, 2",
    "FULL_LR, LORA_LR = 1e-3, 1e-2",
    'warmup_steps=10, schedule="cosine", grad_clip=1.0, seed=0)',
    "make_split(ADAPT_TASK, n_train=2048, n_val=512, seed=0)",
    "LoRAConfig(r=r, lora_alpha=2 * r, target_modules=target_modules)",
)


def _config_02(lr: float) -> TrainConfig:
    return TrainConfig(steps=60, batch_size=64, grad_accum_steps=2, lr=lr, warmup_steps=10,
                       schedule="cosine", grad_clip=1.0, seed=0)


@pytest.fixture(scope="module")
def data_02():
    return make_split(ADAPT_TASK, n_train=2048, n_val=512, seed=0)


def _freeze_B(model):
    for _, layer in lora_layers(model):
        layer.lora.lora_B.requires_grad_(False)  # the bug: B never trains, so B A stays 0


def _invert_scaling(model):
    for _, layer in lora_layers(model):
        layer.lora.scaling = layer.lora.r / layer.lora.lora_alpha  # r / alpha instead of alpha / r


def _finetune(data, r=None, broken=None):
    """Notebook 02's fine-tuning (full when r is None), optionally with a broken LoRA."""
    train_set, val_set = data
    torch.manual_seed(0)
    model = load_pretrained()
    if r is None:
        model.requires_grad_(True)
        lr = 1e-3
    else:
        apply_lora(model, LoRAConfig(r=r, lora_alpha=2 * r, target_modules=QV))
        if broken is not None:
            broken(model)
        lr = 1e-2
    history = train(model, train_set, _config_02(lr), val_examples=val_set, progress=False)
    return model, history


@pytest.fixture(scope="module")
def full_02(data_02, one_thread):
    return _finetune(data_02)[1]


@pytest.fixture(scope="module")
def inverted_sweep(data_02, one_thread):
    """LoRA whose scaling is r / alpha (4x too small at alpha = 2r), at the claims' ranks."""
    return {r: _finetune(data_02, r, broken=_invert_scaling) for r in (1, 8, 64)}


@needs_weights
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
class TestNotebook02:
    def test_lora_with_frozen_B_fails_the_finetuning_and_budget_claims(self, data_02, full_02):
        _, hist = _finetune(data_02, 8, broken=_freeze_B)
        base = exact_match(load_pretrained(), data_02[1])
        claims = finetuning_claims(base, full_02.final_accuracy, hist.final_accuracy,
                                   hist.trainable_params, full_02.trainable_params)
        assert claims.failed() == [claims.items[1].statement], str(claims)
        # With B frozen at zero the update B A stays zero whatever A, r or the targets are: the
        # model is exactly the pretrained one (so the budget runs need not be trained again).
        assert hist.final_accuracy == base
        assert not budget_claims(base, base, full_02.final_accuracy).holds

    def test_lora_with_inverted_scaling_fails_the_finetuning_claim(
        self, data_02, full_02, inverted_sweep
    ):
        hist = inverted_sweep[8][1]
        base = exact_match(load_pretrained(), data_02[1])
        claims = finetuning_claims(base, full_02.final_accuracy, hist.final_accuracy,
                                   hist.trainable_params, full_02.trainable_params)
        assert not claims.holds, str(claims)

    def test_training_the_base_too_fails_on_the_parameter_share(self, full_02):
        # an apply_lora that forgets to freeze the base trains everything: accuracy is no help
        claims = finetuning_claims(0.156, full_02.final_accuracy, full_02.final_accuracy,
                                   full_02.trainable_params, full_02.trainable_params)
        assert not claims.holds

    def test_inverted_scaling_fails_the_rank_sweep_claims(self, full_02, inverted_sweep):
        accuracy = {r: hist.final_accuracy for r, (_, hist) in inverted_sweep.items()}
        claims = rank_sweep_claims(accuracy, full_02.final_accuracy)
        assert not claims.holds, str(claims)

    def test_a_sweep_whose_rank_does_nothing_fails(self, full_02, inverted_sweep):
        # LoRA that ignores r (e.g. always builds rank-1 factors): every rank scores like r=1
        r1 = inverted_sweep[1][1].final_accuracy
        claims = rank_sweep_claims({1: r1, 8: r1, 64: r1}, full_02.final_accuracy)
        assert not claims.holds

    def test_a_merge_that_keeps_the_branch_fails_the_merge_claim(self, data_02, inverted_sweep):
        model, hist = inverted_sweep[8]
        val_set = data_02[1]
        before = exact_match(model, val_set)
        assert before == hist.final_accuracy
        state = {k: v.clone() for k, v in model.state_dict().items()}
        # the bug: W0 += scaling B A, but the flag is not set, so the branch still adds it too
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.base_layer.weight += layer.lora.delta_weight()
        assert not merge_claims(before, exact_match(model, val_set), len(val_set)).holds
        model.load_state_dict(state)
        merge_lora(model)  # the real merge passes
        assert merge_claims(before, exact_match(model, val_set), len(val_set)).holds


# --------------------------------------------------------------------------------------------
# Notebook 03: a QLoRA whose dequantisation is broken
# --------------------------------------------------------------------------------------------

RECIPE_03 = (
    "EX3_TRAIN, EX3_VAL = make_split(ADAPT_TASK, n_train=2048, n_val=256, seed=0)",
    'EX3_CONFIG = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, '
    'schedule="cosine", seed=0)',
    'adapters = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])',
    "bnb_4bit_use_double_quant=True",
)


def _swap_nibbles(dequantize):
    def broken(self, dtype=None):  # codes 2i and 2i+1 unpacked in the wrong order
        w = dequantize(self, dtype)
        return w.reshape(-1, 2).flip(1).reshape(w.shape)

    return broken


def _qlora():
    config = QuantizationConfig(bnb_4bit_use_double_quant=True, backend="torch")
    lora = LoRAConfig(r=8, lora_alpha=16, target_modules=QV)
    return QLoRAModel(load_pretrained(), config, lora).prepare_for_training()


@needs_weights
@pytest.mark.usefixtures("one_thread")
class TestNotebook03:
    def test_broken_dequantisation_fails_the_quantised_base_claim(self, monkeypatch):
        addition = make_split(PRETRAIN_TASK, 0, 512)[1]
        fp32 = exact_match(load_pretrained(), addition)
        correct = exact_match(_qlora(), addition)
        assert quantised_base_claims(fp32, {"NF4 + DQ": correct}).holds
        monkeypatch.setattr(NF4Linear, "dequantize", _swap_nibbles(NF4Linear.dequantize))
        broken = exact_match(_qlora(), addition)
        assert not quantised_base_claims(fp32, {"NF4 + DQ": broken}).holds

    @pytest.mark.slow
    def test_broken_dequantisation_fails_the_exercise_3_claims(self, monkeypatch):
        train_set, val_set = make_split(ADAPT_TASK, n_train=2048, n_val=256, seed=0)
        config = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10,
                             schedule="cosine", seed=0)
        base = exact_match(load_pretrained(), val_set)
        torch.manual_seed(0)
        lora = apply_lora(load_pretrained(), LoRAConfig(r=8, lora_alpha=16, target_modules=QV))
        lora_hist = train(lora, train_set, config, val_set, progress=False)
        monkeypatch.setattr(NF4Linear, "dequantize", _swap_nibbles(NF4Linear.dequantize))
        torch.manual_seed(0)
        qlora = _qlora()
        qlora_hist = train(qlora, train_set, config, val_set, progress=False)
        claims = qlora_claims(base, lora_hist.final_accuracy, qlora_hist.final_accuracy,
                              3_239_424, qlora.memory_footprint().total)
        assert not claims.holds, str(claims)


# --------------------------------------------------------------------------------------------
# Notebook 05: gradient accumulation and the 8-bit optimiser
# --------------------------------------------------------------------------------------------


RECIPE_05 = (
    "TrainConfig(steps=5, batch_size=32, grad_accum_steps=accum, lr=1e-3, seed=0)",
    "make_split(ADAPT_TASK, n_train=1024, n_val=256, seed=0)",
    "opt = optimizer(m.parameters(), lr=1e-3)",
    "for i in range(12):",
)


@pytest.mark.parametrize(
    "notebook, recipe",
    [("02_lora_finetuning.ipynb", RECIPE_02), ("03_qlora.ipynb", RECIPE_03),
     ("05_memory_compute_tradeoffs.ipynb", RECIPE_05)],
)
def test_the_runs_here_follow_the_notebooks_recipes(notebook, recipe):
    """The broken runs below train as the notebook does, or they would test another claim."""
    source = _notebook_source(notebook)
    missing = [line for line in recipe if line not in source]
    assert not missing, f"{notebook} no longer trains with {missing}: update this test's recipe"


def _lora_05():
    torch.manual_seed(0)
    model = load_pretrained()
    model.requires_grad_(False)
    return apply_lora(model, LoRAConfig(r=8, lora_alpha=16, target_modules=QV))


def _accumulation_run(step_fn=None, accum=4):
    train_set = make_split(ADAPT_TASK, n_train=1024, n_val=256, seed=0)[0]
    config = TrainConfig(steps=5, batch_size=32, grad_accum_steps=accum, lr=1e-3, seed=0)
    return train(_lora_05(), train_set, config, progress=False, step_fn=step_fn).losses


def _zeroes_every_micro_batch(model, optimizer, batch, grad_accum_steps=1, grad_clip=None):
    total = 0.0
    for micro in split_batch(batch, grad_accum_steps):
        optimizer.zero_grad(set_to_none=True)  # the bug: only the last micro-batch is kept
        loss = lm_loss(model(micro.inputs), micro.targets, micro.mask, reduction="sum")
        loss = loss / batch.n_tokens
        loss.backward()
        total += loss.item()
    optimizer.step()
    return total


def _sums_micro_batch_means(model, optimizer, batch, grad_accum_steps=1, grad_clip=None):
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in split_batch(batch, grad_accum_steps):
        loss = lm_loss(model(micro.inputs), micro.targets, micro.mask)  # the bug: not / n
        loss.backward()
        total += loss.item()
    optimizer.step()
    return total


@needs_weights
@pytest.mark.usefixtures("one_thread")
class TestNotebook05:
    @pytest.mark.parametrize("broken", [_zeroes_every_micro_batch, _sums_micro_batch_means])
    def test_broken_accumulation_fails(self, broken):
        plain = _accumulation_run(accum=1)
        assert accumulation_claims(plain, _accumulation_run(accum=4)).holds
        assert not accumulation_claims(plain, _accumulation_run(broken)).holds

    @staticmethod
    def _short_run(make_optimizer):
        """Notebook 05's 12 full fine-tuning steps on consecutive batches of 32."""
        train_set = make_split(ADAPT_TASK, n_train=1024, n_val=256, seed=0)[0]
        torch.manual_seed(0)
        model = load_pretrained().train()
        model.requires_grad_(True)
        optimizer = make_optimizer(model.parameters())
        losses = []
        for i in range(12):
            batch = make_batch(train_set[32 * i: 32 * i + 32])
            optimizer.zero_grad(set_to_none=True)
            loss = lm_loss(model(batch.inputs), batch.targets, batch.mask)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    @pytest.mark.parametrize(
        "broken",
        [
            lambda params: torch.optim.AdamW(params, lr=0.0),  # state lost: no update at all
            lambda params: torch.optim.SGD(params, lr=1e-3),  # no Adam normalisation
        ],
        ids=["no-update", "sgd"],
    )
    def test_a_broken_optimiser_fails_the_8bit_claims(self, broken):
        fp32 = self._short_run(lambda params: torch.optim.AdamW(params, lr=1e-3))
        assert not optimizer_8bit_claims(fp32, self._short_run(broken)).holds
