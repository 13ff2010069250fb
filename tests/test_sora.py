"""SoRA (nn/sora.py, optim/sora.py): the gated LoRA layer on the fused op against float64, the
proximal gate step against the paper's soft threshold, and pruning to plain LoRA."""

import copy
import math

import pytest
import torch
from _helpers import DEVICE, assert_close, rel_err
from torch import nn

import lowrank_kernels as lk


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_and_grads_match_float64(backend):
    lin = nn.Linear(40, 33, device=DEVICE)
    layer = lk.LowRankLinear.from_linear(lin, method="sora", rank=3, backend=backend)
    assert layer.scaling == 16 / 3  # the reference code's alpha = 16
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.sora_gate[1] = 0.0
    x = torch.randn(37, 40, device=DEVICE).t().contiguous().t().requires_grad_(True)
    y = layer(x)
    A, B, g = (t.detach().double().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.sora_gate))
    x64 = x.detach().double().requires_grad_(True)
    delta = layer.scaling * (((x64 @ A.t()) * g) @ B.t())
    assert_close(y - lin(x), delta, torch.float32, "adapter term")
    dy = torch.randn_like(y)
    y.backward(dy)
    (delta + x64 @ lin.weight.double().t()).backward(dy.double())
    for name, ours, ref in (("dx", x.grad, x64.grad), ("dA", layer.lora_A.grad, A.grad),
                            ("dB", layer.lora_B.grad, B.grad), ("dgate", layer.sora_gate.grad, g.grad)):
        assert_close(ours, ref, torch.float32, name)
    assert rel_err(layer.merged_weight(), lin.weight + delta_weight(layer)) < 1e-6


def delta_weight(layer):
    return layer.scaling * layer.lora_B @ (layer.sora_gate[:, None] * layer.lora_A)


def test_gate_optimizer_is_adamw_then_soft_threshold():
    torch.manual_seed(0)
    gate = nn.Parameter(torch.randn(6))
    grads = [torch.randn(6) for _ in range(3)]
    lam, lr, (b1, b2), eps, wd = 0.05, 0.1, (0.9, 0.999), 1e-6, 0.01
    opt = lk.optim.SoRAAdamW([gate], sparse_lambda=lam, lr=lr, weight_decay=wd)
    ref = gate.detach().double().clone()
    m = torch.zeros(6, dtype=torch.float64)
    v = torch.zeros(6, dtype=torch.float64)
    for t, grad in enumerate(grads, 1):
        gate.grad = grad.clone()
        opt.step()
        g = grad.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        z = ref - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps) - lr * wd * ref
        ref = torch.sign(z) * torch.clamp(z.abs() - lam, min=0)  # T_λ, the L1 proximal operator
        assert rel_err(gate.detach(), ref) < 1e-6
    big = nn.Parameter(torch.tensor([0.5, -0.08, 0.02, -2.0]))
    big.grad = torch.zeros(4)
    lk.optim.SoRAAdamW([big], sparse_lambda=0.1).step()
    assert big.tolist()[1:3] == [0.0, 0.0] and abs(big[0].item() - 0.4) < 1e-6  # exact zeros, shrink by λ
    with pytest.raises(ValueError, match="sparse_lambda"):
        lk.optim.SoRAAdamW([big], sparse_lambda=-1.0)


def test_prune_to_plain_lora_of_the_surviving_rank():
    model = lk.convert(nn.Sequential(nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 21), nn.Tanh(), nn.Linear(21, 5)),
                       method="sora", rank=4)
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.lora_B.normal_()
        model[0].sora_gate[torch.tensor([0, 2])] = 0.0
        model[4].sora_gate.zero_()
    assert len(lk.nn.sora_gates(model)) == 3
    x = torch.randn(6, 40)
    before = model(x)
    W4 = model[4].weight
    pruned = lk.nn.prune_sora(model)
    assert rel_err(pruned(x), before) < 1e-6
    assert pruned[0].method == "lora" and pruned[0].rank == 2 and pruned[2].rank == 4
    assert type(pruned[4]) is nn.Linear and pruned[4].weight is W4 and not W4.requires_grad
    assert pruned[0].lora_A.requires_grad and not pruned[0].weight.requires_grad
    merged = lk.merge_and_unload(copy.deepcopy(pruned))
    assert rel_err(merged(x), before) < 1e-5
    with pytest.raises(ValueError, match="no SoRA layer"):
        lk.nn.prune_sora(pruned)
