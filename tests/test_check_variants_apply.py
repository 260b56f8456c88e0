"""course_lib.checks.variants: how a variant edits a solution cell."""

from __future__ import annotations

import pytest

from course_lib.checks.variants import BLOCK, alternative, apply_edits, block, mistake

CELL = """class LoRALayer(nn.Module):
    def __init__(self, r):
        ### BEGIN SOLUTION
        self.r = r
        self.scaling = 16 / r
        ### END SOLUTION

    def forward(self, x):
        ### BEGIN SOLUTION
        return x * self.scaling
        ### END SOLUTION"""


def test_text_edit_applies_exactly_once():
    v = mistake("nb01_x", "no_scaling", "forgets the scaling",
                [("return x * self.scaling", "return x")], says="scaling is missing")
    out = apply_edits(CELL, v)
    assert "return x\n" in out + "\n" and "return x * self.scaling" not in out
    assert v.is_mistake and v.id == "nb01_x:no_scaling"


def test_text_edit_that_does_not_apply_is_an_error_naming_the_variant():
    v = mistake("nb01_x", "gone", "text gone", [("no such text", "x")], says="x")
    with pytest.raises(ValueError, match=r"variant nb01_x:gone: the text 'no such text' occurs 0 times"):
        apply_edits(CELL, v)
    twice = mistake("nb01_x", "twice", "ambiguous", [("self.", "")], says="x")
    with pytest.raises(ValueError, match="occurs 3 times"):
        apply_edits(CELL, twice)


def test_block_edits_keep_the_indentation():
    v = alternative("nb01_x", "delegate", "other body",
                    [(block(2), "y = x\nreturn y * self.scaling")])
    out = apply_edits(CELL, v)
    assert "        ### BEGIN SOLUTION\n        y = x\n        return y * self.scaling\n        ### END SOLUTION" in out
    assert "self.r = r" in out  # block 1 untouched
    assert not v.is_mistake


def test_block_needs_one_block_and_block_k_must_exist():
    with pytest.raises(ValueError, match="BLOCK needs exactly one solution block, the cell has 2"):
        apply_edits(CELL, mistake("nb01_x", "a", "a", [(BLOCK, "pass")], says="x"))
    with pytest.raises(ValueError, match="has 2 solution blocks, not 3"):
        apply_edits(CELL, mistake("nb01_x", "b", "b", [(block(3), "pass")], says="x"))
    single = "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"
    out = apply_edits(single, mistake("nb00_f", "c", "c", [(BLOCK, "return 2")], says="x"))
    assert out == "def f():\n    ### BEGIN SOLUTION\n    return 2\n    ### END SOLUTION"


def test_a_mistake_must_say_what_names_it():
    with pytest.raises(ValueError, match="needs `says`"):
        mistake("nb01_x", "silent", "no words", [], says="")
