"""The shapes a memory estimate works from: transformer specs, presets, LoRA target layers.

:class:`TransformerSpec` describes a decoder-only transformer by its sizes and its layout
(``arch``: LLaMA, GPT-2 or the course's TinyGPT), with the Hugging Face / course layer names so
that LoRA targets mean the same thing here as on a real model (:func:`lora_target_layers` uses
PEFT's rule from :mod:`course_lib.model.targets`). :data:`PRESETS` holds real shapes
(LLaMA-7B/13B/33B/65B, the four GPT-2 sizes); :func:`get_preset` also builds the course model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from course_lib.model.targets import ALL_LINEAR, matches, normalise_targets
from course_lib.validation import check_bool, check_choice, positive_int

__all__ = [
    "FLOAT_DTYPES",
    "WEIGHT_DTYPES",
    "METHODS",
    "ARCHS",
    "LinearSpec",
    "TransformerSpec",
    "PRESETS",
    "get_preset",
    "preset_names",
    "as_spec",
    "lora_target_layers",
]

FLOAT_DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per element
WEIGHT_DTYPES = ("fp32", "fp16", "bf16", "int8", "nf4", "nf4-dq")
METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a transformer block: ``name`` is its dotted path inside the block."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


ARCHS = ("llama", "gpt2", "tinygpt")


@dataclass(frozen=True)
class TransformerSpec:
    """The shapes of a decoder-only transformer, enough to count its memory.

    ``arch`` fixes the layer layout and names (as in the Hugging Face / course modules, so LoRA
    targets mean the same thing):

    - ``"llama"``: ``attn.q_proj/k_proj/v_proj/o_proj``, gated MLP ``mlp.gate_proj/up_proj/
      down_proj``, RMSNorm, rotary positions (no position parameters), untied head, no biases.
    - ``"gpt2"``: fused ``attn.c_attn`` (d -> 3d) and ``attn.c_proj``, ``mlp.c_fc`` /
      ``mlp.c_proj``, LayerNorm (weight and bias), learned positions, tied head, biases.
    - ``"tinygpt"``: the course model (``course_lib.model.tinygpt``): q/k/v/o, ``mlp.up_proj`` /
      ``mlp.down_proj`` with GELU, RMSNorm, learned positions, untied head, no biases.
    """

    name: str
    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int  # context length (the size of the learned position table, if any)
    dropout: bool = False  # dropout layers active in training (they save 1-byte masks)
    fused_norm: bool = True  # a fused norm kernel saves only its input (+ statistics)
    loss_mask: bool = False  # the loss multiplies by a float mask (course_lib's lm_loss)

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ARCHS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            positive_int(name, getattr(self, name))
        for name in ("dropout", "fused_norm", "loss_mask"):
            check_bool(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )

    # -- layout -------------------------------------------------------------------------------
    @property
    def gated_mlp(self) -> bool:
        return self.arch == "llama"

    @property
    def norm(self) -> str:
        return "layernorm" if self.arch == "gpt2" else "rmsnorm"

    @property
    def learned_positions(self) -> bool:
        return self.arch in ("gpt2", "tinygpt")

    @property
    def tied_head(self) -> bool:
        return self.arch == "gpt2"

    @property
    def bias(self) -> bool:
        return self.arch == "gpt2"

    def block_linears(self) -> tuple[LinearSpec, ...]:
        """The linear layers of one block, in forward order."""
        h, f, b = self.d_model, self.d_ff, self.bias
        if self.arch == "gpt2":
            return (
                LinearSpec("attn.c_attn", h, 3 * h, b),
                LinearSpec("attn.c_proj", h, h, b),
                LinearSpec("mlp.c_fc", h, f, b),
                LinearSpec("mlp.c_proj", f, h, b),
            )
        attn = tuple(LinearSpec(f"attn.{n}", h, h, b) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if self.arch == "llama":
            mlp = (
                LinearSpec("mlp.gate_proj", h, f, b),
                LinearSpec("mlp.up_proj", h, f, b),
                LinearSpec("mlp.down_proj", f, h, b),
            )
        else:
            mlp = (LinearSpec("mlp.up_proj", h, f, b), LinearSpec("mlp.down_proj", f, h, b))
        return attn + mlp

    def layer_roles(self) -> dict[str, Any]:
        lin = {spec.name: spec for spec in self.block_linears()}
        if self.arch == "gpt2":
            return {"attn_in": ["attn.c_attn"], "attn_out": "attn.c_proj",
                    "mlp_in": ["mlp.c_fc"], "mlp_out": "mlp.c_proj", "lin": lin}
        mlp_in = ["mlp.gate_proj", "mlp.up_proj"] if self.gated_mlp else ["mlp.up_proj"]
        return {"attn_in": ["attn.q_proj", "attn.k_proj", "attn.v_proj"], "attn_out": "attn.o_proj",
                "mlp_in": mlp_in, "mlp_out": "mlp.down_proj", "lin": lin}

    # -- parameter counts ---------------------------------------------------------------------
    def norm_params(self) -> int:
        """Parameters of one norm layer (RMSNorm: weight; LayerNorm: weight and bias)."""
        return 2 * self.d_model if self.norm == "layernorm" else self.d_model

    def param_groups(self) -> dict[str, int]:
        """Parameter elements by role: block linear weights, biases, norms, embeddings, head."""
        lin = self.block_linears()
        groups = {
            "linear_weights": self.n_layers * sum(s.numel for s in lin),
            "linear_biases": self.n_layers * sum(s.out_features for s in lin if s.bias),
            "norms": (2 * self.n_layers + 1) * self.norm_params(),
            "token_embedding": self.vocab_size * self.d_model,
            "position_embedding": self.max_seq_len * self.d_model if self.learned_positions else 0,
            "lm_head": 0 if self.tied_head else self.vocab_size * self.d_model,
        }
        return groups

    @property
    def n_params(self) -> int:
        """Total parameter elements (a tied head counts once)."""
        return sum(self.param_groups().values())

    def parameter_tensors(self) -> list[tuple[str, int, int]]:
        """``(role, numel, out_features)`` of every parameter tensor (a tied head once).

        ``out_features`` is the number of output rows of a linear weight, 0 for other tensors.
        """
        h = self.d_model
        norm = [("norms", h, 0)] * (2 if self.norm == "layernorm" else 1)
        out: list[tuple[str, int, int]] = [("token_embedding", self.vocab_size * h, 0)]
        if self.learned_positions:
            out.append(("position_embedding", self.max_seq_len * h, 0))
        for _ in range(self.n_layers):
            out += norm * 2
            for s in self.block_linears():
                out.append(("linear_weights", s.numel, s.out_features))
                if s.bias:
                    out.append(("linear_biases", s.out_features, 0))
        out += norm
        if not self.tied_head:
            out.append(("lm_head", self.vocab_size * h, 0))
        return out

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_tinygpt(cls, config: Any = None, name: str = "tinygpt") -> TransformerSpec:
        """The spec of a course ``TinyGPT`` with ``config`` (default: ``TinyGPTConfig()``)."""
        from course_lib.model.tinygpt import TinyGPTConfig

        if config is None:
            config = TinyGPTConfig()
        if not isinstance(config, TinyGPTConfig):
            raise TypeError(f"config must be a TinyGPTConfig, got {type(config).__name__}")
        return cls(
            name=name,
            arch="tinygpt",
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            n_layers=config.n_layer,
            n_heads=config.n_head,
            d_ff=config.d_ff,
            max_seq_len=config.block_size,
            dropout=config.dropout > 0,
            fused_norm=False,
            loss_mask=True,
        )

    @classmethod
    def llama(
        cls, name: str, d_model: int, n_layers: int, n_heads: int, d_ff: int,
        vocab_size: int = 32000, max_seq_len: int = 2048,
    ) -> TransformerSpec:
        """A LLaMA-style model (gated MLP, RMSNorm, rotary positions, untied head, no bias)."""
        return cls(name, "llama", vocab_size, d_model, n_layers, n_heads, d_ff, max_seq_len)

    @classmethod
    def gpt2(
        cls, name: str, d_model: int, n_layers: int, n_heads: int,
        vocab_size: int = 50257, max_seq_len: int = 1024, dropout: bool = True,
    ) -> TransformerSpec:
        """A GPT-2-style model (d_ff = 4 d_model, LayerNorm, learned positions, tied head)."""
        return cls(
            name, "gpt2", vocab_size, d_model, n_layers, n_heads, 4 * d_model, max_seq_len, dropout
        )


PRESETS: dict[str, TransformerSpec] = {
    "llama-7b": TransformerSpec.llama("llama-7b", 4096, 32, 32, 11008),
    "llama-13b": TransformerSpec.llama("llama-13b", 5120, 40, 40, 13824),
    "llama-33b": TransformerSpec.llama("llama-33b", 6656, 60, 52, 17920),
    "llama-65b": TransformerSpec.llama("llama-65b", 8192, 80, 64, 22016),
    "gpt2-124m": TransformerSpec.gpt2("gpt2-124m", 768, 12, 12),
    "gpt2-355m": TransformerSpec.gpt2("gpt2-355m", 1024, 24, 16),
    "gpt2-774m": TransformerSpec.gpt2("gpt2-774m", 1280, 36, 20),
    "gpt2-1.5b": TransformerSpec.gpt2("gpt2-1.5b", 1600, 48, 25),
}
"""Real shapes. ``"tinygpt"`` (the course model) is built on demand by :func:`get_preset`."""


def preset_names() -> tuple[str, ...]:
    """Every preset name: the course model first, then the real shapes."""
    return ("tinygpt", *PRESETS)


def get_preset(name: str) -> TransformerSpec:
    """The spec called ``name`` (see :func:`preset_names`)."""
    if check_choice("preset", name, preset_names()) == "tinygpt":
        return TransformerSpec.from_tinygpt()
    return PRESETS[name]


def as_spec(spec: TransformerSpec | str) -> TransformerSpec:
    """``spec`` itself, or the preset it names."""
    if isinstance(spec, str):
        return get_preset(spec)
    if not isinstance(spec, TransformerSpec):
        raise TypeError(f"spec must be a TransformerSpec or a preset name, got {spec!r}")
    return spec


def lora_target_layers(
    spec: TransformerSpec | str, targets: Sequence[str] | str
) -> tuple[LinearSpec, ...]:
    """The block linears that ``targets`` selects, by PEFT's rule (:mod:`course_lib.model.targets`).

    A list entry matches a layer's name inside the block or its dotted suffix (``"c_proj"``
    matches ``attn.c_proj`` and ``mlp.c_proj``); a string is a regular expression that must
    match the whole name inside the block (e.g. ``"attn\\..*"``); ``"all-linear"`` selects
    every block linear (the output head is never a block linear). An entry or a regex that
    matches no layer is a ``ValueError`` naming the layers there are.
    """
    spec = as_spec(spec)
    linears = spec.block_linears()
    targets = normalise_targets(targets, "lora_targets")
    if targets == ALL_LINEAR:
        return linears
    chosen = tuple(s for s in linears if matches(s.name, targets))
    rules = [targets] if isinstance(targets, str) else [[t] for t in targets]
    unmatched = [rule for rule in rules if not any(matches(s.name, rule) for s in linears)]
    if unmatched:
        names = sorted({s.short_name for s in linears})
        raise ValueError(
            f"lora_targets {targets!r}: {unmatched} matched no linear layer of {spec.name!r}; "
            f"its layers are {names} (or use 'all-linear')"
        )
    return chosen
