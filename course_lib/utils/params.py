"""Counting a model's parameters: the one counter of the course.

Every place that reports parameters (``TinyGPT.num_parameters``, the training history, LoRA's and
QLoRA's summaries, the memory report) calls :func:`count_parameters` or
:func:`trainable_parameters_summary`, so the numbers agree everywhere:

- a parameter shared by several modules (a tied embedding and output head) counts once;
- a quantised weight counts as the weights it stands for, not as its packed bytes: a
  bitsandbytes ``Params4bit`` by its ``quant_state.shape``, and the packed integer ``weight``
  buffer of a Linear-like module (the course's ``NF4Linear``) as ``out_features * in_features``
  frozen parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from course_lib.validation import check_bool

__all__ = ["count_parameters", "logical_numel", "TrainableSummary", "trainable_parameters_summary"]


def logical_numel(t: torch.Tensor) -> int:
    """Elements ``t`` stands for: ``quant_state.shape`` of a packed 4-bit tensor, else ``numel``."""
    shape = getattr(getattr(t, "quant_state", None), "shape", None)
    return math.prod(shape) if isinstance(shape, torch.Size) else t.numel()


def _packed_buffer_weights(model: nn.Module) -> int:
    """Weights held as packed integer ``weight`` buffers of Linear-like modules (frozen)."""
    total = 0
    for module in model.modules():
        w = module._buffers.get("weight")
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if (
            isinstance(w, torch.Tensor) and not w.is_floating_point()
            and isinstance(in_f, int) and isinstance(out_f, int)
        ):
            total += in_f * out_f
    return total


@dataclass(frozen=True)
class TrainableSummary:
    """Trainable and total parameter counts; ``str()`` prints them like PEFT does."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {self.percent:.4f}"
        )


def trainable_parameters_summary(model: nn.Module) -> TrainableSummary:
    """Trainable and all parameters of ``model`` (PEFT's ``print_trainable_parameters``).

    ``print()`` the result for PEFT's one-line format. Shared parameters count once; quantised
    weights count as the weights they represent (module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    total = trainable = 0
    for p in model.parameters():  # each parameter once, even if shared
        n = logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return TrainableSummary(trainable=trainable, total=total + _packed_buffer_weights(model))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    check_bool("trainable_only", trainable_only)
    summary = trainable_parameters_summary(model)
    return summary.trainable if trainable_only else summary.total
