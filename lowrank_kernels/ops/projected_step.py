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
each kernel once for all of them, a grid axis over the batch. The B tensors of each role (W, G,
P, moments, ...) are separate allocations; a small int64 table holds each one's element offset
from the first (``offset_table``), the kernels add it to the first one's pointer. Every batch
element is computed exactly as it would be alone, so a batched trajectory is bit-identical to
per-parameter steps.

Implementations, selected per call by ``backend`` (see lowrank_kernels.backend):
- reference: plain torch in the peers' order of operations (galore_torch.GaLoreAdamW,
  fira.FiraAdamW), the specification, one parameter after the other. It materialises back(N),
  back(R) and S like the peers.
- triton: four launches per batch and no temporary of W's size (extra memory O(B·r·max(m, n))):
    1. projection GEMM R = G Pᵀ, with the channel energies ‖G_i‖² summed in the same pass (Fira);
    2. Adam on the projected moments (in place), N, and per channel φ_i and the residual energy
       φ_i² · ‖G_i − α·back(R)_i‖² = φ_i² · (‖G_i‖² − (2α − α²)‖R_i‖²), exact for an
       orthonormal P (every projector the package builds is one);
    3. one program per parameter sums its residual energies in a fixed order and updates the
       limiter on the device (no host synchronisation, no atomics: deterministic);
    4. back-projection GEMM of α·(N − (φ/l)·R) with (φ/l)·G, the step and the decay in its
       epilogue, writing W in place.
  A 'left' step runs the same kernels on the transposed views (Gᵀ, Wᵀ, Pᵀ, mᵀ, vᵀ).
- cuda: the same four kernels in csrc/projected_step.cu.

The step is an in-place update, not a differentiable function: there is no autograd.Function.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.backend import tile_arch, triton_available
from lowrank_kernels.ops import _checks, gemm

SIDES = ("left", "right")
MAX_BATCH = 65535  # parameters per launch: the batch is a grid axis, whose extent CUDA caps
FIRA_EPS = 1e-8  # fira's constant in φ and in the limiter
LIMITER_GAMMA = 1.01  # fira's norm-growth bound per step
# Rows of a projected step's offset table, and of a plain AdamW step's.
_W, _G, _P, _M1, _M2, _R, _LIM = range(7)
_AW, _AG, _AM1, _AM2 = range(4)


def projected_shape(shape, rank: int, side: str) -> tuple:
    """Shape of R (and of the moments) for a weight of ``shape`` projected on ``side``."""
    m, n = shape
    return (m, rank) if side == "right" else (rank, n)


def _like(value, sizes: Tensor) -> Tensor:
    # A float or 0-d tensor as a (B,) float64 tensor without a host-to-device copy.
    return value.expand_as(sizes) if isinstance(value, Tensor) else torch.full_like(sizes, value)


def step_coefficients(steps: Sequence[Tensor], lr: Union[float, Tensor], betas, weight_decay: float,
                      correct_bias: bool = True) -> Tensor:
    """(B, 2) fp32 on the steps' device: [step_size, lr·wd] for each of B parameters.

    step_size = lr·√(1 − β2ᵗ)/(1 − β1ᵗ) (lr without bias correction), t = ``steps[b]``, a 0-d
    one-element tensor on the device holding the count after its increment. float64 device ops in the peers'
    order of operations (their Python-float value, bit for bit once rounded to fp32), no host
    read. Foreach ops compute each element alone, so a parameter gets the same bits in any batch.
    ``lr`` is a float or a one-element tensor on the steps' device.
    """
    beta1, beta2 = float(betas[0]), float(betas[1])
    steps = [s.reshape(()).double() for s in steps]
    lr64 = lr.reshape(()).double() if isinstance(lr, Tensor) else float(lr)
    if correct_bias:
        bc2 = torch._foreach_pow(beta2, steps)
        torch._foreach_neg_(bc2)
        torch._foreach_add_(bc2, 1.0)
        torch._foreach_sqrt_(bc2)
        bc1 = torch._foreach_pow(beta1, steps)
        torch._foreach_neg_(bc1)
        torch._foreach_add_(bc1, 1.0)
        torch._foreach_mul_(bc2, lr64)
        torch._foreach_div_(bc2, bc1)
        sizes = torch.stack(bc2)
    else:
        sizes = _like(lr64, torch.stack(steps))
    return torch.stack([sizes, _like(lr64 * float(weight_decay), sizes)], 1).float()


# A row of an offset table: B tensors of one role, an int s (slices b·s of one batched buffer), or
# None (a role the launch does not read).
_Row = Union[Sequence[Tensor], int, None]


def _row_key(row: _Row):
    if row is None or isinstance(row, int):
        return row
    return (row[0].element_size(),) + tuple(t.data_ptr() for t in row)


# Offset tables by the addresses they encode: a memo, so that steps over the same tensors (every
# step of a training loop, as a rule) copy nothing to the device. Least recently used ones are
# dropped beyond _TABLES_KEPT; tables used while a CUDA graph was being captured are kept for good,
# since the graph reads them at every replay.
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_CAPTURED_TABLES: dict = {}
_TABLES_KEPT = 256


def offset_table(rows: Sequence[_Row], batch: int, device) -> Tensor:
    """(len(rows), batch) int64 on ``device``: where each batch element's tensor of a role lies.

    Entry [k, b] is the element offset of role k's tensor b from its tensor 0 (the kernels add it
    to tensor 0's pointer). Built on the host from data pointers, copied asynchronously (pinned
    memory) on CUDA, so no synchronisation, and reused while the addresses stay the same. The
    launchers build it from the very tensors they launch on (torch.compile may hand them
    copies).
    """
    device = torch.device(device)
    key = (device, batch) + tuple(_row_key(row) for row in rows) if batch > 1 else (device, len(rows))
    entry = _CAPTURED_TABLES.get(key) or _TABLES.get(key)
    if entry is None:
        if batch == 1:
            entry = (torch.zeros((len(rows), 1), dtype=torch.int64, device=device), None)
        else:
            data = []
            for row in rows:
                if row is None:
                    data.append([0] * batch)
                elif isinstance(row, int):
                    data.append([b * row for b in range(batch)])
                else:
                    base, size = row[0].data_ptr(), row[0].element_size()
                    if any((t.data_ptr() - base) % size for t in row):
                        raise ValueError("tensors batched into one launch must lie at multiples of their element size apart")
                    data.append([(t.data_ptr() - base) // size for t in row])
            host = torch.tensor(data, dtype=torch.int64)
            if device.type == "cuda":
                host = host.pin_memory()
            # The pinned source stays with the table: a captured copy re-reads it at every replay.
            entry = (host.to(device, non_blocking=True), host)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _CAPTURED_TABLES[key] = entry
    else:
        _TABLES[key] = entry
        _TABLES.move_to_end(key)
        if len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    return entry[0]


def _aligned16(lists, slice_bytes: int = 0) -> bool:
    """Whether every tensor of the lists lies at a 16-byte aligned address and slices of batched
    buffers ``slice_bytes`` apart keep that: then every offset is a multiple of 16 bytes, the
    kernels tell Triton so, and loads through shifted pointers stay vectorised."""
    return slice_bytes % 16 == 0 and all(t.data_ptr() % 16 == 0 for lst in lists if lst for t in lst)


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
def _at_least_fp32(t: Tensor) -> Tensor:
    # fp32 math for every storage dtype; float64 stays float64 (the tests' exact reference).
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def project_reference(grad: Tensor, proj: Tensor, side: str) -> Tensor:
    """R = G Pᵀ (side 'right') or Pᵀ G (side 'left'), in fp32 (float64 for float64 inputs)."""
    g = _at_least_fp32(grad)
    return g @ proj.t() if side == "right" else proj.t() @ g


def _back_reference(x: Tensor, proj: Tensor, side: str) -> Tensor:
    return x @ proj if side == "right" else proj @ x


def _apply_update(weight: Tensor, update: Tensor, coef: Tensor, decay: bool) -> None:
    # addcmul with the 0-d coefficient rounds like the peers' add_(x, alpha=-step_size): one fused
    # multiply-add, so the reference keeps their bits.
    w = _at_least_fp32(weight)
    w.addcmul_(update, coef[0], value=-1.0)
    if decay:
        w.addcmul_(w, coef[1], value=-1.0)
    if w is not weight:
        weight.copy_(w)


def _reference_projected_one(weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm, proj_grad, coef,
                             side, beta1, beta2, eps, scale, fira, decay, reduce_sum=None):
    # reduce_sum: for a weight sharded by rows (lowrank_kernels.optim.distributed), the sum over
    # the shards of a local partial sum, so that ‖S‖ is the whole residual's norm.
    R = proj_grad if proj_grad is not None else project_reference(grad, proj, side)
    exp_avg.mul_(beta1).add_(R, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
    N = exp_avg / exp_avg_sq.sqrt().add_(eps)
    update = _back_reference(N, proj, side) * scale
    if fira:
        dim = 1 if side == "right" else 0
        phi = N.norm(dim=dim) / (R.norm(dim=dim) + FIRA_EPS)
        if side == "right":
            phi = phi.unsqueeze(1)
        S = (_at_least_fp32(grad) - _back_reference(R, proj, side) * scale) * phi
        norm = S.norm() if reduce_sum is None else reduce_sum(S.square().sum()).sqrt()
        # A negative stored norm means "no previous step"; then l = 1 exactly.
        limit = torch.where(
            limiter_norm >= 0,
            torch.clamp_min(norm / (limiter_norm + FIRA_EPS), LIMITER_GAMMA) / LIMITER_GAMMA,
            torch.ones_like(norm),
        )
        S = S / limit
        limiter_norm.copy_(norm / limit)
        update = update + S
    _apply_update(weight, update, coef, decay)


# The reference steps run under no_grad, as the kernels do: an optimizer step updates parameters
# (leaves that require grad) in place and is no part of any graph.
@torch.no_grad()
def _reference_projected(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                         side, beta1, beta2, eps, scale, fira, decay):
    for b in range(len(weights)):
        _reference_projected_one(
            weights[b], grads[b], projs[b], exp_avgs[b], exp_avg_sqs[b], limiter_norms[b] if fira else None,
            proj_grads[b] if proj_grads else None, coef[b], side, beta1, beta2, eps, scale, fira, decay,
        )


@torch.no_grad()
def _reference_adamw(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay):
    for b, (weight, grad, exp_avg, exp_avg_sq) in enumerate(zip(weights, grads, exp_avgs, exp_avg_sqs)):
        g = _at_least_fp32(grad)
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        _apply_update(weight, exp_avg / exp_avg_sq.sqrt().add_(eps), coef[b], decay)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Grid axis ``b`` walks the batch: role X of batch element b is at
# X_ptr + X_off[b] (offset table rows), workspace buffers are batched contiguously.
# ----------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

    @triton.jit
    def _shift(ptr, off_ptr, b, ALIGNED: tl.constexpr):
        """``ptr`` moved to batch element b's tensor: its offset (in elements) from the table."""
        off = tl.load(off_ptr + b)
        if ALIGNED:
            # The launcher checked that every offset is a whole number of 16-byte units.
            off = tl.multiple_of(off, 16 // (ptr.dtype.element_ty.primitive_bitwidth // 8))
        return ptr + off

    @triton.jit
    def _project_kernel(
        # G (M, N) and P (R, N) as strided views: R = G Pᵀ
        G_ptr, G_off, stride_gm, stride_gn,
        P_ptr, P_off, stride_pr, stride_pn,
        # outputs: R (M, RANK) fp32, channel energies ‖G_i‖² (B, M) fp32
        R_ptr, R_off, stride_rm, stride_rr,
        GSQ_ptr,
        M, N, RANK,
        NORMS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        b = tl.program_id(2)
        G_ptr = _shift(G_ptr, G_off, b, ALIGNED)
        P_ptr = _shift(P_ptr, P_off, b, ALIGNED)
        R_ptr = _shift(R_ptr, R_off, b, ALIGNED)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_ok = offs_m < M
        r_ok = offs_r < RANK
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        gsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            n_ok = offs_n < N
            g = tl.load(
                G_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                mask=m_ok[:, None] & n_ok[None, :], other=0.0,
            )
            p = tl.load(
                P_ptr + offs_r[None, :] * stride_pr + offs_n[:, None] * stride_pn,
                mask=r_ok[None, :] & n_ok[:, None], other=0.0,
            )
            acc = tl.dot(g.to(DOT_DTYPE), p.to(DOT_DTYPE), acc, input_precision=PRECISION)
            if NORMS:
                gf = g.to(tl.float32)
                gsq += tl.sum(gf * gf, axis=1)
        tl.store(
            R_ptr + offs_m[:, None] * stride_rm + offs_r[None, :] * stride_rr,
            acc, mask=m_ok[:, None] & r_ok[None, :],
        )
        if NORMS:
            # Every rank-block computes the energies; the first one writes them.
            if pid_r == 0:
                tl.store(GSQ_ptr + b.to(tl.int64) * M + offs_m, gsq, mask=m_ok)

    @triton.jit
    def _moments_kernel(
        # R (M, RANK) fp32 (read), moments (M, RANK) fp32 (updated in place), N (B, M, RANK) fp32
        # contiguous (written)
        R_ptr, R_off, stride_rm, stride_rr,
        M1_ptr, M1_off, stride_1m, stride_1r,
        M2_ptr, M2_off, stride_2m, stride_2r,
        N_ptr,
        # Fira: channel energies of G (read), φ and residual energies (written), all (B, M) fp32
        GSQ_ptr, PHI_ptr, RES_ptr,
        M, RANK,
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, resid_coef,
        FIRA: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        R_ptr = _shift(R_ptr, R_off, b, ALIGNED)
        M1_ptr = _shift(M1_ptr, M1_off, b, ALIGNED)
        M2_ptr = _shift(M2_ptr, M2_off, b, ALIGNED)
        N_ptr += b.to(tl.int64) * M * RANK
        offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < M
        nsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            ok = m_ok[:, None] & (offs_r[None, :] < RANK)
            r = tl.load(R_ptr + offs_m[:, None] * stride_rm + offs_r[None, :] * stride_rr, mask=ok, other=0.0)
            m1_ptrs = M1_ptr + offs_m[:, None] * stride_1m + offs_r[None, :] * stride_1r
            m2_ptrs = M2_ptr + offs_m[:, None] * stride_2m + offs_r[None, :] * stride_2r
            m1 = tl.load(m1_ptrs, mask=ok, other=0.0) * beta1 + one_minus_beta1 * r
            m2 = tl.load(m2_ptrs, mask=ok, other=0.0) * beta2 + one_minus_beta2 * (r * r)
            tl.store(m1_ptrs, m1, mask=ok)
            tl.store(m2_ptrs, m2, mask=ok)
            n = tl.div_rn(m1, tl.sqrt_rn(m2) + eps)
            tl.store(N_ptr + offs_m[:, None] * RANK + offs_r[None, :], n, mask=ok)
            if FIRA:
                nsq += tl.sum(n * n, axis=1)
                rsq += tl.sum(r * r, axis=1)
        if FIRA:
            phi = tl.div_rn(tl.sqrt_rn(nsq), tl.sqrt_rn(rsq) + 1e-8)
            gsq = tl.load(GSQ_ptr + b.to(tl.int64) * M + offs_m, mask=m_ok, other=0.0)
            # ‖G_i − α·back(R)_i‖² for orthonormal P; clamped where rounding makes it negative.
            resid = tl.maximum(gsq - resid_coef * rsq, 0.0)
            tl.store(PHI_ptr + b.to(tl.int64) * M + offs_m, phi, mask=m_ok)
            tl.store(RES_ptr + b.to(tl.int64) * M + offs_m, phi * phi * resid, mask=m_ok)

    @triton.jit
    def _limiter_kernel(
        RES_ptr, M,
        # limiter state: previous ‖S‖ (negative: none yet), updated in place; l written to LIM_ptr (B,)
        PREV_ptr, PREV_off, LIM_ptr,
        BLOCK: tl.constexpr,
    ):
        # One program per parameter and a fixed summation order: the same bits on every run.
        b = tl.program_id(0)
        RES_ptr += b.to(tl.int64) * M
        PREV_ptr = _shift(PREV_ptr, PREV_off, b, False)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK):
            offs = m0 + tl.arange(0, BLOCK)
            acc += tl.load(RES_ptr + offs, mask=offs < M, other=0.0)
        norm = tl.sqrt_rn(tl.sum(acc, axis=0))
        prev = tl.load(PREV_ptr)
        ratio = tl.div_rn(norm, prev + 1e-8)
        limit = tl.where(prev >= 0.0, tl.div_rn(tl.maximum(ratio, 1.01), 1.01), 1.0)
        tl.store(PREV_ptr, tl.div_rn(norm, limit))
        tl.store(LIM_ptr + b, limit)

    @triton.jit
    def _back_kernel(
        # W (M, N) updated in place; G (M, N) read for Fira; P (RANK, N)
        W_ptr, W_off, stride_wm, stride_wn,
        G_ptr, G_off, stride_gm, stride_gn,
        P_ptr, P_off, stride_pr, stride_pn,
        # N (B, M, RANK) fp32 contiguous and R (M, RANK) fp32; φ (B, M) and the limiters l (B,) for Fira
        N_ptr,
        R_ptr, R_off, stride_rm, stride_rr,
        PHI_ptr, LIM_ptr,
        # (B, 2) fp32: step size and lr·wd of each parameter
        COEF_ptr,
        M, N, RANK,
        scale,
        FIRA: tl.constexpr, DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = gemm.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        b = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = offs_m < M
        n_ok = offs_n < N
        tile = m_ok[:, None] & n_ok[None, :]
        W_ptr = _shift(W_ptr, W_off, b, ALIGNED)
        P_ptr = _shift(P_ptr, P_off, b, ALIGNED)
        N_ptr += b.to(tl.int64) * M * RANK
        step_size = tl.load(COEF_ptr + 2 * b)

        if FIRA:
            G_ptr = _shift(G_ptr, G_off, b, ALIGNED)
            R_ptr = _shift(R_ptr, R_off, b, ALIGNED)
            c = tl.load(PHI_ptr + b.to(tl.int64) * M + offs_m, mask=m_ok, other=0.0) / tl.load(LIM_ptr + b)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            ok = m_ok[:, None] & (offs_r[None, :] < RANK)
            z = tl.load(N_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=ok, other=0.0)
            if FIRA:
                # α·back(N) − (φ/l)·α·back(R) as one product: α·(N − (φ/l)·R) P.
                r = tl.load(R_ptr + offs_m[:, None] * stride_rm + offs_r[None, :] * stride_rr, mask=ok, other=0.0)
                z = z - c[:, None] * r
            z = z * scale
            p = tl.load(
                P_ptr + offs_r[:, None] * stride_pr + offs_n[None, :] * stride_pn,
                mask=(offs_r[:, None] < RANK) & n_ok[None, :], other=0.0,
            )
            acc = tl.dot(z.to(DOT_DTYPE), p.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if FIRA:
            g = tl.load(G_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=tile, other=0.0)
            acc += c[:, None] * g.to(tl.float32)
        w_ptrs = W_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=tile, other=0.0).to(tl.float32)
        w = w - step_size * acc
        if DECAY:
            w = w - tl.load(COEF_ptr + 2 * b + 1) * w
        tl.store(w_ptrs, w.to(W_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _adamw_kernel(
        # flat contiguous W, G (W's dtype), fp32 moments, each of numel elements, B of each
        W_ptr, W_off, G_ptr, G_off, M1_ptr, M1_off, M2_ptr, M2_off,
        # (B, 2) fp32: step size and lr·wd of each parameter
        COEF_ptr,
        numel,
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        DECAY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    ):
        b = tl.program_id(1)
        W_ptr = _shift(W_ptr, W_off, b, ALIGNED)
        G_ptr = _shift(G_ptr, G_off, b, ALIGNED)
        M1_ptr = _shift(M1_ptr, M1_off, b, ALIGNED)
        M2_ptr = _shift(M2_ptr, M2_off, b, ALIGNED)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        g = tl.load(G_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m1 = tl.load(M1_ptr + offs, mask=ok, other=0.0) * beta1 + one_minus_beta1 * g
        m2 = tl.load(M2_ptr + offs, mask=ok, other=0.0) * beta2 + one_minus_beta2 * (g * g)
        tl.store(M1_ptr + offs, m1, mask=ok)
        tl.store(M2_ptr + offs, m2, mask=ok)
        w = tl.load(W_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w = w - tl.load(COEF_ptr + 2 * b) * tl.div_rn(m1, tl.sqrt_rn(m2) + eps)
        if DECAY:
            w = w - tl.load(COEF_ptr + 2 * b + 1) * w
        tl.store(W_ptr + offs, w.to(W_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Triton launchers. Callers validate; these allocate the O(B·r·max(m, n)) workspace and launch.
# ----------------------------------------------------------------------------------------------
def _canonical(side, weight, grad, proj, exp_avg, exp_avg_sq):
    """Views that turn either side into a right projection: R = G Pᵀ with channels as rows."""
    if side == "right":
        return weight, grad, proj, exp_avg, exp_avg_sq
    t = lambda x: None if x is None else x.t()  # noqa: E731
    return t(weight), t(grad), proj.t(), t(exp_avg), t(exp_avg_sq)


def _dot_dtype(grad_dtype: torch.dtype):
    # Products run in the gradient's dtype (tensor cores for bf16/fp16), accumulated in fp32;
    # fp32 products are ieee unless the user allowed tf32.
    if grad_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return tl.float32, "tf32"
    return _TL_DTYPES[grad_dtype], "ieee"


def _blocks(rank: int, device, dtype):
    interp = tile_arch(device) is None
    block_r = min(16 if interp else 64, max(16, triton.next_power_of_2(rank)))
    if interp:
        return dict(bm=16, bn=32, proj_bn=32, br=block_r, proj_br=max(16, min(32, triton.next_power_of_2(rank))),
                    warps=4)
    # 64 x 128 fp32 accumulators: 8 warps keep them in registers without spilling. An fp32 IEEE
    # projection runs on FMA units with its operands in registers: narrower tiles, or it spills.
    fma = dtype == torch.float32 and _dot_dtype(dtype)[1] == "ieee"
    return dict(bm=64, bn=128, proj_bn=32 if fma else 128, br=block_r,
                proj_br=max(16, min(32 if fma else 128, triton.next_power_of_2(rank))), warps=8)


def allocate_workspace(batch: int, rows: int, rank: int, device, fira: bool):
    """The step's scratch for ``batch`` parameters: R and N (batch, rows, rank) fp32, and
    (batch, rows) fp32 vectors and the (batch,) limiters for Fira.

    ``rows`` is m for side 'right' and n for side 'left'. Tests pass a NaN-filled one to check
    that every value is written before it is read.
    """
    ws = {
        "R": torch.empty((batch, rows, rank), device=device, dtype=torch.float32),
        "N": torch.empty((batch, rows, rank), device=device, dtype=torch.float32),
    }
    if fira:
        ws["gsq"] = torch.empty((batch, rows), device=device, dtype=torch.float32)
        ws["phi"] = torch.empty((batch, rows), device=device, dtype=torch.float32)
        ws["res"] = torch.empty((batch, rows), device=device, dtype=torch.float32)
        ws["limit"] = torch.empty(batch, device=device, dtype=torch.float32)
    return ws


def _triton_project(G, G_off, P, P_off, R, R_off, gsq, batch, norms, aligned):
    M, Ncols = G.shape
    rank = P.shape[0]
    b = _blocks(rank, G.device, G.dtype)
    dot_dtype, precision = _dot_dtype(G.dtype)
    grid = (triton.cdiv(M, b["bm"]), triton.cdiv(rank, b["proj_br"]), batch)
    _project_kernel[grid](
        G, G_off, G.stride(0), G.stride(1),
        P, P_off, P.stride(0), P.stride(1),
        R, R_off, R.stride(0), R.stride(1),
        gsq if norms else R,
        M, Ncols, rank,
        NORMS=norms, DOT_DTYPE=dot_dtype, PRECISION=precision, ALIGNED=aligned,
        BLOCK_M=b["bm"], BLOCK_N=b["proj_bn"], BLOCK_R=b["proj_br"], num_warps=b["warps"],
    )


def project_triton(grad: Tensor, proj: Tensor, side: str, out: Optional[Tensor] = None) -> Tensor:
    """R in fp32 (R's shape for ``side``), by the projection kernel alone (used to accumulate)."""
    G = grad if side == "right" else grad.t()
    P = proj if side == "right" else proj.t()
    shape = projected_shape(grad.shape, P.shape[0], side)
    if out is None:
        out = torch.empty(shape, device=grad.device, dtype=torch.float32)
    zero = torch.zeros(1, dtype=torch.int64, device=grad.device)
    _triton_project(G, zero, P, zero, out if side == "right" else out.t(), zero, None, 1, norms=False, aligned=False)
    return out


def _projected_rows(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, r_stride):
    """The offset table's rows of a projected launch; R is either the given projected gradients
    or slices ``r_stride`` elements apart of the batched workspace."""
    rows = [None] * 7
    rows[_W], rows[_P], rows[_M1], rows[_M2] = weights, projs, exp_avgs, exp_avg_sqs
    rows[_G] = grads if grads[0] is not None else None
    rows[_R] = proj_grads if proj_grads else r_stride
    rows[_LIM] = limiter_norms or None
    return rows


def _projected_offsets(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads):
    # R's workspace slices are rows·rank = one moment's numel apart.
    rows = _projected_rows(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, exp_avgs[0].numel())
    return offset_table(rows, len(weights), weights[0].device)


def _triton_projected(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                      side, beta1, beta2, eps, scale, fira, decay, workspace=None):
    batch = len(weights)
    offsets = _projected_offsets(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads)
    W, G, P, M1, M2 = _canonical(side, weights[0], grads[0], projs[0], exp_avgs[0], exp_avg_sqs[0])
    rows, cols = W.shape
    rank = P.shape[0]
    ws = workspace or allocate_workspace(batch, rows, rank, W.device, fira)
    aligned = _aligned16((weights, grads if grads[0] is not None else None, projs, exp_avgs, exp_avg_sqs, proj_grads),
                         0 if proj_grads else 4 * rows * rank)
    b = _blocks(rank, W.device, W.dtype)
    if proj_grads:
        R = proj_grads[0] if side == "right" else proj_grads[0].t()
    else:
        R = ws["R"][0]
        _triton_project(G, offsets[_G], P, offsets[_P], R, offsets[_R], ws.get("gsq"), batch, norms=fira, aligned=aligned)
    _moments_kernel[(triton.cdiv(rows, b["bm"]), batch)](
        R, offsets[_R], R.stride(0), R.stride(1),
        M1, offsets[_M1], M1.stride(0), M1.stride(1),
        M2, offsets[_M2], M2.stride(0), M2.stride(1),
        ws["N"],
        ws.get("gsq", ws["N"]), ws.get("phi", ws["N"]), ws.get("res", ws["N"]),
        rows, rank,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, 2.0 * scale - scale * scale,
        FIRA=fira, ALIGNED=aligned, BLOCK_M=b["bm"], BLOCK_R=b["br"],
    )
    if fira:
        _limiter_kernel[(batch,)](ws["res"], rows, limiter_norms[0], offsets[_LIM], ws["limit"], BLOCK=1024)
    dot_dtype, precision = _dot_dtype(W.dtype if G is None else G.dtype)
    Gp = G if fira else W
    _back_kernel[(triton.cdiv(rows, b["bm"]) * triton.cdiv(cols, b["bn"]), batch)](
        W, offsets[_W], W.stride(0), W.stride(1),
        Gp, offsets[_G], Gp.stride(0), Gp.stride(1),
        P, offsets[_P], P.stride(0), P.stride(1),
        ws["N"],
        R, offsets[_R], R.stride(0), R.stride(1),
        ws.get("phi", ws["N"]), ws.get("limit", ws["N"]),
        coef,
        rows, cols, rank,
        float(scale),
        FIRA=fira, DECAY=decay, DOT_DTYPE=dot_dtype, PRECISION=precision, ALIGNED=aligned,
        BLOCK_M=b["bm"], BLOCK_N=b["bn"], BLOCK_R=b["br"], GROUP_M=8, num_warps=b["warps"],
    )


def _flat(weights, grads, exp_avgs, exp_avg_sqs):
    """The flat kernels need contiguous W and G: contiguous copies of the rare strided ones (the
    caller copies W back), and the offset table of what is launched on."""
    ws = [w.contiguous() for w in weights]
    gs = [g.contiguous() for g in grads]
    return ws, gs, offset_table([ws, gs, exp_avgs, exp_avg_sqs], len(ws), ws[0].device)


def _copy_back(weights, flat_weights):
    for w, f in zip(weights, flat_weights):
        if f is not w:
            w.copy_(f)


def _triton_adamw(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay):
    flat_w, flat_g, offsets = _flat(weights, grads, exp_avgs, exp_avg_sqs)
    numel = flat_w[0].numel()
    block = 1024
    _adamw_kernel[(triton.cdiv(numel, block), len(flat_w))](
        flat_w[0], offsets[_AW], flat_g[0], offsets[_AG], exp_avgs[0], offsets[_AM1], exp_avg_sqs[0], offsets[_AM2],
        coef, numel,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        DECAY=decay, ALIGNED=_aligned16((flat_w, flat_g, exp_avgs, exp_avg_sqs)), BLOCK=block,
    )
    _copy_back(weights, flat_w)


# ----------------------------------------------------------------------------------------------
# CUDA launchers (csrc/projected_step.cu, csrc/projected_step_binding.cpp)
# ----------------------------------------------------------------------------------------------
def _cuda_projected(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                    side, beta1, beta2, eps, scale, fira, decay, workspace=None):
    batch = len(weights)
    offsets = _projected_offsets(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads)
    W, G, P, M1, M2 = _canonical(side, weights[0], grads[0], projs[0], exp_avgs[0], exp_avg_sqs[0])
    rows = W.shape[0]
    ws = workspace or allocate_workspace(batch, rows, P.shape[0], W.device, fira)
    R = None if not proj_grads else (proj_grads[0] if side == "right" else proj_grads[0].t())
    _backend.cuda_extension().projected_step(
        W, G, P, M1, M2, R, ws["R"], ws["N"], ws.get("gsq"), ws.get("phi"), ws.get("res"),
        ws.get("limit"), limiter_norms[0] if fira else None, offsets, coef, fira, decay,
        float(beta1), float(beta2), float(eps), float(scale),
    )


def _cuda_adamw(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay):
    flat_w, flat_g, offsets = _flat(weights, grads, exp_avgs, exp_avg_sqs)
    _backend.cuda_extension().adamw_step(
        flat_w[0], flat_g[0], exp_avgs[0], exp_avg_sqs[0], offsets, coef, float(beta1), float(beta2), float(eps), decay
    )
    _copy_back(weights, flat_w)


# ----------------------------------------------------------------------------------------------
# torch.library ops (in-place, so torch.compile keeps them whole)
# ----------------------------------------------------------------------------------------------
def _projected_impl(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                    side, beta1, beta2, eps, scale, fira, decay, backend):
    impl = {"reference": _reference_projected, "triton": _triton_projected, "cuda": _cuda_projected}[backend]
    impl(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
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


def _adamw_impl(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay, backend):
    impl = {"reference": _reference_adamw, "triton": _triton_adamw, "cuda": _cuda_adamw}[backend]
    impl(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay)


@torch.library.custom_op("lowrank_kernels::adamw_step", mutates_args=("weights", "exp_avgs", "exp_avg_sqs"))
def _adamw_op(
    weights: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    coef: Tensor, beta1: float, beta2: float, eps: float, decay: bool, backend: str,
) -> None:
    _adamw_impl(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay, backend)


@_adamw_op.register_fake
def _(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay, backend):
    return None


@torch.library.custom_op("lowrank_kernels::project_grad", mutates_args=())
def _project_op(grad: Tensor, proj: Tensor, side: str, backend: str) -> Tensor:
    if backend == "reference":
        return project_reference(grad, proj, side)
    if backend == "triton":
        return project_triton(grad, proj, side)
    G = grad if side == "right" else grad.t()
    P = proj if side == "right" else proj.t()
    out = torch.empty(projected_shape(grad.shape, P.shape[0], side), device=grad.device, dtype=torch.float32)
    _backend.cuda_extension().projected_step_project(G, P, out if side == "right" else out.t())
    return out


@_project_op.register_fake
def _(grad, proj, side, backend):
    rank = proj.shape[0] if side == "right" else proj.shape[1]
    return grad.new_empty(projected_shape(grad.shape, rank, side), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Validation and the functional entry points
# ----------------------------------------------------------------------------------------------
def _check_real(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite float, got {v!r}")


def _check_hyper(lr, betas, eps, weight_decay, scale=None):
    # A tensor lr is checked for its form only: reading its value would synchronise.
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr must be a float or a one-element floating tensor, got shape {tuple(lr.shape)} {lr.dtype}")
    else:
        _check_real("lr", lr)
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
    for name, v in (("eps", eps), ("weight_decay", weight_decay)) + ((("scale", scale),) if scale is not None else ()):
        _check_real(name, v)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")


def _check_moments(sfx, exp_avg, exp_avg_sq, shape):
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _checks.check_float(name + sfx, t, dtypes=(torch.float32,))
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}{sfx} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        _checks.check_no_overlap(name + sfx, t)


def _check_grad(sfx, grad, weight):
    _checks.check_float("grad" + sfx, grad, dtypes=_checks.KERNEL_DTYPES)
    if grad.shape != weight.shape:
        raise ValueError(f"grad{sfx} must have weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}")
    if grad.dtype != weight.dtype:
        raise TypeError(f"grad{sfx} dtype {grad.dtype} must equal weight dtype {weight.dtype}")


def _check_step(sfx, step):
    if not isinstance(step, Tensor) or step.numel() != 1 or step.dtype == torch.bool or step.is_complex():
        raise ValueError(f"step{sfx} must be a one-element real tensor (the count after its increment), got {step!r}")


def _check_batch(name: str, tensors) -> None:
    """One launch serves the batch: every tensor of a role has the first one's layout."""
    first = tensors[0]
    for i, t in enumerate(tensors[1:], 1):
        if (t.shape, t.dtype, t.stride(), t.device) != (first.shape, first.dtype, first.stride(), first.device):
            raise ValueError(
                f"{name}[{i}] must match {name}[0] in shape, dtype, strides and device to share one launch: "
                f"{tuple(t.shape)} {t.dtype} {t.stride()} {t.device} vs {tuple(first.shape)} {first.dtype} "
                f"{first.stride()} {first.device}"
            )


def _batch_size(weights) -> int:
    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= MAX_BATCH:
        raise ValueError(f"weights must be a list of 1 to {MAX_BATCH} tensors, got {type(weights).__name__}"
                         + (f" of length {len(weights)}" if isinstance(weights, (list, tuple)) else ""))
    return len(weights)


def _as_list(name: str, value, batch: int, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != batch:
        raise ValueError(f"{name} must be a list of {batch} tensors (one per weight), got {type(value).__name__}"
                         + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else ""))
    return list(value)


def _as_step(step, device) -> Tensor:
    # An int count becomes a device tensor by a fill, not a host-to-device copy.
    if isinstance(step, Tensor):
        return step
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 or a one-element tensor (the count after its increment), got {step!r}")
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
    batch = _batch_size(weights)
    grads = _as_list("grads", grads, batch, optional=True)
    projs = _as_list("projs", projs, batch)
    exp_avgs, exp_avg_sqs = _as_list("exp_avgs", exp_avgs, batch), _as_list("exp_avg_sqs", exp_avg_sqs, batch)
    steps = _as_list("steps", steps, batch)
    limiter_norms = _as_list("limiter_norms", limiter_norms, batch, optional=True)
    proj_grads = _as_list("proj_grads", proj_grads, batch, optional=True)
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if grads is None:
        if proj_grads is None:
            raise ValueError("grad may be None only when proj_grad is given")
        if fira:
            raise ValueError("fira=True needs the full grad (the residual G − α·back(R)); proj_grad alone is not enough")
    if fira and limiter_norms is None:
        raise ValueError("limiter_norm must be given (a 0-d float32 tensor per weight) when fira=True")
    if not fira and limiter_norms is not None:
        raise ValueError("limiter_norm is used only with fira=True")
    for i, weight in enumerate(weights):
        sfx = "" if batch == 1 else f"[{i}]"
        _checks.check_float("weight" + sfx, weight, dtypes=_checks.KERNEL_DTYPES)
        _checks.check_no_overlap("weight" + sfx, weight)
        if weight.dim() != 2:
            raise ValueError(f"weight{sfx} must be 2-D, got shape {tuple(weight.shape)}")
        m, n = weight.shape
        proj = projs[i]
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
        rshape = projected_shape(weight.shape, rank, side)
        _check_moments(sfx, exp_avgs[i], exp_avg_sqs[i], rshape)
        if grads is not None:
            _check_grad(sfx, grads[i], weight)
        if proj_grads is not None:
            _checks.check_float("proj_grad" + sfx, proj_grads[i], dtypes=(torch.float32,))
            if tuple(proj_grads[i].shape) != rshape:
                raise ValueError(f"proj_grad{sfx} must have shape {rshape}, got {tuple(proj_grads[i].shape)}")
        if fira:
            lim = limiter_norms[i]
            if not isinstance(lim, Tensor) or lim.dtype != torch.float32 or lim.numel() != 1:
                raise ValueError(f"limiter_norm{sfx} must be a 0-d float32 tensor when fira=True")
        _check_step(sfx, steps[i])
        _checks.check_same_device("weight" + sfx, weight, grad=None if grads is None else grads[i], proj=proj,
                           exp_avg=exp_avgs[i], exp_avg_sq=exp_avg_sqs[i], step=steps[i], lr=lr,
                           limiter_norm=None if limiter_norms is None else limiter_norms[i],
                           proj_grad=None if proj_grads is None else proj_grads[i])
    for name, role in (("weight", weights), ("grad", grads), ("proj", projs), ("exp_avg", exp_avgs),
                       ("exp_avg_sq", exp_avg_sqs), ("proj_grad", proj_grads)):
        if role is not None:
            _check_batch(name, role)
    _check_hyper(lr, betas, eps, weight_decay, scale)
    backend = _backend.resolve("projected_adamw_step", backend, weight=weights[0])
    grads = grads if grads is not None else [None] * batch
    limiter_norms, proj_grads = limiter_norms or [], proj_grads or []
    coef = step_coefficients(steps, lr, betas, weight_decay, correct_bias)
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
    batch = _batch_size(weights)
    grads = _as_list("grads", grads, batch)
    exp_avgs, exp_avg_sqs = _as_list("exp_avgs", exp_avgs, batch), _as_list("exp_avg_sqs", exp_avg_sqs, batch)
    steps = _as_list("steps", steps, batch)
    for i, weight in enumerate(weights):
        sfx = "" if batch == 1 else f"[{i}]"
        _checks.check_float("weight" + sfx, weight, dtypes=_checks.KERNEL_DTYPES)
        _checks.check_no_overlap("weight" + sfx, weight)
        _check_grad(sfx, grads[i], weight)
        _check_moments(sfx, exp_avgs[i], exp_avg_sqs[i], weight.shape)
        for name, t in (("exp_avg", exp_avgs[i]), ("exp_avg_sq", exp_avg_sqs[i])):
            if not t.is_contiguous():
                raise ValueError(f"{name}{sfx} must be contiguous")
        _check_step(sfx, steps[i])
        _checks.check_same_device("weight" + sfx, weight, grad=grads[i], exp_avg=exp_avgs[i], exp_avg_sq=exp_avg_sqs[i],
                           step=steps[i], lr=lr)
    for name, role in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)):
        _check_batch(name, role)
    for i, w in enumerate(weights):
        if (w.shape, w.dtype) != (weights[0].shape, weights[0].dtype):
            raise ValueError(f"weight[{i}] must match weight[0] in shape and dtype to share one launch")
    _check_hyper(lr, betas, eps, weight_decay)
    backend = _backend.resolve("adamw_step", backend, weight=weights[0])
    coef = step_coefficients(steps, lr, betas, weight_decay, correct_bias)
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
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if grad.dim() != 2 or proj.dim() != 2:
        raise ValueError("grad and proj must be 2-D")
    if (side == "right" and proj.shape[1] != grad.shape[1]) or (side == "left" and proj.shape[0] != grad.shape[0]):
        raise ValueError(f"proj {tuple(proj.shape)} does not fit grad {tuple(grad.shape)} for side {side!r}")
    _checks.check_same_device("grad", grad, proj=proj)
    backend = _backend.resolve("projected_adamw_step", backend, grad=grad)
    return torch.ops.lowrank_kernels.project_grad(grad, proj, side, backend)


# ----------------------------------------------------------------------------------------------
# APOLLO (Zhu et al., arXiv 2412.05270; apollo_torch.APOLLOAdamW): the Fira kernels with the
# residual's α set to 0 and no back-projection
# ----------------------------------------------------------------------------------------------
#   R = G Pᵀ or Pᵀ G with a random P (not orthonormal), Adam on R as above, N = m / (√v + eps)
#   channel-wise:  φ_i = ‖N_i‖ / (‖R_i‖ + 1e-8)    (channels as Fira's: rows of (m, r), columns of (r, n))
#   tensor-wise:   φ   = ‖N‖_F / (‖R‖_F + 1e-8)     (APOLLO-Mini, rank 1)
#   S = G · φ ; the norm-growth limiter on S as Fira's ; W ← W − step_size · √scale · S / l ; decay
# The projection kernel's channel energies ‖G_i‖² give ‖S‖² = Σ φ_i² ‖G_i‖² exactly (the moments
# kernel's residual energy with resid_coef = 2α − α² = 0 needs no orthonormal P), and the back
# kernel launched with RANK = 0 skips its GEMM: its epilogue alone writes W − c·(φ_i/l)·G.
@torch.no_grad()
def _reference_apollo(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps,
                      scale, tensor_wise, decay):
    for b, (weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm) in enumerate(
            zip(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms)):
        R = project_reference(grad, proj, side)
        exp_avg.mul_(beta1).add_(R, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
        N = exp_avg / exp_avg_sq.sqrt().add_(eps)
        if tensor_wise:
            phi = N.norm() / (R.norm() + FIRA_EPS)
        else:
            dim = 1 if side == "right" else 0
            phi = N.norm(dim=dim) / (R.norm(dim=dim) + FIRA_EPS)
            if side == "right":
                phi = phi.unsqueeze(1)
        S = _at_least_fp32(grad) * phi
        norm = S.norm()
        limit = torch.where(
            limiter_norm >= 0,
            torch.clamp_min(norm / (limiter_norm + FIRA_EPS), LIMITER_GAMMA) / LIMITER_GAMMA,
            torch.ones_like(norm),
        )
        S = S / limit
        limiter_norm.copy_(norm / limit)
        _apply_update(weight, S * math.sqrt(scale), coef[b], decay)


def _triton_apollo(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps,
                   scale, tensor_wise, decay, workspace=None):
    batch = len(weights)
    offsets = _projected_offsets(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, [])
    W, G, P, M1, M2 = _canonical(side, weights[0], grads[0], projs[0], exp_avgs[0], exp_avg_sqs[0])
    rows, cols = W.shape
    rank = P.shape[0]
    ws = workspace or allocate_workspace(batch, rows, rank, W.device, fira=True)
    aligned = _aligned16((weights, grads, projs, exp_avgs, exp_avg_sqs), 4 * rows * rank)
    b = _blocks(rank, W.device, W.dtype)
    R = ws["R"][0]
    _triton_project(G, offsets[_G], P, offsets[_P], R, offsets[_R], ws["gsq"], batch, norms=True, aligned=aligned)
    _moments_kernel[(triton.cdiv(rows, b["bm"]), batch)](
        R, offsets[_R], R.stride(0), R.stride(1),
        M1, offsets[_M1], M1.stride(0), M1.stride(1),
        M2, offsets[_M2], M2.stride(0), M2.stride(1),
        ws["N"], ws["gsq"], ws["phi"], ws["res"],
        rows, rank,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, 0.0,
        FIRA=True, ALIGNED=aligned, BLOCK_M=b["bm"], BLOCK_R=b["br"],
    )
    if tensor_wise:
        # One φ per parameter from the totals: B·rows·rank values (rank 1 for APOLLO-Mini).
        phi = ws["N"].square().sum((1, 2)).sqrt() / (ws["R"].square().sum((1, 2)).sqrt() + FIRA_EPS)
        ws["phi"].copy_(phi[:, None].expand(batch, rows))
        torch.mul(ws["gsq"], phi.square()[:, None], out=ws["res"])
    _limiter_kernel[(batch,)](ws["res"], rows, limiter_norms[0], offsets[_LIM], ws["limit"], BLOCK=1024)
    # √scale multiplies the whole update: folded into the step size.
    coef = torch.stack([coef[:, 0] * math.sqrt(scale), coef[:, 1]], 1)
    _back_kernel[(triton.cdiv(rows, b["bm"]) * triton.cdiv(cols, b["bn"]), batch)](
        W, offsets[_W], W.stride(0), W.stride(1),
        G, offsets[_G], G.stride(0), G.stride(1),
        P, offsets[_P], P.stride(0), P.stride(1),
        ws["N"],
        R, offsets[_R], R.stride(0), R.stride(1),
        ws["phi"], ws["limit"],
        coef,
        rows, cols, 0,
        0.0,
        FIRA=True, DECAY=decay, DOT_DTYPE=_dot_dtype(G.dtype)[0], PRECISION=_dot_dtype(G.dtype)[1], ALIGNED=aligned,
        BLOCK_M=b["bm"], BLOCK_N=b["bn"], BLOCK_R=b["br"], GROUP_M=8, num_warps=b["warps"],
    )


def _apollo_impl(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps,
                 scale, tensor_wise, decay, backend):
    impl = _reference_apollo if backend == "reference" else _triton_apollo
    impl(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps, scale,
         tensor_wise, decay)


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


# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources):
# the one-parameter functions' arguments (the lists' elements), apollo_steps' lists; coef holds
# the step sizes computed from the step counts and lr.
_STATE = dict(weights="weight", exp_avgs="exp_avg", exp_avg_sqs="exp_avg_sq")
LAYOUT_SOURCES = _checks.layout_sources({
    "projected_adamw_step": {"projected_adamw_step": dict(**_STATE, grads="grad", projs="proj",
                                                          limiter_norms="limiter_norm", proj_grads="proj_grad",
                                                          coef=("step", "lr"))},
    "adamw_step": {"adamw_step": dict(**_STATE, grads="grad", coef=("step", "lr"))},
    "project_grad": {"project": dict(grad="grad", proj="proj")},
    "apollo_step": {"apollo_steps": dict(weights="weights", grads="grads", projs="projs", exp_avgs="exp_avgs",
                                         exp_avg_sqs="exp_avg_sqs", limiter_norms="limiter_norms",
                                         coef=("steps", "lr"))},
})


@_auto_backend.tuned("apollo_step", rows=(), mutates=True)
def apollo_steps(
    weights: Sequence[Tensor], grads: Sequence[Tensor], projs: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], limiter_norms: Sequence[Tensor], *, side: str, steps: Sequence[Tensor],
    lr: Union[float, Tensor], betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
    scale: float = 1.0, tensor_wise: bool = False, correct_bias: bool = True, backend: Optional[str] = None,
) -> None:
    """One APOLLO (``tensor_wise=False``) or APOLLO-Mini (``tensor_wise=True``) AdamW step of B
    parameters of one shape, dtype and layout, in place (math in the section comment above).

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
    batch = _batch_size(weights)
    grads, projs = _as_list("grads", grads, batch), _as_list("projs", projs, batch)
    exp_avgs, exp_avg_sqs = _as_list("exp_avgs", exp_avgs, batch), _as_list("exp_avg_sqs", exp_avg_sqs, batch)
    limiter_norms, steps = _as_list("limiter_norms", limiter_norms, batch), _as_list("steps", steps, batch)
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    for i, weight in enumerate(weights):
        sfx = "" if batch == 1 else f"[{i}]"
        _checks.check_float("weight" + sfx, weight, dtypes=_checks.KERNEL_DTYPES)
        _checks.check_no_overlap("weight" + sfx, weight)
        if weight.dim() != 2:
            raise ValueError(f"weight{sfx} must be 2-D, got shape {tuple(weight.shape)}")
        m, n = weight.shape
        proj = projs[i]
        _checks.check_float("proj" + sfx, proj, dtypes=(torch.float32,))
        rank = (proj.shape[0] if side == "right" else proj.shape[1]) if proj.dim() == 2 else 0
        if tuple(proj.shape) != ((rank, n) if side == "right" else (m, rank)) or not 1 <= rank <= min(m, n):
            raise ValueError(f"proj{sfx} must be (r, {n}) for side 'right' or ({m}, r) for side 'left' with "
                             f"1 <= r <= {min(m, n)}, got {tuple(proj.shape)} for side {side!r}")
        _check_moments(sfx, exp_avgs[i], exp_avg_sqs[i], projected_shape(weight.shape, rank, side))
        _check_grad(sfx, grads[i], weight)
        lim = limiter_norms[i]
        if not isinstance(lim, Tensor) or lim.dtype != torch.float32 or lim.numel() != 1:
            raise ValueError(f"limiter_norm{sfx} must be a 0-d float32 tensor")
        _check_step(sfx, steps[i])
        _checks.check_same_device("weight" + sfx, weight, grad=grads[i], proj=proj, exp_avg=exp_avgs[i],
                                  exp_avg_sq=exp_avg_sqs[i], step=steps[i], lr=lr, limiter_norm=lim)
    for name, role in (("weight", weights), ("grad", grads), ("proj", projs), ("exp_avg", exp_avgs),
                       ("exp_avg_sq", exp_avg_sqs)):
        _check_batch(name, role)
    _check_hyper(lr, betas, eps, weight_decay, scale)
    if scale < 0:
        raise ValueError(f"scale must be >= 0 (the update is multiplied by its square root), got {scale}")
    backend = _backend.resolve("apollo_step", backend, weight=weights[0])
    coef = step_coefficients(steps, lr, betas, weight_decay, correct_bias)
    args = (list(weights), grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, float(betas[0]),
            float(betas[1]), float(eps), float(scale), bool(tensor_wise), weight_decay != 0, backend)
    _backend.call_op(torch.ops.lowrank_kernels.apollo_step, _apollo_impl, *args)


PROJECTED_ADAMW = registry.declare(
    "projected_adamw_step", "GaLore/Fira: AdamW on the projected gradient, update projected back (in place)",
    library_ops=(torch.ops.lowrank_kernels.projected_adamw_step, torch.ops.lowrank_kernels.project_grad),
    reference=registry.Impl(registry.REFERENCE),
    triton=registry.Impl(registry.TRITON),
    cuda=registry.Impl(registry.CUDA),
)
ADAMW = registry.declare(
    "adamw_step", "AdamW on full-rank weights (in place), batched over a parameter list",
    library_ops=(torch.ops.lowrank_kernels.adamw_step,),
    reference=registry.Impl(registry.REFERENCE),
    triton=registry.Impl(registry.TRITON),
    cuda=registry.Impl(registry.CUDA),
)
APOLLO = registry.declare(
    "apollo_step", "APOLLO: AdamW moments in a random projection scale the full-rank gradient (in place)",
    library_ops=(torch.ops.lowrank_kernels.apollo_step,),
    reference=registry.Impl(registry.REFERENCE),
    triton=registry.Impl(registry.TRITON),
)
