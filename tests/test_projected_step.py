"""projected_adamw_step(s), adamw_step(s), project: every kernel backend against the float64 reference;
batched launches bit-identical to single ones, device step sizes, offset tables."""

import math

import pytest
import torch
from _helpers import DEVICE, HAS_CUDA, TOL, assert_close, kernel_backends, kernel_dtypes, rel_err

from lowrank_kernels import backend as lk_backend
from lowrank_kernels.ops import projected_step as ps

CASES = [
    # m, n, r
    (37, 65, 3),
    (70, 33, 17),
    (129, 40, 16),
]


def orthonormal_proj(m, n, r, side):
    dim = n if side == "right" else m
    q = torch.linalg.qr(torch.randn(dim, r, device=DEVICE, dtype=torch.float64))[0]
    return (q.t() if side == "right" else q).contiguous()


def make_inputs(m, n, r, side, dtype, noncontig):
    """Weights small enough that low-precision rounding of W does not swamp the update."""
    if noncontig:
        # Every other column of wider buffers: strided W and G.
        W = (0.05 * torch.randn(m, 2 * n, device=DEVICE)).to(dtype)[:, ::2]
        G = torch.randn(m, 2 * n, device=DEVICE).to(dtype)[:, ::2]
    else:
        W = (0.05 * torch.randn(m, n, device=DEVICE)).to(dtype)
        G = torch.randn(m, n, device=DEVICE).to(dtype)
    P = orthonormal_proj(m, n, r, side)
    rshape = ps.projected_shape((m, n), r, side)
    m1 = 0.1 * torch.randn(rshape, device=DEVICE)
    m2 = torch.rand(rshape, device=DEVICE) + 0.01
    return W, G, P, m1, m2


HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-6, scale=0.7)
STEP_SIZE, LR_WD = 0.05, 0.01


def coefficients(batch, dtype=torch.float32):
    """The (B, 2) [step size, lr·wd] the kernels read, as step_coefficients would produce."""
    return torch.tensor([[STEP_SIZE, LR_WD]] * batch, dtype=dtype, device=DEVICE)


def float64_step(W, G, P, m1, m2, prev, side, fira, proj_grad=None):
    w, m1d, m2d = W.double(), m1.double().clone(), m2.double().clone()
    lim = torch.tensor(prev, dtype=torch.float64, device=DEVICE) if fira else None
    ps.reference_projected_one(
        w, None if G is None else G.double(), P.double(), m1d, m2d, lim,
        None if proj_grad is None else proj_grad.double(), coefficients(1, torch.float64)[0], side,
        fira=fira, decay=True, **HYPER,
    )
    return w - W.double(), m1d, m2d, lim


def kernel_steps(backend, Ws, Gs, Ps, m1s, m2s, prevs, side, fira, proj_grads=None, poison=True):
    """One batched launch of the kernels on copies; returns per-parameter (update, m1, m2, limiter)."""
    ws, m1k, m2k = [W.clone() for W in Ws], [m.clone() for m in m1s], [m.clone() for m in m2s]
    lims = [torch.tensor(p, dtype=torch.float32, device=DEVICE) for p in prevs] if fira else []
    batch, (m, n) = len(Ws), Ws[0].shape
    rank = Ps[0].shape[0] if side == "right" else Ps[0].shape[1]
    work = ps.allocate_workspace(batch, m if side == "right" else n, rank, DEVICE, fira)
    if poison:
        for t in work.values():
            t.fill_(float("nan"))
    grads = Gs if Gs is not None else [None] * batch
    impl = ps.PROJECTED_ADAMW.impl(backend).step
    impl(ws, grads, Ps, m1k, m2k, lims, proj_grads or [], coefficients(batch), side, fira=fira, decay=True,
         workspace=work, **HYPER)
    return [(w.double() - W.double(), a, b, lims[i] if fira else None)
            for i, (w, W, a, b) in enumerate(zip(ws, Ws, m1k, m2k))]


def kernel_step(backend, W, G, P, m1, m2, prev, side, fira, proj_grad=None, poison=True):
    return kernel_steps(backend, [W], None if G is None else [G], [P.float()], [m1], [m2], [prev], side, fira,
                        None if proj_grad is None else [proj_grad], poison)[0]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("fira", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_step_matches_float64_reference(backend, dtype, side, fira, case):
    m, n, r = case
    noncontig = case == CASES[0]
    W, G, P, m1, m2 = make_inputs(m, n, r, side, dtype, noncontig)
    # A small previous norm makes the limiter bite (l > 1); with -1 (none yet) l = 1.
    prev = 1e-3 if case == CASES[1] else -1.0
    ref = float64_step(W, G, P, m1, m2, prev, side, fira)
    out = kernel_step(backend, W, G, P, m1, m2, prev, side, fira)
    assert_close(out[0], ref[0], dtype, "update W_new - W")
    assert_close(out[1], ref[1], dtype, "exp_avg")
    assert_close(out[2], ref[2], dtype, "exp_avg_sq")
    if fira:
        assert_close(out[3].reshape(1), ref[3].reshape(1), dtype, "limiter norm")


def test_limiter_is_exercised():
    W, G, P, m1, m2 = make_inputs(70, 33, 17, "right", torch.float64, False)
    _, _, _, lim = float64_step(W, G, P, m1, m2, 1e-3, "right", True)
    # The stored norm is prev * 1.01 exactly when the limiter bites.
    assert abs(lim.item() - (1e-3 + 1e-8) * 1.01) < 1e-12


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("side", ["left", "right"])
def test_step_with_projected_grad(backend, side):
    """GaLore with an accumulated R instead of G (the per-layer accumulation path)."""
    m, n, r = 37, 65, 5
    W, G, P, m1, m2 = make_inputs(m, n, r, side, torch.float32, False)
    R = torch.randn(ps.projected_shape((m, n), r, side), device=DEVICE)
    ref = float64_step(W, None, P, m1, m2, -1.0, side, False, proj_grad=R)
    out = kernel_step(backend, W, None, P, m1, m2, -1.0, side, False, proj_grad=R)
    for name, a, b in zip(("update", "exp_avg", "exp_avg_sq"), out[:3], ref[:3]):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("side", ["left", "right"])
def test_project_matches_float64(backend, dtype, side):
    m, n, r = 45, 70, 7
    G = torch.randn(m, 2 * n, device=DEVICE).to(dtype)[:, ::2]
    P = orthonormal_proj(m, n, r, side)
    ref = ps.project_reference(G.double(), P, side)
    if backend == "triton":
        out = torch.full(ps.projected_shape((m, n), r, side), float("nan"), device=DEVICE)
        ps.project_triton(G, P.float(), side, out=out)
    else:
        out = ps.project(G, P.float(), side, backend=backend)
    assert_close(out, ref, dtype, "R")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", [(37, 65), (1037,)])
def test_adamw_matches_float64(backend, dtype, shape):
    W = (0.05 * torch.randn(*shape, device=DEVICE)).to(dtype)
    G = torch.randn(*shape, device=DEVICE).to(dtype)
    m1 = 0.1 * torch.randn(*shape, device=DEVICE)
    m2 = torch.rand(*shape, device=DEVICE) + 0.01
    args = dict(beta1=0.9, beta2=0.95, eps=1e-6, decay=True)
    w64, a64, b64 = W.double(), m1.double(), m2.double()
    ps.reference_adamw([w64], [G.double()], [a64], [b64], coefficients(1, torch.float64), **args)
    w, a, b = W.clone(), m1.clone(), m2.clone()
    ps.ADAMW.impl(backend).step([w], [G], [a], [b], coefficients(1), **args)
    assert_close(w.double() - W.double(), w64 - W.double(), dtype, "update")
    assert_close(a, a64, dtype, "exp_avg")
    assert_close(b, b64, dtype, "exp_avg_sq")


def test_adamw_non_contiguous_weight():
    base = torch.randn(20, 40, device=DEVICE)
    W = base[:, ::2]
    G = torch.randn(20, 20, device=DEVICE)
    m1, m2 = torch.zeros(20, 20, device=DEVICE), torch.zeros(20, 20, device=DEVICE)
    W_ref = W.clone()
    ps.adamw_step(W, G, m1, m2, step=1, lr=0.1, weight_decay=0.1, backend="triton")
    ps.adamw_step(W_ref, G, torch.zeros_like(m1), torch.zeros_like(m2), step=1, lr=0.1, weight_decay=0.1,
                  backend="reference")
    assert rel_err(base[:, ::2], W_ref) < TOL[torch.float32]


@pytest.mark.parametrize("fira", [False, True])
def test_triton_step_is_deterministic(fira):
    W, G, P, m1, m2 = make_inputs(70, 33, 17, "left", torch.float32, False)
    a = kernel_step("triton", W, G, P, m1, m2, 0.5, "left", fira, poison=False)
    b = kernel_step("triton", W, G, P, m1, m2, 0.5, "left", fira, poison=False)
    for x, y in zip(a, b):
        if x is not None:
            assert torch.equal(x, y)


def test_public_step_dispatch():
    """The functional entry point runs each backend and agrees with the reference."""
    W, G, P, m1, m2 = make_inputs(37, 65, 3, "right", torch.float32, False)
    outs = {}
    for backend in ["reference", "triton"]:
        w, a, b = W.clone(), m1.clone(), m2.clone()
        lim = torch.tensor(-1.0, device=DEVICE)
        ps.projected_adamw_step(w, G, P.float(), a, b, side="right", step=3, lr=0.01, weight_decay=0.1,
                                scale=0.5, fira=True, limiter_norm=lim, backend=backend)
        outs[backend] = (w - W, lim)
    assert rel_err(outs["triton"][0], outs["reference"][0]) < TOL[torch.float32]
    assert rel_err(outs["triton"][1], outs["reference"][1]) < TOL[torch.float32]


def _valid():
    W, G, P, m1, m2 = make_inputs(20, 12, 4, "right", torch.float32, False)
    return dict(weight=W, grad=G, proj=P.float(), exp_avg=m1, exp_avg_sq=m2), dict(side="right", step=1, lr=1e-3)


@pytest.mark.parametrize("change, exc, word", [
    (lambda t, k: t.update(weight=t["weight"][0]), ValueError, "weight"),
    (lambda t, k: t.update(grad=t["grad"].double()), TypeError, "grad"),
    (lambda t, k: t.update(grad=t["grad"].half()), TypeError, "grad"),
    (lambda t, k: t.update(grad=t["grad"][:, :5]), ValueError, "grad"),
    (lambda t, k: t.update(proj=t["proj"][:, :5]), ValueError, "proj"),
    (lambda t, k: t.update(proj=torch.zeros(13, 12)), ValueError, "proj"),
    (lambda t, k: t.update(proj=t["proj"].half()), TypeError, "proj"),
    (lambda t, k: t.update(exp_avg=t["exp_avg"].half()), TypeError, "exp_avg"),
    (lambda t, k: t.update(exp_avg_sq=t["exp_avg_sq"][:3]), ValueError, "exp_avg_sq"),
    (lambda t, k: t.update(grad=None), ValueError, "grad"),
    (lambda t, k: k.update(side="up"), ValueError, "side"),
    (lambda t, k: k.update(step=0), ValueError, "step"),
    (lambda t, k: k.update(lr=float("nan")), ValueError, "lr"),
    (lambda t, k: k.update(lr=-1.0), ValueError, "lr"),
    (lambda t, k: k.update(betas=(0.9, 1.0)), ValueError, "betas"),
    (lambda t, k: k.update(eps=-1.0), ValueError, "eps"),
    (lambda t, k: k.update(fira=True), ValueError, "limiter_norm"),
    (lambda t, k: k.update(backend="tpu"), ValueError, "backend"),
])
def test_validation(change, exc, word):
    tensors, kwargs = _valid()
    change(tensors, kwargs)
    with pytest.raises(exc, match=word):
        ps.projected_adamw_step(**tensors, **kwargs)


def test_adamw_validation():
    W = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="exp_avg"):
        ps.adamw_step(W, W, torch.zeros(4, 5), torch.zeros(5, 4), step=1, lr=1e-3)
    with pytest.raises(TypeError, match="grad"):
        ps.adamw_step(W, W.long(), torch.zeros(5, 4), torch.zeros(5, 4), step=1, lr=1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        ps.adamw_step(W, W, torch.zeros(5, 4), torch.zeros(5, 4), step=1, lr=1e-3, weight_decay=-1.0)


@pytest.mark.skipif(not HAS_CUDA, reason="peak memory is measured with the CUDA allocator")
@pytest.mark.parametrize("backend", ["triton"] + (["cuda"] if lk_backend.cuda_extension() is not None else []))
@pytest.mark.parametrize("side", ["left", "right"])
def test_no_full_size_temporary(backend, side):
    m, n, r = 2048, 1024, 32
    W, G, P, m1, m2 = make_inputs(m, n, r, side, torch.bfloat16, False)
    lim = torch.tensor(-1.0, device=DEVICE)
    step = lambda: ps.projected_adamw_step(W, G, P.float(), m1, m2, side=side, step=1, lr=1e-3,  # noqa: E731
                                           fira=True, limiter_norm=lim, backend=backend)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 4 * (2 * r + 8) * max(m, n) + (1 << 16), f"extra {extra} bytes for a {m}x{n} step"


# ----------------------------------------------------------------------------------------------
# Batched launches, device step sizes, offset tables
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("fira", [False, True])
def test_batched_launch_is_bit_identical_to_single(backend, side, fira):
    """Three parameters in one launch get exactly the bits they get one at a time."""
    m, n, r = 37, 21, 5
    inputs = [make_inputs(m, n, r, side, torch.float32, True) for _ in range(3)]
    Ws, Gs, Ps, m1s, m2s = (list(x) for x in zip(*inputs))
    Ps = [P.float() for P in Ps]
    prevs = [-1.0, 1e-3, 0.5]  # no previous norm, a biting limiter, a loose one
    batched = kernel_steps(backend, Ws, Gs, Ps, m1s, m2s, prevs, side, fira)
    for i in range(3):
        single = kernel_steps(backend, [Ws[i]], [Gs[i]], [Ps[i]], [m1s[i]], [m2s[i]], [prevs[i]], side, fira)[0]
        for a, b in zip(batched[i], single):
            assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("backend", kernel_backends())
def test_batched_projected_grad_launch(backend):
    """GaLore from given projected gradients, batched: R comes through the table, not the workspace."""
    m, n, r = 20, 33, 4
    inputs = [make_inputs(m, n, r, "left", torch.float32, False) for _ in range(2)]
    Ws, _, Ps, m1s, m2s = (list(x) for x in zip(*inputs))
    Ps = [P.float() for P in Ps]
    Rs = [torch.randn(ps.projected_shape((m, n), r, "left"), device=DEVICE) for _ in range(2)]
    batched = kernel_steps(backend, Ws, None, Ps, m1s, m2s, [-1.0] * 2, "left", False, proj_grads=Rs)
    for i in range(2):
        ref = float64_step(Ws[i], None, Ps[i], m1s[i], m2s[i], -1.0, "left", False, proj_grad=Rs[i])
        for name, a, b in zip(("update", "exp_avg", "exp_avg_sq"), batched[i][:3], ref[:3]):
            assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_batched_adamw_is_bit_identical_to_single(backend):
    shape = (7, 45)
    Ws = [(0.05 * torch.randn(shape, device=DEVICE)) for _ in range(3)]
    Gs = [torch.randn(shape, device=DEVICE) for _ in range(3)]
    m1s = [0.1 * torch.randn(shape, device=DEVICE) for _ in range(3)]
    m2s = [torch.rand(shape, device=DEVICE) + 0.01 for _ in range(3)]
    steps = [torch.tensor(t, dtype=torch.float64, device=DEVICE) for t in (1.0, 4.0, 9.0)]
    kw = dict(lr=1e-2, weight_decay=0.1, backend=backend)
    w, a, b = [x.clone() for x in Ws], [x.clone() for x in m1s], [x.clone() for x in m2s]
    ps.adamw_steps(w, Gs, a, b, steps=steps, **kw)
    for i in range(3):
        w1, a1, b1 = Ws[i].clone(), m1s[i].clone(), m2s[i].clone()
        ps.adamw_step(w1, Gs[i], a1, b1, step=int(steps[i]), **kw)
        assert torch.equal(w1, w[i]) and torch.equal(a1, a[i]) and torch.equal(b1, b[i])


@pytest.mark.parametrize("correct_bias", [True, False])
def test_step_coefficients_match_the_peers_python_floats(correct_bias):
    """float64 device math, rounded once: the peers' host step size, bit for bit, in any batch."""
    lr, betas, wd = 3e-3, (0.9, 0.999), 0.1
    counts = [1, 2, 7, 100, 12345]
    steps = [torch.tensor(float(t), dtype=torch.float64, device=DEVICE) for t in counts]
    expected = [lr * math.sqrt(1.0 - betas[1] ** t) / (1.0 - betas[0] ** t) if correct_bias else lr for t in counts]
    for lr_arg in (lr, torch.tensor(lr, dtype=torch.float64, device=DEVICE)):
        coef = ps.step_coefficients(steps, lr_arg, betas, wd, correct_bias)
        assert torch.equal(coef[:, 0], torch.tensor(expected, dtype=torch.float32, device=DEVICE))
        assert torch.equal(coef[:, 1], torch.full((5,), lr * wd, dtype=torch.float32, device=DEVICE))
        for i, s in enumerate(steps):
            assert torch.equal(ps.step_coefficients([s], lr_arg, betas, wd, correct_bias)[0], coef[i])


def test_offset_table_locates_every_tensor():
    ts = [torch.randn(5, 3, device=DEVICE) for _ in range(4)]
    halves = [torch.randn(2, device=DEVICE).half() for _ in range(4)]
    table = ps.offset_table([ts, None, 15, halves], 4, DEVICE)
    assert table.shape == (4, 4) and table.dtype == torch.int64
    for b in range(4):
        assert ts[0].data_ptr() + 4 * int(table[0, b]) == ts[b].data_ptr()
        assert halves[0].data_ptr() + 2 * int(table[3, b]) == halves[b].data_ptr()
    assert table[1].eq(0).all() and torch.equal(table[2].cpu(), torch.arange(4) * 15)
    # The same tensors reuse the table (nothing copied to the device again).
    assert ps.offset_table([ts, None, 15, halves], 4, DEVICE) is table
    assert ps.offset_table([ts[::-1], None, 15, halves], 4, DEVICE) is not table
    assert ps.offset_table([ts[:1]], 1, DEVICE).eq(0).all()


def test_tensor_step_and_lr_match_python_numbers():
    W, G, P, m1, m2 = make_inputs(37, 65, 3, "right", torch.float32, False)
    outs = []
    for step, lr in ((5, 0.01), (torch.tensor(5.0, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64))):
        w, a, b = W.clone(), m1.clone(), m2.clone()
        lim = torch.tensor(-1.0, device=DEVICE)
        ps.projected_adamw_step(w, G, P.float(), a, b, side="right", step=step, lr=lr, weight_decay=0.1,
                                scale=0.5, fira=True, limiter_norm=lim, backend="triton")
        outs.append((w, a, b, lim))
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_batch_validation():
    inputs = [make_inputs(20, 12, 4, "right", torch.float32, False) for _ in range(2)]
    Ws, Gs, Ps, m1s, m2s = (list(x) for x in zip(*inputs))
    steps = [torch.tensor(1.0, dtype=torch.float64) for _ in range(2)]
    kw = dict(side="right", steps=steps, lr=1e-3)
    Ps = [P.float() for P in Ps]
    with pytest.raises(ValueError, match=r"weight\[1\].*share one launch"):
        ps.projected_adamw_steps([Ws[0], Ws[1].t().contiguous().t()], Gs, Ps, m1s, m2s, **kw)
    with pytest.raises(ValueError, match="projs"):
        ps.projected_adamw_steps(Ws, Gs, Ps[:1], m1s, m2s, **kw)
    with pytest.raises(ValueError, match="lr"):
        ps.projected_adamw_steps(Ws, Gs, Ps, m1s, m2s, side="right", steps=steps, lr=torch.ones(2))
    with pytest.raises(ValueError, match=r"step\[1\]"):
        ps.projected_adamw_steps(Ws, Gs, Ps, m1s, m2s, side="right", steps=[steps[0], 1], lr=1e-3)
