"""Estimating activations: what autograd saves in a forward pass, operation by operation.

:func:`activation_bytes` follows what each operation saves for its backward pass: a linear layer
keeps its input only when its weight is trained, a LoRA layer keeps its input and the rank-``r``
intermediate, attention keeps q, k, v, its output and the softmax statistics (with a fused/flash
kernel) or the ``s x s`` probabilities (without), and nothing upstream of the first trainable
parameter keeps anything. For a GPT block with 16-bit activations, dropout, fused LayerNorm and
no flash attention this is exactly the count of Korthikanti et al. (2022), ``34 s b h + 5 a s^2
b`` bytes per layer (:func:`korthikanti_activation_bytes`), plus the LayerNorm statistics they
neglect; flash attention removes the ``5 a s^2 b`` term. The course model's RMSNorm is written
in plain PyTorch, so its profile (:attr:`TransformerSpec.fused_norm` ``= False``) keeps ``x``,
``x * rms`` and ``rms``, which is what the course model was measured to save.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from course_lib.utils.memory.specs import (
    FLOAT_DTYPES,
    METHODS,
    TransformerSpec,
    as_spec,
    lora_target_layers,
)
from course_lib.validation import check_bool, check_choice, positive_int

__all__ = ["ActivationEstimate", "activation_bytes", "korthikanti_activation_bytes"]


@dataclass(frozen=True)
class ActivationEstimate:
    """Saved-activation bytes of one forward pass.

    ``saved``: kept from the forward pass until backward (embeddings + blocks + head + loss);
    ``per_block``: what each block keeps; ``recompute``: with gradient checkpointing, the
    largest block's full activations, alive while that block is recomputed during backward.
    """

    saved: int
    per_block: tuple[int, ...]
    embedding: int
    head: int
    recompute: int


def activation_bytes(
    spec: TransformerSpec | str,
    batch_size: int,
    seq_len: int,
    *,
    method: str = "full",
    dtype: str = "bf16",
    lora_targets: Sequence[str] | str = ("q_proj", "v_proj"),
    lora_rank: int = 8,
    lora_dtype: str | None = None,
    gradient_checkpointing: bool = False,
    flash_attention: bool = True,
) -> ActivationEstimate:
    """Bytes autograd saves in one forward pass of ``batch_size`` sequences of ``seq_len``.

    ``method="full"`` trains every parameter; ``"lora"`` / ``"qlora"`` train only LoRA adapters
    on ``lora_targets`` (a frozen linear layer keeps no input; layers before the first adapter
    keep nothing). ``dtype`` is the activation dtype (the compute dtype); LoRA layers in another
    ``lora_dtype`` keep a cast copy of their input. With ``gradient_checkpointing`` each block
    keeps only its input, and ``recompute`` reports the largest block's activations, alive while
    it is recomputed. ``flash_attention=False`` keeps the ``seq_len x seq_len`` probabilities.
    """
    spec = as_spec(spec)
    B = positive_int("batch_size", batch_size)
    T = positive_int("seq_len", seq_len)
    full = check_choice("method", method, METHODS) == "full"
    e = FLOAT_DTYPES[check_choice("dtype", dtype, tuple(FLOAT_DTYPES))]
    check_bool("gradient_checkpointing", gradient_checkpointing)
    check_bool("flash_attention", flash_attention)
    if spec.learned_positions and T > spec.max_seq_len:
        raise ValueError(
            f"seq_len={T} exceeds {spec.name!r}'s context of {spec.max_seq_len} positions"
        )
    lora: dict[str, tuple[int, int]] = {}
    if not full:
        rank = positive_int("lora_rank", lora_rank)
        lora_e = FLOAT_DTYPES[lora_dtype_of(lora_dtype, dtype)]
        lora = {s.name: (rank, lora_e) for s in lora_target_layers(spec, lora_targets)}
    embedding = _embedding_activations(spec, B, T, full)
    rg = full  # does the residual stream require grad yet?
    per_block: list[int] = []
    recompute = 0
    for _ in range(spec.n_layers):
        saver = _Saver(spec, B * T, e, full)
        nbytes, rg = _block_activations(saver, B, T, lora, rg, flash_attention)
        if gradient_checkpointing:
            recompute = max(recompute, nbytes)
            nbytes = B * T * spec.d_model * e  # the block input, kept for the recomputation
        per_block.append(nbytes)
    head = _head_activations(_Saver(spec, B * T, e, full), rg)
    return ActivationEstimate(
        saved=embedding + sum(per_block) + head,
        per_block=tuple(per_block),
        embedding=embedding,
        head=head,
        recompute=recompute,
    )


def lora_dtype_of(lora_dtype: str | None, compute_dtype: str) -> str:
    """The dtype of the LoRA adapters: ``lora_dtype``, by default the compute dtype."""
    dtype = compute_dtype if lora_dtype is None else lora_dtype
    return check_choice("lora_dtype", dtype, tuple(FLOAT_DTYPES))


def korthikanti_activation_bytes(
    seq_len: int, batch_size: int, d_model: int, n_heads: int, n_layers: int = 1,
    flash_attention: bool = False,
) -> int:
    """Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer
    Models", eq. (1): a GPT layer with 16-bit activations and dropout saves
    ``34 s b h + 5 a s^2 b`` bytes. A fused attention kernel never stores the ``s x s``
    probabilities (nor their dropout mask), which removes the ``5 a s^2 b`` term."""
    s, b = positive_int("seq_len", seq_len), positive_int("batch_size", batch_size)
    h, a = positive_int("d_model", d_model), positive_int("n_heads", n_heads)
    n = positive_int("n_layers", n_layers)
    check_bool("flash_attention", flash_attention)
    return n * (34 * s * b * h + (0 if flash_attention else 5 * a * s * s * b))


class _Saver:
    """What one part of the forward pass saves, by name: a tensor saved twice counts once.

    ``tokens`` is ``batch * seq_len``, ``e`` the bytes of an activation element, ``full``
    whether every parameter is trained.
    """

    def __init__(self, spec: TransformerSpec, tokens: int, e: int, full: bool) -> None:
        self.spec, self.tokens, self.e, self.full = spec, tokens, e, full
        self.saved: dict[str, int] = {}

    def save(self, name: str, nbytes: int) -> None:
        self.saved[name] = nbytes

    @property
    def total(self) -> int:
        return sum(self.saved.values())

    def norm(self, x: str, rg: bool, prefix: str) -> tuple[str, bool]:
        """A norm layer applied to ``x`` (which requires grad if ``rg``): its output's name and
        whether that requires grad."""
        n, h, e = self.tokens, self.spec.d_model, self.e
        if self.spec.fused_norm:  # one kernel: saves its input and per-token statistics
            if rg or self.full:
                self.save(x, n * h * e)
                self.save(prefix + ".stats", n * 4 * (2 if self.spec.norm == "layernorm" else 1))
        else:  # course RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, op by op
            if rg:
                self.save(x, n * h * e)  # by pow and by x * rms
                self.save(prefix + ".rms", n * e)  # by rsqrt and by x * rms
            if self.full:
                self.save(prefix + ".x_rms", n * h * e)  # by (x * rms) * weight, for its grad
        return prefix + ".out", rg or self.full


def _block_activations(
    s: _Saver, B: int, T: int, lora: Mapping[str, tuple[int, int]], rg_in: bool, flash: bool
) -> tuple[int, bool]:
    """Bytes one block saves and whether its output requires grad.

    ``lora`` maps a block linear's name to ``(rank, bytes per LoRA element)``; ``rg_in``: the
    block input requires grad (something upstream is trained).
    """
    spec, N, e, full = s.spec, s.tokens, s.e, s.full
    h, f, a = spec.d_model, spec.d_ff, spec.n_heads
    roles = spec.layer_roles()
    lin = roles["lin"]

    def linear(x: str, rg: bool, name: str) -> tuple[str, bool]:
        in_features = lin[name].in_features
        if full:  # weight's gradient needs the input
            s.save(x, N * in_features * e)
        if name in lora:
            r, lb = lora[name]
            if lb == e:
                s.save(x, N * in_features * e)  # the same tensor as the base input
            else:
                s.save(name + ".lora_x", N * in_features * lb)  # cast to the LoRA dtype
            s.save(name + ".lora_h", N * r * lb)  # x @ A^T, for B's gradient
        return name + ".out", rg or full or name in lora

    # attention
    n1, n1_rg = s.norm("x_in", rg_in, "norm1")
    outs = [linear(n1, n1_rg, name) for name in roles["attn_in"]]
    attn_rg = any(rg for _, rg in outs)
    attn_out = "attn.merged"
    if attn_rg:
        for (out, _), name in zip(outs, roles["attn_in"]):
            s.save(out, N * lin[name].out_features * e)  # q, k, v (views of c_attn's output)
        if flash:
            s.save("attn.out", N * h * e)  # kernel output = o_proj input
            s.save("attn.lse", B * a * T * 4)  # fp32 log-sum-exp per row
            attn_out = "attn.out"
        else:
            s.save("attn.probs", B * a * T * T * e)  # softmax output
            if spec.dropout:
                s.save("attn.drop_mask", B * a * T * T)
                s.save("attn.drop_out", B * a * T * T * e)
    _, o_rg = linear(attn_out, attn_rg, roles["attn_out"])
    if spec.dropout and o_rg:
        s.save("attn.resid_mask", N * h)
    rg_mid = rg_in or o_rg

    # MLP
    n2, n2_rg = s.norm("x_mid", rg_mid, "norm2")
    if spec.gated_mlp:
        (g, g_rg), (u, u_rg) = (linear(n2, n2_rg, name) for name in roles["mlp_in"])
        if g_rg:
            s.save(g, N * f * e)  # silu's input
            s.save(u, N * f * e)  # silu(g) * u keeps u for silu(g)'s gradient
        if u_rg:
            s.save("mlp.silu", N * f * e)  # ... and silu(g) for u's gradient
        act, act_rg = "mlp.prod", g_rg or u_rg
    else:
        up, up_rg = linear(n2, n2_rg, roles["mlp_in"][0])
        if up_rg:
            s.save(up, N * f * e)  # GELU's input
        act, act_rg = "mlp.act", up_rg
    _, d_rg = linear(act, act_rg, roles["mlp_out"])
    if spec.dropout and d_rg:
        s.save("mlp.resid_mask", N * h)
    return s.total, rg_mid or d_rg


def _embedding_activations(spec: TransformerSpec, B: int, T: int, full: bool) -> int:
    if not full:
        return 0
    total = B * T * 8  # token ids (int64), for the embedding's gradient
    if spec.learned_positions:
        total += T * 8  # position ids
    if spec.dropout:
        total += B * T * spec.d_model  # dropout mask
    return total


def _head_activations(s: _Saver, rg: bool) -> int:
    """The final norm, the output head and the loss."""
    N, h = s.tokens, s.spec.d_model
    s.norm("x_out", rg, "final_norm")
    if s.full:
        s.save("normed", N * h * s.e)  # the head's input, for the head's gradient
    if rg or s.full:
        s.save("log_softmax", N * s.spec.vocab_size * 4)  # the loss works in fp32
        s.save("targets", N * 8)
        if s.spec.loss_mask:
            s.save("mask", N * 4)
            s.save("scalars", 8)  # the token count and the summed loss
    return s.total
