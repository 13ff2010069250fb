"""Fused GaLore / Fira projected AdamW step, and the plain (transformers-style) AdamW step.

For a 2-D weight W (m, n) with gradient G (m, n) and an orthonormal projector P, one step is:

    side 'right':  P (r, n),  R = G Pᵀ (m, r),  back(X) = X P      channel i = row i
    side 'left':   P (m, r),  R = Pᵀ G (r, n),  back(X) = P X      channel i = column i

    m  = β1 m + (1 − β1) R          v = β2 v + (1 − β2) R²          (fp32, R's shape)
    N  = m / (√v + eps)             step_size = lr · √(1 − β2ᵗ) / (1 − β1ᵗ)
    GaLore:  U = α · back(N)
    Fira:    φ_i = ‖N_i‖ / (‖R_i‖ + 1e-8)                             per channel
             S   = (G − α · back(R)) · φ                              the scaled residual
             l   = max(‖S‖ / (prev + 1e-8), 1.01) / 1.01 if a previous norm exists, else 1
             prev ← ‖S‖ / l ;   U = α · back(N) + S / l
    W ← W − step_size · U ;   W ← W − lr · wd · W                     (decay after the update)

α is galore-torch's ``scale`` or fira's ``alpha``; the side follows from ``proj_type`` (see
lowrank_kernels.optim). ``t`` is the step count after its increment. Moments are fp32 whatever
the weight's dtype; the update is computed in fp32 and W is rounded once.

The plain step (groups without a rank) is the same Adam with R = G and U = N: transformers'
AdamW, whose eps is not bias-corrected and whose decay follows the update (torch's AdamW differs
in both).

No host synchronisation, nothing per step frozen on the host. The step counts t live on the
device (one 0-d tensor per parameter) and so may lr (a 0-d tensor, as torch's optimizers
accept, updated in place by LR schedulers). ``step_coefficients`` turns them into each
parameter's (step_size, lr·wd) with device ops in float64, the precision of the peers' Python
floats, rounded once to fp32; the kernels read them from that tensor. A step can therefore be
captured in a CUDA graph and replayed with the counts advancing (lowrank_kernels.optim
explains the refresh steps, which run eagerly).

Batching: the ``*_steps`` entry points take B parameters of one shape, dtype and layout and run
each kernel once for all of them (lowrank_kernels.ops.projected_step_kernels explains how); a
batched trajectory is bit-identical to per-parameter steps.

Implementations, selected per call by ``backend`` (see lowrank_kernels.backend), each declared in
lowrank_kernels.registry with its callables:
- reference: plain torch in the peers' order of operations (galore_torch.GaLoreAdamW,
  fira.FiraAdamW), the specification, one parameter after the other. It materialises back(N),
  back(R) and S like the peers.
- triton: four launches per batch and no temporary of W's size (extra memory O(B·r·max(m, n))),
  lowrank_kernels.ops.projected_step_kernels.
- cuda: the same four kernels in csrc/projected_step.cu.

APOLLO's step runs on the same kernels: lowrank_kernels.ops.apollo_step (``apollo_steps`` is
importable from here as well).

The step is an in-place update, not a differentiable function: there is no autograd.Function.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _checks
from lowrank_kernels.ops import projected_step_kernels as _kernels
from lowrank_kernels.ops._step_checks import (
    as_list,
    batch_size,
    check_batches,
    check_grad,
    check_hyper,
    check_limiter_norm,
    check_moments,
    check_projected,
    check_side,
    check_step,
    check_weight,
)

# The names this module held before the steps' shared machinery and APOLLO's step moved to modules
# of their own: their import paths from here keep working.
from lowrank_kernels.ops.apollo_step import APOLLO, apollo_steps  # noqa: F401
from lowrank_kernels.ops.projected_step_kernels import (  # noqa: F401
    FIRA_EPS,
    LIMITER_GAMMA,
    MAX_BATCH,
    SIDES,
    allocate_workspace,
    offset_table,
    project_reference,
    project_triton,
    projected_shape,
    step_coefficients,
)


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
def _back_reference(x: Tensor, proj: Tensor, side: str) -> Tensor:
    return x @ proj if side == "right" else proj @ x


def reference_projected_one(weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm, proj_grad, coef,
                             side, beta1, beta2, eps, scale, fira, decay, reduce_sum=None):
    # reduce_sum: for a weight sharded by rows (lowrank_kernels.optim.distributed), the sum over
    # the shards of a local partial sum, so that ‖S‖ is the whole residual's norm.
    R = proj_grad if proj_grad is not None else _kernels.project_reference(grad, proj, side)
    N = _kernels.moments_reference(R, exp_avg, exp_avg_sq, beta1, beta2, eps)
    update = _back_reference(N, proj, side) * scale
    if fira:
        phi = _kernels.channel_scale_reference(N, R, side)
        S = (_kernels.at_least_fp32(grad) - _back_reference(R, proj, side) * scale) * phi
        norm = S.norm() if reduce_sum is None else reduce_sum(S.square().sum()).sqrt()
        update = update + S / _kernels.limit_reference(norm, limiter_norm)
    _kernels.apply_update(weight, update, coef, decay)


# The reference steps run under no_grad, as the kernels do: an optimizer step updates parameters
# (leaves that require grad) in place and is no part of any graph.
@torch.no_grad()
def _reference_projected(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                         side, beta1, beta2, eps, scale, fira, decay):
    for b in range(len(weights)):
        reference_projected_one(
            weights[b], grads[b], projs[b], exp_avgs[b], exp_avg_sqs[b], limiter_norms[b] if fira else None,
            proj_grads[b] if proj_grads else None, coef[b], side, beta1, beta2, eps, scale, fira, decay,
        )


@torch.no_grad()
def reference_adamw(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay):
    for b, (weight, grad, exp_avg, exp_avg_sq) in enumerate(zip(weights, grads, exp_avgs, exp_avg_sqs)):
        N = _kernels.moments_reference(_kernels.at_least_fp32(grad), exp_avg, exp_avg_sq, beta1, beta2, eps)
        _kernels.apply_update(weight, N, coef[b], decay)


# ----------------------------------------------------------------------------------------------
# torch.library ops (in place, so torch.compile keeps them whole) and the ops' implementations
# ----------------------------------------------------------------------------------------------
def _projected_impl(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                    side, beta1, beta2, eps, scale, fira, decay, backend):
    PROJECTED_ADAMW.impl(backend).step(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                                       side, beta1, beta2, eps, scale, fira, decay)


@torch.library.custom_op(
    "lowrank_kernels::projected_adamw_step",
    mutates_args=("weights", "exp_avgs", "exp_avg_sqs", "limiter_norms"),
)
def _projected_op(
    weights: List[Tensor], grads: List[Optional[Tensor]], projs: List[Tensor], exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor], limiter_norms: List[Tensor], proj_grads: List[Tensor], coef: Tensor, side: str,
    beta1: float, beta2: float, eps: float, scale: float, fira: bool, decay: bool,
    backend: str,
) -> None:
    _projected_impl(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                    side, beta1, beta2, eps, scale, fira, decay, backend)


@_projected_op.register_fake
def _(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef, side, beta1, beta2,
      eps, scale, fira, decay, backend):
    return None


@torch.library.custom_op("lowrank_kernels::project_grad", mutates_args=())
def _project_op(grad: Tensor, proj: Tensor, side: str, backend: str) -> Tensor:
    return PROJECTED_ADAMW.impl(backend).project(grad, proj, side)


@_project_op.register_fake
def _(grad, proj, side, backend):
    rank = proj.shape[0] if side == "right" else proj.shape[1]
    return grad.new_empty(_kernels.projected_shape(grad.shape, rank, side), dtype=torch.float32)


PROJECTED_ADAMW = registry.declare(
    "projected_adamw_step", "GaLore/Fira: AdamW on the projected gradient, update projected back (in place)",
    library_ops=(torch.ops.lowrank_kernels.projected_adamw_step, torch.ops.lowrank_kernels.project_grad),
    reference=registry.Impl(registry.REFERENCE, step=_reference_projected, project=_kernels.project_reference),
    triton=registry.Impl(registry.TRITON, step=_kernels.triton_projected, project=_kernels.project_triton),
    cuda=registry.Impl(registry.CUDA, step=_kernels.cuda_projected, project=_kernels.project_cuda),
)


def _adamw_impl(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay, backend):
    ADAMW.impl(backend).step(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay)


@torch.library.custom_op("lowrank_kernels::adamw_step", mutates_args=("weights", "exp_avgs", "exp_avg_sqs"))
def _adamw_op(
    weights: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    coef: Tensor, beta1: float, beta2: float, eps: float, decay: bool, backend: str,
) -> None:
    _adamw_impl(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay, backend)


@_adamw_op.register_fake
def _(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay, backend):
    return None


ADAMW = registry.declare(
    "adamw_step", "AdamW on full-rank weights (in place), batched over a parameter list",
    library_ops=(torch.ops.lowrank_kernels.adamw_step,),
    reference=registry.Impl(registry.REFERENCE, step=reference_adamw),
    triton=registry.Impl(registry.TRITON, step=_kernels.triton_adamw),
    cuda=registry.Impl(registry.CUDA, step=_kernels.cuda_adamw),
)

# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources):
# the one-parameter functions' arguments (the lists' elements); coef holds the step sizes
# computed from the step counts and lr.
_STATE = dict(weights="weight", exp_avgs="exp_avg", exp_avg_sqs="exp_avg_sq")
LAYOUT_SOURCES = _checks.layout_sources({
    "projected_adamw_step": {"projected_adamw_step": dict(**_STATE, grads="grad", projs="proj",
                                                          limiter_norms="limiter_norm", proj_grads="proj_grad",
                                                          coef=("step", "lr"))},
    "adamw_step": {"adamw_step": dict(**_STATE, grads="grad", coef=("step", "lr"))},
    "project_grad": {"project": dict(grad="grad", proj="proj")},
})


# ----------------------------------------------------------------------------------------------
# The functional entry points
# ----------------------------------------------------------------------------------------------
def _as_step(step, device) -> Tensor:
    # An int count becomes a device tensor by a fill, not a host-to-device copy.
    if isinstance(step, Tensor):
        return step
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError("step must be an int >= 1 or a one-element tensor (the count after its increment), "
                         f"got {step!r}")
    return torch.full((), float(step), dtype=torch.float64, device=device)


def _one(x):
    return None if x is None else [x]


@_auto_backend.tuned("projected_adamw_step", rows=(), mutates=True)
def projected_adamw_steps(
    weights: Sequence[Tensor], grads: Optional[Sequence[Tensor]], projs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], *, side: str, steps: Sequence[Tensor],
    lr: Union[float, Tensor], betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
    scale: float = 1.0, fira: bool = False, limiter_norms: Optional[Sequence[Tensor]] = None,
    correct_bias: bool = True, proj_grads: Optional[Sequence[Tensor]] = None, backend: Optional[str] = None,
) -> None:
    """One GaLore (``fira=False``) or Fira (``fira=True``) AdamW step of B parameters
    (1 <= B <= MAX_BATCH), in place, each kernel launched once for the whole batch.

    Every list holds one tensor per parameter; the tensors of one role share shape, dtype,
    strides and device (the batch's parameters are updated exactly as one at a time).

    Args:
        weights: B (m, n) float32/float16/bfloat16 parameters, updated in place (any strides).
        grads: their gradients, the weights' dtype. May be None for GaLore when ``proj_grads`` is
            given.
        projs: orthonormal projectors, fp32: (r, n) for side 'right', (m, r) for side 'left'.
        exp_avgs, exp_avg_sqs: fp32 moments of R's shape, (m, r) or (r, n); updated in place.
        side: 'right' (R = G Pᵀ) or 'left' (R = Pᵀ G).
        steps: B one-element tensors on the weights' device, each parameter's step count t >= 1
            after its increment (float64 keeps the bias corrections exact; the optimizers keep
            theirs so). Read on the device only.
        lr: a float, or a one-element tensor on the weights' device (read on the device: an LR
            schedule that updates it in place works inside a captured CUDA graph).
        betas, eps, weight_decay: transformers-style AdamW hyper-parameters.
        scale: α (galore-torch's ``scale``, fira's ``alpha``).
        fira: add Fira's scaled residual and its norm-growth limiter.
        limiter_norms: Fira only: B 0-d fp32 tensors holding the previous ‖S‖ (negative: none
            yet), updated in place on the device.
        correct_bias: the peers' bias correction switch.
        proj_grads: GaLore only: already projected (accumulated) gradients R, fp32, used instead
            of projecting ``grads``.
        backend: None, 'reference', 'triton' or 'cuda'.
    """
    batch = batch_size(weights)
    grads = as_list("grads", grads, batch, optional=True)
    projs = as_list("projs", projs, batch)
    exp_avgs, exp_avg_sqs = as_list("exp_avgs", exp_avgs, batch), as_list("exp_avg_sqs", exp_avg_sqs, batch)
    steps = as_list("steps", steps, batch)
    limiter_norms = as_list("limiter_norms", limiter_norms, batch, optional=True)
    proj_grads = as_list("proj_grads", proj_grads, batch, optional=True)
    check_side(side)
    if grads is None:
        if proj_grads is None:
            raise ValueError("grad may be None only when proj_grad is given")
        if fira:
            raise ValueError("fira=True needs the full grad (the residual G − α·back(R)); proj_grad alone is not "
                             "enough")
    if fira and limiter_norms is None:
        raise ValueError("limiter_norm must be given (a 0-d float32 tensor per weight) when fira=True")
    if not fira and limiter_norms is not None:
        raise ValueError("limiter_norm is used only with fira=True")
    for i, weight in enumerate(weights):
        sfx = "" if batch == 1 else f"[{i}]"
        rshape = check_projected(sfx, weight, projs[i], side)
        check_moments(sfx, exp_avgs[i], exp_avg_sqs[i], rshape)
        if grads is not None:
            check_grad(sfx, grads[i], weight)
        if proj_grads is not None:
            _checks.check_float("proj_grad" + sfx, proj_grads[i], dtypes=(torch.float32,))
            if tuple(proj_grads[i].shape) != rshape:
                raise ValueError(f"proj_grad{sfx} must have shape {rshape}, got {tuple(proj_grads[i].shape)}")
        if fira:
            check_limiter_norm(sfx, limiter_norms[i])
        check_step(sfx, steps[i])
        _checks.check_same_device("weight" + sfx, weight, grad=None if grads is None else grads[i], proj=projs[i],
                                  exp_avg=exp_avgs[i], exp_avg_sq=exp_avg_sqs[i], step=steps[i], lr=lr,
                                  limiter_norm=None if limiter_norms is None else limiter_norms[i],
                                  proj_grad=None if proj_grads is None else proj_grads[i])
    check_batches(weight=weights, grad=grads, proj=projs, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs,
                  proj_grad=proj_grads)
    check_hyper(lr, betas, eps, weight_decay, scale)
    backend = _backend.resolve("projected_adamw_step", backend, weight=weights[0])
    grads = grads if grads is not None else [None] * batch
    limiter_norms, proj_grads = limiter_norms or [], proj_grads or []
    coef = _kernels.step_coefficients(steps, lr, betas, weight_decay, correct_bias)
    args = (list(weights), grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef, side,
            float(betas[0]), float(betas[1]), float(eps), float(scale), bool(fira), weight_decay != 0, backend)
    _backend.call_op(torch.ops.lowrank_kernels.projected_adamw_step, _projected_impl, *args)


def projected_adamw_step(
    weight: Tensor, grad: Optional[Tensor], proj: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
    side: str, step: Union[int, Tensor], lr: Union[float, Tensor], betas=(0.9, 0.999), eps: float = 1e-6,
    weight_decay: float = 0.0, scale: float = 1.0, fira: bool = False, limiter_norm: Optional[Tensor] = None,
    correct_bias: bool = True, proj_grad: Optional[Tensor] = None, backend: Optional[str] = None,
) -> None:
    """One GaLore (``fira=False``) or Fira (``fira=True``) AdamW step of one parameter, in place.

    ``projected_adamw_steps`` with one parameter: ``weight`` (m, n), ``grad`` (or None with
    ``proj_grad``), ``proj``, fp32 moments ``exp_avg`` and ``exp_avg_sq`` of R's shape,
    ``limiter_norm`` (Fira) and ``proj_grad`` as there. ``step`` is the count t >= 1 after its
    increment: an int, or a one-element tensor on the weight's device.
    """
    _checks.check_float("weight", weight, dtypes=_checks.KERNEL_DTYPES)
    projected_adamw_steps(
        [weight], _one(grad), [proj], [exp_avg], [exp_avg_sq], side=side, steps=[_as_step(step, weight.device)],
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale=scale, fira=fira,
        limiter_norms=_one(limiter_norm), correct_bias=correct_bias, proj_grads=_one(proj_grad), backend=backend,
    )


@_auto_backend.tuned("adamw_step", rows=(), mutates=True)
def adamw_steps(
    weights: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    *, steps: Sequence[Tensor], lr: Union[float, Tensor], betas=(0.9, 0.999), eps: float = 1e-6,
    weight_decay: float = 0.0, correct_bias: bool = True, backend: Optional[str] = None,
) -> None:
    """One transformers-style AdamW step of B tensors (1 <= B <= MAX_BATCH) of one shape and
    dtype, in place, fp32 moments, one launch for the batch.

    m = β1 m + (1−β1) g; v = β2 v + (1−β2) g²; W −= step_size · m / (√v + eps); W −= lr·wd·W,
    with step_size = lr·√(1−β2ᵗ)/(1−β1ᵗ) (eps not bias-corrected, decay after the update).
    ``steps``, ``lr`` and ``backend`` as in ``projected_adamw_steps``; the
    moments are contiguous.
    """
    batch = batch_size(weights)
    grads = as_list("grads", grads, batch)
    exp_avgs, exp_avg_sqs = as_list("exp_avgs", exp_avgs, batch), as_list("exp_avg_sqs", exp_avg_sqs, batch)
    steps = as_list("steps", steps, batch)
    for i, weight in enumerate(weights):
        sfx = "" if batch == 1 else f"[{i}]"
        check_weight(sfx, weight)
        check_grad(sfx, grads[i], weight)
        check_moments(sfx, exp_avgs[i], exp_avg_sqs[i], weight.shape)
        for name, t in (("exp_avg", exp_avgs[i]), ("exp_avg_sq", exp_avg_sqs[i])):
            if not t.is_contiguous():
                raise ValueError(f"{name}{sfx} must be contiguous")
        check_step(sfx, steps[i])
        _checks.check_same_device("weight" + sfx, weight, grad=grads[i], exp_avg=exp_avgs[i], exp_avg_sq=exp_avg_sqs[i],
                                  step=steps[i], lr=lr)
    check_batches(exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    for i, w in enumerate(weights):
        if (w.shape, w.dtype) != (weights[0].shape, weights[0].dtype):
            raise ValueError(f"weight[{i}] must match weight[0] in shape and dtype to share one launch")
    check_hyper(lr, betas, eps, weight_decay)
    backend = _backend.resolve("adamw_step", backend, weight=weights[0])
    coef = _kernels.step_coefficients(steps, lr, betas, weight_decay, correct_bias)
    args = (list(weights), grads, exp_avgs, exp_avg_sqs, coef, float(betas[0]), float(betas[1]),
            float(eps), weight_decay != 0, backend)
    _backend.call_op(torch.ops.lowrank_kernels.adamw_step, _adamw_impl, *args)


def adamw_step(
    weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: Union[int, Tensor],
    lr: Union[float, Tensor], betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
    correct_bias: bool = True, backend: Optional[str] = None,
) -> None:
    """One transformers-style AdamW step on one tensor of any shape, in place, fp32 moments.

    ``adamw_steps`` with one tensor; ``step`` is the count t >= 1 after its increment, an int or
    a one-element tensor on the weight's device.
    """
    _checks.check_float("weight", weight, dtypes=_checks.KERNEL_DTYPES)
    adamw_steps([weight], [grad], [exp_avg], [exp_avg_sq], steps=[_as_step(step, weight.device)], lr=lr,
                betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, backend=backend)


def project(grad: Tensor, proj: Tensor, side: str, backend: Optional[str] = None) -> Tensor:
    """The projected gradient R (fp32): G Pᵀ for side 'right', Pᵀ G for side 'left'."""
    _checks.check_float("grad", grad, dtypes=_checks.KERNEL_DTYPES)
    _checks.check_float("proj", proj, dtypes=(torch.float32,))
    check_side(side)
    if grad.dim() != 2 or proj.dim() != 2:
        raise ValueError("grad and proj must be 2-D")
    if (side == "right" and proj.shape[1] != grad.shape[1]) or (side == "left" and proj.shape[0] != grad.shape[0]):
        raise ValueError(f"proj {tuple(proj.shape)} does not fit grad {tuple(grad.shape)} for side {side!r}")
    _checks.check_same_device("grad", grad, proj=proj)
    backend = _backend.resolve("projected_adamw_step", backend, grad=grad)
    return torch.ops.lowrank_kernels.project_grad(grad, proj, side, backend)
