"""The GaLore / Fira / AdamW / APOLLO steps' shared machinery: step coefficients, offset tables,
the reference math the steps share, the Triton kernels and their launchers, the CUDA launchers.

The ops and their math: lowrank_kernels.ops.projected_step (GaLore / Fira projected AdamW, plain
AdamW) and lowrank_kernels.ops.apollo_step (APOLLO, APOLLO-Mini). The launchers here assume their
arguments validated by those entry points.

Batching: the ``*_steps`` entry points take B parameters of one shape, dtype and layout and run
each kernel once for all of them, a grid axis over the batch. The B tensors of each role (W, G,
P, moments, ...) are separate allocations; a small int64 table holds each one's element offset
from the first (``offset_table``), the kernels add it to the first one's pointer. Every batch
element is computed exactly as it would be alone, so a batched trajectory is bit-identical to
per-parameter steps.

The Triton projected step: four launches per batch and no temporary of W's size (extra memory
O(B·r·max(m, n))):
    1. projection GEMM R = G Pᵀ, with the channel energies ‖G_i‖² summed in the same pass (Fira);
    2. Adam on the projected moments (in place), N, and per channel φ_i and the residual energy
       φ_i² · ‖G_i − α·back(R)_i‖² = φ_i² · (‖G_i‖² − (2α − α²)‖R_i‖²), exact for an
       orthonormal P (every projector the package builds is one);
    3. one program per parameter sums its residual energies in a fixed order and updates the
       limiter on the device (no host synchronisation, no atomics: deterministic);
    4. back-projection GEMM of α·(N − (φ/l)·R) with (φ/l)·G, the step and the decay in its
       epilogue, writing W in place.
A 'left' step runs the same kernels on the transposed views (Gᵀ, Wᵀ, Pᵀ, mᵀ, vᵀ). The CUDA
extension runs the same four kernels (csrc/projected_step.cu). APOLLO runs the Fira kernels with
the residual's α set to 0 and no back-projection GEMM (``triton_apollo``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lowrank_kernels import backend as _backend
from lowrank_kernels.backend import tile_arch, triton_available
from lowrank_kernels.ops import gemm

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
                        raise ValueError("tensors batched into one launch must lie at multiples of their element "
                                         "size apart")
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


def _vectorised(aligned: bool, *tensors) -> bool:
    """Whether a launch on ``tensors`` keeps its loads vectorised: ``aligned`` (see _aligned16) and
    every size and stride of theirs other than 1 a multiple of 16, as Triton's binder marks them.
    Otherwise each load is scalar, with a 64-bit pointer each: more registers per tile."""
    return aligned and all(d % 16 == 0 for t in tensors if t is not None for d in (*t.shape, *t.stride()) if d != 1)


# ----------------------------------------------------------------------------------------------
# Reference math shared by the steps (plain torch)
# ----------------------------------------------------------------------------------------------
def at_least_fp32(t: Tensor) -> Tensor:
    # fp32 math for every storage dtype; float64 stays float64 (the tests' exact reference).
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def project_reference(grad: Tensor, proj: Tensor, side: str) -> Tensor:
    """R = G Pᵀ (side 'right') or Pᵀ G (side 'left'), in fp32 (float64 for float64 inputs)."""
    g = at_least_fp32(grad)
    return g @ proj.t() if side == "right" else proj.t() @ g


def moments_reference(g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1, beta2, eps) -> Tensor:
    """Adam's moments of ``g`` updated in place; returns N = m / (√v + eps)."""
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def channel_scale_reference(N: Tensor, R: Tensor, side: str) -> Tensor:
    """Fira's φ_i = ‖N_i‖ / (‖R_i‖ + 1e-8) per channel (rows of (m, r), columns of (r, n)), shaped
    to scale G's channels."""
    dim = 1 if side == "right" else 0
    phi = N.norm(dim=dim) / (R.norm(dim=dim) + FIRA_EPS)
    return phi.unsqueeze(1) if side == "right" else phi


def apply_update(weight: Tensor, update: Tensor, coef: Tensor, decay: bool) -> None:
    # addcmul with the 0-d coefficient rounds like the peers' add_(x, alpha=-step_size): one fused
    # multiply-add, so the reference keeps their bits.
    w = at_least_fp32(weight)
    w.addcmul_(update, coef[0], value=-1.0)
    if decay:
        w.addcmul_(w, coef[1], value=-1.0)
    if w is not weight:
        weight.copy_(w)


def limit_reference(norm: Tensor, limiter_norm: Tensor) -> Tensor:
    """Fira's norm-growth limiter l for a scaled residual of norm ``norm``, the stored previous
    norm ``limiter_norm`` updated in place to norm / l."""
    # A negative stored norm means "no previous step"; then l = 1 exactly.
    limit = torch.where(
        limiter_norm >= 0,
        torch.clamp_min(norm / (limiter_norm + FIRA_EPS), LIMITER_GAMMA) / LIMITER_GAMMA,
        torch.ones_like(norm),
    )
    limiter_norm.copy_(norm / limit)
    return limit


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


def _blocks(rank: int, device, dtype, vectorised: bool = True):
    """The steps' tiles; ``vectorised`` as _vectorised says of the launch (Fira's kernels on scalar
    loads take smaller ones: see _triton_moments and _triton_back)."""
    interp = tile_arch(device) is None
    block_r = min(16 if interp else 64, max(16, triton.next_power_of_2(rank)))
    if interp:
        return dict(bm=16, bn=32, proj_bn=32, br=block_r, proj_br=max(16, min(32, triton.next_power_of_2(rank))),
                    warps=4, vectorised=vectorised)
    # 64 x 128 fp32 accumulators: 8 warps keep them in registers without spilling. An fp32 IEEE
    # projection runs on FMA units with its operands in registers: narrower tiles, or it spills.
    fma = dtype == torch.float32 and _dot_dtype(dtype)[1] == "ieee"
    return dict(bm=64, bn=128, proj_bn=32 if fma else 128, br=block_r,
                proj_br=max(16, min(32 if fma else 128, triton.next_power_of_2(rank))), warps=8,
                vectorised=vectorised)


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


def _triton_moments(R, M1, M2, offsets, ws, beta1, beta2, eps, resid_coef, fira, aligned, b):
    """Step 2 on R (rows, rank): the moments in place, N, and with ``fira`` φ and the residual
    energies ‖G_i‖² − resid_coef·‖R_i‖², scaled by φ_i², into the workspace ``ws``."""
    rows, rank = R.shape
    batch = offsets.shape[1]
    # Fira's row sums on scalar loads: half the rows, or the tile spills (sm_80).
    bm = b["bm"] // 2 if fira and not b["vectorised"] else b["bm"]
    _moments_kernel[(triton.cdiv(rows, bm), batch)](
        R, offsets[_R], R.stride(0), R.stride(1),
        M1, offsets[_M1], M1.stride(0), M1.stride(1),
        M2, offsets[_M2], M2.stride(0), M2.stride(1),
        ws["N"],
        ws.get("gsq", ws["N"]), ws.get("phi", ws["N"]), ws.get("res", ws["N"]),
        rows, rank,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, resid_coef,
        FIRA=fira, ALIGNED=aligned, BLOCK_M=bm, BLOCK_R=b["br"],
    )


def _triton_back(W, G, P, R, offsets, ws, coef, rank, scale, fira, decay, dot_dtype, precision, aligned, b):
    """Step 4 on W (rows, cols): the back-projection GEMM of ``rank`` columns (0: none, W's update
    from G alone) with the step and the decay in its epilogue, W written in place."""
    rows, cols = W.shape
    batch = offsets.shape[1]
    # An fp32 IEEE product (FMA, operands in registers) beside Fira's G tile, on scalar loads: half
    # the columns in one stage, or the tile spills (sm_80, sm_90a).
    narrow = fira and not b["vectorised"] and dot_dtype == tl.float32 and precision == "ieee"
    bn, stages = (b["bn"] // 2, 1) if narrow else (b["bn"], 3)
    _back_kernel[(triton.cdiv(rows, b["bm"]) * triton.cdiv(cols, bn), batch)](
        W, offsets[_W], W.stride(0), W.stride(1),
        G, offsets[_G], G.stride(0), G.stride(1),
        P, offsets[_P], P.stride(0), P.stride(1),
        ws["N"],
        R, offsets[_R], R.stride(0), R.stride(1),
        ws.get("phi", ws["N"]), ws.get("limit", ws["N"]),
        coef,
        rows, cols, rank,
        scale,
        FIRA=fira, DECAY=decay, DOT_DTYPE=dot_dtype, PRECISION=precision, ALIGNED=aligned,
        BLOCK_M=b["bm"], BLOCK_N=bn, BLOCK_R=b["br"], GROUP_M=8, num_warps=b["warps"], num_stages=stages,
    )


def triton_projected(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
                     side, beta1, beta2, eps, scale, fira, decay, workspace=None):
    batch = len(weights)
    offsets = _projected_offsets(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads)
    W, G, P, M1, M2 = _canonical(side, weights[0], grads[0], projs[0], exp_avgs[0], exp_avg_sqs[0])
    rows, rank = W.shape[0], P.shape[0]
    ws = workspace or allocate_workspace(batch, rows, rank, W.device, fira)
    aligned = _aligned16((weights, grads if grads[0] is not None else None, projs, exp_avgs, exp_avg_sqs, proj_grads),
                         0 if proj_grads else 4 * rows * rank)
    b = _blocks(rank, W.device, W.dtype, _vectorised(aligned, W, G))
    if proj_grads:
        R = proj_grads[0] if side == "right" else proj_grads[0].t()
    else:
        R = ws["R"][0]
        _triton_project(G, offsets[_G], P, offsets[_P], R, offsets[_R], ws.get("gsq"), batch, norms=fira,
                        aligned=aligned)
    _triton_moments(R, M1, M2, offsets, ws, beta1, beta2, eps, 2.0 * scale - scale * scale, fira, aligned, b)
    if fira:
        _limiter_kernel[(batch,)](ws["res"], rows, limiter_norms[0], offsets[_LIM], ws["limit"], BLOCK=1024)
    dot_dtype, precision = _dot_dtype(W.dtype if G is None else G.dtype)
    _triton_back(W, G if fira else W, P, R, offsets, ws, coef, rank, float(scale), fira, decay, dot_dtype, precision,
                 aligned, b)


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


def triton_adamw(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay):
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


# APOLLO: the projection kernel's channel energies ‖G_i‖² give ‖S‖² = Σ φ_i² ‖G_i‖² exactly (the
# moments kernel's residual energy with resid_coef = 2α − α² = 0 needs no orthonormal P), and the
# back kernel launched with RANK = 0 skips its GEMM: its epilogue alone writes W − c·(φ_i/l)·G.
def triton_apollo(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, coef, side, beta1, beta2, eps,
                  scale, tensor_wise, decay, workspace=None):
    batch = len(weights)
    offsets = _projected_offsets(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, [])
    W, G, P, M1, M2 = _canonical(side, weights[0], grads[0], projs[0], exp_avgs[0], exp_avg_sqs[0])
    rows, rank = W.shape[0], P.shape[0]
    ws = workspace or allocate_workspace(batch, rows, rank, W.device, fira=True)
    aligned = _aligned16((weights, grads, projs, exp_avgs, exp_avg_sqs), 4 * rows * rank)
    b = _blocks(rank, W.device, W.dtype, _vectorised(aligned, W, G))
    R = ws["R"][0]
    _triton_project(G, offsets[_G], P, offsets[_P], R, offsets[_R], ws["gsq"], batch, norms=True, aligned=aligned)
    _triton_moments(R, M1, M2, offsets, ws, beta1, beta2, eps, 0.0, True, aligned, b)
    if tensor_wise:
        # One φ per parameter from the totals: B·rows·rank values (rank 1 for APOLLO-Mini).
        phi = ws["N"].square().sum((1, 2)).sqrt() / (ws["R"].square().sum((1, 2)).sqrt() + FIRA_EPS)
        ws["phi"].copy_(phi[:, None].expand(batch, rows))
        torch.mul(ws["gsq"], phi.square()[:, None], out=ws["res"])
    _limiter_kernel[(batch,)](ws["res"], rows, limiter_norms[0], offsets[_LIM], ws["limit"], BLOCK=1024)
    # √scale multiplies the whole update: folded into the step size.
    coef = torch.stack([coef[:, 0] * math.sqrt(scale), coef[:, 1]], 1)
    # RANK = 0: the GEMM never runs, but is compiled: for fp32 as tf32 (tensor cores), since as an
    # IEEE dot on FMA units its operands held in registers made a variant spill on sm_90a.
    dot_dtype, precision = _dot_dtype(G.dtype)
    _triton_back(W, G, P, R, offsets, ws, coef, 0, 0.0, True, decay, dot_dtype,
                 "tf32" if G.dtype == torch.float32 else precision, aligned, b)


# ----------------------------------------------------------------------------------------------
# CUDA launchers (csrc/projected_step.cu, csrc/projected_step_binding.cpp)
# ----------------------------------------------------------------------------------------------
def cuda_projected(weights, grads, projs, exp_avgs, exp_avg_sqs, limiter_norms, proj_grads, coef,
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


def cuda_adamw(weights, grads, exp_avgs, exp_avg_sqs, coef, beta1, beta2, eps, decay):
    flat_w, flat_g, offsets = _flat(weights, grads, exp_avgs, exp_avg_sqs)
    _backend.cuda_extension().adamw_step(
        flat_w[0], flat_g[0], exp_avgs[0], exp_avg_sqs[0], offsets, coef, float(beta1), float(beta2), float(eps), decay
    )
    _copy_back(weights, flat_w)


def project_cuda(grad: Tensor, proj: Tensor, side: str) -> Tensor:
    """R in fp32 (R's shape for ``side``), by the CUDA extension's projection kernel."""
    G = grad if side == "right" else grad.t()
    P = proj if side == "right" else proj.t()
    out = torch.empty(projected_shape(grad.shape, P.shape[0], side), device=grad.device, dtype=torch.float32)
    _backend.cuda_extension().projected_step_project(G, P, out if side == "right" else out.t())
    return out

