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

bnbF = pytest.importorskip("bitsandbytes.functional")  # after course_lib (its warning filter)

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


OWN_WORK = "the check runs your own implementation: write it instead of calling"


@pytest.mark.parametrize(
    ("check", "fn", "name"),
    [
        (check_blockwise_absmax_scale,
         lambda w, bs: (w.reshape(-1, bs).float(), nf4.blockwise_absmax(w.reshape(-1), bs)),
         "course_lib.model.nf4.blockwise_absmax"),
        (check_nearest_level, nf4.nearest_level, "course_lib.model.nf4.nearest_level"),
        (check_nearest_level, lambda s, c: nf4.nearest_level(s, c),
         "course_lib.model.nf4.nearest_level"),
        (check_pack_nibbles, nf4.pack_nibbles, "course_lib.model.nf4.pack_nibbles"),
        (check_pack_nibbles,
         lambda c: bnbF.quantize_4bit(torch.zeros(64), blocksize=64)[0].reshape(-1),
         "bitsandbytes.functional.quantize_4bit"),
        (check_double_quantize,
         lambda a, bs=256: nf4.quantize_blockwise_8bit(a - a.mean(), nf4.dynamic_map(), bs),
         "course_lib.model.nf4.quantize_blockwise_8bit"),
        (check_bits_per_parameter,
         lambda b, dq, d=256: nf4.storage_bits_per_parameter(
             *reversed(nf4.quantize_nf4(torch.ones(64, 64), b, dq))),
         "course_lib.model.nf4.quantize_nf4"),
    ],
)
def test_the_library_answers_are_refused(check, fn, name, capsys):
    with pytest.raises(AssertionError, match=OWN_WORK) as info:
        check(fn)
    assert name in str(info.value)
    assert capsys.readouterr().out == ""
    # the guard is lifted afterwards: the library works again
    assert nf4.nearest_level(torch.tensor([0.0]), nf4.nf4_codebook()).item() == 7


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
    with pytest.raises(AssertionError) as info:
        check_qlora_model(stub["build_qlora_model"], lambda: TinyGPT(SMALL))
    assert ("build_qlora_model(base) is not filled in yet: fill in build_qlora_model above, then "
            "run this cell again.") in str(info.value)
    with pytest.raises(AssertionError, match="is None: did you forget the `return`"):
        check_qlora_model(None)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# typical mistakes, each named (the notebook variants of VARIANTS run in test_check_variants.py)
# ---------------------------------------------------------------------------------------------


def _blocks(w, bs):
    return w.reshape(-1, bs).float()


def _scaled(blocks, absmax):
    return blocks / absmax.clamp(min=1e-38)[:, None]


def _per_row(w, bs):
    rows = w.reshape(w.shape[0], -1).float()
    absmax = rows.abs().amax(dim=1)
    return _scaled(rows, absmax).reshape(-1, bs), absmax


def _hard_coded(w, bs):
    b = _blocks(w, 64)
    return _scaled(b, b.abs().amax(dim=1)), b.abs().amax(dim=1)


def _in_place(w, bs):
    b = w.reshape(-1, bs).float()
    absmax = b.abs().amax(dim=1)
    b /= absmax.clamp(min=1e-38)[:, None]
    return b, absmax


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (_per_row, "one absmax per row"),
        (lambda w, bs: (_scaled(_blocks(w, bs), _blocks(w, bs).amax(1)), _blocks(w, bs).amax(1)),
         "the maximum, not the absolute maximum"),
        (lambda w, bs: (_blocks(w, bs), _blocks(w, bs).abs().amax(0)), "over the wrong dim"),
        (_hard_coded, "not a hard-coded 64"),
        (lambda w, bs: (_blocks(w, bs) / _blocks(w, bs).abs().amax(1)[:, None],
                        _blocks(w, bs).abs().amax(1)), "all-zero block"),
        (lambda w, bs: (_blocks(w, bs) * _blocks(w, bs).abs().amax(1)[:, None],
                        _blocks(w, bs).abs().amax(1)), "multiplied each block by its absmax"),
        (lambda w, bs: (_scaled(_blocks(w, bs), _blocks(w, bs).abs().amax(1)),
                        1 / _blocks(w, bs).abs().amax(1).clamp(min=1e-38)), "1 / absmax"),
        (lambda w, bs: (_scaled(_blocks(w, bs), _blocks(w, bs).abs().amax(1)).reshape(-1),
                        _blocks(w, bs).abs().amax(1)), "keep the blocks as rows"),
        (lambda w, bs: _scaled(_blocks(w, bs), _blocks(w, bs).abs().amax(1)),
         "return scaled, absmax"),
        (_in_place, "changed its input w in place"),
        (lambda w, bs: (w.reshape(-1, bs) / w.reshape(-1, bs).abs().amax(1, keepdim=True).clamp(
            min=1e-38),
                        w.reshape(-1, bs).abs().amax(1)), "expected torch.float32"),
        (lambda w, bs: None, "forget the `return`"),
    ],
)
def test_absmax_scale_mistakes(fn, match, capsys):
    with pytest.raises(AssertionError, match=match):
        check_blockwise_absmax_scale(fn)
    assert capsys.readouterr().out == ""


def _mid(c):
    return (c[:-1] + c[1:]) / 2


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda s, c: torch.bucketize(s, c), "first level >= each value"),
        (lambda s, c: (torch.bucketize(s, c, right=True) - 1).clamp(min=0), "rounded down"),
        (lambda s, c: c[torch.bucketize(s, _mid(c))], "not their indices"),
        (lambda s, c: torch.bucketize(s, _mid(c)).reshape(-1), "in the shape of scaled"),
        (lambda s, c: (s.unsqueeze(-1) - c).abs().argmin(dim=0), "reduced over the wrong dim"),
        (lambda s, c: (s.unsqueeze(-1) - c).argmin(dim=-1), "has no .abs()"),
        (lambda s, c: (c - s.unsqueeze(-1)).argmin(dim=-1), "has no .abs()"),
        (lambda s, c: torch.bucketize(s, _mid(c), right=True), "exactly halfway"),
        (lambda s, c: torch.bucketize(s, c[:-1] + c[1:]), "not halved"),
        (lambda s, c: torch.bucketize(s, nf4.nf4_midpoints()), "not with the `codebook` argument"),
    ],
)
def test_nearest_level_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_nearest_level(fn)


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, c: (s.unsqueeze(-1) - c).abs().argmin(dim=-1),
        lambda s, c: torch.searchsorted(_mid(c), s.contiguous()),
    ],
    ids=["argmin", "searchsorted"],
)
def test_nearest_level_accepts_correct_alternatives(fn, capsys):
    check_nearest_level(fn)
    assert capsys.readouterr().out == "CHECK nb03_nearest_level: PASS\n"


def _u8(c):
    return c.reshape(-1).to(torch.uint8)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda c: (_u8(c)[1::2] << 4) | _u8(c)[0::2], "nibbles are swapped"),
        (lambda c: ((_u8(c)[0::2] << 4) & 0xF) | _u8(c)[1::2], "the high nibble is lost"),
        (lambda c: _u8(c), "two 4-bit codes share one byte"),
        (lambda c: (c.reshape(-1)[0::2] << 4) | c.reshape(-1)[1::2], "expected torch.uint8"),
        (lambda c: (c.reshape(-1)[0::2].to(torch.int8) << 4) | c.reshape(-1)[1::2].to(torch.int8),
         "expected torch.uint8"),
        (lambda c: (c.to(torch.uint8)[0::2] << 4) | c.to(torch.uint8)[1::2], "you paired rows"),
        (lambda c: (_u8(c)[0::2] << 2) | _u8(c)[1::2], "shifted by 2 bits"),
        (lambda c: _u8(c)[0::2] << 4, "only the even-indexed codes"),
    ],
)
def test_pack_nibbles_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_pack_nibbles(fn)


def test_pack_nibbles_accepts_arithmetic(capsys):
    check_pack_nibbles(lambda c: _u8(c).view(-1, 2)[:, 0] * 16 + _u8(c).view(-1, 2)[:, 1])
    assert capsys.readouterr().out == "CHECK nb03_pack_nibbles: PASS\n"


def test_double_quant_mistakes(solution):
    scale = solution["blockwise_absmax_scale"]
    near = solution["nearest_level_code"]

    def make(offset_of=lambda a: a.mean(), centre=True, bs_of=lambda bs: bs,
             code=nf4.dynamic_map, order=(0, 1, 2), dtype=torch.uint8):
        def double_quantize(absmax, blocksize=256):
            offset = offset_of(absmax)
            scaled, absmax2 = scale(absmax - offset if centre else absmax, bs_of(blocksize))
            codes = near(scaled, code()).to(dtype).reshape(absmax.shape)
            out = (codes, offset, absmax2)
            return tuple(out[i] for i in order)
        return double_quantize

    cases = [
        (make(centre=False), "did not subtract the mean"),
        (make(bs_of=lambda bs: 256), "not a hard-coded 256"),
        (make(code=nf4.nf4_codebook), "16-level NF4 codebook"),
        (make(offset_of=lambda a: a.max()), "offset should be the mean"),
        (make(order=(0, 2, 1)), "offset and absmax2 are swapped"),
        (make(dtype=torch.int64), "expected torch.uint8"),
        (lambda a, b=256: (near(scale(a - a.mean(), b)[0], nf4.dynamic_map()).to(torch.uint8),
                           a.mean(), scale(a - a.mean(), b)[1]), "reshape the codes"),
        (lambda a, b=256: None, "forget the `return`"),
    ]
    for fn, match in cases:
        with pytest.raises(AssertionError, match=match):
            check_double_quantize(fn)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda b, dq, d=256: (8 / b + 32 / (b * d)) if dq else 32 / b, "4 bits of the code"),
        (lambda b, dq, d=256: 4 + 8 / b + 32 / (b * d) if dq else 4, "constants are missing"),
        (lambda b, dq, d=256: 4 + 8 / b + 32 / (b * d) if dq else 4 + 32 // b,
         "constants are missing"),
        (lambda b, dq, d=256: 4 + 8 / b + 32 / (b * d) if dq else 4 + 16 / b, "not 16"),
        (lambda b, dq, d=256: 4 + (8 / b if dq else 32 / b), "second-level constants are missing"),
        (lambda b, dq, d=256: 4 + 32 / b + (32 / (b * d) if dq else 0), "take 8 bits, not 32"),
        (lambda b, dq, d=256: 4 + (8 / b + 32 / (b * 256) if dq else 32 / b),
         "not a hard-coded 256"),
        (lambda b, dq, d=256: 4 + (8 / b + 32 / d if dq else 32 / b),
         r"blocksize \* dq_blocksize weights"),
        (lambda b, dq, d=256: (4 + (8 / b + 32 / (b * d) if dq else 32 / b)) / 8, "bytes, not bits"),
        (lambda b, dq, d=256: 4 + (8 / b + 32 / (b * d) if dq else 32 / b) if d == 256 else 4.2,
         "expected 4.12891"),
        (lambda b, dq, d=128: 4 + (8 / b + 32 / (b * d) if dq else 32 / b),
         "default dq_blocksize must be 256"),
        (lambda b, dq, d=256: None, "forget the `return`"),
        (lambda b, dq, d=256: "4.5", "return a number"),
    ],
)
def test_bits_per_parameter_mistakes(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_bits_per_parameter(fn)


def _qlora(lora=None, **qkw) -> QLoRAModel:
    torch.manual_seed(0)
    qkw = {"backend": "torch", "bnb_4bit_use_double_quant": True, **qkw}
    return QLoRAModel(TinyGPT(SMALL), QuantizationConfig(**qkw), lora or LoRAConfig(r=8))


def test_the_builder_is_run_on_a_fresh_base(solution, capsys):
    check_qlora_model(solution["build_qlora_model"], lambda: TinyGPT(SMALL))
    assert capsys.readouterr().out == "CHECK nb03_qlora_model: PASS\n"
    demo = _qlora().prepare_for_training()
    with pytest.raises(AssertionError, match="does not wrap the `base` model it was given"):
        check_qlora_model(lambda base: demo, lambda: TinyGPT(SMALL))


def test_the_bitsandbytes_model_passes(capsys):
    check_qlora_model(_qlora(backend="bitsandbytes").prepare_for_training())
    assert capsys.readouterr().out == "CHECK nb03_qlora_model: PASS\n"


def test_qlora_model_mistakes():
    torch.manual_seed(0)
    cases = [
        (apply_lora(TinyGPT(SMALL)), "should be a QLoRAModel"),
        (_qlora(bnb_4bit_use_double_quant=False), "not double-quantised"),
        (_qlora(backend="bitsandbytes", bnb_4bit_quant_type="fp4"), "not NF4"),
        (_qlora(bnb_4bit_compute_dtype=torch.bfloat16), "computes in torch.bfloat16"),
        (_qlora(blocksize=128), "expected 64"),
        (_qlora(LoRAConfig(r=4)), "expected r=8"),
        (_qlora(LoRAConfig(r=8, lora_alpha=8)), "lora_alpha / r = 16 / 8"),
        (_qlora(LoRAConfig(r=8, target_modules=["q_proj"])), "have no LoRA adapter"),
        (_qlora(LoRAConfig(r=8, target_modules="all-linear")), "q_proj and v_proj only"),
        (_qlora(llm_int8_skip_modules=["lm_head", "k_proj"]), "not 4-bit"),
    ]
    for model, match in cases:
        with pytest.raises(AssertionError, match=match):
            check_qlora_model(model)
    # the double-quantisation flag set on the config after building: the layers are not
    model = _qlora(bnb_4bit_use_double_quant=False)
    model.quantization_config.bnb_4bit_use_double_quant = True
    with pytest.raises(AssertionError, match="a flag set afterwards changes nothing"):
        check_qlora_model(model)
    model = small_qlora()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="only LoRA parameters may be trainable"):
        check_qlora_model(model)
