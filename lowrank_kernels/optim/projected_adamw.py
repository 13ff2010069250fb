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
and so does per-parameter clipping. These pending sums live in the optimizer state
('proj_grad_acc', 'grad_acc'; ``.grad`` is None between backward passes), so a checkpoint taken
between micro-batches carries them and resumes bit for bit. Global gradient-norm clipping is impossible in this mode (no
moment sees all gradients): ``max_grad_norm`` clips each parameter's gradient by its own norm,
in both modes. A GradScaler cannot unscale gradients that were already consumed in backward:
``GradScaler.step`` on a per-layer optimizer raises.
The hooks read their group from ``param_groups`` at every call, so an LR scheduler, a
``load_state_dict`` and edits of the groups take effect exactly as in the standard mode. A
parameter can be hooked by one per-layer optimizer only: a second one is refused at
construction (``remove_hooks()`` or ``remove_per_layer_hooks(params)`` release the first).

Batching: ``step()`` launches the fused kernels once per bucket of a param group's parameters
that share shape, dtype, layout and projection side (for a transformer: once for all q/k/v/o
projections, once for all up projections, ...), not once per parameter; each parameter's result
is bit for bit what it would be alone. Per-layer mode steps each parameter alone, by design.

No host synchronisation on a step without a refresh: each parameter's step count is a 0-d
float64 tensor on its device, the bias-corrected step size is computed from it on the device
(lowrank_kernels.ops.projected_step.step_coefficients), the limiter and the clipping norms stay
on the device, and lr may be a 0-d tensor on the device (then an LR scheduler updates it in
place). Such a step can be captured in a CUDA graph. The refresh schedule (step %
update_proj_gap) is the exception: which step refreshes is decided on the host, from a host copy
of each count, and a refresh (SVD, range finder, DCT selection) runs eagerly. A captured graph
therefore covers the steps without a refresh; ``refresh_due()`` tells them apart and
``GraphedStep`` does the split: eager refresh steps, graph replays otherwise. Refreshes write the
projectors in place, so the graph reads the new ones; a float lr is frozen into the graph.

torch.compile of a function calling ``step()`` traces the device work (counters, step sizes,
one node per fused launch) and leaves the per-parameter host bookkeeping (state, refresh,
schedule) to run eagerly between graphs, so the changing counts cause no recompilation.

Param groups accept only the keys this optimizer reads (lowrank_kernels.optim.schema), and
``load_state_dict`` checks a checkpoint (the optimizer it came from, rank, proj_type, state keys,
shapes and values) before loading anything; galore-torch's and fira's checkpoints load too.
``state_dict()`` holds plain tensors and Python scalars only (moments, projectors or DCT
indices, step counts, the limiter's norm, the randomized refresh's seed and counter, the pending
accumulation of per-layer mode), loadable with ``torch.load(weights_only=True)``; a resumed run continues bit for
bit.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, List, Optional, Union

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_kernels import backend as _backend
from lowrank_kernels.ops import _rng
from lowrank_kernels.ops import projected_step as _ps
from lowrank_kernels.optim import distributed as _dist
from lowrank_kernels.optim import refresh as _refresh
from lowrank_kernels.optim import schema as _schema
from lowrank_kernels.optim._common import closure_loss
from lowrank_kernels.optim.schema import PROJ_TYPES, projection_side

__all__ = ["GaLoreAdamW", "FiraAdamW", "projection_side", "remove_per_layer_hooks", "PROJ_TYPES"]

# Parameter -> weak reference to the per-layer optimizer whose hooks step it inside backward. A
# second optimizer on the same parameter (a notebook cell run twice) would find the gradient
# already consumed by the first one's hook; construction refuses it instead.
_PER_LAYER_OWNERS = WeakIdKeyDictionary()


def _per_layer_owner(p: Tensor):
    ref = _PER_LAYER_OWNERS.get(p)
    owner = ref() if ref is not None else None
    return owner if owner is not None and owner._hooks else None


def remove_per_layer_hooks(params) -> list:
    """Remove the per-layer hooks that any GaLoreAdamW / FiraAdamW holds on ``params``.

    For when that optimizer is no longer reachable (its variable was rebound by re-running a
    cell, but its hooks keep it alive and keep stepping). Returns the optimizers whose hooks were
    removed; they step nothing from backward afterwards.
    """
    removed = []
    for p in params:
        owner = _per_layer_owner(p)
        if owner is not None and all(owner is not o for o in removed):
            owner.remove_hooks()
            removed.append(owner)
    return removed


def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


class ProjectedAdamW(torch.optim.Optimizer):
    """Shared machinery of GaLoreAdamW and FiraAdamW; subclasses set the scale key and Fira."""

    _SCALE_KEY = "scale"
    _FIRA = False

    def __init__(
        self,
        params,
        lr: Union[float, Tensor] = 1e-3,
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
            raise ValueError("accumulation_steps > 1 needs per_layer=True "
                             "(otherwise accumulate .grad and call step() as usual)")
        if max_grad_norm is not None and (not _is_real(max_grad_norm) or max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm must be None or a float > 0, got {max_grad_norm!r}")
        for name, v, lo in (("oversampling", oversampling, 0), ("power_iters", power_iters, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if backend not in (None,) + _backend.CHOICES:
            raise ValueError(f"backend must be one of {_backend.CHOICES} or None, got {backend!r}")
        self.per_layer = per_layer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.oversampling = oversampling
        self.power_iters = power_iters
        self.backend = backend
        self._hooks = []
        # Parameter -> (group index, index in the group). The hooks look their group up in
        # self.param_groups by index at every call, never keep the dict: load_state_dict replaces
        # the group dicts, and an LR scheduler or the user edits the current ones.
        self._position: dict = {}
        # DCT projectors rebuilt from the stored indices, refreshed in place; never part of the
        # state_dict.
        self._dct_proj: dict = {}
        # Host copy of each parameter's step count (the device one is state["step"]): the refresh
        # schedule is decided here without reading the device.
        self._schedule: dict = {}
        # GradScaler hands itself to step() only when this is set: per-layer mode refuses it.
        self._step_supports_amp_scaling = per_layer
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        refresh=refresh)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------
    # Construction-time validation
    # ------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a group after validating its keys and hyper-parameters (ValueError naming group and
        key), and, in per-layer mode, hook its parameters."""
        index = len(self.param_groups)
        if isinstance(param_group, dict):
            _schema.check_group_keys(param_group, index, self._SCALE_KEY)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group, index)
            for j, p in enumerate(group["params"]):
                owner = _per_layer_owner(p)
                if owner is not None and owner is not self:
                    raise ValueError(
                        f"param group {index}: params[{j}] (shape {tuple(p.shape)}) already steps inside backward "
                        f"through another per-layer {type(owner).__name__} (object at {id(owner):#x}, hooks on "
                        f"{len(owner._hooks)} parameters), e.g. from running the same cell twice; its hook would "
                        "consume the gradient before this optimizer sees it. Call remove_hooks() on that "
                        "optimizer, or lowrank_kernels.optim.remove_per_layer_hooks(params) when it is no longer "
                        "reachable"
                    )
        except ValueError:
            self.param_groups.pop()
            raise
        for j, p in enumerate(group["params"]):
            self._position[p] = (index, j)
            if self.per_layer and p.requires_grad:  # a frozen parameter (e.g. sp_index) never has a gradient
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))
                _PER_LAYER_OWNERS[p] = weakref.ref(self)

    def _group_of(self, p: Tensor) -> dict:
        return self.param_groups[self._position[p][0]]

    def _label(self, p: Tensor) -> str:
        i, j = self._position[p]
        names = self.param_groups[i].get("param_names")
        name = f" ({names[j]!r})" if names else ""
        return f"param group {i}, params[{j}]{name} of shape {tuple(p.shape)}"

    def _validate_group(self, group: dict, i: int, where: str = "param group") -> None:
        def bad(key, expected, got):
            raise ValueError(f"{where} {i}: '{key}' must be {expected}, got {got!r}")

        lr = group["lr"]
        if isinstance(lr, Tensor):
            _schema.check_lr_tensor(lr, group["params"], f"{where} {i}")
        elif not _is_real(lr) or lr < 0:
            bad("lr", "a float >= 0", lr)
        betas = group["betas"]
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2
        if not (pair and all(_is_real(b) and 0 <= b < 1 for b in betas)):
            bad("betas", "a pair of floats in [0, 1)", betas)
        if not _is_real(group["eps"]) or group["eps"] < 0:
            bad("eps", "a float >= 0", group["eps"])
        if not _is_real(group["weight_decay"]) or group["weight_decay"] < 0:
            bad("weight_decay", "a float >= 0", group["weight_decay"])
        if not isinstance(group["correct_bias"], bool):
            bad("correct_bias", "a bool", group["correct_bias"])
        for j, p in enumerate(group["params"]):
            if _dist.is_sharded(p):
                _dist.check_sharded(p, f"{where} {i}: params[{j}]")
                if self.accumulation_steps > 1:
                    raise ValueError(f"{where} {i}: params[{j}] is sharded (FSDP2): accumulation_steps must be 1 "
                                     "(accumulate with FSDP2's set_requires_gradient_sync(False) on the micro-batches)")
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
                raise ValueError(f"{where} {i}: 'rank' is given but params[{j}] has shape {tuple(p.shape)}; "
                                 "only 2-D parameters can be projected")
            if rank > min(p.shape):
                bad("rank", f"<= min(m, n) = {min(p.shape)} for params[{j}] of shape {tuple(p.shape)}", rank)
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{where} {i}: params[{j}] has dtype {p.dtype}; float32, float16 or bfloat16 expected")

    # ------------------------------------------------------------------------------------------
    # Steps: per-parameter preparation on the host, one fused launch per bucket
    # ------------------------------------------------------------------------------------------
    def _refresh_due(self, p: Tensor, group: dict) -> bool:
        return "refreshes" not in self.state[p] or self._schedule.get(p, 0) % group["update_proj_gap"] == 0

    def count_replayed_step(self, params) -> None:
        """Advance the host-side refresh schedule of ``params`` by one step whose device work ran
        elsewhere (a CUDA graph replay: the device counters advanced in it)."""
        for p in params:
            self._schedule[p] += 1

    def refresh_due(self) -> bool:
        """Whether the next ``step()`` refreshes a projector (of a parameter that has a gradient
        now). Host bookkeeping only, no synchronisation: decides between an eager step and a
        graph replay (see ``GraphedStep``)."""
        return any(
            p.grad is not None and self._refresh_due(p, group)
            for group in self.param_groups if "rank" in group for p in group["params"]
        )

    def _projector(self, p: Tensor, group: dict, grad: Optional[Tensor], side: str) -> Tensor:
        """The current projector, refreshed from ``grad`` when the schedule says so.

        A refresh writes into the existing projector, so a captured CUDA graph sees it.
        """
        state = self.state[p]
        kind = group["refresh"]
        sharded = _dist.is_sharded(p)
        if self._refresh_due(p, group):
            count = state.get("refreshes", 0)
            # A refresh reads the gradient on the host anyway (SVD, QR, top-k); a non-finite one
            # would fail inside LAPACK or give a NaN projector, far from its cause. (A sharded
            # refresh checks its first reduced sketch instead: the same answer on every rank.)
            if not sharded and not bool(torch.isfinite(grad).all()):
                raise ValueError(
                    f"{type(self).__name__}: {self._label(p)} has a NaN or inf gradient at optimizer step "
                    f"{self._schedule.get(p, 0) + 1}, a projector refresh step (refresh={kind!r}); check the loss "
                    "scale and learning rate, or clip gradients (max_grad_norm)"
                )
            # A sharded parameter's refresh gathers what it needs (lowrank_kernels.optim.distributed):
            # every rank then holds its piece of the single-process projector.
            rank = group["rank"]
            if kind == "svd":
                self._set_proj(p, group, side, _dist.svd_projector(grad, p, rank, side, self._label(p)) if sharded
                               else _refresh.svd_projector(grad, rank, side))
            elif kind == "randomized":
                if "rng_seed" not in state:
                    self._draw_seeds()
                seed = _refresh.refresh_seed(state["rng_seed"], count)
                self._set_proj(p, group, side, _dist.randomized_projector(
                    grad, p, rank, side, seed, self.oversampling, self.power_iters, self._label(p)) if sharded
                    else _refresh.randomized_projector(grad, rank, side, seed, self.oversampling, self.power_iters))
            else:
                state["dct_index"] = (_dist.dct_select(grad, p, rank, side, self._label(p)) if sharded
                                      else _refresh.dct_select(grad, rank, side))
                self._store(self._dct_proj, p, self._dct_projector(p, side))
            state["refreshes"] = count + 1
        if kind != "dct":
            return _dist.local(state["proj"])
        if p not in self._dct_proj:
            self._dct_proj[p] = self._dct_projector(p, side)
        return self._dct_proj[p]

    def _draw_seeds(self) -> None:
        """Draw the randomized refresh's seed of every parameter that has none, in param-group
        order: per-layer hooks and DDP's buckets step parameters in other orders, and a seed
        drawn at each one's first refresh would then depend on the mode. A sharded parameter
        takes its mesh's first rank's draw (every rank must build the same test matrix)."""
        for group in self.param_groups:
            if "rank" not in group or group["refresh"] != "randomized":
                continue
            for p in group["params"]:
                state = self.state[p]
                if "rng_seed" not in state:
                    seed = _rng.draw_seed()
                    state["rng_seed"] = _dist.broadcast_seed(seed, p) if _dist.is_sharded(p) else seed

    def _set_proj(self, p: Tensor, group: dict, side: str, proj: Tensor) -> None:
        # A sharded parameter's projector is a DTensor (replicated, or its rows sharded as p's):
        # its local piece takes this rank's piece.
        state = self.state[p]
        if not _dist.is_sharded(p):
            self._store(state, "proj", proj)
            return
        if "proj" not in state:
            state["proj"] = self._zero_proj(p, group, side)
        state["proj"].to_local().copy_(proj)

    def _dct_projector(self, p: Tensor, side: str) -> Tensor:
        # The indices are whole on every rank; a sharded parameter's left projector is its rows.
        dim = p.shape[1] if side == "right" else p.shape[0]
        proj = _refresh.dct_projector(self.state[p]["dct_index"], dim, side)
        return _dist.local_rows(proj, p) if side == "left" and _dist.is_sharded(p) else proj

    @staticmethod
    def _store(table: dict, key, value: Tensor) -> None:
        # In place when the slot exists (copy_ keeps its layout, which every refresh of a kind
        # shares): a captured CUDA graph keeps reading the same memory.
        if key in table:
            table[key].copy_(value)
        else:
            table[key] = value

    def _clip(self, grad: Tensor, p: Tensor) -> Tensor:
        # On the device: no host synchronisation for the norm. A sharded gradient's norm is the
        # sum of its shards' squares.
        if _dist.is_sharded(p):
            norm = _dist.global_sq_norm(grad, p).sqrt()
        else:
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        factor = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        return (grad.float() * factor).to(grad.dtype)

    @torch.compiler.disable  # host bookkeeping: torch.compile would guard on the schedule's counts
    def _prepare(self, group: dict, params: List[Tensor], grads: List[Optional[Tensor]],
                 proj_grads: Optional[List[Tensor]]) -> list:
        """Per parameter of ``group``: state, clipping, refresh and the host schedule; returns the
        launch buckets, (side, params, grads, projectors, projected gradients) of parameters that
        share shape, dtype, layout and side (side None: plain AdamW)."""
        projected = "rank" in group
        buckets: dict = {}
        sizes: dict = {}
        for i, (p, grad) in enumerate(zip(params, grads)):
            if grad is not None:
                _schema.check_gradient(self, p, grad, lambda: self._label(p))
            state = self.state[p]
            sharded = _dist.is_sharded(p)
            if sharded:
                grad = _dist.local(grad)  # FSDP2: the reduce-scattered rows of this rank
            if grad is not None and self.max_grad_norm is not None:
                grad = self._clip(grad, p)
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
            side = proj = None
            if not projected:
                self._allocate_moments(p, group, None)
                key = (tuple(p.shape), p.dtype, p.device, sharded)
            else:
                side = projection_side(group["proj_type"], p.shape)
                proj = self._projector(p, group, grad, side)
                self._allocate_moments(p, group, side)
                layout = tuple(t.stride() for t in (p, proj, state["exp_avg"], state["exp_avg_sq"]))
                grad_layout = None if grad is None else grad.stride()
                key = (side, tuple(p.shape), p.dtype, p.device, layout, grad_layout, sharded)
            # A launch takes at most MAX_BATCH parameters (a grid axis); more make further buckets.
            sizes[key] = sizes.get(key, 0) + 1
            bucket = buckets.setdefault(key + ((sizes[key] - 1) // _ps.MAX_BATCH,), (side, [], [], [], []))
            for lst, x in zip(bucket[1:], (p, grad, proj, proj_grads[i] if proj_grads else None)):
                lst.append(x)
            self._schedule[p] = self._schedule.get(p, 0) + 1
        return list(buckets.values())

    def _allocate_moments(self, p: Tensor, group: dict, side: Optional[str]) -> None:
        """The moments (and Fira's limiter norm) of ``p``, zero, unless they exist. A sharded
        parameter's are DTensors: row-sharded where their rows are p's rows, else replicated."""
        state = self.state[p]
        if "exp_avg" in state:
            return
        if side is None:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            return
        shape = _ps.projected_shape(p.shape, group["rank"], side)
        if _dist.is_sharded(p):
            # Right: R's rows are p's rows. Left: R (r, n) is split by columns.
            state["exp_avg"] = _dist.sharded_zeros(p, shape, dim=0 if side == "right" else 1)
        else:
            state["exp_avg"] = torch.zeros(shape, device=p.device, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if self._FIRA:
            state["limiter_norm"] = torch.full((), -1.0, device=p.device, dtype=torch.float32)

    def _zero_proj(self, p: Tensor, group: dict, side: str) -> Tensor:
        shape = (group["rank"], p.shape[1]) if side == "right" else (p.shape[0], group["rank"])
        if _dist.is_sharded(p):
            return _dist.sharded_zeros(p, shape, dim=0 if side == "left" else None)
        return torch.zeros(shape, device=p.device, dtype=torch.float32)

    def _allocate_all_state(self) -> None:
        """Every trainable parameter's state as a step-0 layout (zeros; the keys a stepped state
        has), unless it has state: the template torch.distributed.checkpoint loads a checkpoint
        into (lowrank_kernels.optim.distributed.load), never stepped from."""
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad or "step" in self.state[p]:
                    continue
                state = self.state[p]
                state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
                side = projection_side(group["proj_type"], p.shape) if "rank" in group else None
                self._allocate_moments(p, group, side)
                if side is None:
                    continue
                state["refreshes"] = 0
                if group["refresh"] == "dct":
                    state["dct_index"] = torch.zeros(group["rank"], dtype=torch.int64, device=p.device)
                else:
                    state["proj"] = self._zero_proj(p, group, side)
                if group["refresh"] == "randomized":
                    state["rng_seed"] = 0

    def _step_sharded(self, group: dict, side: Optional[str], ps: List[Tensor], gs: List[Tensor],
                      projs: List[Tensor], steps: List[Tensor]) -> None:
        # FSDP2 parameters: each rank steps its rows (lowrank_kernels.optim.distributed).
        if side is None:
            live = [i for i, p in enumerate(ps) if p.to_local().numel()]
            if live:
                states = [self.state[ps[i]] for i in live]
                _ps.adamw_steps([ps[i].to_local() for i in live], [gs[i] for i in live],
                                [st["exp_avg"].to_local() for st in states],
                                [st["exp_avg_sq"].to_local() for st in states],
                                steps=[steps[i] for i in live], lr=group["lr"], betas=tuple(group["betas"]),
                                eps=group["eps"], weight_decay=group["weight_decay"],
                                correct_bias=group["correct_bias"], backend=self.backend)
            return
        coef = _ps.step_coefficients(steps, group["lr"], group["betas"], group["weight_decay"], group["correct_bias"])
        for b, (p, g, proj) in enumerate(zip(ps, gs, projs)):
            _dist.projected_step(p, g, proj, self.state[p], coef[b], side, group, group[self._SCALE_KEY], self._FIRA)

    def _step_group(self, group: dict, params: List[Tensor], grads: List[Optional[Tensor]],
                    proj_grads: Optional[List[Tensor]] = None) -> None:
        """Step ``params`` of ``group``: per parameter the host bookkeeping, then one fused launch
        per bucket of parameters sharing shape, dtype, layout and side.

        ``grads`` may hold None where ``proj_grads`` (GaLore, per-layer accumulation) is given.
        """
        for side, ps, gs, projs, pgs in self._prepare(group, params, grads, proj_grads):
            states = [self.state[p] for p in ps]
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1.0)
            if _dist.is_sharded(ps[0]):
                self._step_sharded(group, side, ps, gs, projs, steps)
                continue
            common = dict(
                steps=steps, lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                weight_decay=group["weight_decay"], correct_bias=group["correct_bias"], backend=self.backend,
            )
            m1s, m2s = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
            if side is None:
                _ps.adamw_steps(ps, gs, m1s, m2s, **common)
                continue
            _ps.projected_adamw_steps(
                ps, None if gs[0] is None else gs, projs, m1s, m2s, side=side, scale=group[self._SCALE_KEY],
                fira=self._FIRA, limiter_norms=[st["limiter_norm"] for st in states] if self._FIRA else None,
                proj_grads=pgs if proj_grads else None, **common,
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
        loss = closure_loss(closure)
        if self.per_layer:
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, [p.grad for p in params])
        return loss

    # ------------------------------------------------------------------------------------------
    # Per-layer mode
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        _schema.check_gradient(self, p, p.grad, lambda: self._label(p))
        group = self._group_of(p)
        state = self.state[p]
        micro = state.get("micro", 0) + 1
        if micro < self.accumulation_steps:
            # The pending sum lives in the state, not in .grad: state_dict() then carries it, and a
            # checkpoint taken between micro-batches resumes bit for bit (acc + g is what autograd's
            # own accumulation into .grad would compute).
            state["micro"] = micro
            if self._can_accumulate_projected(p, group):
                side = projection_side(group["proj_type"], p.shape)
                self._accumulate(state, "proj_grad_acc", _ps.project(p.grad, self._projector(p, group, None, side),
                                                                      side, backend=self.backend))
            else:
                self._accumulate(state, "grad_acc", p.grad)
            p.grad = None
            return
        state["micro"] = 0
        acc = state.pop("proj_grad_acc", None)
        if acc is not None:
            side = projection_side(group["proj_type"], p.shape)
            acc.add_(_ps.project(p.grad, self._projector(p, group, None, side), side, backend=self.backend))
            self._step_group(group, [p], [None], [acc])
        else:
            grad = state.pop("grad_acc", None)
            self._step_group(group, [p], [p.grad if grad is None else grad.add_(p.grad)])
        p.grad = None

    @staticmethod
    def _accumulate(state: dict, key: str, value: Tensor) -> None:
        if key in state:
            state[key].add_(value)
        else:
            state[key] = value

    def _can_accumulate_projected(self, p: Tensor, group: dict) -> bool:
        # Only GaLore, between refreshes, without clipping: then projecting each micro-batch and
        # summing equals projecting the sum, and the full gradient can be freed at once.
        return "rank" in group and not self._FIRA and self.max_grad_norm is None and not self._refresh_due(p, group)

    def remove_hooks(self) -> None:
        """Remove the per-layer hooks (the optimizer then steps nothing from backward)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self._position:
            ref = _PER_LAYER_OWNERS.get(p)
            if ref is not None and ref() is self:
                del _PER_LAYER_OWNERS[p]

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict, keeping fp32 state fp32 (torch would cast it to the parameter's dtype).

        Checked first (lowrank_kernels.optim.schema.check_checkpoint): a checkpoint of another
        optimizer (GaLore into Fira, torch's AdamW), of another rank or proj_type, with unknown
        group or state keys, or with state values no step could come from (NaN or inf, a negative
        ``exp_avg_sq``, a step count that is no count) raises ValueError naming the group, the
        parameter and the key, and nothing is loaded.

        Checkpoints of galore-torch's ``GaLoreAdamW`` (into GaLoreAdamW) and fira's ``FiraAdamW``
        (into FiraAdamW) load too: their state maps one to one (lowrank_kernels.optim.schema.from_peer).
        The checkpoint's hyper-parameters (lr, ...) replace the groups'; edits made after loading,
        and an LR scheduler's, take effect in both modes.
        """
        state_dict = _schema.from_peer(self, state_dict)
        _schema.check_checkpoint(self, state_dict)
        super().load_state_dict(state_dict)
        _schema.load_tensors(self, state_dict)
        # Reading the counts synchronises, once, at load time.
        self._schedule = {p: int(state["step"]) for p, state in self.state.items() if "step" in state}
        self._dct_proj.clear()


class GaLoreAdamW(ProjectedAdamW):
    """AdamW with GaLore gradient projection; galore_torch.GaLoreAdamW's param groups and math.

    Groups with 'rank' (and 'update_proj_gap', 'scale', 'proj_type') project each 2-D weight's
    gradient; others run transformers-style AdamW. Keyword-only extras: ``refresh`` ('svd',
    'randomized', 'dct'), ``oversampling`` and ``power_iters`` (randomized refresh),
    ``per_layer``, ``accumulation_steps``, ``max_grad_norm`` (per-parameter clipping) and
    ``backend``. See the module docstring.
    """

    _SCALE_KEY = "scale"
    _FIRA = False


class FiraAdamW(ProjectedAdamW):
    """AdamW with Fira's projection, norm-based residual scaling and norm-growth limiter.

    fira.FiraAdamW's param groups ('rank', 'update_proj_gap', 'alpha', 'proj_type') and math;
    the same extras as GaLoreAdamW. In per-layer mode with accumulation_steps > 1 full gradients
    are kept between steps (the residual needs them).
    """

    _SCALE_KEY = "alpha"
    _FIRA = True
