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

Implementations, selected per call by ``backend`` (see lowrank_kernels.backend):
- reference: plain torch in the peers' order of operations (galore_torch.GaLoreAdamW,
  fira.FiraAdamW), the specification. It materialises back(N), back(R) and S like the peers.
- triton: four launches and no temporary of W's size (extra memory O(r·max(m, n))):
    1. projection GEMM R = G Pᵀ, with the channel energies ‖G_i‖² summed in the same pass (Fira);
    2. Adam on the projected moments (in place), N, and per channel φ_i and the residual energy
       φ_i² · ‖G_i − α·back(R)_i‖² = φ_i² · (‖G_i‖² − (2α − α²)‖R_i‖²), exact for an
       orthonormal P (every projector the package builds is one);
    3. one program sums the residual energies in a fixed order and updates the limiter on the
       device (no host synchronisation, no atomics: deterministic);
    4. back-projection GEMM of α·(N − (φ/l)·R) with (φ/l)·G, the step and the decay in its
       epilogue, writing W in place.
  A 'left' step runs the same kernels on the transposed views (Gᵀ, Wᵀ, Pᵀ, mᵀ, vᵀ).
- cuda: the same four kernels in csrc/projected_step.cu.

The step is an in-place update, not a differentiable function: there is no autograd.Function.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lowrank_kernels import backend as _backend
from lowrank_kernels.backend import interpreter_enabled, triton_available

SIDES = ("left", "right")
FIRA_EPS = 1e-8  # fira's constant in φ and in the limiter
LIMITER_GAMMA = 1.01  # fira's norm-growth bound per step
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool = True) -> float:
    """lr · √(1 − β2ᵗ) / (1 − β1ᵗ) as the peers compute it (Python floats), or lr without bias correction."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def projected_shape(shape, rank: int, side: str) -> tuple:
    """Shape of R (and of the moments) for a weight of ``shape`` projected on ``side``."""
    m, n = shape
    return (m, rank) if side == "right" else (rank, n)


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


def _apply_update(weight: Tensor, update: Tensor, step_size_: float, lr_wd: float) -> None:
    w = _at_least_fp32(weight)
    w.add_(update, alpha=-step_size_)
    if lr_wd != 0.0:
        w.add_(w, alpha=-lr_wd)
    if w is not weight:
        weight.copy_(w)


def _reference_projected(weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm, proj_grad,
                         side, step_size_, lr_wd, beta1, beta2, eps, scale, fira):
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
        norm = S.norm()
        # A negative stored norm means "no previous step"; then l = 1 exactly.
        limit = torch.where(
            limiter_norm >= 0,
            torch.clamp_min(norm / (limiter_norm + FIRA_EPS), LIMITER_GAMMA) / LIMITER_GAMMA,
            torch.ones_like(norm),
        )
        S = S / limit
        limiter_norm.copy_(norm / limit)
        update = update + S
    _apply_update(weight, update, step_size_, lr_wd)


def _reference_adamw(weight, grad, exp_avg, exp_avg_sq, step_size_, lr_wd, beta1, beta2, eps):
    g = _at_least_fp32(grad)
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    _apply_update(weight, exp_avg / exp_avg_sq.sqrt().add_(eps), step_size_, lr_wd)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

    @triton.jit
    def _project_kernel(
        # G (M, N) and P (R, N) as strided views: R = G Pᵀ
        G_ptr, stride_gm, stride_gn,
        P_ptr, stride_pr, stride_pn,
        # outputs: R (M, RANK) fp32, channel energies ‖G_i‖² (M,) fp32
        R_ptr, stride_rm, stride_rr,
        GSQ_ptr,
        M, N, RANK,
        NORMS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
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
                tl.store(GSQ_ptr + offs_m, gsq, mask=m_ok)

    @triton.jit
    def _moments_kernel(
        # R (M, RANK) fp32 (read), moments (M, RANK) fp32 (updated in place), N (M, RANK) fp32 (written)
        R_ptr, stride_rm, stride_rr,
        M1_ptr, stride_1m, stride_1r,
        M2_ptr, stride_2m, stride_2r,
        N_ptr, stride_nm, stride_nr,
        # Fira: channel energies of G (read), φ and residual energies (written), all (M,) fp32
        GSQ_ptr, PHI_ptr, RES_ptr,
        M, RANK,
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, resid_coef,
        FIRA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
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
            tl.store(N_ptr + offs_m[:, None] * stride_nm + offs_r[None, :] * stride_nr, n, mask=ok)
            if FIRA:
                nsq += tl.sum(n * n, axis=1)
                rsq += tl.sum(r * r, axis=1)
        if FIRA:
            phi = tl.div_rn(tl.sqrt_rn(nsq), tl.sqrt_rn(rsq) + 1e-8)
            gsq = tl.load(GSQ_ptr + offs_m, mask=m_ok, other=0.0)
            # ‖G_i − α·back(R)_i‖² for orthonormal P; clamped where rounding makes it negative.
            resid = tl.maximum(gsq - resid_coef * rsq, 0.0)
            tl.store(PHI_ptr + offs_m, phi, mask=m_ok)
            tl.store(RES_ptr + offs_m, phi * phi * resid, mask=m_ok)

    @triton.jit
    def _limiter_kernel(
        RES_ptr, M,
        # limiter state: previous ‖S‖ (negative: none yet), updated in place; l written to LIM_ptr
        PREV_ptr, LIM_ptr,
        BLOCK: tl.constexpr,
    ):
        # One program and a fixed summation order: the same bits on every run.
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK):
            offs = m0 + tl.arange(0, BLOCK)
            acc += tl.load(RES_ptr + offs, mask=offs < M, other=0.0)
        norm = tl.sqrt_rn(tl.sum(acc, axis=0))
        prev = tl.load(PREV_ptr)
        ratio = tl.div_rn(norm, prev + 1e-8)
        limit = tl.where(prev >= 0.0, tl.div_rn(tl.maximum(ratio, 1.01), 1.01), 1.0)
        tl.store(PREV_ptr, tl.div_rn(norm, limit))
        tl.store(LIM_ptr, limit)

    @triton.jit
    def _back_kernel(
        # W (M, N) updated in place; G (M, N) read for Fira; P (RANK, N)
        W_ptr, stride_wm, stride_wn,
        G_ptr, stride_gm, stride_gn,
        P_ptr, stride_pr, stride_pn,
        # N and R (M, RANK) fp32; φ (M,) and the limiter l (1,) for Fira
        N_ptr, stride_nm, stride_nr,
        R_ptr, stride_rm, stride_rr,
        PHI_ptr, LIM_ptr,
        M, N, RANK,
        scale, step_size, lr_wd,
        FIRA: tl.constexpr, DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Grouped ordering: programs sharing a row panel of N (and R) run together.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_n
        first_m = (pid // group_size) * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_in_group
        pid_n = (pid % group_size) // rows_in_group
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = offs_m < M
        n_ok = offs_n < N
        tile = m_ok[:, None] & n_ok[None, :]

        if FIRA:
            c = tl.load(PHI_ptr + offs_m, mask=m_ok, other=0.0) / tl.load(LIM_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            ok = m_ok[:, None] & (offs_r[None, :] < RANK)
            z = tl.load(N_ptr + offs_m[:, None] * stride_nm + offs_r[None, :] * stride_nr, mask=ok, other=0.0)
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
            w = w - lr_wd * w
        tl.store(w_ptrs, w.to(W_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _adamw_kernel(
        # flat contiguous W, G (W's or any float dtype), fp32 moments, all of numel elements
        W_ptr, G_ptr, M1_ptr, M2_ptr, numel,
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, lr_wd,
        DECAY: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        g = tl.load(G_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m1 = tl.load(M1_ptr + offs, mask=ok, other=0.0) * beta1 + one_minus_beta1 * g
        m2 = tl.load(M2_ptr + offs, mask=ok, other=0.0) * beta2 + one_minus_beta2 * (g * g)
        tl.store(M1_ptr + offs, m1, mask=ok)
        tl.store(M2_ptr + offs, m2, mask=ok)
        w = tl.load(W_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w = w - step_size * tl.div_rn(m1, tl.sqrt_rn(m2) + eps)
        if DECAY:
            w = w - lr_wd * w
        tl.store(W_ptr + offs, w.to(W_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Triton launchers. Callers validate; these allocate the O(r·max(m, n)) workspace and launch.
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


def _blocks(rank: int):
    interp = interpreter_enabled()
    block_r = min(16 if interp else 64, max(16, triton.next_power_of_2(rank)))
    if interp:
        return dict(bm=16, bn=32, br=block_r, proj_br=max(16, min(32, triton.next_power_of_2(rank))), warps=4)
    # 64 x 128 fp32 accumulators: 8 warps keep them in registers without spilling.
    return dict(bm=64, bn=128, br=block_r, proj_br=max(16, min(128, triton.next_power_of_2(rank))), warps=8)


def allocate_workspace(rows: int, rank: int, device, fira: bool):
    """The step's scratch: R and N (rows, rank) fp32, and (rows,) fp32 vectors for Fira.

    ``rows`` is m for side 'right' and n for side 'left'. Tests pass a NaN-filled one to check
    that every value is written before it is read.
    """
    ws = {
        "R": torch.empty((rows, rank), device=device, dtype=torch.float32),
        "N": torch.empty((rows, rank), device=device, dtype=torch.float32),
    }
    if fira:
        ws["gsq"] = torch.empty(rows, device=device, dtype=torch.float32)
        ws["phi"] = torch.empty(rows, device=device, dtype=torch.float32)
        ws["res"] = torch.empty(rows, device=device, dtype=torch.float32)
        ws["limit"] = torch.empty(1, device=device, dtype=torch.float32)
    return ws


def _triton_project(G, P, R, gsq, norms):
    M, Ncols = G.shape
    rank = P.shape[0]
    b = _blocks(rank)
    dot_dtype, precision = _dot_dtype(G.dtype)
    grid = (triton.cdiv(M, b["bm"]), triton.cdiv(rank, b["proj_br"]))
    _project_kernel[grid](
        G, G.stride(0), G.stride(1),
        P, P.stride(0), P.stride(1),
        R, R.stride(0), R.stride(1),
        gsq if norms else R,
        M, Ncols, rank,
        NORMS=norms, DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_M=b["bm"], BLOCK_N=b["bn"], BLOCK_R=b["proj_br"], num_warps=b["warps"],
    )


def project_triton(grad: Tensor, proj: Tensor, side: str, out: Optional[Tensor] = None) -> Tensor:
    """R in fp32 (R's shape for ``side``), by the projection kernel alone (used to accumulate)."""
    G = grad if side == "right" else grad.t()
    P = proj if side == "right" else proj.t()
    shape = projected_shape(grad.shape, P.shape[0], side)
    if out is None:
        out = torch.empty(shape, device=grad.device, dtype=torch.float32)
    _triton_project(G, P, out if side == "right" else out.t(), None, norms=False)
    return out


def _triton_projected(weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm, proj_grad,
                      side, step_size_, lr_wd, beta1, beta2, eps, scale, fira, workspace=None):
    W, G, P, M1, M2 = _canonical(side, weight, grad, proj, exp_avg, exp_avg_sq)
    rows, cols = W.shape
    rank = P.shape[0]
    ws = workspace or allocate_workspace(rows, rank, weight.device, fira)
    b = _blocks(rank)
    if proj_grad is None:
        _triton_project(G, P, ws["R"], ws.get("gsq"), norms=fira)
        R = ws["R"]
    else:
        R = proj_grad if side == "right" else proj_grad.t()
    Nbuf = ws["N"]
    _moments_kernel[(triton.cdiv(rows, b["bm"]),)](
        R, R.stride(0), R.stride(1),
        M1, M1.stride(0), M1.stride(1),
        M2, M2.stride(0), M2.stride(1),
        Nbuf, Nbuf.stride(0), Nbuf.stride(1),
        ws.get("gsq", Nbuf), ws.get("phi", Nbuf), ws.get("res", Nbuf),
        rows, rank,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, 2.0 * scale - scale * scale,
        FIRA=fira, BLOCK_M=b["bm"], BLOCK_R=b["br"],
    )
    if fira:
        _limiter_kernel[(1,)](ws["res"], rows, limiter_norm, ws["limit"], BLOCK=1024)
    dot_dtype, precision = _dot_dtype(weight.dtype if G is None else G.dtype)
    grid = (triton.cdiv(rows, b["bm"]) * triton.cdiv(cols, b["bn"]),)
    Gp = G if fira else W
    _back_kernel[grid](
        W, W.stride(0), W.stride(1),
        Gp, Gp.stride(0), Gp.stride(1),
        P, P.stride(0), P.stride(1),
        Nbuf, Nbuf.stride(0), Nbuf.stride(1),
        R, R.stride(0), R.stride(1),
        ws.get("phi", Nbuf), ws.get("limit", Nbuf),
        rows, cols, rank,
        float(scale), float(step_size_), float(lr_wd),
        FIRA=fira, DECAY=lr_wd != 0.0, DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_M=b["bm"], BLOCK_N=b["bn"], BLOCK_R=b["br"], GROUP_M=8, num_warps=b["warps"],
    )


def _triton_adamw(weight, grad, exp_avg, exp_avg_sq, step_size_, lr_wd, beta1, beta2, eps):
    # The flat kernel needs one layout for all four; copies happen only for exotic strides.
    w = weight if weight.is_contiguous() else weight.contiguous()
    g = grad if grad.is_contiguous() else grad.contiguous()
    numel = w.numel()
    block = 1024
    _adamw_kernel[(triton.cdiv(numel, block),)](
        w, g, exp_avg, exp_avg_sq, numel,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, float(step_size_), float(lr_wd),
        DECAY=lr_wd != 0.0, BLOCK=block,
    )
    if w is not weight:
        weight.copy_(w)


# ----------------------------------------------------------------------------------------------
# CUDA launchers (csrc/projected_step.cu, csrc/bindings.cpp)
# ----------------------------------------------------------------------------------------------
def _cuda_projected(weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm, proj_grad,
                    side, step_size_, lr_wd, beta1, beta2, eps, scale, fira, workspace=None):
    W, G, P, M1, M2 = _canonical(side, weight, grad, proj, exp_avg, exp_avg_sq)
    rows = W.shape[0]
    ws = workspace or allocate_workspace(rows, P.shape[0], weight.device, fira)
    R = None if proj_grad is None else (proj_grad if side == "right" else proj_grad.t())
    _backend.cuda_extension().projected_step(
        W, G, P, M1, M2, R, ws["R"], ws["N"], ws.get("gsq"), ws.get("phi"), ws.get("res"),
        ws.get("limit"), limiter_norm, fira, float(step_size_), float(lr_wd), float(beta1),
        float(beta2), float(eps), float(scale),
    )


def _cuda_adamw(weight, grad, exp_avg, exp_avg_sq, step_size_, lr_wd, beta1, beta2, eps):
    w = weight if weight.is_contiguous() else weight.contiguous()
    g = grad if grad.is_contiguous() else grad.contiguous()
    _backend.cuda_extension().adamw_step(
        w, g, exp_avg, exp_avg_sq, float(step_size_), float(lr_wd), float(beta1), float(beta2), float(eps)
    )
    if w is not weight:
        weight.copy_(w)


# ----------------------------------------------------------------------------------------------
# torch.library ops (in-place, so torch.compile keeps them whole)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "lowrank_kernels::projected_adamw_step",
    mutates_args=("weight", "exp_avg", "exp_avg_sq", "limiter_norm"),
)
def _projected_op(
    weight: Tensor, grad: Optional[Tensor], proj: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
    limiter_norm: Optional[Tensor], proj_grad: Optional[Tensor], side: str, step_size: float,
    lr_wd: float, beta1: float, beta2: float, eps: float, scale: float, fira: bool, backend: str,
) -> None:
    impl = {"reference": _reference_projected, "triton": _triton_projected, "cuda": _cuda_projected}[backend]
    impl(weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm, proj_grad,
         side, step_size, lr_wd, beta1, beta2, eps, scale, fira)


@_projected_op.register_fake
def _(weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm, proj_grad, side, step_size, lr_wd,
      beta1, beta2, eps, scale, fira, backend):
    return None


@torch.library.custom_op("lowrank_kernels::adamw_step", mutates_args=("weight", "exp_avg", "exp_avg_sq"))
def _adamw_op(
    weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: float,
    lr_wd: float, beta1: float, beta2: float, eps: float, backend: str,
) -> None:
    impl = {"reference": _reference_adamw, "triton": _triton_adamw, "cuda": _cuda_adamw}[backend]
    impl(weight, grad, exp_avg, exp_avg_sq, step_size, lr_wd, beta1, beta2, eps)


@_adamw_op.register_fake
def _(weight, grad, exp_avg, exp_avg_sq, step_size, lr_wd, beta1, beta2, eps, backend):
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
def _check_float(name: str, t, dtypes=_FLOAT_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_hyper(lr, betas, eps, weight_decay, scale=None):
    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)) + ((("scale", scale),) if scale is not None else ()):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")


def _check_same_device(ref_name: str, ref: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must share one device")


def _check_moments(weight, exp_avg, exp_avg_sq, shape):
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_float(name, t, (torch.float32,))
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def projected_adamw_step(
    weight: Tensor, grad: Optional[Tensor], proj: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
    side: str, step: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
    scale: float = 1.0, fira: bool = False, limiter_norm: Optional[Tensor] = None,
    correct_bias: bool = True, proj_grad: Optional[Tensor] = None, backend: Optional[str] = None,
) -> None:
    """One GaLore (``fira=False``) or Fira (``fira=True``) AdamW step, in place.

    Args:
        weight: (m, n) float32/float16/bfloat16 parameter, updated in place (any strides).
        grad: (m, n) gradient, weight's dtype. May be None for GaLore when ``proj_grad`` is given.
        proj: orthonormal projector, fp32: (r, n) for side 'right', (m, r) for side 'left'.
        exp_avg, exp_avg_sq: fp32 moments of R's shape, (m, r) or (r, n); updated in place.
        side: 'right' (R = G Pᵀ) or 'left' (R = Pᵀ G).
        step: the step count t >= 1 after its increment (for the bias corrections).
        lr, betas, eps, weight_decay: transformers-style AdamW hyper-parameters.
        scale: α (galore-torch's ``scale``, fira's ``alpha``).
        fira: add Fira's scaled residual and its norm-growth limiter.
        limiter_norm: Fira only: 0-d fp32 tensor holding the previous ‖S‖ (negative: none yet),
            updated in place on the device.
        correct_bias: the peers' bias correction switch.
        proj_grad: GaLore only: an already projected (accumulated) gradient R, fp32, used instead
            of projecting ``grad``.
        backend: None, 'reference', 'triton' or 'cuda'.
    """
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    _check_float("proj", proj, (torch.float32,))
    m, n = weight.shape
    if proj.dim() != 2:
        raise ValueError(f"proj must be 2-D, got shape {tuple(proj.shape)}")
    rank = proj.shape[0] if side == "right" else proj.shape[1]
    expected = (rank, n) if side == "right" else (m, rank)
    if tuple(proj.shape) != expected or not 1 <= rank <= min(m, n):
        raise ValueError(
            f"proj must be (r, n) = (r, {n}) for side 'right' or (m, r) = ({m}, r) for side 'left' "
            f"with 1 <= r <= {min(m, n)}, got {tuple(proj.shape)} for side {side!r}"
        )
    rshape = projected_shape(weight.shape, rank, side)
    _check_moments(weight, exp_avg, exp_avg_sq, rshape)
    if grad is None:
        if proj_grad is None:
            raise ValueError("grad may be None only when proj_grad is given")
        if fira:
            raise ValueError("fira=True needs the full grad (the residual G − α·back(R)); proj_grad alone is not enough")
    else:
        _check_float("grad", grad)
        if grad.shape != weight.shape:
            raise ValueError(f"grad must have weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}")
        if grad.dtype != weight.dtype:
            raise TypeError(f"grad dtype {grad.dtype} must equal weight dtype {weight.dtype}")
    if proj_grad is not None:
        _check_float("proj_grad", proj_grad, (torch.float32,))
        if tuple(proj_grad.shape) != rshape:
            raise ValueError(f"proj_grad must have shape {rshape}, got {tuple(proj_grad.shape)}")
    if fira:
        if not isinstance(limiter_norm, Tensor) or limiter_norm.dtype != torch.float32 or limiter_norm.numel() != 1:
            raise ValueError("limiter_norm must be a 0-d float32 tensor when fira=True")
    elif limiter_norm is not None:
        raise ValueError("limiter_norm is used only with fira=True")
    _check_hyper(lr, betas, eps, weight_decay, scale)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the count after its increment), got {step!r}")
    _check_same_device("weight", weight, grad=grad, proj=proj, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                       limiter_norm=limiter_norm, proj_grad=proj_grad)
    backend = _backend.resolve("projected_adamw_step", backend, weight)
    beta1, beta2 = float(betas[0]), float(betas[1])
    torch.ops.lowrank_kernels.projected_adamw_step(
        weight, grad, proj, exp_avg, exp_avg_sq, limiter_norm, proj_grad, side,
        step_size(lr, beta1, beta2, step, correct_bias), float(lr) * float(weight_decay),
        beta1, beta2, float(eps), float(scale), bool(fira), backend,
    )


def adamw_step(
    weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, lr: float,
    betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
    backend: Optional[str] = None,
) -> None:
    """One transformers-style AdamW step on a tensor of any shape, in place, fp32 moments.

    m = β1 m + (1−β1) g; v = β2 v + (1−β2) g²; W −= step_size · m / (√v + eps); W −= lr·wd·W,
    with step_size = lr·√(1−β2ᵗ)/(1−β1ᵗ) (eps not bias-corrected, decay after the update).
    """
    _check_float("weight", weight)
    _check_float("grad", grad)
    if grad.shape != weight.shape:
        raise ValueError(f"grad must have weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}")
    _check_moments(weight, exp_avg, exp_avg_sq, weight.shape)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_hyper(lr, betas, eps, weight_decay)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the count after its increment), got {step!r}")
    _check_same_device("weight", weight, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    backend = _backend.resolve("adamw_step", backend, weight)
    beta1, beta2 = float(betas[0]), float(betas[1])
    torch.ops.lowrank_kernels.adamw_step(
        weight, grad, exp_avg, exp_avg_sq, step_size(lr, beta1, beta2, step, correct_bias),
        float(lr) * float(weight_decay), beta1, beta2, float(eps), backend,
    )


def project(grad: Tensor, proj: Tensor, side: str, backend: Optional[str] = None) -> Tensor:
    """The projected gradient R (fp32): G Pᵀ for side 'right', Pᵀ G for side 'left'."""
    _check_float("grad", grad)
    _check_float("proj", proj, (torch.float32,))
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if grad.dim() != 2 or proj.dim() != 2:
        raise ValueError("grad and proj must be 2-D")
    if (side == "right" and proj.shape[1] != grad.shape[1]) or (side == "left" and proj.shape[0] != grad.shape[0]):
        raise ValueError(f"proj {tuple(proj.shape)} does not fit grad {tuple(grad.shape)} for side {side!r}")
    _check_same_device("grad", grad, proj=proj)
    backend = _backend.resolve("projected_adamw_step", backend, grad)
    return torch.ops.lowrank_kernels.project_grad(grad, proj, side, backend)
