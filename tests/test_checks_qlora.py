"""course_lib.checks.qlora: each check passes on the solution of notebook 03 and fails usefully on
the released stub and on typical mistakes. The solution and the stub are read from
solutions/03_qlora.ipynb itself (the stub through the release's own transformation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from notebook_fill_ins import run_fill_ins

import course_lib  # noqa: F401  (first: keeps bitsandbytes' hub-kernel warning off stderr)
from course_lib.checks.qlora import (
    check_bits_per_parameter,
    check_blockwise_absmax_scale,
    check_double_quantize,
    check_nearest_level,
    check_pack_nibbles,
    check_qlora_model,
)
from course_lib.model import nf4
from course_lib.model.lora import LoRAConfig, apply_lora
from course_lib.model.qlora import QLoRAModel, QuantizationConfig
from course_lib.model.tinygpt import TinyGPT, TinyGPTConfig

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / "03_qlora.ipynb"
FILL_INS = (
    "nb03_absmax_scale_impl",
    "nb03_nearest_level_impl",
    "nb03_pack_nibbles_impl",
    "nb03_double_quant_impl",
    "nb03_bits_per_param_impl",
    "nb03_qlora_model_impl",
)
SMALL = TinyGPTConfig(n_layer=1, n_head=2, d_model=64, d_ff=128)


def notebook_namespace(released: bool) -> dict:
    """Run the fill-in cells (solution or released stub) as the notebook would."""
    ns: dict = {
        "torch": torch,
        "nf4_codebook": nf4.nf4_codebook,
        "dynamic_map": nf4.dynamic_map,
        "QuantizationConfig": QuantizationConfig,
        "LoRAConfig": LoRAConfig,
        "QLoRAModel": QLoRAModel,
    }
    return run_fill_ins(NOTEBOOK, tuple(FILL_INS), ns, released)


@pytest.fixture(scope="module")
def solution():
    return notebook_namespace(released=False)


@pytest.fixture(scope="module")
def stub():
    return notebook_namespace(released=True)


def small_qlora(**qkw) -> QLoRAModel:
    torch.manual_seed(0)
    qcfg = QuantizationConfig(backend="torch", bnb_4bit_use_double_quant=True, **qkw)
    return QLoRAModel(TinyGPT(SMALL), qcfg, LoRAConfig(r=8)).prepare_for_training()


# ---------------------------------------------------------------------------------------------
# the solution passes, printing exactly the success line
# ---------------------------------------------------------------------------------------------


def test_solution_passes_every_check(solution, capsys):
    check_blockwise_absmax_scale(solution["blockwise_absmax_scale"])
    check_nearest_level(solution["nearest_level_code"])
    check_pack_nibbles(solution["pack_nibbles"])
    check_double_quantize(solution["double_quantize"])
    check_bits_per_parameter(solution["bits_per_parameter"])
    check_qlora_model(small_qlora())
    assert capsys.readouterr().out == (
        "CHECK nb03_absmax_scale: PASS\nCHECK nb03_nearest_level: PASS\n"
        "CHECK nb03_pack_nibbles: PASS\nCHECK nb03_double_quant: PASS\n"
        "CHECK nb03_bits_per_param: PASS\nCHECK nb03_qlora_model: PASS\n"
    )


def test_library_functions_pass_too(capsys):
    check_nearest_level(nf4.nearest_level)
    check_pack_nibbles(nf4.pack_nibbles)
    assert capsys.readouterr().out.count("PASS") == 2


def test_checks_do_not_change_the_global_random_state(solution):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    check_blockwise_absmax_scale(solution["blockwise_absmax_scale"])
    check_nearest_level(solution["nearest_level_code"])
    check_double_quantize(solution["double_quantize"])
    assert torch.equal(torch.rand(3), want)


# ---------------------------------------------------------------------------------------------
# the released stub fails with the "is not filled in yet" message
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "name", "grade_id", "what"),
    [
        (check_blockwise_absmax_scale, "blockwise_absmax_scale", "nb03_absmax_scale_impl",
         "blockwise_absmax_scale(w, blocksize)"),
        (check_nearest_level, "nearest_level_code", "nb03_nearest_level_impl",
         "nearest_level_code(scaled, codebook)"),
        (check_pack_nibbles, "pack_nibbles", "nb03_pack_nibbles_impl", "pack_nibbles(codes)"),
        (check_double_quantize, "double_quantize", "nb03_double_quant_impl",
         "double_quantize(absmax, blocksize)"),
        (check_bits_per_parameter, "bits_per_parameter", "nb03_bits_per_param_impl",
         "bits_per_parameter(blocksize, double_quant, dq_blocksize)"),
    ],
)
def test_stub_fails_with_not_implemented_message(stub, capsys, check, name, grade_id, what):
    with pytest.raises(AssertionError) as info:
        check(stub[name])
    message = str(info.value)
    assert f"{what} is not filled in yet" in message
    assert capsys.readouterr().out == ""


def test_qlora_model_stub_fails(stub, capsys):
    with pytest.raises(NotImplementedError, match="nb03_qlora_model_impl"):
        stub["build_qlora_model"](TinyGPT(SMALL))
    with pytest.raises(AssertionError, match="is None: did you forget the `return`"):
        check_qlora_model(None)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# typical mistakes
# ---------------------------------------------------------------------------------------------


def _per_row(w, blocksize):
    rows = w.reshape(w.shape[0], -1).float()
    absmax = rows.abs().amax(dim=1)
    return (rows / absmax[:, None]).reshape(-1, blocksize), absmax


def _signed_max(w, blocksize):
    blocks = w.reshape(-1, blocksize).float()
    absmax = blocks.amax(dim=1)
    return blocks / absmax[:, None], absmax


def _no_clamp(w, blocksize):
    blocks = w.reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1)
    return blocks / absmax[:, None], absmax


def _flat_scaled(w, blocksize):
    blocks = w.reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1)
    return (blocks / absmax.clamp(min=1e-38)[:, None]).reshape(-1), absmax


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (_per_row, "one absmax per row"),
        (_signed_max, "the maximum, not the absolute maximum"),
        (_no_clamp, "NaN or inf. An all-zero block"),
        (_flat_scaled, r"expected \(n_blocks, blocksize\)"),
        (lambda w, bs: None, "forget the `return`"),
        (lambda w, bs: w, r"should return a tuple \(scaled, absmax\)"),
    ],
)
def test_absmax_scale_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_blockwise_absmax_scale(fn)


def _searchsorted_levels(scaled, codebook):
    return torch.searchsorted(codebook, scaled.contiguous())


def _round_down(scaled, codebook):
    return (torch.searchsorted(codebook, scaled.contiguous(), right=True) - 1).clamp(min=0)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (_searchsorted_levels, "first level >= each value"),
        (_round_down, "rounded down to the level below"),
        (lambda s, c: c[torch.bucketize(s, (c[:-1] + c[1:]) / 2)], "return integer indices"),
        (lambda s, c: torch.bucketize(s, (c[:-1] + c[1:]) / 2).reshape(-1),
         "codes have shape"),
        (lambda s, c: torch.bucketize(s, (nf4.nf4_codebook()[:-1] + nf4.nf4_codebook()[1:]) / 2),
         "int4 codebook"),
    ],
)
def test_nearest_level_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_nearest_level(fn)


def test_nearest_level_accepts_argmin_of_distances(capsys):
    check_nearest_level(lambda s, c: (s.unsqueeze(-1) - c).abs().argmin(dim=-1))
    assert capsys.readouterr().out == "CHECK nb03_nearest_level: PASS\n"


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda c: (c.reshape(-1)[1::2].to(torch.uint8) << 4) | c.reshape(-1)[0::2].to(torch.uint8),
         "nibbles are swapped"),
        (lambda c: c.reshape(-1).to(torch.uint8), "two 4-bit codes share one byte"),
        (lambda c: (c.reshape(-1)[0::2] << 4) | c.reshape(-1)[1::2], "torch.uint8"),
        (lambda c: (c.reshape(-1)[0::2].to(torch.uint8) << 2) | c.reshape(-1)[1::2].to(torch.uint8),
         r"packed\[i\] = \(codes\[2i\] << 4\)"),
    ],
)
def test_pack_nibbles_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_pack_nibbles(fn)


def test_double_quant_mistakes(solution):
    scale = solution["blockwise_absmax_scale"]
    near = solution["nearest_level_code"]

    def no_centering(absmax, blocksize=256):
        scaled, absmax2 = scale(absmax, blocksize)
        return near(scaled, nf4.dynamic_map()).to(torch.uint8).reshape(absmax.shape), absmax.mean(), absmax2

    with pytest.raises(AssertionError, match="subtract the mean"):
        check_double_quantize(no_centering)

    def wrong_blocks(absmax, blocksize=256):
        return solution["double_quantize"](absmax, 64)

    with pytest.raises(AssertionError, match="one per block of"):
        check_double_quantize(wrong_blocks)

    def nf4_codes(absmax, blocksize=256):
        offset = absmax.mean()
        scaled, absmax2 = scale(absmax - offset, blocksize)
        return near(scaled, nf4.nf4_codebook()).to(torch.uint8).reshape(absmax.shape), offset, absmax2

    with pytest.raises(AssertionError, match="not the nearest level of the dynamic map"):
        check_double_quantize(nf4_codes)

    with pytest.raises(AssertionError, match="offset should be the mean"):
        check_double_quantize(lambda a, b=256: (a.to(torch.uint8), a.max(), a[:1]))


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda b, dq, d=256: (8 / b + 32 / (b * d)) if dq else 32 / b, "add the 4 bits"),
        (lambda b, dq, d=256: 4 + (8 / b if dq else 32 / b), "second-level constants are missing"),
        (lambda b, dq, d=256: 4 + 32 / b, "first-level constants take 8 bits"),
        (lambda b, dq, d=256: None, "forget the `return`"),
        (lambda b, dq, d=256: "4.5", "return a number"),
        (lambda b, dq, d=256: 4.5, "expected 4.1270"),
    ],
)
def test_bits_per_parameter_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_bits_per_parameter(fn)


def test_qlora_model_mistakes():
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="should be a QLoRAModel"):
        check_qlora_model(apply_lora(TinyGPT(SMALL)))
    with pytest.raises(AssertionError, match="double quantisation"):
        check_qlora_model(
            QLoRAModel(TinyGPT(SMALL), QuantizationConfig(backend="torch"), LoRAConfig(r=8))
        )
    with pytest.raises(AssertionError, match="rank r=8"):
        check_qlora_model(QLoRAModel(
            TinyGPT(SMALL), QuantizationConfig(backend="torch", bnb_4bit_use_double_quant=True),
            LoRAConfig(r=4),
        ))
    with pytest.raises(AssertionError, match="q_proj and v_proj only"):
        check_qlora_model(QLoRAModel(
            TinyGPT(SMALL), QuantizationConfig(backend="torch", bnb_4bit_use_double_quant=True),
            LoRAConfig(r=8, target_modules="all-linear"),
        ))
    with pytest.raises(AssertionError, match="not 4-bit"):
        check_qlora_model(QLoRAModel(
            TinyGPT(SMALL),
            QuantizationConfig(backend="torch", bnb_4bit_use_double_quant=True,
                               llm_int8_skip_modules=["lm_head", "k_proj"]),
            LoRAConfig(r=8),
        ))
    model = small_qlora()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="only LoRA parameters may be trainable"):
        check_qlora_model(model)
