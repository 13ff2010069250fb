"""The param-group and state schema of GaLoreAdamW / FiraAdamW, checked when a group is added and
when a checkpoint is loaded.

A misspelled group key ('update_proj_gaps') or another optimizer's key (GaLore's 'scale' on a Fira
group) would otherwise be accepted and ignored, and a checkpoint of another optimizer or another
rank would load and fail (or silently run at the checkpoint's rank) at the first step. Every
check here raises ValueError naming the group, the key and what was expected, before anything is
loaded.
"""

from __future__ import annotations

import torch

from lowrank_kernels.ops import projected_step as _ps

# Keys of every group: the optimizer's hyper-parameters, torch's optional parameter names.
COMMON_KEYS = ("params", "lr", "betas", "eps", "weight_decay", "correct_bias", "refresh", "param_names")
# Keys of a group that projects its gradients, besides the scale key ('scale' or 'alpha').
PROJECTED_KEYS = ("rank", "update_proj_gap", "proj_type")
# Keys torch's LR schedulers write into the groups (LambdaLR & co: initial_lr; OneCycleLR, CyclicLR:
# the others), so a checkpoint taken under a scheduler carries them.
SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")
# Keys that shape the state (moments, projectors): a checkpoint must agree on them.
STRUCTURAL_KEYS = ("rank", "proj_type")

PROJ_TYPES = ("std", "reverse_std", "left", "right")


def projection_side(proj_type: str, shape) -> str:
    """'left' or 'right' for a weight of ``shape`` under the peers' ``proj_type`` rules."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


# Per-parameter state: what a stepped parameter always has, and what it may have.
_PLAIN_STATE = ({"step", "exp_avg", "exp_avg_sq"}, {"micro", "grad_acc"})
_PROJECTED_STATE = ({"step", "exp_avg", "exp_avg_sq", "refreshes"},
                    {"proj", "dct_index", "rng_seed", "micro", "proj_grad_acc", "grad_acc"})


def accepted_keys(scale_key: str) -> tuple:
    """Every key a param group of the optimizer with this scale key may hold, sorted."""
    return tuple(sorted(set(COMMON_KEYS + PROJECTED_KEYS + SCHEDULER_KEYS + (scale_key,))))


def _hint(keys) -> str:
    keys = set(keys)
    if keys & {"amsgrad", "maximize", "foreach", "capturable", "fused", "differentiable"}:
        return " (a torch.optim optimizer's checkpoint?)"
    if "scale" in keys:
        return " (GaLore's key: a GaLoreAdamW checkpoint or group on a FiraAdamW?)"
    if "alpha" in keys:
        return " (Fira's key: a FiraAdamW checkpoint or group on a GaLoreAdamW?)"
    return ""


def check_group_keys(group: dict, index: int, scale_key: str, where: str = "param group") -> None:
    """ValueError if ``group`` holds a key this optimizer does not read."""
    accepted = accepted_keys(scale_key)
    unknown = sorted(set(group) - set(accepted))
    if unknown:
        raise ValueError(f"{where} {index}: unknown key(s) {unknown}{_hint(unknown)}; accepted keys: {list(accepted)}")


def check_checkpoint(optimizer, state_dict: dict) -> None:
    """Check a checkpoint against ``optimizer`` (a GaLoreAdamW / FiraAdamW) before it is loaded:
    the same number of groups and parameters, every group's keys, the structural keys (rank,
    proj_type) equal to the optimizer's, valid hyper-parameters, and each parameter's state keys
    and moment shapes."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"state_dict must be a dict with 'state' and 'param_groups' (from {name}.state_dict()), "
                         f"got {type(state_dict).__name__}")
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this {name} has {len(groups)}")
    scale_key = optimizer._SCALE_KEY
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        where = "checkpoint param group"
        required = set(COMMON_KEYS[:7]) | (set(PROJECTED_KEYS) | {scale_key} if "rank" in group else set())
        missing = sorted(required - set(saved))
        if missing:
            raise ValueError(f"{where} {i}: missing key(s) {missing} that {name} needs{_hint(saved)}; "
                             f"the checkpoint's keys: {sorted(saved)}")
        check_group_keys(saved, i, scale_key, where)
        if ("rank" in saved) != ("rank" in group):
            has, lacks = ("the checkpoint", f"this {name}") if "rank" in saved else (f"this {name}", "the checkpoint")
            raise ValueError(f"{where} {i}: {has} projects this group ('rank' is set) but {lacks} does not")
        for key in STRUCTURAL_KEYS:
            if key in group and saved[key] != group[key]:
                raise ValueError(f"{where} {i}: '{key}' is {saved[key]!r} in the checkpoint but {group[key]!r} in "
                                 f"this {name}; the state is shaped by it: build the optimizer with "
                                 f"{key}={saved[key]!r} to resume this checkpoint")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where} {i}: {len(saved['params'])} parameters in the checkpoint, "
                             f"{len(group['params'])} in this {name}")
        # The checkpoint's hyper-parameters replace the group's: validate them on its parameters.
        optimizer._validate_group({**saved, "params": group["params"]}, i, where)
        for j, (index, p) in enumerate(zip(saved["params"], group["params"])):
            state = state_dict["state"].get(index)
            if state:
                _check_state(state, p, saved, f"{where} {i}, params[{j}]", optimizer._FIRA, name)


def _check_state(state: dict, p: torch.Tensor, group: dict, where: str, fira: bool, name: str) -> None:
    projected = "rank" in group
    required, optional = _PROJECTED_STATE if projected else _PLAIN_STATE
    if projected and fira:
        required = required | {"limiter_norm"}
    unknown = sorted(set(state) - required - optional)
    if unknown:
        raise ValueError(f"{where}: unknown state key(s) {unknown} for {name}; expected {sorted(required | optional)}")
    if "step" not in state:
        return  # only a pending micro-batch count: nothing stepped yet
    missing = sorted(required - set(state))
    if missing:
        kind = "GaLoreAdamW" if projected and fira and missing == ["limiter_norm"] else "another optimizer"
        raise ValueError(f"{where}: state lacks {missing}, which {name} needs (a checkpoint of {kind}?)")
    if projected:
        shape = _ps.projected_shape(p.shape, group["rank"], projection_side(group["proj_type"], p.shape))
    else:
        shape = p.shape
    for key in ("exp_avg", "exp_avg_sq"):
        got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else state[key]
        if got != tuple(shape):
            raise ValueError(f"{where}: '{key}' has shape {got}, expected {tuple(shape)} for a parameter of shape "
                             f"{tuple(p.shape)}")
