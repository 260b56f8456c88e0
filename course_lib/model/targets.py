"""Which layers a rule selects: PEFT's ``target_modules`` rule, in one place.

Used by LoRA (:func:`course_lib.model.lora.apply_lora`), QLoRA (which layers stay in full
precision) and the memory estimator (:mod:`course_lib.utils.memory`), so that a name means the
same thing everywhere:

- a **list** of names: an entry matches a module name exactly or as its dotted suffix
  (``"q_proj"`` matches ``"blocks.0.attn.q_proj"``, not ``"blocks.0.attn.xq_proj"``);
- a **string** is a regular expression that must match the whole name;
- ``"all-linear"`` selects every linear layer except the output head (:func:`output_head_names`).

QLoRA's ``llm_int8_skip_modules`` follows transformers' quantisers instead, which are looser
(:func:`skip_matches`): an entry keeps a module unquantised when it matches the start of the
name up to a module boundary (a prefix such as ``"model.layers.0"``), the same as a regular
expression (``"model.layers.[01]"``), or the end of the name as plain text (``"proj"`` keeps
every ``q_proj``, ``up_proj``...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

__all__ = [
    "ALL_LINEAR",
    "normalise_targets",
    "matches",
    "normalise_skip_modules",
    "skip_matches",
    "output_head_names",
    "describe_names",
]

ALL_LINEAR = "all-linear"


def normalise_targets(targets: object, name: str = "target_modules") -> list[str] | str:
    """Check a ``target_modules`` value and return it as a list of names or a regex string.

    Accepts a non-empty list/tuple/set of non-empty strings (a set is sorted), a valid regular
    expression, or ``"all-linear"``. ``TypeError`` for another type, ``ValueError`` for an empty
    list, an empty name or an invalid regex.
    """
    allowed = (
        "a non-empty list of module names (e.g. ['q_proj', 'v_proj']), a regex string or "
        f"{ALL_LINEAR!r}"
    )
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(
                    f"{name}={targets!r} is not a valid regular expression ({exc}); use {allowed}"
                ) from None
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise TypeError(f"{name} must be {allowed}, got {targets!r}")
    items = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    if not items or not all(isinstance(t, str) and t for t in items):
        raise ValueError(f"{name} must be {allowed}, got {targets!r}")
    return items


def matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: does the module called ``name`` match ``targets``?

    A regex string must match the full name; a list entry matches the name itself or its dotted
    suffix. (``"all-linear"`` is not a name rule: callers resolve it with
    :func:`output_head_names`.)
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def normalise_skip_modules(names: object, name: str = "llm_int8_skip_modules") -> list[str]:
    """Check an ``llm_int8_skip_modules`` list: non-empty strings, each a valid regex."""
    allowed = "None or a list of module names (e.g. ['lm_head'])"
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"{name} must be {allowed}, got {names!r}")
    if not all(isinstance(entry, str) and entry for entry in names):
        raise ValueError(f"{name} must be {allowed}, got {names!r}")
    for entry in names:
        try:
            re.compile(entry)
        except re.error as exc:
            raise ValueError(
                f"{name} entry {entry!r} is not a valid regular expression ({exc}); transformers "
                "reads every entry as one (escape it with re.escape for a literal name)"
            ) from None
    return list(names)


# A match must end at a module boundary: just after a "." or just before one (or at the end).
_AT_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def skip_matches(name: str, skip_modules: Sequence[str]) -> bool:
    """transformers' ``llm_int8_skip_modules`` rule: is the module ``name`` kept unquantised?

    True when some entry, read as a regular expression, matches ``name`` from its start up to
    a module boundary (``"model.layers.1"`` keeps ``"model.layers.1.mlp.up_proj"`` but not
    ``"model.layers.11.mlp.up_proj"``), or when ``name`` ends with the entry as plain text
    (``"proj"`` keeps ``"model.layers.0.self_attn.q_proj"``).
    """
    for entry in skip_modules:
        if name.endswith(entry) or re.match(f"(?:{entry}){_AT_BOUNDARY}", name):
            return True
    return False


def output_head_names(model: nn.Module, names: Iterable[str] | None = None) -> set[str]:
    """The output head that ``"all-linear"`` (and QLoRA's default) leaves out.

    ``model.get_output_embeddings()`` when the model has it (transformers models do), and any
    module whose last name part is ``lm_head``. ``names`` restricts the answer to those module
    names (default: all of the model's).
    """
    modules: Mapping[str, nn.Module] = dict(model.named_modules())
    candidates = set(modules if names is None else names)
    heads = {n for n in candidates if n.rsplit(".", 1)[-1] == "lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        heads |= {n for n in candidates if modules.get(n) is head}
    return heads


def describe_names(names: Sequence[str], limit: int = 8) -> str:
    """All names when there are few; otherwise the distinct last parts with counts and an
    example, e.g. ``25 layers named q_proj (x4), ..., lm_head, e.g. 'blocks.0.attn.q_proj'``."""
    if not names:
        return "(none)"
    if len(names) <= limit:
        return ", ".join(names)
    counts: dict[str, int] = {}
    for full in names:
        last = full.rsplit(".", 1)[-1]
        counts[last] = counts.get(last, 0) + 1
    kinds = ", ".join(f"{last} (x{n})" if n > 1 else last for last, n in counts.items())
    return f"{len(names)} layers named {kinds}, e.g. {names[0]!r}"
