"""GaLoreAdamW / FiraAdamW on PyTorch's distributed engine: FSDP2 shards, DDP, DCP checkpoints.

**FSDP2** (``torch.distributed.fsdp.fully_shard``): a parameter is a DTensor sharded by rows
(``Shard(0)`` on a 1-D mesh; torch.chunk's split, so the last shards may be shorter or empty) and
its gradient arrives reduce-scattered, sharded the same way. The optimizer steps on the local
shards (``to_local()``) and gathers no gradient between refreshes (a refresh step with
``refresh='svd'`` or ``'dct'`` does, see below). For a weight W (m, n) whose rows [s, e) a rank
holds:

- side 'left' (P (m, r), R = Pᵀ G (r, n)): R = Σ over ranks of P[s:e]ᵀ G[s:e], reduce-scattered
  by columns: each rank keeps the moments of its columns of (r, n) and computes N there; the
  columns of α·N are all-gathered and each rank updates its rows of W with P[s:e]·(α·N), P[s:e]
  being its rows of the projector. A reduce-scatter and an all-gather of r·n fp32 move what one
  all-reduce of R would, and the moments are sharded too.
- side 'right' (P (r, n), R = G Pᵀ (m, r)): R's rows are local, so are the moments' rows; P is
  replicated. GaLore communicates nothing per step.
- Fira: the channel norms φ of R and N are local (right: channel = row of R; left: channel =
  column, and each rank has its columns). The limiter's ‖S‖² is one all-reduce of one fp32: on
  the right a sum of local squares of S, on the left Σ φ_i²·(‖G_i‖² − (2α − α²)·‖R_i‖²) over
  the rank's columns (exact for an orthonormal P, as in the fused kernels), the column energies
  ‖G_i‖² reduce-scattered with R as one more row. The rows then need α·(N − R·φ/l) and φ/l
  (U = α·P N + (G − α·P R)·φ/l): those r + 1 rows are all-gathered.
- Per-parameter clipping (``max_grad_norm``): ‖G‖² the same way, one fp32 value.
- Plain AdamW groups are elementwise: local, nothing communicated.

The sharded step is plain torch on the local shard (the reference composition of
ops/projected_step on the right; the same math on the left, with the collectives between its
products): on a GPU cuBLAS products and elementwise kernels, not the fused kernels, whose limiter
sums the residual inside the launch, over the whole matrix.

**The refresh** on sharded gradients runs on refresh steps only (every update_proj_gap steps);
the steps between communicate what is listed above and nothing more. Each kind:

- ``refresh='svd'`` (GaLore's and Fira's default): the rows of G are all-gathered (m·n elements
  of the gradient's dtype per rank, the shards padded to ceil(m / W) rows), and every rank runs
  the single-process SVD on the same bits: the same factors on every rank, equal to one process's
  within the rounding of the gradient's reduction. This holds the whole gradient on every rank
  for the length of the refresh.
- ``refresh='dct'``: side 'right' transforms G's rows, which are local: the n fp32 energies
  ‖G d_k‖² are all-reduced and every rank selects the same indices. Side 'left' transforms along
  the sharded dimension: the rows of G are all-gathered, as for 'svd'.
- ``refresh='randomized'``: the range finder of lowrank_kernels.optim.refresh, with each
  product that runs over the sharded dimension summed by an all-reduce, and every tall sketch
  (m, k), k = r + oversampling, gathered so that its QR or SVD runs redundantly on every rank on
  the same bits; nothing m·n-sized travels:

- right:  Y = Σ G_sᵀ Ω_s (n, k) all-reduced, QR; each power iteration the same; then the sketch
  G Q (m, k) is gathered and its exact SVD gives P = V_kᵀ Qᵀ.
- left:   the sketch G Ω (m, k) is gathered (its rows are the shards' G_s Ω), QR; each power
  iteration all-reduces Gᵀ Q (n, k) and gathers G (Gᵀ Q); finally Gᵀ Q (n, k) is all-reduced and
  its exact SVD gives P's rows Q[s:e] V_k.

Why this scheme: every dense factorisation (QR, SVD) sees the matrix the single-process refresh
sees, up to the rounding of the sums, so it returns the same factors with the same signs
(LAPACK's sign choices are continuous in the input; a distributed Cholesky-QR or TSQR would
return other signs, and a sign flip of a basis vector scrambles the moments, which are kept
across refreshes). The multi-rank run therefore equals the single-process run with
``refresh='randomized'`` within fp32 rounding. The gathered sketches are r-sized (m·k, not m·n)
and the redundant factorisations cost O(m·k²), negligible next to the products. The seeds are
broadcast from the mesh's first rank at the first refresh (8 bytes per parameter), so every
rank draws the same test matrices.

``communication_bytes`` gives the bytes of these collectives, from the same rules as the code.

**DDP**: gradients arrive all-reduced and whole, every rank steps the same replica; nothing
changes in the optimizer (every kind of refresh works). Every rank must draw the same seeds
(randomized refresh): seed torch identically on every rank. Per-layer mode under DDP steps each
parameter in DDP's communication hook, once its bucket is all-reduced (``ddp_per_layer``): the
optimizer's own hooks would step on the local, not yet reduced gradient.

**Checkpoints**: ``save`` / ``load`` go through ``torch.distributed.checkpoint`` with
``get_state_dict`` / ``set_state_dict``: model and optimizer (moments, projectors, step counts,
the limiter's norm, the randomized refresh's seed and counter). The state of a sharded parameter
is held as DTensors (rows ``Shard(0)``, the left side's moments by columns ``Shard(1)``, the
right side's projector ``Replicate()``), so DCP
reshards it on load: a checkpoint saved on 2 ranks resumes on 1, 4 or any number of ranks, or in
one process without FSDP.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lowrank_kernels.ops import _rng
from lowrank_kernels.ops import projected_step as _ps
from lowrank_kernels.ops import projected_step_kernels as _kernels
from lowrank_kernels.optim import refresh as _refresh
from lowrank_kernels.optim import schema as _schema

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["communication_bytes", "ddp_per_layer", "save", "load", "is_sharded"]

_FP32 = 4


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor (an FSDP2 parameter), stepped on its local shard."""
    # torch.distributed.tensor takes seconds to import: a process that has not imported it
    # has no DTensor.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if is_sharded(t) else t


def check_sharded(p: Tensor, where: str) -> None:
    """ValueError unless ``p`` is sharded as FSDP2 shards: by rows on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"{where}: a DTensor parameter must be sharded by rows on a 1-D mesh (fully_shard's "
                         f"Shard(0)), got placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh")


def _rows(p: "DTensor") -> tuple:
    """(first row, rows per shard) of this rank's shard: torch.chunk's split of dim 0."""
    start, stop, chunk = _chunk(p.shape[0], p.device_mesh)
    if p.to_local().shape[0] != stop - start:
        raise ValueError(f"a DTensor of shape {tuple(p.shape)} has a local shard of {p.to_local().shape[0]} rows on "
                         f"rank {p.device_mesh.get_local_rank()} of {p.device_mesh.size()}; torch.chunk's split of "
                         "dim 0 was expected")
    return start, chunk


def _chunk(size: int, mesh) -> tuple:
    """(start, stop, chunk) of this rank's piece of a dimension of ``size``: torch.chunk's split."""
    chunk = -(-size // mesh.size())
    start = min(mesh.get_local_rank() * chunk, size)
    return start, min(start + chunk, size), chunk


def sharded_zeros(p: "DTensor", shape, dim: Optional[int], dtype=torch.float32) -> "DTensor":
    """A zero state tensor of global ``shape`` on parameter ``p``'s mesh: sharded along ``dim``
    (0: rows, as p's rows; 1: columns) with torch.chunk's split, or replicated (``dim`` None)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    device = p.to_local().device
    if dim is None:
        return DTensor.from_local(torch.zeros(tuple(shape), dtype=dtype, device=device), p.device_mesh,
                                  [Replicate()], run_check=False)
    start, stop, _ = _chunk(shape[dim], p.device_mesh)
    size = list(shape)
    size[dim] = stop - start
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(torch.zeros(size, dtype=dtype, device=device), p.device_mesh, [Shard(dim)],
                              run_check=False, shape=tuple(shape), stride=stride)


# ----------------------------------------------------------------------------------------------
# Collectives: module-level calls through torch.distributed, so a test can count them
# ----------------------------------------------------------------------------------------------
def _all_reduce(t: Tensor, group) -> Tensor:
    dist.all_reduce(t, group=group)
    return t


def _gather(t: Tensor, size: int, chunk: int, mesh) -> Tensor:
    """The (size, ...) tensor whose rank-i piece of rows is rank i's ``t``: pieces padded to
    ``chunk`` rows and all-gathered into one tensor."""
    padded = t.new_zeros((chunk,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    out = t.new_empty((mesh.size() * chunk,) + tuple(t.shape[1:]))
    dist.all_gather_into_tensor(out, padded, group=mesh.get_group())
    return out[:size]


def _gather_rows(t: Tensor, p: "DTensor") -> Tensor:
    """The (m, k) matrix whose rows [s, e) are this rank's ``t``."""
    return _gather(t, p.shape[0], _rows(p)[1], p.device_mesh)


def _reduce_scatter(t: Tensor, chunk: int, mesh) -> Tensor:
    """This rank's piece of rows of the sum over ranks of ``t`` (rows padded to world·chunk)."""
    padded = t.new_zeros((mesh.size() * chunk,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    out = t.new_empty((chunk,) + tuple(t.shape[1:]))
    dist.reduce_scatter_tensor(out, padded, group=mesh.get_group())
    return out


def broadcast_seed(seed: int, p: "DTensor") -> int:
    """``seed`` as the mesh's first rank drew it (every rank then builds the same test matrix)."""
    mesh = p.device_mesh
    t = torch.tensor([seed], dtype=torch.int64, device=p.to_local().device)
    dist.broadcast(t, group=mesh.get_group(), group_src=0)
    return int(t.item())


def global_sq_norm(grad_local: Tensor, p: "DTensor") -> Tensor:
    """‖G‖² of the whole sharded gradient (fp32, 0-d), from the local shard."""
    sq = torch.linalg.vector_norm(grad_local, dtype=torch.float32).square().reshape(1)
    return _all_reduce(sq, p.device_mesh.get_group())[0]


# ----------------------------------------------------------------------------------------------
# Refresh on the sharded gradient
# ----------------------------------------------------------------------------------------------
def _nonfinite(where: str, kind: str = "randomized") -> ValueError:
    return ValueError(f"{where} has a NaN or inf gradient at a projector refresh step (refresh={kind!r}); "
                      "check the loss scale and learning rate, or clip gradients (max_grad_norm)")


def local_rows(t: Tensor, p: "DTensor") -> Tensor:
    """This rank's rows of ``t``, a tensor with p's rows (the rows of p's shard)."""
    start, _ = _rows(p)
    return t[start:start + p.to_local().shape[0]].contiguous()


def _gathered_gradient(grad_local: Tensor, p: "DTensor", kind: str, where: str) -> Tensor:
    """The whole gradient (m, n), in its dtype, on every rank: one all-gather of the rows."""
    g = _gather_rows(grad_local, p)
    if not bool(torch.isfinite(g).all()):  # the same answer on every rank: the same gathered bits
        raise _nonfinite(where, kind)
    return g


def svd_projector(grad_local: Tensor, p: "DTensor", rank: int, side: str, where: str) -> Tensor:
    """This rank's piece of the exact SVD projector of a row-sharded gradient: P (r, n) whole for
    side 'right', rows P[s:e] for side 'left'. The rows of G are all-gathered and every rank runs
    the single-process refresh (lowrank_kernels.optim.refresh.svd_projector) on the same bits, so
    every rank holds the same factors, equal to one process's within the rounding of the gradient's
    reduction."""
    proj = _refresh.svd_projector(_gathered_gradient(grad_local, p, "svd", where), rank, side)
    return proj if side == "right" else local_rows(proj, p)


def dct_select(grad_local: Tensor, p: "DTensor", rank: int, side: str, where: str) -> Tensor:
    """The DCT indices of a row-sharded gradient, the same on every rank. Side 'right' transforms
    rows, which are local: the energies of the rank's rows are all-reduced (n fp32). Side 'left'
    transforms columns, along the sharded dimension: the rows of G are all-gathered."""
    if side == "left":
        return _refresh.dct_select(_gathered_gradient(grad_local, p, "dct", where), rank, side)
    energy = _all_reduce(_refresh.dct_energy(grad_local), p.device_mesh.get_group())
    if not bool(torch.isfinite(energy).all()):
        raise _nonfinite(where, "dct")
    return _refresh.dct_top(energy, rank)


def randomized_projector(grad_local: Tensor, p: "DTensor", rank: int, side: str, seed: int, oversampling: int,
                         power_iters: int, where: str) -> Tensor:
    """This rank's piece of the randomized projector of a row-sharded gradient: P (r, n) whole for
    side 'right', rows P[s:e] (e − s, r) for side 'left'. Equal, within fp32 rounding, to
    lowrank_kernels.optim.refresh.randomized_projector of the whole gradient with the same seed
    (see the module docstring for the collectives)."""
    g = grad_local.float()
    group = p.device_mesh.get_group()
    m, n = p.shape
    start, _ = _rows(p)
    rows = slice(start, start + g.shape[0])
    k = min(rank + oversampling, m, n)
    if side == "right":
        omega = _rng.sign(seed, m, k, device=g.device)[rows]
        y = _all_reduce(g.t() @ omega, group)
        if not bool(torch.isfinite(y).all()):  # the same answer on every rank: y is the sum
            raise _nonfinite(where)
        q = torch.linalg.qr(y)[0]
        for _ in range(power_iters):
            q = torch.linalg.qr(_all_reduce(g.t() @ (g @ q), group))[0]
        vh_small = torch.linalg.svd(_gather_rows(g @ q, p), full_matrices=False)[2]
        return (vh_small[:rank] @ q.t()).contiguous()
    # Left: the single-process code runs the right-side finder on Gᵀ (n, m), whose columns are
    # sharded here: its "g.t() @ x" products are local rows, its "g @ x" products sums.
    omega = _rng.sign(seed, n, k, device=g.device)
    y = _gather_rows(g @ omega, p)
    if not bool(torch.isfinite(y).all()):
        raise _nonfinite(where)
    q = torch.linalg.qr(y)[0]
    for _ in range(power_iters):
        z = _all_reduce(g.t() @ q[rows], group)
        q = torch.linalg.qr(_gather_rows(g @ z, p))[0]
    vh_small = torch.linalg.svd(_all_reduce(g.t() @ q[rows], group), full_matrices=False)[2]
    return (vh_small[:rank] @ q[rows].t()).t().contiguous()


# ----------------------------------------------------------------------------------------------
# Steps on local shards
# ----------------------------------------------------------------------------------------------
def _limit(norm: Tensor, limiter_norm: Tensor) -> Tensor:
    # Fira's norm-growth limiter l, as ops/projected_step's reference; updates the stored norm.
    limit = torch.where(limiter_norm >= 0,
                        torch.clamp_min(norm / (limiter_norm + _ps.FIRA_EPS), _ps.LIMITER_GAMMA) / _ps.LIMITER_GAMMA,
                        torch.ones_like(norm))
    limiter_norm.copy_(norm / limit)
    return limit


def _left_step(p: "DTensor", g: Tensor, proj: Tensor, state: dict, coef: Tensor, group: dict, scale: float,
               fira: bool) -> None:
    # Side 'left': R = Σ P[s:e]ᵀ G[s:e] is reduce-scattered by columns (Fira: with the columns'
    # energies ‖G_i‖², summed the same way), each rank keeps the moments of its columns, and the
    # columns of what the rows need are all-gathered: α·N (GaLore), or α·(N − R·φ/l) and φ/l
    # (Fira: U = α·P N + (G − α·P R)·φ/l = P·α(N − R·φ/l) + G·φ/l). Reduce-scatter plus
    # all-gather move what one all-reduce of R moves, and the moments are sharded.
    mesh = p.device_mesh
    n, r = p.shape[1], proj.shape[1]
    start, stop, chunk = _chunk(n, mesh)
    g32 = g.float()
    parts = [proj.t() @ g32] + ([g32.square().sum(0, keepdim=True)] if fira else [])
    mine = _reduce_scatter(torch.cat(parts).t(), chunk, mesh)[: stop - start]  # (columns, r [+ 1])
    R = mine[:, :r].t()
    exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
    beta1, beta2 = (float(b) for b in group["betas"])
    exp_avg.mul_(beta1).add_(R, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
    N = exp_avg / exp_avg_sq.sqrt().add_(float(group["eps"]))
    if fira:
        r_norm = R.norm(dim=0)
        phi = N.norm(dim=0) / (r_norm + _ps.FIRA_EPS)
        # ‖G_i − α·P R_i‖² = ‖G_i‖² − (2α − α²)·‖R_i‖² for an orthonormal P (the fused kernels' identity).
        energy = (phi.square() * (mine[:, r] - (2 * scale - scale * scale) * r_norm.square())).sum()
        norm = _all_reduce(energy.reshape(1), mesh.get_group())[0].clamp_min(0).sqrt()
        y = phi / _limit(norm, state["limiter_norm"])
        piece = torch.cat([(N - R * y) * scale, y[None]]).t()
    else:
        piece = (N * scale).t()
    full = _gather(piece.contiguous(), n, chunk, mesh).t()  # (r [+ 1], n)
    update = proj @ full[:r]
    if fira:
        update += g32 * full[r]
    _kernels.apply_update(p.to_local(), update, coef, group["weight_decay"] != 0)


def projected_step(p: "DTensor", grad_local: Tensor, proj: Tensor, state: dict, coef: Tensor, side: str, group: dict,
                   scale: float, fira: bool) -> None:
    """One GaLore / Fira step of sharded ``p`` on its local rows (``proj``: this rank's piece)."""
    if side == "left":
        _left_step(p, grad_local, proj, state, coef, group, float(scale), fira)
        return
    pg = p.device_mesh.get_group()
    beta1, beta2 = group["betas"]
    reduce_sum: Callable = lambda x: _all_reduce(x.reshape(1), pg)[0]  # noqa: E731
    _ps.reference_projected_one(
        p.to_local(), grad_local, proj, local(state["exp_avg"]), local(state["exp_avg_sq"]),
        state["limiter_norm"] if fira else None, None, coef, side, float(beta1), float(beta2), float(group["eps"]),
        float(scale), fira, group["weight_decay"] != 0, reduce_sum=reduce_sum if fira else None,
    )


# ----------------------------------------------------------------------------------------------
# Communication, from the rules above
# ----------------------------------------------------------------------------------------------
def communication_bytes(shape, rank: int, world_size: int, *, fira: bool = False, proj_type: str = "std",
                        oversampling: int = 8, power_iters: int = 2, clip: bool = False, refresh: str = "randomized",
                        grad_dtype: torch.dtype = torch.float32) -> dict:
    """Bytes the optimizer communicates for one FSDP2-sharded (m, n) weight (fp32 payloads, but
    the gradient gathered by refresh='svd' and 'dct', which travels in ``grad_dtype``).

    Counted as the size of each collective's tensor: an all-reduce of X bytes counts X, an
    all-gather counts its output (the shards padded to ceil(m / world_size) rows). A ring moves
    about 2·(W−1)/W of an all-reduce's X per rank and (W−1)/W of an all-gather's.

    Returns {"step": bytes of every step, "refresh": extra bytes of a refresh step,
    "seed": bytes once per parameter (its first refresh; refresh='randomized' only)}. A refresh
    step's extra bytes by kind: 'randomized' the sketches (r-sized); 'svd' the whole gradient,
    all-gathered (world_size·ceil(m / world_size)·n elements); 'dct' the n fp32 energies
    all-reduced (side 'right') or the whole gradient, as 'svd' (side 'left').
    """
    m, n = shape
    side = _schema.projection_side(proj_type, shape)
    k = min(rank + oversampling, m, n)
    padded_rows = world_size * -(-m // world_size)
    gathered = padded_rows * k * _FP32  # one (m, k) sketch, padded shards
    reduced = n * k * _FP32  # one (n, k) sketch
    # Side 'left': a reduce-scatter and an all-gather of (r [+ 1 for Fira], n), columns padded.
    columns = world_size * -(-n // world_size) * (rank + (1 if fira else 0)) * _FP32
    step = (2 * columns if side == "left" else 0) + (_FP32 if fira else 0) + (_FP32 if clip else 0)
    whole = padded_rows * n * grad_dtype.itemsize  # the gradient, all-gathered
    if refresh == "svd" or (refresh == "dct" and side == "left"):
        extra = whole
    elif refresh == "dct":
        extra = n * _FP32
    elif side == "right":
        extra = (1 + power_iters) * reduced + gathered
    else:
        extra = (1 + power_iters) * gathered + (1 + power_iters) * reduced
    return {"step": step, "refresh": extra, "seed": 8 if refresh == "randomized" else 0}


# ----------------------------------------------------------------------------------------------
# DDP per-layer mode
# ----------------------------------------------------------------------------------------------
def ddp_per_layer(ddp_model, optimizer, process_group=None) -> None:
    """Per-layer stepping under DistributedDataParallel.

    The optimizer (``per_layer=True``, ``accumulation_steps=1``) hands its parameters to a DDP
    communication hook: each bucket is all-reduced (averaged, as DDP's default hook does) and its
    parameters step as soon as it arrives, while backward goes on; the optimizer's own hooks are
    removed (they would see the local gradient, before the reduction). DDP keeps the reduced
    gradients in its buckets (and copies them to ``.grad`` at the end of backward), so the
    memory saving of per-layer mode is DDP's bucket, not one layer. For gradient accumulation
    use DDP's ``no_sync()`` on the micro-batches: the hook steps on the synchronised backward.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if not getattr(optimizer, "per_layer", False) or optimizer.accumulation_steps != 1:
        raise ValueError("ddp_per_layer needs a GaLoreAdamW / FiraAdamW with per_layer=True and accumulation_steps=1")
    optimizer.remove_hooks()
    owned = optimizer._position

    def hook(state, bucket):
        fut = default_hooks.allreduce_hook(state, bucket)

        def step(fut):
            with torch.no_grad():
                for p, g in zip(bucket.parameters(), bucket.gradients()):
                    if p in owned:
                        optimizer._step_group(optimizer._group_of(p), [p], [g])
            return fut.value()[0] if isinstance(fut.value(), list) else fut.value()

        return fut.then(step)

    ddp_model.register_comm_hook(process_group, hook)


# ----------------------------------------------------------------------------------------------
# Checkpoints through torch.distributed.checkpoint
# ----------------------------------------------------------------------------------------------
def save(model, optimizer, checkpoint_id) -> None:
    """Save model and optimizer with ``torch.distributed.checkpoint`` (every rank calls it).

    The optimizer state (moments, projectors, step counts, limiter norms, refresh seeds and
    counts) is saved sharded as it lives; ``load`` reshards it for any world size. Call it
    between optimizer steps: inside a per-layer gradient accumulation it raises ValueError
    (``load`` rebuilds the state's layout from the parameters, which has no slot for the pending
    micro-batches; ``optimizer.state_dict()`` with ``torch.save`` does keep them).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if not optimizer.state:
        # torch's get_state_dict would run a step with zero gradients to create the state.
        raise ValueError("the optimizer has no state yet: save after its first step")
    pending = max((s.get("micro", 0) for s in optimizer.state.values()), default=0)
    if pending:
        raise ValueError(f"optimizer: {pending} of {optimizer.accumulation_steps} micro-batches of a gradient "
                         "accumulation are pending; save after the optimizer step (the last micro-batch's backward)")
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=checkpoint_id)


def load(model, optimizer, checkpoint_id) -> None:
    """Load what ``save`` wrote, on any world size (every rank calls it; one process without a
    process group works too).

    The optimizer is given its state's layout first (zeros of every state tensor, sharded as
    its parameters are), which DCP fills with the checkpoint's values, resharded.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer._allocate_all_state()
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
