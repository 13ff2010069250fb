"""Three-factor adapters on the fused LoRA op: LoRA-SB (nn/lora_sb.py, the r×r core between frozen
A and B) and NLoRA (nn/nlora.py, all three factors train), forward and gradients against float64,
and their initialisations against the formulas (LoRA-SB's paper, NLoRA's reference code)."""

import copy

import pytest
import torch
from _helpers import DEVICE, assert_close, rel_err
from torch import nn

import lowrank_kernels as lk


def float64_forward(layer, x):
    W, b = layer.weight.double(), layer.bias.double()
    A, B = layer.lora_sb_A.double(), layer.lora_sb_B.double()
    R = layer.lora_sb_R.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y = x64 @ W.t() + b + layer.scaling * (x64 @ A.t() @ R.t() @ B.t())
    return y, x64, R


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_and_grads_match_float64(backend):
    lin = nn.Linear(40, 33, device=DEVICE)
    layer = lk.LowRankLinear.from_linear(lin, method="lora_sb", rank=3, backend=backend)
    assert layer.scaling == 1.0 and layer.rank == 3  # the reference code's alpha = r
    with torch.no_grad():
        layer.lora_sb_R.copy_(torch.randn(3, 3) * 2.0)  # adapter term as large as the base's
    x = torch.randn(37, 40, device=DEVICE).t().contiguous().t().requires_grad_(True)  # non-contiguous input
    y = layer(x)
    ref, x64, R64 = float64_forward(layer, x)
    assert_close(y - lin(x), ref - x64 @ lin.weight.double().t() - lin.bias.double(), torch.float32, "adapter term")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    assert_close(x.grad, x64.grad, torch.float32, "dx")
    assert_close(layer.lora_sb_R.grad, R64.grad, torch.float32, "dR")
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_sb_R"]
    assert layer.num_parameters(trainable_only=True) == 9


def test_default_init_keeps_the_base_output_and_checkpoints():
    base = nn.Sequential(nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 21))
    model = lk.convert(copy.deepcopy(base), method="lora_sb", rank=4)
    x = torch.randn(5, 40)
    assert not model[0].lora_sb_R.any() and rel_err(model(x), base(x)) < 1e-6
    A = model[0].lora_sb_A
    assert torch.allclose(A @ A.t(), torch.eye(4), atol=1e-5)
    with torch.no_grad():
        model[0].lora_sb_R.normal_()
    sd = lk.adapter_state_dict(model)
    assert {"0.lora_sb_A", "0.lora_sb_B", "0.lora_sb_R"} <= set(sd)
    merged = lk.merge_and_unload(copy.deepcopy(model))
    assert rel_err(merged(x), model(x)) < 1e-5
    fresh = lk.convert(nn.Sequential(nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 21)), method="lora_sb", rank=4)
    lk.load_adapter_state_dict(fresh, sd)
    assert torch.equal(fresh[0].lora_sb_A, model[0].lora_sb_A) and torch.equal(fresh[0].lora_sb_R, model[0].lora_sb_R)
    with pytest.raises(ValueError, match="rank <= min"):
        lk.LowRankLinear.from_linear(nn.Linear(40, 3), method="lora_sb", rank=4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(40, 33)
        self.down = nn.Linear(33, 21)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


@pytest.mark.parametrize("update", ["adam", "sgd"])
def test_calibrated_init_is_the_best_rank_r_first_update(update):
    base = Net()
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(6, 40, generator=gen), torch.randn(6, 21, generator=gen)) for _ in range(3)]
    lr, r = 1e-3, 4
    # The reference: float64 gradients of the base model, summed over the batches.
    ref = copy.deepcopy(base).double()
    for inp, target in data:
        mse(ref, (inp.double(), target.double())).backward()
    model = lk.convert(copy.deepcopy(base), method="lora_sb", rank=r, alpha=2 * r)
    W_before = model.up.weight.detach().clone()
    lk.nn.calibrate(model, data, init="lora_sb", loss_fn=mse, lr=lr, update=update)
    assert torch.equal(model.up.weight, W_before)  # LoRA-SB leaves W as it is
    for name in ("up", "down"):
        G = getattr(ref, name).weight.grad
        delta = -lr * (torch.sign(G) if update == "adam" else G / len(data))
        U, S, Vh = torch.linalg.svd(delta)
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        layer = getattr(model, name)
        assert layer.scaling == 2.0
        assert rel_err(layer.scaling * layer.lora_sb_B @ layer.lora_sb_R @ layer.lora_sb_A, best) < 1e-5
        R = layer.lora_sb_R.detach()
        assert rel_err(R, torch.diag(torch.diagonal(R))) < 1e-7  # R = diag(S_r) / s
        A = layer.lora_sb_A
        assert torch.allclose(A @ A.t(), torch.eye(r), atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="lr must be a positive number"):
        lk.nn.calibrate(model, data, init="lora_sb", loss_fn=mse)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nlora_init_forward_and_grads(backend):
    lin = nn.Linear(40, 33, device=DEVICE)
    W0 = lin.weight.detach().clone()
    layer = lk.LowRankLinear.from_linear(lin, method="nlora", rank=3, backend=backend)
    # The reference code's Nyström blocks; W is left as it was.
    assert torch.equal(layer.lora_A, W0[:3]) and torch.equal(layer.lora_N, W0[:3, :3])
    assert torch.equal(layer.lora_B, W0[:, :3]) and torch.equal(layer.weight, W0)
    assert layer.scaling == 8 / 3
    with torch.no_grad():
        layer.lora_B.mul_(30.0)  # adapter term as large as the base's
    x = torch.randn(37, 40, device=DEVICE).t().contiguous().t().requires_grad_(True)
    y = layer(x)
    A, N, B = (t.detach().double().requires_grad_(True) for t in (layer.lora_A, layer.lora_N, layer.lora_B))
    x64 = x.detach().double().requires_grad_(True)
    delta = layer.scaling * (x64 @ A.t() @ N.t() @ B.t())
    assert_close(y - lin(x), delta, torch.float32, "adapter term")
    dy = torch.randn_like(y)
    y.backward(dy)
    (delta + x64 @ W0.double().t()).backward(dy.double())
    for name, ours, ref in (("dx", x.grad, x64.grad), ("dA", layer.lora_A.grad, A.grad),
                            ("dN", layer.lora_N.grad, N.grad), ("dB", layer.lora_B.grad, B.grad)):
        assert_close(ours, ref, torch.float32, name)
    merged = layer.merged_weight()
    assert rel_err(merged, W0 + layer.scaling * layer.lora_B @ layer.lora_N @ layer.lora_A) < 1e-6
