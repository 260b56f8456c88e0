"""Student-facing check functions, one module per notebook, on the runtime of :mod:`.core`.

A failing check raises :class:`~course_lib.checks.core.CheckFailure` (an ``AssertionError``)
that Jupyter shows as a short block: the check's name, what was seen, the hint. Only when
everything passed does a check print exactly one deterministic success line
``CHECK <grade_id>: PASS``; that line is the check cell's stored output in ``solutions/``, so
nbval and ``course grade`` can tell a passed check from one whose traceback was hidden. Each
module also lists the mistakes its checks know (``VARIANTS``, see :mod:`.variants`).
"""

from __future__ import annotations

from course_lib.checks.core import CheckFailure, call_student, check, expect, fail, passed

__all__ = ["CheckFailure", "call_student", "check", "expect", "fail", "passed"]
