"""APOLLO / APOLLO-Mini: the fused step (ops/apollo_step.py) against the paper's
update equations in float64, ApolloAdamW against apollo_torch, and the optimizer state's size
against GaLore's and Fira's."""

import copy
import math

import pytest
import torch
from _helpers import DEVICE, assert_close, kernel_dtypes

from lowrank_kernels import FiraAdamW, GaLoreAdamW
from lowrank_kernels.ops import apollo_step as ap
from lowrank_kernels.ops import projected_step as ps
from lowrank_kernels.optim.apollo import ApolloAdamW, apollo_projection, next_seed, state_bytes

BETA1, BETA2, EPS, STEP_SIZE, LR_WD = 0.9, 0.95, 1e-6, 0.05, 0.01


def paper_step(W, G, P, m1, m2, prev, side, scale, tensor_wise):
    """APOLLO (arXiv 2412.05270, Algorithm 1 with the official code's limiter) in float64:
    R = projection of G; Adam on R; s = ‖R̃‖/‖R‖ per channel (or per tensor); G̃ = G·s; Fira's
    norm-growth limiter; W ← W − η·√scale·G̃ − η_wd·W."""
    W, G, P, m1, m2 = (t.double() for t in (W, G, P, m1, m2))
    R = G @ P.t() if side == "right" else P.t() @ G
    m1 = BETA1 * m1 + (1 - BETA1) * R
    m2 = BETA2 * m2 + (1 - BETA2) * R * R
    Rt = m1 / (m2.sqrt() + EPS)
    if tensor_wise:
        s = torch.linalg.norm(Rt) / (torch.linalg.norm(R) + 1e-8)
    elif side == "right":  # channels are the rows of the (m, r) R, i.e. the rows of G
        s = (torch.linalg.norm(Rt, dim=1) / (torch.linalg.norm(R, dim=1) + 1e-8))[:, None]
    else:  # channels are the columns of the (r, n) R, i.e. the columns of G
        s = (torch.linalg.norm(Rt, dim=0) / (torch.linalg.norm(R, dim=0) + 1e-8))[None, :]
    Gt = G * s
    norm = torch.linalg.norm(Gt)
    limit = max(norm.item() / (prev + 1e-8), 1.01) / 1.01 if prev >= 0 else 1.0
    W_new = W - STEP_SIZE * math.sqrt(scale) * Gt / limit
    W_new = W_new - LR_WD * W_new
    return W_new - W, m1, m2, norm / limit


CASES = [(37, 65, 3, "left"), (70, 33, 17, "right"), (45, 40, 1, "right")]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("tensor_wise", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_step_matches_paper_equations(backend, dtype, tensor_wise, case):
    m, n, r, side = case
    if r == 1 and not tensor_wise:
        # Channel-wise at rank 1, φ_i = |Ñ_i| / |R_i| is ill-conditioned wherever some R_i ≈ 0 (any
        # fp32 rounding of R_i shows up in the update): rank 1 is APOLLO-Mini's, tensor-wise.
        r = 2
    if case == CASES[0]:
        # Strided W and G (every other column of wider buffers).
        W = (0.05 * torch.randn(m, 2 * n, device=DEVICE)).to(dtype)[:, ::2]
        G = torch.randn(m, 2 * n, device=DEVICE).to(dtype)[:, ::2]
    else:
        W, G = (0.05 * torch.randn(m, n, device=DEVICE)).to(dtype), torch.randn(m, n, device=DEVICE).to(dtype)
    P = apollo_projection((m, n), r, side, seed=7, device=DEVICE)
    rshape = ps.projected_shape((m, n), r, side)
    m1, m2 = 0.1 * torch.randn(rshape, device=DEVICE), torch.rand(rshape, device=DEVICE) + 0.01
    scale = 128.0 if tensor_wise else 0.7
    # Half the step's own norm as the previous one makes the limiter bite (l ≈ 2); -1 means none
    # yet (l = 1).
    prev = -1.0
    if case == CASES[1]:
        prev = 0.5 * paper_step(W, G, P, m1, m2, prev, side, scale, tensor_wise)[3].item()
    ref = paper_step(W, G, P, m1, m2, prev, side, scale, tensor_wise)
    w, a, b, lim = W.clone(), m1.clone(), m2.clone(), torch.tensor(prev, device=DEVICE)
    coef = torch.tensor([[STEP_SIZE, LR_WD]], device=DEVICE)
    if backend == "triton":
        rows = m if side == "right" else n
        work = ps.allocate_workspace(1, rows, r, DEVICE, fira=True)
        for t in work.values():
            t.fill_(float("nan"))
        ap.APOLLO.impl("triton").step([w], [G], [P], [a], [b], [lim], coef, side, BETA1, BETA2, EPS, scale,
                                      tensor_wise, True, workspace=work)
    else:
        ap.reference_apollo([w], [G], [P], [a], [b], [lim], coef, side, BETA1, BETA2, EPS, scale, tensor_wise, True)
    assert_close(w.double() - W.double(), ref[0], dtype, "update W_new - W")
    assert_close(a, ref[1], dtype, "exp_avg")
    assert_close(b, ref[2], dtype, "exp_avg_sq")
    assert_close(lim.reshape(1), ref[3].reshape(1), dtype, "limiter norm")


def _pair(shape, scale_type, rank, scale, gap, backend):
    """apollo_torch's APOLLOAdamW and ApolloAdamW on identical parameters (one plain, one projected)."""
    apollo_torch = pytest.importorskip("apollo_torch")
    w0 = [0.1 * torch.randn(*shape, device=DEVICE), torch.randn(5, device=DEVICE)]
    pa = [torch.nn.Parameter(t.clone()) for t in w0]
    pb = [torch.nn.Parameter(t.clone()) for t in w0]
    group = dict(rank=rank, proj="random", scale_type=scale_type, scale=scale, update_proj_gap=gap, proj_type="std")
    peer = apollo_torch.APOLLOAdamW([{"params": [pa[1]]}, {"params": [pa[0]], **group}], lr=1e-2, weight_decay=0.1)
    ours = ApolloAdamW([{"params": [pb[1]]}, {"params": [pb[0]], **group}], lr=1e-2, weight_decay=0.1,
                       backend=backend)
    return w0, pa, pb, peer, ours


_MODES = [("channel", 3, 1.0), ("tensor", 1, 128.0)]
# Every mode and side on the reference backend; the (slow) interpreted kernels once per mode and
# side (the kernels' own float64 checks above cover the rest).
_PEER_CASES = ([("reference", mode, shape) for mode in _MODES for shape in ((37, 20), (20, 37))]
               + [("triton", _MODES[0], (20, 37)), ("triton", _MODES[1], (37, 20))])


@pytest.mark.parametrize("backend,mode,shape", _PEER_CASES)
def test_matches_apollo_torch(backend, mode, shape):
    """Five steps with two refreshes (update_proj_gap=2): the same projections from the same seeds,
    the same trajectory (bit for bit on the reference backend)."""
    w0, pa, pb, peer, ours = _pair(shape, *mode, gap=2, backend=backend)
    for _ in range(5):
        grads = [torch.randn_like(t) for t in w0]
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        peer.step()
        ours.step()
    for a, b, w in zip(pa, pb, w0):
        if backend == "reference":
            assert torch.equal(a, b)
        else:
            assert_close(b - w, a.detach() - w, torch.float32, "trajectory")
    proj_peer = peer.state[pa[0]]["projector"].ortho_matrix
    state = ours.state[pb[0]]
    side = "right" if shape[0] >= shape[1] else "left"
    assert torch.equal(apollo_projection(shape, mode[1], side, state["proj_seed"], DEVICE), proj_peer)


def test_batched_launch_matches_single():
    """Three same-shape matrices step in one launch chain, each bit for bit as when alone (tensor-wise:
    its per-matrix totals are the batched path's own code; the channel-wise batch is the kernels')."""
    w0 = [0.1 * torch.randn(20, 9, device=DEVICE) for _ in range(3)]
    together = [torch.nn.Parameter(w.clone()) for w in w0]
    alone = [torch.nn.Parameter(w.clone()) for w in w0]
    group = {"rank": 2, "scale_type": "tensor", "update_proj_gap": 1}
    opt = ApolloAdamW([{"params": together, **group}], lr=1e-2, backend="triton")
    singles = []
    for i, p in enumerate(alone):
        single = ApolloAdamW([{"params": [p], **group}], lr=1e-2, backend="triton")
        single.state[p]["seed"] = i + 1  # the seed its position in the batched optimizer gives
        singles.append(single)
    for _ in range(2):
        for a, b in zip(together, alone):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        for single in singles:
            single.step()
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


def test_seed_sequence():
    """The parameter's 1-based position, then next_seed at each refresh, as apollo_torch."""
    w = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(2)]
    opt = ApolloAdamW([{"params": [w[0]]}, {"params": [w[1]], "rank": 2, "update_proj_gap": 3}])
    assert opt.state[w[1]]["seed"] == 2
    seeds = []
    for _ in range(7):
        for p in w:
            p.grad = torch.randn_like(p)
        opt.step()
        seeds.append(opt.state[w[1]]["proj_seed"])
    s1 = next_seed(2)
    assert seeds == [2, 2, 2, s1, s1, s1, next_seed(s1)]


def _state_after_one_step(cls, m, n, r, **group):
    w = torch.nn.Parameter(torch.randn(m, n))
    opt = cls([{"params": [w], "rank": r, "update_proj_gap": 200, **group}], lr=1e-3)
    w.grad = torch.randn(m, n)
    opt.step()
    return opt


def test_state_memory_against_galore_and_fira():
    """State bytes from the state tensors: APOLLO keeps two fp32 moments of R's shape, the limiter
    norm and the step count; GaLore and Fira keep P as well (r·n more fp32)."""
    m, n, r = 96, 64, 16
    apollo = state_bytes(_state_after_one_step(ApolloAdamW, m, n, r))
    mini = state_bytes(_state_after_one_step(ApolloAdamW, m, n, 1, scale_type="tensor", scale=128.0))
    galore = state_bytes(_state_after_one_step(GaLoreAdamW, m, n, r, scale=0.25, proj_type="std"))
    fira = state_bytes(_state_after_one_step(FiraAdamW, m, n, r, alpha=1.0, proj_type="std"))
    assert apollo == 2 * m * r * 4 + 4 + 8
    assert mini == 2 * m * 1 * 4 + 4 + 8
    assert galore >= 2 * m * r * 4 + r * n * 4 and fira >= galore
    assert apollo < galore and mini < apollo


def test_state_dict_round_trip():
    w = torch.nn.Parameter(torch.randn(12, 8))
    group = {"params": [w], "rank": 2, "update_proj_gap": 2}
    opt = ApolloAdamW([group], lr=1e-2)
    grads = [torch.randn(12, 8) for _ in range(6)]
    for g in grads[:3]:
        w.grad = g.clone()
        opt.step()
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[3:]:
        w.grad = g.clone()
        opt.step()
    w2 = torch.nn.Parameter(saved_w)
    opt2 = ApolloAdamW([{"params": [w2], "rank": 2, "update_proj_gap": 2}], lr=1e-2)
    opt2.load_state_dict(saved)
    for g in grads[3:]:
        w2.grad = g.clone()
        opt2.step()
    assert torch.equal(w, w2)


def test_bad_arguments():
    w = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match="scale_type"):
        ApolloAdamW([{"params": [w], "rank": 2, "scale_type": "row"}])
    with pytest.raises(ValueError, match="'rank' 5 exceeds"):
        ApolloAdamW([{"params": [w], "rank": 5}])
    with pytest.raises(ValueError, match="proj_type"):
        ApolloAdamW([{"params": [w], "rank": 2, "proj_type": "left"}])
    with pytest.raises(ValueError, match="only read with 'rank'"):
        ApolloAdamW([{"params": [w], "scale": 2.0}])
    with pytest.raises(ValueError, match="2-D"):
        ApolloAdamW([{"params": [torch.nn.Parameter(torch.randn(3))], "rank": 1}])
    P = apollo_projection((6, 4), 2, "right", 0, "cpu")
    args = dict(side="right", steps=[torch.ones((), dtype=torch.float64)], lr=1e-3)
    with pytest.raises(ValueError, match="proj"):
        ps.apollo_steps([w.data], [w.data], [P.t()], [torch.zeros(6, 2)], [torch.zeros(6, 2)],
                        [torch.tensor(-1.0)], **args)
    with pytest.raises(ValueError, match="limiter_norm"):
        ps.apollo_steps([w.data], [w.data], [P], [torch.zeros(6, 2)], [torch.zeros(6, 2)],
                        [torch.tensor(-1.0, dtype=torch.float64)], **args)
    with pytest.raises(ValueError, match="scale"):
        ps.apollo_steps([w.data], [w.data], [P], [torch.zeros(6, 2)], [torch.zeros(6, 2)],
                        [torch.tensor(-1.0)], scale=-1.0, **args)


def _apollo_checkpoint():
    w, b = torch.nn.Parameter(torch.randn(12, 8)), torch.nn.Parameter(torch.randn(12))
    opt = ApolloAdamW([{"params": [b]}, {"params": [w], "rank": 2, "update_proj_gap": 2}], lr=1e-2)
    for _ in range(2):
        w.grad, b.grad = torch.randn(12, 8), torch.randn(12)
        opt.step()
    return copy.deepcopy(opt.state_dict())


def _fresh_apollo(rank=2):
    w, b = torch.nn.Parameter(torch.randn(12, 8)), torch.nn.Parameter(torch.randn(12))
    return ApolloAdamW([{"params": [b]}, {"params": [w], "rank": rank, "update_proj_gap": 2}], lr=1e-2)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd["state"][1].pop("count"), r"group 1, params\[0\]: .*missing key\(s\) \['count'\]"),
    (lambda sd: sd["state"][1]["exp_avg_sq"].neg_(), r"group 1, params\[0\]: 'exp_avg_sq' holds negative values"),
    (lambda sd: sd["state"][0]["exp_avg"].fill_(float("inf")), r"group 0, params\[0\]: 'exp_avg' holds NaN or inf"),
    (lambda sd: sd["state"][1].update(proj_seed=-3), r"group 1, params\[0\]: 'proj_seed' must be an int >= 0"),
    (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(12, 3)), r"'exp_avg' must be .* shape \(12, 2\)"),
    (lambda sd: sd["param_groups"][1].update(rank=3), r"group 1: 'rank' is 3 in the checkpoint but 2"),
    (lambda sd: sd["param_groups"][1].pop("scale_type"), r"group 1: missing key\(s\) \['scale_type'\]"),
    (lambda sd: sd["param_groups"][1].update(update_proj_gap=0), r"checkpoint param group 1: 'update_proj_gap'"),
])
def test_checkpoint_checked_at_load_time(edit, match):
    """A checkpoint of another optimizer or with values no step could have written is refused at
    load time, naming the group, the parameter and the key, before anything is loaded (it failed at
    the first step, or stepped to NaN weights)."""
    saved = _apollo_checkpoint()
    edit(saved)
    opt = _fresh_apollo()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert opt.state_dict()["state"] == before["state"]


def test_galore_checkpoint_into_apollo_is_refused():
    w = torch.nn.Parameter(torch.randn(12, 8))
    galore = GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    w.grad = torch.randn(12, 8)
    galore.step()
    w2 = torch.nn.Parameter(torch.randn(12, 8))
    with pytest.raises(ValueError, match=r"group 0: missing key\(s\) \['proj', 'scale_type'\]"):
        ApolloAdamW([{"params": [w2], "rank": 2}], lr=1e-2).load_state_dict(galore.state_dict())


def test_bf16_checkpoint_keeps_fp32_moments():
    w = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.bfloat16))
    opt = ApolloAdamW([{"params": [w], "rank": 2}], lr=1e-2, backend="reference")
    w.grad = torch.randn(12, 8, dtype=torch.bfloat16)
    opt.step()
    opt2 = ApolloAdamW([{"params": [w], "rank": 2}], lr=1e-2, backend="reference")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[w]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[w]["exp_avg_sq"], opt.state[w]["exp_avg_sq"])
