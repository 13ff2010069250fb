"""A model's adapters: which parameters are adapters, and adapter-only checkpoints.

``model.state_dict()`` holds the whole base model (gigabytes for a 7B model) for a few megabytes
of adapters. ``adapter_state_dict`` keeps, per LowRankLinear, what the layer needs to rebuild
itself on top of the same base model: its trainable tensors, its persistent buffers (a sparse
support's index and block shape; bases only where they cannot be regenerated) and its seeds
(a seeded basis stores its seed, never the basis). For a method with a frozen base weight (LoRA,
VeRA, RandLoRA) the base ``weight`` and ``bias`` are left out; a method without one (SLTrain,
low-rank) is the whole layer, so all of it is kept.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from lowrank_kernels.nn.module import LowRankLinear

_BASE_KEYS = ("weight", "bias")
# LowRankLinear's merged flag describes the base weight, which an adapter checkpoint does not hold.
_MERGED = "merged"


def adapter_parameter_ids(model: nn.Module) -> set:
    """ids of ``model``'s adapter parameters: those a LowRankLinear method created on top of a frozen
    base weight, and those of PEFT's adapter layers (their ``adapter_layer_names``)."""
    ids = set()
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            if module._method.has_base_weight:
                ids.update(id(p) for name, p in module.named_parameters() if name not in _BASE_KEYS)
        else:
            # PEFT's BaseTunerLayer, without importing peft.
            for name in getattr(module, "adapter_layer_names", ()) or ():
                sub = getattr(module, name, None)
                if isinstance(sub, nn.Module):
                    ids.update(id(p) for p in sub.parameters())
    return ids


def _layers(model: nn.Module) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no LowRankLinear layers: convert() it first "
                         "(a PEFT model saves its adapters with save_pretrained)")
    return layers


def _layer_keys(module: LowRankLinear) -> list:
    skip = set(_BASE_KEYS) if module._method.has_base_weight else set()
    return [k for k in module.state_dict(keep_vars=True) if k not in skip and k != _MERGED]


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter-only state of ``model``: {qualified key: tensor}, detached, on their devices.

    Keys are those of ``model.state_dict()``, so the dict also loads with
    ``model.load_state_dict(sd, strict=False)``; use ``load_adapter_state_dict`` to be strict about
    the adapters. A layer shared by several parents is stored once.
    """
    out, seen = {}, set()
    for name, module in _layers(model):
        if id(module) in seen:
            continue
        seen.add(id(module))
        prefix = f"{name}." if name else ""
        state = module.state_dict()
        for key in _layer_keys(module):
            out[prefix + key] = state[key].detach()
    return out


class AdapterLoadResult(NamedTuple):
    missing_keys: list
    unexpected_keys: list


def load_adapter_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> AdapterLoadResult:
    """Load an ``adapter_state_dict`` into ``model``, converted the same way (same method, targets,
    rank and options). The base weights are left as they are.

    strict=True: every adapter key of ``model`` must be present and nothing else may be (ValueError
    listing them); strict=False loads what matches and returns the lists. A shape mismatch always
    raises. Layers must not be merged (unmerge first: the base weight would hold an old update).
    Returns (missing_keys, unexpected_keys).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    layers, expected = _layers(model), set()
    for name, module in layers:
        prefix = f"{name}." if name else ""
        expected.update(prefix + k for k in _layer_keys(module))
        if module.merged:
            raise ValueError(f"layer {name or '<model>'!r} is merged: unmerge() it before loading adapters")
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"state_dict does not match the model's adapters: missing keys {missing}, unexpected "
                         f"keys {unexpected}")
    for name, module in layers:
        prefix = f"{name}." if name else ""
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k in expected}
        if not sub:
            continue
        try:
            # strict=False only because the base weight and bias are absent by design.
            module.load_state_dict(sub, strict=False)
        except RuntimeError as err:  # torch's collected shape and method errors
            raise ValueError(f"layer {name or '<model>'!r}: {err}") from err
    return AdapterLoadResult(missing, unexpected)


def save_adapters(model: nn.Module, path) -> None:
    """Write ``adapter_state_dict(model)`` to ``path``: safetensors where the path ends in
    ``.safetensors``, torch.save otherwise (both load with ``load_adapters``)."""
    state = adapter_state_dict(model)
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        # safetensors refuses tensors that share memory (one basis buffer held by every layer).
        save_file({k: v.contiguous().clone() for k, v in state.items()}, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)


def load_adapters(model: nn.Module, path, strict: bool = True) -> AdapterLoadResult:
    """Read a file written by ``save_adapters`` and load it into ``model`` (load_adapter_state_dict)."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:  # torch.load: an EOFError without a message
        raise ValueError(f"path {path!r} is an empty file, not adapters written by save_adapters")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return load_adapter_state_dict(model, state, strict=strict)
