"""TinyGPT: the small decoder-only transformer the course fine-tunes.

One readable file in the spirit of nanoGPT's ``model.py``. The layer names follow LLaMA and
PEFT so that ``target_modules=["q_proj", "v_proj"]`` means here what it means on a real model::

    TinyGPT
    ├── tok_emb, pos_emb            token and learned absolute position embeddings
    ├── blocks[i]                   n_layer pre-norm transformer blocks
    │   ├── attn_norm               RMSNorm
    │   ├── attn.q_proj / k_proj / v_proj / o_proj      (d_model -> d_model, no bias)
    │   ├── mlp_norm                RMSNorm
    │   └── mlp.up_proj / down_proj                     (d_model -> d_ff -> d_model, no bias)
    ├── norm                        final RMSNorm
    └── lm_head                     (d_model -> vocab_size)

``forward(idx)`` returns logits of shape ``(B, T, vocab_size)``; :func:`lm_loss` turns them
into a cross-entropy over the positions a mask selects (the answer tokens of a task).

Attention goes through a single call site, :func:`causal_attention`:
``course_lib.utils.flash_attention.flash_attention_forward`` (PyTorch's SDPA, with standard
attention as its fallback; :func:`~course_lib.utils.flash_attention.attention_backend` switches
a whole model to the naive or tiled path).

The pretrained weights ship in ``course_lib/assets/`` and are produced by
``python -m course_lib.pretrain``; :func:`load_pretrained` verifies their SHA-256 checksum.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from course_lib.utils.flash_attention import default_backend, flash_attention_forward
from course_lib.utils.params import count_parameters
from course_lib.validation import (
    check_bool,
    check_choice,
    check_number,
    check_probability,
    positive_int,
)

__all__ = [
    "TinyGPTConfig",
    "TinyGPT",
    "RMSNorm",
    "CausalSelfAttention",
    "MLP",
    "Block",
    "causal_attention",
    "attention_implementation",
    "lm_loss",
    "ASSETS_DIR",
    "WEIGHTS_FILE",
    "MANIFEST_FILE",
    "REGENERATE_COMMAND",
    "ChecksumError",
    "sha256_file",
    "save_pretrained",
    "load_pretrained",
]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_FILE = ASSETS_DIR / "tinygpt.safetensors"
MANIFEST_FILE = ASSETS_DIR / "tinygpt.json"
REGENERATE_COMMAND = "python -m course_lib.pretrain"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TinyGPTConfig:
    vocab_size: int = 15  # course_lib.data.TOKENIZER: <pad>, <eos>, digits 0-9, '+', '-', '='
    block_size: int = 16  # longest sequence the position embedding covers (tasks use <= 13 tokens)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads; head size hs = d_model // n_head = 32
    d_model: int = 128  # width of the residual stream (embedding size)
    d_ff: int = 512  # hidden width of the MLP (4 * d_model, as in GPT-2)
    dropout: float = 0.0  # dropout on attention output and MLP output; 0 keeps runs deterministic
    norm_eps: float = 1e-5  # epsilon inside RMSNorm
    gradient_checkpointing: bool = False  # recompute each block in backward to save activations

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            positive_int(f"TinyGPTConfig.{name}", getattr(self, name))
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"TinyGPTConfig.d_model ({self.d_model}) must be divisible by "
                f"n_head ({self.n_head})"
            )
        check_probability("TinyGPTConfig.dropout", self.dropout)
        check_number("TinyGPTConfig.norm_eps", self.norm_eps, low=0.0, low_inclusive=False)
        check_bool("TinyGPTConfig.gradient_checkpointing", self.gradient_checkpointing)

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TinyGPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown TinyGPTConfig field(s) {unknown}; allowed fields: {sorted(known)}"
            )
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Attention call site
# --------------------------------------------------------------------------------------------


def attention_implementation() -> str:
    """The path :func:`causal_attention` takes now: ``flash_attention_forward``'s default backend.

    ``"auto"`` (PyTorch's SDPA) unless a :func:`~course_lib.utils.flash_attention.attention_backend`
    block chose another one (``"naive"``, ``"tiled"``, ``"flash"``, ...).
    """
    return default_backend()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal scaled dot-product attention of ``(B, nh, T, hs)`` tensors -> ``(B, nh, T, hs)``.

    The single attention call site of TinyGPT: :func:`flash_attention_forward`.
    """
    return flash_attention_forward(q, k, v, causal=True)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (LLaMA): ``x / rms(x) * weight``, no mean subtraction."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x * rms * self.weight


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections (LLaMA names)."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, d_model)
        # project, then split the channels into heads: (B, T, C) -> (B, nh, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        y = causal_attention(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.dropout(self.o_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: ``down_proj(gelu(up_proj(x)))``."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up_proj(x))  # (B, T, d_ff)
        return self.dropout(self.down_proj(h))  # (B, T, d_model)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # (B, T, d_model)
        x = x + self.mlp(self.mlp_norm(x))  # (B, T, d_model)
        return x


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class TinyGPT(nn.Module):
    """A compact decoder-only language model; ``forward(idx)`` -> logits ``(B, T, vocab_size)``."""

    def __init__(self, config: TinyGPTConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else TinyGPTConfig()
        c = self.config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.block_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- gradient checkpointing (same method names as Hugging Face transformers) --------------
    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations during backward instead of storing them."""
        self.config.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.config.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.config.gradient_checkpointing

    # -- forward -------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(
                f"idx must be a (B, T) tensor of token ids with dtype torch.long, "
                f"got shape {tuple(idx.shape)} and dtype {idx.dtype}"
            )
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length T={T} exceeds config.block_size={self.config.block_size}"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, d_model)
        use_checkpoint = self.config.gradient_checkpointing and self.training
        for block in self.blocks:
            if use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)  # (B, T, d_model)
        return self.lm_head(x)  # (B, T, vocab_size)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
        return count_parameters(self, trainable_only)


def lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of next-token ``logits`` (B, T, V) against ``targets`` (B, T).

    ``mask`` (B, T), bool or 0/1, selects the positions that count (e.g. the answer tokens);
    ``None`` counts every position. ``reduction="mean"`` averages over the selected tokens,
    ``"sum"`` adds them up (what gradient accumulation needs, see ``course_lib.train``).
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and targets (B, T); got logits {tuple(logits.shape)} "
            f"and targets {tuple(targets.shape)}"
        )
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)  # (B, T)
    if mask is None:
        mask = torch.ones_like(targets, dtype=per_token.dtype)
    else:
        if mask.shape != targets.shape:
            raise ValueError(
                f"mask must have the shape of targets {tuple(targets.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if reduction == "sum":
        return total
    count = mask.sum()
    if count == 0:
        raise ValueError("mask selects no token: cannot average the loss over zero tokens")
    return total / count


# --------------------------------------------------------------------------------------------
# Pretrained weights: safetensors file + JSON manifest with config and SHA-256 checksum
# --------------------------------------------------------------------------------------------


class ChecksumError(RuntimeError):
    """The weights file on disk does not match the checksum in its manifest."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_pretrained(
    model: TinyGPT,
    weights_path: str | Path = WEIGHTS_FILE,
    manifest_path: str | Path | None = None,
    extra: dict | None = None,
) -> dict:
    """Write ``model``'s weights (fp32 safetensors) and a manifest with config and checksum.

    The manifest defaults to the weights path with a ``.json`` suffix. Returns the manifest.
    """
    from safetensors.torch import save_file

    weights_path = Path(weights_path)
    manifest_path = Path(manifest_path) if manifest_path else weights_path.with_suffix(".json")
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    config = model.config.to_dict()
    config["gradient_checkpointing"] = False  # a training-time choice, not part of the weights
    # One metadata entry only: safetensors stores the metadata map in an arbitrary key order, so
    # a second key would make the bytes (and the checksum) differ from run to run.
    save_file(state, str(weights_path), metadata={"config": json.dumps(config, sort_keys=True)})
    weights_path.chmod(0o644)  # safetensors creates the file owner-only; it is a shared asset
    manifest = {
        "file": weights_path.name,
        "sha256": sha256_file(weights_path),
        "bytes": weights_path.stat().st_size,
        "config": config,
        "regenerate": REGENERATE_COMMAND,
        **(extra or {}),
    }
    manifest_path.write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return manifest


def load_pretrained(
    weights_path: str | Path = WEIGHTS_FILE,
    manifest_path: str | Path | None = None,
    verify: bool = True,
) -> TinyGPT:
    """Load the course's pretrained TinyGPT, verifying the file's SHA-256 against its manifest.

    Raises ``FileNotFoundError`` for a missing weights file or manifest and
    :class:`ChecksumError` for a corrupted or modified file; both messages name the file and
    the command that regenerates it (``python -m course_lib.pretrain``).
    """
    from safetensors.torch import load_file

    weights_path = Path(weights_path)
    manifest_path = Path(manifest_path) if manifest_path else weights_path.with_suffix(".json")
    for path, what in ((weights_path, "weights file"), (manifest_path, "manifest")):
        if not path.is_file():
            raise FileNotFoundError(
                f"TinyGPT {what} not found: {path}. Regenerate the pretrained weights with "
                f"`{REGENERATE_COMMAND}` (run it from the repository root)."
            )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if verify:
        actual = sha256_file(weights_path)
        if actual != manifest.get("sha256"):
            raise ChecksumError(
                f"TinyGPT weights file {weights_path} is corrupted or was modified: its SHA-256 "
                f"is {actual}, but {manifest_path.name} expects {manifest.get('sha256')}. "
                f"Restore it (e.g. `git checkout -- {weights_path.name}` in its folder) or "
                f"regenerate it with `{REGENERATE_COMMAND}`."
            )
    model = TinyGPT(TinyGPTConfig.from_dict(manifest["config"]))
    state = load_file(str(weights_path))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model
