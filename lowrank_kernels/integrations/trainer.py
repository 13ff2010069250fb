"""The optimizers in the transformers Trainer (and TRL's trainers, which are Trainers):
``Trainer(..., optimizer_cls_and_kwargs=lk.trainer_optimizer(lk.GaLoreAdamW, model, ...))``.

``projected_param_groups`` selects the projected matrices the way transformers'
``optim_target_modules`` does for galore-torch and apollo-torch (``optim="galore_adamw"``): a
regex str matched against each module's whole name, or a list whose entries match a module name
exactly, as a substring or as a full-match regex, or "all-linear"; only nn.Linear modules count,
and their ``.weight`` is projected. One difference: "all-linear" leaves out the output layer (the
LM head), as PEFT's "all-linear" does, so the head stays plain AdamW with the embeddings and
norms.
"""

from __future__ import annotations

import re
from typing import Union

from torch import nn

from lowrank_kernels.optim import ApolloAdamW, FiraAdamW, GaLoreAdamW
from lowrank_kernels.optim.apollo import GROUP_DEFAULTS as APOLLO_GROUP_KEYS
from lowrank_kernels.optim.schema import PROJECTED_KEYS

ALL_LINEAR = "all-linear"
# The keys of a projected param group, per optimizer: everything else is a constructor argument.
GROUP_KEYS = {
    GaLoreAdamW: PROJECTED_KEYS + ("scale",),
    FiraAdamW: PROJECTED_KEYS + ("alpha",),
    ApolloAdamW: ("rank",) + tuple(APOLLO_GROUP_KEYS),
}


def _is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-").lower() == ALL_LINEAR


def _matches(target_modules: Union[str, list], name: str) -> bool:
    # transformers.trainer_utils.check_target_module_exists, the rule of optim_target_modules.
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return (name in target_modules or any(t in name for t in target_modules)
            or any(re.fullmatch(t, name) for t in target_modules))


def projected_param_groups(model: nn.Module, target_modules: Union[str, list] = ALL_LINEAR, **group) -> list:
    """``[{'params': other}, {'params': matrices, **group}]`` for GaLoreAdamW / FiraAdamW /
    ApolloAdamW: the weights of the nn.Linear modules that ``target_modules`` names (module
    docstring) are projected; every other trainable parameter (embeddings, norms, biases, the
    LM head under "all-linear") steps plain AdamW. Frozen parameters are left out.

    Args:
        model: the model the optimizer trains.
        target_modules: "all-linear", a regex str, or a list of names / substrings / regexes.
        **group: the projected group's keys (``rank``, ``update_proj_gap``, ``scale`` or ``alpha``,
            ``proj_type``, APOLLO's ``proj``, ``scale_type``); the optimizer validates them.

    Raises:
        ValueError: no trainable nn.Linear weight matched.
        TypeError: ``target_modules`` is neither a str nor a list of str.
    """
    if not (isinstance(target_modules, str) or (isinstance(target_modules, (list, tuple))
                                                and all(isinstance(t, str) for t in target_modules))):
        raise TypeError(f"target_modules must be 'all-linear', a regex str or a list of str, got {target_modules!r}")
    all_linear = _is_all_linear(target_modules)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    projected = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
            continue
        if (module is not head) if all_linear else _matches(target_modules, name):
            projected[id(module.weight)] = module.weight
    if not projected:
        raise ValueError(f"target_modules={target_modules!r} matched no trainable nn.Linear weight of "
                         f"{type(model).__name__}")
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in projected]
    return [{"params": other}, {"params": list(projected.values()), **group}]


def trainer_optimizer(optimizer_cls: type, model: nn.Module, target_modules: Union[str, list] = ALL_LINEAR,
                      args=None, **kwargs) -> tuple:
    """``(optimizer_cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` (and TRL's trainers):
    the optimizer on ``projected_param_groups(model, target_modules, ...)``.

    The Trainer builds the optimizer from the ``params`` in these kwargs (popping them), so call
    this once per Trainer, on the model that Trainer trains.

    Args:
        optimizer_cls: GaLoreAdamW, FiraAdamW or ApolloAdamW.
        model: the model given to the Trainer.
        target_modules: as projected_param_groups.
        args: the Trainer's ``TrainingArguments``, or None. When given, ``lr``, ``weight_decay``,
            ``betas`` and ``eps`` default to its learning_rate, weight_decay, (adam_beta1,
            adam_beta2) and adam_epsilon; otherwise to the optimizer's defaults. (Trainer's
            ``optim="galore_adamw"`` passes only the learning rate.)
        **kwargs: the projected group's keys (``rank``, ``update_proj_gap``, ``scale`` / ``alpha``,
            ``proj_type``, ...) and the optimizer's constructor arguments (``lr``, ``refresh``,
            ``per_layer``, ...), told apart by name.
    """
    if optimizer_cls not in GROUP_KEYS:
        raise TypeError(f"optimizer_cls must be one of {[c.__name__ for c in GROUP_KEYS]}, got {optimizer_cls!r}")
    group = {k: kwargs.pop(k) for k in GROUP_KEYS[optimizer_cls] if k in kwargs}
    if args is not None:
        defaults = {"lr": args.learning_rate, "weight_decay": args.weight_decay,
                    "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        kwargs = {**defaults, **kwargs}
    return optimizer_cls, {"params": projected_param_groups(model, target_modules, **group), **kwargs}
