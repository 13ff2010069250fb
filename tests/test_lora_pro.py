"""LoRA-Pro (optim/lora_pro.py) against the paper's Theorems 2.1 and 2.2 in float64, and the
optimizer wrapper against a step written out by hand."""

import copy
import math

import pytest
import torch
from _helpers import rel_err
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.optim.lora_pro import lora_pro_gradients, solve_sylvester_spd

N, K, R, S = 21, 17, 3, 2.0


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(R, K, generator=gen, dtype=torch.float64)
    B = torch.randn(N, R, generator=gen, dtype=torch.float64)
    g = torch.randn(N, K, generator=gen, dtype=torch.float64)  # the full gradient
    return A, B, g, S * B.t() @ g, S * g @ A.t()  # LoRA's gradients g_A = s Bᵀg, g_B = s g Aᵀ


def test_equivalent_gradient_is_the_closest_to_the_full_gradient():
    """Theorem 2.1: s(B g̃_A + g̃_B A) is the least-squares fit of g over all (dA, dB)."""
    A, B, g, gA, gB = problem()
    new_A, new_B = lora_pro_gradients(A, B, gA, gB, S, delta=0.0)
    ours = S * (B @ new_A + new_B @ A)
    # The same fit by brute force: vec(s(B dA + dB A)) = M [vec dA; vec dB], solved by lstsq.
    cols = []
    for i in range(R * K):
        dA = torch.zeros(R * K, dtype=torch.float64)
        dA[i] = 1
        cols.append((S * B @ dA.view(R, K)).flatten())
    for i in range(N * R):
        dB = torch.zeros(N * R, dtype=torch.float64)
        dB[i] = 1
        cols.append((S * dB.view(N, R) @ A).flatten())
    M = torch.stack(cols, 1)
    fit = (M @ torch.linalg.lstsq(M, g.flatten()[:, None]).solution).view(N, K)
    assert rel_err(ours, fit) < 1e-10
    # Every choice of X gives the same equivalent gradient.
    for x_mode in ("symmetry", "zero"):
        a, b = lora_pro_gradients(A, B, gA, gB, S, x_mode=x_mode, delta=0.0)
        assert rel_err(S * (B @ a + b @ A), fit) < 1e-10


def test_sylvester_x_keeps_the_gradients_closest_to_lora_s():
    """Theorem 2.2: among g̃_A = c_A + X A, g̃_B = c_B − B X, the Sylvester X minimises
    ‖g̃_A − g_A‖² + ‖g̃_B − g_B‖² (checked against the least-squares X)."""
    A, B, g, gA, gB = problem(1)
    cA, cB = lora_pro_gradients(A, B, gA, gB, S, x_mode="zero", delta=0.0)
    new_A, new_B = lora_pro_gradients(A, B, gA, gB, S, delta=0.0)
    X = (new_A - cA) @ torch.linalg.pinv(A)
    assert rel_err(new_B, cB - B @ X) < 1e-10
    # min over X of ‖cA + X A − gA‖² + ‖cB − B X − gB‖²: linear least squares in vec(X).
    cols, rhs = [], torch.cat([(gA - cA).flatten(), (gB - cB).flatten()])
    for i in range(R * R):
        E = torch.zeros(R * R, dtype=torch.float64)
        E[i] = 1
        E = E.view(R, R)
        cols.append(torch.cat([(E @ A).flatten(), (-B @ E).flatten()]))
    best = torch.linalg.lstsq(torch.stack(cols, 1), rhs[:, None]).solution.view(R, R)
    assert rel_err(X, best) < 1e-8
    # The Sylvester equation itself: BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ.
    BtB, AAt = B.t() @ B, A @ A.t()
    rhs = -(1 / S**2) * torch.linalg.inv(BtB) @ gA @ A.t()
    assert rel_err(BtB @ X + X @ AAt, rhs) < 1e-10
    P = torch.randn(4, 4, dtype=torch.float64)
    Q = torch.randn(4, 4, dtype=torch.float64)
    C = torch.randn(4, 4, dtype=torch.float64)
    Y = solve_sylvester_spd(P @ P.t(), Q @ Q.t(), C)
    assert rel_err(P @ P.t() @ Y + Y @ Q @ Q.t(), C) < 1e-10


def test_zero_b_at_lora_init_is_finite():
    A, B, g, gA, gB = problem(2)
    B = torch.zeros_like(B)
    new_A, new_B = lora_pro_gradients(A.float(), B.float(), (S * B.t() @ g).float(), (S * g @ A.t()).float(), S)
    assert torch.isfinite(new_A).all() and torch.isfinite(new_B).all()
    # With B = 0 the best fit is dB = g Aᵀ(AAᵀ)⁻¹ / s, dA = 0.
    assert rel_err(new_B.double(), g @ A.t() @ torch.linalg.inv(A @ A.t()) / S) < 1e-5
    assert new_A.abs().max() == 0


def test_wrapper_adjusts_then_steps():
    torch.manual_seed(0)
    model = lk.convert(nn.Sequential(nn.Linear(K, N), nn.Tanh(), nn.Linear(N, 9)), rank=R, alpha=2 * R)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
    ref = copy.deepcopy(model)
    opt = lk.optim.LoRAPro(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, K)
    for _ in range(2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
        with torch.no_grad():
            for layer in (ref[0], ref[2]):
                a, b = lora_pro_gradients(layer.lora_A.double(), layer.lora_B.double(), layer.lora_A.grad.double(),
                                          layer.lora_B.grad.double(), layer.scaling)
                layer.lora_A.grad.copy_(a)
                layer.lora_B.grad.copy_(b)
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p, q) < 1e-5
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="does not hold"):
        lk.optim.LoRAPro(torch.optim.SGD([model[0].lora_A], lr=1.0), model)
    with pytest.raises(ValueError, match="x_mode"):
        lk.optim.LoRAPro(torch.optim.SGD(model.parameters(), lr=1.0), model, x_mode="best")
    with pytest.raises(ValueError, match="no LoRA layer"):
        lk.optim.LoRAPro(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), nn.Linear(2, 2))


def sylvester_kron(P, Q, C):
    """X with P X + X Q = C by the Kronecker form (I ⊗ P + Qᵀ ⊗ I) vec(X) = vec(C), column-major."""
    r = P.shape[0]
    eye = torch.eye(r, dtype=P.dtype)
    M = torch.kron(eye, P) + torch.kron(Q.t().contiguous(), eye)
    return torch.linalg.solve(M, C.t().reshape(-1)).reshape(r, r).t()


def full_mode_reference(A, B, W, gA, gB, s, state, lr, wd, betas=(0.9, 0.999), eps=1e-8, delta=1e-8):
    """The reference code's step_full for one layer, written out in float64."""
    r = A.shape[0]
    I_r, I_n = torch.eye(r, dtype=A.dtype), torch.eye(B.shape[0], dtype=A.dtype)
    AAt_inv = torch.linalg.pinv(A @ A.t() + delta * I_r)
    BtB_inv = torch.linalg.pinv(B.t() @ B + delta * I_r)
    ga = BtB_inv @ gA / s**2
    gb = (I_n - B @ BtB_inv @ B.t()) @ gB @ AAt_inv / s**2
    g = s * B @ ga + s * gb @ A
    state["t"] += 1
    state["m"] = betas[0] * state["m"] + (1 - betas[0]) * g
    state["v"] = betas[1] * state["v"] + (1 - betas[1]) * g * g
    t = state["t"]
    u = (state["m"] / (1 - betas[0]**t)) / (state["v"].sqrt() / math.sqrt(1 - betas[1]**t) + eps)
    gA_o, gB_o = s * B.t() @ u, s * u @ A.t()
    X = sylvester_kron(B.t() @ B, A @ A.t(), -(1 / s**2) * BtB_inv @ gA_o @ A.t())
    new_A = BtB_inv @ gA_o / s**2 + X @ A
    new_B = (I_n - B @ BtB_inv @ B.t()) @ gB_o @ AAt_inv / s**2 - B @ X
    shrink = math.sqrt(1 - lr * wd)
    return A * shrink - lr * new_A, B * shrink - lr * new_B, W * (1 - lr * wd)


def test_full_mode_matches_the_reference_algorithm_float64():
    torch.manual_seed(1)
    model = lk.convert(nn.Sequential(nn.Linear(K, N)), rank=R, alpha=2 * R)
    with torch.no_grad():
        model[0].lora_B.normal_()
    layer = model[0]
    lr, wd = 1e-2, 0.1
    opt = lk.optim.LoRAProAdamW(model, lr=lr, weight_decay=wd)
    A, B, W = (t.detach().double().clone() for t in (layer.lora_A, layer.lora_B, layer.weight))
    state = {"t": 0, "m": torch.zeros(N, K, dtype=torch.float64), "v": torch.zeros(N, K, dtype=torch.float64)}
    x = torch.randn(8, K)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        gA, gB = layer.lora_A.grad.double(), layer.lora_B.grad.double()
        A, B, W = full_mode_reference(A, B, W, gA, gB, layer.scaling, state, lr, wd)
        opt.step()
        assert rel_err(layer.lora_A, A) < 1e-5 and rel_err(layer.lora_B, B) < 1e-5
        assert rel_err(layer.weight, W) < 1e-6
        # The closed form works from the float64-refreshed factors next step, as the layer does.
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            layer.weight.copy_(W)
    assert opt.state[layer.lora_A]["exp_avg"].shape == (N, K)
    with pytest.raises(ValueError, match="no LoRA layer"):
        lk.optim.LoRAProAdamW(nn.Linear(2, 2))
