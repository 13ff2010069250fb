"""Whole-model conversion: nn.Linear -> LowRankLinear (convert) and back (merge_and_unload)."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Union

from torch import nn

from lowrank_kernels.nn.module import LowRankLinear
from lowrank_kernels.nn.registry import get_method

Targets = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _matcher(target_modules: Targets) -> Callable[[str, nn.Module], bool]:
    # PEFT's rules: a str is a regex matched against the whole qualified name; each entry of a
    # list matches the name itself or its last dotted components ("q_proj" matches
    # "model.layers.0.self_attn.q_proj").
    if target_modules is None:
        return lambda name, module: True
    if callable(target_modules):
        return target_modules
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name, module: pattern.fullmatch(name) is not None
    entries = list(target_modules)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"target_modules must be None, a regex str, a non-empty list of names or a callable, "
                         f"got {target_modules!r}")
    return lambda name, module: any(name == e or name.endswith("." + e) for e in entries)


def _find_targets(model: nn.Module, target_modules: Targets) -> list[tuple[str, nn.Linear]]:
    match = _matcher(target_modules)
    targets, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not match(name, module):
            continue
        if type(module) is not nn.Linear:
            # With target_modules=None a Linear subclass (a quantised layer, MultiheadAttention's
            # out_proj, whose weight the attention reads directly) is left alone; named
            # explicitly it is an error, since converting it would be silently wrong.
            if target_modules is None:
                continue
            raise ValueError(f"target_modules matched {name!r}, a {type(module).__module__}."
                             f"{type(module).__qualname__}; only plain nn.Linear layers can be converted")
        if id(module) not in seen:
            seen.add(id(module))
            targets.append((name, module))
    return targets


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put ``replacements[id(old)]`` wherever ``old`` is registered (a shared layer in every place)."""
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter yields a child registered twice only once.
        for child_name, child in list(parent._modules.items()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return model


def convert(model: nn.Module, method: str = "lora", rank: int = 8, alpha: float | None = 16,
            target_modules: Targets = None, dropout: float = 0.0, backend: str | None = None,
            **method_options) -> nn.Module:
    """Replace matching nn.Linear layers of ``model`` by LowRankLinear, in place; freeze the rest
    for adapter methods (those with a frozen base weight).

    Args:
        model: any nn.Module (a transformers model, an nn.Sequential, a single nn.Linear).
        method: a registered method ("lora", ...); see lowrank_kernels.nn.available_methods().
        rank, alpha, dropout, backend: as LowRankLinear (alpha=None: the method's default).
        target_modules: which layers to convert, matched on their qualified names as PEFT does:
            None (every plain nn.Linear), a list of names or name suffixes (``["q_proj",
            "v_proj"]``), a regex str matched against the whole name, or a callable
            ``(name, module) -> bool``.
        **method_options: passed to the method (e.g. ``use_rslora=True`` for LoRA), together with
            what its ``Method.prepare_convert`` returns (state shared across the layers).

    Returns:
        ``model``. For adapter methods every parameter is frozen except those the method creates
        (for LoRA: lora_A and lora_B); methods without a base weight leave the rest as it was. The base weights are kept, not copied. Where ``model`` is itself a
        matching nn.Linear, the new LowRankLinear is returned instead.

    Raises:
        ValueError: nothing matched ``target_modules``, or it named a layer that is not a plain
            nn.Linear; unknown ``method``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    impl = get_method(method)
    targets = _find_targets(model, target_modules)
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear layer of {type(model).__name__}")
    options = {**method_options, **impl.prepare_convert(model, targets, rank, **method_options)}
    # Adapters fine-tune a frozen model; methods without a base weight (SLTrain, low-rank) pretrain
    # one, so the rest of it (embeddings, norms, LM head) keeps training.
    if impl.has_base_weight:
        for p in model.parameters():
            p.requires_grad_(False)
    replacements = {
        id(linear): LowRankLinear.from_linear(linear, method=method, rank=rank, alpha=alpha, dropout=dropout,
                                              backend=backend, **options)
        for _, linear in targets
    }
    return _replace(model, replacements)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Turn every LowRankLinear of ``model`` into a plain nn.Linear with its update merged, in place.

    For export or inference: the merged weight is computed in fp32 and rounded once to the
    base dtype, into a new tensor (a base weight shared with another module, e.g. tied
    embeddings, is left untouched). The bias is kept. ``requires_grad`` of the new weight follows
    the base weight's. Returns ``model`` (the new nn.Linear where ``model`` is a LowRankLinear).

    Raises:
        ValueError: a layer whose method has no base weight to merge into (e.g. SLTrain), or whose
            merged weight would be non-finite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    replacements = {}
    for name, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        if not module._method.has_base_weight:
            raise ValueError(f"layer {name or '<model>'!r} uses method {module.method!r}, which has no base "
                             "weight to merge into")
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        try:
            weight = module.merged_weight()
        except ValueError as err:
            raise ValueError(f"layer {name or '<model>'!r}: {err}") from err
        linear.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        linear.bias = module.bias
        replacements[id(module)] = linear
    return _replace(model, replacements)
