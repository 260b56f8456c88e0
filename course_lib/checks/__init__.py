"""Student-facing check functions, one module per notebook.

Every check raises :class:`AssertionError` with a hint a student can act on (what was expected,
what was got, which step to look at) and, only when everything passed, prints exactly one
deterministic success line ``CHECK <grade_id>: PASS``. That line is stored as the check cell's
output in ``solutions/`` so nbval (and ``course grade``) can tell a passed check from one whose
traceback was hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["expect", "passed", "call_student"]


def expect(condition: bool, message: str) -> None:
    """Raise ``AssertionError(message)`` unless ``condition`` holds."""
    if not condition:
        raise AssertionError(message)


def passed(grade_id: str) -> None:
    """Print the success line of check ``grade_id`` (the only output a passing check has)."""
    print(f"CHECK {grade_id}: PASS")


def call_student(fn: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """Call the student's ``fn`` and turn "not filled in yet" into a friendly message.

    ``what`` names the function or step for the hint, e.g. ``"lora_parameter_count(d, k, r)"``.
    Any other exception propagates unchanged so the student sees their own traceback.
    """
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        raise AssertionError(
            f"{what} is not implemented yet (NotImplementedError: {exc}). Replace the "
            "`raise NotImplementedError(...)` line in the fill-in cell with your code, run that "
            "cell, then run this check again."
        ) from exc
