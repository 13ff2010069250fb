"""The param-group and state schema of GaLoreAdamW / FiraAdamW, checked when a group is added and
when a checkpoint is loaded.

A misspelled group key ('update_proj_gaps') or another optimizer's key (GaLore's 'scale' on a Fira
group) would otherwise be accepted and ignored, and a checkpoint of another optimizer or another
rank would load and fail (or silently run at the checkpoint's rank) at the first step. Every
check here raises ValueError naming the group, the key and what was expected, before anything is
loaded: the state's keys and shapes, and its values (finite moments, a non-negative second moment,
integral step counts), which would otherwise turn into NaN weights one step later.

The gradient and learning-rate checks shared by every optimizer of the package (GaLoreAdamW,
FiraAdamW, ApolloAdamW) live here too, and so does the conversion of galore-torch's and fira's
checkpoints, whose state maps one to one onto GaLoreAdamW's and FiraAdamW's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_kernels.ops import projected_step as _ps
from lowrank_kernels.optim import refresh as _refresh

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
    proj_type) equal to the optimizer's, valid hyper-parameters, and each parameter's state: its
    keys, every tensor's shape and values (check_state_values), a pending accumulation that fits
    the optimizer's accumulation_steps."""
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
                _check_state(state, p, saved, f"{where} {i}, params[{j}]", optimizer)


def _check_state(state: dict, p: torch.Tensor, group: dict, where: str, optimizer) -> None:
    name = type(optimizer).__name__
    projected = "rank" in group
    required, optional = _PROJECTED_STATE if projected else _PLAIN_STATE
    if projected and optimizer._FIRA:
        required = required | {"limiter_norm"}
    unknown = sorted(set(state) - required - optional)
    if unknown:
        raise ValueError(f"{where}: unknown state key(s) {unknown} for {name}; expected {sorted(required | optional)}")
    micro = state.get("micro", 0)
    if _is_count(micro) and micro >= optimizer.accumulation_steps:
        raise ValueError(f"{where}: 'micro' is {micro}, {micro} micro-batches pending, but this {name} has "
                         f"accumulation_steps={optimizer.accumulation_steps}: build it with the checkpoint's "
                         "accumulation_steps, or save after the optimizer step")
    shapes = {"grad_acc": p.shape}
    if projected:
        side = projection_side(group["proj_type"], p.shape)
        rank = group["rank"]
        shapes["proj_grad_acc"] = shape = _ps.projected_shape(p.shape, rank, side)
    else:
        shape = p.shape
    if "step" in state:  # else only a pending accumulation: nothing stepped yet
        missing = sorted(required - set(state))
        if missing:
            galore = projected and optimizer._FIRA and missing == ["limiter_norm"]
            kind = "GaLoreAdamW" if galore else "another optimizer"
            raise ValueError(f"{where}: state lacks {missing}, which {name} needs (a checkpoint of {kind}?)")
        shapes.update(exp_avg=shape, exp_avg_sq=shape, limiter_norm=())
        if projected and group["refresh"] == "dct":
            _check_dct_index(state.get("dct_index"), rank, p.shape[1] if side == "right" else p.shape[0], where)
        elif projected:
            if "proj" not in state:
                raise ValueError(f"{where}: state lacks 'proj', which refresh={group['refresh']!r} needs")
            shapes["proj"] = (rank, p.shape[1]) if side == "right" else (p.shape[0], rank)
    check_state_values(state, shapes, where, p.shape)


def _check_dct_index(index, rank: int, dim: int, where: str) -> None:
    if not (isinstance(index, Tensor) and index.dtype == torch.int64 and tuple(index.shape) == (rank,)):
        got = f"{index.dtype} of shape {tuple(index.shape)}" if isinstance(index, Tensor) else repr(index)
        raise ValueError(f"{where}: 'dct_index' must be an int64 tensor of shape ({rank},) (refresh='dct'), got {got}")
    if bool(((index < 0) | (index >= dim)).any()):
        raise ValueError(f"{where}: 'dct_index' holds indices outside [0, {dim})")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _describe(v) -> str:
    return f"a {v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else repr(v)


# State entries that are Python ints >= 0 (counts and RNG seeds) in every optimizer of the package.
_COUNT_KEYS = ("refreshes", "micro", "rng_seed", "count", "seed", "proj_seed")


def check_state_values(state: dict, shapes: dict, where: str, param_shape) -> None:
    """ValueError naming ``where`` and the key unless: each tensor key of ``shapes`` present in
    ``state`` is a floating-point tensor of that shape with finite values ('exp_avg_sq' >= 0;
    'limiter_norm' >= 0 or -1, its "no norm yet"), 'step' is a count (an int >= 0, or a 0-d
    floating tensor holding one) and the counts and seeds are ints >= 0.

    Reading the values synchronises once, at load time. A DTensor's local shard is read."""
    step = state.get("step")
    if "step" in state:
        ok = _is_count(step) or (isinstance(step, Tensor) and step.is_floating_point() and step.dim() == 0
                                 and not step.is_meta and bool(torch.isfinite(step)) and float(step) >= 0
                                 and float(step) == int(step))
        if not ok:
            raise ValueError(f"{where}: 'step' must be an int >= 0 or a 0-d floating tensor holding one, got "
                             f"{_describe(step)}{'' if not isinstance(step, Tensor) or step.dim() else f' = {step}'}")
    for key in _COUNT_KEYS:
        if key in state and not _is_count(state[key]):
            raise ValueError(f"{where}: '{key}' must be an int >= 0, got {state[key]!r}")
    for key, shape in shapes.items():
        if key not in state:
            continue
        value = state[key]
        if not (isinstance(value, Tensor) and value.is_floating_point()) or tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where}: '{key}' must be a floating-point tensor of shape {tuple(shape)} for a "
                             f"parameter of shape {tuple(param_shape)}, got {_describe(value)}")
        if value.is_meta:
            raise ValueError(f"{where}: '{key}' is on the meta device (a checkpoint without values)")
        local = value.to_local() if hasattr(value, "to_local") else value
        if not bool(torch.isfinite(local).all()):
            raise ValueError(f"{where}: '{key}' holds NaN or inf values")
        if key == "exp_avg_sq" and bool((local < 0).any()):
            raise ValueError(f"{where}: 'exp_avg_sq' holds negative values (min {float(local.min()):.3g}); a second "
                             "moment is >= 0, and its square root would make the weights NaN")
        if key == "limiter_norm" and bool(((local < 0) & (local != -1)).any()):
            raise ValueError(f"{where}: 'limiter_norm' must be >= 0 (or -1 before the first step), got "
                             f"{float(local):.3g}")


def load_tensors(optimizer, state_dict: dict) -> None:
    """After torch's ``Optimizer.load_state_dict``: every state tensor as saved (torch casts
    floating state to the parameter's dtype; the package keeps fp32 moments for every dtype), on
    its parameter's device, and an int 'step' as the 0-d float64 tensor the steps count on."""
    # The checkpoint's ids in group order, as torch maps them: ints from state_dict(), or
    # parameter names from torch.distributed.checkpoint's get_state_dict.
    params = {index: p for saved, group in zip(state_dict["param_groups"], optimizer.param_groups)
              for index, p in zip(saved["params"], group["params"])}
    for index, saved in state_dict["state"].items():
        p = params[index]
        for key, value in saved.items():
            if isinstance(value, Tensor):
                optimizer.state[p][key] = value.to(device=p.device, copy=True)
            elif key == "step":
                optimizer.state[p][key] = torch.tensor(float(value), dtype=torch.float64, device=p.device)


# ----------------------------------------------------------------------------------------------
# Checks shared by the package's optimizers
# ----------------------------------------------------------------------------------------------
def check_gradient(optimizer, p: Tensor, grad: Tensor, label) -> None:
    """TypeError for a sparse gradient (``nn.Embedding(sparse=True)``), ValueError for a parameter
    on the meta device: the fused steps need dense, materialised tensors. ``label()`` names the
    parameter (called on an error only: this runs at every step)."""
    if grad.layout == torch.strided and not (p.is_meta or grad.is_meta):
        return
    name, label = type(optimizer).__name__, label()
    if grad.layout != torch.strided:
        raise TypeError(f"{name}: {label} has a sparse gradient ({grad.layout}), e.g. from nn.Embedding(sparse=True) "
                        f"or nn.EmbeddingBag(sparse=True); {name} needs dense gradients: build the layer with "
                        "sparse=False, or give its parameters to torch.optim.SparseAdam")
    if p.is_meta or grad.is_meta:
        raise ValueError(f"{name}: {label} is on the meta device; materialise the model (to_empty() and initialise "
                         "it, or load its weights) before stepping")


def check_lr_tensor(lr: Tensor, params, where: str) -> None:
    """ValueError naming 'lr' unless the tensor ``lr`` is a one-element floating tensor >= 0 on the
    parameters' device (read once, at construction: steps read it on the device only)."""
    devices = {p.device for p in params}
    ok = lr.numel() == 1 and lr.is_floating_point() and not lr.is_meta and not devices - {lr.device}
    if not ok or not bool(lr >= 0):
        raise ValueError(f"{where}: 'lr' must be a float >= 0 or a one-element floating tensor >= 0 on the "
                         f"parameters' device ({', '.join(sorted(map(str, devices))) or 'none'}), got a {lr.dtype} "
                         f"tensor of shape {tuple(lr.shape)} on {lr.device}")


# ----------------------------------------------------------------------------------------------
# galore-torch's and fira's checkpoints
# ----------------------------------------------------------------------------------------------
def from_peer(optimizer, state_dict: dict) -> dict:
    """``state_dict`` in this package's layout when it is a checkpoint of galore-torch's
    ``GaLoreAdamW`` or fira's ``FiraAdamW`` (groups with 'correct_bias' and without 'refresh');
    anything else is returned unchanged.

    The peers' state maps one to one: an int 'step' becomes the 0-d float64 count, the moments
    fp32, the projector's ``ortho_matrix`` (an SVD projector, fp32 from an fp32 model) 'proj'
    with 'refreshes' the number of refreshes the peer ran (ceil(step / update_proj_gap)), and
    Fira's 'scaling_grad' the limiter's 'limiter_norm'. The groups keep this optimizer's
    'refresh' ('svd', the peers' refresh, or 'randomized'; 'dct' keeps indices, not a matrix, and
    is refused). Everything else (hyper-parameters, keys, shapes) is then checked as any checkpoint.
    """
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if (not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups)
            or any("refresh" in g or "correct_bias" not in g for g in groups) or "state" not in state_dict):
        return state_dict
    name = type(optimizer).__name__
    ours = optimizer.param_groups
    groups = [{**g, "refresh": ours[i]["refresh"] if i < len(ours) else "svd"} for i, g in enumerate(groups)]
    where = {index: (i, j) for i, g in enumerate(groups) for j, index in enumerate(g["params"])}
    state = {}
    for index, saved in state_dict["state"].items():
        saved = dict(saved)
        state[index] = saved
        i, j = where.get(index, (len(ours), 0))
        if i >= len(ours) or j >= len(ours[i]["params"]):
            continue  # the group or parameter counts differ: check_checkpoint says so
        label = f"checkpoint param group {i}, params[{j}]"
        if isinstance(saved.get("step"), int):
            saved["step"] = torch.tensor(float(saved["step"]), dtype=torch.float64)
        for key in ("exp_avg", "exp_avg_sq"):
            if isinstance(saved.get(key), Tensor):
                saved[key] = saved[key].float()
        if "scaling_grad" in saved and isinstance(saved["scaling_grad"], Tensor):
            saved["limiter_norm"] = saved.pop("scaling_grad").float().reshape(())
        if "projector" not in saved:
            continue
        group, p = groups[i], ours[i]["params"][j]
        ortho = getattr(saved.pop("projector"), "ortho_matrix", None)
        if not isinstance(ortho, Tensor):
            raise ValueError(f"{label}: the peer's 'projector' holds no projection matrix (ortho_matrix is "
                             f"{type(ortho).__name__}); proj_type 'full' is not supported")
        if group["refresh"] == "dct":
            raise ValueError(f"{label}: this {name} has refresh='dct', but a galore-torch / fira checkpoint holds an "
                             "SVD projector: build the optimizer with refresh='svd' (the peers') or 'randomized'")
        if "proj_type" in group and p.dim() == 2:
            ortho = _refresh.svd_layout(ortho.float(), projection_side(group["proj_type"], p.shape))
        saved["proj"] = ortho
        if isinstance(group.get("update_proj_gap"), int) and group["update_proj_gap"] > 0 and "step" in saved:
            saved["refreshes"] = -(-int(saved["step"]) // group["update_proj_gap"])
    return {"state": state, "param_groups": groups}
