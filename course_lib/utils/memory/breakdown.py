"""The result of measuring or estimating a training step: bytes per category.

:class:`MemoryBreakdown` is what :func:`~course_lib.utils.memory.measure_training_step` measures
and what :func:`~course_lib.utils.memory.estimate_memory` estimates, one number per category of
:data:`CATEGORIES`, so the two can be compared row by row (:func:`comparison_table`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from course_lib.utils.units import GB, format_bytes
from course_lib.validation import check_bool, check_number

__all__ = ["CATEGORIES", "CATEGORY_LABELS", "MemoryBreakdown", "comparison_table"]

CATEGORIES = (
    "weights",
    "quant_constants",
    "gradients",
    "optimizer_state",
    "master_weights",
    "activations",
    "recompute",
)
CATEGORY_LABELS = {
    "weights": "weights",
    "quant_constants": "quantisation constants",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "master_weights": "fp32 master weights",
    "activations": "activations",
    "recompute": "recompute (1 block)",
}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per category of one training step (measured or estimated).

    ``total`` is the sum of the categories: the budget planners use. It is an upper bound of
    the true peak, since activations are freed while the gradients are produced.
    """

    weights: int = 0
    quant_constants: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    master_weights: int = 0
    activations: int = 0
    recompute: int = 0
    weights_by_dtype: Mapping[str, int] = field(default_factory=dict)
    parameters: int = 0  # parameter elements (a packed 4-bit weight counts its logical size)
    trainable_parameters: int = 0
    label: str = ""

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in CATEGORIES)

    def as_dict(self) -> dict[str, int]:
        """``{category: bytes}`` in :data:`CATEGORIES` order."""
        return {name: getattr(self, name) for name in CATEGORIES}

    def fits(self, capacity_gb: float) -> bool:
        """Whether ``total`` fits in ``capacity_gb`` GB (10^9 bytes, the unit of GPU budgets)."""
        return self.total <= check_number("capacity_gb", capacity_gb, low=0.0) * GB

    def table(self, skip_zero: bool = True, units: str = "decimal") -> str:
        """A small text table: one row per category, bytes (also in ``units``, see
        :func:`~course_lib.utils.units.format_bytes`) and share of the total."""
        check_bool("skip_zero", skip_zero)
        total = self.total
        lines = [self.label or "memory", f"  {'category':<24}{'bytes':>16}{'':>10}{'share':>8}"]
        for name, value in self.as_dict().items():
            if skip_zero and value == 0:
                continue
            share = value / total if total else 0.0
            lines.append(
                f"  {CATEGORY_LABELS[name]:<24}{value:>16,}{format_bytes(value, units):>10}"
                f"{share:>8.1%}"
            )
        lines.append(f"  {'total':<24}{total:>16,}{format_bytes(total, units):>10}{1:>8.0%}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def comparison_table(measured: MemoryBreakdown, estimated: MemoryBreakdown) -> str:
    """Measured vs estimated bytes per category, with their ratio (estimate / measured)."""
    lines = [f"  {'category':<24}{'measured':>14}{'estimated':>14}{'ratio':>8}"]
    for name in CATEGORIES:
        m, e = getattr(measured, name), getattr(estimated, name)
        if m == 0 and e == 0:
            continue
        ratio = f"{e / m:.3f}" if m else "-"
        lines.append(f"  {CATEGORY_LABELS[name]:<24}{m:>14,}{e:>14,}{ratio:>8}")
    return "\n".join(lines)
