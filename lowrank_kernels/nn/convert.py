"""Whole-model conversion: nn.Linear -> LowRankLinear (convert) and back (merge_and_unload)."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Union

from torch import nn

from lowrank_kernels.nn.adapters import adapter_parameter_ids
from lowrank_kernels.nn.module import LowRankLinear
from lowrank_kernels.nn.peft_config import ALL_LINEAR, config_arguments, is_peft_config, rename_keywords
from lowrank_kernels.nn.registry import get_method

Targets = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _matcher(target_modules: Targets) -> Callable[[str, nn.Module], bool]:
    # PEFT's rules: a str is a regex matched against the whole qualified name; each entry of a
    # list matches the name itself or its last dotted components ("q_proj" matches
    # "model.layers.0.self_attn.q_proj").
    if target_modules is None or (isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR):
        return lambda name, module: True
    if callable(target_modules):
        return target_modules
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name, module: pattern.fullmatch(name) is not None
    if not isinstance(target_modules, Iterable):
        raise TypeError(f"target_modules must be None, 'all-linear', a regex str, a non-empty list of names or a "
                        f"callable, got {type(target_modules).__name__} {target_modules!r}")
    entries = list(target_modules)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"target_modules must be None, 'all-linear', a regex str, a non-empty list of names or a "
                         f"callable, got {target_modules!r}")
    return lambda name, module: any(name == e or name.endswith("." + e) for e in entries)


def _all_linear(target_modules: Targets) -> bool:
    return target_modules is None or (isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR)


def _inside_adapter_layers(model: nn.Module) -> set:
    """ids of the modules inside PEFT's adapter layers (their base_layer, lora_A, ...)."""
    ids = set()
    for module in model.modules():
        if hasattr(module, "adapter_layer_names") and hasattr(module, "base_layer"):
            ids.update(id(m) for m in module.modules() if m is not module)
    return ids


def find_targets(model: nn.Module, target_modules: Targets) -> list[tuple[str, nn.Linear]]:
    match = _matcher(target_modules)
    all_linear = _all_linear(target_modules)
    # PEFT's "all-linear": every linear layer but the output layer (the LM head).
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    adapter_parts = _inside_adapter_layers(model)
    targets, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not match(name, module):
            continue
        if all_linear and (module is head or id(module) in adapter_parts):
            continue
        if id(module) in adapter_parts:
            raise ValueError(f"target_modules matched {name!r}, a part of a PEFT adapter layer; name the layer "
                             "itself, not its base_layer or adapter modules")
        if type(module) is not nn.Linear:
            # With target_modules=None a Linear subclass (a quantised layer, MultiheadAttention's
            # out_proj, whose weight the attention reads directly) is left alone; named
            # explicitly it is an error, since converting it would be silently wrong.
            if all_linear:
                continue
            raise ValueError(f"target_modules matched {name!r}, a {type(module).__module__}."
                             f"{type(module).__qualname__}; only plain nn.Linear layers can be converted")
        if id(module) not in seen:
            seen.add(id(module))
            targets.append((name, module))
    return targets


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put ``replacements[id(old)]`` wherever ``old`` is registered (a shared layer in every place)."""
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter yields a child registered twice only once.
        for child_name, child in list(parent._modules.items()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return model


def no_targets_error(model: nn.Module, target_modules: Targets) -> ValueError:
    converted = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if converted:
        methods = sorted({m.method for _, m in converted})
        return ValueError(f"target_modules={target_modules!r} matched no nn.Linear layer left in "
                          f"{type(model).__name__}: the model is already converted ({len(converted)} LowRankLinear "
                          f"layers, method {', '.join(map(repr, methods))}, e.g. {converted[0][0]!r}). Convert "
                          "the original model, or merge_and_unload() this one first")
    return ValueError(f"target_modules={target_modules!r} matched no nn.Linear layer of {type(model).__name__}")


def convert(model: nn.Module, method="lora", rank: int | None = None, alpha: float | None = None,
            target_modules: Targets = None, dropout: float = 0.0, backend: str | None = None,
            **method_options) -> nn.Module:
    """Replace matching nn.Linear layers of ``model`` by LowRankLinear, in place; for adapter
    methods (those with a frozen base weight) freeze the base model.

    Args:
        model: any nn.Module (a transformers model, an nn.Sequential, a single nn.Linear, a model
            converted before or a PEFT model: their adapters are left as they are).
        method: a registered method ("lora", ...; see lowrank_kernels.nn.available_methods()), or
            a PEFT ``LoraConfig`` / ``VeraConfig`` / ``RandLoraConfig``, whose fields carry over
            (a field convert cannot honour raises ValueError naming it).
        rank, alpha, dropout, backend: as LowRankLinear. None takes the method's default (the
            table below), which is what the peer's config gives with only ``r`` set. PEFT's names
            are accepted too: ``r``, ``lora_alpha`` / ``randlora_alpha``, ``lora_dropout`` /
            ``vera_dropout`` / ``randlora_dropout``.
        target_modules: which layers to convert, matched on their qualified names as PEFT does:
            None or "all-linear" (every plain nn.Linear but the output layer, PEFT's
            "all-linear"), a list of names or name suffixes (``["q_proj", "v_proj"]``), a regex
            str matched against the whole name, or a callable ``(name, module) -> bool``.
        **method_options: the method's options (below), together with what its
            ``Method.prepare_convert`` returns (state shared across the layers).

    Returns:
        ``model``. For adapter methods every parameter of the base model is frozen; adapters
        already in the model (an earlier convert, PEFT's) keep their requires_grad, and the new
        ones train. Methods without a base weight leave the rest of the model as it was. The
        base weights are kept, not copied. Where ``model`` is itself a matching nn.Linear, the
        new LowRankLinear is returned instead.

    Raises:
        ValueError: nothing matched ``target_modules`` (saying so when the model is already
            converted), it named a layer that is not a plain nn.Linear, a layer cannot take the
            method's settings (the error names the layer); unknown ``method``.
        TypeError: an option the method does not take.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    given = {k: v for k, v in (("rank", rank), ("alpha", alpha), ("target_modules", target_modules)) if v is not None}
    if dropout != 0.0:
        given["dropout"] = dropout
    args = rename_keywords({**given, **method_options})
    if is_peft_config(method):
        if args:
            raise TypeError(f"convert() got a PEFT config and also {sorted(args)}: set them in the config")
        args = config_arguments(method, model)
        method = args.pop("method")
    elif not isinstance(method, str):
        raise TypeError(f"method must be a method name or a PEFT config, got {type(method).__name__}")
    rank, alpha, dropout = args.pop("rank", None), args.pop("alpha", None), args.pop("dropout", 0.0)
    target_modules = args.pop("target_modules", None)
    impl = get_method(method)
    targets = find_targets(model, target_modules)
    if not targets:
        raise no_targets_error(model, target_modules)
    options = {**args, **impl.prepare_convert(model, targets, impl.default_rank if rank is None else rank, **args)}
    replacements = {}
    for name, linear in targets:
        try:
            replacements[id(linear)] = LowRankLinear.from_linear(linear, method=method, rank=rank, alpha=alpha,
                                                                 dropout=dropout, backend=backend, **options)
        except (ValueError, TypeError) as err:
            raise type(err)(f"layer {name or '<model>'!r}: {err}") from err
    # Adapters fine-tune a frozen model; methods without a base weight (SLTrain, low-rank) pretrain
    # one, so the rest of it (embeddings, norms, LM head) keeps training. Adapters already in the
    # model are not the base model: they keep their requires_grad.
    if impl.has_base_weight:
        adapters = adapter_parameter_ids(model)
        for p in model.parameters():
            if id(p) not in adapters:
                p.requires_grad_(False)
    return replace_modules(model, replacements)


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
    return replace_modules(model, replacements)
