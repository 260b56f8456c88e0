"""The checks of notebook 00 fail with actionable messages and pass on the solution."""

import pytest

from course_lib.checks.welcome import check_param_count, check_savings


def stub(d, k, r):
    raise NotImplementedError("Fill-in 'nb00_param_count_impl' is not done yet")


def test_param_count_passes_on_solution(capsys):
    check_param_count(lambda d, k, r: r * (d + k))
    assert capsys.readouterr().out == "CHECK nb00_param_count: PASS\n"


@pytest.mark.parametrize(
    ("fn", "hint"),
    [
        (stub, "lora_param_count(d, k, r) is not filled in yet: fill in lora_param_count above"),
        (lambda d, k, r: d * k, "that is the full weight's size"),
        (lambda d, k, r: r * d * k, "expected 65536"),
        (lambda d, k, r: None, "forget the `return`"),
    ],
)
def test_param_count_fails_usefully(fn, hint, capsys):
    with pytest.raises(AssertionError) as info:
        check_param_count(fn)
    assert hint in str(info.value)
    assert "PASS" not in capsys.readouterr().out


def test_savings_passes_on_solution(capsys):
    check_savings(lambda d, k, r: d * k / (r * (d + k)))
    assert capsys.readouterr().out == "CHECK nb00_savings: PASS\n"


@pytest.mark.parametrize(
    ("fn", "hint"),
    [
        (stub, "is not filled in yet"),
        (lambda d, k, r: r * (d + k) / (d * k), "the inverse of the expected"),
        (lambda d, k, r: d * k // (r * (d + k)), "integer division"),
        (lambda d, k, r: "256", "should return a number"),
    ],
)
def test_savings_fails_usefully(fn, hint, capsys):
    with pytest.raises(AssertionError) as info:
        check_savings(fn)
    assert hint in str(info.value)
    assert "PASS" not in capsys.readouterr().out
