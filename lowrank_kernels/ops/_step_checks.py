"""Argument checks shared by the optimizer steps' entry points (lowrank_kernels.ops.projected_step,
lowrank_kernels.ops.apollo_step): hyper-parameters, moments, gradients, step counts, batches.

Each raises a ValueError or TypeError naming the argument; ``sfx`` is a batch element's "[i]"
(empty for a batch of one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowrank_kernels.ops import _checks
from lowrank_kernels.ops.projected_step_kernels import MAX_BATCH, SIDES, projected_shape


def check_real(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite float, got {v!r}")


def check_hyper(lr, betas, eps, weight_decay, scale=None):
    # A tensor lr is checked for its form only: reading its value would synchronise.
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr must be a float or a one-element floating tensor, got shape {tuple(lr.shape)} "
                             f"{lr.dtype}")
    else:
        check_real("lr", lr)
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
    for name, v in (("eps", eps), ("weight_decay", weight_decay)) + ((("scale", scale),) if scale is not None else ()):
        check_real(name, v)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")


def check_moments(sfx, exp_avg, exp_avg_sq, shape):
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _checks.check_float(name + sfx, t, dtypes=(torch.float32,))
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}{sfx} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        _checks.check_no_overlap(name + sfx, t)


def check_weight(sfx, weight) -> None:
    """A parameter written in place: float32/float16/bfloat16, no element stored twice."""
    _checks.check_float("weight" + sfx, weight, dtypes=_checks.KERNEL_DTYPES)
    _checks.check_no_overlap("weight" + sfx, weight)


def check_projected(sfx, weight, proj, side) -> tuple:
    """A 2-D parameter (m, n) and its fp32 projection, (r, n) for side 'right' or (m, r) for side
    'left' with 1 <= r <= min(m, n); returns the projected shape, (m, r) or (r, n)."""
    check_weight(sfx, weight)
    if weight.dim() != 2:
        raise ValueError(f"weight{sfx} must be 2-D, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    _checks.check_float("proj" + sfx, proj, dtypes=(torch.float32,))
    if proj.dim() != 2:
        raise ValueError(f"proj{sfx} must be 2-D, got shape {tuple(proj.shape)}")
    rank = proj.shape[0] if side == "right" else proj.shape[1]
    expected = (rank, n) if side == "right" else (m, rank)
    if tuple(proj.shape) != expected or not 1 <= rank <= min(m, n):
        raise ValueError(
            f"proj{sfx} must be (r, n) = (r, {n}) for side 'right' or (m, r) = ({m}, r) for side 'left' "
            f"with 1 <= r <= {min(m, n)}, got {tuple(proj.shape)} for side {side!r}"
        )
    return projected_shape(weight.shape, rank, side)


def check_limiter_norm(sfx, limiter_norm) -> None:
    if not isinstance(limiter_norm, Tensor) or limiter_norm.dtype != torch.float32 or limiter_norm.numel() != 1:
        raise ValueError(f"limiter_norm{sfx} must be a 0-d float32 tensor")


def check_grad(sfx, grad, weight):
    _checks.check_float("grad" + sfx, grad, dtypes=_checks.KERNEL_DTYPES)
    if grad.shape != weight.shape:
        raise ValueError(f"grad{sfx} must have weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}")
    if grad.dtype != weight.dtype:
        raise TypeError(f"grad{sfx} dtype {grad.dtype} must equal weight dtype {weight.dtype}")


def check_step(sfx, step):
    if not isinstance(step, Tensor) or step.numel() != 1 or step.dtype == torch.bool or step.is_complex():
        raise ValueError(f"step{sfx} must be a one-element real tensor (the count after its increment), got {step!r}")


def check_batch(name: str, tensors) -> None:
    """One launch serves the batch: every tensor of a role has the first one's layout."""
    first = tensors[0]
    for i, t in enumerate(tensors[1:], 1):
        if (t.shape, t.dtype, t.stride(), t.device) != (first.shape, first.dtype, first.stride(), first.device):
            raise ValueError(
                f"{name}[{i}] must match {name}[0] in shape, dtype, strides and device to share one launch: "
                f"{tuple(t.shape)} {t.dtype} {t.stride()} {t.device} vs {tuple(first.shape)} {first.dtype} "
                f"{first.stride()} {first.device}"
            )


def check_batches(**roles) -> None:
    """check_batch for each role given (a None role is absent)."""
    for name, tensors in roles.items():
        if tensors is not None:
            check_batch(name, tensors)


def batch_size(weights) -> int:
    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= MAX_BATCH:
        raise ValueError(f"weights must be a list of 1 to {MAX_BATCH} tensors, got {type(weights).__name__}"
                         + (f" of length {len(weights)}" if isinstance(weights, (list, tuple)) else ""))
    return len(weights)


def as_list(name: str, value, batch: int, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != batch:
        raise ValueError(f"{name} must be a list of {batch} tensors (one per weight), got {type(value).__name__}"
                         + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else ""))
    return list(value)


def check_side(side) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
