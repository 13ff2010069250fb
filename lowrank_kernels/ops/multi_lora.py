"""Multi-adapter LoRA linear: many LoRA adapters (or a mixture of them) in one batch.

Shapes (x flattened to (M, K) over its leading dims): weight W (N, K), bias (N), a stack of n
adapters lora_A (n, r, K) and lora_B (n, N, r) (PEFT's ``lora_A.weight`` / ``lora_B.weight`` of
each adapter, stacked), per-adapter ranks ρ_a <= r (the padded rows of A_a and columns of B_a are
ignored) and scales s_a. Each token m has k slots (k = 1 without a mixture): adapters a_mj in
[-1, n) with weights w_mj (1 without a mixture); a_mj = -1 means no adapter in that slot.

Forward, with h_mj = drop(x_m) A_aᵀ (ρ_a values per slot, kept for backward) and c_mj = s_a·w_mj:
    y_m = x_m Wᵀ + bias + Σ_j c_mj · h_mj B_aᵀ                       a = a_mj
Backward, with g_mj = dy_m B_a and drop' the forward's mask and 1/(1-p) scale:
    dx_m  = dy_m W + Σ_j c_mj · drop'(g_mj A_a)
    dA_a  = Σ_{(m,j): a_mj = a} c_mj · g_mjᵀ drop(x_m)     dB_a = Σ_{(m,j): a_mj = a} c_mj · dy_mᵀ h_mj
    dc_mj = g_mj · h_mj  (so dw_mj = s_a · g_mj · h_mj, and ds_a = Σ w_mj · g_mj · h_mj)
Tokens of adapter a reach only adapter a's gradients. One dropout mask per token (shared by its
slots), drawn from (seed, token, feature) with the package's counter-based RNG (ops/_rng.py).

Implementations, selected per call by ``backend``:
- reference: plain torch, a loop over adapters: the specification (float64-checkable).
- triton: the slots are grouped by adapter once per call (a stable sort of the adapter ids and
  a searchsorted of the segment bounds, no host synchronisation), kept for backward. Forward:
  a segmented down-projection h (each tile of sorted slots loops over the few adapters it holds,
  reading only those adapters' A), then one GEMM pass per output tile: the low-rank term of every
  adapter present in the tile as extra K-steps of the base GEMM's accumulator, rows gathered in
  sorted order, bias in the epilogue: no (M, N) temporary. Backward: g = dy B by the same
  segmented down-projection, dx by the same fused GEMM (the tail masked by dropout), dA and dB
  as segmented reductions over each adapter's slots (fp32 partials summed in a fixed order: no
  atomics, bit-reproducible). Decode (at most DECODE_SLOTS slots, no gradient): no sort; a
  BGMV-style kernel (one program per slot and rank block, its adapter's A read as a matrix-vector
  product) and the fused GEMM over rows in arrival order.
- cuda: cuBLAS (through ATen) for x Wᵀ + bias and dy W, csrc/multi_lora.cu's segmented tensor-core
  kernels (csrc/tiles.cuh) for the rank-space products, which accumulate onto those outputs.

Validation. Shapes, dtypes and devices are checked on every call. The values of adapter_index and
ranks are checked (ValueError) in eager mode when those tensors are on the CPU, or on every device
when the environment variable LOWRANK_KERNELS_CHECK_INDEX=1 is set: reading them from a GPU would
cost a device synchronisation per call. Unchecked, an index outside [-1, n) acts as -1 (base only) in
every backend, and ranks are clamped to [0, r]: never an out-of-bounds read.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _checks, _rng, gemm, tile_config

CHECK_ENV = "LOWRANK_KERNELS_CHECK_INDEX"
# Up to this many (token, slot) pairs a forward without gradient skips the grouping sort.
DECODE_SLOTS = 128


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
def _h_dtype(lora_A: Tensor) -> torch.dtype:
    """h, g and the slot coefficients are fp32 (float64 for float64 adapters)."""
    return torch.promote_types(lora_A.dtype, torch.float32)


def _slots_of(key: Tensor, a: int) -> Tensor:
    return (key.reshape(-1) == a).nonzero().squeeze(1)


def _reference_forward(x2, weight, lora_A, lora_B, bias, key, coef, ranks, p, seed):
    """(y, h): differentiable in every tensor argument. key (M, k) holds n for empty slots,
    coef (M, k) the slot coefficients c = s·w, ranks a list of ints."""
    M, K = x2.shape
    kslots = key.shape[1]
    R, adt = lora_A.shape[1], lora_A.dtype
    xd = _rng.dropped(x2, _rng.keep_mask(seed, p, M, K, x2.device), p, adt)
    y = F.linear(x2, weight, bias)
    lora = x2.new_zeros((M, weight.shape[0]), dtype=adt)
    h = x2.new_zeros((key.numel(), R), dtype=_h_dtype(lora_A))
    cflat = coef.reshape(-1)
    for a, ra in enumerate(ranks):
        slots = _slots_of(key, a)
        if slots.numel() == 0 or ra == 0:
            continue
        toks = slots // kslots
        h_a = xd[toks] @ lora_A[a, :ra].t()
        h = h.index_put((slots,), F.pad(h_a.to(h.dtype), (0, R - ra)))
        lora = lora.index_add(0, toks, (h_a @ lora_B[a, :, :ra].t()) * cflat[slots, None].to(adt))
    return (y + lora).to(x2.dtype), h


def _reference_backward(dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, p, seed, need_dx):
    """(dx or None, dA, dB, dcoef (M, k)) by the formulas of the module docstring."""
    M, K = x2.shape
    adt = lora_A.dtype
    keep = _rng.keep_mask(seed, p, M, K, x2.device)
    xd = _rng.dropped(x2, keep, p, adt)
    dy_a = dy.to(adt)
    d_A, d_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dxl = x2.new_zeros((M, K), dtype=adt)
    dcoef = h.new_zeros(key.numel())
    cflat = coef.reshape(-1)
    for a, ra in enumerate(ranks):
        slots = _slots_of(key, a)
        if slots.numel() == 0 or ra == 0:
            continue
        toks = slots // key.shape[1]
        c = cflat[slots, None].to(adt)
        g = dy_a[toks] @ lora_B[a, :, :ra]
        d_A[a, :ra] = (g * c).t() @ xd[toks]
        d_B[a, :, :ra] = dy_a[toks].t() @ (h[slots, :ra].to(adt) * c)
        dcoef[slots] = (g.to(h.dtype) * h[slots, :ra]).sum(1)
        if need_dx:
            dxl.index_add_(0, toks, (g * c) @ lora_A[a, :ra])
    dx = None
    if need_dx:
        if keep is not None:
            dxl = dxl * keep / (1.0 - p)
        dx = dy @ weight + dxl.to(dy.dtype)
    return dx, d_A, d_B, dcoef.reshape(key.shape)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if _backend.triton_available():
    import triton
    import triton.language as tl

    def _prune_down(configs, named_args, **meta):
        arch = _backend.tile_arch(named_args["X_ptr"].device)
        if arch is None:
            return tile_config.INTERP_SKINNY
        tc = meta["DOT_DTYPE"] != tl.float32
        candidates = tile_config.SKINNY_TC if tc else tile_config.SKINNY_FMA
        if meta["DROPOUT"] and (arch < 90 or not tc):
            # beside the mask's hashes 4-warp tiles spill: on sm_80 (mma.sync operands in
            # registers), and with fp32 FMA operands on sm_90a too (Triton 3.6: 8 B a thread)
            candidates = [c for c in candidates if c.num_warps == 8] or candidates
        x_es = max(named_args["X_ptr"].element_size(), 2 if tc else 4)
        a_es = named_args["A_ptr"].element_size()
        return tile_config.fitting(candidates, named_args["X_ptr"].device,
                               lambda c: tile_config.skinny_smem(c, x_es, a_es, meta["BLOCK_R"]))

    # IEEE fp32 (FMA) tiles: the adapter loop's gathered rows and coefficients stay live beside
    # the FMA operands: 32 x 32 tiles, 16 deep (lowrank_gemm's 128 x 64 and 32 x 64 spill here),
    # spread over 8 warps on sm_80, where 4 spill.
    _GEMM_FMA = [tile_config.cfg(32, 32, 16, 4, 2)]
    _GEMM_FMA_80 = [tile_config.cfg(32, 32, 16, 8, 2)]

    def _prune_gemm(configs, named_args, **meta):
        arch = _backend.tile_arch(named_args["X_ptr"].device)
        if arch is None:
            return tile_config.INTERP_GEMM
        tc = tile_config.on_tensor_cores(meta["BASE_DTYPE"], meta["BASE_PRECISION"])
        candidates = tile_config.GEMM_TC if tc else (_GEMM_FMA if arch >= 90 else _GEMM_FMA_80)
        # lowrank_gemm's register budgets (see tile_config.prune_gemm), less for the gathered row
        # indices and slot coefficients the adapter loop keeps live: 112 accumulator values a
        # thread on sm_90a (64 with a dropout mask), 32 on sm_80, 16 beside a 3xTF32 tail.
        budget = 32 if arch < 90 else (64 if meta["TAIL_DROPOUT"] else 112)
        if tc and meta["TAIL_DTYPE"] == tl.float32:
            budget = 16
        candidates = [c for c in candidates if tile_config.per_thread(c) <= budget] or candidates[-1:]
        base_es = named_args["X_ptr"].element_size()
        tail_es = 4 if meta["TAIL_DTYPE"] == tl.float32 else 2
        return tile_config.fitting(candidates, named_args["X_ptr"].device,
                               lambda c: tile_config.gemm_smem(c, base_es, tail_es, meta["BLOCK_R"]))

    @triton.jit
    def _adapter_range(a_s, n_adapters):
        """(lo, hi): the smallest and largest adapter ids among a tile's slots (hi < lo when none)."""
        lo = tl.min(a_s)
        hi = tl.max(tl.where(a_s < n_adapters, a_s, -1))
        return lo, hi

    # ------------------------------------------------------------------------------------------
    # seg_down: O[slot] = drop(X[token]) A_aᵀ over tiles of slots sorted by adapter
    # ------------------------------------------------------------------------------------------
    @triton.autotune(configs=tile_config.SKINNY_TC + tile_config.SKINNY_FMA, key=["M_BUCKET", "K", "R", "DROPOUT", "PRECISION"],
                     restore_value=[], prune_configs_by={"early_config_prune": _prune_down})
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def seg_down_kernel(
        # X (M, K) by token, the adapters' A (n, R, K), O (S, R) fp32 by slot
        X_ptr, stride_xm, stride_xk,
        A_ptr, stride_an, stride_ar, stride_ak,
        O_ptr, stride_om, stride_or,
        # grouping: order (S,) the slot at each sorted position, key (S,) each slot's adapter
        # (n_adapters for none), ranks (n,)
        order_ptr, key_ptr, rank_ptr,
        S, K, R, n_adapters, slots_per_token, M_BUCKET,
        k0, k1, threshold, keep_scale,
        DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pos_ok = pos < S
        slot = tl.load(order_ptr + pos, mask=pos_ok, other=0)
        a_s = tl.load(key_ptr + slot, mask=pos_ok, other=n_adapters)
        tok = (slot // slots_per_token).to(tl.int64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        lo, hi = _adapter_range(a_s, n_adapters)
        # Sorted slots: a tile holds a run of consecutive adapters, most often one or two.
        for a in range(lo, hi + 1):
            rows = a_s == a
            rank = tl.load(rank_ptr + a)
            if (tl.max(rows.to(tl.int32)) > 0) & (pid_r * BLOCK_R < rank):
                r_ok = offs_r < rank
                for kk in range(0, tl.cdiv(K, BLOCK_K)):
                    offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
                    # other adapters' rows load as 0 and add nothing to the shared accumulator
                    x = tl.load(X_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                mask=rows[:, None] & (offs_k[None, :] < K), other=0.0)
                    if DROPOUT:
                        keep = _rng.tl_dropout_keep(k0, k1, threshold, tok[:, None], offs_k[None, :])
                        x = tl.where(keep, x, 0.0)
                    w = tl.load(A_ptr + tl.cast(a, tl.int64) * stride_an + offs_r[None, :] * stride_ar
                                + offs_k[:, None] * stride_ak,
                                mask=r_ok[None, :] & (offs_k[:, None] < K), other=0.0)
                    acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        tl.store(O_ptr + slot.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
                 mask=pos_ok[:, None] & (offs_r[None, :] < R))

    # ------------------------------------------------------------------------------------------
    # bgmv_down: the same product for few slots, one program per (slot, rank block)
    # ------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def bgmv_down_kernel(
        X_ptr, stride_xm, stride_xk,
        A_ptr, stride_an, stride_ar, stride_ak,
        O_ptr, stride_om, stride_or,
        key_ptr, rank_ptr,
        K, R, n_adapters, slots_per_token,
        k0, k1, threshold, keep_scale,
        DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        slot = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1)
        a = tl.load(key_ptr + slot)
        valid = a < n_adapters
        a = tl.where(valid, a, 0).to(tl.int64)
        rank = tl.where(valid, tl.load(rank_ptr + a), 0)
        tok = slot // slots_per_token
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if pid_r * BLOCK_R < rank:
            for kk in range(0, tl.cdiv(K, BLOCK_K)):
                offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                x = tl.load(X_ptr + tok * stride_xm + offs_k * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
                if DROPOUT:
                    x = tl.where(_rng.tl_dropout_keep(k0, k1, threshold, tok, offs_k), x, 0.0)
                w = tl.load(A_ptr + a * stride_an + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
        if DROPOUT:
            acc = acc * keep_scale
        tl.store(O_ptr + slot * stride_om + offs_r * stride_or, acc, mask=offs_r < R)

    # ------------------------------------------------------------------------------------------
    # seg_gemm: O[token] = X[token] Wᵀ + bias + [mask ⊙] Σ_j c_j · H[slot_j] B_aᵀ, in one pass
    # ------------------------------------------------------------------------------------------
    @triton.autotune(configs=tile_config.GEMM_TC + _GEMM_FMA + _GEMM_FMA_80,
                     key=["M_BUCKET", "N", "K", "R", "ORDERED", "TAIL_DROPOUT", "BASE_PRECISION", "TAIL_PRECISION"],
                     restore_value=[], prune_configs_by={"early_config_prune": _prune_gemm})
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def seg_gemm_kernel(
        # base operands: X (M, K) and W (N, K)
        X_ptr, stride_xm, stride_xk,
        W_ptr, stride_wn, stride_wk,
        # tail: H (S, R) fp32 by slot, the adapters' B (n, N, R), coefficients (S,) fp32
        H_ptr, stride_hm, stride_hr,
        B_ptr, stride_bn_a, stride_bn, stride_br,
        coef_ptr, key_ptr, rank_ptr,
        # rows (M,): the token at each position (tokens sorted by their first slot's adapter)
        rows_ptr, bias_ptr,
        O_ptr, stride_om, stride_on,
        M, N, K, R, n_adapters, slots_per_token, M_BUCKET,
        k0, k1, threshold, keep_scale,
        ORDERED: tl.constexpr, HAS_BIAS: tl.constexpr, TAIL_DROPOUT: tl.constexpr,
        BASE_DTYPE: tl.constexpr, TAIL_DTYPE: tl.constexpr,
        BASE_PRECISION: tl.constexpr, TAIL_PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = gemm.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = pos < M
        if ORDERED:
            tok = tl.load(rows_ptr + pos, mask=m_ok, other=0)
        else:
            tok = pos
        tok = tok.to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = offs_n < N

        # The tail first (the dropout mask applies to it alone), then the base GEMM on top.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(0, slots_per_token):
            slot = tok * slots_per_token + j
            a_s = tl.load(key_ptr + slot, mask=m_ok, other=n_adapters)
            c = tl.load(coef_ptr + slot, mask=m_ok, other=0.0)
            lo, hi = _adapter_range(a_s, n_adapters)
            for a in range(lo, hi + 1):
                rows = a_s == a
                if tl.max(rows.to(tl.int32)) > 0:
                    rank = tl.load(rank_ptr + a)
                    for r0 in range(0, rank, BLOCK_R):
                        offs_r = r0 + tl.arange(0, BLOCK_R)
                        r_ok = offs_r < rank
                        h = tl.load(H_ptr + slot[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                                    mask=rows[:, None] & r_ok[None, :], other=0.0)
                        b = tl.load(B_ptr + tl.cast(a, tl.int64) * stride_bn_a + offs_r[:, None] * stride_br
                                    + offs_n[None, :] * stride_bn,
                                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                        acc = tl.dot((h * c[:, None]).to(TAIL_DTYPE), b.to(TAIL_DTYPE), acc,
                                     input_precision=TAIL_PRECISION)
        if TAIL_DROPOUT:
            acc = gemm.dropout_tile(acc, tok, offs_n, k0, k1, threshold, keep_scale)

        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(X_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
            w = tl.load(W_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=n_ok[None, :] & (offs_k[:, None] < K), other=0.0)
            acc = tl.dot(x.to(BASE_DTYPE), w.to(BASE_DTYPE), acc, input_precision=BASE_PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(O_ptr + tok[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(O_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    # ------------------------------------------------------------------------------------------
    # seg_reduce: P[split, a] = Σ_{sorted slots of a in the split} G[slot]ᵀ drop(X[token])
    # ------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def seg_reduce_kernel(
        G_ptr, stride_gm, stride_gr,
        X_ptr, stride_xm, stride_xf,
        P_ptr, stride_ps, stride_pa, stride_pr, stride_pf,
        order_ptr, offsets_ptr, rank_ptr,
        F, R, slots_per_token, n_splits,
        k0, k1, threshold, keep_scale,
        DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        pid_f = tl.program_id(0)
        a = tl.program_id(1) // n_splits
        split = tl.program_id(1) % n_splits
        pid_r = tl.program_id(2)
        start = tl.load(offsets_ptr + a)
        end = tl.load(offsets_ptr + a + 1)
        chunk = tl.cdiv(tl.cdiv(end - start, n_splits), BLOCK_M) * BLOCK_M
        row_start = start + split * chunk
        row_end = tl.minimum(row_start + chunk, end)
        rank = tl.load(rank_ptr + a)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        if pid_r * BLOCK_R >= rank:
            row_end = row_start  # a rank block past this adapter's rank: zeros
        # Transposed, Pᵀ = drop(X)ᵀ G, so the product's M side is BLOCK_F (see outer_reduce).
        acc = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
        for p0 in range(row_start, row_end, BLOCK_M):
            pos = p0 + tl.arange(0, BLOCK_M)
            ok = pos < row_end
            slot = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
            tok = slot // slots_per_token
            xt = tl.load(X_ptr + tok[None, :] * stride_xm + offs_f[:, None] * stride_xf,
                         mask=ok[None, :] & f_ok[:, None], other=0.0)
            if DROPOUT:
                keep = _rng.tl_dropout_keep(k0, k1, threshold, tok[None, :], offs_f[:, None])
                xt = tl.where(keep, xt, 0.0)
            g = tl.load(G_ptr + slot[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                        mask=ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT_DTYPE), g.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        tl.store(P_ptr + split * stride_ps + tl.cast(a, tl.int64) * stride_pa + offs_r[None, :] * stride_pr
                 + offs_f[:, None] * stride_pf, acc,
                 mask=(offs_r[None, :] < R) & f_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Triton launchers. Callers validate; these only allocate and launch.
# ----------------------------------------------------------------------------------------------
def _group(key: Tensor, n: int) -> Tensor:
    """The grouping of the slots by adapter, as one int64 tensor (S + M + n + 2,):
    order (S,) the slots sorted by adapter (stable), rows (M,) the tokens sorted by their first
    slot's adapter, offsets (n + 2,) where adapter a's sorted slots begin (a = n: the empty ones).
    A sort and a searchsorted: no atomics, no host synchronisation."""
    flat = key.reshape(-1)
    sorted_key, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(n + 2, device=key.device, dtype=key.dtype))
    rows = order if key.shape[1] == 1 else torch.sort(key[:, 0], stable=True)[1]
    return torch.cat([order, rows, offsets])


def _ungroup(grouping: Tensor, S: int, M: int):
    return grouping[:S], grouping[S:S + M], grouping[S + M:]


def _down(x2, a3, key, ranks, order, kslots, dot_dtype, dropout, out=None):
    """(S, R) fp32 = drop(x[token]) a3[adapter]ᵀ per slot; a3 (n, R, K) any strides; order None:
    the BGMV kernel over slots in arrival order."""
    S, K, R, n = key.numel(), x2.shape[1], a3.shape[1], a3.shape[0]
    if out is None:
        out = torch.empty((S, R), device=x2.device, dtype=torch.float32)
    flat = key.reshape(-1)
    drop = gemm.dropout_args(dropout)
    if order is None:
        block_r = min(64, max(16, triton.next_power_of_2(R)))
        bgmv_down_kernel[(S, triton.cdiv(R, block_r))](
            x2, x2.stride(0), x2.stride(1), a3, *a3.stride(), out, out.stride(0), out.stride(1),
            flat, ranks, K, R, n, kslots, *drop,
            DROPOUT=dropout is not None, BLOCK_R=block_r, BLOCK_K=128 if _backend.tile_arch(x2.device) else 32,
        )
        return out
    block_r = tile_config.skinny_rank_block(R, dot_dtype, x2.device)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
    seg_down_kernel[grid](
        x2, x2.stride(0), x2.stride(1), a3, *a3.stride(), out, out.stride(0), out.stride(1),
        order, flat, ranks, S, K, R, n, kslots, tile_config.m_bucket(S), *drop,
        DROPOUT=dropout is not None, DOT_DTYPE=tile_config.TL_DTYPES[dot_dtype],
        PRECISION=tile_config.dot_precision(dot_dtype, x2.dtype), BLOCK_R=block_r,
    )
    return out


def _gemm(x, w, bias, h, b3, coef, key, ranks, rows, kslots, tail_dtype, tail_dropout=None, out=None):
    """O (M, N) = x wᵀ + bias + [mask ⊙] Σ_j coef · h[slot] b3[adapter]ᵀ; w (N, K), b3 (n, N, R)."""
    M, K = x.shape
    N, R, n = w.shape[0], b3.shape[2], b3.shape[0]
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    # The epilogue reads bias (N,) as contiguous: its copy is negligible next to the (M, N) output.
    bias = None if bias is None else bias.contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    seg_gemm_kernel[grid](
        x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1),
        h, h.stride(0), h.stride(1), b3, *b3.stride(),
        coef.reshape(-1), key.reshape(-1), ranks,
        rows if rows is not None else key, bias if bias is not None else out,
        out, out.stride(0), out.stride(1),
        M, N, K, R, n, kslots, tile_config.m_bucket(M), *gemm.dropout_args(tail_dropout),
        ORDERED=rows is not None, HAS_BIAS=bias is not None, TAIL_DROPOUT=tail_dropout is not None,
        BASE_DTYPE=tile_config.TL_DTYPES[x.dtype], TAIL_DTYPE=tile_config.TL_DTYPES[tail_dtype],
        BASE_PRECISION=tile_config.dot_precision(x.dtype), TAIL_PRECISION=tile_config.dot_precision(tail_dtype, x.dtype),
        BLOCK_R=tile_config.rank_block(R, tail_dtype, cap=32),
    )
    return out


def _reduce(g, x, order, offsets, ranks, kslots, n, dot_dtype, dropout=None, splits=None, partial=None):
    """(n, R, F) fp32: for each adapter, Σ over its slots of g[slot]ᵀ drop(x[token]), g (S, R), x (M, F).
    ``partial`` (splits, n, R, F) fp32 may be given (tests poison it)."""
    R, F = g.shape[1], x.shape[1]
    small = _backend.tile_arch(x.device) is None or dot_dtype == torch.float32
    arch = _backend.tile_arch(x.device)
    # 16-bit tiles: 64 x 128, or 64 x 64 on sm_80 (mma.sync's register operands spill the wider one)
    block_m, block_f = (32, 32) if arch is None else ((32, 64) if small else (64, 128 if arch >= 90 else 64))
    block_r = tile_config.rank_block(R, dot_dtype)
    tiles = triton.cdiv(F, block_f) * triton.cdiv(R, block_r) * n
    if splits is None:
        # Split each adapter's slots when the adapters alone leave the GPU idle (few adapters, or
        # most tokens on one), bounded so the fp32 partials stay within 4x the output.
        target = 1 if _backend.tile_arch(x.device) is None else 4 * tile_config.sm_count(x.device)
        splits = max(1, min(4, triton.cdiv(target, tiles), triton.cdiv(g.shape[0], block_m)))
    if partial is None:
        partial = torch.empty((splits, n, R, F), device=x.device, dtype=torch.float32)
    seg_reduce_kernel[(triton.cdiv(F, block_f), n * splits, triton.cdiv(R, block_r))](
        g, g.stride(0), g.stride(1), x, x.stride(0), x.stride(1),
        partial, *partial.stride(), order, offsets, ranks, F, R, kslots, splits,
        *gemm.dropout_args(dropout),
        DROPOUT=dropout is not None, DOT_DTYPE=tile_config.TL_DTYPES[dot_dtype],
        PRECISION=tile_config.dot_precision(dot_dtype, x.dtype),
        BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=4,
    )
    return partial[0] if splits == 1 else partial.sum(0)


def _triton_forward(x2, weight, lora_A, lora_B, bias, key, coef, ranks, grouping, dropout, out=None):
    S, M = key.numel(), x2.shape[0]
    order, rows = (None, None) if grouping.numel() == 0 else _ungroup(grouping, S, M)[:2]
    h = _down(x2, lora_A, key, ranks, order, key.shape[1], lora_A.dtype, dropout)
    y = _gemm(x2, weight, bias, h, lora_B, coef, key, ranks, rows, key.shape[1], lora_A.dtype, out=out)
    return y, h


def _triton_backward(dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, dropout, need_dx):
    S, M, n = key.numel(), x2.shape[0], lora_A.shape[0]
    kslots, adt = key.shape[1], lora_A.dtype
    order, rows, offsets = _ungroup(grouping, S, M)
    g = _down(dy, lora_B.transpose(1, 2), key, ranks, order, kslots, adt, None)
    cflat = coef.reshape(-1, 1).to(torch.float32)
    d_A = _reduce(g * cflat, x2, order, offsets, ranks, kslots, n, adt, dropout).to(adt)
    d_B = _reduce(h * cflat, dy, order, offsets, ranks, kslots, n, adt).transpose(1, 2).to(adt)
    dcoef = (g * h).sum(1).reshape(key.shape)
    dx = None
    if need_dx:
        dx = _gemm(dy, weight.t(), None, g, lora_A.transpose(1, 2), coef, key, ranks, rows, kslots, adt,
                   tail_dropout=dropout)
    return dx, d_A, d_B, dcoef


# ----------------------------------------------------------------------------------------------
# CUDA launchers (csrc/multi_lora.cu, csrc/multi_lora_binding.cpp)
# ----------------------------------------------------------------------------------------------
def _cuda_dropout_args(dropout):
    return tuple(dropout) if dropout is not None else (0, 0, 0, 1.0)


def _cuda_forward(x2, weight, lora_A, lora_B, bias, key, coef, ranks, grouping, dropout):
    k0, k1, threshold, keep_scale = _cuda_dropout_args(dropout)
    return _backend.cuda_extension().multi_lora_fwd(
        x2, weight, lora_A, lora_B, bias, key, coef.to(torch.float32), ranks, grouping,
        threshold, k0, k1, keep_scale,
    )


def _cuda_backward(dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, dropout, need_dx):
    k0, k1, threshold, keep_scale = _cuda_dropout_args(dropout)
    dx, d_A, d_B, dcoef = _backend.cuda_extension().multi_lora_bwd(
        dy, x2, weight, lora_A, lora_B, h, key, coef.to(torch.float32), ranks, grouping,
        threshold, k0, k1, keep_scale, need_dx,
    )
    return (dx if need_dx else None), d_A, d_B, dcoef


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------
def _seed_value(seed: Optional[Tensor]) -> Optional[int]:
    # a CPU int64 tensor: reading it costs no device synchronisation
    return None if seed is None else int(seed.item())


def _grouping_size(S: int, M: int, n: int, grouped: bool) -> int:
    return S + M + n + 2 if grouped else 0


def _multi_lora_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], key: Tensor,
    coef: Tensor, ranks: Tensor, dropout_p: float, seed: Optional[Tensor], backend: str, grouped: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y (M, N), h (S, R), grouping): grouping is empty unless ``grouped`` (see _group)."""
    s = _seed_value(seed)
    n = lora_A.shape[0]
    M = x.shape[0]
    grouping = _group(key, n) if grouped else key.new_empty((0,))
    if M == 0:
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, lora_A.shape[1]), dtype=_h_dtype(lora_A)), grouping
    if backend == "reference":
        y, h = _reference_forward(x, weight, lora_A, lora_B, bias, key, coef, ranks.tolist(), dropout_p, s)
        return y, h, grouping
    dropout = gemm.Dropout.make(dropout_p, s)
    impl = _triton_forward if backend == "triton" else _cuda_forward
    y, h = impl(x, weight, lora_A, lora_B, bias, key, coef, ranks, grouping, dropout)
    return y, h, grouping


_fwd_op = torch.library.custom_op("lowrank_kernels::multi_lora_linear_fwd", _multi_lora_fwd, mutates_args=())


@_fwd_op.register_fake
def _(x, weight, lora_A, lora_B, bias, key, coef, ranks, dropout_p, seed, backend, grouped):
    M, S, n = x.shape[0], key.numel(), lora_A.shape[0]
    return (
        x.new_empty((M, weight.shape[0])),
        x.new_empty((S, lora_A.shape[1]), dtype=_h_dtype(lora_A)),
        key.new_empty((_grouping_size(S, M, n, grouped),)),
    )


def _multi_lora_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor, key: Tensor,
    coef: Tensor, ranks: Tensor, grouping: Tensor, dropout_p: float, seed: Optional[Tensor], backend: str,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_lora_A, d_lora_B, d_coef); dx is empty when need_dx is False."""
    s = _seed_value(seed)
    if x.shape[0] == 0:
        dx, dA, dB = torch.zeros_like(x), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
        dc = torch.zeros(key.shape, device=x.device, dtype=_h_dtype(lora_A))
    elif backend == "reference":
        dx, dA, dB, dc = _reference_backward(dy, x, weight, lora_A, lora_B, h, key, coef, ranks.tolist(),
                                             dropout_p, s, need_dx)
    else:
        dropout = gemm.Dropout.make(dropout_p, s)
        impl = _triton_backward if backend == "triton" else _cuda_backward
        dx, dA, dB, dc = impl(dy, x, weight, lora_A, lora_B, h, key, coef, ranks, grouping, dropout, need_dx)
    if not need_dx:
        dx = x.new_empty((0,))
    return dx.contiguous(), dA.contiguous(), dB.contiguous(), dc.to(_h_dtype(lora_A)).contiguous()


_bwd_op = torch.library.custom_op("lowrank_kernels::multi_lora_linear_bwd", _multi_lora_bwd, mutates_args=())


@_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, h, key, coef, ranks, grouping, dropout_p, seed, backend, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dc = x.new_empty(key.shape, dtype=_h_dtype(lora_A))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), dc


# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources):
# each token's adapter keys, coefficients and the ranks are computed from the public arguments.
_SLOTS = dict(key=("adapter_index",), coef=("scaling", "adapter_weight"), ranks=("ranks",))
LAYOUT_SOURCES = _checks.layout_sources({
    "multi_lora_linear_fwd": {"multi_lora_linear": dict(x="x", weight="weight", lora_A="lora_A", lora_B="lora_B",
                                                        bias="bias", **_SLOTS, seed=None)},
    "multi_lora_linear_bwd": {"multi_lora_linear": dict(dy="grad_output", x="x", weight="weight", lora_A="lora_A",
                                                        lora_B="lora_B", h=None, **_SLOTS, grouping=None,
                                                        seed=None)},
})


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class MultiLoRALinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op; saves x (no copy), h (S, R) fp32 and the grouping."""

    @staticmethod
    def forward(ctx, x2, weight, lora_A, lora_B, bias, key, coef, ranks, dropout_p, seed, backend):
        y, h, grouping = _backend.call_op(
            _fwd_op, _multi_lora_fwd, x2, weight, lora_A, lora_B, bias, key, coef, ranks, dropout_p, seed, backend, True
        )
        ctx.save_for_backward(x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, seed)
        ctx.dropout_p, ctx.backend = dropout_p, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, seed = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias, _, need_c = ctx.needs_input_grad[:7]
        dy = dy.contiguous()
        dx, d_A, d_B, d_c = _backend.call_op(
            _bwd_op, _multi_lora_bwd, dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping,
            ctx.dropout_p, seed, ctx.backend, need_x,
        )
        d_weight = (dy.t() @ x2).to(weight.dtype) if need_w else None
        d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if (need_bias and ctx.has_bias) else None
        return (
            dx if need_x else None, d_weight, d_A if need_a else None, d_B if need_b else None, d_bias,
            None, d_c.to(coef.dtype) if need_c else None, None, None, None, None,
        )


# ----------------------------------------------------------------------------------------------
# Validation, normalisation and the functional entry point
# ----------------------------------------------------------------------------------------------
def _stack_adapters(lora_A: Sequence[Tensor], lora_B: Sequence[Tensor]):
    """A list of adapters (A_i (r_i, K), B_i (N, r_i)) as a zero-padded stack and its ranks.
    Differentiable: the stack's gradient flows back to each A_i and B_i (padding excluded)."""
    if len(lora_A) != len(lora_B) or len(lora_A) == 0:
        raise ValueError(f"lora_A and lora_B must be lists of the same non-zero length, got {len(lora_A)} and {len(lora_B)}")
    for i, (a, b) in enumerate(zip(lora_A, lora_B)):
        _checks.check_float(f"lora_A[{i}]", a, 2)
        _checks.check_float(f"lora_B[{i}]", b, 2)
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"lora_B[{i}] must be (out_features, {a.shape[0]}) to match lora_A[{i}], got {tuple(b.shape)}")
        if a.dtype != lora_A[0].dtype or b.dtype != lora_A[0].dtype:
            raise TypeError(f"adapter {i} has dtype {a.dtype}/{b.dtype}; every lora_A[i], lora_B[i] must share {lora_A[0].dtype}")
        if a.shape[1] != lora_A[0].shape[1] or b.shape[0] != lora_B[0].shape[0]:
            raise ValueError(f"adapter {i} has shape A {tuple(a.shape)}, B {tuple(b.shape)}: every adapter must "
                             f"share in_features {lora_A[0].shape[1]} and out_features {lora_B[0].shape[0]}")
    r = max(a.shape[0] for a in lora_A)
    A = torch.stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a in lora_A])
    B = torch.stack([F.pad(b, (0, r - b.shape[1])) for b in lora_B])
    return A, B, torch.tensor([a.shape[0] for a in lora_A], dtype=torch.int32)


def _check_values(adapter_index: Tensor, ranks: Optional[Tensor], n: int, r: int) -> None:
    if torch.compiler.is_compiling():
        return  # a value check is a data-dependent branch: compiled graphs map bad indices to -1
    if adapter_index.device.type == "cpu" or os.environ.get(CHECK_ENV, "0") not in ("", "0"):
        if adapter_index.numel() and (adapter_index.min() < -1 or adapter_index.max() >= n):
            bad = adapter_index[(adapter_index < -1) | (adapter_index >= n)][0].item()
            raise ValueError(f"adapter_index must hold values in [-1, {n}) (n = {n} adapters), got {bad}")
    if ranks is not None and (ranks.device.type == "cpu" or os.environ.get(CHECK_ENV, "0") not in ("", "0")):
        if ranks.numel() and (ranks.min() < 0 or ranks.max() > r):
            raise ValueError(f"ranks must hold values in [0, {r}] (r = lora_A.shape[1]), got {ranks.tolist()}")


def _check_inputs(x, weight, lora_A, lora_B, adapter_index, scaling, bias, dropout_p, seed, adapter_weight, ranks):
    _checks.check_float("weight", weight, 2)
    _checks.check_input(x, weight.shape[1], f"weight (N, K) = {tuple(weight.shape)}")
    N, K = weight.shape
    _checks.check_float("lora_A", lora_A, 3)
    _checks.check_float("lora_B", lora_B, 3)
    n, r = lora_A.shape[:2]
    if n == 0 or r == 0:
        raise ValueError(f"lora_A must be (n, r, K) with n >= 1 adapters and rank r >= 1, got {tuple(lora_A.shape)}")
    if lora_A.shape[2] != K:
        raise ValueError(f"lora_A must be (n, r, {K}) to match weight's in_features, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, N, r):
        raise ValueError(f"lora_B must be (n, out_features, r) = ({n}, {N}, {r}), got {tuple(lora_B.shape)}")
    _checks.check_same_dtype("weight", weight, "x", x)
    _checks.check_same_dtype("lora_B", lora_B, "lora_A", lora_A)
    _checks.check_adapter_dtype(x.dtype, lora_A.dtype, "lora_A")
    _checks.check_bias(bias, N, x)
    M = x.numel() // K if K else 0
    if not isinstance(adapter_index, Tensor):
        raise TypeError(f"adapter_index must be a torch.Tensor of int64, got {type(adapter_index).__name__}")
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index must be int64, got {adapter_index.dtype}")
    if adapter_weight is None:
        if adapter_index.numel() != M or adapter_index.shape not in (x.shape[:-1], (M,)):
            raise ValueError(f"adapter_index must have x's leading shape {tuple(x.shape[:-1])} or ({M},), "
                             f"got {tuple(adapter_index.shape)}")
    else:
        _checks.check_float("adapter_weight", adapter_weight)
        _checks.check_adapter_dtype(x.dtype, adapter_weight.dtype, "adapter_weight")
        if adapter_weight.shape != adapter_index.shape:
            raise ValueError(f"adapter_weight must have adapter_index's shape {tuple(adapter_index.shape)}, "
                             f"got {tuple(adapter_weight.shape)}")
        if adapter_index.dim() < 1 or adapter_index.shape[:-1] not in (x.shape[:-1], (M,)):
            raise ValueError(f"with adapter_weight, adapter_index must be (*x.shape[:-1], k) or ({M}, k), "
                             f"got {tuple(adapter_index.shape)}")
    if ranks is not None:
        if not isinstance(ranks, Tensor) or ranks.dtype not in (torch.int32, torch.int64):
            raise TypeError("ranks must be an int32 or int64 tensor of shape (n,)")
        if tuple(ranks.shape) != (n,):
            raise ValueError(f"ranks must be ({n},), one rank per adapter, got {tuple(ranks.shape)}")
    if isinstance(scaling, Tensor):
        _checks.check_float("scaling", scaling, 1)
        if scaling.shape[0] != n:
            raise ValueError(f"scaling must be a float or a ({n},) tensor, one scale per adapter, got {tuple(scaling.shape)}")
    else:
        _checks.check_scalar("scaling", scaling)
    _checks.check_same_device("x", x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias,
                              adapter_index=adapter_index, adapter_weight=adapter_weight,
                              scaling=scaling if isinstance(scaling, Tensor) else None)
    _checks.check_dropout_p(dropout_p)
    _checks.check_seed("seed", seed)
    _check_values(adapter_index, ranks, n, r)


def _prepare(x, lora_A, lora_B, adapter_index, scaling, adapter_weight, ranks):
    """(key (M, k), coef (M, k), ranks (n,) int32 on x's device): empty slots hold key = n; coef
    = s_a · w is formed with torch ops so its gradient reaches adapter_weight and scaling."""
    n, r = lora_A.shape[:2]
    M = x.numel() // x.shape[-1]
    idx = adapter_index.reshape(M, 1 if adapter_weight is None else adapter_index.shape[-1])
    valid = (idx >= 0) & (idx < n)
    key = torch.where(valid, idx, n)
    hdt = _h_dtype(lora_A)
    if isinstance(scaling, Tensor):
        coef = scaling.to(hdt)[key.clamp(max=n - 1)]
    else:
        coef = torch.full(key.shape, float(scaling), device=x.device, dtype=hdt)
    if adapter_weight is not None:
        coef = coef * adapter_weight.reshape(idx.shape).to(hdt)
    coef = torch.where(valid, coef, 0.0)
    if ranks is None:
        ranks = torch.full((n,), r, dtype=torch.int32, device=x.device)
    else:
        ranks = ranks.to(device=x.device, dtype=torch.int32).clamp(0, r)
    # The kernels index these as plain row-major arrays; elementwise results follow their inputs'
    # layout (a transposed adapter_index gives a transposed key), and they are small (M·k, n).
    return key.contiguous(), coef.contiguous(), ranks.contiguous()


@_auto_backend.tuned("multi_lora_linear", rows=("x", "adapter_index", "adapter_weight"))
def multi_lora_linear(x, weight, lora_A, lora_B, adapter_index, scaling=1.0, bias=None, dropout_p=0.0,
                      training=True, seed=None, backend=None, *, adapter_weight=None, ranks=None):
    """Many LoRA adapters in one batch: ``y_m = x_m Wᵀ + bias + s_a · (drop(x_m) A_aᵀ) B_aᵀ``,
    a = adapter_index[m]; or, with ``adapter_weight``, a mixture
    ``y_m = x_m Wᵀ + bias + Σ_j w_mj · s_a · (drop(x_m) A_aᵀ) B_aᵀ``, a = adapter_index[m, j].

    Args:
        x: (..., K) input, float32/float16/bfloat16, any leading dims, may be non-contiguous.
        weight: (N, K) base weight, x's dtype (frozen or trainable). bias: optional (N,).
        lora_A: (n, r, K) and lora_B: (n, N, r), a stack of n adapters (x's dtype or float32); or
            two lists of the adapters' A_i (r_i, K) and B_i (N, r_i), ranks may differ.
        adapter_index: int64, x's leading shape (or (M,)): each token's adapter in [-1, n), -1 for
            the base alone. With ``adapter_weight``: (..., k), k adapters per token.
        scaling: s, a float or an (n,) tensor, one per adapter (alpha_a / r_a in PEFT). A tensor
            that requires grad receives its gradient.
        dropout_p, training, seed: dropout on the adapters' input (one mask per token, from the
            package RNG; seed=None draws one, kept for backward), as in ``lora_linear``.
        backend: None, "reference", "triton" or "cuda" (see lowrank_kernels.backend).
        adapter_weight: (..., k) mixture weights (x's dtype or float32), e.g. a router's top-k
            probabilities; differentiable.
        ranks: optional (n,) int tensor with the stack's per-adapter ranks r_a <= r: rows r_a..r
            of A_a and columns of B_a are padding, skipped by the kernels (no flops beyond the tile
            granularity) and given zero gradient.

    Gradients reach x, weight/bias (when they require grad), every adapter (only from its own
    tokens), adapter_weight and a scaling tensor. Index values are checked on CPU tensors, or on
    any device with LOWRANK_KERNELS_CHECK_INDEX=1; unchecked, an index outside [-1, n) counts as -1.

    Returns:
        (..., N) tensor in x's dtype.
    """
    if isinstance(lora_A, (list, tuple)):
        if ranks is not None:
            raise ValueError("ranks is given by the lists' shapes: pass ranks only with a stacked lora_A")
        lora_A, lora_B, ranks = _stack_adapters(lora_A, lora_B)
    if isinstance(x, Tensor):
        x, weight, lora_A, lora_B, bias = _backend.autocast_inputs(x, weight, lora_A, lora_B, bias)
    _check_inputs(x, weight, lora_A, lora_B, adapter_index, scaling, bias, dropout_p, seed, adapter_weight, ranks)
    backend = _backend.resolve("multi_lora_linear", backend, x=x, lora_A=lora_A)
    p = float(dropout_p) if training else 0.0
    seed_t = _rng.seed_tensor(seed) if p > 0.0 else None
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    key, coef, ranks_d = _prepare(x, lora_A, lora_B, adapter_index, scaling, adapter_weight, ranks)
    args = (x2, weight, lora_A, lora_B, bias, key, coef, ranks_d, p, seed_t, backend)
    tensors = (x2, weight, lora_A, lora_B, bias, coef)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y = MultiLoRALinearFunction.apply(*args)
    else:
        # the CUDA kernels always work on grouped slots; Triton decodes few slots ungrouped
        y, _, _ = _backend.call_op(_fwd_op, _multi_lora_fwd, *args, key.numel() > DECODE_SLOTS or backend == "cuda")
    return y.reshape(*lead, weight.shape[0])


def multi_lora_linear_reference(x, weight, lora_A, lora_B, adapter_index, scaling=1.0, bias=None,
                                dropout_p=0.0, seed=None, *, adapter_weight=None, ranks=None):
    """Differentiable plain-torch multi-adapter LoRA (a loop over adapters), the specification
    every backend is tested against; arguments as multi_lora_linear's. Dropout (``dropout_p > 0``
    and a ``seed``) uses the package's RNG, so it agrees with every backend for the same seed."""
    if isinstance(lora_A, (list, tuple)):
        lora_A, lora_B, ranks = _stack_adapters(lora_A, lora_B)
    lead, K = x.shape[:-1], x.shape[-1]
    key, coef, ranks_d = _prepare(x, lora_A, lora_B, adapter_index, scaling, adapter_weight, ranks)
    y, _ = _reference_forward(x.reshape(-1, K), weight, lora_A, lora_B, bias, key, coef, ranks_d.tolist(),
                              dropout_p, seed)
    return y.reshape(*lead, weight.shape[0])


MULTI_LORA = registry.declare(
    "multi_lora_linear", "y_m = x_m Wᵀ + bias + Σ_k w_mk s_k·(x_m A_kᵀ) B_kᵀ over each row's adapters",
    library_ops=(_fwd_op, _bwd_op),
    reference=registry.Impl(registry.REFERENCE),
    triton=registry.Impl(registry.TRITON),
    cuda=registry.Impl(registry.CUDA),
)
