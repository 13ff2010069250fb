"""Sparse-plus-low-rank linear (SLTrain): y = s · (x Aᵀ) Bᵀ + x Sᵀ + bias.

Shapes (x flattened to (M, K) over its leading dims): lr_A A (r, K), lr_B B (N, r), bias (N),
and S (N, K) sparse on a fixed support of nnz entries whose values ``sp_values`` (nnz) train.
The support is SLTrain's convention: the sorted flat row-major indices into N×K, and
``sp_values[i]`` is the entry at ``sp_index[i]``. There is no frozen base weight: W = s·BA + S
is the whole layer, and it is never formed as a dense N×K matrix by the kernels.

Forward, with h = x Aᵀ (M, r) kept for backward:
    y = s · h Bᵀ + x Sᵀ + bias
Backward, with g = dy B (M, r):
    dB = s · dyᵀ h      dA = s · gᵀ x      dx = s · g A + dy S
    d sp_values = (dyᵀ x) sampled at the support: an SDDMM, 2·M·nnz flops, never the dense dyᵀ x.
``method="lowrank"`` (no sparse part: ``sp_values`` and ``sp_index`` None) is W = s·BA alone.

Supports (``prepare_support``/``random_support``):
- "uniform": single entries anywhere (SLTrain's random support). Kept as CSR of S and of Sᵀ;
  the sparse products are gathers on CUDA cores, one fp32 FMA per (token, nonzero).
- "block": a union of whole aligned bh×bw blocks (e.g. 1×16, 16×16) at the same density. Kept as a
  block list in both orders; each block is one small dense product (tl.dot on tensor cores when
  bh, bw >= 16) with contiguous loads. The values keep the flat-index order, so a block's values
  are a strided 2-D slice of ``sp_values``: nothing is permuted or copied.

Precision: x and bias share one dtype (the output's); A, B and sp_values share one dtype, x's or
fp32. Low-rank products and block products run in the parameter dtype, the uniform gathers in
fp32; everything accumulates in fp32. The Triton forward writes the low-rank part (rounded once to
the output dtype) and then adds the sparse part to it in fp32, so half-precision outputs carry at
most one extra rounding.

Implementations, selected per call by ``backend`` (see lowrank_kernels.backend):
- reference: plain torch, the specification. It builds the dense S (as SLTrain's own code does).
- triton: forward = skinny h = x Aᵀ, the shared low-rank GEMM for s·h Bᵀ + bias, then one sparse
  pass adding x Sᵀ into the output tile by tile. Backward = g = dy B, the low-rank GEMM for s·g A
  plus a sparse pass adding dy S, split-M reductions for dA, dB, and the SDDMM.
- cuda: csrc/sparse_lowrank.cu for the sparse passes, cuBLAS (through ATen) for the GEMMs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _checks, _tiles

_INT32_MAX = 2**31 - 1
SUPPORTS = ("uniform", "block")


# ----------------------------------------------------------------------------------------------
# The support: validated once, kept in the formats the kernels read
# ----------------------------------------------------------------------------------------------
class SparseSupport:
    """A fixed sparsity pattern of an (N, K) matrix, from ``prepare_support``.

    Attributes: ``shape`` (N, K), ``nnz``, ``kind`` ("uniform" or "block"), ``block`` ((bh, bw)
    or None), ``index`` (the sorted flat int64 indices, nnz), and ``parts``: the index followed by
    the int32 arrays the kernels read (see ``_uniform_parts`` / ``_block_parts``).
    """

    def __init__(self, shape, kind, block, parts):
        self.shape = (int(shape[0]), int(shape[1]))
        self.kind = kind
        self.block = block
        self.parts = tuple(parts)

    @property
    def index(self) -> Tensor:
        return self.parts[0]

    @property
    def nnz(self) -> int:
        return self.parts[0].numel()

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    def to(self, device) -> "SparseSupport":
        """The same support on another device (no re-validation)."""
        return SparseSupport(self.shape, self.kind, self.block, [p.to(device) for p in self.parts])

    def with_parts(self, parts: Sequence[Tensor]) -> "SparseSupport":
        """The same support over other tensors of the same layout (e.g. a module's moved buffers)."""
        return SparseSupport(self.shape, self.kind, self.block, parts)

    @property
    def part_names(self) -> tuple[str, ...]:
        return PART_NAMES[self.kind]

    def __repr__(self) -> str:
        blk = f", block={self.block}" if self.block else ""
        return f"SparseSupport(shape={self.shape}, nnz={self.nnz}, kind={self.kind!r}{blk}, device={self.device})"


# index (the kernels derive an entry's row and column from it); CSR of S: row pointers (N+1);
# CSR of Sᵀ: row pointers (K+1) and each entry's position in sp_values. 12 bytes per entry.
_UNIFORM_PART_NAMES = ("index", "row_ptr", "t_row_ptr", "t_pos")
# index; blocks in block-row order: block-row pointers, first row, first column, offset of the
# block's (0, 0) entry in sp_values, and the value stride between its rows; Sᵀ order: block-column
# pointers and the block ids in that order.
_BLOCK_PART_NAMES = ("index", "b_ptr", "b_row0", "b_col0", "b_base", "b_rowlen", "t_b_ptr", "t_order")
PART_NAMES = {"uniform": _UNIFORM_PART_NAMES, "block": _BLOCK_PART_NAMES}


def _i32(t: Tensor) -> Tensor:
    return t.to(torch.int32).contiguous()


def _row_pointers(keys: Tensor, n: int) -> Tensor:
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=keys.device)
    ptr[1:] = torch.cumsum(torch.bincount(keys, minlength=n), 0)
    return ptr


def transpose_positions(index: Tensor, K: int) -> Tensor:
    """``t_pos`` of a uniform support: the entries' positions in Sᵀ's CSR order (by column, each
    column's entries in row order), int32, from the sorted flat ``index`` of an (N, K) matrix."""
    return _i32(torch.sort(index % K, stable=True).indices)


def _uniform_parts(index: Tensor, N: int, K: int) -> list[Tensor]:
    rows, cols = index // K, index % K
    return [index, _i32(_row_pointers(rows, N)), _i32(_row_pointers(cols, K)), transpose_positions(index, K)]


def _block_parts(index: Tensor, N: int, K: int, bh: int, bw: int) -> list[Tensor]:
    rows, cols = index // K, index % K
    n_br, n_bc = -(-N // bh), -(-K // bw)
    keys, counts = torch.unique(rows // bh * n_bc + cols // bw, return_counts=True)
    brow, bcol = keys // n_bc, keys % n_bc
    heights = torch.clamp(N - brow * bh, max=bh)
    widths = torch.clamp(K - bcol * bw, max=bw)
    bad = counts != heights * widths
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"sp_index is not a union of whole {bh}x{bw} blocks: the block at rows "
            f"{int(brow[i]) * bh}.., columns {int(bcol[i]) * bw}.. holds {int(counts[i])} of its "
            f"{int(heights[i] * widths[i])} entries"
        )
    # In flat-index order every row of block-row i lists the entries of that block-row's blocks
    # in column order: entry (row0 + a, col0 + b) of a block sits at
    #   before(i) + a · rowlen(i) + colstart(block) + b.
    rowlen = torch.zeros(n_br, dtype=torch.int64, device=index.device).index_add_(0, brow, widths)
    height_of_brow = torch.clamp(N - torch.arange(n_br, device=index.device) * bh, max=bh)
    before = torch.cumsum(rowlen * height_of_brow, 0) - rowlen * height_of_brow
    b_ptr = _row_pointers(brow, n_br)
    colstart = torch.cumsum(widths, 0) - widths - (torch.cumsum(widths, 0) - widths)[b_ptr[brow]]
    base = before[brow] + colstart
    t_order = torch.sort(bcol, stable=True).indices
    return [index, _i32(b_ptr), _i32(brow * bh), _i32(bcol * bw), _i32(base), _i32(rowlen[brow]),
            _i32(_row_pointers(bcol, n_bc)), _i32(t_order)]


def _check_shape(shape) -> tuple[int, int]:
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise ValueError(f"shape must be (out_features, in_features) with positive ints, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_block(block) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1) for b in block)):
        raise ValueError(f"block must be (height, width) with powers of two, e.g. (16, 16) or (1, 16), got {block!r}")
    return int(block[0]), int(block[1])


def prepare_support(sp_index: Tensor, shape, block=None) -> SparseSupport:
    """Validate a sparse support once and convert it to the kernels' formats.

    Args:
        sp_index: (nnz,) integer tensor of flat row-major indices into an (N, K) matrix, strictly
            increasing (sorted, no duplicates): SLTrain's convention. nnz may be 0.
        shape: (N, K) = (out_features, in_features).
        block: None for a "uniform" support (any entries), or (bh, bw), powers of two, for a
            "block" support: ``sp_index`` must then be a union of whole aligned bh×bw blocks
            (blocks on the last rows/columns are clipped to the matrix).

    Returns:
        A SparseSupport on ``sp_index``'s device. Passing it to ``sparse_lowrank_linear`` does no
        validation and no host synchronisation.
    """
    N, K = _check_shape(shape)
    if not isinstance(sp_index, Tensor):
        raise TypeError(f"sp_index must be a torch.Tensor, got {type(sp_index).__name__}")
    if sp_index.dtype.is_floating_point or sp_index.dtype.is_complex or sp_index.dtype == torch.bool:
        raise TypeError(f"sp_index must be an integer tensor (int64 flat indices), got {sp_index.dtype}")
    if sp_index.dim() != 1:
        raise ValueError(f"sp_index must be 1-D (nnz,), got shape {tuple(sp_index.shape)}")
    if sp_index.is_meta:
        raise ValueError("sp_index is a meta tensor: a support's kernel formats are built from its entries, which a "
                         "meta tensor lacks (the low-rank-only op, sp_values=None, runs on meta tensors)")
    index = sp_index.to(torch.int64).contiguous()
    nnz = index.numel()
    if nnz > N * K:
        raise ValueError(f"sp_index has {nnz} entries but an ({N}, {K}) matrix has only {N * K}")
    if nnz > _INT32_MAX:
        raise ValueError(f"sp_index has {nnz} entries; at most 2**31 - 1 are supported")
    if nnz:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= N * K:
            raise ValueError(f"sp_index out of range: entries must lie in [0, {N * K}) for shape ({N}, {K}), got [{lo}, {hi}]")
        step = index[1:] - index[:-1]
        if bool((step == 0).any()):
            raise ValueError("sp_index has duplicated entries: each position may appear once")
        if bool((step < 0).any()):
            raise ValueError("sp_index must be sorted in increasing order (SLTrain's convention); sort it and its values together")
    if block is None:
        return SparseSupport((N, K), "uniform", None, _uniform_parts(index, N, K))
    bh, bw = _check_block(block)
    return SparseSupport((N, K), "block", (bh, bw), _block_parts(index, N, K, bh, bw))


def random_support(shape, density: float, support: str = "uniform", block=(16, 16), generator=None, device=None) -> SparseSupport:
    """A random support at ``density`` (the fraction of the N×K entries), prepared.

    ``support="uniform"``: round(density·N·K) entries drawn uniformly without replacement (SLTrain).
    ``support="block"``: round(density·N·K / (bh·bw)) of the aligned bh×bw blocks drawn uniformly
    (clipped edge blocks make the density slightly lower). Draws come from ``generator`` (or
    torch's default generator) on the CPU, so a seed gives the same support on every device.
    """
    N, K = _check_shape(shape)
    _check_density(density)
    if support == "uniform":
        index = torch.randperm(N * K, generator=generator)[: int(round(density * N * K))]
        return prepare_support(torch.sort(index).values.to(device or "cpu"), (N, K))
    if support != "block":
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    bh, bw = _check_block(block)
    n_blocks = -(-N // bh) * -(-K // bw)
    picked = torch.randperm(n_blocks, generator=generator)[: int(round(density * N * K / (bh * bw)))]
    return _support_of_blocks(picked.to(device or "cpu"), N, K, bh, bw)


def _check_density(density) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be a float in [0, 1], got {density!r}")


def _support_of_blocks(block_ids: Tensor, N: int, K: int, bh: int, bw: int) -> SparseSupport:
    """The support made of the given aligned blocks (row-major block ids), clipped to N×K."""
    n_bc = -(-K // bw)
    rows = (block_ids // n_bc * bh)[:, None, None] + torch.arange(bh, device=block_ids.device)[None, :, None]
    cols = (block_ids % n_bc * bw)[:, None, None] + torch.arange(bw, device=block_ids.device)[None, None, :]
    keep = (rows < N) & (cols < K)
    return prepare_support(torch.sort((rows * K + cols)[keep]).values, (N, K), block=(bh, bw))


def magnitude_support(matrix: Tensor, density: float, support: str = "uniform", block=(16, 16)) -> SparseSupport:
    """The support holding the largest-magnitude entries of a dense (N, K) ``matrix`` (or, for
    ``support="block"``, its aligned bh×bw blocks of largest Frobenius norm), at ``density``.

    Used to initialise the sparse part from a residual W − s·BA (the LOST/WeLore idea). The values
    at the support are ``matrix.flatten()[support.index]``.
    """
    _check_density(density)
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        raise ValueError("matrix must be a 2-D tensor (out_features, in_features)")
    N, K = matrix.shape
    mag = matrix.detach().float().abs()
    if support == "uniform":
        top = torch.topk(mag.flatten(), int(round(density * N * K)), sorted=False).indices
        return prepare_support(torch.sort(top).values, (N, K))
    if support != "block":
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    bh, bw = _check_block(block)
    n_br, n_bc = -(-N // bh), -(-K // bw)
    padded = torch.zeros(n_br * bh, n_bc * bw, device=mag.device)
    padded[:N, :K] = mag.square()
    energy = padded.view(n_br, bh, n_bc, bw).sum((1, 3)).flatten()
    top = torch.topk(energy, min(energy.numel(), int(round(density * N * K / (bh * bw)))), sorted=False).indices
    return _support_of_blocks(top, N, K, bh, bw)


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
def _dense_sparse_part(values: Tensor, index: Tensor, N: int, K: int) -> Tensor:
    return torch.zeros(N * K, dtype=values.dtype, device=values.device).index_put((index,), values).view(N, K)


def sparse_lowrank_linear_reference(x, lr_A, lr_B, sp_values=None, sp_index=None, scaling=1.0, bias=None):
    """Differentiable plain-torch y = s · (x Aᵀ) Bᵀ + x Sᵀ + bias, with S built densely.

    ``sp_index`` is the flat index tensor or a SparseSupport; both None means no sparse part.
    Products run in the parameter dtype and the result is cast to x's dtype.
    """
    lead, K = x.shape[:-1], x.shape[-1]
    N = lr_B.shape[0]
    x2 = x.reshape(-1, K).to(lr_A.dtype)
    y = ((x2 @ lr_A.t()) @ lr_B.t()) * scaling
    if sp_values is not None:
        index = sp_index.index if isinstance(sp_index, SparseSupport) else sp_index
        y = y + x2 @ _dense_sparse_part(sp_values, index, N, K).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, N)


def _reference_forward(x2, lr_A, lr_B, sp_values, index, bias, scaling):
    adt = lr_A.dtype
    xa = x2.to(adt)
    h = xa @ lr_A.t()
    y = (h @ lr_B.t()) * scaling
    if sp_values is not None:
        y = y + xa @ _dense_sparse_part(sp_values, index, lr_B.shape[0], x2.shape[1]).t()
    if bias is not None:
        y = y + bias.to(adt)
    return y.to(x2.dtype), h.float()


def _reference_backward(dy, x2, lr_A, lr_B, sp_values, index, h, scaling, need_dx):
    adt = lr_A.dtype
    dya, xa = dy.to(adt), x2.to(adt)
    g = dya @ lr_B
    dA = (g.t() @ xa) * scaling
    dB = (dya.t() @ h.to(adt)) * scaling
    dvals = (dya.t() @ xa).flatten()[index] if sp_values is not None else None
    dx = None
    if need_dx:
        dx = (g @ lr_A) * scaling
        if sp_values is not None:
            dx = dx + dya @ _dense_sparse_part(sp_values, index, lr_B.shape[0], x2.shape[1])
        dx = dx.to(dy.dtype)
    return dx, dA, dB, dvals


# ----------------------------------------------------------------------------------------------
# Triton kernels: the sparse passes (the low-rank GEMMs are ops/_tiles.py's)
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
        DOT_DTYPE=_tiles._TL_DTYPES[sp_values.dtype], PRECISION=_tiles._precision(sp_values.dtype, x.dtype),
        TH=th, TW=tw, BLOCK_M=bm,
    )
    return out


def _triton_sddmm(dy, x, sp_values, support, out=None):
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
        USE_DOT=use_dot, DOT_DTYPE=_tiles._TL_DTYPES[sp_values.dtype],
        PRECISION=_tiles._precision(sp_values.dtype, x.dtype),
        BH=bh, BW=bw, BLOCK_M=bm,
    )
    return out


def _triton_forward(x2, lr_A, lr_B, sp_values, support, bias, scaling, out=None):
    adt = lr_A.dtype
    h = _tiles.down_proj(x2, lr_A, adt)
    # The shared GEMM with an empty base (K = 0): just s·h Bᵀ + bias, one (M, N) write.
    y = _tiles.lowrank_gemm(x2[:, :0], lr_B[:, :0], h, lr_B, scaling, adt, bias=bias, out=out, out_dtype=x2.dtype)
    if support is not None and support.nnz:
        _triton_spmm(x2, sp_values, support, y, transpose=False)
    return y, h


def _triton_backward(dy, x2, lr_A, lr_B, sp_values, support, h, scaling, need_dx):
    adt = lr_A.dtype
    g = _tiles.down_proj(dy, lr_B.t(), adt)
    dB = (_tiles.outer_reduce(h, dy, adt) * scaling).t().to(adt)
    dA = (_tiles.outer_reduce(g, x2, adt) * scaling).to(adt)
    dvals = None
    if support is not None:
        dvals = _triton_sddmm(dy, x2, sp_values, support) if support.nnz else torch.empty_like(sp_values)
    dx = None
    if need_dx:
        At = lr_A.t()
        dx = _tiles.lowrank_gemm(dy[:, :0], At[:, :0], g, At, scaling, adt, out_dtype=dy.dtype)
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


def _cuda_forward(x2, lr_A, lr_B, sp_values, support, bias, scaling):
    adt = lr_A.dtype
    h = (x2.to(adt) @ lr_A.t()).float()
    y = torch.mm(h.to(adt), lr_B.t()).mul_(scaling)
    if bias is not None:
        y += bias
    y = y.to(x2.dtype)
    if support is not None and support.nnz:
        _cuda_spmm(x2, sp_values, support, y, transpose=False)
    return y, h


def _cuda_backward(dy, x2, lr_A, lr_B, sp_values, support, h, scaling, need_dx):
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


# ----------------------------------------------------------------------------------------------
# torch.library ops: the support travels as its kind, block size and list of tensors
# ----------------------------------------------------------------------------------------------
def _support_args(support: Optional[SparseSupport]):
    if support is None:
        return [], "none", 0, 0, 0, 0
    bh, bw = support.block or (0, 0)
    return list(support.parts), support.kind, bh, bw, support.shape[0], support.shape[1]


def _rebuild_support(parts, kind, bh, bw, N, K) -> Optional[SparseSupport]:
    if kind == "none":
        return None
    return SparseSupport((N, K), kind, (bh, bw) if kind == "block" else None, parts)


@torch.library.custom_op("lowrank_kernels::sparse_lowrank_linear_fwd", mutates_args=())
def _slr_fwd_op(
    x: Tensor, lr_A: Tensor, lr_B: Tensor, sp_values: Optional[Tensor], parts: list[Tensor],
    kind: str, block_h: int, block_w: int, n_rows: int, n_cols: int,
    bias: Optional[Tensor], scaling: float, backend: str,
) -> tuple[Tensor, Tensor]:
    support = _rebuild_support(parts, kind, block_h, block_w, n_rows, n_cols)
    if x.shape[0] == 0:
        return x.new_empty((0, lr_B.shape[0])), x.new_empty((0, lr_A.shape[0]), dtype=torch.float32)
    if backend == "reference":
        index = support.index if support is not None else None
        return _reference_forward(x, lr_A, lr_B, sp_values, index, bias, scaling)
    impl = _triton_forward if backend == "triton" else _cuda_forward
    return impl(x, lr_A, lr_B, sp_values, support, bias, scaling)


@_slr_fwd_op.register_fake
def _(x, lr_A, lr_B, sp_values, parts, kind, block_h, block_w, n_rows, n_cols, bias, scaling, backend):
    return x.new_empty((x.shape[0], lr_B.shape[0])), x.new_empty((x.shape[0], lr_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lowrank_kernels::sparse_lowrank_linear_bwd", mutates_args=())
def _slr_bwd_op(
    dy: Tensor, x: Tensor, lr_A: Tensor, lr_B: Tensor, sp_values: Optional[Tensor], parts: list[Tensor],
    kind: str, block_h: int, block_w: int, n_rows: int, n_cols: int,
    h: Tensor, scaling: float, backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d lr_A, d lr_B, d sp_values); dx is empty when need_dx is False and
    d sp_values is empty when there is no sparse part."""
    support = _rebuild_support(parts, kind, block_h, block_w, n_rows, n_cols)
    if x.shape[0] == 0:
        dx, dA, dB = torch.zeros_like(x), torch.zeros_like(lr_A), torch.zeros_like(lr_B)
        dvals = torch.zeros_like(sp_values) if sp_values is not None else None
    elif backend == "reference":
        index = support.index if support is not None else None
        dx, dA, dB, dvals = _reference_backward(dy, x, lr_A, lr_B, sp_values, index, h, scaling, need_dx)
    else:
        impl = _triton_backward if backend == "triton" else _cuda_backward
        dx, dA, dB, dvals = impl(dy, x, lr_A, lr_B, sp_values, support, h, scaling, need_dx)
    if not need_dx:
        dx = x.new_empty((0,))
    if dvals is None:
        dvals = lr_A.new_empty((0,))
    return dx.contiguous(), dA.contiguous(), dB.contiguous(), dvals.contiguous()


@_slr_bwd_op.register_fake
def _(dy, x, lr_A, lr_B, sp_values, parts, kind, block_h, block_w, n_rows, n_cols, h, scaling, backend, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dvals = torch.empty_like(sp_values) if sp_values is not None else lr_A.new_empty((0,))
    return dx, torch.empty_like(lr_A), torch.empty_like(lr_B), dvals


# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources):
# the support's kernel formats are built from sp_index.
_SLR = dict(x="x", lr_A="lr_A", lr_B="lr_B", sp_values="sp_values", parts=("sp_index",))
LAYOUT_SOURCES = _checks.layout_sources({
    "sparse_lowrank_linear_fwd": {"sparse_lowrank_linear": dict(**_SLR, bias="bias")},
    "sparse_lowrank_linear_bwd": {"sparse_lowrank_linear": dict(dy="grad_output", **_SLR, h=None)},
})


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class SparseLowRankLinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op; saves x (no copy) and h (M, r) fp32 only."""

    @staticmethod
    def forward(ctx, x2, lr_A, lr_B, sp_values, bias, support, scaling, backend):
        sargs = _support_args(support)
        y, h = torch.ops.lowrank_kernels.sparse_lowrank_linear_fwd(
            x2, lr_A, lr_B, sp_values, *sargs, bias, scaling, backend
        )
        ctx.save_for_backward(x2, lr_A, lr_B, sp_values, h, *sargs[0])
        ctx.support_meta = sargs[1:]
        ctx.scaling, ctx.backend = scaling, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, lr_A, lr_B, sp_values, h, *parts = ctx.saved_tensors
        need_x, need_a, need_b, need_v, need_bias = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        dx, dA, dB, dvals = torch.ops.lowrank_kernels.sparse_lowrank_linear_bwd(
            dy, x2, lr_A, lr_B, sp_values, parts, *ctx.support_meta, h, ctx.scaling, ctx.backend, need_x
        )
        d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if (need_bias and ctx.has_bias) else None
        return (
            dx if need_x else None,
            dA if need_a else None,
            dB if need_b else None,
            dvals if (need_v and sp_values is not None) else None,
            d_bias,
            None, None, None,
        )


# ----------------------------------------------------------------------------------------------
# Validation and the functional entry point
# ----------------------------------------------------------------------------------------------
def _check_inputs(x, lr_A, lr_B, sp_values, sp_index, scaling, bias) -> Optional[SparseSupport]:
    """Validate everything and return the prepared support (None for the low-rank-only op)."""
    _checks.check_float("x", x, dtypes=_checks.KERNEL_DTYPES)
    _checks.check_float("lr_A", lr_A, 2, dtypes=_checks.KERNEL_DTYPES)
    _checks.check_float("lr_B", lr_B, 2, dtypes=_checks.KERNEL_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    _checks.check_in_features(x)
    K = x.shape[-1]
    r, N = lr_A.shape[0], lr_B.shape[0]
    if r == 0:
        raise ValueError("lr_A has rank 0: the rank r (lr_A.shape[0]) must be >= 1")
    if lr_A.shape[1] != K:
        raise ValueError(f"lr_A must be (r, in_features) = (r, {K}) to match x's last dim, got {tuple(lr_A.shape)}")
    if lr_B.shape[1] != r:
        raise ValueError(f"lr_B must be (out_features, r) with r = {r} (lr_A.shape[0]), got {tuple(lr_B.shape)}")
    if r > min(N, K):
        raise ValueError(f"rank r = {r} exceeds min(out_features, in_features) = {min(N, K)}")
    if lr_B.dtype != lr_A.dtype:
        raise TypeError(f"lr_B dtype {lr_B.dtype} must equal lr_A dtype {lr_A.dtype}")
    if lr_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lr_A has dtype {lr_A.dtype} for x of dtype {x.dtype}; parameters must share x's dtype or be float32")
    tensors = {"lr_A": lr_A, "lr_B": lr_B}
    if (sp_values is None) != (sp_index is None):
        raise ValueError("sp_values and sp_index go together: give both, or neither for the low-rank-only op")
    support = None
    if sp_values is not None:
        _checks.check_float("sp_values", sp_values, 1, dtypes=_checks.KERNEL_DTYPES)
        if sp_values.dtype != lr_A.dtype:
            raise TypeError(f"sp_values dtype {sp_values.dtype} must equal lr_A dtype {lr_A.dtype}")
        if isinstance(sp_index, SparseSupport):
            support = sp_index
            if support.shape != (N, K):
                raise ValueError(f"sp_index is a support of shape {support.shape} but the layer is ({N}, {K})")
        elif isinstance(sp_index, Tensor):
            if sp_index.device != x.device:
                raise ValueError(f"sp_index is on {sp_index.device} but x is on {x.device}: all tensors must share one device")
            support = prepare_support(sp_index, (N, K))
        else:
            raise TypeError(f"sp_index must be a flat index tensor or a SparseSupport from prepare_support, got {type(sp_index).__name__}")
        if sp_values.numel() != support.nnz:
            raise ValueError(f"sp_values has {sp_values.numel()} entries but sp_index has {support.nnz} (nnz must match)")
        tensors["sp_values"] = sp_values
        tensors["sp_index"] = support.index
    _checks.check_bias(bias, N, x)
    _checks.check_same_device("x", x, bias=bias, **tensors)
    _checks.check_scalar("scaling", scaling)
    return support


@_auto_backend.tuned("sparse_lowrank_linear")
def sparse_lowrank_linear(x, lr_A, lr_B, sp_values=None, sp_index=None, scaling=1.0, bias=None, backend=None):
    """Sparse-plus-low-rank linear (SLTrain): ``scaling · (x Aᵀ) Bᵀ + x Sᵀ + bias``.

    Args:
        x: (..., K) input, float32/float16/bfloat16, any leading dims, may be non-contiguous.
        lr_A: (r, K) and lr_B: (N, r), the low-rank factors; x's dtype or float32.
        sp_values: (nnz,) the trainable values of S, lr_A's dtype; None for the low-rank-only op.
        sp_index: where the values sit: a SparseSupport from ``prepare_support``/``random_support``
            (validated once: the fast path a module uses), or the sorted flat int64 index tensor
            (nnz,) into N×K (validated and converted on every call); None with sp_values None.
        scaling: s = alpha / r.
        bias: optional (N,), x's dtype.
        backend: None, "reference", "triton" or "cuda" (see lowrank_kernels.backend).

    Returns:
        (..., N) tensor in x's dtype. Gradients flow to x, lr_A, lr_B, sp_values and bias.
    """
    support = _check_inputs(x, lr_A, lr_B, sp_values, sp_index, scaling, bias)
    backend = _backend.resolve("sparse_lowrank_linear", backend, x=x)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    args = (x2, lr_A, lr_B, sp_values, bias, support, float(scaling), backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
        y = SparseLowRankLinearFunction.apply(*args)
    else:
        y, _ = torch.ops.lowrank_kernels.sparse_lowrank_linear_fwd(
            x2, lr_A, lr_B, sp_values, *_support_args(support), bias, float(scaling), backend
        )
    return y.reshape(*lead, lr_B.shape[0])


SPARSE_LOWRANK = registry.declare(
    "sparse_lowrank_linear", "y = x (S + s·BA)ᵀ + bias, S sparse on a fixed support (SLTrain)",
    library_ops=(torch.ops.lowrank_kernels.sparse_lowrank_linear_fwd, torch.ops.lowrank_kernels.sparse_lowrank_linear_bwd),
    reference=registry.Impl(registry.REFERENCE),
    triton=registry.Impl(registry.TRITON),
    cuda=registry.Impl(registry.CUDA),
)
