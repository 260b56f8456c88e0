"""Which kernels PyTorch's ``F.scaled_dot_product_attention`` (SDPA) has, and forcing one of them.

SDPA is one function with several implementations ("backends" or kernels) behind it; by default
it runs the fastest one that accepts the inputs. This module names them the way the course does
(:data:`SDPA_BACKENDS`), says what each one needs (:data:`SDPA_REQUIREMENTS`), lists which ones
this PyTorch build has (:func:`sdpa_backends`), and restricts SDPA to one kernel with an error
that explains a refusal (:func:`only_kernel`). :mod:`course_lib.utils.flash_attention` uses it
for ``flash_attention_forward(..., backend="flash")`` and re-exports its public names.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "SDPA_BACKENDS",
    "SDPA_REQUIREMENTS",
    "SDPAKernelError",
    "sdpa_backends",
    "only_kernel",
    "backend_name",
]

# SDPA kernels by course name -> name of the member of torch.nn.attention.SDPBackend.
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
    "cudnn": "CUDNN_ATTENTION",
}

# What each SDPA kernel needs (PyTorch 2.x; the authoritative answer for *your* inputs is
# sdpa_backend_support(), which asks PyTorch itself). Shown in notebook 04 (pitfall 4).
SDPA_REQUIREMENTS = {
    "flash": (
        "CUDA: fp16/bf16 only, head_dim <= 256 (multiple of 8), sm80+ GPU for most head_dims, "
        "no arbitrary attn_mask (causal is fine). CPU: PyTorch's fused CPU kernel, any float "
        "dtype, masks allowed, no dropout."
    ),
    "efficient": (
        "CUDA only: fp32/fp16/bf16, supports attn_mask and dropout, head_dim multiple of 8 "
        "(or 4 for fp32)."
    ),
    "math": "Any device, any float dtype, any mask and dropout: the reference, materialises S.",
    "cudnn": "Recent NVIDIA GPUs (sm80+/sm90) with cuDNN >= 9: fp16/bf16, head_dim <= 128.",
}


class SDPAKernelError(RuntimeError):
    """One SDPA kernel cannot run the inputs; ``reason`` is PyTorch's explanation."""

    def __init__(self, backend: str, reason: str, inputs: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(
            f"SDPA backend {backend!r} cannot run these inputs ({inputs}). PyTorch says: "
            f"{reason}. It needs: {SDPA_REQUIREMENTS[backend]}"
        )


def sdpa_backends() -> dict[str, bool]:
    """Which SDPA kernels this PyTorch build has, and whether each is enabled.

    A kernel listed ``True`` may still refuse particular inputs (dtype, head_dim, mask):
    :func:`course_lib.utils.flash_attention.sdpa_backend_support` tries them on real inputs.
    """
    cuda = torch.cuda.is_available()
    bk = torch.backends.cuda
    return {
        # The CPU build has its own fused "flash" kernel; on CUDA it needs the flash build.
        "flash": (not cuda or bk.is_flash_attention_available()) and bk.flash_sdp_enabled(),
        "efficient": cuda and bk.mem_efficient_sdp_enabled(),
        "math": bk.math_sdp_enabled(),
        "cudnn": cuda and bk.cudnn_sdp_enabled(),
    }


def _reasons(caught: list[warnings.WarningMessage]) -> str:
    """PyTorch's explanations (from its warnings) of why SDPA kernels refused, tidied up."""
    texts = []
    for w in caught:
        text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message))
        text = " ".join(text.split())
        if text and text not in texts:
            texts.append(text)
    return " ".join(texts)


@contextlib.contextmanager
def only_kernel(name: str, device: torch.device, inputs: str) -> Iterator[None]:
    """Restrict SDPA to the kernel ``name`` (a key of :data:`SDPA_BACKENDS`) inside the block.

    If the kernel refuses the inputs, raise :class:`SDPAKernelError` with PyTorch's reasons
    (which it gives as warnings: they are collected instead of printed) and ``inputs``, a short
    description of the inputs.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])]):
                yield
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            reason = _reasons(caught)
            if not reason and device.type != "cuda" and name in ("efficient", "cudnn"):
                reason = f"the {name} kernel exists only for CUDA tensors; these are on {device}"
            raise SDPAKernelError(name, reason or str(exc), inputs) from exc


def backend_name(index: int) -> str:
    """The course name of the SDPBackend with this index (``torch._fused_sdp_choice``'s answer)."""
    member = SDPBackend(index).name
    names = {value: key for key, value in SDPA_BACKENDS.items()}
    return names.get(member, member.lower())
