"""The checks of notebook 00 pass on the solution, name each mistake, refuse delegation."""

import pytest

import course_lib.model.lora as lora_lib
from course_lib.checks.answers import compare_answers
from course_lib.checks.core import CheckFailure
from course_lib.checks.welcome import VARIANTS, check_param_count, check_savings


def stub(d, k, r):
    raise NotImplementedError("Fill-in 'nb00_param_count_impl' is not done yet")


def own_count(d, k, r):
    return r * (d + k)


def test_param_count_passes_on_solution(capsys):
    check_param_count(own_count)
    check_param_count(lambda d, k, r: r * k + d * r)
    assert capsys.readouterr().out == "CHECK nb00_param_count: PASS\nCHECK nb00_param_count: PASS\n"


@pytest.mark.parametrize(
    ("fn", "says"),
    [
        (stub, "lora_param_count(4096, 4096, 8) is not filled in yet: fill in lora_param_count "
               "above, then run this cell again."),
        (lambda d, k, r: d * k, "the full weight's size"),
        (lambda d, k, r: r * d * k, "that is r*d*k"),
        (lambda d, k, r: d + k, "the rank r is missing"),
        (lambda d, k, r: r * d, "you counted only B"),
        (lambda d, k, r: r * k, "you counted only A"),
        (lambda d, k, r: r * d + k, "the parentheses are missing"),
        (lambda d, k, r: 2 * r * d, "square weight"),
        (lambda d, k, r: None, "missing return"),
        (lambda d, k, r: r * (d + k) / 1, "a whole number"),
        (lambda d, k, r: 65536, "the answer of an earlier case"),
        (lambda d, k, r: str(r * (d + k)), "not a string"),
        (lambda d, k, r: lora_lib.lora_parameter_count(d, k, r),
         "the check runs your own implementation: write it instead of calling "
         "course_lib.model.lora.lora_parameter_count"),
        (lora_lib.lora_parameter_count, "the check runs your own implementation"),
    ],
)
def test_param_count_names_the_mistake(fn, says, capsys):
    with pytest.raises(CheckFailure) as info:
        check_param_count(fn)
    assert says in str(info.value)
    assert info.value.check_id == "nb00_param_count"
    assert "PASS" not in capsys.readouterr().out


def test_the_guard_is_lifted_after_the_check():
    with pytest.raises(CheckFailure):
        check_param_count(lambda d, k, r: lora_lib.lora_parameter_count(d, k, r))
    assert lora_lib.lora_parameter_count(4, 4, 1) == 8


def test_savings_passes_on_solution(capsys):
    check_savings(lambda d, k, r: d * k / own_count(d, k, r))
    check_savings(lambda d, k, r: (d * k) / (r * (d + k)))
    assert capsys.readouterr().out == "CHECK nb00_savings: PASS\n" * 2


@pytest.mark.parametrize(
    ("fn", "says"),
    [
        (stub, "is not filled in yet"),
        (lambda d, k, r: r * (d + k) / (d * k), "that is the inverse"),
        (lambda d, k, r: d * k // (r * (d + k)), "integer division"),
        (lambda d, k, r: int(d * k / (r * (d + k))), "integer division"),
        (lambda d, k, r: round(d * k / (r * (d + k))), "was rounded"),
        (lambda d, k, r: d * k / r * (d + k), "parentheses around the denominator are missing"),
        (lambda d, k, r: float(d * k - r * (d + k)), "the difference"),
        (lambda d, k, r: d * k / (d + k), "the rank r is missing"),
        (lambda d, k, r: min(d, k) / r, "an upper bound"),
        (lambda d, k, r: d * k / (2 * r * d), "square weight only"),
        (lambda d, k, r: None, "missing return"),
        (lambda d, k, r: "256", "not a string"),
        (lambda d, k, r: 256.0, "the answer of an earlier case"),
        (lambda d, k, r: d * k / (r * (d + k)) + 1, "no formula the check knows"),
        (lambda d, k, r: lora_lib.lora_savings(d, k, r),
         "write it instead of calling course_lib.model.lora.lora_savings"),
        (lambda d, k, r: d * k / lora_lib.lora_parameter_count(d, k, r),
         "write it instead of calling course_lib.model.lora.lora_parameter_count"),
    ],
)
def test_savings_names_the_mistake(fn, says, capsys):
    with pytest.raises(CheckFailure) as info:
        check_savings(fn)
    assert says in str(info.value)
    assert "PASS" not in capsys.readouterr().out


def test_a_student_error_is_explained():
    with pytest.raises(CheckFailure) as info:
        check_savings(lambda d, k: d * k)
    assert "three arguments" in str(info.value)


def test_every_fill_in_has_mistakes_and_a_delegation_variant():
    for fill_in in ("nb00_param_count_impl", "nb00_savings_impl"):
        says = [v.says for v in VARIANTS if v.fill_in == fill_in and v.is_mistake]
        assert len(says) >= 5
        assert any("the check runs your own implementation" in s for s in says)


def test_compare_answers_says_which_are_wrong_without_the_value(capsys):
    compare_answers({"a": (None, 186.6), "b": (186.0, 186.58), "c": (256, 186.58),
                     "d": (100, 186.58), "e": ("186", 186.58)})
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("not answered yet: write your number in this cell, then run it again")
    assert out[1].endswith("right")
    assert "too high" in out[2] and "too low" in out[3] and "not a number" in out[4]
    assert "186.58" not in "\n".join(out)
