"""Tests of course_lib.utils.memory: exact accounting, saved activations, the estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import course_lib  # noqa: F401  (filters bitsandbytes' import warning before it is imported)
from course_lib.model.lora import LoRAConfig, apply_lora
from course_lib.model.nf4 import quantize_nf4
from course_lib.model.tinygpt import TinyGPT, TinyGPTConfig, lm_loss
from course_lib.utils.memory import (
    ADAMW8BIT_BLOCKSIZE,
    GB,
    PRESETS,
    MemoryBreakdown,
    SavedTensorsMeter,
    TransformerSpec,
    activation_bytes,
    adamw_state_bytes,
    bits_per_parameter,
    comparison_table,
    dtype_name,
    estimate_memory,
    format_bytes,
    get_preset,
    gradient_bytes,
    korthikanti_activation_bytes,
    lora_target_layers,
    measure_training_step,
    optimizer_state_bytes,
    preset_names,
    quantization_constant_bytes,
    quantized_weight_bytes,
    unique_storage_bytes,
    weight_bytes,
)

# ---------------------------------------------------------------------------------------------
# Exact accounting on small modules whose sizes are known by construction
# ---------------------------------------------------------------------------------------------


def test_weight_bytes_counts_each_dtype_and_buffers():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5, bias=False).to(torch.bfloat16))
    model.register_buffer("running", torch.zeros(7, dtype=torch.float64))
    assert weight_bytes(model) == {"fp32": (10 * 20 + 20) * 4, "bf16": 20 * 5 * 2, "fp64": 7 * 8}


def test_tied_and_view_sharing_tensors_count_once():
    emb = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied, as GPT-2's head
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert weight_bytes(model) == {"fp32": 50 * 8 * 4}
    base = torch.zeros(100)
    assert unique_storage_bytes([base, base[10:20], base.view(10, 10)]) == 400
    assert unique_storage_bytes([base, torch.zeros(3)]) == 412


def test_gradient_bytes_only_trainable_and_present():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    assert gradient_bytes(model) == 0
    model[0].requires_grad_(False)
    model(torch.randn(2, 6)).sum().backward()
    assert gradient_bytes(model) == (4 * 3 + 3) * 4


def test_adamw_state_is_two_fp32_moments_and_a_step_per_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 2, bias=False))
    opt = torch.optim.AdamW(model.parameters())
    assert optimizer_state_bytes(opt) == 0  # no state before the first step
    model(torch.randn(3, 32)).sum().backward()
    opt.step()
    sizes = [32 * 16, 16, 16 * 2]
    assert optimizer_state_bytes(opt) == sum(8 * n + 4 for n in sizes)
    assert optimizer_state_bytes(opt) == adamw_state_bytes(sizes, "adamw")


def test_sgd_without_momentum_has_no_state():
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == 0 == adamw_state_bytes([16, 4], "sgd")


def test_bitsandbytes_adamw8bit_state_measured_equals_formula():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    # two tensors big enough for 8-bit state (>= 4096 elements, one not a multiple of 256)
    # and two small ones that keep 32-bit state
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 37))
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    sizes = [64 * 128, 128, 128 * 37, 37]
    measured = optimizer_state_bytes(opt)
    assert measured == adamw_state_bytes(sizes, "adamw8bit")
    blocks = math.ceil(128 * 37 / ADAMW8BIT_BLOCKSIZE)
    assert measured == (
        2 * 8192 + 8 * 32 + 2 * 4736 + 8 * blocks + 8 * (128 + 37) + 2 * 256 * 4
    )
    assert measured < optimizer_state_bytes_fp32(model)


def test_adamw8bit_formula_follows_bitsandbytes_min_8bit_size():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 37))
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=128)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    sizes = [64 * 128, 128, 128 * 37, 37]
    measured = optimizer_state_bytes(opt)
    assert measured == adamw_state_bytes(sizes, "adamw8bit", min_8bit_size=128)
    assert measured != adamw_state_bytes(sizes, "adamw8bit")
    # a smaller block size means more absmax constants (one fp32 per block and state)
    assert adamw_state_bytes([4096], "adamw8bit", blocksize=64) == (
        2 * 4096 + 8 * 64 + 2 * 256 * 4
    )
    with pytest.raises(ValueError, match="blocksize"):
        adamw_state_bytes([4096], "adamw8bit", blocksize=0)


def optimizer_state_bytes_fp32(model: nn.Module) -> int:
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    return optimizer_state_bytes(opt)


def test_bitsandbytes_linear4bit_weights_and_constants():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit, Params4bit

    torch.manual_seed(0)
    for dq in (False, True):
        layer = Linear4bit(256, 96, bias=False, quant_type="nf4", compress_statistics=dq)
        layer.weight = Params4bit(
            torch.randn(96, 256), requires_grad=False, quant_type="nf4", compress_statistics=dq
        )._quantize("cpu")
        n = 96 * 256
        data, const = quantized_weight_bytes(n, "nf4-dq" if dq else "nf4")
        assert weight_bytes(layer) == {"nf4": data}
        codebooks = 16 * 4 + (256 * 4 if dq else 0)  # bitsandbytes stores its maps per state
        assert quantization_constant_bytes(layer) == const + codebooks


class PackedNF4(nn.Module):
    """A minimal quantised layer: packed codes as a buffer, the course NF4State as attribute."""

    def __init__(self, w: torch.Tensor, double_quant: bool) -> None:
        super().__init__()
        packed, self.state = quantize_nf4(w, 64, double_quant)
        self.register_buffer("packed", packed)


class BufferNF4(nn.Module):
    """Codes and absmax both registered as buffers (detected by the buffer's name)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        packed, state = quantize_nf4(w, 64, False)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)


def test_course_nf4_state_and_named_buffers_are_constants():
    torch.manual_seed(0)
    w = torch.randn(40, 64)
    n = w.numel()
    for dq in (False, True):
        layer = PackedNF4(w, dq)
        data, const = quantized_weight_bytes(n, "nf4-dq" if dq else "nf4")
        assert weight_bytes(layer) == {"uint8": data}
        dynamic_map = 256 * 4 if dq else 0
        assert quantization_constant_bytes(layer) == const + dynamic_map
        assert const == layer.state.constants_nbytes()
    layer = BufferNF4(w)
    assert weight_bytes(layer) == {"uint8": n // 2}
    assert quantization_constant_bytes(layer) == 4 * (n // 64)


def test_saved_tensors_meter_counts_unique_storages_and_skips_parameters():
    torch.manual_seed(0)
    x = torch.randn(100, requires_grad=True)
    with SavedTensorsMeter() as meter:
        a = x.sin()  # saves x
        b = x.cos()  # saves x again
        c = x[:50].exp()  # saves its result (a new 50-element storage)
    assert meter.calls >= 3
    assert meter.count == 2
    assert meter.nbytes == 100 * 4 + 50 * 4
    (a.sum() + b.sum() + c.sum()).backward()

    lin = nn.Linear(30, 20)
    inp = torch.randn(5, 30)
    with SavedTensorsMeter(lin) as meter:
        out = lin(inp)  # saves the input (and the weight, which is excluded)
    assert meter.nbytes == 5 * 30 * 4
    out.sum().backward()
    with torch.no_grad(), SavedTensorsMeter(lin) as meter:
        lin(inp)
    assert meter.nbytes == 0 and meter.count == 0


def test_measure_training_step_on_a_small_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(10, 8)
    mem = measure_training_step(model, lambda: model(x).pow(2).mean(), opt, label="mlp")
    n = 8 * 16 + 16 + 16 * 4 + 4
    assert mem.weights == 4 * n and mem.weights_by_dtype == {"fp32": 4 * n}
    assert mem.gradients == 4 * n
    assert mem.optimizer_state == 8 * n + 4 * 4
    assert mem.parameters == n == mem.trainable_parameters
    # x (input of linear 1, its weight is trained), relu output (kept by relu and as input of
    # linear 2), the output (kept by pow)
    assert mem.activations == 4 * (10 * 8 + 10 * 16 + 10 * 4)
    assert mem.total == mem.weights + mem.gradients + mem.optimizer_state + mem.activations
    assert "mlp" in mem.table() and "activations" in str(mem)


def test_measure_training_step_rejects_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        measure_training_step("model", lambda: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scalar tensor that requires grad"):
        measure_training_step(model, lambda: model(torch.ones(1, 2)))
    with pytest.raises(TypeError, match="optimizer must be"):
        measure_training_step(model, lambda: model(torch.ones(1, 2)).sum(), optimizer=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The estimator on the course model: exact for weights, gradients, optimiser state
# ---------------------------------------------------------------------------------------------

SMALL = dict(vocab_size=16, block_size=16, n_layer=2, n_head=4, d_model=64, d_ff=256)


def _course_step(config: TinyGPTConfig, method: str, targets, rank: int, optimizer: str, B: int, T: int):
    torch.manual_seed(0)
    model = TinyGPT(config)
    model.train()
    if method == "lora":
        model.requires_grad_(False)
        apply_lora(model, LoRAConfig(r=rank, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=g)
    tgt = torch.randint(0, config.vocab_size, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    measured = measure_training_step(model, lambda: lm_loss(model(idx), tgt, mask), opt)
    estimated = estimate_memory(
        TransformerSpec.from_tinygpt(config), method, batch_size=B, seq_len=T,
        lora_targets=targets, lora_rank=rank, optimizer=optimizer,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    return measured, estimated


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    "method,targets,rank",
    [("full", None, 8), ("lora", ["q_proj", "v_proj"], 8), ("lora", "all-linear", 4)],
)
def test_estimate_matches_measurement_on_the_course_model(method, targets, rank, checkpointing):
    config = TinyGPTConfig(**SMALL, gradient_checkpointing=checkpointing)
    measured, estimated = _course_step(
        config, method, targets or ["q_proj", "v_proj"], rank, "adamw", B=6, T=12
    )
    assert estimated.weights == measured.weights
    assert estimated.weights_by_dtype == measured.weights_by_dtype
    assert estimated.gradients == measured.gradients
    assert estimated.optimizer_state == measured.optimizer_state
    assert estimated.trainable_parameters == measured.trainable_parameters
    assert estimated.parameters == measured.parameters
    assert abs(estimated.activations - measured.activations) <= 0.15 * measured.activations
    assert (estimated.recompute > 0) == checkpointing
    assert "ratio" in comparison_table(measured, estimated)


def test_estimate_matches_measurement_on_the_default_course_model():
    measured, estimated = _course_step(TinyGPTConfig(), "full", ["q_proj"], 8, "adamw", B=8, T=16)
    assert (estimated.weights, estimated.gradients, estimated.optimizer_state) == (
        measured.weights, measured.gradients, measured.optimizer_state,
    )
    assert abs(estimated.activations - measured.activations) <= 0.15 * measured.activations


def test_estimate_matches_adamw8bit_on_the_course_model():
    pytest.importorskip("bitsandbytes")
    for method in ("full", "lora"):
        measured, estimated = _course_step(
            TinyGPTConfig(**SMALL), method, ["q_proj", "v_proj"], 8, "adamw8bit", B=4, T=8
        )
        assert estimated.optimizer_state == measured.optimizer_state


def test_checkpointing_and_lora_reduce_measured_activations():
    config = TinyGPTConfig(**SMALL)
    full, _ = _course_step(config, "full", ["q_proj"], 8, "adamw", B=6, T=12)
    lora, _ = _course_step(config, "lora", ["q_proj", "v_proj"], 8, "adamw", B=6, T=12)
    ckpt, _ = _course_step(
        TinyGPTConfig(**SMALL, gradient_checkpointing=True), "full", ["q_proj"], 8, "adamw", 6, 12
    )
    assert ckpt.activations < lora.activations < full.activations
    assert lora.gradients < full.gradients / 10
    assert lora.optimizer_state < full.optimizer_state / 10


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_estimate_matches_measurement_on_the_course_qlora_model(double_quant, checkpointing):
    from course_lib.model.qlora import QLoRAModel, QuantizationConfig

    torch.manual_seed(0)
    config = TinyGPTConfig(**SMALL)
    qconfig = QuantizationConfig(bnb_4bit_use_double_quant=double_quant, backend="torch")
    model = QLoRAModel(
        TinyGPT(config), qconfig, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    ).prepare_for_training(gradient_checkpointing=checkpointing)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 16, (5, 10), generator=g)
    measured = measure_training_step(model, lambda: lm_loss(model(idx), idx), opt)
    estimated = estimate_memory(
        TransformerSpec.from_tinygpt(config), "qlora", batch_size=5, seq_len=10,
        weight_dtype="nf4-dq" if double_quant else "nf4", compute_dtype="fp32", lora_rank=4,
        gradient_checkpointing=checkpointing,
    )
    for category in ("weights", "quant_constants", "gradients", "optimizer_state"):
        assert getattr(estimated, category) == getattr(measured, category), category
    assert estimated.parameters == measured.parameters
    assert abs(estimated.activations - measured.activations) <= 0.15 * measured.activations
    # the library's own footprint agrees on the quantised storage
    footprint = model.memory_footprint()
    assert footprint.weights_4bit == measured.weights_by_dtype["uint8"]
    assert footprint.quant_constants == measured.quant_constants


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_matches_the_pretrained_course_model_on_real_batches(method, checkpointing):
    from course_lib.data import ADAPT_TASK, make_batch, make_split
    from course_lib.model.tinygpt import load_pretrained

    model = load_pretrained().train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    if method == "lora":
        model.requires_grad_(False)
        apply_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    batch = make_batch(make_split(ADAPT_TASK, 24, 0, seed=3)[0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    measured = measure_training_step(
        model, lambda: lm_loss(model(batch.inputs), batch.targets, batch.mask), opt
    )
    B, T = batch.inputs.shape
    estimated = estimate_memory(
        TransformerSpec.from_tinygpt(model.config), method, batch_size=B, seq_len=T,
        lora_rank=8, lora_targets=["q_proj", "v_proj"], gradient_checkpointing=checkpointing,
    )
    assert (estimated.weights, estimated.gradients, estimated.optimizer_state) == (
        measured.weights, measured.gradients, measured.optimizer_state,
    )
    assert abs(estimated.activations - measured.activations) <= 0.15 * measured.activations
    assert get_preset("tinygpt").n_params == sum(
        p.numel() for p in load_pretrained().parameters()
    )


def test_bitsandbytes_qlora_backend_differs_only_by_its_per_layer_codebooks():
    pytest.importorskip("bitsandbytes")
    from course_lib.model.qlora import QLoRAModel, QuantizationConfig

    torch.manual_seed(0)
    config = TinyGPTConfig(**SMALL)
    qconfig = QuantizationConfig(bnb_4bit_use_double_quant=True, backend="bitsandbytes")
    model = QLoRAModel(TinyGPT(config), qconfig, LoRAConfig(r=4)).prepare_for_training()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    idx = torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(2))
    measured = measure_training_step(model, lambda: lm_loss(model(idx), idx), opt)
    spec = TransformerSpec.from_tinygpt(config)
    estimated = estimate_memory(
        spec, "qlora", batch_size=3, seq_len=8, compute_dtype="fp32", lora_rank=4
    )
    assert measured.weights_by_dtype["nf4"] == estimated.weights_by_dtype["nf4"]
    assert measured.weights == estimated.weights
    n_quantised = spec.n_layers * len(spec.block_linears())
    # bitsandbytes keeps its 16-entry NF4 table and 256-entry map in every layer's quant_state
    assert measured.quant_constants == estimated.quant_constants + n_quantised * (16 + 256) * 4
    assert measured.parameters == estimated.parameters
    assert measured.activations == pytest.approx(estimated.activations, rel=0.15)


def test_tinygpt_preset_follows_the_config():
    spec = get_preset("tinygpt")
    config = TinyGPTConfig()
    assert (spec.d_model, spec.n_layers, spec.d_ff, spec.vocab_size) == (
        config.d_model, config.n_layer, config.d_ff, config.vocab_size,
    )
    assert spec.n_params == TinyGPT(config).num_parameters()
    with pytest.raises(TypeError, match="TinyGPTConfig"):
        TransformerSpec.from_tinygpt({"d_model": 8})


# ---------------------------------------------------------------------------------------------
# Real shapes: the published figures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params",
    [
        ("llama-7b", 6_738_415_616),
        ("llama-13b", 13_015_864_320),
        ("llama-33b", 32_528_943_616),
        ("llama-65b", 65_285_660_672),
        ("gpt2-124m", 124_439_808),
        ("gpt2-355m", 354_823_168),
        ("gpt2-774m", 774_030_080),
        ("gpt2-1.5b", 1_557_611_200),
    ],
)
def test_preset_parameter_counts_are_the_published_ones(name, params):
    assert get_preset(name).n_params == params


@pytest.mark.slow
def test_presets_match_hugging_face_architectures_on_the_meta_device():
    transformers = pytest.importorskip("transformers")
    for name, spec in PRESETS.items():
        if spec.arch == "llama":
            config = transformers.LlamaConfig(
                vocab_size=spec.vocab_size, hidden_size=spec.d_model,
                intermediate_size=spec.d_ff, num_hidden_layers=spec.n_layers,
                num_attention_heads=spec.n_heads, tie_word_embeddings=False,
            )
            cls = transformers.LlamaForCausalLM
        else:
            config = transformers.GPT2Config(
                n_embd=spec.d_model, n_layer=spec.n_layers, n_head=spec.n_heads
            )
            cls = transformers.GPT2LMHeadModel
        with torch.device("meta"):
            model = cls(config)
        assert sum(p.numel() for p in model.parameters()) == spec.n_params, name
        # weights measured from the real module (tied head once; LLaMA adds rotary buffers)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        assert weight_bytes(model)["fp32"] == 4 * spec.n_params + buffers, name


def test_llama_7b_fp32_weights_are_about_28_gb():
    est = estimate_memory("llama-7b", "full", weight_dtype="fp32")
    assert 6.7e9 <= est.parameters <= 6.75e9
    assert 26.5 * GB <= est.weights <= 28.5 * GB
    assert format_bytes(est.weights, "decimal") == "27.0 GB"
    # AdamW's fp32 moments double it again
    assert est.optimizer_state == pytest.approx(2 * est.weights, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_qlora_65b_fits_in_48_gb(optimizer):
    est = estimate_memory(
        "llama-65b", "qlora", weight_dtype="nf4-dq", lora_rank=64, lora_targets="all-linear",
        optimizer=optimizer, batch_size=1, seq_len=512, gradient_checkpointing=True,
    )
    assert est.total < 48 * GB
    assert est.fits(48) and not est.fits(24)
    # the frozen 4-bit base dominates: about 65e9 * 4.127 / 8 bytes of codes and constants
    assert est.weights_by_dtype["nf4"] + est.quant_constants == pytest.approx(
        PRESETS["llama-65b"].param_groups()["linear_weights"] * bits_per_parameter("nf4-dq") / 8,
        rel=1e-3,
    )
    assert est.trainable_parameters < 0.015 * est.parameters


def test_16bit_full_finetuning_of_65b_needs_more_than_780_gb():
    est = estimate_memory("llama-65b", "full", weight_dtype="bf16", batch_size=1, seq_len=512)
    assert est.total > 780 * GB
    # 2 (weights) + 2 (gradients) + 8 (AdamW) bytes per parameter
    assert est.weights + est.gradients + est.optimizer_state == pytest.approx(
        12 * est.parameters, rel=1e-6
    )
    with_master = estimate_memory(
        "llama-65b", "full", weight_dtype="bf16", master_weights=True, batch_size=1, seq_len=512
    )
    assert with_master.total - est.total == 4 * est.parameters


def test_bits_per_parameter_of_each_weight_dtype():
    assert bits_per_parameter("fp32") == 32 and bits_per_parameter("bf16") == 16
    assert bits_per_parameter("int8") == 8
    assert bits_per_parameter("nf4") == 4.5
    assert bits_per_parameter("nf4-dq") == pytest.approx(4.127, abs=1e-3)
    assert bits_per_parameter("nf4-dq") == 4 + 8 / 64 + 32 / (64 * 256)
    # per tensor, the exact bytes approach the asymptotic rate
    data, const = quantized_weight_bytes(4096 * 4096, "nf4-dq")
    assert 8 * (data + const) / (4096 * 4096) == pytest.approx(4.127, abs=1e-3)
    assert quantized_weight_bytes(1000, "int8", out_features=10) == (1000, 40)
    with pytest.raises(ValueError, match="out_features is required"):
        quantized_weight_bytes(1000, "int8")


def test_activation_model_reproduces_korthikanti_for_a_gpt_layer():
    s, b = 1024, 4
    spec = get_preset("gpt2-124m")
    h, a, L = spec.d_model, spec.n_heads, spec.n_layers
    est = activation_bytes(spec, b, s, method="full", dtype="fp16", flash_attention=False)
    layernorm_stats = 2 * (2 * 4 * s * b)  # mean and rstd in fp32, two LayerNorms per layer
    for per_layer in est.per_block:
        assert per_layer == korthikanti_activation_bytes(s, b, h, a) + layernorm_stats
    flash = activation_bytes(spec, b, s, method="full", dtype="fp16", flash_attention=True)
    lse = 4 * a * s * b
    assert est.per_block[0] - flash.per_block[0] == 5 * a * s * s * b - lse
    assert korthikanti_activation_bytes(s, b, h, a, L, flash_attention=True) == L * 34 * s * b * h


def test_activations_scale_with_batch_and_shrink_with_checkpointing():
    base = activation_bytes("llama-7b", 1, 512, dtype="bf16")
    double = activation_bytes("llama-7b", 2, 512, dtype="bf16")
    assert double.saved == 2 * base.saved
    ckpt = activation_bytes("llama-7b", 1, 512, dtype="bf16", gradient_checkpointing=True)
    assert all(p == 512 * 4096 * 2 for p in ckpt.per_block)  # one bf16 block input each
    assert ckpt.recompute == max(base.per_block)
    assert ckpt.saved < base.saved / 5
    # without flash attention the s^2 term grows quadratically
    short = activation_bytes("llama-7b", 1, 512, dtype="bf16", flash_attention=False)
    long = activation_bytes("llama-7b", 1, 2048, dtype="bf16", flash_attention=False)
    assert long.saved > 4 * short.saved


def test_lora_keeps_fewer_activations_than_full_finetuning_but_not_few():
    full = activation_bytes("llama-7b", 1, 512, method="full")
    lora = activation_bytes("llama-7b", 1, 512, method="lora", lora_targets=["q_proj", "v_proj"])
    assert 0.4 * full.saved < lora.saved < full.saved  # pitfall 3: activations remain


def test_lora_dtype_cast_keeps_a_copy_of_the_input():
    same = activation_bytes("llama-7b", 1, 64, method="lora", dtype="bf16", lora_dtype="bf16")
    cast = activation_bytes("llama-7b", 1, 64, method="lora", dtype="bf16", lora_dtype="fp32")
    assert cast.saved > same.saved


def test_lora_target_matching_follows_peft_suffix_rule():
    names = [s.name for s in lora_target_layers("gpt2-124m", ["c_proj"])]
    assert names == ["attn.c_proj", "mlp.c_proj"]
    assert len(lora_target_layers("llama-7b", "all-linear")) == 7
    with pytest.raises(ValueError, match=r"\['query'\]\] matched no linear layer.*'q_proj'"):
        lora_target_layers("llama-7b", ["query", "q_proj"])
    # a string is a regular expression over the whole name inside the block, as in PEFT
    names = [s.name for s in lora_target_layers("llama-7b", r"attn\.(q|v)_proj")]
    assert names == ["attn.q_proj", "attn.v_proj"]
    with pytest.raises(ValueError, match="matched no linear layer"):
        lora_target_layers("llama-7b", "q_proj")  # the full name is attn.q_proj
    with pytest.raises(ValueError, match="non-empty list of module names"):
        lora_target_layers("llama-7b", [])
    with pytest.raises(TypeError, match="lora_targets must be"):
        lora_target_layers("llama-7b", 5)


def test_lora_parameters_counted_per_target_and_rank():
    spec = get_preset("llama-7b")
    est = estimate_memory(spec, "lora", weight_dtype="bf16", lora_rank=16, lora_targets=["q_proj", "v_proj"])
    assert est.trainable_parameters == spec.n_layers * 2 * 16 * (4096 + 4096)
    assert est.gradients == 2 * est.trainable_parameters  # LoRA in bf16 by default
    assert est.parameters == spec.n_params + est.trainable_parameters


def test_estimate_rejects_bad_arguments_with_clear_messages():
    with pytest.raises(ValueError, match=r"method must be one of \('full', 'lora', 'qlora'\)"):
        estimate_memory("llama-7b", "adapter")
    with pytest.raises(ValueError, match="method='qlora'"):
        estimate_memory("llama-7b", "lora", weight_dtype="nf4")
    with pytest.raises(ValueError, match="weight_dtype='int8' is not allowed with method='full'"):
        estimate_memory("llama-7b", "full", weight_dtype="int8")
    with pytest.raises(ValueError, match="master_weights=True"):
        estimate_memory("llama-7b", "full", weight_dtype="fp32", master_weights=True)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_memory("llama-7b", optimizer="adam")
    with pytest.raises(ValueError, match="exceeds 'gpt2-124m'"):
        estimate_memory("gpt2-124m", seq_len=2048)
    with pytest.raises(ValueError, match="preset must be one of"):
        estimate_memory("llama-70b")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        estimate_memory("llama-7b", batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be a positive int"):
        estimate_memory("llama-7b", batch_size=2.0)
    with pytest.raises(TypeError, match="gradient_checkpointing must be True or False"):
        estimate_memory("llama-7b", gradient_checkpointing=1)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        estimate_memory("llama-7b", compute_dtype="fp8")
    with pytest.raises(ValueError, match="lora_dtype must be one of"):
        estimate_memory("llama-7b", "lora", lora_dtype="int8")
    with pytest.raises(TypeError, match="lora_rank must be a positive int"):
        estimate_memory("llama-7b", "lora", lora_rank="8")
    with pytest.raises(ValueError, match="arch must be one of"):
        TransformerSpec("x", "bert", 10, 32, 1, 4, 8, 16)
    with pytest.raises(TypeError, match="dropout must be True or False"):
        TransformerSpec("x", "llama", 10, 32, 1, 4, 8, 16, dropout=0.1)
    with pytest.raises(TypeError, match="spec must be a TransformerSpec or a preset name"):
        estimate_memory(42)
    with pytest.raises(ValueError, match="d_model .* divisible by n_heads"):
        TransformerSpec("x", "llama", 10, 30, 1, 4, 8, 16)


def test_estimates_are_ordered_full_lora_qlora():
    kw = dict(batch_size=1, seq_len=512, gradient_checkpointing=True)
    full = estimate_memory("llama-13b", "full", weight_dtype="bf16", **kw)
    lora = estimate_memory("llama-13b", "lora", weight_dtype="bf16", **kw)
    qlora = estimate_memory("llama-13b", "qlora", **kw)
    assert qlora.total < lora.total < full.total
    assert lora.gradients < full.gradients / 100
    assert qlora.weights < lora.weights / 3


def test_breakdown_helpers():
    b = MemoryBreakdown(weights=3, gradients=4, activations=5, label="x")
    assert b.total == 12
    assert list(b.as_dict()) == [
        "weights", "quant_constants", "gradients", "optimizer_state", "master_weights",
        "activations", "recompute",
    ]
    assert dtype_name(torch.bfloat16) == "bf16" and dtype_name(torch.int16) == "int16"
    assert format_bytes(999, "decimal") == "999 B"
    assert format_bytes(1_234_567, "decimal") == "1.23 MB"
    assert format_bytes(783.4e9, "decimal") == "783 GB"
    big = MemoryBreakdown(weights=3 * 2**20)
    assert "3.15 MB" in big.table() and "3.00 MiB" in big.table(units="binary")
    assert str(big) == big.table()
    assert big.fits(0.01) and not big.fits(0.003)
    with pytest.raises(TypeError, match="capacity_gb must be a number"):
        big.fits("48")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        dtype_name("bf16")
    assert preset_names()[0] == "tinygpt" and "llama-65b" in preset_names()
