"""PEFT's adapter files for course_lib's LoRA layers (read and write).

An adapter directory holds two files, exactly as PEFT's ``save_pretrained`` writes them:

- ``adapter_config.json``: PEFT's ``LoraConfig`` fields (:func:`to_peft_dict`);
- ``adapter_model.safetensors``: for every wrapped module path ``p`` the tensors
  ``base_model.model.<p>.lora_A.weight`` (``r x in_features``) and ``...lora_B.weight``
  (``out_features x r``); PEFT's in-memory names with ``.default`` are read too.

So ``peft.PeftModel.from_pretrained`` loads what :func:`save_adapter` writes, and
:func:`load_adapter` loads what PEFT saves. The steps are separate functions (config to and from
PEFT's dict, tensor keys to and from module paths, one layer's tensors) so that a new PEFT field or
layer kind changes one of them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from course_lib.model.lora import (
    LinearWithLoRA,
    LoRAConfig,
    _candidates,
    _require_lora,
    apply_lora,
    lora_layers,
)
from course_lib.model.targets import ALL_LINEAR, describe_names, matches

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "save_adapter",
    "load_adapter",
    "to_peft_dict",
    "from_peft_dict",
    "parse_adapter_keys",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight")
_PARTS = ("lora_A", "lora_B")

# PEFT fields of LoRA variants and features this course does not implement, with the values that
# mean "off" (peft.LoraConfig's defaults). Any other value changes what PEFT computes, so loading
# it here would silently give other outputs: it is refused.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None,),
    "layers_pattern": (None, [], ""),
    "layer_replication": (None,),
    "exclude_modules": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "megatron_config": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False, None),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "use_bdlora": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "ensure_weight_tying": (False, None),
}
# What course_lib's LoRA implements (read into LoRAConfig).
_IMPLEMENTED = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
                "init_lora_weights")
# Fields that do not change what a loaded adapter computes: bookkeeping, and settings that only
# shape the initialisation (the loaded weights replace it) or where PEFT runs.
_METADATA = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "runtime_config", "megatron_core", "qalora_group_size",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})


def _check_fields(data: dict[str, Any], source: str) -> None:
    """Refuse every field that would make PEFT compute something course_lib does not."""
    for key, value in data.items():
        if key in _UNSUPPORTED and value not in _UNSUPPORTED[key]:
            raise ValueError(
                f"{source}: {key}={value!r} is not supported by course_lib's LoRA "
                f"(allowed: {' or '.join(repr(a) for a in _UNSUPPORTED[key])}; course_lib "
                f"implements plain LoRA with {', '.join(_IMPLEMENTED)})"
            )
        if key not in _UNSUPPORTED and key not in _METADATA and key not in _IMPLEMENTED:
            raise ValueError(
                f"{source}: unknown adapter field {key}={value!r}; course_lib's LoRA implements "
                f"{', '.join(_IMPLEMENTED)} and refuses fields it does not know, since they may "
                f"change the computation"
            )


# --------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------


def to_peft_dict(config: LoRAConfig) -> dict[str, Any]:
    """The fields of PEFT's ``adapter_config.json`` for ``config``."""
    targets = config.target_modules
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(targets) if isinstance(targets, list) else targets,
        "use_rslora": config.use_rslora,
        "init_lora_weights": config.init_lora_weights,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def from_peft_dict(data: dict[str, Any], source: str = "adapter config") -> LoRAConfig:
    """A :class:`LoRAConfig` from PEFT's ``adapter_config.json`` dict.

    A LoRA variant or feature this course does not implement (DoRA, aLoRA, bias training, rank
    patterns, ...) set to anything but its default, and any field not known to be harmless, is
    a ``ValueError`` naming the field and its value; metadata and initialisation-only fields
    are ignored.
    """
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type must be 'LORA', got {data.get('peft_type')!r}")
    _check_fields(data, source)
    if data.get("target_modules") is None:
        raise ValueError(f"{source}: target_modules is missing")
    known = {f.name for f in fields(LoRAConfig)}
    return LoRAConfig(**{k: v for k, v in data.items() if k in known})


def _config_from_layers(layers: list[tuple[str, LinearWithLoRA]]) -> LoRAConfig:
    first = layers[0][1].lora
    return LoRAConfig(
        r=first.r, lora_alpha=first.lora_alpha, lora_dropout=first.lora_dropout.p,
        target_modules=sorted(name for name, _ in layers), use_rslora=first.use_rslora,
        init_lora_weights=first.init_lora_weights,
    )


def _check_layers_match(layers: list[tuple[str, LinearWithLoRA]], config: LoRAConfig) -> None:
    want = (config.r, config.lora_alpha, config.use_rslora)
    for name, layer in layers:
        got = (layer.lora.r, layer.lora.lora_alpha, layer.lora.use_rslora)
        if got[0] != want[0] or not math.isclose(got[1], want[1]) or got[2] != want[2]:
            raise ValueError(
                f"LoRA layer {name!r} has r={got[0]}, lora_alpha={got[1]}, use_rslora={got[2]}, "
                f"but the config says r={want[0]}, lora_alpha={want[1]}, use_rslora={want[2]}"
            )


def _saved_targets(model: nn.Module, config: LoRAConfig, wrapped: list[str]) -> list[str] | str:
    """``config.target_modules`` if PEFT would select exactly the wrapped layers with it, else
    the list of wrapped paths (``'all-linear'`` is always written as that list)."""
    targets = config.target_modules
    if targets != ALL_LINEAR:
        selected = sorted(name for name, _ in _candidates(model) if matches(name, targets))
        if selected == sorted(wrapped):
            return targets
    return sorted(wrapped)


# --------------------------------------------------------------------------------------------
# adapter_model.safetensors
# --------------------------------------------------------------------------------------------


def _layer_tensors(name: str, layer: LinearWithLoRA) -> dict[str, torch.Tensor]:
    """The saved tensors of one layer, under PEFT's keys."""
    return {
        f"{KEY_PREFIX}{name}.{part}.weight": getattr(layer.lora, part).detach().cpu().contiguous()
        for part in _PARTS
    }


def parse_adapter_keys(
    tensors: dict[str, torch.Tensor], source: str
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"lora_A": tensor, "lora_B": tensor}}`` from PEFT-style keys.

    An unexpected key, or a module with only one of the two tensors, is a ``ValueError``.
    """
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{source}: unexpected key {key!r}; LoRA adapter keys look like "
                f"'base_model.model.<module path>.lora_A.weight' / '.lora_B.weight'"
            )
        found.setdefault(match.group(1), {})[match.group(2)] = tensor
    for name, pair in found.items():
        missing = [part for part in _PARTS if part not in pair]
        if missing:
            raise ValueError(f"{source}: module {name!r} has no {missing[0]} weight")
    return found


def _check_fits(
    name: str, layer: LinearWithLoRA, pair: dict[str, torch.Tensor], source: str
) -> None:
    if layer.merged:
        raise ValueError(f"LoRA layer {name!r} is merged; call unmerge_lora(model) before "
                         f"loading an adapter")
    for part in _PARTS:
        want = tuple(getattr(layer.lora, part).shape)
        got = tuple(pair[part].shape)
        if got != want:
            raise ValueError(
                f"adapter {source}: {part} of module {name!r} has shape {got}, but the "
                f"model's layer needs {want} (r={layer.lora.r}, in_features="
                f"{layer.in_features}, out_features={layer.out_features})"
            )


@torch.no_grad()
def _copy_into(layer: LinearWithLoRA, pair: dict[str, torch.Tensor]) -> None:
    for part in _PARTS:
        param = getattr(layer.lora, part)
        param.copy_(pair[part].to(device=param.device, dtype=param.dtype))


# --------------------------------------------------------------------------------------------
# The directory
# --------------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module, directory: str | Path, config: LoRAConfig | None = None
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout).

    Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``. ``config``
    (default: read from the layers) must agree with every LoRA layer's r / lora_alpha /
    use_rslora. The saved ``target_modules`` select exactly the wrapped layers under PEFT's
    rules (``'all-linear'``, or a pattern that would now select other layers, is written as
    the list of wrapped module paths). Returns the directory.
    """
    from safetensors.torch import save_file

    layers = _require_lora(model)
    wrapped = [name for name, _ in layers]
    if "" in wrapped:
        raise ValueError("save_adapter needs a model that contains LoRA layers, not a bare "
                         "LinearWithLoRA (wrap it in an nn.Module with a named attribute)")
    if config is None:
        config = _config_from_layers(layers)
    elif not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig or None, got {type(config).__name__}")
    _check_layers_match(layers, config)
    peft_config = to_peft_dict(config)
    peft_config["target_modules"] = _saved_targets(model, config, wrapped)
    tensors = {key: t for name, layer in layers for key, t in _layer_tensors(name, layer).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG_NAME).write_text(
        json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def _read_config(path: Path) -> LoRAConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return from_peft_dict(raw, source=str(path))


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    layer_types: tuple[type, ...] = (nn.Linear,),
) -> nn.Module:
    """Load an adapter directory written by :func:`save_adapter` or by PEFT into ``model``.

    A model without LoRA layers is first wrapped with :func:`apply_lora` using the saved config;
    a model that already has LoRA layers must have them exactly where the file does, with the
    same r / lora_alpha / use_rslora. A missing file, a module that is missing on either side
    or a shape mismatch raises an error naming it, and no weight is copied unless everything
    fits (a model that had no LoRA layers keeps the freshly initialised ones). Returns ``model``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter file not found: {path}")
    config = _read_config(config_path)
    found = parse_adapter_keys(load_file(str(weights_path)), str(weights_path))

    if not any(True for _ in lora_layers(model)):
        apply_lora(model, config, layer_types=layer_types)
    layers = dict(lora_layers(model))
    _check_layers_match(list(layers.items()), config)
    missing_in_model = sorted(set(found) - set(layers))
    if missing_in_model:
        raise ValueError(
            f"adapter {directory} has weights for module {missing_in_model[0]!r}, but the model "
            f"has no LoRA layer there; its LoRA layers are: {describe_names(sorted(layers))}"
        )
    missing_in_file = sorted(set(layers) - set(found))
    if missing_in_file:
        raise ValueError(
            f"the model's LoRA layer {missing_in_file[0]!r} has no weights in adapter {directory} "
            f"(the adapter covers: {describe_names(sorted(found))})"
        )
    for name, layer in layers.items():
        _check_fits(name, layer, found[name], str(directory))
    for name, layer in layers.items():
        _copy_into(layer, found[name])
    return model
