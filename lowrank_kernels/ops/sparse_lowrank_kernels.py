"""The kernels of sparse_lowrank_linear (ops/sparse_lowrank.py): Triton and CUDA launchers.

triton: forward = skinny h = x Aᵀ, the shared low-rank GEMM for s·h Bᵀ + bias, then one sparse pass
adding x Sᵀ into the output tile by tile. Backward = g = dy B, the low-rank GEMM for s·g A plus a
sparse pass adding dy S, split-M reductions for dA, dB, and the SDDMM for d sp_values.
cuda: csrc/sparse_lowrank.cu for the sparse passes, cuBLAS (through ATen) for the GEMMs.
Each takes the support as a SparseSupport (ops/sparse_support.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_kernels import backend as _backend
from lowrank_kernels.ops import gemm, tile_config

# ----------------------------------------------------------------------------------------------
# Triton kernels: the sparse passes (the low-rank GEMMs are ops/gemm.py's)
# ----------------------------------------------------------------------------------------------
if _backend.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _store_tile(ptrs, acc, mask, ACCUMULATE: tl.constexpr):
        """Write the fp32 tile ``acc`` in the output's dtype, added to what is there if ACCUMULATE
        (the sparse term lands on top of the low-rank one)."""
        if ACCUMULATE:
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _spmm_csr_kernel(
        # X (M, C): the dense operand; T (R, C) in CSR: row pointers, value positions (T = Sᵀ), and
        # the flat index of S (n_cols = S's K), from which an entry's column of T follows; the values
        # V (nnz) any stride (a view of a larger buffer or an expanded one is read in place)
        X_ptr, stride_xm, stride_xc,
        V_ptr, stride_v, RowPtr_ptr, Pos_ptr, Index_ptr, n_cols,
        # Y (M, R) += X Tᵀ
        Y_ptr, stride_ym, stride_yr,
        M, R,
        TRANS: tl.constexpr, ACCUMULATE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # One (tokens × rows-of-T) output tile; its rows' nonzeros are walked in lock-step, up to
        # the longest row of the tile (shorter rows are masked), so the tile stays in registers
        # and is written once, coalesced.
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_ok = offs_m < M
        r_ok = offs_r < R
        start = tl.load(RowPtr_ptr + offs_r, mask=r_ok, other=0)
        length = tl.load(RowPtr_ptr + offs_r + 1, mask=r_ok, other=0) - start
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for step in range(0, tl.max(length, axis=0)):
            live = step < length
            p = start + step
            if TRANS:
                p = tl.load(Pos_ptr + p, mask=live, other=0)
                col = tl.load(Index_ptr + p, mask=live, other=0) // n_cols
            else:
                col = tl.load(Index_ptr + p, mask=live, other=0) % n_cols
            v = tl.load(V_ptr + p.to(tl.int64) * stride_v, mask=live, other=0.0).to(tl.float32)
            xg = tl.load(
                X_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xc,
                mask=m_ok[:, None] & live[None, :], other=0.0,
            )
            acc += xg.to(tl.float32) * v[None, :]
        _store_tile(Y_ptr + offs_m[:, None] * stride_ym + offs_r[None, :].to(tl.int64) * stride_yr, acc,
                    m_ok[:, None] & r_ok[None, :], ACCUMULATE)

    @triton.jit
    def _sddmm_csr_kernel(
        # D (M, N) and X (M, K); the support's flat index into N×K; O (nnz) = (Dᵀ X) at it
        D_ptr, stride_dm, stride_dn,
        X_ptr, stride_xm, stride_xk,
        Index_ptr, O_ptr,
        M, K, NNZ,
        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < NNZ
        flat = tl.load(Index_ptr + offs_p, mask=p_ok, other=0)
        row = flat // K
        col = flat - row * K
        acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            ok = (offs_m[:, None] < M) & p_ok[None, :]
            d = tl.load(D_ptr + offs_m[:, None] * stride_dm + row[None, :] * stride_dn, mask=ok, other=0.0)
            x = tl.load(X_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xk, mask=ok, other=0.0)
            acc += tl.sum(d.to(tl.float32) * x.to(tl.float32), axis=0)
        tl.store(O_ptr + offs_p, acc.to(O_ptr.dtype.element_ty), mask=p_ok)

    @triton.jit
    def _block_values(V_ptr, stride_v, base, rowlen, offs_i, offs_j, ok, TRANS: tl.constexpr):
        # Entry (i, j) of the block of T; for T = Sᵀ that is entry (j, i) of S's block.
        if TRANS:
            addr = base + offs_j[None, :] * rowlen + offs_i[:, None]
        else:
            addr = base + offs_i[:, None] * rowlen + offs_j[None, :]
        return tl.load(V_ptr + addr.to(tl.int64) * stride_v, mask=ok, other=0.0)

    @triton.jit
    def _spmm_block_kernel(
        # X (M, C); blocks of T (R, C): per T block-row pointers, optional order, S-block geometry
        X_ptr, stride_xm, stride_xc,
        V_ptr, stride_v, BPtr_ptr, Order_ptr, Row0_ptr, Col0_ptr, Base_ptr, RowLen_ptr,
        # Y (M, R) += X Tᵀ
        Y_ptr, stride_ym, stride_yr,
        M, R, C,
        TRANS: tl.constexpr, ACCUMULATE: tl.constexpr, USE_DOT: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # One (tokens × one block-row of T) tile: each block is a dense (BLOCK_M, TW) x (TW, TH)
        # product on contiguous loads.
        pid_m = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_i = tl.arange(0, TH)
        offs_j = tl.arange(0, TW)
        m_ok = offs_m < M
        i_ok = pid_b * TH + offs_i < R
        acc = tl.zeros((BLOCK_M, TH), dtype=tl.float32)
        for q in range(tl.load(BPtr_ptr + pid_b), tl.load(BPtr_ptr + pid_b + 1)):
            if TRANS:
                b = tl.load(Order_ptr + q)
                c0 = tl.load(Row0_ptr + b)
            else:
                b = q
                c0 = tl.load(Col0_ptr + b)
            cols = c0 + offs_j
            j_ok = cols < C
            s = _block_values(V_ptr, stride_v, tl.load(Base_ptr + b), tl.load(RowLen_ptr + b), offs_i, offs_j,
                              i_ok[:, None] & j_ok[None, :], TRANS)
            xt = tl.load(X_ptr + offs_m[:, None] * stride_xm + cols[None, :].to(tl.int64) * stride_xc,
                         mask=m_ok[:, None] & j_ok[None, :], other=0.0)
            if USE_DOT:
                acc = tl.dot(xt.to(DOT_DTYPE), tl.trans(s.to(DOT_DTYPE)), acc, input_precision=PRECISION)
            else:
                acc += tl.sum(xt.to(tl.float32)[:, None, :] * s.to(tl.float32)[None, :, :], axis=2)
        offs_r = (pid_b * TH + offs_i).to(tl.int64)
        _store_tile(Y_ptr + offs_m[:, None] * stride_ym + offs_r[None, :] * stride_yr, acc,
                    m_ok[:, None] & i_ok[None, :], ACCUMULATE)

    @triton.jit
    def _sddmm_block_kernel(
        D_ptr, stride_dm, stride_dn,
        X_ptr, stride_xm, stride_xk,
        Row0_ptr, Col0_ptr, Base_ptr, RowLen_ptr, O_ptr,
        M, N, K,
        USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # One block per program: its (BH, BW) gradient is D[:, rows]ᵀ X[:, cols] reduced over all
        # tokens, written straight into the block's strided slice of d sp_values.
        b = tl.program_id(0)
        rows = tl.load(Row0_ptr + b) + tl.arange(0, BH)
        cols = tl.load(Col0_ptr + b) + tl.arange(0, BW)
        r_ok = rows < N
        c_ok = cols < K
        acc = tl.zeros((BH, BW), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_ok = offs_m < M
            d = tl.load(D_ptr + offs_m[None, :] * stride_dm + rows[:, None].to(tl.int64) * stride_dn,
                        mask=r_ok[:, None] & m_ok[None, :], other=0.0)
            x = tl.load(X_ptr + offs_m[:, None] * stride_xm + cols[None, :].to(tl.int64) * stride_xk,
                        mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            if USE_DOT:
                acc = tl.dot(d.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=PRECISION)
            else:
                acc += tl.sum(d.to(tl.float32)[:, :, None] * x.to(tl.float32)[None, :, :], axis=1)
        base = tl.load(Base_ptr + b)
        rowlen = tl.load(RowLen_ptr + b)
        addr = base + tl.arange(0, BH)[:, None] * rowlen + tl.arange(0, BW)[None, :]
        tl.store(O_ptr + addr, acc.to(O_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------
def _token_major(t: Tensor) -> Tensor:
    # The uniform gathers read one column of t per nonzero: with tokens contiguous each gather is
    # a coalesced segment instead of one memory sector per token.
    return t if t.stride(0) == 1 else t.t().contiguous().t()


def _sparse_blocks(interp: bool):
    return (32, 32) if interp else (64, 32)


def _triton_spmm(x, sp_values, support, out, transpose):
    """out (M, R) += x Tᵀ, T = S (R = N) or Sᵀ (R = K, ``transpose``); out is written in place."""
    M = x.shape[0]
    N, K = support.shape
    R, C = (K, N) if transpose else (N, K)
    interp = _backend.tile_arch(x.device) is None
    if support.kind == "uniform":
        index, row_ptr, t_row_ptr, t_pos = support.parts
        xt = _token_major(x)
        bm, br = _sparse_blocks(interp)
        grid = (triton.cdiv(M, bm), triton.cdiv(R, br))
        _spmm_csr_kernel[grid](
            xt, xt.stride(0), xt.stride(1),
            sp_values, sp_values.stride(0), t_row_ptr if transpose else row_ptr, t_pos, index, K,
            out, out.stride(0), out.stride(1),
            M, R,
            TRANS=transpose, ACCUMULATE=True, BLOCK_M=bm, BLOCK_R=br,
        )
        return out
    _, b_ptr, b_row0, b_col0, b_base, b_rowlen, t_b_ptr, t_order = support.parts
    bh, bw = support.block
    th, tw = (bw, bh) if transpose else (bh, bw)
    use_dot = th >= 16 and tw >= 16
    # Tensor-core tiles want 64+ tokens; the CUDA-core fallback keeps its 3-D product small.
    bm = 32 if interp or not use_dot else 64
    if not use_dot:
        bm = max(16, min(bm, 2048 // (th * tw)))
    n_tiles = (t_b_ptr if transpose else b_ptr).numel() - 1
    _spmm_block_kernel[(triton.cdiv(M, bm), n_tiles)](
        x, x.stride(0), x.stride(1),
        sp_values, sp_values.stride(0), t_b_ptr if transpose else b_ptr, t_order, b_row0, b_col0, b_base, b_rowlen,
        out, out.stride(0), out.stride(1),
        M, R, C,
        TRANS=transpose, ACCUMULATE=True, USE_DOT=use_dot,
        DOT_DTYPE=tile_config.TL_DTYPES[sp_values.dtype], PRECISION=tile_config.dot_precision(sp_values.dtype, x.dtype),
        TH=th, TW=tw, BLOCK_M=bm,
    )
    return out


def triton_sddmm(dy, x, sp_values, support, out=None):
    """out (nnz) = (dyᵀ x) at the support, in sp_values' dtype."""
    M = x.shape[0]
    N, K = support.shape
    if out is None:
        # contiguous whatever sp_values' layout: the kernels write it densely
        out = torch.empty(sp_values.shape, device=sp_values.device, dtype=sp_values.dtype)
    interp = _backend.tile_arch(x.device) is None
    if support.kind == "uniform":
        dyt, xt = _token_major(dy), _token_major(x)
        bp, bm = (32, 32) if interp else (128, 32)
        _sddmm_csr_kernel[(triton.cdiv(support.nnz, bp),)](
            dyt, dyt.stride(0), dyt.stride(1),
            xt, xt.stride(0), xt.stride(1),
            support.index, out,
            M, K, support.nnz,
            BLOCK_P=bp, BLOCK_M=bm,
        )
        return out
    _, _, b_row0, b_col0, b_base, b_rowlen, _, _ = support.parts
    bh, bw = support.block
    use_dot = bh >= 16 and bw >= 16
    bm = 32 if interp or not use_dot else 64
    if not use_dot:
        bm = max(16, min(64, 4096 // (bh * bw)))
    _sddmm_block_kernel[(b_row0.numel(),)](
        dy, dy.stride(0), dy.stride(1),
        x, x.stride(0), x.stride(1),
        b_row0, b_col0, b_base, b_rowlen, out,
        M, N, K,
        USE_DOT=use_dot, DOT_DTYPE=tile_config.TL_DTYPES[sp_values.dtype],
        PRECISION=tile_config.dot_precision(sp_values.dtype, x.dtype),
        BH=bh, BW=bw, BLOCK_M=bm,
    )
    return out


def triton_forward(x2, lr_A, lr_B, sp_values, support, bias, scaling, out=None):
    adt = lr_A.dtype
    h = gemm.down_proj(x2, lr_A, adt)
    # The shared GEMM with an empty base (K = 0): just s·h Bᵀ + bias, one (M, N) write.
    y = gemm.lowrank_gemm(x2[:, :0], lr_B[:, :0], h, lr_B, scaling, adt, bias=bias, out=out, out_dtype=x2.dtype)
    if support is not None and support.nnz:
        _triton_spmm(x2, sp_values, support, y, transpose=False)
    return y, h


def triton_backward(dy, x2, lr_A, lr_B, sp_values, support, h, scaling, need_dx):
    adt = lr_A.dtype
    g = gemm.down_proj(dy, lr_B.t(), adt)
    dB = (gemm.outer_reduce(h, dy, adt) * scaling).t().to(adt)
    dA = (gemm.outer_reduce(g, x2, adt) * scaling).to(adt)
    dvals = None
    if support is not None:
        dvals = triton_sddmm(dy, x2, sp_values, support) if support.nnz else torch.empty_like(sp_values)
    dx = None
    if need_dx:
        At = lr_A.t()
        dx = gemm.lowrank_gemm(dy[:, :0], At[:, :0], g, At, scaling, adt, out_dtype=dy.dtype)
        if support is not None and support.nnz:
            _triton_spmm(dy, sp_values, support, dx, transpose=True)
    return dx, dA, dB, dvals


# ----------------------------------------------------------------------------------------------
# CUDA launchers (csrc/sparse_lowrank.cu, csrc/sparse_lowrank_binding.cpp): the sparse passes in CUDA, the
# low-rank GEMMs in cuBLAS through ATen
# ----------------------------------------------------------------------------------------------
def _cuda_spmm(x, sp_values, support, out, transpose):
    ext = _backend.cuda_extension()
    # Both CUDA kernels read x along tokens (see csrc/sparse_lowrank.cu).
    x = _token_major(x)
    if support.kind == "uniform":
        index, row_ptr, t_row_ptr, t_pos = support.parts
        ext.sparse_lowrank_spmm_csr(x, sp_values, index, t_row_ptr if transpose else row_ptr,
                                    t_pos if transpose else None, out, support.shape[1], transpose)
        return out
    _, b_ptr, b_row0, b_col0, b_base, b_rowlen, t_b_ptr, t_order = support.parts
    bh, bw = support.block
    ext.sparse_lowrank_spmm_block(
        x, sp_values, t_b_ptr if transpose else b_ptr, t_order if transpose else None,
        b_row0, b_col0, b_base, b_rowlen, out, bh, bw, transpose,
    )
    return out


def _cuda_sddmm(dy, x, sp_values, support):
    ext = _backend.cuda_extension()
    dy, x = _token_major(dy), _token_major(x)
    if support.kind == "uniform":
        return ext.sparse_lowrank_sddmm_csr(dy, x, support.index, sp_values)
    _, _, b_row0, b_col0, b_base, b_rowlen, _, _ = support.parts
    bh, bw = support.block
    return ext.sparse_lowrank_sddmm_block(dy, x, b_row0, b_col0, b_base, b_rowlen, sp_values, bh, bw)


def cuda_forward(x2, lr_A, lr_B, sp_values, support, bias, scaling):
    adt = lr_A.dtype
    h = (x2.to(adt) @ lr_A.t()).float()
    y = torch.mm(h.to(adt), lr_B.t()).mul_(scaling)
    if bias is not None:
        y += bias
    y = y.to(x2.dtype)
    if support is not None and support.nnz:
        _cuda_spmm(x2, sp_values, support, y, transpose=False)
    return y, h


def cuda_backward(dy, x2, lr_A, lr_B, sp_values, support, h, scaling, need_dx):
    adt = lr_A.dtype
    dya = dy.to(adt)
    g = dya @ lr_B
    dA = (g.t() @ x2.to(adt)).mul_(scaling)
    dB = (dya.t() @ h.to(adt)).mul_(scaling)
    dvals = None
    if support is not None:
        dvals = _cuda_sddmm(dy, x2, sp_values, support) if support.nnz else torch.empty_like(sp_values)
    dx = None
    if need_dx:
        dx = (g @ lr_A).mul_(scaling).to(dy.dtype)
        if support is not None and support.nnz:
            _cuda_spmm(dy, sp_values, support, dx, transpose=True)
    return dx, dA, dB, dvals
