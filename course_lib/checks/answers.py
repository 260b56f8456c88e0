"""Compare the numbers a student wrote for an exercise with the computed ones (issue 14 item 4).

An answer cell's companion code cell must not print the answers before the student has worked
them out. Instead the student writes their numbers into the cell and runs it::

    my_factor = None  # your answer
    compare_answers({"savings factor": (my_factor, lora_savings_factor(4096, 11008, 16))})

Each line says "not answered yet", "right" or "too high / too low" (without the value), so the
cell checks the student's work instead of giving it away.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

__all__ = ["compare_answers"]


def compare_answers(answers: Mapping[str, tuple[object, float]], rel_tol: float = 0.05) -> None:
    """Print one verdict per ``name: (yours, computed)``.

    An answer is right when it is within ``rel_tol`` (relative) of the computed value; ``None``
    means not answered yet.
    """
    width = max((len(name) for name in answers), default=0)
    for name, (yours, computed) in answers.items():
        if yours is None:
            verdict = "not answered yet: write your number in this cell, then run it again"
        elif not isinstance(yours, Real) or isinstance(yours, bool):
            verdict = f"{yours!r} is not a number: write the value itself (e.g. 12.5)"
        elif math.isclose(float(yours), float(computed), rel_tol=rel_tol, abs_tol=1e-12):
            verdict = "right"
        else:
            side = "too high" if yours > computed else "too low"
            verdict = f"{side}: look at your working again"
        print(f"{name:<{width}s}  {verdict}")
