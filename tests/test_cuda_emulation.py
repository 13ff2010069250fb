"""csrc/'s CUDA kernels run on the CPU (tests/cuda_emu: g++, a thread per CUDA thread) against float64.

This exercises the kernels' index math, masks, split-L reductions, RNG and the wmma fragment
layouts (the emulator checks wmma's alignment and ldm rules) without a GPU. The products with
16-bit operands take the tensor-core path (wmma) and fp32 ones the FMA path; both are covered.
Shapes are small and odd; workspaces are NaN-filled and outputs NaN-poisoned, so a value read
before it is written, or never written, fails the comparison.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from _helpers import EMU_DTYPE_CODES, TOL
from cuda_emu import build

from lowrank_kernels.ops import _rng
from lowrank_kernels.ops import projected_step as ps
from lowrank_kernels.ops import random_basis as rb
from lowrank_kernels.ops import random_basis_kernels as rbk

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(build.compiler() is None, reason="g++ is needed to build the CUDA emulation")]

DT = EMU_DTYPE_CODES
NUM_SMS = 2  # small grids, and the split-L planner still splits the long reductions
c_i64, c_f, c_u32, c_p = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32, ctypes.c_void_p


class Basis(ctypes.Structure):  # csrc/random_basis.h
    _fields_ = [("rows", c_i64), ("cols", c_i64), ("groups", c_i64), ("gen", ctypes.c_int), ("data", c_p),
                ("s_hi", c_i64), ("s_lo", c_i64), ("s_f", c_i64), ("k0", c_u32), ("k1", c_u32),
                ("transposed", ctypes.c_bool), ("row_scale", c_p), ("rs_hi", c_i64), ("rs_lo", c_i64),
                ("col_scale", c_p), ("cs_g", c_i64), ("cs_f", c_i64)]


class Mat(ctypes.Structure):  # csrc/projected_step.h
    _fields_ = [("data", c_p), ("stride0", c_i64), ("stride1", c_i64)]


class Problem(ctypes.Structure):  # csrc/projected_step.h
    _fields_ = [("dtype", ctypes.c_int), ("batch", c_i64), ("offsets", c_p), ("coef", c_p), ("W", Mat), ("G", Mat),
                ("P", Mat), ("M1", Mat), ("M2", Mat), ("R", Mat), ("N", c_p), ("gsq", c_p), ("phi", c_p),
                ("res", c_p), ("limit", c_p), ("prev", c_p), ("rows", c_i64), ("cols", c_i64), ("rank", c_i64),
                ("fira", ctypes.c_bool), ("project", ctypes.c_bool), ("decay", ctypes.c_bool), ("beta1", c_f),
                ("beta2", c_f), ("eps", c_f), ("scale", c_f)]


@pytest.fixture(scope="module")
def lib():
    return build.load()


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def dropout(p, seed, rows, cols):
    """(keys and threshold for the kernels, float64 0/1 keep mask from ops/_rng); the kernels
    take the 1/(1-p) scale in their alpha, as the bindings pass it."""
    if p == 0.0:
        return (0, 0, 0), torch.ones(rows, cols, dtype=torch.float64)
    k0, k1 = _rng.split_seed(seed)
    return (k0, k1, _rng.dropout_threshold(p)), _rng.dropout_keep(seed, p, rows, cols).double()


def call(fn, *args):
    err = fn(*args)
    assert err == 0, f"launch failed with cudaError_t {err}"


# ---------------------------------------------------------------------------------------------
# LoRA's tile kernels (csrc/lora.cu on csrc/tiles.cuh)
# ---------------------------------------------------------------------------------------------
CASES = [  # (base dtype, adapter dtype): MMA path for 16-bit adapters, FMA path for fp32 ones
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
    (torch.float32, torch.float32),
]


@pytest.mark.parametrize("base,adapter", CASES)
@pytest.mark.parametrize("r,p", [(3, 0.3), (40, 0.0)])
def test_lora_down_proj(lib, base, adapter, r, p):
    torch.manual_seed(0)
    M, K = 37, 129
    x = torch.randn(K, M).to(base).t()  # non-contiguous
    a = torch.randn(r, K).to(adapter)
    keys, mask = dropout(p, 1234, M, K)
    out = poisoned((M, r), torch.float32)
    call(lib.emu_lora_down_proj, DT[base], DT[adapter], ptr(x), c_i64(x.stride(0)), c_i64(x.stride(1)), ptr(a),
         c_i64(a.stride(0)), c_i64(a.stride(1)), ptr(out), c_i64(r), c_i64(1), c_i64(M), c_i64(K), c_i64(r), c_f(0.7),
         *map(c_u32, keys), NUM_SMS)
    ref = 0.7 * (x.double() * mask) @ a.double().t()
    assert rel(out, ref) <= TOL[adapter]


@pytest.mark.parametrize("base,adapter", CASES)
@pytest.mark.parametrize("r,p", [(3, 0.25), (40, 0.0)])
def test_lora_outer_reduce(lib, base, adapter, r, p):
    torch.manual_seed(1)
    M, K = 150, 65
    g = torch.randn(M, r).to(adapter)
    x = torch.randn(M, K).to(base)
    keys, mask = dropout(p, 99, M, K)
    out = poisoned((r, K), adapter)
    call(lib.emu_lora_outer_reduce, DT[base], DT[adapter], ptr(g), c_i64(g.stride(0)), c_i64(g.stride(1)), ptr(x),
         c_i64(x.stride(0)), c_i64(x.stride(1)), ptr(out), c_i64(K), c_i64(1), c_i64(M), c_i64(K), c_i64(r),
         c_f(1.5), *map(c_u32, keys), NUM_SMS)
    ref = 1.5 * g.double().t() @ (x.double() * mask)
    assert rel(out, ref) <= TOL[adapter]


@pytest.mark.parametrize("base,adapter", CASES)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_lora_rank_product(lib, base, adapter, p):
    torch.manual_seed(2)
    M, N, r = 37, 133, 5
    h = torch.randn(M, r).to(adapter)
    b = torch.randn(r, N).to(adapter).t()  # (N, r), non-contiguous
    bias = torch.randn(N).to(base)
    keys, mask = dropout(p, 7, M, N)
    out = poisoned((M, N), base)
    call(lib.emu_lora_rank_product, DT[base], DT[adapter], ptr(h), c_i64(r), c_i64(1), ptr(b), c_i64(b.stride(0)),
         c_i64(b.stride(1)),
         ptr(bias), ptr(out), c_i64(N), c_i64(1), c_i64(M), c_i64(N), c_i64(r), c_f(2.0), *map(c_u32, keys), NUM_SMS)
    low = 2.0 * mask * (h.double() @ b.double().t())
    tol = max(TOL[base], TOL[adapter])  # the output is in the base dtype
    # The low-rank term is checked apart from the bias, so a wrong product cannot hide in it.
    assert rel(out.double() - bias.double(), low) <= 2 * tol
    assert rel(out, low + bias.double()) <= tol


# ---------------------------------------------------------------------------------------------
# Random-basis products (csrc/random_basis.cu): VeRA and RandLoRA, stored and seeded bases
# ---------------------------------------------------------------------------------------------
def _layout_case(method, seeded, dtype, K, N):
    """(layout, reference (D, U) as a function of float64 (s1, s2), s1, s2) for a small layer."""
    torch.manual_seed(3)
    if method == "vera":
        r = 6
        A, B = torch.randn(r + 2, K + 3), torch.randn(N + 5, r + 1)  # shared buffers, sliced
        s1, s2 = torch.rand(r) + 0.5, torch.randn(N)
    else:
        r = 4
        n_b = rb.randlora_num_bases(K, N, r)
        A, B = torch.randn(r, 1, min(K, N)).sign(), torch.randn(max(K, N), n_b, r).sign()
        s1, s2 = torch.randn(r, n_b), torch.rand(n_b, min(K, N)) + 0.5
    seed = 4321 if seeded else None
    bA, bB = (None, None) if seeded else (A.to(dtype), B.to(dtype))
    s1d, s2d = s1.to(dtype), s2.to(dtype)
    lay = rb._layout(method, K, N, bA, bB, s1d, s2d, seed)

    def factors(t1, t2):
        D, U, _ = rb._reference_factors(method, K, N, None if seeded else bA.double(),
                                        None if seeded else bB.double(), t1, t2, seed, None, None)
        return D, U

    return lay, factors, s1d, s2d


def _basis(b, keep):
    """The ctypes Basis of an ops/gemm.py Basis (tensors appended to `keep` so they stay alive)."""
    rows, cols, tensor, s_hi, s_lo, s_f, groups, rs, rs_hi, rs_lo, cs, k0, k1, gen, transposed = rbk.cuda_basis(b)
    keep += [tensor, rs, cs]
    return Basis(rows, cols, groups, gen, tensor.data_ptr() if tensor is not None else None, s_hi, s_lo, s_f, k0, k1,
                 transposed, rs.data_ptr() if rs is not None else None, rs_hi, rs_lo,
                 cs.data_ptr() if cs is not None else None, cs.stride(0) if cs is not None else 0,
                 cs.stride(1) if cs is not None else 0)


RB_CASES = [("vera", False, torch.float16), ("vera", True, torch.bfloat16), ("vera", True, torch.float32),
            ("randlora", False, torch.float16), ("randlora", True, torch.float32), ("randlora", False, torch.float32)]


@pytest.mark.parametrize("method,seeded,dtype", RB_CASES)
def test_random_basis_products(lib, method, seeded, dtype):
    M, K, N = 37, 45, 70
    lay, factors, s1, s2 = _layout_case(method, seeded, dtype, K, N)
    D, U = factors(s1.double(), s2.double())
    R = D.shape[0]
    keep = []
    down, up = _basis(lay.down, keep), _basis(lay.up, keep)
    x = torch.randn(M, K).to(dtype)
    keys, mask = dropout(0.2, 55, M, K)

    h = poisoned((M, R), torch.float32)
    call(lib.emu_rb_down, DT[dtype], DT[dtype], ptr(x), c_i64(K), c_i64(1), ctypes.byref(down), ptr(h), c_i64(R),
         c_i64(1), c_i64(M), c_f(1.25), *map(c_u32, keys), NUM_SMS)
    assert rel(h, 1.25 * (x.double() * mask) @ D.t()) <= TOL[dtype]

    hin = torch.randn(M, R).to(dtype).float()  # h as the reference holds it: in the adapter dtype
    bias = torch.randn(N).to(dtype)
    y = poisoned((M, N), dtype)
    call(lib.emu_rb_up, DT[dtype], DT[dtype], ptr(hin), c_i64(R), c_i64(1), ctypes.byref(up), ptr(bias), ptr(y),
         c_i64(N), c_i64(1), c_i64(M), c_f(0.5), 0, 0, 0, NUM_SMS)
    low = 0.5 * hin.double() @ U
    assert rel(y.double() - bias.double(), low) <= 2 * TOL[dtype]

    # dx's low-rank term: the up kernel with D and the dropout mask on the output.
    dh = torch.randn(M, R).to(dtype).float()
    dx = poisoned((M, K), dtype)
    call(lib.emu_rb_up, DT[dtype], DT[dtype], ptr(dh), c_i64(R), c_i64(1), ctypes.byref(down), None, ptr(dx),
         c_i64(K), c_i64(1), c_i64(M), c_f(0.75), *map(c_u32, keys), NUM_SMS)
    assert rel(dx, 0.75 * mask * (dh.double() @ D)) <= TOL[dtype]


@pytest.mark.parametrize("method,seeded,dtype", RB_CASES)
def test_random_basis_scale_grads(lib, method, seeded, dtype):
    # RandLoRA: K <= N scales D (dS against x, with dropout), K > N scales U (against dy)
    M, K, N = 70, 45, 38 if method == "randlora" and seeded else 70
    lay, factors, s1, s2 = _layout_case(method, seeded, dtype, K, N)
    keep = []
    scaled = lay.down if lay.scaled_is_down else lay.up
    S = _basis(scaled, keep)
    F = S.cols
    g = torch.randn(M, S.rows).to(dtype).float()
    x = torch.randn(F, M).to(dtype).t()  # the operand dS reduces against: x (scaled D) or dy (scaled U)
    p = 0.3 if lay.scaled_is_down else 0.0
    keys, mask = dropout(p, 17, M, F)
    d_row = poisoned((S.rows,), torch.float32)
    d_col = poisoned((S.groups, F), torch.float32)
    call(lib.emu_rb_scale_grads, DT[dtype], DT[dtype], ptr(g), c_i64(S.rows), c_i64(1), ptr(x), c_i64(x.stride(0)),
         c_i64(x.stride(1)), ctypes.byref(S), c_i64(M), c_f(0.9), *map(c_u32, keys), NUM_SMS, ptr(d_row), ptr(d_col))
    # float64 reference: the gradients of <dS, S(s1, s2)> with dS = 0.9 gᵀ drop(x), by autograd
    t1, t2 = s1.double().requires_grad_(), s2.double().requires_grad_()
    D, U = factors(t1, t2)
    dS = 0.9 * g.double().t() @ (x.double() * mask)
    ((D if lay.scaled_is_down else U) * dS).sum().backward()
    assert rel(d_row, t1.grad.reshape(-1)) <= TOL[dtype]
    assert rel(d_col, t2.grad.reshape(S.groups, F)) <= TOL[dtype]


# ---------------------------------------------------------------------------------------------
# Projected AdamW step (csrc/projected_step.cu)
# ---------------------------------------------------------------------------------------------
def _mat(t):
    return Mat(t.data_ptr(), t.stride(0), t.stride(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fira", [False, True])
def test_projected_step(lib, dtype, fira):
    torch.manual_seed(4)
    rows, cols, rank = 70, 37, 5
    W = torch.randn(rows, cols).to(dtype)
    G = torch.randn(rows, cols).to(dtype)
    P = torch.linalg.qr(torch.randn(cols, rank))[0].t().contiguous()  # (rank, cols), orthonormal rows
    m1, m2 = torch.randn(rows, rank) * 0.1, torch.rand(rows, rank) * 0.1
    coef = torch.tensor([[0.5, 0.001]], dtype=torch.float32)  # a step well above W's rounding
    beta1, beta2, eps, scale = 0.9, 0.999, 1e-8, 0.25
    prev = torch.tensor([3.0])  # a previous norm, so the limiter runs

    ref_w, ref_m1, ref_m2, ref_prev = W.double(), m1.double(), m2.double(), prev.double()
    ps.reference_projected_one(ref_w, G.double(), P.double(), ref_m1, ref_m2, ref_prev, None, coef[0].double(),
                               "right", beta1, beta2, eps, scale, fira, True)

    offsets = torch.zeros(7, 1, dtype=torch.int64)
    R, N = poisoned((rows, rank), torch.float32), poisoned((1, rows, rank), torch.float32)
    vec = [poisoned((rows,), torch.float32) for _ in range(3)]
    limit = poisoned((1,), torch.float32)
    pb = Problem(DT[dtype], 1, offsets.data_ptr(), coef.data_ptr(), _mat(W), _mat(G), _mat(P), _mat(m1), _mat(m2),
                 _mat(R), N.data_ptr(), *(v.data_ptr() for v in vec), limit.data_ptr(), prev.data_ptr(), rows, cols,
                 rank, fira, True, True, beta1, beta2, eps, scale)
    w0 = W.double()
    call(lib.emu_pstep_step, ctypes.byref(pb))
    assert rel(m1, ref_m1) <= TOL[dtype]
    assert rel(m2, ref_m2) <= TOL[dtype]
    # The update is small next to W: compare it, not only the new W, with the reference rounded to
    # W's dtype as the kernel's result is.
    assert rel(W.double() - w0, ref_w.to(dtype).double() - w0) <= 2 * TOL[dtype]
    if fira:
        assert rel(prev, ref_prev) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_project(lib, dtype):
    torch.manual_seed(5)
    rows, cols, rank = 70, 133, 9
    G = torch.randn(cols, rows).to(dtype).t()
    P = torch.randn(rank, cols)
    R = poisoned((rows, rank), torch.float32)
    call(lib.emu_pstep_project, DT[dtype], ptr(G), c_i64(G.stride(0)), c_i64(G.stride(1)), ptr(P), c_i64(cols),
         c_i64(1), ptr(R), c_i64(rank), c_i64(1), c_i64(rows), c_i64(cols), c_i64(rank))
    assert rel(R, G.double() @ P.double().t()) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adamw(lib, dtype):
    torch.manual_seed(6)
    numel = 1000
    w, g = torch.randn(2 * numel).to(dtype), torch.randn(2 * numel).to(dtype)
    m1, m2 = torch.randn(2 * numel) * 0.1, torch.rand(2 * numel) * 0.1
    # two problems in one launch: the second half of each tensor, through the offset table
    offsets = torch.tensor([[0, numel]] * 4, dtype=torch.int64)
    coef = torch.tensor([[0.5, 0.001], [0.3, 0.0]], dtype=torch.float32)
    ref = [t.double() for t in (w, m1, m2)]
    halves = lambda t: [t[:numel], t[numel:]]  # noqa: E731
    ps.reference_adamw(halves(ref[0]), halves(g.double()), halves(ref[1]), halves(ref[2]), coef.double(),
                       0.9, 0.99, 1e-8, True)
    w0 = w.double()
    call(lib.emu_pstep_adamw, DT[dtype], ptr(w), ptr(g), ptr(m1), ptr(m2), ptr(offsets), ptr(coef), c_i64(2),
         c_i64(numel), c_f(0.9), c_f(0.99), c_f(1e-8), 1)
    assert rel(m1, ref[1]) <= 1e-6 and rel(m2, ref[2]) <= 1e-6
    assert rel(w.double() - w0, ref[0] - w0) <= 2 * TOL[dtype]


# ---------------------------------------------------------------------------------------------
# Sparse part, uniform support (csrc/sparse_lowrank.cu)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse_csr(lib, dtype):
    torch.manual_seed(7)
    M, N, K = 150, 40, 33
    index = torch.randperm(N * K)[: N * K // 10].sort().values
    vals = torch.randn(index.numel()).to(dtype)
    S = torch.zeros(N * K, dtype=torch.float64)
    S[index] = vals.double()
    S = S.view(N, K)
    x = torch.randn(K, M).to(dtype).t()  # token-major, as the launcher passes it
    row_ptr = torch.zeros(N + 1, dtype=torch.int32)
    row_ptr[1:] = torch.bincount(index // K, minlength=N).cumsum(0)
    y0 = torch.randn(M, N).to(dtype)
    y = y0.clone()
    call(lib.emu_slr_spmm_csr, DT[dtype], DT[dtype], ptr(x), c_i64(x.stride(0)), c_i64(x.stride(1)), ptr(vals),
         ptr(index), ptr(row_ptr), None, ptr(y), c_i64(N), c_i64(1), c_i64(M), c_i64(N), c_i64(K), 0)
    assert rel(y.double() - y0.double(), x.double() @ S.t()) <= TOL[dtype] * 2

    dy = torch.randn(M, N).to(dtype)
    out = poisoned((index.numel(),), dtype)
    call(lib.emu_slr_sddmm_csr, DT[dtype], DT[dtype], ptr(dy), c_i64(N), c_i64(1), ptr(x), c_i64(x.stride(0)),
         c_i64(x.stride(1)), ptr(index), ptr(out), c_i64(M), c_i64(K), c_i64(index.numel()))
    assert rel(out, (dy.double().t() @ x.double()).reshape(-1)[index]) <= TOL[dtype]
