"""The shared plumbing: argument checks, target matching, byte formatting, parameter counting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from course_lib.model.targets import (
    describe_names,
    matches,
    normalise_targets,
    output_head_names,
)
from course_lib.utils.params import count_parameters, trainable_parameters_summary
from course_lib.utils.units import format_bytes
from course_lib.validation import (
    check_bool,
    check_choice,
    check_number,
    check_probability,
    non_negative_int,
    positive_int,
)

# ---- validation ----------------------------------------------------------------------------


def test_positive_int_accepts_ints_and_returns_them():
    assert positive_int("r", 8) == 8
    assert positive_int("n", 0, minimum=0) == 0
    assert non_negative_int("n", 0) == 0


@pytest.mark.parametrize("bad", [8.0, "8", True, None, [8]])
def test_positive_int_wrong_type_is_type_error_naming_the_argument(bad):
    with pytest.raises(TypeError, match=r"^r must be a positive int, got"):
        positive_int("r", bad)


@pytest.mark.parametrize("bad", [0, -3])
def test_positive_int_wrong_value_is_value_error(bad):
    with pytest.raises(ValueError, match=rf"^r must be a positive int, got {bad}$"):
        positive_int("r", bad)


def test_positive_int_minimum_is_in_the_message():
    with pytest.raises(ValueError, match="block must be an int >= 2, got 1"):
        positive_int("block", 1, minimum=2)
    with pytest.raises(ValueError, match="must be a non-negative int, got -1"):
        non_negative_int("n", -1)
    with pytest.raises(TypeError, match="must be a non-negative int"):
        non_negative_int("n", 1.5)


def test_check_bool():
    assert check_bool("merged", False) is False
    for bad in (1, 0, "True", None):
        with pytest.raises(TypeError, match="merged must be True or False"):
            check_bool("merged", bad)


def test_check_number_ranges_and_hint():
    assert check_number("alpha", 16, low=0, low_inclusive=False) == 16.0
    with pytest.raises(ValueError, match=r"alpha must be a number > 0 \(e\.g\. 16\), got 0"):
        check_number("alpha", 0, low=0, low_inclusive=False, hint="e.g. 16")
    with pytest.raises(ValueError, match="got nan"):
        check_number("alpha", math.nan)
    with pytest.raises(ValueError, match="got inf"):
        check_number("alpha", math.inf, low=0)
    with pytest.raises(TypeError, match="alpha must be"):
        check_number("alpha", True)
    with pytest.raises(TypeError, match="alpha must be"):
        check_number("alpha", "16")
    with pytest.raises(ValueError, match=r"x must be a number in \[0, 1\], got 2"):
        check_number("x", 2, low=0, high=1)
    with pytest.raises(ValueError, match=r"x must be a number <= 1"):
        check_number("x", 2, high=1)


def test_check_probability():
    assert check_probability("lora_dropout", 0) == 0.0
    assert check_probability("lora_dropout", 0.5) == 0.5
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\), got 1"):
        check_probability("lora_dropout", 1)


def test_check_choice_names_the_allowed_values():
    assert check_choice("backend", "torch", ("bitsandbytes", "torch")) == "torch"
    with pytest.raises(ValueError, match=r"backend must be one of \('bitsandbytes', 'torch'\)"):
        check_choice("backend", "fast", ("bitsandbytes", "torch"))
    # True == 1 in Python, but a bool is not a choice among ints (and the other way round)
    with pytest.raises(ValueError):
        check_choice("init", 1, (True, False, "gaussian"))
    assert check_choice("init", True, (True, False, "gaussian")) is True


# ---- target matching -----------------------------------------------------------------------


def test_matches_peft_rule():
    assert matches("blocks.0.attn.q_proj", ["q_proj"])
    assert matches("q_proj", ["q_proj"])
    assert not matches("blocks.0.attn.xq_proj", ["q_proj"])
    assert matches("blocks.0.attn.q_proj", r".*\.(q|v)_proj")
    assert not matches("blocks.0.attn.q_proj", r"q_proj")  # a regex must match the whole name


def test_normalise_targets():
    assert normalise_targets({"v_proj", "q_proj"}) == ["q_proj", "v_proj"]
    assert normalise_targets("all-linear") == "all-linear"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        normalise_targets("q_proj(")
    with pytest.raises(ValueError, match="non-empty list"):
        normalise_targets([])
    with pytest.raises(ValueError, match="non-empty list"):
        normalise_targets(["q_proj", ""])
    with pytest.raises(TypeError, match="target_modules must be"):
        normalise_targets(3)


class _LM(nn.Module):
    def __init__(self, tie_name: str = "head") -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        setattr(self, tie_name, nn.Linear(4, 10))
        self._head_name = tie_name

    def get_output_embeddings(self):
        return getattr(self, self._head_name)


def test_output_head_names_by_name_and_by_get_output_embeddings():
    assert output_head_names(_LM("head")) == {"head"}
    assert output_head_names(_LM("lm_head")) == {"lm_head"}
    assert output_head_names(_LM("head"), names=["body"]) == set()
    plain = nn.Sequential(nn.Linear(2, 2))
    assert output_head_names(plain) == set()


def test_describe_names_short_and_long():
    assert describe_names([]) == "(none)"
    assert describe_names(["a.q", "a.v"]) == "a.q, a.v"
    long = [f"blocks.{i}.q_proj" for i in range(9)] + ["lm_head"]
    assert describe_names(long) == "10 layers named q_proj (x9), lm_head, e.g. 'blocks.0.q_proj'"


# ---- byte formatting -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "nbytes, units, text",
    [
        (0, "decimal", "0 B"),
        (999, "decimal", "999 B"),
        (1000, "decimal", "1.00 kB"),
        (26_953_662_464, "decimal", "27.0 GB"),
        (999_999_999, "decimal", "1.00 GB"),  # rounds up into the next unit
        (1536, "binary", "1.50 KiB"),
        (1023, "binary", "1023 B"),
        (3 * 2**20, "binary", "3.00 MiB"),
        (4.1 * 2**30, "binary", "4.10 GiB"),
    ],
)
def test_format_bytes(nbytes, units, text):
    assert format_bytes(nbytes, units) == text


def test_format_bytes_digits_and_errors():
    assert format_bytes(26_953_662_464, "decimal", digits=4) == "26.95 GB"
    with pytest.raises(ValueError, match=r"units must be one of \('decimal', 'binary'\)"):
        format_bytes(10, "si")
    with pytest.raises(ValueError, match="non-negative"):
        format_bytes(-1, "decimal")
    with pytest.raises(TypeError, match="non-negative number"):
        format_bytes("10", "decimal")


# ---- parameter counting --------------------------------------------------------------------


def test_count_parameters_counts_shared_parameters_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head, "mid": nn.Linear(4, 4)})
    assert count_parameters(model) == 40 + 16 + 4
    model["mid"].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 40
    summary = trainable_parameters_summary(model)
    assert (summary.trainable, summary.total) == (40, 60)
    assert str(summary) == "trainable params: 40 || all params: 60 || trainable%: 66.6667"
    with pytest.raises(TypeError, match="trainable_only must be True or False"):
        count_parameters(model, trainable_only=1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        trainable_parameters_summary("model")


class _Packed(nn.Module):
    """A Linear-like module whose weight is a packed uint8 buffer (like NF4Linear)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(in_features * out_features // 2, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)


def test_count_parameters_counts_packed_weights_as_the_weights_they_stand_for():
    model = nn.Sequential(_Packed(8, 6), nn.Linear(6, 2))
    summary = trainable_parameters_summary(model)
    assert summary.total == 8 * 6 + 6 + 6 * 2 + 2
    assert summary.trainable == 6 * 2 + 2


def test_count_parameters_of_a_bitsandbytes_4bit_weight():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(32, 64), requires_grad=False, quant_type="nf4"
    )._quantize("cpu")
    assert layer.weight.numel() != 32 * 64  # packed
    assert count_parameters(layer) == 32 * 64
