"""csrc/multi_lora.cu's kernels on the CPU (tests/cuda_emu: g++, a thread per CUDA thread), composed
as csrc/multi_lora_binding.cpp composes them, against the float64 reference of ops/multi_lora.py: forward and
every gradient, mixed ranks, an empty adapter, index -1, mixtures (two slots per token), dropout,
16-bit (wmma) and fp32 (FMA) paths. Outputs are NaN-poisoned where the kernels must write them."""

from __future__ import annotations

import ctypes

import pytest
import torch
from _helpers import EMU_DTYPE_CODES, TOL
from cuda_emu import build

from lowrank_kernels.ops import gemm
from lowrank_kernels.ops import multi_lora as ml
from lowrank_kernels.ops import multi_lora_kernels as mlk

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(build.compiler() is None, reason="g++ is needed to build the CUDA emulation")]

DT = EMU_DTYPE_CODES
c_i64, c_f, c_u32, c_p = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32, ctypes.c_void_p


@pytest.fixture(scope="module")
def lib():
    return build.load()


def ptr(t):
    return c_p(t.data_ptr())


def call(fn, *args):
    err = fn(*args)
    assert err == 0, f"launch failed with cudaError_t {err}"


def segments(grouping, key, ranks):
    S, M, n = key.numel(), key.shape[0], ranks.numel()
    order, _, offsets = mlk.ungroup(grouping, S, M)
    return order, offsets, (ptr(order), ptr(offsets), ptr(ranks), c_i64(n), c_i64(S), c_i64(key.shape[1]))


def emulated(lib, x, W, A, B, bias, key, coef, ranks, dropout, dy):
    """(y, h, dx, dA, dB, dcoef) by the kernels, in multi_lora_binding.cpp's order of launches."""
    M, K = x.shape
    N, n, R = W.shape[0], A.shape[0], A.shape[1]
    S, k = key.numel(), key.shape[1]
    adt = A.dtype
    grouping = mlk.group(key, n)
    order, offsets, seg = segments(grouping, key, ranks)
    (k0, k1, thr, keep_scale) = dropout if dropout is not None else (0, 0, 0, 1.0)
    drop = (c_u32(k0), c_u32(k1), c_u32(thr))
    nodrop = (c_u32(0), c_u32(0), c_u32(0))
    base, adapter = DT[x.dtype], DT[adt]
    coef_sorted = coef.reshape(-1).float()[order]

    # forward
    y = (x.float() @ W.float().t() + bias.float()).to(x.dtype)
    h_sorted = torch.zeros(S, R)
    call(lib.emu_mlora_seg_down, base, adapter, ptr(x), c_i64(x.stride(0)), c_i64(x.stride(1)), ptr(A),
         c_i64(A.stride(1)), c_i64(A.stride(2)), c_i64(A.stride(0)), ptr(h_sorted), c_i64(R), c_i64(1), c_i64(K),
         c_i64(R), c_f(keep_scale), *drop, *seg)
    hc = (h_sorted * coef_sorted[:, None]).to(adt)
    for phase in range(k):
        call(lib.emu_mlora_seg_expand, base, adapter, ptr(hc), c_i64(R), c_i64(1), ptr(B), c_i64(B.stride(1)),
             c_i64(B.stride(2)), c_i64(B.stride(0)), ptr(y), c_i64(N), c_i64(1), c_i64(N), c_i64(R), c_f(1.0),
             *nodrop, *seg, c_i64(phase))
    h = torch.empty_like(h_sorted).index_copy_(0, order, h_sorted)

    # backward
    g_sorted = torch.zeros(S, R)
    call(lib.emu_mlora_seg_down, base, adapter, ptr(dy), c_i64(N), c_i64(1), ptr(B), c_i64(B.stride(2)),
         c_i64(B.stride(1)), c_i64(B.stride(0)), ptr(g_sorted), c_i64(R), c_i64(1), c_i64(N), c_i64(R), c_f(1.0),
         *nodrop, *seg)
    gc = (g_sorted * coef_sorted[:, None]).to(adt)
    dA = torch.full((n, R, K), float("nan"))
    call(lib.emu_mlora_seg_reduce, base, adapter, ptr(gc), c_i64(R), c_i64(1), ptr(x), c_i64(x.stride(0)),
         c_i64(x.stride(1)), ptr(dA), c_i64(K), c_i64(R), c_f(keep_scale), *drop, *seg)
    dBt = torch.full((n, R, N), float("nan"))
    call(lib.emu_mlora_seg_reduce, base, adapter, ptr(hc), c_i64(R), c_i64(1), ptr(dy), c_i64(N), c_i64(1),
         ptr(dBt), c_i64(N), c_i64(R), c_f(1.0), *nodrop, *seg)
    dx = (dy.float() @ W.float()).to(x.dtype)
    for phase in range(k):
        call(lib.emu_mlora_seg_expand, base, adapter, ptr(gc), c_i64(R), c_i64(1), ptr(A), c_i64(A.stride(2)),
             c_i64(A.stride(1)), c_i64(A.stride(0)), ptr(dx), c_i64(K), c_i64(1), c_i64(K), c_i64(R),
             c_f(keep_scale), *drop, *seg, c_i64(phase))
    dcoef = torch.empty(S).index_copy_(0, order, (g_sorted * h_sorted).sum(1)).reshape(key.shape)
    return y, h, dx, dA, dBt.transpose(1, 2), dcoef


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("base,adapter", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                          (torch.float32, torch.float32)])
@pytest.mark.parametrize("k,p", [(1, 0.3), (2, 0.0)])
def test_kernels_match_float64_reference(lib, base, adapter, k, p):
    torch.manual_seed(0)
    M, K, N, n, R = 37, 40, 33, 3, 5
    x = torch.randn(K, M).to(base).t()  # non-contiguous
    W = (torch.randn(N, K) / K**0.5).to(base)
    A = (torch.randn(n, R, K) / K**0.5).to(adapter)
    B = (torch.randn(n, N, R) / R**0.5).to(adapter)
    bias = torch.randn(N).to(base)
    idx = torch.randint(-1, n, (M, k))
    idx[idx == 1] = -1  # adapter 1 gets no token
    w = torch.rand(M, k) + 0.5
    ranks = torch.tensor([R, 2, 3], dtype=torch.int32)
    key, coef, _ = ml._prepare(x, A, B, idx, torch.tensor([1.5, 2.0, 0.5]), w, ranks)
    seed = 11
    dropout = gemm.Dropout.make(p, seed)
    dy = torch.randn(M, N).to(base)
    y, h, dx, dA, dB, dcoef = emulated(lib, x, W, A, B, bias, key, coef, ranks, dropout, dy)

    leaves = [t.double().requires_grad_(True) for t in (x, A, B, coef)]
    y_ref, h_ref = ml._reference_forward(leaves[0], W.double(), leaves[1], leaves[2], bias.double(), key, leaves[3],
                                         ranks.tolist(), p, seed if p else None)
    rx, rA, rB, rc = torch.autograd.grad(y_ref, leaves, dy.double())
    base_term = (x.double() @ W.double().t() + bias.double())
    tol = TOL[base]
    assert rel(y.double() - base_term, y_ref.detach() - base_term) <= tol
    assert rel(h, h_ref.detach()) <= TOL[adapter]
    assert rel(dx, rx) <= tol
    assert rel(dA, rA) <= TOL[adapter] and rel(dB, rB) <= TOL[adapter]
    assert rel(dcoef, rc) <= TOL[adapter]
    assert not dA[1].any() and not dA[2, 3:].any() and not dB[0, :, R:].any()
