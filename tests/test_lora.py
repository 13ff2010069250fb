"""lora_linear: every backend against the float64 reference, forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    DEVICE,
    HAS_CUDA,
    activation,
    against_float64,
    assert_close,
    assert_close_as_unfused,
    base_weight,
    kernel_backends,
    lora_factors,
    run_unfused,
)

import lowrank_kernels as lk
from lowrank_kernels import backend as lk_backend
from lowrank_kernels.ops import _rng, gemm
from lowrank_kernels.ops import lora as lora_op


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, lead=(), noncontig=False, grad_base=False):
    """Random inputs scaled so the adapter's term is as large as the base's."""
    x = activation(M, K, dtype, lead, noncontig)
    W = base_weight(N, K, dtype)
    A, B = lora_factors(K, N, r, adapter_dtype or dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    if grad_base:
        W.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return x, W, A, B, b


def float64_reference(x, W, A, B, b, scaling, p, seed, dy):
    """Output, base term and gradients of the differentiable reference in float64."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, W, A, B)]
    bd = b.detach().double().requires_grad_(True) if b is not None else None
    y = lora_op.lora_linear_reference(*leaves, scaling, bd, p, seed)
    base = F.linear(leaves[0], leaves[1], bd).detach()
    wrt = leaves + ([bd] if bd is not None else [])
    grads = torch.autograd.grad(y, wrt, dy.double())
    return y.detach(), base, grads


CASES = [
    # M, K, N, r, lead
    (37, 129, 65, 3, ()),
    (1, 64, 48, 1, ()),
    (5, 33, 70, 17, (2,)),
]


@against_float64(CASES)
def test_matches_float64_reference(backend, dtype, adapter_dtype, p, case):
    M, K, N, r, lead = case
    x, W, A, B, b = make_inputs(M, K, N, r, dtype, adapter_dtype, lead=lead, noncontig=(M == 37))
    seed, s = 1234, 2.0
    y = lk.lora_linear(x, W, A, B, s, b, dropout_p=p, seed=seed, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    dy = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), dy)
    y_ref, base, (rx, rW, rA, rB, rb) = float64_reference(x, W, A, B, b, s, p, seed, dy)
    # Each within twice the error of PyTorch's own unfused composition in the same dtypes.
    y_pt, (px, pA, pB) = run_unfused(lora_op.lora_linear_reference, (x, W, A, B, s, b, p, seed), dy, (x, A, B))
    assert_close_as_unfused(y, y_pt, y_ref, dtype, "y")
    # The adapter's term on its own, so an error in it cannot hide under the base term.
    assert_close_as_unfused(y.double() - base, y_pt.double() - base, y_ref - base, dtype, "adapter term")
    assert_close_as_unfused(gx, px, rx, dtype, "dx")
    assert gA.dtype == adapter_dtype and gB.dtype == adapter_dtype
    assert_close_as_unfused(gA, pA, rA, adapter_dtype, "d lora_A")
    assert_close_as_unfused(gB, pB, rB, adapter_dtype, "d lora_B")


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_trainable_base_weight_and_bias(backend):
    x, W, A, B, b = make_inputs(19, 40, 24, 4, torch.float32, grad_base=True)
    y = lk.lora_linear(x, W, A, B, 0.5, b, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, W, A, B, b), dy)
    _, _, ref = float64_reference(x, W, A, B, b, 0.5, 0.0, None, dy)
    for name, g, rg in zip(("dx", "dW", "dA", "dB", "dbias"), grads, ref):
        assert_close(g, rg, torch.float32, name)


@pytest.mark.parametrize("backend", kernel_backends())
def test_ranks_up_to_256(backend):
    # r = 256 spans several BLOCK_R chunks of the tail loop.
    x, W, A, B, b = make_inputs(9, 48, 40, 256, torch.float32)
    y = lk.lora_linear(x, W, A, B, 1.0, b, backend=backend)
    dy = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), dy)
    y_ref, base, (rx, _, rA, rB, _) = float64_reference(x, W, A, B, b, 1.0, 0.0, None, dy)
    assert_close(y.double() - base, y_ref - base, torch.float32, "adapter term")
    for name, g, rg in (("dx", gx, rx), ("dA", gA, rA), ("dB", gB, rB)):
        assert_close(g, rg, torch.float32, name)


def test_reference_backward_matches_autograd_of_reference():
    """The explicit backward formulas (the docstring of ops/lora.py) against autograd of the forward, dropout on."""
    x, W, A, B, b = make_inputs(23, 31, 17, 5, torch.float64)
    y = lk.lora_linear(x, W, A, B, 1.5, b, dropout_p=0.4, seed=99, backend="reference")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B), dy)
    ref = torch.autograd.grad(lora_op.lora_linear_reference(x, W, A, B, 1.5, b, 0.4, 99), (x, A, B), dy)
    for g, rg in zip(got, ref):
        torch.testing.assert_close(g, rg)


# ----------------------------------------------------------------------------------------------
# Kernels write every element: outputs poisoned with NaN before the launch
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not lk_backend.triton_available(), reason="needs triton")
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_triton_forward_writes_every_element(p):
    x, W, A, B, b = make_inputs(37, 129, 65, 3, torch.float32)
    x, A, B = x.detach(), A.detach(), B.detach()
    dropout = gemm.Dropout.make(p, 5)
    h = torch.full((37, 3), float("nan"), device=DEVICE)
    gemm.down_proj(x, A, torch.float32, dropout=dropout, out=h)
    y = torch.full((37, 65), float("nan"), device=DEVICE)
    lora_op._triton_forward(x, W, A, B, b, 2.0, dropout, out=y)
    y_ref, h_ref = lora_op._reference_forward(x.double(), W.double(), A.double(), B.double(), b.double(), 2.0, p, 5)
    assert_close(h, h_ref, torch.float32, "h")
    assert_close(y, y_ref, torch.float32, "y")


@pytest.mark.skipif(not lk_backend.triton_available(), reason="needs triton")
def test_triton_masked_tail_gemm_writes_every_element():
    """The dx GEMM with the dropout mask on its tail, into a poisoned output."""
    M, K, N, r = 21, 50, 35, 6
    dy, W, g, A = (torch.randn(*s, device=DEVICE) for s in ((M, N), (N, K), (M, r), (r, K)))
    dropout = gemm.Dropout.make(0.5, 77)
    out = torch.full((M, K), float("nan"), device=DEVICE)
    gemm.lowrank_gemm(dy, W.t(), g, A.t(), 0.7, torch.float32, tail_dropout=dropout, out=out)
    keep = _rng.dropout_keep(77, 0.5, M, K, DEVICE).double()
    ref = dy.double() @ W.double() + 0.7 * keep * 2.0 * (g.double() @ A.double())
    assert_close(out, ref, torch.float32, "dx")


# ----------------------------------------------------------------------------------------------
# Dropout: one mask for all backends, determinism, checkpointing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", kernel_backends())
def test_dropout_mask_is_identical_across_backends(backend):
    """h = drop(x) Aᵀ with x = 1 and A = I exposes the mask itself, bit for bit."""
    M, K = 40, 16
    x = torch.ones(M, K, device=DEVICE)
    eye = torch.eye(K, device=DEVICE)
    _, h_ref = lora_op._reference_forward(x, x.new_zeros(1, K), eye, x.new_zeros(1, K), None, 1.0, 0.5, 31)
    dropout = gemm.Dropout.make(0.5, 31)
    if backend == "triton":
        h = gemm.down_proj(x, eye, torch.float32, dropout=dropout)
    else:
        _, h = lora_op._cuda_forward(x, x.new_zeros(1, K), eye, x.new_zeros(1, K), None, 1.0, dropout)
    assert torch.equal(h, h_ref)
    assert torch.equal(h_ref != 0, _rng.dropout_keep(31, 0.5, M, K, DEVICE))


def test_dropout_seed_determinism_and_fresh_draws():
    x, W, A, B, b = make_inputs(64, 32, 16, 4, torch.float32)
    y1 = lk.lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, seed=3, backend="reference")
    y2 = lk.lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, seed=3, backend="reference")
    y3 = lk.lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, seed=4, backend="reference")
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.manual_seed(11)
    z1 = lk.lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, backend="reference")
    torch.manual_seed(11)
    z2 = lk.lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, backend="reference")
    z3 = lk.lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, backend="reference")
    assert torch.equal(z1, z2) and not torch.equal(z2, z3)
    # Eval mode: no dropout at all.
    e = lk.lora_linear(x, W, A, B, 1.0, b, dropout_p=0.5, training=False, backend="reference")
    torch.testing.assert_close(e, lk.lora_linear(x, W, A, B, 1.0, b, backend="reference"))


def test_rng_keep_fraction():
    keep = _rng.dropout_keep(2024, 0.3, 256, 256)
    frac = keep.float().mean().item()
    sigma = (0.3 * 0.7 / keep.numel()) ** 0.5
    assert abs(frac - 0.7) < 5 * sigma


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_checkpointing_with_dropout_gives_same_gradients(backend):
    x, W, A, B, b = make_inputs(16, 24, 20, 4, torch.float32)

    def f(x_, A_, B_):
        return lk.lora_linear(x_, W, A_, B_, 1.0, b, dropout_p=0.5, backend=backend)

    torch.manual_seed(5)
    y = f(x, A, B)
    dy = torch.randn_like(y)
    g_plain = torch.autograd.grad(y, (x, A, B), dy)
    torch.manual_seed(5)
    y_ck = torch.utils.checkpoint.checkpoint(f, x, A, B, use_reentrant=False)
    g_ck = torch.autograd.grad(y_ck, (x, A, B), dy)
    torch.testing.assert_close(y_ck, y)
    for a, c in zip(g_plain, g_ck):
        torch.testing.assert_close(a, c)


# ----------------------------------------------------------------------------------------------
# Inference path, edge shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_inference_saves_nothing(backend):
    x, W, A, B, b = make_inputs(3, 32, 16, 2, torch.float32)
    with torch.inference_mode():
        y = lk.lora_linear(x, W, A, B, 1.0, b, backend=backend)
    assert y.grad_fn is None
    with torch.no_grad():
        y2 = lk.lora_linear(x, W, A, B, 1.0, b, backend=backend)
    assert y2.grad_fn is None
    ref = lora_op.lora_linear_reference(x.detach().double(), W.double(), A.detach().double(), B.detach().double(),
                                        1.0, b.double())
    assert_close(y, ref, torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_empty_batch(backend):
    x, W, A, B, b = make_inputs(0, 16, 8, 2, torch.float32)
    y = lk.lora_linear(x, W, A, B, 1.0, b, backend=backend)
    assert y.shape == (0, 8)
    gx, gA = torch.autograd.grad(y.sum(), (x, A))
    assert gx.shape == x.shape and torch.equal(gA, torch.zeros_like(A))


# ----------------------------------------------------------------------------------------------
# Backend dispatch
# ----------------------------------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.delenv(lk_backend.ENV_VAR, raising=False)
    assert lk_backend.resolve("lora_linear", None, x) == "reference"
    monkeypatch.setenv(lk_backend.ENV_VAR, "triton")
    assert lk_backend.resolve("lora_linear", None, x) == "triton"
    assert lk_backend.resolve("lora_linear", "reference", x) == "reference"
    monkeypatch.setenv(lk_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"^{lk_backend.ENV_VAR} must be one of"):
        lk_backend.resolve("lora_linear", None, x)
    with pytest.raises(ValueError, match="^backend must be one of"):
        lk_backend.resolve("lora_linear", "cublas", x)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lk_backend.resolve("lora_linear", "triton", torch.randn(2, 2))


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_cuda_backend_on_cpu_is_a_clear_error():
    x, W, A, B, b = make_inputs(2, 8, 4, 1, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        lk.lora_linear(x, W, A, B, backend="cuda")


def test_cuda_backend_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(lk_backend, "cuda_extension", lambda: None)
    fake_cuda = torch.empty(1, device="meta")
    monkeypatch.setattr(lk_backend, "_device_of", lambda tensors: torch.device("cuda"))
    with pytest.raises(RuntimeError, match="pip install"):
        lk_backend.resolve("lora_linear", "cuda", fake_cuda)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ----------------------------------------------------------------------------------------------
def _good():
    x, W, A, B, b = make_inputs(4, 8, 6, 2, torch.float32)
    return dict(x=x, weight=W, lora_A=A, lora_B=B, scaling=1.0, bias=b)


@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(x=torch.randn(4, 9)), ValueError, "^x has 9 features"),
        (dict(weight=torch.randn(6, 8, 1)), ValueError, "^weight must be 2-D"),
        (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "^lora_A has rank 0"),
        (dict(lora_A=torch.randn(2, 7)), ValueError, r"^lora_A must be \(r, 8\)"),
        (dict(lora_B=torch.randn(5, 2)), ValueError, r"^lora_B must be \(out_features, r\)"),
        (dict(bias=torch.randn(5)), ValueError, r"^bias must be \(6,\)"),
        (dict(x=torch.randn(4, 8, dtype=torch.float16)), TypeError, "^weight dtype .* must equal x dtype"),
        (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "^x must be float"),
        (dict(lora_B=torch.randn(6, 2, dtype=torch.float64)), TypeError, "^lora_B dtype"),
        (dict(scaling=float("nan")), ValueError, "^scaling must be finite"),
        (dict(scaling=torch.tensor(1.0)), TypeError, "^scaling must be a Python float"),
        (dict(dropout_p=1.0), ValueError, "^dropout_p must be"),
        (dict(dropout_p=-0.1), ValueError, "^dropout_p must be"),
        (dict(seed=-1), ValueError, "^seed must be"),
        (dict(x="not a tensor"), TypeError, "^x must be a torch.Tensor"),
        (dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "^bias dtype"),
    ],
)
def test_bad_input(change, exc, name):
    kwargs = _good()
    kwargs.update(change)
    with pytest.raises(exc, match=name):
        lk.lora_linear(**kwargs)


def test_unsupported_adapter_dtype_mix():
    x = torch.randn(4, 8, dtype=torch.float32)
    W = torch.randn(6, 8)
    A = torch.randn(2, 8, dtype=torch.float16)
    B = torch.randn(6, 2, dtype=torch.float16)
    with pytest.raises(TypeError, match="lora_A"):
        lk.lora_linear(x, W, A, B)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU for a device mix")
def test_device_mix():
    kwargs = _good()
    kwargs["weight"] = kwargs["weight"].cpu()
    kwargs["x"] = kwargs["x"].detach().cuda()
    with pytest.raises(ValueError, match="device"):
        lk.lora_linear(**kwargs)
