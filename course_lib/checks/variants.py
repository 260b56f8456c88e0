"""The mistakes each check knows, written down next to the check as variants of the solution.

Every check module keeps a ``VARIANTS`` tuple (a long one in ``<module>_variants.py`` beside
it, which the check module imports): **mistakes** students plausibly make in that
fill-in (the check must fail, and its message must contain ``says``, the words that name the
mistake) and correct **alternatives** (another valid init, another loop order: the check must
pass). A variant is a list of edits of the solution cell, so it stays short and readable::

    mistake("nb01_lora_layer_impl", "no_scaling",
            "returns B A x without multiplying by the scaling factor",
            [("return (h @ self.lora_B.T) * self.scaling", "return h @ self.lora_B.T")],
            says="scaling is missing")

- an edit ``(old, new)`` replaces the text ``old``, which must occur exactly once in the
  solution cell (a variant that no longer applies is an error, so the list follows the notebook);
- ``(BLOCK, new)`` replaces the whole body of the cell's only solution block, and
  ``(block(k), new)`` the ``k``-th one (from 1), keeping the block's indentation: this is how a
  "delegates to course_lib" variant is written.

``tests/test_check_variants.py`` runs every variant through its check cell exactly as grading
runs the notebook, and fails when a fill-in has no mistakes listed.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["BLOCK", "Variant", "block", "mistake", "alternative", "apply_edits"]

_BEGIN = "### BEGIN SOLUTION"
_END = "### END SOLUTION"


def block(k: int) -> str:
    """The edit target that stands for the ``k``-th solution block of the cell (from 1)."""
    return f"<solution block {k}>"


BLOCK = "<solution block>"  # the only solution block of the cell


@dataclass(frozen=True)
class Variant:
    """A variant of a fill-in's solution: a mistake (``says`` set) or a correct alternative."""

    fill_in: str  # grade_id of the fill-in cell that is edited
    name: str  # short identifier, unique per fill-in
    description: str  # what the student did, in words
    edits: tuple[tuple[str, str], ...]
    says: str | None = None  # text the failure must contain; None for a correct alternative
    check: str | None = None  # grade_id of the check that must catch it (default: the next one)

    @property
    def is_mistake(self) -> bool:
        return self.says is not None

    @property
    def id(self) -> str:
        return f"{self.fill_in}:{self.name}"


def mistake(
    fill_in: str,
    name: str,
    description: str,
    edits: Iterable[tuple[str, str]],
    *,
    says: str,
    check: str | None = None,
) -> Variant:
    """A plausible mistake in fill-in ``fill_in``: its check must fail with ``says`` in the text."""
    if not says:
        raise ValueError(f"mistake {fill_in}:{name} needs `says`, the words that name it")
    return Variant(fill_in, name, description, tuple(edits), says, check)


def alternative(
    fill_in: str, name: str, description: str, edits: Iterable[tuple[str, str]]
) -> Variant:
    """A correct alternative solution of ``fill_in``: every check must pass it."""
    return Variant(fill_in, name, description, tuple(edits), None, None)


def _solution_blocks(lines: Sequence[str]) -> list[tuple[int, int, str]]:
    """``(begin, end, indent)`` line indices of each solution block's markers."""
    blocks, begin = [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == _BEGIN:
            begin = i
        elif stripped == _END and begin is not None:
            blocks.append((begin, i, line[: len(line) - len(line.lstrip())]))
            begin = None
    return blocks


def _replace_block(source: str, k: int | None, new: str, variant: str) -> str:
    lines = source.split("\n")
    blocks = _solution_blocks(lines)
    if k is None:
        if len(blocks) != 1:
            raise ValueError(
                f"variant {variant}: BLOCK needs exactly one solution block, the cell has "
                f"{len(blocks)}; use block(k)"
            )
        k = 1
    if not 1 <= k <= len(blocks):
        raise ValueError(f"variant {variant}: the cell has {len(blocks)} solution blocks, not {k}")
    begin, end, indent = blocks[k - 1]
    body = textwrap.indent(textwrap.dedent(new).strip("\n"), indent).split("\n")
    return "\n".join(lines[: begin + 1] + body + lines[end:])


_BLOCK_TARGET = re.compile(r"<solution block(?: (\d+))?>")


def apply_edits(source: str, variant: Variant) -> str:
    """The solution cell ``source`` with ``variant``'s edits applied (each exactly once)."""
    for old, new in variant.edits:
        target = _BLOCK_TARGET.fullmatch(old)
        if target is not None:
            k = int(target.group(1)) if target.group(1) else None
            source = _replace_block(source, k, new, variant.id)
            continue
        count = source.count(old)
        if count != 1:
            raise ValueError(
                f"variant {variant.id}: the text {old!r} occurs {count} times in the solution "
                f"cell {variant.fill_in} (it must occur exactly once: update the variant)"
            )
        source = source.replace(old, new)
    return source
