"""ApolloAdamW: APOLLO and APOLLO-Mini (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level
Performance", arXiv 2412.05270) on the fused projected step.

Param groups are ``apollo_torch.APOLLOAdamW``'s:

    ApolloAdamW([{'params': other},
                 {'params': matrices, 'rank': 256, 'proj': 'random', 'scale_type': 'channel',
                  'scale': 1, 'update_proj_gap': 200, 'proj_type': 'std'}])        # APOLLO
    ApolloAdamW([{'params': other},
                 {'params': matrices, 'rank': 1, 'proj': 'random', 'scale_type': 'tensor',
                  'scale': 128, 'update_proj_gap': 200, 'proj_type': 'std'}])      # APOLLO-Mini

(the values shown are the official repository's recommended settings; a group with 'rank' takes
these as defaults for the keys it leaves out). For each 2-D parameter of a group with 'rank':
the gradient is projected by a random Gaussian P (variance 1/r), Adam runs on the projection R,
and the raw gradient is scaled by ‖N‖/‖R‖ per channel ('channel') or for the whole matrix
('tensor') — there is no back-projection — then passes Fira's norm-growth limiter and is
multiplied by √scale (lowrank_kernels.ops.apollo_step). A group without
'rank' runs transformers-style AdamW, as apollo_torch does.

The projection is never stored: like the paper's "regenerate from the seed", each step rebuilds
P from a 64-bit seed with ``torch.Generator(device).manual_seed(seed)`` and ``torch.randn``
exactly as apollo_torch's ``stable_randn``; the seeds follow apollo_torch's sequence (the
parameter's 1-based position in the optimizer, then ``next_seed`` at every refresh, when the step
count before its increment is a multiple of 'update_proj_gap'). So on one device the projections,
and with fp32 parameters the trajectory, are apollo_torch's. The optimizer state of a projected
parameter is two fp32 (m, r) or (r, n) moments, a 0-d limiter norm and two integers
(``state_bytes`` counts them); GaLore and Fira also keep P.

Batching: the matrices of a group that share shape, dtype and layout step in one launch of each
kernel (the batch is a grid axis; each is computed exactly as alone). There is no per-layer
(in-backward) mode and no CUDA-graph capture here: the projection is drawn on the host's
schedule every step.

Differences from apollo_torch: moments are fp32 for every parameter dtype (apollo_torch keeps
bf16 moments for bf16 parameters); proj_type is 'std' only (apollo_torch's channel scaling
is shaped for it); 'proj': 'svd' is not offered (that is GaLoreAdamW/FiraAdamW); its
``scale_front`` and ``disable_nl`` switches are not offered (the defaults, False, are what runs).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from lowrank_kernels.ops import apollo_step as _apollo
from lowrank_kernels.ops import projected_step as _ps
from lowrank_kernels.ops._step_checks import check_hyper
from lowrank_kernels.optim import schema as _schema
from lowrank_kernels.optim._common import closure_loss
from lowrank_kernels.optim.schema import projection_side

__all__ = ["ApolloAdamW", "apollo_projection", "next_seed", "state_bytes"]

#: the keys a projected group reads and their defaults (the official APOLLO settings)
GROUP_DEFAULTS = {"proj": "random", "scale_type": "channel", "scale": 1.0, "update_proj_gap": 200,
                  "proj_type": "std"}
SCALE_TYPES = ("channel", "tensor")
_NEXT_SEED_ADVANCE = 0xF  # apollo_torch's ADV_DEFAULT


def next_seed(seed: int) -> int:
    """The seed of the next projection after one drawn from ``seed``: apollo_torch's
    ``next_seed`` (the 15th int64 of a CPU generator seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (_NEXT_SEED_ADVANCE,), generator=generator)[-1])


def apollo_projection(shape: tuple, rank: int, side: str, seed: int, device) -> Tensor:
    """The fp32 random projection of an (m, n) gradient: (r, n) for side 'right', (m, r) for
    'left', N(0, 1/r) entries drawn by ``torch.randn`` from a ``device`` generator seeded with
    ``seed`` (apollo_torch's ``stable_randn`` / √r)."""
    m, n = shape
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    size = (rank, n) if side == "right" else (m, rank)
    return torch.randn(size, generator=generator, device=device, dtype=torch.float32) / math.sqrt(rank)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, projectors, limiter norms, counts)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, Tensor))


class ApolloAdamW(torch.optim.Optimizer):
    """AdamW with APOLLO's (or APOLLO-Mini's) random-projection gradient scaling; see the module
    docstring for the param groups.

    Args:
        params: parameters or param groups (apollo_torch's keys).
        lr, betas, eps, weight_decay, correct_bias: transformers-style AdamW (apollo_torch's
            defaults: 1e-3, (0.9, 0.999), 1e-6, 0, True).
        backend: None, 'reference' or 'triton' for the projected step and the plain AdamW step.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, backend: Optional[str] = None):
        check_hyper(lr, betas, eps, weight_decay)
        self.backend = backend
        self._count = 0
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": bool(correct_bias)}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (validated; a projected group gets APOLLO's defaults for missing keys) and give
        each of its parameters apollo_torch's seed, its 1-based position in the optimizer."""
        if "rank" in param_group:
            for key, value in GROUP_DEFAULTS.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group, len(self.param_groups) - 1)
        for p in group["params"]:
            self._count += 1
            if p.requires_grad:
                self.state[p]["seed"] = self._count

    @staticmethod
    def _validate_group(group: dict, i: int, where: str = "param group") -> None:
        where = f"{where} {i}"
        check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        if isinstance(group["lr"], Tensor):
            _schema.check_lr_tensor(group["lr"], group["params"], where)
        if "rank" not in group:
            extra = sorted(set(GROUP_DEFAULTS) & set(group))
            if extra:
                raise ValueError(f"{where}: {extra} are only read with 'rank'")
            return
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{where}: 'rank' must be an int >= 1, got {rank!r}")
        if group["proj"] != "random":
            raise ValueError(f"{where}: 'proj' must be 'random' (for 'svd' use GaLoreAdamW), got {group['proj']!r}")
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"{where}: 'scale_type' must be one of {SCALE_TYPES}, got {group['scale_type']!r}")
        scale = group["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"{where}: 'scale' must be a finite float >= 0, got {scale!r}")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"{where}: 'update_proj_gap' must be an int >= 1, got {gap!r}")
        if group["proj_type"] != "std":
            raise ValueError(f"{where}: 'proj_type' must be 'std', got {group['proj_type']!r}")
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(f"{where}: a parameter of shape {tuple(p.shape)} cannot be projected: only 2-D "
                                 "parameters go into a group with 'rank'")
            if rank > min(p.shape):
                raise ValueError(f"{where}: 'rank' {rank} exceeds min{tuple(p.shape)}")

    def _label(self, p: Tensor) -> str:
        i, j = next((i, j) for i, g in enumerate(self.param_groups) for j, q in enumerate(g["params"]) if q is p)
        return f"param group {i}, params[{j}] of shape {tuple(p.shape)}"

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict after checking it against this optimizer: the same groups and
        parameters, 'rank' where this optimizer projects (the same rank), valid hyper-parameters,
        and per parameter the state keys a step needs, the moments' shapes and values (finite,
        ``exp_avg_sq`` >= 0), integral counts and seeds. A failed check raises ValueError naming
        the group, the parameter and the key, and nothing is loaded. Moments stay fp32 (torch
        would cast them to the parameter's dtype)."""
        self._check_checkpoint(state_dict)
        super().load_state_dict(state_dict)
        _schema.load_tensors(self, state_dict)

    def _check_checkpoint(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from "
                             f"ApolloAdamW.state_dict()), got {type(state_dict).__name__}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this ApolloAdamW has "
                             f"{len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"checkpoint param group {i}"
            required = {"params", "lr", "betas", "eps", "weight_decay", "correct_bias"}
            if "rank" in group:
                required |= {"rank"} | set(GROUP_DEFAULTS)
            missing = sorted(required - set(saved))
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing} that ApolloAdamW needs; the checkpoint's keys: "
                                 f"{sorted(saved)}")
            if ("rank" in saved) != ("rank" in group) or saved.get("rank") != group.get("rank"):
                raise ValueError(f"{where}: 'rank' is {saved.get('rank')!r} in the checkpoint but "
                                 f"{group.get('rank')!r} in this ApolloAdamW; the state is shaped by it")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}: {len(saved['params'])} parameters in the checkpoint, "
                                 f"{len(group['params'])} in this ApolloAdamW")
            self._validate_group({**saved, "params": group["params"]}, i, "checkpoint param group")
            for j, (index, p) in enumerate(zip(saved["params"], group["params"])):
                if index in state_dict["state"]:
                    self._check_state(state_dict["state"][index], p, saved, f"{where}, params[{j}]")

    @staticmethod
    def _check_state(state: dict, p: Tensor, group: dict, where: str) -> None:
        stepped = {"step", "count", "exp_avg", "exp_avg_sq"}
        shape = p.shape
        if "rank" in group:
            stepped |= {"proj_seed", "limiter_norm"}
            shape = _ps.projected_shape(p.shape, group["rank"], projection_side("std", tuple(p.shape)))
        unknown = sorted(set(state) - stepped - {"seed"})
        missing = sorted(({"seed"} | (stepped if set(state) & stepped else set())) - set(state))
        if unknown or missing:
            raise ValueError(f"{where}: state with unknown key(s) {unknown} and missing key(s) {missing}; ApolloAdamW "
                             f"keeps {sorted(stepped | {'seed'})} (a checkpoint of another optimizer?)")
        _schema.check_state_values(state, {"exp_avg": shape, "exp_avg_sq": shape, "limiter_norm": ()}, where, p.shape)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One step of every parameter with a gradient; returns the closure's loss, if any."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            buckets = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                _schema.check_gradient(self, p, p.grad, lambda: self._label(p))
                if "rank" not in group:
                    self._step_plain(p, group)
                    continue
                # Matrices of one shape and layout share each kernel launch (the batch is a grid axis;
                # every one is computed exactly as alone).
                key = (tuple(p.shape), p.dtype, p.stride(), p.grad.stride(), p.device)
                buckets.setdefault(key, []).append(p)
            for params in buckets.values():
                for i in range(0, len(params), _ps.MAX_BATCH):
                    self._step_projected(params[i:i + _ps.MAX_BATCH], group)
        return loss

    def _hyper(self, group: dict) -> dict:
        return dict(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                    correct_bias=group["correct_bias"], backend=self.backend)

    def _count_step(self, p: Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
            state["count"] = 0
        return state

    def _step_plain(self, p: Tensor, group: dict) -> None:
        state = self._count_step(p)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        state["count"] += 1
        _ps.adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"], **self._hyper(group))

    def _step_projected(self, params: list, group: dict) -> None:
        rank, side = group["rank"], projection_side("std", tuple(params[0].shape))
        states, projs = [], []
        for p in params:
            state = self._count_step(p)
            if "proj_seed" not in state:
                state["proj_seed"] = state["seed"]
            elif state["count"] % group["update_proj_gap"] == 0:
                state["proj_seed"] = next_seed(state["proj_seed"])
            if "exp_avg" not in state:
                rshape = _ps.projected_shape(p.shape, rank, side)
                state["exp_avg"] = torch.zeros(rshape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(rshape, dtype=torch.float32, device=p.device)
                state["limiter_norm"] = torch.full((), -1.0, dtype=torch.float32, device=p.device)
            state["step"] += 1
            state["count"] += 1
            states.append(state)
            projs.append(apollo_projection(tuple(p.shape), rank, side, state["proj_seed"], p.device))
        _apollo.apollo_steps(params, [p.grad for p in params], projs, [s["exp_avg"] for s in states],
                             [s["exp_avg_sq"] for s in states], [s["limiter_norm"] for s in states], side=side,
                             steps=[s["step"] for s in states], scale=float(group["scale"]),
                             tensor_wise=group["scale_type"] == "tensor", **self._hyper(group))
