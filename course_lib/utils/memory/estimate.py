"""Estimating the memory of a fine-tuning step from shapes alone: full, LoRA and QLoRA.

:func:`estimate_memory` works from a :class:`~course_lib.utils.memory.specs.TransformerSpec`
(or a preset name such as ``"llama-65b"``) in four steps: the base weights and quantisation
constants, tensor by tensor with the rules the libraries use (:func:`quantized_weight_bytes`);
the trained tensors (every parameter, or the LoRA adapters); the activations
(:func:`~course_lib.utils.memory.activations.activation_bytes`); and what training adds per
trained element: gradients, optimiser state (:func:`adamw_state_bytes`) and an optional fp32
master copy. On the course model every category equals the measurement exactly.

Units: ``GB`` is 10^9 bytes, as in the lesson ("a 7B model needs 28 GB for its fp32 weights")
and the QLoRA paper. GPU cards are sold as 24/48/80 "GB" but hold that many GiB (7 % more), so a
budget that fits under a 48 GB line fits the card.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from course_lib.utils.memory.activations import activation_bytes, lora_dtype_of
from course_lib.utils.memory.breakdown import MemoryBreakdown
from course_lib.utils.memory.specs import (
    FLOAT_DTYPES,
    METHODS,
    WEIGHT_DTYPES,
    TransformerSpec,
    as_spec,
    lora_target_layers,
)
from course_lib.validation import check_bool, check_choice, positive_int

__all__ = [
    "OPTIMIZERS",
    "ADAMW8BIT_MIN_SIZE",
    "ADAMW8BIT_BLOCKSIZE",
    "estimate_memory",
    "bits_per_parameter",
    "quantized_weight_bytes",
    "adamw_state_bytes",
]

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
ADAMW8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors with fewer elements
ADAMW8BIT_BLOCKSIZE = 256  # elements per absmax of bitsandbytes' blockwise 8-bit optimiser state
_QMAP_BYTES = 2 * 256 * 4  # AdamW8bit's two 256-entry fp32 quantisation maps, shared by all tensors
_ALLOWED_WEIGHTS = {  # base weight dtypes each method allows
    "full": tuple(FLOAT_DTYPES),
    "lora": (*FLOAT_DTYPES, "int8"),
    "qlora": ("nf4", "nf4-dq"),
}


def estimate_memory(
    spec: TransformerSpec | str,
    method: str = "full",
    *,
    batch_size: int = 1,
    seq_len: int | None = None,
    weight_dtype: str | None = None,
    compute_dtype: str | None = None,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | str = ("q_proj", "v_proj"),
    lora_dtype: str | None = None,
    optimizer: str = "adamw",
    master_weights: bool = False,
    gradient_checkpointing: bool = False,
    flash_attention: bool = True,
    quant_blocksize: int = 64,
) -> MemoryBreakdown:
    """Estimate the memory of one training step of ``spec`` (a :class:`TransformerSpec` or a
    preset name such as ``"llama-65b"``).

    Args:
        method: ``"full"`` (every parameter trained), ``"lora"`` (frozen base, adapters on
            ``lora_targets``) or ``"qlora"`` (LoRA on a base whose block linears are 4-bit).
        batch_size, seq_len: sequences per step and tokens per sequence (default
            ``min(512, context)``).
        weight_dtype: storage of the base weights: ``"fp32"`` / ``"fp16"`` / ``"bf16"`` (full and
            LoRA; default fp32), ``"int8"`` (LoRA on an 8-bit base), ``"nf4"`` / ``"nf4-dq"``
            (QLoRA; default ``"nf4-dq"``, double quantisation). Only the block linears are
            quantised; embeddings, norms, biases and the head stay in ``compute_dtype``.
        compute_dtype: dtype of activations and unquantised tensors (default: ``weight_dtype``
            when it is a float, else ``"bf16"``).
        lora_rank, lora_targets, lora_dtype: the adapters (``lora_targets`` a list of layer
            names or ``"all-linear"``; ``lora_dtype`` defaults to ``compute_dtype``).
        optimizer: ``"adamw"`` (fp32 moments), ``"adamw8bit"`` (bitsandbytes' blockwise 8-bit)
            or ``"sgd"`` (no state); see :func:`adamw_state_bytes`. Paged optimisers hold the
            same bytes; they only move them to CPU memory when the GPU runs out.
        master_weights: keep an fp32 copy of 16-bit trainable weights (mixed precision).
        gradient_checkpointing: keep only each block's input, recompute the rest in backward.
        flash_attention: attention through a fused kernel (no ``s x s`` matrix saved).
        quant_blocksize: values per absmax block of the 4-bit and 8-bit quantisation.

    Returns a :class:`MemoryBreakdown` whose ``weights_by_dtype`` splits the weights. Codebooks
    are left out of ``quant_constants``: the course's ``NF4Linear`` stores none per layer, while
    bitsandbytes keeps its 16-entry NF4 table (and, with double quantisation, its 256-entry map)
    in every layer's ``quant_state`` -- 1,088 bytes per layer, which a measurement counts.
    """
    spec = as_spec(spec)
    full = check_choice("method", method, METHODS) == "full"
    weight_dtype, compute_dtype = _base_dtypes(method, weight_dtype, compute_dtype)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_bool("master_weights", master_weights)
    positive_int("quant_blocksize", quant_blocksize)
    seq_len = min(512, spec.max_seq_len) if seq_len is None else seq_len
    lora_dtype = None if full else lora_dtype_of(lora_dtype, compute_dtype)
    trained_dtype = weight_dtype if full else lora_dtype
    if master_weights and FLOAT_DTYPES[trained_dtype] == 4:
        raise ValueError(
            "master_weights=True keeps an fp32 copy of 16-bit trainable weights, but the trained "
            f"weights are already {trained_dtype}; use a 16-bit weight_dtype (full) or "
            "lora_dtype (LoRA), or master_weights=False"
        )

    # Step 1: the base weights and their quantisation constants, tensor by tensor.
    by_dtype, constants = _base_weight_bytes(spec, weight_dtype, compute_dtype, quant_blocksize)
    # Step 2: the trained tensors: every parameter, or the LoRA adapters (stored next to the base).
    trained = _trained_numels(spec, full, lora_rank, lora_targets)
    n_trained = sum(trained)
    if not full:
        by_dtype[lora_dtype] = by_dtype.get(lora_dtype, 0) + n_trained * FLOAT_DTYPES[lora_dtype]
    # Step 3: the activations the forward pass saves for the backward pass.
    acts = activation_bytes(
        spec, batch_size, seq_len, method=method, dtype=compute_dtype, lora_targets=lora_targets,
        lora_rank=lora_rank, lora_dtype=lora_dtype, gradient_checkpointing=gradient_checkpointing,
        flash_attention=flash_attention,
    )
    # Step 4: what training adds per trained element: its gradient, the optimiser state and,
    # with mixed precision, an fp32 master copy.
    label = (
        f"{spec.name} {method} ({weight_dtype} weights" + ("" if full else f", r={lora_rank}")
        + f", {optimizer}, b={batch_size}, s={seq_len}"
        + (", checkpointing" if gradient_checkpointing else "") + ")"
    )
    return MemoryBreakdown(
        weights=sum(by_dtype.values()),
        quant_constants=constants,
        gradients=n_trained * FLOAT_DTYPES[trained_dtype],
        optimizer_state=adamw_state_bytes(trained, optimizer),
        master_weights=4 * n_trained if master_weights else 0,
        activations=acts.saved,
        recompute=acts.recompute,
        weights_by_dtype=by_dtype,
        parameters=spec.n_params + (0 if full else n_trained),
        trainable_parameters=n_trained,
        label=label,
    )


def _base_dtypes(
    method: str, weight_dtype: str | None, compute_dtype: str | None
) -> tuple[str, str]:
    """The storage dtype of the base weights and the compute dtype, defaults filled in."""
    if weight_dtype is None:
        weight_dtype = "nf4-dq" if method == "qlora" else "fp32"
    check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    if weight_dtype not in _ALLOWED_WEIGHTS[method]:
        hint = " (4-bit base weights: use method='qlora')" if weight_dtype.startswith("nf4") else ""
        raise ValueError(
            f"weight_dtype={weight_dtype!r} is not allowed with method={method!r}; "
            f"allowed: {_ALLOWED_WEIGHTS[method]}{hint}"
        )
    if compute_dtype is None:
        compute_dtype = weight_dtype if weight_dtype in FLOAT_DTYPES else "bf16"
    return weight_dtype, check_choice("compute_dtype", compute_dtype, tuple(FLOAT_DTYPES))


def _base_weight_bytes(
    spec: TransformerSpec, weight_dtype: str, compute_dtype: str, blocksize: int
) -> tuple[dict[str, int], int]:
    """``({dtype: bytes}, constant bytes)`` of the base model: block linears in
    ``weight_dtype``; embeddings, norms, biases and the head in the nearest float dtype."""
    by_dtype: dict[str, int] = {}
    constants = 0
    other = weight_dtype if weight_dtype in FLOAT_DTYPES else compute_dtype
    for role, numel, rows in spec.parameter_tensors():
        if role == "linear_weights":
            data, const = quantized_weight_bytes(numel, weight_dtype, rows, blocksize)
            label = "nf4" if weight_dtype.startswith("nf4") else weight_dtype
            constants += const
        else:
            data, label = numel * FLOAT_DTYPES[other], other
        by_dtype[label] = by_dtype.get(label, 0) + data
    return by_dtype, constants


def _trained_numels(
    spec: TransformerSpec, full: bool, lora_rank: int, lora_targets: Sequence[str] | str
) -> list[int]:
    """Elements of each trained tensor: every parameter, or each layer's ``A`` and ``B``."""
    if full:
        return [numel for _, numel, _ in spec.parameter_tensors()]
    r = positive_int("lora_rank", lora_rank)
    return [
        numel
        for s in lora_target_layers(spec, lora_targets)
        for numel in (r * s.in_features, s.out_features * r)  # A (r x in) and B (out x r)
        for _ in range(spec.n_layers)
    ]


def bits_per_parameter(weight_dtype: str, blocksize: int = 64, dq_blocksize: int = 256) -> float:
    """Storage bits per weight for large tensors (codes + constants).

    fp32 32, fp16/bf16 16, int8 8 (plus one fp32 scale per output row, negligible), nf4
    ``4 + 32/blocksize`` (4.5 at 64) and nf4 with double quantisation
    ``4 + 8/blocksize + 32/(blocksize * dq_blocksize)`` (about 4.127).
    """
    check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    positive_int("blocksize", blocksize)
    positive_int("dq_blocksize", dq_blocksize)
    if weight_dtype in FLOAT_DTYPES:
        return 8.0 * FLOAT_DTYPES[weight_dtype]
    if weight_dtype == "int8":
        return 8.0
    if weight_dtype == "nf4":
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)


def quantized_weight_bytes(
    numel: int, weight_dtype: str, out_features: int | None = None, blocksize: int = 64,
    dq_blocksize: int = 256,
) -> tuple[int, int]:
    """``(data bytes, constant bytes)`` of one weight tensor of ``numel`` elements.

    Blockwise over the flattened tensor, as bitsandbytes and ``course_lib.model.nf4`` do:

    - nf4: ``ceil(n/2)`` bytes of packed codes + one fp32 absmax per block;
    - nf4-dq: the same codes + one uint8 absmax per block + one fp32 absmax per
      ``dq_blocksize`` blocks + one fp32 offset;
    - int8: ``n`` bytes + one fp32 scale per output row (``out_features`` is required);
    - fp32/fp16/bf16: ``n * element size`` and no constants.
    """
    n = positive_int("numel", numel)
    check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    positive_int("blocksize", blocksize)
    if weight_dtype in FLOAT_DTYPES:
        return n * FLOAT_DTYPES[weight_dtype], 0
    if weight_dtype == "int8":
        if out_features is None:
            raise ValueError("out_features is required for weight_dtype='int8' (one scale per row)")
        return n, 4 * positive_int("out_features", out_features)
    codes = (n + 1) // 2
    blocks = -(-n // blocksize)
    if weight_dtype == "nf4":
        return codes, 4 * blocks
    return codes, blocks + 4 * (-(-blocks // dq_blocksize)) + 4


def adamw_state_bytes(
    numels: Iterable[int],
    optimizer: str = "adamw",
    *,
    min_8bit_size: int = ADAMW8BIT_MIN_SIZE,
    blocksize: int = ADAMW8BIT_BLOCKSIZE,
) -> int:
    """Optimiser-state bytes for trainable tensors of the given sizes.

    - ``"adamw"``: two fp32 moments (8 bytes per element) and a 0-d fp32 ``step`` per tensor,
      as ``torch.optim.AdamW`` keeps them (and as mixed-precision trainers and bitsandbytes'
      32-bit/paged AdamW keep them for 16-bit parameters).
    - ``"adamw8bit"``: bitsandbytes' blockwise 8-bit AdamW: tensors with at least
      :data:`ADAMW8BIT_MIN_SIZE` elements keep two uint8 states (2 bytes per element) and two
      fp32 absmax per block of :data:`ADAMW8BIT_BLOCKSIZE`; smaller tensors keep fp32 states;
      the two 256-entry quantisation maps exist once; ``step`` is a Python int.
      ``min_8bit_size`` and ``blocksize`` change that threshold and the block size (as
      bitsandbytes' ``min_8bit_size`` argument does).
    - ``"sgd"``: plain SGD without momentum keeps nothing.
    """
    check_choice("optimizer", optimizer, OPTIMIZERS)
    sizes = [positive_int("numel", n) for n in numels]
    positive_int("min_8bit_size", min_8bit_size)
    positive_int("blocksize", blocksize)
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return sum(8 * n + 4 for n in sizes)
    total = 0
    any_8bit = False
    for n in sizes:
        if n >= min_8bit_size:
            any_8bit = True
            total += 2 * n + 2 * 4 * (-(-n // blocksize))
        else:
            total += 8 * n
    return total + (_QMAP_BYTES if any_8bit else 0)
