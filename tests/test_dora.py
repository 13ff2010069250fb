"""dora_linear: every backend against the float64 reference (PEFT's formula), the norm expansion,
LowRankLinear(method="dora"), from_peft on DoRA adapters, memory."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    DEVICE,
    LargestAllocation,
    activation,
    against_float64,
    assert_close,
    assert_close_as_unfused,
    base_weight,
    kernel_backends,
    lora_factors,
    rel_err,
    run_unfused,
)
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.ops import _rng
from lowrank_kernels.ops import dora as dora_op


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, lead=(), noncontig=False, scaling=2.0):
    """Random inputs: B scaled so the adapter's term is as large as the base's, and m off the
    norms by ±30% so γ − 1 is far from zero."""
    adapter_dtype = adapter_dtype or dtype
    x = activation(M, K, dtype, lead, noncontig)
    W = base_weight(N, K, dtype)
    A, B = lora_factors(K, N, r, adapter_dtype)
    norm = torch.linalg.norm(W.double() + scaling * B.detach().double() @ A.detach().double(), dim=1)
    m = (norm * (1 + 0.3 * torch.randn(N, device=DEVICE, dtype=torch.float64))).to(adapter_dtype).requires_grad_(True)
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    return x, W, A, B, m, b


def float64_reference(x, W, A, B, m, b, scaling, p, seed, dy, grad_weight=False):
    leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B, m)]
    Wd = W.detach().double().requires_grad_(grad_weight)
    bd = b.detach().double() if b is not None else None
    y = dora_op.dora_linear_reference(leaves[0], Wd, leaves[1], leaves[2], leaves[3], scaling, bd, p, seed)
    base = F.linear(leaves[0], Wd, bd).detach()
    grads = torch.autograd.grad(y, leaves + ([Wd] if grad_weight else []), dy.double())
    return y.detach(), base, grads


CASES = [
    # M, K, N, r, lead
    (37, 40, 33, 3, ()),
    (5, 24, 20, 17, (2,)),
]


@against_float64(CASES)
def test_matches_float64_reference(backend, dtype, adapter_dtype, p, case):
    M, K, N, r, lead = case
    x, W, A, B, m, b = make_inputs(M, K, N, r, dtype, adapter_dtype, lead=lead, noncontig=(M == 37))
    y = lk.dora_linear(x, W, A, B, m, 2.0, b, dropout_p=p, seed=1234, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B, m), dy)
    y_ref, base, ref = float64_reference(x, W, A, B, m, b, 2.0, p, 1234, dy)
    # Each within twice the error of PyTorch's own unfused composition (PEFT's formula) in the same dtypes, with the
    # base dtype's epsilon as the floor: with fp32 adapters on a 16-bit base, dy·γ is rounded to the base dtype
    # before the adapters' products, where PyTorch's composition stays in fp32.
    y_pt, unfused = run_unfused(dora_op.dora_linear_reference, (x, W, A, B, m, 2.0, b, p, 1234), dy, (x, A, B, m))
    assert_close_as_unfused(y, y_pt, y_ref, dtype, "y")
    assert_close_as_unfused(y.double() - base, y_pt.double() - base, y_ref - base, dtype,
                            "DoRA's change to the base output")
    for name, g, pg, rg, t in zip(("dx", "d lora_A", "d lora_B", "d magnitude"), grads, unfused, ref, (x, A, B, m)):
        assert g.dtype == t.dtype, name
        assert_close_as_unfused(g, pg, rg, dtype, name)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_trainable_weight_and_bias(backend, p):
    x, W, A, B, m, b = make_inputs(19, 24, 18, 4, torch.float32)
    W.requires_grad_(True)
    b.requires_grad_(True)
    y = lk.dora_linear(x, W, A, B, m, 0.5, b, dropout_p=p, seed=3, backend=backend)
    dy = torch.randn_like(y)
    gW, gb = torch.autograd.grad(y, (W, b), dy)
    _, _, ref = float64_reference(x, W, A, B, m, b, 0.5, p, 3, dy, grad_weight=True)
    assert_close(gW, ref[-1], torch.float32, "dW")
    assert_close(gb, dy.double().sum(0), torch.float32, "dbias")


# ----------------------------------------------------------------------------------------------
# The norm expansion (ops/dora.py docstring) against the norm of W + s·BA, in float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_norm_expansion(backend):
    N, K, r, s = 33, 45, 5, 1.7
    W, A, B = torch.randn(N, K, device=DEVICE), torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    exact = torch.linalg.norm(W.double() + s * B.double() @ A.double(), dim=1)
    if backend == "reference":
        n64 = lk.ops.dora.dora_weight_norm(W.double(), A.double(), B.double(), s, backend=backend)
        torch.testing.assert_close(n64, exact, rtol=1e-12, atol=0)  # the identity itself, in float64
    n = lk.ops.dora.dora_weight_norm(W, A, B, s, backend=backend)
    assert n.dtype == torch.float32
    assert_close(n, exact, torch.float32, "norm")
    # 16-bit W and adapters: the pieces are summed in fp32, well inside fp16's own rounding of W.
    n16 = lk.ops.dora.dora_weight_norm(W.half(), A.half(), B.half(), s, backend=backend)
    exact16 = torch.linalg.norm(W.half().double() + s * B.half().double() @ A.half().double(), dim=1)
    assert n16.dtype == torch.float32 and rel_err(n16, exact16) < 1e-5
    # A transposed (strided) weight, as fan_in_fan_out layers pass it.
    Wt = W.t().contiguous().t()
    assert_close(lk.ops.dora.dora_weight_norm(Wt, A, B, s, backend=backend), exact, torch.float32, "strided W")
    w_sq = dora_op.weight_sq_norm(W)
    torch.testing.assert_close(lk.ops.dora.dora_weight_norm(W, A, B, s, weight_sq_norm=w_sq, backend=backend), n)


# ----------------------------------------------------------------------------------------------
# Kernels write every element
# ----------------------------------------------------------------------------------------------
# out= is where the Triton epilogue writes y (and the reference copies it); the CUDA path's y is
# cuBLAS's own output, checked against the reference everywhere else.
@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b != "cuda"])
def test_forward_writes_every_element(backend):
    M, K, N, r = 37, 40, 33, 3
    x, W, A, B, m, b = (t.detach() if t is not None else t for t in make_inputs(M, K, N, r, torch.float32))
    y = torch.full((M, N), float("nan"), device=DEVICE)
    y_out, h, v, n = dora_op._forward(x, W, A, B, m, b, None, 2.0, 0.0, None, backend, True, out=y)
    assert y_out.data_ptr() == y.data_ptr()
    ref = dora_op.dora_linear_reference(x.double(), W.double(), A.double(), B.double(), m.double(), 2.0, b.double())
    assert_close(y, ref, torch.float32, "y")
    v_ref = x.double() @ W.double().t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    assert_close(v, v_ref, torch.float32, "v (the unscaled product)")


# ----------------------------------------------------------------------------------------------
# Dropout: PEFT's placement, exactly, with PEFT's own forward running our mask
# ----------------------------------------------------------------------------------------------
class MaskDropout(nn.Module):
    """nn.Dropout with the package's mask for one seed, so PEFT's forward can be compared exactly."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        keep = _rng.dropout_keep(self.seed, self.p, x.shape[0], x.shape[1], x.device)
        return x * keep / (1 - self.p)


def peft_dora_layer(K=24, N=20, r=4, dropout=0.0, dtype=torch.float32, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(K, N)).to(dtype),
                           LoraConfig(r=r, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=dropout,
                                      **config))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, r**-0.5)
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.randn(N))
    return model, layer


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_dropout_enters_as_in_peft(backend):
    pytest.importorskip("peft")
    p, seed = 0.4, 77
    model, layer = peft_dora_layer(dropout=p)
    layer.lora_dropout["default"] = MaskDropout(p, seed)
    model.train()
    x = torch.randn(13, 24, requires_grad=True)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    y_peft = model(x)
    dy = torch.randn_like(y_peft)
    g_peft = torch.autograd.grad(y_peft, [x] + params, dy)
    y = lk.dora_linear(x, layer.base_layer.weight, *params[:2], params[2], layer.scaling["default"],
                       layer.base_layer.bias, dropout_p=p, seed=seed, backend=backend)
    g = torch.autograd.grad(y, [x] + params, dy)
    assert rel_err(y, y_peft) < 1e-6
    for name, a, e in zip(("dx", "dA", "dB", "dm"), g, g_peft):
        assert rel_err(a, e) < 1e-5, (name, rel_err(a, e))


def test_dropout_seeds_and_eval():
    x, W, A, B, m, b = make_inputs(16, 20, 12, 3, torch.float32)
    f = lambda **kw: lk.dora_linear(x, W, A, B, m, 1.0, b, dropout_p=0.5, backend="reference", **kw)  # noqa: E731
    assert torch.equal(f(seed=3), f(seed=3)) and not torch.equal(f(seed=3), f(seed=4))
    torch.testing.assert_close(f(training=False), lk.dora_linear(x, W, A, B, m, 1.0, b, backend="reference"))


# ----------------------------------------------------------------------------------------------
# Inference, edge shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_inference_and_empty_batch(backend):
    x, W, A, B, m, b = make_inputs(3, 16, 8, 2, torch.float32)
    with torch.inference_mode():
        y = lk.dora_linear(x, W, A, B, m, 1.0, b, backend=backend)
    assert y.grad_fn is None
    ref = dora_op.dora_linear_reference(*(t.detach().double() for t in (x, W, A, B, m)), 1.0, b.double())
    assert_close(y, ref, torch.float32)
    x0 = torch.randn(0, 16, requires_grad=True)
    y0 = lk.dora_linear(x0, W, A, B, m, 1.0, b, backend=backend)
    assert y0.shape == (0, 8)
    gx, gm = torch.autograd.grad(y0.sum(), (x0, m))
    assert gx.shape == x0.shape and torch.equal(gm, torch.zeros_like(m))


@pytest.mark.parametrize("change, exc, name", [
    (dict(m=torch.ones(7)), ValueError, "magnitude must be"),
    (dict(m=torch.ones(8, dtype=torch.float64)), TypeError, "magnitude dtype"),
    (dict(m=torch.ones(8, 1)), ValueError, "magnitude must be 1-D"),
    (dict(weight_sq_norm=torch.ones(7)), ValueError, "weight_sq_norm must be"),
    (dict(weight_sq_norm=torch.ones(8, dtype=torch.float16)), ValueError, "weight_sq_norm must be"),
    (dict(B=torch.ones(8, 3)), ValueError, "lora_B must be"),
    (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
])
def test_bad_input(change, exc, name):
    x, W, A, B, m, b = (t.detach() for t in make_inputs(4, 16, 8, 2, torch.float32))
    args = dict(x=x, W=W, A=A, B=B, m=m, scaling=1.0, b=b, dropout_p=0.0, weight_sq_norm=None) | change
    with pytest.raises(exc, match=name):
        lk.dora_linear(args["x"], args["W"], args["A"], args["B"], args["m"], args["scaling"], args["b"],
                       dropout_p=args["dropout_p"], weight_sq_norm=args["weight_sq_norm"])


# ----------------------------------------------------------------------------------------------
# Memory: no N×K temporary, against PEFT's DoRA layer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_no_weight_sized_temporary_unlike_peft(p):
    pytest.importorskip("peft")
    M, K, N = 8, 96, 80
    model, layer = peft_dora_layer(K=K, N=N, dropout=p)
    model.train()
    x = torch.randn(M, K)
    with LargestAllocation() as peft_sizes:
        model(x).sum().backward()
    assert peft_sizes.largest >= N * K  # PEFT forms W + s·BA (and the eye-trick B A)
    W = layer.base_layer.weight.detach()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    m, b = layer.lora_magnitude_vector["default"].weight.detach(), layer.base_layer.bias.detach()
    seed = torch.tensor(5, dtype=torch.int64) if p else None
    # The backend functions are called directly: a dispatch mode does not see inside a custom op.
    for backend in ("reference", "triton"):
        with LargestAllocation() as sizes:
            y, h, v, n = dora_op._dora_fwd(x, W, A, B, m, b, None, 2.0, p, seed, backend, True)
            dora_op._dora_bwd(torch.randn_like(y), x, W, A, B, m, h, v, n, 2.0, p, seed, backend, True)
        assert sizes.largest < N * K // 4, f"{backend}: a {sizes.largest}-element temporary (N·K = {N * K})"


# ----------------------------------------------------------------------------------------------
# LowRankLinear(method="dora"), convert, merge/unmerge, adapter checkpoints
# ----------------------------------------------------------------------------------------------
def test_module_matches_peft_init_forward_merge():
    pytest.importorskip("peft")
    model, layer = peft_dora_layer()
    ours = lk.LowRankLinear.from_linear(copy.deepcopy(layer.base_layer), method="dora", rank=4)
    # PEFT's initial magnitude: the row norms of W (B = 0 at init).
    torch.testing.assert_close(ours.magnitude, torch.linalg.norm(ours.weight, dim=1))
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
        ours.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(9, 24)
    y_peft = model(x)
    assert rel_err(ours(x), y_peft) < 1e-6
    W0 = ours.weight.detach().clone()
    ours.merge()
    layer.merge()
    assert rel_err(ours.weight, layer.base_layer.weight) < 1e-6  # PEFT's DoRA merge
    assert rel_err(ours(x), y_peft) < 1e-6
    ours.unmerge()
    assert rel_err(ours.weight, W0) < 1e-6
    assert rel_err(ours(x), y_peft) < 1e-6


def test_weight_norm_cache_follows_the_weight():
    layer = lk.LowRankLinear(16, 12, rank=3, method="dora")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16)
    y0 = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place update bumps the version counter: the cache refreshes
    ref = dora_op.dora_linear_reference(x, layer.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling,
                                        layer.bias)
    torch.testing.assert_close(layer(x), ref)
    assert not torch.allclose(layer(x), y0)


def test_convert_and_adapter_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 8))
    lk.convert(model, method="dora", rank=2)
    assert all(isinstance(model[i], lk.LowRankLinear) and model[i].method == "dora" for i in (0, 2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{w}" for i in (0, 2) for w in ("lora_A", "lora_B", "magnitude")}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 16)
    y = model(x)
    lk.save_adapters(model, tmp_path / "dora.safetensors")
    torch.manual_seed(0)
    fresh = lk.convert(nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 8)), method="dora", rank=2)
    lk.load_adapters(fresh, tmp_path / "dora.safetensors")
    torch.testing.assert_close(fresh(x), y)


def test_lora_config_with_use_dora_converts_to_dora():
    peft = pytest.importorskip("peft")
    model = lk.convert(nn.Sequential(nn.Linear(16, 12)), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert model[0].method == "dora"


def test_unmerge_without_merge_norm_is_refused():
    layer = lk.LowRankLinear(16, 12, rank=3, method="dora")
    layer.merge()
    sd = layer.state_dict()
    fresh = lk.LowRankLinear(16, 12, rank=3, method="dora")
    fresh.load_state_dict(sd)
    assert fresh.merged
    with pytest.raises(RuntimeError, match="cannot be unmerged"):
        fresh.unmerge()


# ----------------------------------------------------------------------------------------------
# from_peft on DoRA adapters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_from_peft_dora_parity(backend, dtype):
    pytest.importorskip("peft")
    model, layer = peft_dora_layer(dtype=dtype)  # fp16 base: PEFT keeps the adapters in fp32
    ours = lk.from_peft(copy.deepcopy(model), backend=backend)
    x = torch.randn(2, 7, 24, dtype=dtype)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    y_peft, y = model(x), ours(x)
    dy = torch.randn_like(y)
    g_peft = torch.autograd.grad(y_peft, params(model), dy)
    g = torch.autograd.grad(y, params(ours), dy)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and rel_err(y, y_peft) < tol
    assert len(g) == 3
    for a, e in zip(g, g_peft):
        assert a.dtype == e.dtype and rel_err(a, e) < tol
    # PEFT's own merge, unmerge and disable still work on the fused layer.
    ours.merge_adapter()
    assert rel_err(ours(x), y_peft) < tol
    ours.unmerge_adapter()
    with ours.disable_adapter():
        assert rel_err(ours(x), ours.base_model.model[0].base_layer(x)) == 0
