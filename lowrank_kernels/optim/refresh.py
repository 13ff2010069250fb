"""Subspace refresh: the orthonormal projector P of a gradient G (m, n) for a given side.

side 'right': P (r, n) spans (approximately) the top-r right singular vectors of G;
side 'left':  P (m, r) spans the top-r left singular vectors. A left projector of G is the
transpose of the right projector of Gᵀ, so every kind is written once, for the right side.

Kinds:
- 'svd': exact, torch.linalg.svd in fp32 (what galore-torch and fira do): rows of Vh / columns
  of U. The trajectories match the peers' only with this kind.
- 'randomized': range finder (Halko, Martinsson, Tropp 2011): a ±1 test matrix from the
  package's counter-based RNG (so a seed and a counter reproduce it), ``oversampling`` extra
  columns, ``power_iters`` subspace iterations with QR re-orthonormalisation, then the SVD of
  the small (m, r + oversampling) matrix G Q. All in fp32.
- 'dct': a fixed orthonormal DCT-II basis; the r basis vectors most aligned with G (largest
  ‖G d_k‖, computed for all k at once with an FFT) are selected; only their indices need
  keeping, P is rebuilt from them (arXiv 2505.17967).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowrank_kernels.ops import _rng

KINDS = ("svd", "randomized", "dct")
_GOLDEN = 0x9E3779B97F4A7C15


def refresh_seed(seed: int, count: int) -> int:
    """The RNG seed of a parameter's ``count``-th randomized refresh."""
    return (seed + count * _GOLDEN) % (1 << _rng.SEED_BITS)


def svd_layout(proj: Tensor, side: str) -> Tensor:
    """``proj`` as a compact copy in the memory layout of an SVD refresh's projector: LAPACK
    returns Vh column-major, and keeping that layout (side 'right') keeps the products' bits equal
    to the peers' (who keep a view of Vh) without holding the whole Vh; U's columns (side 'left')
    are copied row-major."""
    return proj.t().contiguous().t() if side == "right" else proj.contiguous()


def svd_projector(grad: Tensor, rank: int, side: str) -> Tensor:
    """Exact projector from torch.linalg.svd of G in fp32, as the peers compute it."""
    g = grad.float()
    if side == "right":
        return svd_layout(torch.linalg.svd(g, full_matrices=False)[2][:rank], side)
    return svd_layout(torch.linalg.svd(g, full_matrices=False)[0][:, :rank], side)


def _right_randomized(g: Tensor, rank: int, seed: int, oversampling: int, power_iters: int) -> Tensor:
    m, n = g.shape
    k = min(rank + oversampling, m, n)
    omega = _rng.sign(seed, m, k, device=g.device)
    q = torch.linalg.qr(g.t() @ omega)[0]  # (n, k): the row space of G, sampled
    for _ in range(power_iters):
        # Each iteration raises the singular values to a higher power, sharpening the gap
        # between the top r and the rest; QR keeps the basis well conditioned in fp32.
        q = torch.linalg.qr(g.t() @ (g @ q))[0]
    vh_small = torch.linalg.svd(g @ q, full_matrices=False)[2]  # (k, k)
    return (vh_small[:rank] @ q.t()).contiguous()


def randomized_projector(grad: Tensor, rank: int, side: str, seed: int, oversampling: int = 8,
                         power_iters: int = 2) -> Tensor:
    """Randomized range-finder projector (fp32), reproducible from ``seed``."""
    g = grad.float()
    if side == "right":
        return _right_randomized(g, rank, seed, oversampling, power_iters)
    return _right_randomized(g.t(), rank, seed, oversampling, power_iters).t().contiguous()


def dct_basis_rows(index: Tensor, n: int) -> Tensor:
    """Rows k ∈ index of the orthonormal DCT-II matrix of size n, fp32 (len(index), n).

    D[k, j] = c_k cos(π (2j + 1) k / (2n)), c_0 = √(1/n), c_k = √(2/n). The angle's numerator
    is reduced modulo 4n in integers, so large n loses no accuracy.
    """
    j = torch.arange(n, device=index.device, dtype=torch.int64)
    phase = ((2 * j[None, :] + 1) * index[:, None].to(torch.int64)) % (4 * n)
    rows = torch.cos(phase.double() * (math.pi / (2 * n))) * math.sqrt(2.0 / n)
    # torch.where, not a masked assignment: no device synchronisation.
    return torch.where(index[:, None] == 0, math.sqrt(1.0 / n), rows).float()


def dct_coefficients(g: Tensor) -> Tensor:
    """G Dᵀ: the orthonormal DCT-II of every row of g (m, n), by an FFT of length n (Makhoul).

    Computed in g's precision, at least fp32.
    """
    n = g.shape[1]
    real = torch.float64 if g.dtype == torch.float64 else torch.float32
    v = torch.cat([g[:, 0::2], g[:, 1::2].flip(1)], dim=1).to(real)
    k = torch.arange(n, device=g.device, dtype=real)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    out = (torch.fft.fft(v, dim=1) * twiddle).real * math.sqrt(2.0 / n)
    out[:, 0] /= math.sqrt(2.0)
    return out


def dct_energy(g: Tensor, rows_per_chunk: int = 1024) -> Tensor:
    """‖g d_k‖² for every DCT-II basis vector d_k along g's rows (fp32, (n,)), summed over row
    chunks so the FFT's complex temporaries stay at ``rows_per_chunk`` rows. A sum over rows: the
    energies of a row-sharded g are the sum of its shards'."""
    energy = torch.zeros(g.shape[1], device=g.device, dtype=torch.float32)
    for start in range(0, g.shape[0], rows_per_chunk):
        energy += dct_coefficients(g[start:start + rows_per_chunk].float()).square().sum(0)
    return energy


def dct_top(energy: Tensor, rank: int) -> Tensor:
    """The sorted int64 indices of the ``rank`` largest energies."""
    return torch.topk(energy, rank).indices.sort().values


def dct_select(grad: Tensor, rank: int, side: str, rows_per_chunk: int = 1024) -> Tensor:
    """Indices (int64, sorted) of the ``rank`` DCT basis vectors most aligned with G: the largest
    alignments ‖G d_k‖² (dct_energy)."""
    return dct_top(dct_energy(grad if side == "right" else grad.t(), rows_per_chunk), rank)


def dct_projector(index: Tensor, dim: int, side: str) -> Tensor:
    """The projector built from DCT indices: (r, dim) for side 'right', (dim, r) for 'left'."""
    rows = dct_basis_rows(index, dim)
    return rows if side == "right" else rows.t().contiguous()


def captured_energy(grad: Tensor, proj: Tensor, side: str) -> float:
    """‖R‖² / ‖G‖²: the fraction of the gradient's energy inside the projector's span."""
    g = grad.double()
    p = proj.double()
    r = g @ p.t() if side == "right" else p.t() @ g
    return (r.square().sum() / g.square().sum()).item()
