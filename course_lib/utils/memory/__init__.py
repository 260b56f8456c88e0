"""Where the memory of a training step goes: measured on a live model, estimated for any size.

Training keeps five kinds of bytes alive (notebook ``05_memory_compute_tradeoffs``):

==================  ==============================================================================
weights             every parameter and buffer (frozen or trainable, LoRA adapters included)
quant constants     what a quantised weight needs besides its codes (NF4 absmax, nested absmax, ...)
gradients           one ``.grad`` per trainable parameter
optimizer state     AdamW's two moments (fp32, or 8-bit codes + blockwise absmax), step counters
activations         the tensors autograd saves in the forward pass for the backward pass
==================  ==============================================================================

plus, in the estimator only, ``master_weights`` (an fp32 copy of 16-bit trainable weights for
mixed precision) and ``recompute`` (with gradient checkpointing, the activations of the one block
that is being recomputed during the backward pass). Both sides return a :class:`MemoryBreakdown`
(:mod:`.breakdown`), so a measurement and an estimate compare row by row.

- :mod:`.measure` -- **measuring** a live model: :func:`measure_training_step`,
  :func:`weight_bytes`, :func:`quantization_constant_bytes`, :func:`gradient_bytes`,
  :func:`optimizer_state_bytes`, :class:`SavedTensorsMeter`, counting unique storages.
- **estimating** from shapes: :mod:`.specs` (:class:`TransformerSpec`, :data:`PRESETS`: the
  course's TinyGPT, LLaMA-7B/13B/33B/65B, the GPT-2 sizes; :func:`lora_target_layers`),
  :mod:`.activations` (:func:`activation_bytes`) and :mod:`.estimate` (:func:`estimate_memory`
  for full fine-tuning, LoRA and QLoRA). On the course model the estimate equals the
  measurement exactly.

Units (:mod:`course_lib.utils.units`): budgets and estimates in decimal ``GB`` (10^9 bytes, the
lesson's "a 7B model needs 28 GB"), measured tensors in binary ``MiB`` / ``GiB``; say which with
``format_bytes(n, "decimal")`` or ``format_bytes(n, "binary")``.
"""

from course_lib.utils.memory.activations import (
    ActivationEstimate,
    activation_bytes,
    korthikanti_activation_bytes,
)
from course_lib.utils.memory.breakdown import (
    CATEGORIES,
    CATEGORY_LABELS,
    MemoryBreakdown,
    comparison_table,
)
from course_lib.utils.memory.estimate import (
    ADAMW8BIT_BLOCKSIZE,
    ADAMW8BIT_MIN_SIZE,
    OPTIMIZERS,
    adamw_state_bytes,
    bits_per_parameter,
    estimate_memory,
    quantized_weight_bytes,
)
from course_lib.utils.memory.measure import (
    CONSTANT_BUFFER_NAMES,
    SavedTensorsMeter,
    dtype_name,
    gradient_bytes,
    measure_training_step,
    optimizer_state_bytes,
    quantization_constant_bytes,
    quantization_constant_tensors,
    storage_key,
    unique_storage_bytes,
    weight_bytes,
)
from course_lib.utils.memory.specs import (
    FLOAT_DTYPES,
    METHODS,
    PRESETS,
    WEIGHT_DTYPES,
    LinearSpec,
    TransformerSpec,
    get_preset,
    lora_target_layers,
    preset_names,
)
from course_lib.utils.units import GB, MB, format_bytes

__all__ = [
    "GB",
    "MB",
    "CATEGORIES",
    "CATEGORY_LABELS",
    "WEIGHT_DTYPES",
    "FLOAT_DTYPES",
    "METHODS",
    "OPTIMIZERS",
    "ADAMW8BIT_MIN_SIZE",
    "ADAMW8BIT_BLOCKSIZE",
    "CONSTANT_BUFFER_NAMES",
    "MemoryBreakdown",
    "dtype_name",
    "format_bytes",
    "storage_key",
    "unique_storage_bytes",
    "quantization_constant_tensors",
    "weight_bytes",
    "quantization_constant_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "SavedTensorsMeter",
    "measure_training_step",
    "LinearSpec",
    "TransformerSpec",
    "PRESETS",
    "get_preset",
    "preset_names",
    "bits_per_parameter",
    "quantized_weight_bytes",
    "adamw_state_bytes",
    "lora_target_layers",
    "ActivationEstimate",
    "activation_bytes",
    "korthikanti_activation_bytes",
    "estimate_memory",
    "comparison_table",
]
