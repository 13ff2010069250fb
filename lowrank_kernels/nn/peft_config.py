"""PEFT's configuration names for convert(): a LoraConfig / VeraConfig / RandLoraConfig, or PEFT's
keyword names (``r``, ``lora_alpha``, ``lora_dropout``, ...), become convert's arguments, so a
PEFT user's configuration carries over unchanged.

A config field that convert cannot honour (``bias="all"``, ``modules_to_save``, layer
patterns, ...) raises ValueError naming the field, rather than being dropped silently.
"""

from __future__ import annotations

import dataclasses

from torch import nn

# PEFT's keyword names -> convert's.
KEYWORDS = {"r": "rank", "lora_alpha": "alpha", "randlora_alpha": "alpha", "lora_dropout": "dropout",
            "vera_dropout": "dropout", "randlora_dropout": "dropout", "init_lora_weights": "init"}

# Per config class: the method, and each field convert reads -> convert's argument (or the
# method option of the same name).
_CONFIGS = {
    "LoraConfig": ("lora", {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
                            "target_modules": "target_modules", "use_rslora": "use_rslora", "use_dora": "use_dora",
                            "init_lora_weights": "init"}),
    "VeraConfig": ("vera", {"r": "rank", "vera_dropout": "dropout", "target_modules": "target_modules",
                            "projection_prng_key": "projection_prng_key", "save_projection": "save_projection",
                            "d_initial": "d_initial"}),
    "RandLoraConfig": ("randlora", {"r": "rank", "randlora_alpha": "alpha", "randlora_dropout": "dropout",
                                    "target_modules": "target_modules", "projection_prng_key": "projection_prng_key",
                                    "save_projection": "save_projection"}),
}
# Bookkeeping fields of every PEFT config: they do not change the layers.
_METADATA = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
             "inference_mode"}
_TARGET_MAPPINGS = {"lora": "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
                    "vera": "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING",
                    "randlora": "TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING"}

ALL_LINEAR = "all-linear"


def is_peft_config(obj) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and hasattr(obj, "peft_type")


def rename_keywords(kwargs: dict) -> dict:
    """convert's names for PEFT's keyword names in ``kwargs``; TypeError if both forms are given."""
    out = {}
    for key, value in kwargs.items():
        ours = KEYWORDS.get(key, key)
        if ours in out:
            raise TypeError(f"convert() got {ours!r} twice (as {ours!r} and as PEFT's {key!r}, or two PEFT names)")
        out[ours] = value
    return out


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def config_arguments(config, model: nn.Module) -> dict:
    """convert's keyword arguments (method, rank, alpha, dropout, target_modules and method
    options) for a PEFT config applied to ``model``."""
    kind = type(config).__name__
    if kind not in _CONFIGS:
        raise TypeError(f"method: PEFT config {kind} is not supported by convert (supported: {sorted(_CONFIGS)})")
    method, fields = _CONFIGS[kind]
    args = {"method": method}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in fields:
            args[fields[field.name]] = value
            continue
        if field.name in _METADATA:
            continue
        default = _default(field)
        if default is dataclasses.MISSING or value != default:
            raise ValueError(f"{kind}.{field.name}={value!r} is not supported by convert (only its default "
                             f"{default!r}); use PEFT's get_peft_model for it")
    if args.get("use_dora"):
        # LoraConfig(use_dora=True) is the "dora" method (nn/dora.py), which takes LoRA's other fields.
        del args["use_dora"]
        args["method"] = "dora"
    if args.get("dropout") == 1.0:
        raise ValueError(f"{kind} dropout=1.0 zeroes the adapter's input in training; convert takes [0, 1)")
    args["target_modules"] = _targets(args.get("target_modules"), method, model, kind)
    return args


def _targets(targets, method: str, model: nn.Module, kind: str):
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return None
    if targets is not None:
        return sorted(targets) if isinstance(targets, (set, frozenset)) else targets
    # PEFT's default targets for the model's architecture.
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils import constants
    except ImportError as err:
        raise ImportError(f"{kind} with target_modules=None needs peft installed for its default targets") from err
    mapping = getattr(constants, _TARGET_MAPPINGS[method], {})
    if model_type not in mapping:
        raise ValueError(f"{kind}.target_modules=None: PEFT has no default targets for model type {model_type!r}; "
                         "set target_modules")
    return list(mapping[model_type])
