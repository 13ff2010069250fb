"""multi_lora_linear: every backend against the float64 reference loop, forward and every gradient."""

import functools

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    DEVICE,
    activation,
    assert_close,
    assert_close_as_unfused,
    base_weight,
    kernel_backends,
    kernel_dtypes,
    lora_factors,
    run_unfused,
)

import lowrank_kernels as lk
from lowrank_kernels.ops import gemm
from lowrank_kernels.ops import multi_lora as ml
from lowrank_kernels.ops import multi_lora_kernels as mlk


def make_inputs(M, K, N, n, r, dtype, adapter_dtype=None, noncontig=False, lead=()):
    """Random inputs, B scaled so each adapter's term is as large as the base's."""
    x = activation(M, K, dtype, lead, noncontig)
    W = base_weight(N, K, dtype)
    A, B = lora_factors(K, N, r, adapter_dtype or dtype, stack=(n,))
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    return x, W, A, B, b


def reference64(x, W, A, B, b, idx, scaling, dy, p=0.0, seed=None, weight=None, ranks=None):
    """Output, base term and gradients (x, A, B[, weight][, scaling]) of the float64 reference."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    extra = []
    wd = None
    if weight is not None:
        wd = weight.detach().double().requires_grad_(True)
        extra.append(wd)
    sd = scaling
    if isinstance(scaling, torch.Tensor):
        sd = scaling.detach().double().requires_grad_(scaling.requires_grad)
        if scaling.requires_grad:
            extra.append(sd)
    y = ml.multi_lora_linear_reference(leaves[0], W.double(), leaves[1], leaves[2], idx, sd, b.double(), p, seed,
                                       adapter_weight=wd, ranks=ranks)
    base = F.linear(leaves[0], W.double(), b.double()).detach()
    return y.detach(), base, torch.autograd.grad(y, leaves + extra, dy.double())


def adapter_index(M, n, shape=None, empty=None):
    """M indices in which every value of [-1, n) appears (with M >= 2n), adapter ``empty`` never."""
    idx = torch.arange(M, device=DEVICE) % (n + 1) - 1
    idx = idx[torch.randperm(M, device=DEVICE)]
    if empty is not None:
        idx[idx == empty] = -1
    return idx.reshape(shape) if shape else idx


CASES = [
    # M, K, N, n, r, lead
    (37, 40, 33, 4, 5, ()),
    (11, 24, 17, 3, 17, (2,)),
]


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("dtype,adapter_dtype,p", [(torch.float32, torch.float32, 0.3),
                                                   (torch.float16, torch.float16, 0.0),
                                                   (torch.float16, torch.float32, 0.3)]
                         + [pytest.param(torch.bfloat16, a, p, marks=m.marks) for m in kernel_dtypes()[2:]
                            for a, p in ((torch.bfloat16, 0.0), (torch.float32, 0.3))])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(backend, dtype, adapter_dtype, p, case):
    """Mixed ranks, an empty adapter, index -1, leading dims, non-contiguous x, per-adapter scales."""
    M, K, N, n, r, lead = case
    x, W, A, B, b = make_inputs(M, K, N, n, r, dtype, adapter_dtype, noncontig=(M == 37), lead=lead)
    idx = adapter_index(M * (lead[0] if lead else 1), n, (*lead, M), empty=1)
    ranks = torch.tensor([r, 2, 1, r - 1][:n])
    s = torch.tensor([2.0, 0.5, 1.5, 3.0][:n], device=DEVICE)
    y = lk.multi_lora_linear(x, W, A, B, idx, s, b, dropout_p=p, seed=77, backend=backend, ranks=ranks)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    dy = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), dy)
    y_ref, base, (rx, rA, rB) = reference64(x, W, A, B, b, idx, s, dy, p, 77, ranks=ranks)
    # Each within twice the error of PyTorch's own unfused composition (the reference's loop over adapters) in the
    # same dtypes.
    reference = functools.partial(ml.multi_lora_linear_reference, ranks=ranks)
    y_pt, (px, pA, pB) = run_unfused(reference, (x, W, A, B, idx, s, b, p, 77), dy, (x, A, B))
    assert_close_as_unfused(y, y_pt, y_ref, dtype, "y")
    assert_close_as_unfused(y.double() - base, y_pt.double() - base, y_ref - base, dtype, "adapter term")
    assert_close_as_unfused(gx, px, rx, dtype, "dx")
    assert gA.dtype == adapter_dtype and gB.dtype == adapter_dtype
    assert_close_as_unfused(gA, pA, rA, adapter_dtype, "d lora_A")
    assert_close_as_unfused(gB, pB, rB, adapter_dtype, "d lora_B")
    # padding (rows past each rank, the empty adapter) gets exactly zero
    for a, ra in enumerate(ranks.tolist()):
        assert not gA[a, ra:].any() and not gB[a, :, ra:].any()
    assert not gA[1].any() and not gB[1].any()


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_mixture_with_weight_and_scale_gradients(backend):
    M, K, N, n, r, k = 29, 24, 19, 4, 3, 2
    x, W, A, B, b = make_inputs(M, K, N, n, r, torch.float32)
    idx = torch.stack([torch.randperm(n, device=DEVICE)[:k] for _ in range(M)])
    idx[3, 1] = -1
    w = torch.softmax(torch.randn(M, k, device=DEVICE), -1).requires_grad_(True)
    s = torch.tensor([1.0, 2.0, 0.5, 1.5], device=DEVICE, requires_grad=True)
    y = lk.multi_lora_linear(x, W, A, B, idx, s, b, dropout_p=0.2, seed=5, backend=backend, adapter_weight=w)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B, w, s), dy)
    y_ref, base, want = reference64(x, W, A, B, b, idx, s, dy, 0.2, 5, weight=w)
    assert_close(y.double() - base, y_ref - base, torch.float32, "adapter term")
    for name, g, rg in zip(("dx", "dA", "dB", "d adapter_weight", "d scaling"), got, want):
        assert_close(g, rg, torch.float32, name)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_list_of_adapters_equals_separate_lora_linear(backend):
    """Ranks 1, 4, 2 as a list: each token's output and each adapter's gradients equal a plain
    lora_linear over that adapter's tokens (all tokens on one adapter included: adapter 1)."""
    M, K, N = 23, 20, 14
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    W = torch.randn(N, K, device=DEVICE) / K**0.5
    As = [torch.randn(r, K, device=DEVICE, requires_grad=True) for r in (1, 4, 2)]
    Bs = [torch.randn(N, r, device=DEVICE, requires_grad=True) for r in (1, 4, 2)]
    for idx in (torch.randint(-1, 3, (M,), device=DEVICE), torch.ones(M, dtype=torch.int64, device=DEVICE)):
        y = lk.multi_lora_linear(x, W, As, Bs, idx, 0.7, backend=backend)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *As, *Bs], dy)
        want_y = F.linear(x, W).detach().clone()
        want_dx = dy @ W
        for a in range(3):
            rows = (idx == a).nonzero().squeeze(1)
            xa = x.detach()[rows].requires_grad_(True)
            ya = lk.lora_linear(xa, W, As[a], Bs[a], 0.7, backend="reference")
            want_y[rows] = ya.detach()
            gx, gA, gB = torch.autograd.grad(ya, (xa, As[a], Bs[a]), dy[rows])
            want_dx[rows] = gx
            assert_close(got[1 + a], gA, torch.float32, f"dA[{a}]") if rows.numel() else None
            assert_close(got[4 + a], gB, torch.float32, f"dB[{a}]") if rows.numel() else None
            if not rows.numel():
                assert not got[1 + a].any() and not got[4 + a].any()
        assert_close(y, want_y, torch.float32, "y")
        assert_close(got[0], want_dx, torch.float32, "dx")


def test_decode_path_without_grad():
    """At most DECODE_SLOTS slots and no gradient: BGMV down-projection, rows in arrival order."""
    p = 0.25
    for M in (1, 13):
        x, W, A, B, b = make_inputs(M, 36, 21, 6, 4, torch.float32)
        idx = torch.randint(-1, 6, (M,), device=DEVICE)
        with torch.no_grad():
            y = lk.multi_lora_linear(x, W, A, B, idx, 1.5, b, dropout_p=p, seed=9, backend="triton")
        y_ref, base, _ = reference64(x, W, A, B, b, idx, 1.5, torch.ones(M, 21, device=DEVICE), p, 9)
        assert_close(y.double() - base, y_ref - base, torch.float32, f"adapter term M={M}")


def test_every_output_written_poisoned():
    """The launchers' outputs (h, y, the reduction's partials, dx) NaN-filled before the launch."""
    M, K, N, n, r = 37, 40, 33, 4, 5
    x, W, A, B, b = make_inputs(M, K, N, n, r, torch.float32)
    x, A, B = x.detach(), A.detach(), B.detach()
    key, coef, ranks = ml._prepare(x, A, B, adapter_index(M, n), 1.0, None, torch.tensor([5, 2, 3, 1]))
    grouping = mlk.group(key, n)
    order, rows, offsets = mlk.ungroup(grouping, M, M)
    drop = gemm.Dropout.make(0.3, 4)
    for grouped in (order, None):
        h = mlk.seg_down(x, A, key, ranks, grouped, 1, torch.float32, drop,
                     out=torch.full((M, r), float("nan"), device=DEVICE))
        assert torch.isfinite(h).all()
    y = mlk.seg_gemm(x, W, b, h, B, coef, key, ranks, rows, 1, torch.float32,
                 out=torch.full((M, N), float("nan"), device=DEVICE))
    y_ref = ml._reference_forward(x, W, A, B, b, key, coef, ranks.tolist(), 0.3, 4)[0]
    assert_close(y, y_ref, torch.float32, "y")
    partial = torch.full((3, n, r, K), float("nan"), device=DEVICE)
    d3 = mlk.seg_reduce(h, x, order, offsets, ranks, 1, n, torch.float32, drop, splits=3, partial=partial)
    d1 = mlk.seg_reduce(h, x, order, offsets, ranks, 1, n, torch.float32, drop, splits=1)
    assert torch.isfinite(d3).all()
    assert_close(d3, d1, torch.float32, "3 splits vs 1")


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_refuses_an_ungrouped_forward(backend):
    """The backward reads the slot order from the forward's grouping: the empty one of a forward
    that did not group (decode) would be read past its end (it crashed the interpreter)."""
    M, n = 9, 3
    x, W, A, B, b = (t.detach() for t in make_inputs(M, 16, 12, n, 2, torch.float32))
    key, coef, ranks = ml._prepare(x, A, B, adapter_index(M, n), 1.5, None, None)
    ops = torch.ops.lowrank_kernels
    y, h, grouping = ops.multi_lora_linear_fwd(x, W, A, B, b, key, coef, ranks, 0.0, None, backend, False)
    assert grouping.numel() == 0
    with pytest.raises(ValueError, match="grouping must be the grouping of a forward that grouped its slots"):
        ops.multi_lora_linear_bwd(torch.ones_like(y), x, W, A, B, h, key, coef, ranks, grouping, 0.0, None, backend,
                                  True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch(backend):
    x, W, A, B, b = make_inputs(0, 8, 5, 2, 3, torch.float32)
    y = lk.multi_lora_linear(x, W, A, B, torch.zeros(0, dtype=torch.int64, device=DEVICE), 1.0, b, backend=backend)
    gx, gA, gB = torch.autograd.grad(y.sum(), (x, A, B))
    assert y.shape == (0, 5) and gx.shape == (0, 8) and not gA.any() and not gB.any()


def test_deterministic_backward():
    x, W, A, B, b = make_inputs(40, 24, 16, 3, 4, torch.float32)
    idx = adapter_index(40, 3)
    runs = []
    for _ in range(2):
        y = lk.multi_lora_linear(x, W, A, B, idx, 1.0, b, backend="triton")
        runs.append(torch.autograd.grad(y.square().sum(), (x, A, B)))
    for g0, g1 in zip(*runs):
        assert torch.equal(g0, g1)


def test_out_of_range_index_acts_as_base_when_unchecked():
    """Where values are not checked (GPU tensors without LOWRANK_KERNELS_CHECK_INDEX), an index
    outside [-1, n) reads no adapter: it is mapped to the empty slot before any kernel runs."""
    x = torch.randn(4, 8)
    A, B = torch.randn(3, 2, 8), torch.randn(3, 5, 2)
    key, coef, _ = ml._prepare(x, A, B, torch.tensor([0, 7, -5, 2]), 2.0, None, None)
    assert key.flatten().tolist() == [0, 3, 3, 2] and coef.flatten().tolist() == [2.0, 0.0, 0.0, 2.0]


def test_check_index_env_flag(monkeypatch):
    monkeypatch.setenv(ml.CHECK_ENV, "1")
    with pytest.raises(ValueError, match="adapter_index"):
        ml._check_values(torch.tensor([0, 3]), None, 3, 2)


def _bad(change):
    x, W = torch.randn(6, 8), torch.randn(5, 8)
    A, B = torch.randn(3, 2, 8), torch.randn(3, 5, 2)
    kw = dict(x=x, weight=W, lora_A=A, lora_B=B, adapter_index=torch.tensor([0, 1, 2, -1, 0, 1]), scaling=1.0)
    kw.update(change)
    return kw


@pytest.mark.parametrize("change,exc,name", [
    ({"adapter_index": torch.tensor([0, 1, 3, -1, 0, 1])}, ValueError, "adapter_index"),
    ({"adapter_index": torch.tensor([0, 1, -2, -1, 0, 1])}, ValueError, "adapter_index"),
    ({"adapter_index": torch.tensor([0, 1, 2, -1, 0, 1], dtype=torch.int32)}, TypeError, "int64"),
    ({"adapter_index": torch.zeros(6)}, TypeError, "int64"),
    ({"adapter_index": torch.zeros(5, dtype=torch.int64)}, ValueError, "adapter_index"),
    ({"lora_B": torch.randn(3, 4, 2)}, ValueError, "lora_B"),
    ({"lora_A": torch.randn(3, 2, 7)}, ValueError, "lora_A"),
    ({"lora_A": torch.randn(2, 8)}, ValueError, "lora_A"),
    ({"scaling": torch.ones(2)}, ValueError, "scaling"),
    ({"scaling": float("nan")}, ValueError, "scaling"),
    ({"ranks": torch.tensor([2, 3, 1])}, ValueError, "ranks"),
    ({"ranks": torch.tensor([2, 1])}, ValueError, "ranks"),
    ({"ranks": torch.tensor([2.0, 1, 1])}, TypeError, "ranks"),
    ({"adapter_weight": torch.ones(6, 2)}, ValueError, "adapter_weight"),
    ({"lora_A": [torch.randn(2, 8)], "lora_B": [torch.randn(5, 3)]}, ValueError, "lora_B"),
    ({"dropout_p": 1.0}, ValueError, "dropout_p"),
])
def test_bad_input(change, exc, name):
    with pytest.raises(exc, match=name):
        lk.multi_lora_linear(**_bad(change))


def test_mixture_index_shape():
    kw = _bad({"adapter_index": torch.zeros(6, 2, dtype=torch.int64), "adapter_weight": torch.ones(6, 2)})
    assert lk.multi_lora_linear(**kw).shape == (6, 5)
    kw["adapter_index"] = torch.zeros(5, 2, dtype=torch.int64)
    kw["adapter_weight"] = torch.ones(5, 2)
    with pytest.raises(ValueError, match="adapter_index"):
        lk.multi_lora_linear(**kw)

