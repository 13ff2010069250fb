"""The kernels of vera_linear, randlora_linear and nola_linear (ops/random_basis.py): NOLA's Triton
kernels, the Triton launchers of the shared products and the CUDA extension's calls
(csrc/random_basis.cu, csrc/random_basis_binding.cpp).

``Layout``: the two bases D (R, K) and U (R, N) as ops/gemm.py Basis operands; ops/random_basis.py
builds it per call from the method's bases and scales (views and strides, no copies).
``triton_forward`` / ``triton_backward``: down_proj for h, one lowrank_gemm with s·h U as extra
K-steps of the base accumulator; dh, dx with its masked tail and basis_reduce for the scales' gradients.
``nola_combine`` / ``nola_project``: NOLA's Ā, B̄ formed from seeded bases and LoRA's gradients
projected onto them, the bases drawn inside the kernels and never stored.
``cuda_basis``, ``cuda_forward`` / ``cuda_backward``: the binding's arguments and calls.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lowrank_kernels import backend as _backend
from lowrank_kernels.ops import _rng, gemm, tile_config

# ----------------------------------------------------------------------------------------------
# Triton kernels: NOLA's combinations of seeded bases and the projections onto them (the VeRA and
# RandLoRA products run on ops/gemm.py's kernels)
# ----------------------------------------------------------------------------------------------
if _backend.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _nola_basis(k0, k1, i, rows, a, c):
        """G_i[a, c] of nola_bases (exact in fp32); a, c int64 tensors, i a base index."""
        return _rng.tl_uniform(k0, k1, a + tl.cast(i, tl.int64) * rows, c) * 2.0 - 1.0

    @triton.jit(do_not_specialize=["k0", "k1"])
    def _nola_combine_kernel(
        C_ptr, stride_c,        # coefficients (n_bases,)
        O_ptr,                  # output (rows, cols), contiguous fp32
        n_bases, rows, cols,
        k0, k1,                 # keys of the bases' seed
        BLOCK: tl.constexpr,
    ):
        """O = Σ_i c_i G_i over a BLOCK of O's flat elements; the bases are drawn, never stored."""
        e = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        a = e // cols
        c = e - a * cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, n_bases):
            acc += tl.load(C_ptr + i * stride_c).to(tl.float32) * _nola_basis(k0, k1, i, rows, a, c)
        tl.store(O_ptr + e, acc, mask=e < rows * cols)

    @triton.jit(do_not_specialize=["k0", "k1"])
    def _nola_project_kernel(
        D_ptr, stride_da, stride_dc,    # D (rows, cols)
        P_ptr, stride_ps,               # partials (splits, n_bases) fp32
        n_bases, rows, cols, elems_per_split,
        k0, k1,
        BLOCK_I: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """P[split, i] = Σ D ⊙ G_i over the split's flat elements of D, for BLOCK_I bases."""
        offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        pid_s = tl.program_id(1)
        start = pid_s * elems_per_split
        end = tl.minimum(start + elems_per_split, rows * cols)
        acc = tl.zeros((BLOCK_I, BLOCK_E), dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            e = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
            ok = e < end
            a = e // cols
            c = e - a * cols
            d = tl.load(D_ptr + a * stride_da + c * stride_dc, mask=ok, other=0.0).to(tl.float32)
            g = _nola_basis(k0, k1, offs_i[:, None], rows, a[None, :], c[None, :])
            acc += tl.where(ok[None, :], g * d[None, :], 0.0)
        tl.store(P_ptr + pid_s * stride_ps + offs_i, tl.sum(acc, axis=1), mask=offs_i < n_bases)


def nola_combine(coef: Tensor, seed: int, rows: int, cols: int) -> Tensor:
    """fp32 (rows, cols) = Σ_i coef_i G_i with G = nola_bases(len(coef), rows, cols, seed)."""
    out = torch.empty((rows, cols), device=coef.device, dtype=torch.float32)
    block = 256
    _nola_combine_kernel[(triton.cdiv(rows * cols, block),)](
        coef, coef.stride(0), out, coef.shape[0], rows, cols, *_rng.split_seed(seed), BLOCK=block,
    )
    return out


def nola_project(d: Tensor, seed: int, n_bases: int) -> Tensor:
    """fp32 (n_bases,), entry i = Σ d ⊙ G_i with G = nola_bases(n_bases, *d.shape, seed); the sum over
    d's elements is split to fill the GPU, into partials added in a fixed order (no atomics)."""
    rows, cols = d.shape
    block_i, block_e = 16, 128
    i_tiles = triton.cdiv(n_bases, block_i)
    splits, per_split = tile_config.m_splits(rows * cols, i_tiles, block_e, d.device)
    partial = torch.empty((splits, n_bases), device=d.device, dtype=torch.float32)
    _nola_project_kernel[(i_tiles, splits)](
        d, d.stride(0), d.stride(1), partial, partial.stride(0), n_bases, rows, cols, per_split,
        *_rng.split_seed(seed), BLOCK_I=block_i, BLOCK_E=block_e,
    )
    return partial.sum(0)


# ----------------------------------------------------------------------------------------------
# The two bases as ops/gemm.py Basis operands (built by ops/random_basis.py)
# ----------------------------------------------------------------------------------------------
class Layout(NamedTuple):
    down: gemm.Basis      # D (R, K)
    up: gemm.Basis        # U (R, N)
    scaled_is_down: bool    # which one carries the trainable scales (VeRA, RandLoRA)
    # NOLA: ((seed, count) of the A bases, (seed, count) of the B bases); D = Ā and U = B̄ᵀ are
    # their combinations, formed per call
    nola: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------
# Triton launchers (kernels in ops/gemm.py)
# ----------------------------------------------------------------------------------------------
def triton_forward(x2, weight, bias, lay: Layout, scaling, adt, dropout, out=None):
    h = gemm.down_proj(x2, lay.down, adt, dropout=dropout)
    y = gemm.lowrank_gemm(x2, weight, h, lay.up, scaling, adt, bias=bias, out=out)
    return y, h


def triton_backward(dy, x2, weight, lay: Layout, h, scaling, adt, dropout, need_dx):
    dh = gemm.down_proj(dy, lay.up, adt)
    dx = None
    if need_dx:
        dx = gemm.lowrank_gemm(dy, weight.t(), dh, lay.down, scaling, adt, tail_dropout=dropout)
    if lay.nola is not None:
        # dĀ (r, K) and dB̄ᵀ (r, N), as LoRA's, projected onto the bases that formed Ā and B̄.
        d_row = nola_project(gemm.outer_reduce(dh, x2, adt, dropout=dropout), *lay.nola[0])
        d_col = nola_project(gemm.outer_reduce(h, dy, adt).t(), *lay.nola[1])
    elif lay.scaled_is_down:
        d_row, d_col = gemm.basis_reduce(dh, x2, lay.down, adt, dropout=dropout)
    else:
        d_row, d_col = gemm.basis_reduce(h, dy, lay.up, adt)
    return dx, d_row * scaling, d_col * scaling


# ----------------------------------------------------------------------------------------------
# CUDA launchers (csrc/random_basis.cu, csrc/random_basis_binding.cpp)
# ----------------------------------------------------------------------------------------------
def cuda_basis(b: gemm.Basis) -> tuple:
    """A Basis as the binding's tuple: (rows, cols, tensor, stride_hi, stride_lo, stride_f, groups,
    row_scale, row_scale_stride_hi, row_scale_stride_lo, col_scale, k0, k1, gen, transposed),
    gen 0 for a stored base, 1 uniform, 2 sign (csrc/random_basis.h, Basis)."""
    k0, k1 = _rng.split_seed(b.seed) if b.seed is not None else (0, 0)
    gen = 0 if b.seed is None else gemm.DISTS[b.dist]
    return (b.rows, b.cols, b.tensor, *b.strides, b.groups, b.row_scale, *b.row_scale_strides, b.col_scale,
            k0, k1, gen, b.transposed)


def cuda_forward(x2, weight, bias, lay: Layout, scaling, dropout, out=None):
    M, N = x2.shape[0], weight.shape[0]
    y = out if out is not None else torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    h = torch.empty((M, lay.down.rows), device=x2.device, dtype=torch.float32)
    k0, k1, threshold, keep_scale = gemm.dropout_args(dropout)
    _backend.cuda_extension().random_basis_fwd(
        x2, weight, bias, cuda_basis(lay.down), cuda_basis(lay.up), y, h, float(scaling),
        threshold, k0, k1, keep_scale,
    )
    return y, h


def cuda_backward(dy, x2, weight, lay: Layout, h, scaling, dropout, need_dx):
    dx = torch.empty(x2.shape, device=x2.device, dtype=x2.dtype) if need_dx else None
    k0, k1, threshold, keep_scale = gemm.dropout_args(dropout)
    d_row, d_col = _backend.cuda_extension().random_basis_bwd(
        dy, x2, weight, cuda_basis(lay.down), cuda_basis(lay.up), h, dx, float(scaling),
        threshold, k0, k1, keep_scale, lay.scaled_is_down,
    )
    return dx, d_row, d_col
