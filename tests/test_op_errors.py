"""Op-level inputs that used to fail deep inside with torch's own message, or run wrong: each is
now refused with a ValueError/TypeError naming the argument, or supported outright."""

import pytest
import torch
from _helpers import HAS_CUDA

import lowrank_kernels as lk
from lowrank_kernels.ops import projected_step as ps

M, K, N, R = 5, 33, 17, 3


def randn(*shape, device="cpu", dtype=torch.float32, requires_grad=False):
    return torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)


def layer_calls(x, W, bias, grad=False, backend=None):
    """Each layer op on input x (M, K) and base weight W (N, K), with adapters on x's device in x's
    dtype (requiring grad when ``grad``): {name: thunk}."""
    k = W.shape[1]
    a = lambda *s: randn(*s, device=x.device, dtype=x.dtype, requires_grad=grad)  # noqa: E731
    frozen = lambda *s: randn(*s, device=x.device, dtype=x.dtype)  # noqa: E731
    be = dict(backend=backend)
    return {
        "lora_linear": lambda: lk.lora_linear(x, W, a(R, k), a(N, R), 2.0, bias=bias, **be),
        "dora_linear": lambda: lk.dora_linear(x, W, a(R, k), a(N, R), a(N), 2.0, bias=bias, **be),
        "vera_linear": lambda: lk.vera_linear(x, W, frozen(R, k), frozen(N, R), a(R), a(N), bias, **be),
        "randlora_linear": lambda: lk.randlora_linear(x, W, frozen(R, 2, min(N, k)), frozen(max(N, k), 2, R),
                                                      a(R, 2), a(2, min(N, k)), 0.5, bias, **be),
        "nola_linear": lambda: lk.nola_linear(x, W, a(4), a(3), R, 7, 0.5, bias, **be),
        "sparse_lowrank_linear": lambda: lk.sparse_lowrank_linear(x, a(R, k), a(N, R), scaling=2.0, bias=bias, **be),
        "multi_lora_linear": lambda: lk.multi_lora_linear(x, W, a(2, R, k), a(2, N, R),
                                                          torch.zeros(x.shape[:-1], dtype=torch.int64,
                                                                      device=x.device), 2.0, bias, **be),
    }


LAYERS = list(layer_calls(randn(M, K), randn(N, K), None))


@pytest.mark.parametrize("op", LAYERS)
def test_no_input_features_is_refused_naming_x(op):
    """x of shape (M, 0) with a (N, 0) weight: was torch's 'cannot reshape tensor of 0 elements'."""
    call = layer_calls(randn(M, 0), randn(N, 0), randn(N))[op]
    with pytest.raises(ValueError, match=r"^x has shape \(5, 0\): in_features"):
        call()


@pytest.mark.parametrize("backend", ["reference", "triton", None])
@pytest.mark.parametrize("op", LAYERS)
def test_meta_tensors_propagate_shapes(op, backend):
    """All-meta inputs (was 'unknown device type for autocast'): the fake implementations give the
    output's shape and dtype, forward and backward, whatever the backend's name."""
    x = randn(2, M, K, device="meta", requires_grad=True)
    y = layer_calls(x, randn(N, K, device="meta"), randn(N, device="meta"), grad=True, backend=backend)[op]()
    assert y.is_meta and y.shape == (2, M, N) and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_meta_steps_and_projection_run():
    meta = dict(device="meta")
    W = randn(N, K, **meta)
    lk.projected_adamw_step(W, randn(N, K, **meta), randn(R, K, **meta), randn(N, R, **meta), randn(N, R, **meta),
                            side="right", step=1, lr=0.1)
    lk.adamw_step(W, randn(N, K, **meta), randn(N, K, **meta), randn(N, K, **meta), step=1, lr=0.1)
    ps.apollo_steps([W], [randn(N, K, **meta)], [randn(R, K, **meta)], [randn(N, R, **meta)], [randn(N, R, **meta)],
                    [randn(**meta)], side="right", steps=[randn(**meta)], lr=0.1)
    out = ps.project(randn(N, K, **meta), randn(R, K, **meta), "right")
    assert out.is_meta and out.shape == (N, R)


def test_meta_sparse_support_is_refused_naming_sp_index():
    x = randn(M, K, device="meta")
    with pytest.raises(ValueError, match="^sp_index is a meta tensor"):
        lk.sparse_lowrank_linear(x, randn(R, K, device="meta"), randn(N, R, device="meta"),
                                 randn(4, device="meta"), torch.arange(4, device="meta"))


def _step_inputs():
    torch.manual_seed(3)
    P = torch.linalg.qr(torch.randn(K, R))[0].t().contiguous()
    return dict(weight=randn(N, K), grad=randn(N, K), proj=P, exp_avg=randn(N, R), exp_avg_sq=randn(N, R).abs(),
                limiter_norm=torch.tensor(2.0))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_steps_update_a_parameter_outside_no_grad(backend):
    """The steps on an nn.Parameter outside torch.no_grad(): the reference path raised 'a leaf
    Variable that requires grad is being used in an in-place operation' where the kernels ran;
    now every backend updates it as under no_grad."""
    results = []
    for in_no_grad in (False, True):
        t = _step_inputs()
        W = torch.nn.Parameter(t.pop("weight"))
        m1, m2 = torch.zeros(N, K), torch.zeros(N, K)
        with torch.no_grad() if in_no_grad else _nothing():
            lk.projected_adamw_step(W, t["grad"], t["proj"], t["exp_avg"], t["exp_avg_sq"], side="right", step=2,
                                    lr=0.1, fira=True, limiter_norm=t["limiter_norm"], backend=backend)
            lk.adamw_step(W, t["grad"], m1, m2, step=2, lr=0.1, backend=backend)
            ps.apollo_steps([W], [t["grad"]], [t["proj"]], [t["exp_avg"]], [t["exp_avg_sq"]], [t["limiter_norm"]],
                            side="right", steps=[torch.tensor(3.0)], lr=0.1, backend=backend)
        assert W.requires_grad and W.grad_fn is None
        results.append(W.detach())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("step", ["projected_adamw_step", "adamw_step", "apollo_steps"])
@pytest.mark.parametrize("arg", ["weight", "exp_avg", "exp_avg_sq"])
def test_steps_refuse_a_self_overlapping_state(step, arg):
    """An expanded (stride-0) weight or moment written in place: the Triton step wrote its aliased
    elements in no defined order, without complaint."""
    t = _step_inputs()
    if step == "adamw_step":
        t["exp_avg"], t["exp_avg_sq"] = randn(N, K), randn(N, K).abs()
    t[arg] = t[arg][:1].expand_as(t[arg])
    calls = {
        "projected_adamw_step": lambda: lk.projected_adamw_step(
            t["weight"], t["grad"], t["proj"], t["exp_avg"], t["exp_avg_sq"], side="right", step=1, lr=0.1,
            backend="triton"),
        "adamw_step": lambda: lk.adamw_step(t["weight"], t["grad"], t["exp_avg"], t["exp_avg_sq"], step=1, lr=0.1,
                                            backend="triton"),
        "apollo_steps": lambda: ps.apollo_steps([t["weight"]], [t["grad"]], [t["proj"]], [t["exp_avg"]],
                                                [t["exp_avg_sq"]], [t["limiter_norm"]], side="right",
                                                steps=[torch.tensor(1.0)], lr=0.1, backend="triton"),
    }
    with pytest.raises(ValueError, match=rf"^{arg} is written in place but its layout"):
        calls[step]()


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs the Triton kernels only without a GPU")
@pytest.mark.parametrize("op", LAYERS)
def test_bf16_on_the_interpreter_is_refused(op):
    """bf16 on backend='triton' under the interpreter gave garbage (relative error ~1e9: its bf16
    dot multiplies raw bit patterns); now refused, naming x and the reason."""
    bf16 = dict(dtype=torch.bfloat16)
    call = layer_calls(randn(M, K, **bf16), randn(N, K, **bf16), None, backend="triton")[op]
    with pytest.raises(TypeError, match=r"backend='triton' does not support x in bfloat16 on cpu tensors"
                                        r".*interpreter, which computes bfloat16 dot products wrongly"):
        call()


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs the Triton kernels only without a GPU")
def test_bf16_step_on_the_interpreter_is_refused_naming_weight():
    t = _step_inputs()
    with pytest.raises(TypeError, match="does not support weight in bfloat16 on cpu"):
        lk.projected_adamw_step(t["weight"].bfloat16(), t["grad"].bfloat16(), t["proj"], t["exp_avg"],
                                t["exp_avg_sq"], side="right", step=1, lr=0.1, backend="triton")
