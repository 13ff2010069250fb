"""sparse_lowrank_linear: every backend against a dense float64 W = s·BA + S, forward and every
gradient; the support formats; bad inputs."""

import pytest
import torch
from _helpers import (
    DEVICE,
    HAS_CUDA,
    LargestAllocation,
    activation,
    assert_close,
    assert_close_as_unfused,
    kernel_backends,
    kernel_dtypes,
    lora_factors,
    run_unfused,
)

import lowrank_kernels as lk
from lowrank_kernels.ops import sparse_lowrank as slr_op
from lowrank_kernels.ops import sparse_lowrank_kernels as slr_kernels

SUPPORTS = [("uniform", None), ("block", (16, 16)), ("block", (1, 16))]


def make_support(N, K, density, kind, block):
    return lk.random_support((N, K), density, kind, block=block or (16, 16), device=DEVICE)


def make_inputs(M, K, N, r, support, dtype, param_dtype=None, lead=(), noncontig=False, bias=True):
    """Random inputs with the low-rank and the sparse term of the same size (unit scale each)."""
    param_dtype = param_dtype or dtype
    x = activation(M, K, dtype, lead, noncontig)
    A, B = lora_factors(K, N, r, param_dtype)
    per_row = max(support.nnz / N, 1.0) if support is not None else 1.0
    v = None
    if support is not None:
        v = (torch.randn(support.nnz, device=DEVICE) / per_row**0.5).to(param_dtype).requires_grad_(True)
    b = torch.randn(N, device=DEVICE, dtype=dtype).requires_grad_(True) if bias else None
    return x, A, B, v, b


def dense_float64(x, A, B, v, support, s, b, dy):
    """y, its low-rank and sparse terms, and the gradients, from a dense W = s·BA + S built here."""
    N, K = B.shape[0], A.shape[1]
    xd, Ad, Bd = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    leaves = [xd, Ad, Bd]
    S = torch.zeros(N, K, dtype=torch.float64, device=x.device)
    if v is not None:
        vd = v.detach().double().requires_grad_(True)
        leaves.append(vd)
        rows, cols = support.index // K, support.index % K
        S = S.index_put((rows, cols), vd)
    bd = b.detach().double().requires_grad_(True) if b is not None else None
    if bd is not None:
        leaves.append(bd)
    x2 = xd.reshape(-1, K)
    low = s * (x2 @ Ad.t()) @ Bd.t()
    sparse = x2 @ S.t()
    y = low + sparse + (bd if bd is not None else 0.0)
    grads = torch.autograd.grad(y, leaves, dy.double().reshape(-1, N))
    return y.detach(), low.detach(), sparse.detach(), grads


def check_all(x, A, B, v, b, support, s, backend, dtype, sp_index=None):
    """The op's output, each of its two terms and every gradient against the dense float64 reference, each within
    twice the error of PyTorch's own unfused composition (sparse_lowrank_linear_reference, dense S) in the same
    dtypes."""
    sp = support if sp_index is None else sp_index
    y = lk.sparse_lowrank_linear(x, A, B, v, sp, s, b, backend=backend)
    N = B.shape[0]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    dy = torch.randn_like(y)
    leaves = [t for t in (x, A, B, v, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    y_ref, low, sparse, ref_grads = dense_float64(x, A, B, v, support, s, b, dy)
    y_pt, pt_grads = run_unfused(slr_op.sparse_lowrank_linear_reference, (x, A, B, v, sp, s, b), dy, leaves)
    y2, y_pt = y.reshape(-1, N), y_pt.reshape(-1, N)
    assert_close_as_unfused(y2, y_pt, y_ref, dtype, "y")
    # Each term on its own, so neither can hide inside the other's tolerance.
    bias = b.detach().double() if b is not None else 0.0
    assert_close_as_unfused(y2.double() - sparse - bias, y_pt.double() - sparse - bias, low, dtype, "low-rank term")
    if v is not None and support.nnz:
        assert_close_as_unfused(y2.double() - low - bias, y_pt.double() - low - bias, sparse, dtype, "sparse term")
    if v is not None:
        names = ["dx", "d lr_A", "d lr_B", "d sp_values", "d bias"][: len(leaves)]
    else:
        names = ["dx", "d lr_A", "d lr_B", "d bias"]
    for name, g, pg, r_, leaf in zip(names, grads, pt_grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype, f"{name}: dtype {g.dtype} != {leaf.dtype}"
        if r_.numel():
            assert_close_as_unfused(g.reshape(r_.shape), pg.reshape(r_.shape), r_, leaf.dtype, name)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("kind,block", SUPPORTS)
def test_matches_dense_float64(backend, dtype, kind, block):
    M, K, N, r = 37, 129, 65, 3
    support = make_support(N, K, 0.1, kind, block)
    x, A, B, v, b = make_inputs(M, K, N, r, support, dtype, noncontig=True)
    check_all(x, A, B, v, b, support, 2.0, backend, dtype)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind,block", [("uniform", None), ("block", (16, 16))])
def test_fp32_parameters_on_half_input(backend, kind, block):
    M, K, N, r = 20, 48, 40, 5
    support = make_support(N, K, 0.2, kind, block)
    x, A, B, v, b = make_inputs(M, K, N, r, support, torch.float16, torch.float32, lead=(2,))
    check_all(x, A, B, v, b, support, 0.5, backend, torch.float16)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5])
def test_densities(backend, density):
    M, K, N, r = 19, 40, 33, 4
    support = make_support(N, K, density, "uniform", None)
    x, A, B, v, b = make_inputs(M, K, N, r, support, torch.float32)
    check_all(x, A, B, v, b, support, 1.5, backend, torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("block", [None, (16, 16), (4, 2)])
@pytest.mark.slow
def test_empty_rows_and_columns_in_support(backend, block):
    # Entries only in rows 16..31 and columns 16..47 of a 50×70 matrix: empty rows of S and of Sᵀ
    # on both sides of the filled band, and edge blocks clipped by nothing.
    N, K, M, r = 50, 70, 21, 2
    rows = torch.arange(16, 32)[:, None]
    cols = torch.arange(16, 48)[None, :]
    index = (rows * K + cols).flatten()
    if block is None:
        index = index[torch.randperm(index.numel())[:100]].sort().values
    support = lk.prepare_support(index.to(DEVICE), (N, K), block=block)
    x, A, B, v, b = make_inputs(M, K, N, r, support, torch.float32, bias=False)
    check_all(x, A, B, v, b, support, 1.0, backend, torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_clipped_edge_blocks(backend):
    # 16×16 blocks on a 37×45 matrix: the last block-row and block-column are clipped.
    N, K, M, r = 37, 45, 9, 3
    support = make_support(N, K, 0.6, "block", (16, 16))
    assert support.index.numel() % 256 != 0
    x, A, B, v, b = make_inputs(M, K, N, r, support, torch.float32)
    check_all(x, A, B, v, b, support, 1.0, backend, torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_lowrank_only(backend):
    M, K, N, r = 13, 40, 24, 6
    x, A, B, _, b = make_inputs(M, K, N, r, None, torch.float32)
    check_all(x, A, B, None, b, None, 0.25, backend, torch.float32)


def test_flat_index_path_equals_prepared_support():
    M, K, N, r = 11, 40, 24, 3
    support = make_support(N, K, 0.1, "uniform", None)
    x, A, B, v, b = make_inputs(M, K, N, r, support, torch.float32)
    y1 = lk.sparse_lowrank_linear(x, A, B, v, support, 1.0, b, backend="triton")
    y2 = lk.sparse_lowrank_linear(x, A, B, v, support.index, 1.0, b, backend="triton")
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    check_all(x, A, B, v, b, support, 1.0, "triton", torch.float32, sp_index=support.index)


# ----------------------------------------------------------------------------------------------
# Every output element written: outputs poisoned with NaN before the kernels run
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,block", SUPPORTS)
def test_triton_writes_every_element(kind, block):
    M, K, N, r = 23, 45, 37, 3
    support = make_support(N, K, 0.3, kind, block)
    x, A, B, v, b = make_inputs(M, K, N, r, support, torch.float32)
    x2, A, B, v, b = (t.detach() for t in (x, A, B, v, b))
    y = torch.full((M, N), float("nan"), device=DEVICE)
    slr_kernels.triton_forward(x2, A, B, v, support, b, 1.5, out=y)
    y_ref, _ = slr_op._reference_forward(x2, A, B, v, support, b, 1.5)
    assert_close(y, y_ref, torch.float32, "y")
    dy = torch.randn(M, N, device=DEVICE)
    dv = torch.full_like(v, float("nan"))
    slr_kernels.triton_sddmm(dy, x2, v, support, out=dv)
    assert_close(dv, (dy.t() @ x2).flatten()[support.index], torch.float32, "d sp_values")


@pytest.mark.slow
def test_triton_path_builds_no_dense_matrix():
    # Every tensor torch allocates in forward and backward is recorded: none may be N×K-sized.
    M, K, N, r = 8, 96, 80, 4

    # The backend functions are called directly: a dispatch mode does not see inside a custom op.
    for backend in ("triton", "reference"):
        impl = slr_op.SPARSE_LOWRANK.impl(backend)
        for kind, block in SUPPORTS:
            support = make_support(N, K, 0.05, kind, block)
            x, A, B, v, b = (t.detach() for t in make_inputs(M, K, N, r, support, torch.float32))
            with LargestAllocation() as sizes:
                y, h = impl.forward(x, A, B, v, support, b, 1.0)
                impl.backward(torch.randn_like(y), x, A, B, v, support, h, 1.0, True)
            if backend == "triton":
                assert sizes.largest < N * K // 4, f"{kind}: a {sizes.largest}-element temporary (N·K = {N * K})"
            else:
                # The check itself sees the reference's dense S.
                assert sizes.largest >= N * K


# ----------------------------------------------------------------------------------------------
# Supports
# ----------------------------------------------------------------------------------------------
def test_prepare_support_formats():
    N, K = 37, 45
    index = lk.random_support((N, K), 0.2, "uniform").index
    sup = lk.prepare_support(index, (N, K))
    parts = dict(zip(sup.part_names, sup.parts))
    rows, cols = index // K, index % K
    row_ptr, t_row_ptr = parts["row_ptr"].long(), parts["t_row_ptr"].long()
    assert torch.equal(row_ptr[1:] - row_ptr[:-1], torch.bincount(rows, minlength=N))
    assert torch.equal(t_row_ptr[1:] - t_row_ptr[:-1], torch.bincount(cols, minlength=K))
    # Sᵀ's CSR walks the same entries column by column, each column in row order.
    pos = parts["t_pos"].long()
    assert torch.equal(torch.sort(pos).values, torch.arange(sup.nnz))
    assert torch.equal(torch.sort(cols[pos] * N + rows[pos]).values, cols[pos] * N + rows[pos])

    blk = lk.random_support((N, K), 0.4, "block", block=(8, 16))
    parts = dict(zip(blk.part_names, blk.parts))
    for b in range(parts["b_row0"].numel()):
        r0, c0 = int(parts["b_row0"][b]), int(parts["b_col0"][b])
        base, rl = int(parts["b_base"][b]), int(parts["b_rowlen"][b])
        for i in range(min(8, N - r0)):
            w = min(16, K - c0)
            got = blk.index[base + i * rl: base + i * rl + w]
            assert torch.equal(got, (r0 + i) * K + c0 + torch.arange(w)), f"block {b} row {i}"


def test_random_support_density_and_reproducibility():
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a = lk.random_support((64, 128), 0.03, "uniform", generator=g1)
    b = lk.random_support((64, 128), 0.03, "uniform", generator=g2)
    assert torch.equal(a.index, b.index) and a.nnz == round(0.03 * 64 * 128)
    blk = lk.random_support((64, 128), 0.125, "block", block=(16, 16))
    assert blk.nnz == 4 * 256 and blk.kind == "block" and blk.block == (16, 16)
    assert lk.random_support((64, 128), 0.0, "block").nnz == 0


@pytest.mark.parametrize("index,shape,block,exc,match", [
    (torch.tensor([0, 5, 200]), (10, 10), None, ValueError, "out of range"),
    (torch.tensor([-1, 5]), (10, 10), None, ValueError, "out of range"),
    (torch.tensor([3, 1, 7]), (10, 10), None, ValueError, "sorted"),
    (torch.tensor([1, 3, 3]), (10, 10), None, ValueError, "duplicated"),
    (torch.tensor([1.0, 2.0]), (10, 10), None, TypeError, "integer"),
    (torch.tensor([[1, 2]]), (10, 10), None, ValueError, "1-D"),
    (torch.tensor([1, 2]), (10,), None, ValueError, "shape"),
    (torch.tensor([1, 2]), (10, 0), None, ValueError, "shape"),
    (torch.tensor([0, 1]), (10, 10), (1, 4), ValueError, "whole 1x4 blocks"),
    (torch.tensor([0, 1]), (10, 10), (1, 3), ValueError, "powers of two"),
    ([0, 1], (10, 10), None, TypeError, "torch.Tensor"),
])
def test_prepare_support_rejects(index, shape, block, exc, match):
    with pytest.raises(exc, match=match):
        lk.prepare_support(index, shape, block=block)


def test_random_support_rejects():
    with pytest.raises(ValueError, match="density"):
        lk.random_support((4, 4), 1.5)
    with pytest.raises(ValueError, match="support"):
        lk.random_support((4, 4), 0.5, "diagonal")


def _good():
    support = lk.random_support((8, 12), 0.25)
    x = torch.randn(3, 12)
    return dict(x=x, lr_A=torch.randn(2, 12), lr_B=torch.randn(8, 2), sp_values=torch.randn(support.nnz),
                sp_index=support, scaling=1.0, bias=torch.randn(8))


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(3, 11)), ValueError, "lr_A"),
    (dict(x=torch.randn(3, 12).long()), TypeError, "x must be float32"),
    (dict(lr_A=torch.randn(0, 12), lr_B=torch.randn(8, 0)), ValueError, "rank 0"),
    (dict(lr_A=torch.randn(9, 12), lr_B=torch.randn(8, 9)), ValueError, "exceeds"),
    (dict(lr_B=torch.randn(8, 3)), ValueError, "lr_B"),
    (dict(lr_B=torch.randn(8, 2).double()), TypeError, "lr_B"),
    (dict(lr_A=torch.randn(2, 12).half(), lr_B=torch.randn(8, 2).half()), TypeError, "lr_A"),
    (dict(sp_values=torch.randn(5)), ValueError, "nnz must match"),
    (dict(sp_values=torch.randn(24).half()), TypeError, "sp_values"),
    (dict(sp_values=None), ValueError, "sp_values and sp_index"),
    (dict(sp_index=torch.tensor([5, 1])), ValueError, "sorted"),
    (dict(sp_index=[1, 2]), TypeError, "sp_index"),
    (dict(sp_index=lk.random_support((8, 13), 0.25)), ValueError, "shape"),
    (dict(bias=torch.randn(7)), ValueError, "bias"),
    (dict(bias=torch.randn(8).half()), TypeError, "bias"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(scaling=torch.tensor(1.0)), TypeError, "scaling"),
])
def test_bad_input(change, exc, match):
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=match):
        lk.sparse_lowrank_linear(**args)


def test_backend_selection_and_errors():
    args = _good()
    # CPU tensors default to the reference path.
    assert slr_op._backend.resolve("sparse_lowrank_linear", None, args["x"]) == "reference"
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            lk.sparse_lowrank_linear(**args, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        lk.sparse_lowrank_linear(**args, backend="fast")


@pytest.mark.parametrize("backend", kernel_backends())
def test_empty_batch_and_no_grad(backend):
    support = make_support(8, 12, 0.25, "uniform", None)
    x, A, B, v, b = make_inputs(0, 12, 8, 2, support, torch.float32)
    y = lk.sparse_lowrank_linear(x, A, B, v, support, 1.0, b, backend=backend)
    assert y.shape == (0, 8)
    gA, gv = torch.autograd.grad(y.sum(), (A, v))
    assert not gA.any() and not gv.any()
    with torch.no_grad():
        x, A, B, v, b = make_inputs(4, 12, 8, 2, support, torch.float32)
        y = lk.sparse_lowrank_linear(x, A, B, v, support, 1.0, b, backend=backend)
    assert y.grad_fn is None
