"""vera_linear / randlora_linear: every backend against the float64 reference, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    DEVICE,
    HAS_CUDA,
    activation,
    assert_close,
    assert_close_as_unfused,
    base_weight,
    kernel_backends,
    run_unfused,
)

import lowrank_kernels as lk
from lowrank_kernels.ops import _rng, gemm
from lowrank_kernels.ops import random_basis as rb
from lowrank_kernels.ops import random_basis_kernels as rbk

KERNEL_BACKENDS = kernel_backends()


def vera_inputs(M, K, N, r, dtype, adapter_dtype=None, lead=(), noncontig=False, seeded=False):
    """Random inputs; A, B are slices of larger shared buffers (as PEFT's), and the adapter term
    is about as large as the base term."""
    adt = adapter_dtype or dtype
    x = activation(M, K, dtype, lead, noncontig)
    W = base_weight(N, K, dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    if seeded:
        A = B = None
    else:
        A = (torch.randn(r + 2, K + 7, device=DEVICE) / K**0.5).to(adt)
        B = (torch.randn(N + 5, r + 2, device=DEVICE) / r**0.5).to(adt)
    ld = (torch.randn(r, device=DEVICE) * (3.0 if seeded else 1.0)).to(adt).requires_grad_(True)
    lb = (torch.randn(N, device=DEVICE) * ((3.0 / (K * r) ** 0.5) if seeded else 1.0)).to(adt).requires_grad_(True)
    return x, W, A, B, ld, lb, b


def randlora_inputs(M, K, N, r, dtype, adapter_dtype=None, lead=(), noncontig=False, seeded=False, a_shared=True):
    """basis_A (r, 1, ≥d_min) (PEFT's one shared basis) or (r, n_b+1, ≥d_min); basis_B larger than needed."""
    adt = adapter_dtype or dtype
    n_b = rb.randlora_num_bases(K, N, r)
    d_min, d_max = min(N, K), max(N, K)
    x = activation(M, K, dtype, lead, noncontig)
    W = base_weight(N, K, dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    if seeded:
        A = B = None
        a_scale, b_scale = 1.0 / d_min**0.5, 1.0 / (r * n_b) ** 0.5
    else:
        A = (torch.randn(r, 1 if a_shared else n_b + 1, d_min + 3, device=DEVICE) / d_min**0.5).to(adt)
        B = (torch.randn(d_max + 2, n_b + 1, r, device=DEVICE) / (r * n_b) ** 0.5).to(adt)
        a_scale = b_scale = 1.0
    lam = (torch.randn(r, n_b, device=DEVICE) * a_scale).to(adt).requires_grad_(True)
    gam = (torch.randn(n_b, d_min, device=DEVICE) * b_scale).to(adt).requires_grad_(True)
    return x, W, A, B, lam, gam, b


def nola_inputs(M, K, N, r, dtype, adapter_dtype=None, lead=(), noncontig=False, k_a=5, k_b=7):
    """Coefficients scaled so that Ā, B̄ have entries of std 1/sqrt(K), 1/sqrt(r) (the bases are
    uniform in [-1, 1), variance 1/3): the adapter term is about as large as the base term."""
    adt = adapter_dtype or dtype
    x = activation(M, K, dtype, lead, noncontig)
    W = base_weight(N, K, dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    alpha = (torch.randn(k_a, device=DEVICE) * (3.0 / (k_a * K)) ** 0.5).to(adt).requires_grad_(True)
    beta = (torch.randn(k_b, device=DEVICE) * (3.0 / (k_b * r)) ** 0.5).to(adt).requires_grad_(True)
    return x, W, alpha, beta, b


def _leaf(t):
    return None if t is None else t.detach().double().requires_grad_(True)


def vera_float64(x, W, A, B, ld, lb, b, p, seed, dy, basis_seed=None, basis_scale=1.0):
    """Output, base term and gradients (x, λ_d, λ_b) of the differentiable reference in float64, and the
    reference's output and gradients in the inputs' own dtypes (PyTorch's unfused composition)."""
    xl, ldl, lbl = _leaf(x), _leaf(ld), _leaf(lb)
    Ad = None if A is None else A.double()
    Bd = None if B is None else B.double()
    y = rb.vera_linear_reference(xl, W.double(), Ad, Bd, ldl, lbl, b.double(), p, seed, basis_seed, basis_scale)
    base = F.linear(xl, W.double(), b.double()).detach()
    unfused = run_unfused(rb.vera_linear_reference, (x, W, A, B, ld, lb, b, p, seed, basis_seed, basis_scale), dy,
                          (x, ld, lb))
    return y.detach(), base, torch.autograd.grad(y, (xl, ldl, lbl), dy.double()), unfused


def randlora_float64(x, W, A, B, lam, gam, s, b, p, seed, dy, basis_seed=None):
    xl, laml, gaml = _leaf(x), _leaf(lam), _leaf(gam)
    Ad = None if A is None else A.double()
    Bd = None if B is None else B.double()
    y = rb.randlora_linear_reference(xl, W.double(), Ad, Bd, laml, gaml, s, b.double(), p, seed, basis_seed)
    base = F.linear(xl, W.double(), b.double()).detach()
    unfused = run_unfused(rb.randlora_linear_reference, (x, W, A, B, lam, gam, s, b, p, seed, basis_seed), dy,
                          (x, lam, gam))
    return y.detach(), base, torch.autograd.grad(y, (xl, laml, gaml), dy.double()), unfused


def nola_float64(x, W, alpha, beta, r, bseed, s, b, p, seed, dy):
    xl, al, bl = _leaf(x), _leaf(alpha), _leaf(beta)
    y = rb.nola_linear_reference(xl, W.double(), al, bl, r, bseed, s, b.double(), p, seed)
    base = F.linear(xl, W.double(), b.double()).detach()
    unfused = run_unfused(rb.nola_linear_reference, (x, W, alpha, beta, r, bseed, s, b, p, seed), dy, (x, alpha, beta))
    return y.detach(), base, torch.autograd.grad(y, (xl, al, bl), dy.double()), unfused


def check_all(y, grads, ref, dtype, adt, names):
    """``ref`` from a *_float64 function: each of y and the gradients within twice the error of PyTorch's own
    unfused composition (the reference run in the same dtypes) against the float64 reference."""
    y_ref, base, ref_grads, (y_pt, pt_grads) = ref
    assert_close_as_unfused(y, y_pt, y_ref, dtype, "y")
    # The adapter's term on its own, so an error in it cannot hide under the base term.
    assert_close_as_unfused(y.double() - base, y_pt.double() - base, y_ref - base, dtype, "adapter term")
    assert_close_as_unfused(grads[0], pt_grads[0], ref_grads[0], dtype, "dx")
    for name, g, pg, rg in zip(names, grads[1:], pt_grads[1:], ref_grads[1:]):
        assert g.dtype == adt, f"{name}: dtype {g.dtype} != {adt}"
        assert_close_as_unfused(g, pg, rg, adt, name)


# (base dtype, adapter dtype or None for the base's): bf16 only on a GPU (the interpreter's bf16 dot is wrong).
DTYPES = [
    pytest.param((torch.float32, None), id="fp32"),
    pytest.param((torch.float16, None), id="fp16"),
    pytest.param((torch.bfloat16, None), id="bf16", marks=pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs a GPU")),
    pytest.param((torch.float16, torch.float32), id="fp16+fp32adapters"),
]
# M, K, N, r, lead: in_features > out_features (the odd shape, which carries the dtype and dropout
# sweep), the reverse and equal (fp32 with dropout).
ODD, WIDE, SQUARE = (37, 129, 65, 3, ()), (5, 24, 40, 5, (3,)), (9, 32, 32, 8, ())
SWEEP = [pytest.param(ODD, d.values[0], p, id=f"K>N-{d.id}-p{p}", marks=d.marks) for d in DTYPES for p in (0.0, 0.3)]
SWEEP += [pytest.param(case, (torch.float32, None), 0.3, id=f"{name}-fp32-p0.3")
          for case, name in ((WIDE, "K<N"), (SQUARE, "K=N"))]


# ----------------------------------------------------------------------------------------------
# VeRA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("case, dtypes, p", SWEEP)
def test_vera_matches_float64_reference(backend, case, dtypes, p):
    dtype, adt = dtypes
    M, K, N, r, lead = case
    x, W, A, B, ld, lb, b = vera_inputs(M, K, N, r, dtype, adt, lead, noncontig=(M == 37))
    y = lk.vera_linear(x, W, A, B, ld, lb, b, dropout_p=p, seed=1234, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, ld, lb), dy)
    ref = vera_float64(x, W, A, B, ld, lb, b, p, 1234, dy)
    check_all(y, grads, ref, dtype, adt or dtype, ("d lambda_d", "d lambda_b"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vera_rank_spanning_several_tiles(backend):
    # r = 70: the tail loop and the reduction each run over several 64-wide rank tiles.
    x, W, A, B, ld, lb, b = vera_inputs(11, 20, 18, 70, torch.float32)
    y = lk.vera_linear(x, W, A, B, ld, lb, b, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, ld, lb), dy)
    check_all(y, grads, vera_float64(x, W, A, B, ld, lb, b, 0.0, None, dy), torch.float32, torch.float32,
              ("d lambda_d", "d lambda_b"))


# ----------------------------------------------------------------------------------------------
# RandLoRA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("case, dtypes, p", SWEEP)
def test_randlora_matches_float64_reference(backend, case, dtypes, p):
    dtype, adt = dtypes
    M, K, N, r, lead = case
    x, W, A, B, lam, gam, b = randlora_inputs(M, K, N, r, dtype, adt, lead, noncontig=(M == 37))
    y = lk.randlora_linear(x, W, A, B, lam, gam, 1.5, b, dropout_p=p, seed=77, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, lam, gam), dy)
    ref = randlora_float64(x, W, A, B, lam, gam, 1.5, b, p, 77, dy)
    check_all(y, grads, ref, dtype, adt or dtype, ("d lambda", "d gamma"))


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("K, N, r", [(40, 23, 1), (23, 40, 4)])
def test_randlora_per_basis_A_and_sliced_rank_of_B(backend, K, N, r):
    """basis_A with one basis per n_b (not broadcast) and a basis_B whose rank dim is wider than r,
    so (n_b, r) does not flatten to one stride: the kernels' split-index path."""
    x, W, A, _, lam, gam, b = randlora_inputs(13, K, N, r, torch.float32, a_shared=False)
    n_b = lam.shape[1]
    B = torch.randn(max(N, K), n_b, r + 3, device=DEVICE) / (r * n_b) ** 0.5
    y = lk.randlora_linear(x, W, A, B, lam, gam, 0.7, b, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, lam, gam), dy)
    ref = randlora_float64(x, W, A, B, lam, gam, 0.7, b, 0.0, None, dy)
    check_all(y, grads, ref, torch.float32, torch.float32, ("d lambda", "d gamma"))


def test_randlora_reference_is_peft_layer_math():
    """The reference against PEFT's own get_scaled_bases / UniqueBaseGrad on the same tensors."""
    from peft.tuners.randlora.layer import UniqueBaseGrad

    for K, N in ((30, 12), (12, 30)):
        r = 4
        x, W, A, B, lam, gam, b = randlora_inputs(6, K, N, r, torch.float64)
        n_b, d_min, d_max = lam.shape[1], min(N, K), max(N, K)
        upd_A = UniqueBaseGrad.apply(A[:, :n_b, :d_min], lam, gam).flatten(end_dim=1)
        upd_B = B[:d_max, :n_b, :].flatten(start_dim=1)
        first, second = (upd_A, upd_B) if d_min == K else (upd_B.T, upd_A.T)
        want = F.linear(x, W, b) + F.linear(F.linear(x, first), second) * 2.5
        got = rb.randlora_linear_reference(x, W, A, B, lam, gam, 2.5, b)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["vera", "randlora", "nola"])
def test_reference_backward_matches_autograd_of_reference(method):
    """The explicit backward formulas against autograd of the differentiable forward, dropout on."""
    if method == "nola":
        x, W, s1, s2, b = nola_inputs(23, 31, 17, 5, torch.float64)
        y = rb.nola_linear(x, W, s1, s2, 5, 12, 1.3, b, dropout_p=0.4, seed=99, backend="reference")
        ref = rb.nola_linear_reference(x, W, s1, s2, 5, 12, 1.3, b, 0.4, 99)
    elif method == "vera":
        x, W, A, B, s1, s2, b = vera_inputs(23, 31, 17, 5, torch.float64)
        y = lk.vera_linear(x, W, A, B, s1, s2, b, dropout_p=0.4, seed=99, backend="reference")
        ref = rb.vera_linear_reference(x, W, A, B, s1, s2, b, 0.4, 99)
    else:
        x, W, A, B, s1, s2, b = randlora_inputs(23, 31, 17, 5, torch.float64)
        y = lk.randlora_linear(x, W, A, B, s1, s2, 1.3, b, dropout_p=0.4, seed=99, backend="reference")
        ref = rb.randlora_linear_reference(x, W, A, B, s1, s2, 1.3, b, 0.4, 99)
    dy = torch.randn_like(y)
    torch.testing.assert_close(y, ref)
    for g, rg in zip(torch.autograd.grad(y, (x, s1, s2), dy), torch.autograd.grad(ref, (x, s1, s2), dy)):
        torch.testing.assert_close(g, rg)


# ----------------------------------------------------------------------------------------------
# NOLA (reference and Triton only)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case, dtypes, p", [c for c in SWEEP if c.values[2] > 0])  # the products are LoRA's
def test_nola_matches_float64_reference(backend, case, dtypes, p):
    dtype, adt = dtypes
    M, K, N, r, lead = case
    x, W, alpha, beta, b = nola_inputs(M, K, N, r, dtype, adt, lead, noncontig=(M == 37))
    y = rb.nola_linear(x, W, alpha, beta, r, 2**45 + 3, 1.3, b, dropout_p=p, seed=41, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, alpha, beta), dy)
    ref = nola_float64(x, W, alpha, beta, r, 2**45 + 3, 1.3, b, p, 41, dy)
    check_all(y, grads, ref, dtype, adt or dtype, ("d alpha", "d beta"))


def test_nola_bases_and_projection_match_the_reference():
    """The combination kernel of a one-hot coefficient vector is that basis bit for bit; the
    projection kernel is the reference's contraction against the bases."""
    seed, k, rows, cols = 2**50 + 7, 6, 5, 37
    G = rb.nola_bases(k, rows, cols, seed, DEVICE)
    assert G.min() >= -1 and G.max() < 1
    for i in (0, k - 1):
        assert torch.equal(rbk.nola_combine(torch.eye(k, device=DEVICE)[i], seed, rows, cols), G[i])
    d = torch.randn(cols, rows, device=DEVICE).t()  # a strided D
    torch.testing.assert_close(rbk.nola_project(d, seed, k), torch.einsum("rc,irc->i", d, G))
    assert not torch.equal(rb.nola_bases(k, rows, cols, seed + 1, DEVICE), G)


@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(alpha=torch.randn(2, 2)), ValueError, "^alpha must be 1-D"),
        (dict(beta=torch.randn(0)), ValueError, "^beta must be 1-D"),
        (dict(beta=torch.randn(3, dtype=torch.float64)), TypeError, "^beta dtype"),
        (dict(rank=0), ValueError, "^rank must be an int"),
        (dict(rank=2.0), ValueError, "^rank must be an int"),
        (dict(basis_seed=None), ValueError, "^basis_seed must be"),
        (dict(basis_seed=-1), ValueError, "^basis_seed must be"),
        (dict(scaling=float("nan")), ValueError, "^scaling must be finite"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda' does not support this op"),
    ],
)
def test_nola_bad_input(change, exc, name):
    x, W, alpha, beta, b = nola_inputs(4, 8, 6, 2, torch.float32)
    kwargs = dict(x=x, weight=W, alpha=alpha, beta=beta, rank=2, basis_seed=5, bias=b)
    kwargs.update(change)
    with pytest.raises(exc, match=name):
        rb.nola_linear(**kwargs)


# ----------------------------------------------------------------------------------------------
# Seeded bases
# ----------------------------------------------------------------------------------------------
def _kernel_basis(basis: gemm.Basis, backend: str) -> torch.Tensor:
    """The (R, F) basis as a kernel sees it: its down product of the identity is Sᵀ exactly (one
    nonzero product per entry)."""
    eye = torch.eye(basis.cols, device=DEVICE)
    if backend == "triton":
        return gemm.down_proj(eye, basis, torch.float32).t()
    # The CUDA binding takes the adapter dtype from the bases' tensors: a unit row scale gives it one.
    basis = basis._replace(row_scale=torch.ones(basis.rows, device=DEVICE), row_scale_strides=(basis.groups, 1))
    zeros = torch.zeros(basis.cols, basis.cols, device=DEVICE)
    _, h = rbk.cuda_forward(eye, zeros, None, rbk.Layout(basis, basis, False), 1.0, None)
    return h.t()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_seeded_bases_are_bit_identical_to_the_reference(backend):
    seed = 2**40 + 12345
    # VeRA: D = A (r, K); U[j, n] = B[n, j] (no scales here).
    r, K, N = 5, 37, 21
    A, B = rb.vera_bases(None, None, r, K, N, seed, DEVICE)
    ones_r, ones_n = torch.ones(r, device=DEVICE), torch.ones(N, device=DEVICE)
    lay = rb._layout("vera", K, N, None, None, ones_r, ones_n, seed)
    assert torch.equal(_kernel_basis(lay.down, backend), A)
    up = _kernel_basis(lay.up._replace(row_scale=None, col_scale=None), backend)
    assert torch.equal(up, B.t())
    assert A.min() >= -1 and A.max() < 1 and abs(A.mean().item()) < 0.2
    # RandLoRA, both orientations: Â (scales 1) and B̄.
    for K, N in ((37, 21), (21, 37)):
        r = 3
        n_b = rb.randlora_num_bases(K, N, r)
        A3, B3 = rb.randlora_bases(None, None, r, n_b, K, N, seed, DEVICE)
        lam, gam = torch.ones(r, n_b, device=DEVICE), torch.ones(n_b, min(N, K), device=DEVICE)
        lay = rb._layout("randlora", K, N, None, None, lam, gam, seed)
        a_hat, b_bar = (lay.down, lay.up) if K <= N else (lay.up, lay.down)
        assert torch.equal(_kernel_basis(a_hat, backend), A3.expand(r, n_b, -1).reshape(r * n_b, -1))
        assert torch.equal(_kernel_basis(b_bar, backend), B3.flatten(1).t())
        assert set(A3.unique().tolist()) == {-1.0, 1.0}
    # Different seeds give different bases; A and B streams differ.
    A2, _ = rb.vera_bases(None, None, 5, 37, 21, seed + 1, DEVICE)
    assert not torch.equal(A2, rb.vera_bases(None, None, 5, 37, 21, seed, DEVICE)[0])


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_seeded_matches_float64_reference(backend, method):
    M, K, N, r = 19, 33, 26, 3
    if method == "vera":
        x, W, _, _, s1, s2, b = vera_inputs(M, K, N, r, torch.float32, seeded=True)
        y = lk.vera_linear(x, W, None, None, s1, s2, b, dropout_p=0.2, seed=5, backend=backend,
                           basis_seed=777, rank=r, basis_scale=0.5)
        dy = torch.randn_like(y)
        ref = vera_float64(x, W, None, None, s1, s2, b, 0.2, 5, dy, basis_seed=777, basis_scale=0.5)
    else:
        x, W, _, _, s1, s2, b = randlora_inputs(M, K, N, r, torch.float32, seeded=True)
        y = lk.randlora_linear(x, W, None, None, s1, s2, 0.9, b, dropout_p=0.2, seed=5, backend=backend,
                               basis_seed=777, rank=r)
        dy = torch.randn_like(y)
        ref = randlora_float64(x, W, None, None, s1, s2, 0.9, b, 0.2, 5, dy, basis_seed=777)
    grads = torch.autograd.grad(y, (x, s1, s2), dy)
    check_all(y, grads, ref, torch.float32, torch.float32, ("d scale 1", "d scale 2"))


def test_seeded_equals_stored_bases_of_the_same_values():
    """A seed is only a way to store the bases: passing the generated tensors gives the same layer."""
    M, K, N, r = 7, 20, 12, 2
    x, W, _, _, ld, lb, b = vera_inputs(M, K, N, r, torch.float32, seeded=True)
    A, B = rb.vera_bases(None, None, r, K, N, 31, DEVICE)
    y1 = lk.vera_linear(x, W, None, None, ld, lb, b, basis_seed=31, backend="reference")
    y2 = lk.vera_linear(x, W, A, B, ld, lb, b, backend="reference")
    torch.testing.assert_close(y1, y2)


# ----------------------------------------------------------------------------------------------
# Kernels write every element: every launcher allocation poisoned with NaN
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors, so any element a kernel skips shows up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_kernels_write_every_element(poisoned_empty, backend, method):
    M, K, N, r = 21, 45, 30, 3
    if method == "vera":
        x, W, A, B, s1, s2, b = vera_inputs(M, K, N, r, torch.float32)
        y = lk.vera_linear(x, W, A, B, s1, s2, b, dropout_p=0.25, seed=4, backend=backend)
        dy = torch.randn(y.shape, device=DEVICE)
        ref = vera_float64(x, W, A, B, s1, s2, b, 0.25, 4, dy)
    else:
        x, W, A, B, s1, s2, b = randlora_inputs(M, K, N, r, torch.float32)
        y = lk.randlora_linear(x, W, A, B, s1, s2, 1.1, b, dropout_p=0.25, seed=4, backend=backend)
        dy = torch.randn(y.shape, device=DEVICE)
        ref = randlora_float64(x, W, A, B, s1, s2, 1.1, b, 0.25, 4, dy)
    grads = torch.autograd.grad(y, (x, s1, s2), dy)
    check_all(y, grads, ref, torch.float32, torch.float32, ("d scale 1", "d scale 2"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_into_poisoned_out(backend):
    x, W, A, B, lam, gam, b = randlora_inputs(37, 65, 40, 3, torch.float32)
    x, lam, gam = x.detach(), lam.detach(), gam.detach()
    lay = rb._layout("randlora", 65, 40, A, B, lam, gam, None)
    y = torch.full((37, 40), float("nan"), device=DEVICE)
    if backend == "triton":
        rbk.triton_forward(x, W, b, lay, 1.5, torch.float32, None, out=y)
    else:
        rbk.cuda_forward(x, W, b, lay, 1.5, None, out=y)
    y_ref, _ = rb._reference_forward(x.double(), W.double(), b.double(), A.double(), B.double(), lam.double(),
                                     gam.double(), 1.5, 0.0, None, None, 3 * lam.shape[1], "randlora")
    assert_close(y, y_ref, torch.float32, "y")


# ----------------------------------------------------------------------------------------------
# Dropout seeds, checkpointing, inference, empty batch
# ----------------------------------------------------------------------------------------------
def test_seed_none_draws_from_torch_generator_and_backward_reuses_it():
    x, W, A, B, ld, lb, b = vera_inputs(16, 12, 10, 3, torch.float32)
    torch.manual_seed(5)
    y = lk.vera_linear(x, W, A, B, ld, lb, b, dropout_p=0.5, backend="reference")
    torch.manual_seed(5)
    seed = _rng.draw_seed()
    y_seeded = lk.vera_linear(x, W, A, B, ld, lb, b, dropout_p=0.5, seed=seed, backend="reference")
    torch.testing.assert_close(y, y_seeded)
    dy = torch.randn_like(y)
    for g, gs in zip(torch.autograd.grad(y, (x, ld, lb), dy), torch.autograd.grad(y_seeded, (x, ld, lb), dy)):
        torch.testing.assert_close(g, gs)
    e = lk.randlora_linear(*randlora_inputs(4, 12, 10, 3, torch.float32)[:6], 1.0, dropout_p=0.5, training=False)
    assert e.shape == (4, 10)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_checkpointing_with_dropout_gives_same_gradients(backend):
    x, W, A, B, lam, gam, b = randlora_inputs(16, 24, 20, 4, torch.float32)

    def f(x_, lam_, gam_):
        return lk.randlora_linear(x_, W, A, B, lam_, gam_, 1.0, b, dropout_p=0.5, backend=backend)

    torch.manual_seed(5)
    y = f(x, lam, gam)
    dy = torch.randn_like(y)
    g_plain = torch.autograd.grad(y, (x, lam, gam), dy)
    torch.manual_seed(5)
    y_ck = torch.utils.checkpoint.checkpoint(f, x, lam, gam, use_reentrant=False)
    torch.testing.assert_close(y_ck, y)
    for a, c in zip(g_plain, torch.autograd.grad(y_ck, (x, lam, gam), dy)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_inference_and_empty_batch(backend):
    x, W, A, B, ld, lb, b = vera_inputs(3, 16, 8, 2, torch.float32)
    with torch.inference_mode():
        y = lk.vera_linear(x, W, A, B, ld, lb, b, backend=backend)
    assert y.grad_fn is None
    ref = rb.vera_linear_reference(x.detach().double(), W.double(), A.double(), B.double(), ld.detach().double(),
                                   lb.detach().double(), b.double())
    assert_close(y, ref, torch.float32)
    x0, W, A, B, lam, gam, b = randlora_inputs(0, 16, 8, 2, torch.float32)
    y0 = lk.randlora_linear(x0, W, A, B, lam, gam, 1.0, b, backend=backend)
    assert y0.shape == (0, 8)
    gx, glam = torch.autograd.grad(y0.sum(), (x0, lam))
    assert gx.shape == x0.shape and torch.equal(glam, torch.zeros_like(lam))


# ----------------------------------------------------------------------------------------------
# Autocast
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_autocast_casts_every_operand(method):
    """Under bf16 autocast every float operand is cast first, as PEFT's unfused matmuls are: the
    result equals the op on bf16 copies, and the fp32 leaves get those gradients in fp32."""
    if method == "vera":
        inputs = vera_inputs(9, 20, 12, 3, torch.float32)

        def f(x, W, A, B, s1, s2, b):
            return lk.vera_linear(x, W, A, B, s1, s2, b, dropout_p=0.3, seed=6, backend="reference")
    else:
        inputs = randlora_inputs(9, 20, 12, 3, torch.float32)

        def f(x, W, A, B, s1, s2, b):
            return lk.randlora_linear(x, W, A, B, s1, s2, 1.5, b, dropout_p=0.3, seed=6, backend="reference")

    x, _, _, _, s1, s2, _ = inputs
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = f(*inputs)
    assert y.dtype == torch.bfloat16
    copies = [t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) for t in inputs]
    y_bf16 = f(*copies)
    assert torch.equal(y, y_bf16)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, s1, s2), dy)
    grads_bf16 = torch.autograd.grad(y_bf16, (copies[0], copies[4], copies[5]), dy)
    for g, g16 in zip(grads, grads_bf16):
        assert g.dtype == torch.float32
        assert torch.equal(g, g16.float())


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ----------------------------------------------------------------------------------------------
def _vera_good():
    x, W, A, B, ld, lb, b = vera_inputs(4, 8, 6, 2, torch.float32)
    return dict(x=x, weight=W, vera_A=A, vera_B=B, lambda_d=ld, lambda_b=lb, bias=b)


def _randlora_good():
    x, W, A, B, lam, gam, b = randlora_inputs(4, 8, 6, 2, torch.float32)
    return dict(x=x, weight=W, basis_A=A, basis_B=B, lambda_=lam, gamma=gam, scaling=1.0, bias=b)


@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(x=torch.randn(4, 9)), ValueError, "^x has 9 features"),
        (dict(x="not a tensor"), TypeError, "^x must be a torch.Tensor"),
        (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "^x must be float"),
        (dict(weight=torch.randn(6, 8, 1)), ValueError, "^weight must be 2-D"),
        (dict(vera_A=torch.randn(2, 7)), ValueError, "^vera_A of shape .* is too small"),
        (dict(vera_A=torch.randn(1, 8)), ValueError, "^vera_A of shape .* is too small"),
        (dict(vera_B=torch.randn(5, 2)), ValueError, "^vera_B of shape .* is too small"),
        (dict(vera_B=None), ValueError, "^vera_B is None"),
        (dict(vera_B=torch.randn(6, 2, dtype=torch.float16)), TypeError, "^vera_B dtype"),
        (dict(vera_A=torch.randn(2, 8, requires_grad=True)), ValueError,
         "^vera_A requires grad, but the random bases are frozen"),
        (dict(lambda_d=torch.randn(0)), ValueError, "^lambda_d must be 1-D"),
        (dict(lambda_b=torch.randn(5)), ValueError, r"^lambda_b must be \(out_features,\)"),
        (dict(lambda_b=torch.randn(6, dtype=torch.float64)), TypeError, "^lambda_b dtype"),
        (dict(bias=torch.randn(5)), ValueError, r"^bias must be \(6,\)"),
        (dict(dropout_p=1.0), ValueError, "^dropout_p must be"),
        (dict(seed=-1), ValueError, "^seed must be"),
        (dict(basis_scale=float("nan")), ValueError, "^basis_scale must be finite"),
        (dict(basis_seed=3), ValueError, "^vera_A must be None when basis_seed is given"),
        (dict(vera_A=None, vera_B=None, basis_seed=-3), ValueError, "^basis_seed must be"),
        (dict(vera_A=None, vera_B=None, basis_seed=3, rank=4), ValueError, "^rank=4 does not match"),
        (dict(rank=2), ValueError, "^rank= is only used with basis_seed="),
    ],
)
def test_vera_bad_input(change, exc, name):
    kwargs = _vera_good()
    kwargs.update(change)
    with pytest.raises(exc, match=name):
        lk.vera_linear(**kwargs)


@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(lambda_=torch.randn(2)), ValueError, "^lambda_ must be 2-D"),
        (dict(gamma=torch.randn(3, 5)), ValueError, r"^gamma must be \(n_b, min\(in, out\)\)"),
        (dict(basis_A=torch.randn(2, 1, 5)), ValueError, "^basis_A of shape .* is too small"),
        (dict(basis_A=torch.randn(2, 5)), ValueError, "^basis_A must be 3-D"),
        (dict(basis_A=torch.randn(2, 2, 6)), ValueError, "^basis_A's second dim"),
        (dict(basis_B=torch.randn(7, 3, 2)), ValueError, "^basis_B of shape .* is too small"),
        (dict(basis_B=torch.randn(8, 3, 2, dtype=torch.float16)), TypeError, "^basis_B dtype"),
        (dict(scaling=float("inf")), ValueError, "^scaling must be finite"),
        (dict(scaling=torch.tensor(1.0)), TypeError, "^scaling must be a Python float"),
        (dict(gamma=torch.randn(3, 6, dtype=torch.float16)), TypeError, "^gamma dtype"),
        (dict(x=torch.randn(4, 8, dtype=torch.float16)), TypeError, "^weight dtype .* must equal x dtype"),
        (dict(basis_A=None, basis_B=None, basis_seed=2**62), ValueError, "^basis_seed must be"),
    ],
)
def test_randlora_bad_input(change, exc, name):
    kwargs = _randlora_good()
    kwargs.update(change)
    with pytest.raises(exc, match=name):
        lk.randlora_linear(**kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    kwargs = _vera_good()
    with pytest.raises(RuntimeError, match="backend='cuda' does not support tensors on cpu"):
        lk.vera_linear(**kwargs, backend="cuda")


def test_full_rank_update_has_full_rank():
    """n_b = ceil(d_min / r) bases make ΔW full rank (the point of RandLoRA), here with seeded bases."""
    K, N, r = 24, 40, 5
    n_b = rb.randlora_num_bases(K, N, r)
    lam = torch.randn(r, n_b, dtype=torch.float64)
    gam = torch.randn(n_b, min(K, N), dtype=torch.float64)
    W = torch.zeros(N, K, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    delta = rb.randlora_linear_reference(eye, W, None, None, lam, gam, 1.0, basis_seed=9).t()
    assert n_b * r >= min(K, N)
    assert torch.linalg.matrix_rank(delta).item() == min(K, N)
