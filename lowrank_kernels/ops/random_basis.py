"""Random-basis products: fused VeRA, RandLoRA and NOLA linears.

All are y = x Wᵀ + bias + s · (drop(x) Dᵀ) U with D (R, K) and U (R, N) built from frozen
random bases and a few trainable parameters (x flattened to (M, K), W (N, K)). In VeRA and
RandLoRA one of D, U is a random basis with trainable diagonal scalings:

VeRA (PEFT ``peft.tuners.vera.layer.Linear``), rank r = R:
    y = x Wᵀ + bias + s · λ_b ⊙ ((λ_d ⊙ (drop(x) Aᵀ)) Bᵀ)
    A (r, K), B (N, r) frozen, sliced from shared buffers vera_A (r, ≥K), vera_B (≥N, r) as
    A = vera_A[:r, :K], B = vera_B[:N, :r]; λ_d (r), λ_b (N) trainable; s = ``basis_scale``
    (1 for PEFT, which has no scaling). Here D = A and U[j, n] = λ_d[j] · B[n, j] · λ_b[n].

RandLoRA (PEFT ``peft.tuners.randlora.layer``), d_min = min(N, K), d_max = max(N, K),
λ (r, n_b), γ (n_b, d_min) trainable, R = r · n_b:
    Â[i·n_b + b, c] = λ[i, b] · A[i, b, c] · γ[b, c]      (r·n_b, d_min), A (r, n_b or 1, d_min)
    B̄[d, b·r + i]  = B[d, b, i]                           (d_max, n_b·r)
    ΔW = s · B̄ Â      if K <= N   (D = Â, U = B̄ᵀ)
    ΔW = s · Âᵀ B̄ᵀ    if K >  N   (D = B̄ᵀ, U = Â)
    Â is flattened over (r, n_b) and B̄ over (n_b, r), and row j of Â pairs with column j of B̄:
    PEFT's pairing, reproduced exactly. A broadcasts over n_b when stored as (r, 1, d_min)
    (PEFT's single shared basis); A and B may be PEFT's full shared buffers, sliced here.

Backward, with h = drop(x) Dᵀ (M, R) kept from forward and dh = dy Uᵀ (M, R):
    dx = dy W + s · drop'(dh D)
    the trainable scales' gradients come from dS = s · (dhᵀ drop(x)) if the scaled basis is D,
    or dS = s · (hᵀ dy) if it is U, reduced against the basis: for S[j, f] = ρ[j]·base[j, f]·κ[j % G, f],
    dρ[j] = Σ_f dS[j, f]·base[j, f]·κ[j % G, f] and dκ[l, f] = Σ_{j % G = l} dS[j, f]·ρ[j]·base[j, f]
    (VeRA: ρ = λ_d, κ = λ_b, G = 1; RandLoRA: ρ = λ, κ = γ, G = n_b). The kernels never form S,
    dS or any (R, F) tensor: scales are applied as basis tiles are loaded, and dS is reduced
    tile by tile where it is computed (ops/gemm.py: Basis, basis_reduce).

Seeded bases (``basis_seed=``, no basis tensors): the bases are functions of (seed, row, col)
through ops/_rng, generated inside the kernels and cost no memory; the reference generates the
same values bit for bit:
    VeRA:     A[i, k] = 2·u(seed_A, i, k) − 1,  B[n, i] = 2·u(seed_B, n, i) − 1     (uniform [-1, 1))
    RandLoRA: A[i, ·, c] = sign(seed_A, i, c),  B̄[d, j] = sign(seed_B, d, j)          (±1, unit std)
with (seed_A, seed_B) = basis_seeds(basis_seed). Values depend on the position only, so every
layer's bases are slices of one infinite shared pair, as PEFT's are slices of one max-size pair.

NOLA (Koohpayegani et al., ICLR 2024), rank r, trainable coefficients α (k_A), β (k_B),
seeded bases only:
    y = x Wᵀ + bias + s · (drop(x) Āᵀ) B̄ᵀ,   Ā = Σ_i α_i A_i (r, K),   B̄ = Σ_j β_j B_j (N, r)
    A_i[a, c] = 2·u(seed_A, i·r + a, c) − 1,   B_j[n, a] = 2·u(seed_B, j·N + n, a) − 1
    (D = Ā, U = B̄ᵀ). Backward, with dĀ = s · dhᵀ drop(x) and dB̄ = s · dyᵀ h (LoRA's gradients):
    dα_i = Σ dĀ ⊙ A_i,  dβ_j = Σ dB̄ ⊙ B_j. The bases exist only inside the kernels that form Ā
    and B̄ (k·r·(K + N) draws per call, independent of the number of tokens) and that project the
    gradients onto them; Ā and B̄ are LoRA-sized, so the products are LoRA's.

Precision: x, W, bias share the base dtype (the output's); bases and scales share the adapter
dtype, the base's or fp32 (PEFT's default on a bf16/fp16 base). Adapter products run in the
adapter dtype, every kernel accumulates in fp32. Dropout masks come from the package RNG
(same mask in every backend, regenerated in backward).

Implementations, selected per call by ``backend`` and declared with their forward and backward in
``VERA``, ``RANDLORA`` and ``NOLA`` (lowrank_kernels.registry); the Triton and CUDA launchers are in
ops/random_basis_kernels.py, which reads the bases as the ``Layout`` built here:
- reference: plain torch in PEFT's order of operations (materialises the bases), the specification.
- triton: forward = down_proj (h) + one GEMM with s·h U as extra K-steps of the base accumulator;
  backward = down_proj (dh) + the dx GEMM with its masked tail + basis_reduce for the scales
  (NOLA: Ā and B̄ formed by _nola_combine_kernel first; LoRA's two outer_reduce gradients
  projected onto the bases by _nola_project_kernel).
- cuda: csrc/random_basis.cu (the same products as CUDA-core FMA tiles with the basis formed per
  element as it is loaded, and the scale gradients reduced tile by tile), cuBLAS (through ATen) for
  the base GEMMs and for any product whose basis is a plain stored matrix in the base dtype with no
  mask (RandLoRA's stored B̄); composed in csrc/random_basis_binding.cpp. VeRA and RandLoRA only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _checks, _rng, gemm
from lowrank_kernels.ops.random_basis_kernels import (
    Layout,
    cuda_backward,
    cuda_forward,
    nola_combine,
    triton_backward,
    triton_forward,
)

# Mixed into basis_seed for B's stream, so A and B are independent draws from one seed.
_SEED_B_MIX = 0x2545F4914F6CDD1D & ((1 << _rng.SEED_BITS) - 1)


def basis_seeds(basis_seed: int) -> tuple[int, int]:
    """(seed of A, seed of B) for a basis seed."""
    return basis_seed, basis_seed ^ _SEED_B_MIX


def randlora_num_bases(in_features: int, out_features: int, rank: int) -> int:
    """n_b = ceil(min(in, out) / r): PEFT's number of bases, enough for a full-rank update."""
    return -(-min(in_features, out_features) // rank)


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
def _keep(seed: Optional[int], p: float, m: int, k: int, device) -> Optional[Tensor]:
    return None if (p == 0.0 or seed is None) else _rng.dropout_keep(seed, p, m, k, device)


def _apply_keep(t: Tensor, keep: Optional[Tensor], p: float) -> Tensor:
    return t if keep is None else t * keep / (1.0 - p)


def vera_bases(vera_A, vera_B, r: int, K: int, N: int, basis_seed=None, device=None, dtype=torch.float32):
    """The (A (r, K), B (N, r)) a VeRA layer uses: slices of the shared buffers, or generated."""
    if basis_seed is None:
        return vera_A[:r, :K], vera_B[:N, :r]
    seed_a, seed_b = basis_seeds(basis_seed)
    A = 2.0 * _rng.uniform(seed_a, r, K, device) - 1.0
    B = 2.0 * _rng.uniform(seed_b, N, r, device) - 1.0
    return A.to(dtype), B.to(dtype)


def randlora_bases(basis_A, basis_B, r: int, n_b: int, K: int, N: int, basis_seed=None, device=None,
                   dtype=torch.float32):
    """The (A (r, n_b or 1, d_min), B (d_max, n_b, r)) a RandLoRA layer uses: slices or generated."""
    d_min, d_max = min(N, K), max(N, K)
    if basis_seed is None:
        return basis_A[:r, : (n_b if basis_A.shape[1] > 1 else 1), :d_min], basis_B[:d_max, :n_b, :r]
    seed_a, seed_b = basis_seeds(basis_seed)
    A = _rng.sign(seed_a, r, d_min, device)[:, None, :]
    B = _rng.sign(seed_b, d_max, n_b * r, device).view(d_max, n_b, r)
    return A.to(dtype), B.to(dtype)


def _randlora_factors(A3, B3, lambda_, gamma, K, N):
    """(D (R, K), U (R, N)) with Â and B̄ materialised: the reference's (PEFT's) view."""
    a_hat = (lambda_[:, :, None] * A3 * gamma[None]).flatten(0, 1)
    b_bar = B3.flatten(1)
    return (a_hat, b_bar.t()) if K <= N else (b_bar.t(), a_hat)


def vera_delta_weight(A, B, lambda_d, lambda_b, basis_scale=1.0) -> Tensor:
    """ΔW (N, K) = basis_scale · (λ_b ⊙ B) (λ_d ⊙ A) in fp32, for A (r, K), B (N, r) (e.g. from vera_bases)."""
    return ((lambda_b.float()[:, None] * B.float()) @ (lambda_d.float()[:, None] * A.float())) * basis_scale


def randlora_delta_weight(A3, B3, lambda_, gamma, scaling, K: int, N: int) -> Tensor:
    """ΔW (N, K) in fp32 with PEFT's pairing, for A3, B3 from randlora_bases."""
    D, U = _randlora_factors(A3.float(), B3.float(), lambda_.float(), gamma.float(), K, N)
    return (U.t() @ D) * scaling


def vera_linear_reference(x, weight, vera_A, vera_B, lambda_d, lambda_b, bias=None, dropout_p=0.0, seed=None,
                          basis_seed=None, basis_scale=1.0):
    """Differentiable plain-torch VeRA linear in PEFT's order of operations.

    ``vera_A``/``vera_B`` are sliced as PEFT slices its shared buffers; with ``basis_seed`` they
    are None and generated. Dropout uses the package's RNG (``seed``), as every backend does.
    """
    lead, K = x.shape[:-1], x.shape[-1]
    N, r, adt = weight.shape[0], lambda_d.shape[0], lambda_d.dtype
    A, B = vera_bases(vera_A, vera_B, r, K, N, basis_seed, x.device, adt)
    x2 = x.reshape(-1, K)
    xd = _apply_keep(x2.to(adt), _keep(seed, dropout_p, x2.shape[0], K, x.device), dropout_p)
    y = F.linear(x2, weight, bias)
    t = lambda_b * F.linear(lambda_d * F.linear(xd, A), B)
    return (y + t * basis_scale).to(x.dtype).reshape(*lead, N)


def randlora_linear_reference(x, weight, basis_A, basis_B, lambda_, gamma, scaling, bias=None, dropout_p=0.0,
                              seed=None, basis_seed=None):
    """Differentiable plain-torch RandLoRA linear with PEFT's flatten orders and pairing."""
    lead, K = x.shape[:-1], x.shape[-1]
    N, (r, n_b), adt = weight.shape[0], lambda_.shape, lambda_.dtype
    A3, B3 = randlora_bases(basis_A, basis_B, r, n_b, K, N, basis_seed, x.device, adt)
    D, U = _randlora_factors(A3, B3, lambda_, gamma, K, N)
    x2 = x.reshape(-1, K)
    xd = _apply_keep(x2.to(adt), _keep(seed, dropout_p, x2.shape[0], K, x.device), dropout_p)
    y = F.linear(x2, weight, bias)
    return (y + ((xd @ D.t()) @ U) * scaling).to(x.dtype).reshape(*lead, N)


def nola_bases(n_bases: int, rows: int, cols: int, seed: int, device=None, dtype=torch.float32) -> Tensor:
    """The (n_bases, rows, cols) seeded NOLA bases, G[i, a, c] = 2·u(seed, i·rows + a, c) − 1."""
    return (2.0 * _rng.uniform(seed, n_bases * rows, cols, device) - 1.0).view(n_bases, rows, cols).to(dtype)


def nola_factors(alpha, beta, rank: int, K: int, N: int, basis_seed: int) -> tuple[Tensor, Tensor]:
    """(Ā (r, K), B̄ (N, r)) = (Σ α_i A_i, Σ β_j B_j) in the coefficients' dtype, bases materialised."""
    seed_a, seed_b = basis_seeds(basis_seed)
    A = torch.einsum("i,irc->rc", alpha, nola_bases(alpha.shape[0], rank, K, seed_a, alpha.device, alpha.dtype))
    B = torch.einsum("j,jnr->nr", beta, nola_bases(beta.shape[0], N, rank, seed_b, beta.device, beta.dtype))
    return A, B


def nola_linear_reference(x, weight, alpha, beta, rank, basis_seed, scaling=1.0, bias=None, dropout_p=0.0, seed=None):
    """Differentiable plain-torch NOLA linear: LoRA's order of operations with Ā, B̄ from nola_factors."""
    lead, K = x.shape[:-1], x.shape[-1]
    N, adt = weight.shape[0], alpha.dtype
    A, B = nola_factors(alpha, beta, rank, K, N, basis_seed)
    x2 = x.reshape(-1, K)
    xd = _apply_keep(x2.to(adt), _keep(seed, dropout_p, x2.shape[0], K, x.device), dropout_p)
    y = F.linear(x2, weight, bias)
    return (y + F.linear(F.linear(xd, A), B) * scaling).to(x.dtype).reshape(*lead, N)


def _reference_factors(method, K, N, basis_A, basis_B, s1, s2, basis_seed, rank, device):
    """(D, U, A3 or None) materialised, for the reference path."""
    adt = s1.dtype
    if method == "nola":
        A, B = nola_factors(s1, s2, rank, K, N, basis_seed)
        return A, B.t(), None
    if method == "vera":
        A, B = vera_bases(basis_A, basis_B, s1.shape[0], K, N, basis_seed, device, adt)
        return A, (B * s1 * s2[:, None]).t(), None
    A3, B3 = randlora_bases(basis_A, basis_B, *s1.shape, K, N, basis_seed, device, adt)
    D, U = _randlora_factors(A3, B3, s1, s2, K, N)
    return D, U, A3


def _reference_forward(x2, weight, bias, basis_A, basis_B, s1, s2, scaling, p, seed, basis_seed, rank, method):
    M, K = x2.shape
    D, U, _ = _reference_factors(method, K, weight.shape[0], basis_A, basis_B, s1, s2, basis_seed, rank, x2.device)
    h = _apply_keep(x2.to(s1.dtype), _keep(seed, p, M, K, x2.device), p) @ D.t()
    y = F.linear(x2, weight, bias)
    return (y + (h @ U) * scaling).to(x2.dtype), h.to(_h_dtype(s1))


def _reference_backward(dy, x2, weight, basis_A, basis_B, s1, s2, h, scaling, p, seed, basis_seed, rank, method,
                        need_dx):
    M, K = x2.shape
    N, adt = weight.shape[0], s1.dtype
    D, U, A3 = _reference_factors(method, K, N, basis_A, basis_B, s1, s2, basis_seed, rank, x2.device)
    keep = _keep(seed, p, M, K, x2.device)
    dy_a = dy.to(adt)
    dh = (dy_a @ U.t()) * scaling
    dx = dy @ weight + _apply_keep(dh @ D, keep, p).to(dy.dtype) if need_dx else None
    if method == "nola":
        # LoRA's gradients of Ā and B̄, projected onto each basis.
        seed_a, seed_b = basis_seeds(basis_seed)
        d_a = dh.t() @ _apply_keep(x2.to(adt), keep, p)
        d_b = (dy_a.t() @ h.to(adt)) * scaling
        d1 = torch.einsum("rc,irc->i", d_a, nola_bases(s1.shape[0], rank, K, seed_a, x2.device, adt))
        d2 = torch.einsum("nr,jnr->j", d_b, nola_bases(s2.shape[0], N, rank, seed_b, x2.device, adt))
        return dx, d1, d2
    if method == "vera":
        # U = (λ_d ⊙ Bᵀ) λ_b: dS = s·hᵀ dy (r, N), then the two diagonal reductions.
        A, B = vera_bases(basis_A, basis_B, s1.shape[0], K, N, basis_seed, x2.device, adt)
        dS = (h.to(adt).t() @ dy_a) * scaling
        d1 = (dS * B.t() * s2[None, :]).sum(1)
        d2 = (dS * B.t() * s1[:, None]).sum(0)
        return dx, d1, d2
    # RandLoRA: dÂ from whichever side Â sits on, then PEFT's UniqueBaseGrad reductions.
    r, n_b = s1.shape
    if K <= N:
        d_hat = dh.t() @ _apply_keep(x2.to(adt), keep, p)
    else:
        d_hat = (h.to(adt).t() @ dy_a) * scaling
    d_hat = d_hat.view(r, n_b, -1)
    d1 = (d_hat * A3 * s2[None]).sum(-1)
    d2 = (d_hat * A3 * s1[:, :, None]).sum(0)
    return dx, d1, d2


# ----------------------------------------------------------------------------------------------
# Kernel layout: the two bases as ops/gemm.py Basis operands (views and strides, no copies)
# ----------------------------------------------------------------------------------------------
def _layout(method, K, N, basis_A, basis_B, s1, s2, basis_seed, rank=None) -> Layout:
    """D and U of the method as the kernels read them (NOLA: Ā and B̄ formed here, per call)."""
    seeds = basis_seeds(basis_seed) if basis_seed is not None else (None, None)
    if method == "nola":
        A = nola_combine(s1, seeds[0], rank, K).to(s1.dtype)
        B = nola_combine(s2, seeds[1], N, rank).to(s1.dtype)
        return Layout(gemm.Basis.dense(A), gemm.Basis.dense(B.t()), False,
                      ((seeds[0], s1.shape[0]), (seeds[1], s2.shape[0])))
    if method == "vera":
        r = s1.shape[0]
        if basis_seed is None:
            A, B = vera_bases(basis_A, basis_B, r, K, N)
            down = gemm.Basis.dense(A)
            up_base = dict(tensor=B, strides=(B.stride(1), 0, B.stride(0)))
        else:
            down = gemm.Basis(r, K, None, seed=seeds[0], dist="uniform")
            up_base = dict(tensor=None, seed=seeds[1], dist="uniform", transposed=True)
        up = gemm.Basis(r, N, row_scale=s1, row_scale_strides=(s1.stride(0), 0), col_scale=s2[None, :], **up_base)
        return Layout(down, up, False)

    r, n_b = s1.shape
    R, d_min, d_max = r * n_b, min(N, K), max(N, K)
    if basis_seed is None:
        A3, B3 = randlora_bases(basis_A, basis_B, r, n_b, K, N)
        a_base = dict(tensor=A3, strides=(A3.stride(0), A3.stride(1) if A3.shape[1] > 1 else 0, A3.stride(2)))
        if n_b == 1 or B3.stride(1) == r * B3.stride(2):
            # (n_b, r) flattens to one stride: a plain matrix, no index split in the kernels.
            b_bar = gemm.Basis(R, d_max, B3, (B3.stride(2), 0, B3.stride(0)))
        else:
            b_bar = gemm.Basis(R, d_max, B3, (B3.stride(1), B3.stride(2), B3.stride(0)), groups=r)
    else:
        a_base = dict(tensor=None, seed=seeds[0], dist="sign")
        b_bar = gemm.Basis(R, d_max, None, seed=seeds[1], dist="sign", transposed=True)
    a_hat = gemm.Basis(R, d_min, groups=n_b, row_scale=s1, row_scale_strides=(s1.stride(0), s1.stride(1)),
                       col_scale=s2, **a_base)
    return Layout(a_hat, b_bar, True) if K <= N else Layout(b_bar, a_hat, False)


# ----------------------------------------------------------------------------------------------
# The kernel backends' stages on the ops' arguments: the bases' layout and the dropout built per call
# ----------------------------------------------------------------------------------------------
def _kernel_args(x2, weight, basis_A, basis_B, s1, s2, p, seed, basis_seed, rank, method):
    lay = _layout(method, x2.shape[1], weight.shape[0], basis_A, basis_B, s1, s2, basis_seed, rank)
    return lay, gemm.Dropout.make(p, seed)


def _triton_fwd(x2, weight, bias, basis_A, basis_B, s1, s2, scaling, p, seed, basis_seed, rank, method):
    lay, dropout = _kernel_args(x2, weight, basis_A, basis_B, s1, s2, p, seed, basis_seed, rank, method)
    return triton_forward(x2, weight, bias, lay, scaling, s1.dtype, dropout)


def _triton_bwd(dy, x2, weight, basis_A, basis_B, s1, s2, h, scaling, p, seed, basis_seed, rank, method, need_dx):
    lay, dropout = _kernel_args(x2, weight, basis_A, basis_B, s1, s2, p, seed, basis_seed, rank, method)
    return triton_backward(dy, x2, weight, lay, h, scaling, s1.dtype, dropout, need_dx)


def _cuda_fwd(x2, weight, bias, basis_A, basis_B, s1, s2, scaling, p, seed, basis_seed, rank, method):
    lay, dropout = _kernel_args(x2, weight, basis_A, basis_B, s1, s2, p, seed, basis_seed, rank, method)
    return cuda_forward(x2, weight, bias, lay, scaling, dropout)


def _cuda_bwd(dy, x2, weight, basis_A, basis_B, s1, s2, h, scaling, p, seed, basis_seed, rank, method, need_dx):
    lay, dropout = _kernel_args(x2, weight, basis_A, basis_B, s1, s2, p, seed, basis_seed, rank, method)
    return cuda_backward(dy, x2, weight, lay, h, scaling, dropout, need_dx)


# ----------------------------------------------------------------------------------------------
# torch.library ops: one forward and one backward op for the three methods, each running the
# method's declared implementation for `backend`
# ----------------------------------------------------------------------------------------------
def _h_dtype(s1: Tensor) -> torch.dtype:
    """h is kept in fp32 (float64 for float64 adapters on the reference backend)."""
    return torch.float64 if s1.dtype == torch.float64 else torch.float32


def _random_basis_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], basis_A: Optional[Tensor], basis_B: Optional[Tensor],
    scale_1: Tensor, scale_2: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
    basis_seed: Optional[int], rank: int, method: str, backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (y (M, N) in x's dtype, h = drop(x) Dᵀ (M, R) fp32); ``rank`` is R."""
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, rank), dtype=_h_dtype(scale_1))
    return registry.get(f"{method}_linear").impl(backend).forward(
        x, weight, bias, basis_A, basis_B, scale_1, scale_2, scaling, dropout_p, _rng.seed_value(seed), basis_seed,
        rank, method)


_fwd_op = torch.library.custom_op("lowrank_kernels::random_basis_fwd", _random_basis_fwd, mutates_args=())


@_fwd_op.register_fake
def _(x, weight, bias, basis_A, basis_B, scale_1, scale_2, scaling, dropout_p, seed, basis_seed, rank, method,
      backend):
    return (
        x.new_empty((x.shape[0], weight.shape[0])),
        x.new_empty((x.shape[0], rank), dtype=_h_dtype(scale_1)),
    )


def _random_basis_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, basis_A: Optional[Tensor], basis_B: Optional[Tensor],
    scale_1: Tensor, scale_2: Tensor, h: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
    basis_seed: Optional[int], rank: int, method: str, backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, d scale_1, d scale_2); dx is an empty tensor when need_dx is False."""
    if x.shape[0] == 0:
        dx, d1, d2 = torch.zeros_like(x), torch.zeros_like(scale_1), torch.zeros_like(scale_2)
    else:
        dx, d1, d2 = registry.get(f"{method}_linear").impl(backend).backward(
            dy, x, weight, basis_A, basis_B, scale_1, scale_2, h, scaling, dropout_p, _rng.seed_value(seed), basis_seed,
            rank, method, need_dx)
    if not need_dx:
        dx = x.new_empty((0,))
    d1 = d1.reshape(scale_1.shape).to(scale_1.dtype)
    d2 = d2.reshape(scale_2.shape).to(scale_2.dtype)
    return dx.contiguous(), d1.contiguous(), d2.contiguous()


_bwd_op = torch.library.custom_op("lowrank_kernels::random_basis_bwd", _random_basis_bwd, mutates_args=())


@_bwd_op.register_fake
def _(dy, x, weight, basis_A, basis_B, scale_1, scale_2, h, scaling, dropout_p, seed, basis_seed, rank, method,
      backend, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(scale_1, memory_format=torch.contiguous_format), \
        torch.empty_like(scale_2, memory_format=torch.contiguous_format)


# The three methods share the op pair and its implementations; NOLA has no CUDA kernels.
_IMPLS = dict(
    reference=registry.Impl(registry.REFERENCE, forward=_reference_forward, backward=_reference_backward),
    triton=registry.Impl(registry.TRITON, forward=_triton_fwd, backward=_triton_bwd),
    cuda=registry.Impl(registry.CUDA, forward=_cuda_fwd, backward=_cuda_bwd),
)
VERA = registry.declare(
    "vera_linear", "y = x Wᵀ + bias + s·((drop(x) Aᵀ) ⊙ d) Bᵀ ⊙ b, A and B frozen random bases",
    library_ops=(_fwd_op, _bwd_op), **_IMPLS,
)
RANDLORA = registry.declare(
    "randlora_linear", "y = x Wᵀ + bias + s·Σ_i ((drop(x) A_iᵀ) ⊙ Λ_i) B_iᵀ ⊙ Γ, frozen random bases",
    library_ops=(_fwd_op, _bwd_op), **_IMPLS,
)
NOLA = registry.declare(
    "nola_linear", "y = x Wᵀ + bias + s·(drop(x) (Σ_i α_i A_i)ᵀ)(Σ_j β_j B_j)ᵀ, seeded random bases",
    library_ops=(_fwd_op, _bwd_op), reference=_IMPLS["reference"], triton=_IMPLS["triton"],
)


# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources):
# one op pair serves the three methods, each naming its bases and scales its own way (NOLA's
# bases are generated, never passed).
_BASES = {"vera_linear": ("vera_A", "vera_B", "lambda_d", "lambda_b"),
          "randlora_linear": ("basis_A", "basis_B", "lambda_", "gamma"),
          "nola_linear": (None, None, "alpha", "beta")}
LAYOUT_SOURCES = _checks.layout_sources({
    "random_basis_fwd": {op: dict(x="x", weight="weight", bias="bias", basis_A=a, basis_B=b, scale_1=s1, scale_2=s2,
                                  seed=None) for op, (a, b, s1, s2) in _BASES.items()},
    "random_basis_bwd": {op: dict(dy="grad_output", x="x", weight="weight", basis_A=a, basis_B=b, scale_1=s1,
                                  scale_2=s2, h=None, seed=None) for op, (a, b, s1, s2) in _BASES.items()},
})


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class RandomBasisLinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op; saves x (no copy) and h (M, R) fp32 only. Bases are frozen."""

    @staticmethod
    def forward(ctx, x2, weight, bias, basis_A, basis_B, scale_1, scale_2, scaling, dropout_p, seed, basis_seed,
                rank, method, backend):
        y, h = _backend.call_op(
            _fwd_op, _random_basis_fwd, x2, weight, bias, basis_A, basis_B, scale_1, scale_2, scaling, dropout_p,
            seed, basis_seed, rank, method, backend,
        )
        ctx.save_for_backward(x2, weight, basis_A, basis_B, scale_1, scale_2, h, seed)
        ctx.args = (scaling, dropout_p, basis_seed, rank, method, backend)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, basis_A, basis_B, scale_1, scale_2, h, seed = ctx.saved_tensors
        scaling, dropout_p, basis_seed, rank, method, backend = ctx.args
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        need_1, need_2 = ctx.needs_input_grad[5:7]
        dy = dy.contiguous()
        dx, d1, d2 = _backend.call_op(
            _bwd_op, _random_basis_bwd, dy, x2, weight, basis_A, basis_B, scale_1, scale_2, h, scaling, dropout_p,
            seed, basis_seed, rank, method, backend, need_x,
        )
        d_weight = (dy.t() @ x2).to(weight.dtype) if need_w else None
        d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if (need_bias and ctx.has_bias) else None
        return (dx if need_x else None, d_weight, d_bias, None, None, d1 if need_1 else None,
                d2 if need_2 else None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Validation and the functional entry points
# ----------------------------------------------------------------------------------------------
def _check_common(x, weight, bias, scales: dict, dropout_p, seed, scaling_name, scaling):
    """Checks shared by the three methods; returns the adapter dtype (the scales')."""
    _checks.check_float("weight", weight, 2)
    _checks.check_input(x, weight.shape[1], f"weight (N, K) = {tuple(weight.shape)}")
    _checks.check_same_dtype("weight", weight, "x", x)
    names = list(scales)
    first = scales[names[0]]
    for name, t in scales.items():
        _checks.check_float(name, t)
        _checks.check_same_dtype(name, t, names[0], first)
    _checks.check_adapter_dtype(x.dtype, first.dtype, names[0])
    _checks.check_bias(bias, weight.shape[0], x)
    _checks.check_same_device("x", x, weight=weight, bias=bias, **scales)
    _checks.check_scalar(scaling_name, scaling)
    _checks.check_dropout_p(dropout_p)
    _checks.check_seed("seed", seed)
    return first.dtype


def _check_bases(names, bases, min_shapes, adt, x, basis_seed, rank, r) -> None:
    """Stored bases: big enough, adapter dtype, frozen. Seeded: no tensors, a valid seed."""
    if basis_seed is not None:
        _checks.check_seed("basis_seed", basis_seed)
        for name, t in zip(names, bases):
            if t is not None:
                raise ValueError(f"{name} must be None when basis_seed is given (the bases are generated)")
        if rank is not None and rank != r:
            raise ValueError(f"rank={rank!r} does not match the scales' rank {r}")
        return
    if rank is not None:
        raise ValueError("rank= is only used with basis_seed=; with stored bases the rank comes from the scales")
    for name, t, need in zip(names, bases, min_shapes):
        if t is None:
            raise ValueError(f"{name} is None: pass the basis tensor, or basis_seed= to generate the bases")
        _checks.check_float(name, t, len(need))
        if any(have < want for have, want in zip(t.shape, need)):
            raise ValueError(f"{name} of shape {tuple(t.shape)} is too small: need at least {need} for this layer")
        if t.dtype != adt:
            raise TypeError(f"{name} dtype {t.dtype} must equal the scales' dtype {adt}")
        _checks.check_same_device("x", x, **{name: t})
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but the random bases are frozen: pass it detached "
                             "(or as a buffer)")


def _run(x, weight, bias, basis_A, basis_B, s1, s2, scaling, dropout_p, training, seed, basis_seed, rank, method,
         backend):
    """The op on x flattened to 2-D; ``rank`` is R, the width of h."""
    backend = _backend.resolve(f"{method}_linear", backend, x=x, scales=s1)
    p, seed_t = _rng.dropout_seed(dropout_p, training, seed)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    args = (x2, weight, bias, basis_A, basis_B, s1, s2, float(scaling), p, seed_t, basis_seed, rank, method, backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias, s1, s2)):
        y = RandomBasisLinearFunction.apply(*args)
    else:
        y, _ = _backend.call_op(_fwd_op, _random_basis_fwd, *args)
    return y.reshape(*lead, weight.shape[0])


@_auto_backend.tuned("vera_linear")
def vera_linear(x, weight, vera_A, vera_B, lambda_d, lambda_b, bias=None, dropout_p=0.0, training=True, seed=None,
                backend=None, *, basis_seed=None, rank=None, basis_scale=1.0):
    """Fused VeRA linear: ``x Wᵀ + bias + basis_scale · λ_b ⊙ ((λ_d ⊙ (dropout(x) Aᵀ)) Bᵀ)``.

    Args:
        x: (..., K) input, float32/float16/bfloat16, any leading dims, may be non-contiguous.
        weight: (N, K) base weight, x's dtype (frozen or trainable).
        vera_A: (≥r, ≥K), vera_B: (≥N, ≥r): frozen shared bases (PEFT's ``vera_A``/``vera_B``
            buffers); A = vera_A[:r, :K] and B = vera_B[:N, :r] are used, as views. Adapter dtype.
            None (both) with ``basis_seed``.
        lambda_d: (r,), lambda_b: (N,): the trainable scales; the adapter dtype (x's dtype or fp32).
        bias: optional (N,), x's dtype.
        dropout_p, training, seed: dropout on the adapter's input, as in ``lora_linear``.
        backend: None, "reference", "triton" or "cuda".
        basis_seed: int in [0, 2**62): generate A and B (uniform in [-1, 1), see the module
            docstring) from this seed inside the kernels instead of reading tensors.
        rank: optional check of r with ``basis_seed`` (r is lambda_d's length).
        basis_scale: multiplies the adapter term (PEFT: 1). With seeded bases,
            6 / sqrt(K_max · r) gives the spread of PEFT's bases (uniform, bounds sqrt(6 / K_max)
            for A and sqrt(6 / r) for B, K_max the largest in_features sharing them).

    Under torch.autocast every floating operand (stored bases included) is cast to the autocast
    dtype first, as PEFT's unfused matmuls would be; bases already in that dtype are not copied.

    Returns:
        (..., N) tensor in x's dtype.
    """
    if isinstance(x, Tensor):
        x, weight, vera_A, vera_B, lambda_d, lambda_b, bias = _backend.autocast_inputs(
            x, weight, vera_A, vera_B, lambda_d, lambda_b, bias)
    adt = _check_common(x, weight, bias, {"lambda_d": lambda_d, "lambda_b": lambda_b}, dropout_p, seed,
                        "basis_scale", basis_scale)
    if lambda_d.dim() != 1 or lambda_d.shape[0] < 1:
        raise ValueError(f"lambda_d must be 1-D of length r >= 1, got shape {tuple(lambda_d.shape)}")
    N, K = weight.shape
    r = lambda_d.shape[0]
    if tuple(lambda_b.shape) != (N,):
        raise ValueError(f"lambda_b must be (out_features,) = ({N},), got {tuple(lambda_b.shape)}")
    _check_bases(("vera_A", "vera_B"), (vera_A, vera_B), ((r, K), (N, r)), adt, x, basis_seed, rank, r)
    return _run(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, basis_scale, dropout_p, training, seed,
                basis_seed, r, "vera", backend)


@_auto_backend.tuned("randlora_linear")
def randlora_linear(x, weight, basis_A, basis_B, lambda_, gamma, scaling, bias=None, dropout_p=0.0, training=True,
                    seed=None, backend=None, *, basis_seed=None, rank=None):
    """Fused RandLoRA linear: ``x Wᵀ + bias + scaling · dropout(x) ΔWᵀ``, ΔW = B̄ Â or Âᵀ B̄ᵀ (PEFT's).

    Args:
        x: (..., K) input; weight (N, K), x's dtype; d_min = min(N, K), d_max = max(N, K).
        basis_A: (≥r, 1 or ≥n_b, ≥d_min), basis_B: (≥d_max, ≥n_b, ≥r): frozen bases, e.g. PEFT's
            full shared ``randlora_A``/``randlora_B`` buffers, sliced here without copying.
            None (both) with ``basis_seed``.
        lambda_: (r, n_b), gamma: (n_b, d_min): trainable scales, the adapter dtype.
        scaling: s = alpha / r (PEFT's default alpha = 640 for r = 32).
        bias, dropout_p, training, seed, backend: as ``lora_linear``.
        basis_seed: generate ±1 bases from this seed inside the kernels (module docstring).
        rank: optional check of r with ``basis_seed``.

    Under torch.autocast every floating operand (stored bases included) is cast to the autocast
    dtype first, as PEFT's unfused matmuls would be; bases already in that dtype are not copied.

    Returns:
        (..., N) tensor in x's dtype. Neither Â, B̄ nor their gradients are materialised by the
        kernel backends.
    """
    if isinstance(x, Tensor):
        x, weight, basis_A, basis_B, lambda_, gamma, bias = _backend.autocast_inputs(
            x, weight, basis_A, basis_B, lambda_, gamma, bias)
    adt = _check_common(x, weight, bias, {"lambda_": lambda_, "gamma": gamma}, dropout_p, seed, "scaling", scaling)
    N, K = weight.shape
    if lambda_.dim() != 2 or lambda_.numel() == 0:
        raise ValueError(f"lambda_ must be 2-D (r, n_b) with r, n_b >= 1, got shape {tuple(lambda_.shape)}")
    r, n_b = lambda_.shape
    d_min, d_max = min(N, K), max(N, K)
    if tuple(gamma.shape) != (n_b, d_min):
        raise ValueError(f"gamma must be (n_b, min(in, out)) = ({n_b}, {d_min}), got {tuple(gamma.shape)}")
    _check_bases(("basis_A", "basis_B"), (basis_A, basis_B), ((r, 1, d_min), (d_max, n_b, r)), adt, x,
                 basis_seed, rank, r)
    if basis_seed is None and basis_A.shape[1] != 1 and basis_A.shape[1] < n_b:
        raise ValueError(f"basis_A's second dim must be 1 (one shared basis) or >= n_b = {n_b}, "
                         f"got shape {tuple(basis_A.shape)}")
    return _run(x, weight, bias, basis_A, basis_B, lambda_, gamma, scaling, dropout_p, training, seed, basis_seed,
                r * n_b, "randlora", backend)


@_auto_backend.tuned("nola_linear", exact=("rank",))
def nola_linear(x, weight, alpha, beta, rank, basis_seed, scaling=1.0, bias=None, dropout_p=0.0, training=True,
                seed=None, backend=None):
    """Fused NOLA linear: ``x Wᵀ + bias + scaling · (dropout(x) Āᵀ) B̄ᵀ``, Ā = Σ α_i A_i, B̄ = Σ β_j B_j.

    Args:
        x: (..., K) input, float32/float16/bfloat16, any leading dims, may be non-contiguous.
        weight: (N, K) base weight, x's dtype (frozen or trainable).
        alpha: (k_A,), beta: (k_B,): the trainable coefficients of the rank-``rank`` bases A_i (r, K)
            and B_j (N, r); x's dtype or float32. (β = 0 at init gives ΔW = 0, as LoRA's B = 0.)
        rank: r, an int >= 1.
        basis_seed: int in [0, 2**62): the bases are 2·u − 1 of the package RNG at this seed
            (module docstring), generated inside the kernels, never stored.
        scaling: s, multiplies the adapter term.
        bias, dropout_p, training, seed: as in ``lora_linear``.
        backend: None, "reference" or "triton" (no CUDA kernels for NOLA).

    Under torch.autocast every floating operand is cast to the autocast dtype first.

    Returns:
        (..., N) tensor in x's dtype.
    """
    if isinstance(x, Tensor):
        x, weight, alpha, beta, bias = _backend.autocast_inputs(x, weight, alpha, beta, bias)
    _check_common(x, weight, bias, {"alpha": alpha, "beta": beta}, dropout_p, seed, "scaling", scaling)
    for name, t in (("alpha", alpha), ("beta", beta)):
        if t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D with at least one coefficient, got shape {tuple(t.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    _checks.check_seed("basis_seed", basis_seed, optional=False)
    N, K = weight.shape
    if rank * max(N, K) >= 2**31:
        raise ValueError(f"rank · max(in, out) = {rank * max(N, K)} must be below 2**31")
    return _run(x, weight, bias, None, None, alpha, beta, scaling, dropout_p, training, seed, basis_seed, rank,
                "nola", backend)
