"""APOLLO (Zhu et al., arXiv 2412.05270; apollo_torch.APOLLOAdamW) and APOLLO-Mini: the fused step.

For a 2-D weight W (m, n) with gradient G (m, n) and a random projection P (not orthonormal:
Gaussian with variance 1/r), on the sides of lowrank_kernels.ops.projected_step:

    R = G Pᵀ (side 'right', P (r, n)) or Pᵀ G (side 'left', P (m, r))
    m = β1 m + (1 − β1) R ;  v = β2 v + (1 − β2) R² ;  N = m / (√v + eps)     (fp32, R's shape)
    channel-wise:  φ_i = ‖N_i‖ / (‖R_i‖ + 1e-8)    (channels as Fira's: rows of (m, r), columns of (r, n))
    tensor-wise:   φ   = ‖N‖_F / (‖R‖_F + 1e-8)     (APOLLO-Mini, rank 1)
    S = G · φ ; Fira's norm-growth limiter l on S ; W ← W − step_size · √scale · S / l ; W ← W − lr · wd · W

step_size and the decay as the projected step's (transformers-style AdamW). The Triton step runs
the Fira kernels with the residual's α set to 0 and no back-projection GEMM
(lowrank_kernels.ops.projected_step_kernels.triton_apollo); the CUDA extension has no APOLLO step.
"""

from __future__ import annotations

import math
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
)


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_apollo(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps,
                     scale, tensor_wise, decay):
    for b, (weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm) in enumerate(
            zip(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms)):
        R = _kernels.project_reference(grad, proj, side)
        N = _kernels.moments_reference(R, exp_avg, exp_avg_sq, beta1, beta2, eps)
        if tensor_wise:
            phi = N.norm() / (R.norm() + _kernels.FIRA_EPS)
        else:
            phi = _kernels.channel_scale_reference(N, R, side)
        S = _kernels.at_least_fp32(grad) * phi
        S = S / _kernels.limit_reference(S.norm(), limiter_norm)
        _kernels.apply_update(weight, S * math.sqrt(scale), coef[b], decay)


# ----------------------------------------------------------------------------------------------
# torch.library op (in place, so torch.compile keeps it whole) and the op's implementations
# ----------------------------------------------------------------------------------------------
def _apollo_impl(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps,
                 scale, tensor_wise, decay, backend):
    APOLLO.impl(backend).step(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2,
                              eps, scale, tensor_wise, decay)


@torch.library.custom_op(
    "lowrank_kernels::apollo_step",
    mutates_args=("weights", "exp_avgs", "exp_avg_sqs", "limiter_norms"),
)
def _apollo_op(
    weights: List[Tensor], grads: List[Tensor], projs: List[Tensor], exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor], limiter_norms: List[Tensor], coef: Tensor, side: str, beta1: float, beta2: float,
    eps: float, scale: float, tensor_wise: bool, decay: bool, backend: str,
) -> None:
    _apollo_impl(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps,
                 scale, tensor_wise, decay, backend)


@_apollo_op.register_fake
def _(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps, scale,
      tensor_wise, decay, backend):
    return None


APOLLO = registry.declare(
    "apollo_step", "APOLLO: AdamW moments in a random projection scale the full-rank gradient (in place)",
    library_ops=(torch.ops.lowrank_kernels.apollo_step,),
    reference=registry.Impl(registry.REFERENCE, step=reference_apollo),
    triton=registry.Impl(registry.TRITON, step=_kernels.triton_apollo),
)

# The caller's tensors behind the registered op's tensor arguments (see _checks.layout_sources):
# apollo_steps' lists; coef holds the step sizes computed from the step counts and lr.
LAYOUT_SOURCES = _checks.layout_sources({
    "apollo_step": {"apollo_steps": dict(weights="weights", grads="grads", projs="projs", exp_avgs="exp_avgs",
                                         exp_avg_sqs="exp_avg_sqs", limiter_norms="limiter_norms",
                                         coef=("steps", "lr"))},
})


# ----------------------------------------------------------------------------------------------
# The functional entry point
# ----------------------------------------------------------------------------------------------
@_auto_backend.tuned("apollo_step", rows=(), mutates=True)
def apollo_steps(
    weights: Sequence[Tensor], grads: Sequence[Tensor], projs: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], limiter_norms: Sequence[Tensor], *, side: str, steps: Sequence[Tensor],
    lr: Union[float, Tensor], betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
    scale: float = 1.0, tensor_wise: bool = False, correct_bias: bool = True, backend: Optional[str] = None,
) -> None:
    """One APOLLO (``tensor_wise=False``) or APOLLO-Mini (``tensor_wise=True``) AdamW step of B
    parameters of one shape, dtype and layout, in place (math in the module docstring).

    Args:
        weights, grads: B (m, n) float32/float16/bfloat16 parameters and their gradients.
        projs: fp32 random projections, (r, n) for side 'right', (m, r) for side 'left'; any
            matrix (APOLLO's are Gaussian with variance 1/r, not orthonormal).
        exp_avgs, exp_avg_sqs: fp32 moments of R's shape, updated in place.
        limiter_norms: B 0-d fp32 tensors, the norm-growth limiter's previous ‖S‖ (negative: none
            yet), updated in place.
        side, steps, lr, betas, eps, weight_decay, correct_bias: as ``projected_adamw_steps``.
        scale: APOLLO's ``scale``: the update is multiplied by √scale (APOLLO-Mini: 128).
        tensor_wise: one scaling factor for the whole matrix instead of one per channel.
        backend: None, 'reference' or 'triton' (the CUDA extension has no APOLLO step).
    """
    batch = batch_size(weights)
    grads, projs = as_list("grads", grads, batch), as_list("projs", projs, batch)
    exp_avgs, exp_avg_sqs = as_list("exp_avgs", exp_avgs, batch), as_list("exp_avg_sqs", exp_avg_sqs, batch)
    limiter_norms, steps = as_list("limiter_norms", limiter_norms, batch), as_list("steps", steps, batch)
    check_side(side)
    for i, weight in enumerate(weights):
        sfx = "" if batch == 1 else f"[{i}]"
        check_moments(sfx, exp_avgs[i], exp_avg_sqs[i], check_projected(sfx, weight, projs[i], side))
        check_grad(sfx, grads[i], weight)
        check_limiter_norm(sfx, limiter_norms[i])
        check_step(sfx, steps[i])
        _checks.check_same_device("weight" + sfx, weight, grad=grads[i], proj=projs[i], exp_avg=exp_avgs[i],
                                  exp_avg_sq=exp_avg_sqs[i], step=steps[i], lr=lr, limiter_norm=limiter_norms[i])
    check_batches(weight=weights, grad=grads, proj=projs, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    check_hyper(lr, betas, eps, weight_decay, scale)
    if scale < 0:
        raise ValueError(f"scale must be >= 0 (the update is multiplied by its square root), got {scale}")
    backend = _backend.resolve("apollo_step", backend, weight=weights[0])
    coef = _kernels.step_coefficients(steps, lr, betas, weight_decay, correct_bias)
    args = (list(weights), grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, float(betas[0]),
            float(betas[1]), float(eps), float(scale), bool(tensor_wise), weight_decay != 0, backend)
    _backend.call_op(torch.ops.lowrank_kernels.apollo_step, _apollo_impl, *args)
