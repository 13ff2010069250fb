"""The sparse support of sparse_lowrank_linear (SLTrain): a fixed pattern of an (N, K) matrix,
validated once and kept in the formats the kernels read.

The support is SLTrain's convention: the sorted flat row-major indices into N×K, and
``sp_values[i]`` is the entry at ``sp_index[i]``. Supports (``prepare_support``/``random_support``):
- "uniform": single entries anywhere (SLTrain's random support). Kept as CSR of S and of Sᵀ.
- "block": a union of whole aligned bh×bw blocks (e.g. 1×16, 16×16). Kept as a block list in both
  orders; the values keep the flat-index order, so a block's values are a strided 2-D slice of
  ``sp_values``: nothing is permuted or copied.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

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
            raise ValueError(f"sp_index out of range: entries must lie in [0, {N * K}) for shape ({N}, {K}), "
                             f"got [{lo}, {hi}]")
        step = index[1:] - index[:-1]
        if bool((step == 0).any()):
            raise ValueError("sp_index has duplicated entries: each position may appear once")
        if bool((step < 0).any()):
            raise ValueError("sp_index must be sorted in increasing order (SLTrain's convention); sort it and its "
                             "values together")
    if block is None:
        return SparseSupport((N, K), "uniform", None, _uniform_parts(index, N, K))
    bh, bw = _check_block(block)
    return SparseSupport((N, K), "block", (bh, bw), _block_parts(index, N, K, bh, bw))


def random_support(shape, density: float, support: str = "uniform", block=(16, 16), generator=None,
                   device=None) -> SparseSupport:
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
# The support as the torch.library ops' arguments: its kind, block size and list of tensors
# ----------------------------------------------------------------------------------------------
def op_args(support: Optional[SparseSupport]) -> tuple:
    """The support as the torch.library ops' arguments: (parts, kind, block_h, block_w, n_rows,
    n_cols); None (no sparse part) is kind "none"."""
    if support is None:
        return [], "none", 0, 0, 0, 0
    bh, bw = support.block or (0, 0)
    return list(support.parts), support.kind, bh, bw, support.shape[0], support.shape[1]


def from_op_args(parts, kind, bh, bw, N, K) -> Optional[SparseSupport]:
    """The support back from ``op_args`` (no re-validation)."""
    if kind == "none":
        return None
    return SparseSupport((N, K), kind, (bh, bw) if kind == "block" else None, parts)
