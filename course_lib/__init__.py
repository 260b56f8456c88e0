"""course_lib: the library behind the PEFT & attention-performance course workbook.

The lesson's names are re-exported here (imported lazily, so ``import course_lib`` and the
``course`` command stay fast and do not import torch until a model class is used):

- :class:`LoRALayer`, :class:`LinearWithLoRA`  (``course_lib.model.lora``)
- :class:`QLoRAModel`                           (``course_lib.model.qlora``)
- :func:`flash_attention_forward`               (``course_lib.utils.flash_attention``)
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LoRALayer": "course_lib.model.lora",
    "LinearWithLoRA": "course_lib.model.lora",
    "QLoRAModel": "course_lib.model.qlora",
    "flash_attention_forward": "course_lib.utils.flash_attention",
}

__all__ = [*_EXPORTS, "__version__"]


def _drop_bitsandbytes_hub_kernel_warning(record: logging.LogRecord) -> bool:
    # On CPUs with AVX512-BF16, importing bitsandbytes 0.50 tries to fetch an optional fused
    # kernel from the Hugging Face hub and logs a warning to stderr when it cannot. The course
    # never downloads anything and bitsandbytes falls back to its own kernels, so this one
    # message is dropped (it would otherwise fail nbval, which treats stderr as output).
    return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bitsandbytes_hub_kernel_warning)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'course_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
