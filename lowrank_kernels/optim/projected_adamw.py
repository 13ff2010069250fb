"""GaLoreAdamW and FiraAdamW: AdamW with gradient low-rank projection, on the fused step.

Param groups are galore-torch's and fira's, unchanged:

    GaLoreAdamW([{'params': other},
                 {'params': matrices, 'rank': 128, 'update_proj_gap': 200, 'scale': 0.25, 'proj_type': 'std'}])
    FiraAdamW([{'params': other},
               {'params': matrices, 'rank': 128, 'update_proj_gap': 200, 'alpha': 1.0, 'proj_type': 'std'}])

A group with 'rank' projects each 2-D parameter's gradient (lowrank_kernels.ops.projected_step);
a group without it runs transformers-style AdamW (eps not bias-corrected, decay after the
update), the peers' semantics, so whole-model trajectories match theirs. Moments are fp32 for
every parameter dtype (the peers keep bf16 moments for bf16 parameters).

The projector is refreshed from the full gradient when a parameter's step count (before its
increment) is a multiple of 'update_proj_gap', as the peers do; moments are kept across
refreshes. 'refresh' ('svd', 'randomized', 'dct'; per group or as a default) picks how
(lowrank_kernels.optim.refresh); only 'svd' reproduces the peers' trajectories. proj_type
'full' (two-sided) is not supported.

Per-layer mode (``per_layer=True``): every parameter steps inside backward, in its
post-accumulate-grad hook, and its gradient is freed right after, so at most about one layer's
full gradient exists at a time. ``step()`` then only runs the closure; an LR scheduler steps once
per optimizer step as usual. With ``accumulation_steps=k`` the hooks step on every k-th backward.
Between steps a GaLore parameter keeps only its projected gradient R (the full gradient is
projected and freed in the hook), except before a refresh, which needs the full accumulated
gradient. Fira keeps full gradients when k > 1: its residual G − α·back(R) needs the full sum,
and so does per-parameter clipping. Global gradient-norm clipping is impossible in this mode (no
moment sees all gradients): ``max_grad_norm`` clips each parameter's gradient by its own norm,
in both modes. A GradScaler cannot unscale gradients that were already consumed in backward:
``GradScaler.step`` on a per-layer optimizer raises.

``state_dict()`` holds plain tensors and Python scalars only (moments, projectors or DCT
indices, step counts, the limiter's norm, the randomized refresh's seed and counter, pending
accumulation), loadable with ``torch.load(weights_only=True)``; a resumed run continues bit for
bit.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from lowrank_kernels import backend as _backend
from lowrank_kernels.ops import _rng
from lowrank_kernels.ops import projected_step as _ps
from lowrank_kernels.optim import refresh as _refresh

PROJ_TYPES = ("std", "reverse_std", "left", "right")


def projection_side(proj_type: str, shape) -> str:
    """'left' or 'right' for a weight of ``shape`` under the peers' ``proj_type`` rules."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


class _ProjectedAdamW(torch.optim.Optimizer):
    """Shared machinery of GaLoreAdamW and FiraAdamW; subclasses set the scale key and Fira."""

    _SCALE_KEY = "scale"
    _FIRA = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        refresh: str = "svd",
        oversampling: int = 8,
        power_iters: int = 2,
        per_layer: bool = False,
        accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        backend: Optional[str] = None,
    ):
        if not isinstance(per_layer, bool):
            raise ValueError(f"per_layer must be a bool, got {per_layer!r}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if accumulation_steps > 1 and not per_layer:
            raise ValueError("accumulation_steps > 1 needs per_layer=True (otherwise accumulate .grad and call step() as usual)")
        if max_grad_norm is not None and (not _is_real(max_grad_norm) or max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm must be None or a float > 0, got {max_grad_norm!r}")
        for name, v, lo in (("oversampling", oversampling, 0), ("power_iters", power_iters, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if backend not in (None,) + _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS} or None, got {backend!r}")
        self.per_layer = per_layer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.oversampling = oversampling
        self.power_iters = power_iters
        self.backend = backend
        self._hooks = []
        self._group_by_param: dict = {}
        # DCT projectors rebuilt from the stored indices; never part of the state_dict.
        self._dct_cache: dict = {}
        # GradScaler hands itself to step() only when this is set: per-layer mode refuses it.
        self._step_supports_amp_scaling = per_layer
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, refresh=refresh)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------
    # Construction-time validation
    # ------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a group after validating its hyper-parameters (ValueError naming group and key)."""
        index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group, index)
        except ValueError:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._group_by_param[p] = group
            if self.per_layer:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    def _validate_group(self, group: dict, i: int) -> None:
        def bad(key, expected, got):
            raise ValueError(f"param group {i}: '{key}' must be {expected}, got {got!r}")

        if not _is_real(group["lr"]) or group["lr"] < 0:
            bad("lr", "a float >= 0", group["lr"])
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in betas)):
            bad("betas", "a pair of floats in [0, 1)", betas)
        if not _is_real(group["eps"]) or group["eps"] < 0:
            bad("eps", "a float >= 0", group["eps"])
        if not _is_real(group["weight_decay"]) or group["weight_decay"] < 0:
            bad("weight_decay", "a float >= 0", group["weight_decay"])
        if not isinstance(group["correct_bias"], bool):
            bad("correct_bias", "a bool", group["correct_bias"])
        if "rank" not in group:
            return
        group.setdefault("update_proj_gap", 200)
        group.setdefault(self._SCALE_KEY, 1.0)
        group.setdefault("proj_type", "std")
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            bad("rank", "an int >= 1", rank)
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            bad("update_proj_gap", "an int >= 1", gap)
        if not _is_real(group[self._SCALE_KEY]):
            bad(self._SCALE_KEY, "a finite float", group[self._SCALE_KEY])
        if group["proj_type"] not in PROJ_TYPES:
            bad("proj_type", f"one of {PROJ_TYPES} ('full' is not supported)", group["proj_type"])
        if group["refresh"] not in _refresh.KINDS:
            bad("refresh", f"one of {_refresh.KINDS}", group["refresh"])
        for j, p in enumerate(group["params"]):
            if p.dim() != 2:
                raise ValueError(f"param group {i}: 'rank' is given but params[{j}] has shape {tuple(p.shape)}; only 2-D parameters can be projected")
            if rank > min(p.shape):
                bad("rank", f"<= min(m, n) = {min(p.shape)} for params[{j}] of shape {tuple(p.shape)}", rank)
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"param group {i}: params[{j}] has dtype {p.dtype}; float32, float16 or bfloat16 expected")

    # ------------------------------------------------------------------------------------------
    # One parameter's step
    # ------------------------------------------------------------------------------------------
    def _projector(self, p: Tensor, group: dict, grad: Optional[Tensor], side: str) -> Tensor:
        """The current projector, refreshed from ``grad`` when the schedule says so."""
        state = self.state[p]
        kind = group["refresh"]
        due = state["step"] % group["update_proj_gap"] == 0 or "refreshes" not in state
        if due:
            count = state.get("refreshes", 0)
            if kind == "svd":
                state["proj"] = _refresh.svd_projector(grad, group["rank"], side)
            elif kind == "randomized":
                if "rng_seed" not in state:
                    state["rng_seed"] = _rng.draw_seed()
                seed = _refresh.refresh_seed(state["rng_seed"], count)
                state["proj"] = _refresh.randomized_projector(grad, group["rank"], side, seed, self.oversampling, self.power_iters)
            else:
                state["dct_index"] = _refresh.dct_select(grad, group["rank"], side)
                self._dct_cache.pop(p, None)
            state["refreshes"] = count + 1
        if kind != "dct":
            return state["proj"]
        if p not in self._dct_cache:
            dim = p.shape[1] if side == "right" else p.shape[0]
            self._dct_cache[p] = _refresh.dct_projector(state["dct_index"], dim, side)
        return self._dct_cache[p]

    def _refresh_due(self, p: Tensor, group: dict) -> bool:
        state = self.state[p]
        return "refreshes" not in state or state.get("step", 0) % group["update_proj_gap"] == 0

    def _clip(self, grad: Tensor) -> Tensor:
        # On the device: no host synchronisation for the norm.
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        factor = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        return (grad.float() * factor).to(grad.dtype)

    def _step_param(self, p: Tensor, group: dict, grad: Optional[Tensor], proj_grad: Optional[Tensor] = None) -> None:
        state = self.state[p]
        if grad is not None and self.max_grad_norm is not None:
            grad = self._clip(grad)
        state.setdefault("step", 0)
        common = dict(lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                      weight_decay=group["weight_decay"], correct_bias=group["correct_bias"], backend=self.backend)
        if "rank" not in group:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            state["step"] += 1
            _ps.adamw_step(p, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"], **common)
            return
        side = projection_side(group["proj_type"], p.shape)
        proj = self._projector(p, group, grad, side)
        if "exp_avg" not in state:
            shape = _ps.projected_shape(p.shape, group["rank"], side)
            state["exp_avg"] = torch.zeros(shape, device=p.device, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            if self._FIRA:
                state["limiter_norm"] = torch.full((), -1.0, device=p.device, dtype=torch.float32)
        state["step"] += 1
        _ps.projected_adamw_step(
            p, grad, proj, state["exp_avg"], state["exp_avg_sq"], side=side, step=state["step"],
            scale=group[self._SCALE_KEY], fira=self._FIRA, limiter_norm=state.get("limiter_norm"),
            proj_grad=proj_grad, **common,
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, grad_scaler=None):
        """One optimizer step (per-layer mode: the hooks already stepped; only the closure runs).

        Args:
            closure: re-evaluates the model and returns the loss (run with gradients enabled).
            grad_scaler: passed by torch.amp.GradScaler in per-layer mode only, where it is an error.
        """
        if grad_scaler is not None:
            raise RuntimeError(
                f"{type(self).__name__}(per_layer=True) cannot be used with a GradScaler: the "
                "parameters already stepped inside backward on the scaled gradients. Use bf16 "
                "autocast (no scaler), or per_layer=False"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.per_layer:
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group, p.grad)
        return loss

    # ------------------------------------------------------------------------------------------
    # Per-layer mode
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        group = self._group_by_param[p]
        state = self.state[p]
        micro = state.get("micro", 0) + 1
        if micro < self.accumulation_steps:
            state["micro"] = micro
            if self._can_accumulate_projected(p, group):
                side = projection_side(group["proj_type"], p.shape)
                r = _ps.project(p.grad, self._projector(p, group, None, side), side, backend=self.backend)
                if "proj_grad_acc" in state:
                    state["proj_grad_acc"].add_(r)
                else:
                    state["proj_grad_acc"] = r
                p.grad = None
            return
        state["micro"] = 0
        acc = state.pop("proj_grad_acc", None)
        if acc is not None:
            side = projection_side(group["proj_type"], p.shape)
            acc.add_(_ps.project(p.grad, self._projector(p, group, None, side), side, backend=self.backend))
            self._step_param(p, group, None, proj_grad=acc)
        else:
            self._step_param(p, group, p.grad)
        p.grad = None

    def _can_accumulate_projected(self, p: Tensor, group: dict) -> bool:
        # Only GaLore, between refreshes, without clipping: then projecting each micro-batch and
        # summing equals projecting the sum, and the full gradient can be freed at once.
        return "rank" in group and not self._FIRA and self.max_grad_norm is None and not self._refresh_due(p, group)

    def remove_hooks(self) -> None:
        """Remove the per-layer hooks (the optimizer then steps nothing from backward)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict, keeping fp32 state fp32 (torch would cast it to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._dct_cache.clear()


class GaLoreAdamW(_ProjectedAdamW):
    """AdamW with GaLore gradient projection; galore_torch.GaLoreAdamW's param groups and math.

    Groups with 'rank' (and 'update_proj_gap', 'scale', 'proj_type') project each 2-D weight's
    gradient; others run transformers-style AdamW. Keyword-only extras: ``refresh`` ('svd',
    'randomized', 'dct'), ``oversampling`` and ``power_iters`` (randomized refresh),
    ``per_layer``, ``accumulation_steps``, ``max_grad_norm`` (per-parameter clipping) and
    ``backend``. See the module docstring.
    """

    _SCALE_KEY = "scale"
    _FIRA = False


class FiraAdamW(_ProjectedAdamW):
    """AdamW with Fira's projection, norm-based residual scaling and norm-growth limiter.

    fira.FiraAdamW's param groups ('rank', 'update_proj_gap', 'alpha', 'proj_type') and math;
    the same extras as GaLoreAdamW. In per-layer mode with accumulation_steps > 1 full gradients
    are kept between steps (the residual needs them).
    """

    _SCALE_KEY = "alpha"
    _FIRA = True
