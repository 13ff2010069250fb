"""SVFit, LoLDU (frozen factor bases, trainable diagonal, on the VeRA product) and KaSA (truncation
plus a LoRA with a diagonal): factorisations, forward and every gradient against float64
references of the papers' formulas, merge_and_unload, convert and state_dict round trips."""

import copy

import pytest
import torch
from _helpers import DEVICE, assert_close

import lowrank_kernels as lk
from lowrank_kernels.nn import LowRankLinear
from lowrank_kernels.nn.spectral import kasa_regularization

M, K, N, R = 37, 40, 33, 3


def _layer(method, dtype=torch.float32, backend="reference", rank=R, **options):
    lin = torch.nn.Linear(K, N, device=DEVICE).to(dtype)
    W0 = lin.weight.detach().double().clone()
    return LowRankLinear.from_linear(lin, method=method, rank=rank, backend=backend, **options), W0


def test_svfit_factors_and_residual():
    layer, W0 = _layer("svfit")
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    top = (U[:, :R] * S[:R]) @ Vh[:R]
    delta = layer._method.delta_weight(layer).double()
    assert_close(delta, top, torch.float32, "U_r Σ_r V_rᵀ")
    assert_close(layer.weight.double(), W0 - top, torch.float32, "residual W − U_r Σ_r V_rᵀ")
    assert_close(layer.spectral_sigma.double(), S[:R], torch.float32, "trainable singular values")
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["spectral_sigma"]


def test_loldu_factors_and_residual():
    """The reference code's ldu init: W = P L D U, ΔW = (α/r) · P L_r diag(D_r) U_r, W keeps the rest."""
    layer, W0 = _layer("loldu", alpha=2.0)
    P, L, Uf = torch.linalg.lu(W0)
    D = torch.diagonal(Uf)
    top = (2.0 / R) * P @ L[:, :R] @ torch.diag(D[:R]) @ (Uf[:R] / D[:R, None])
    assert_close(layer._method.delta_weight(layer).double(), top, torch.float32, "σ P L_r diag(z) U_r")
    assert_close(layer.weight.double(), W0 - top, torch.float32, "residual")
    assert layer.loldu_scale.item() == pytest.approx(2.0 / R)
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["loldu_scale", "spectral_sigma"]


def test_kasa_truncation():
    layer, W0 = _layer("kasa")
    S0 = torch.linalg.svdvals(W0)
    S1 = torch.linalg.svdvals(layer.weight.double())
    k = min(N, K) - R
    assert_close(S1[:k], S0[:k], torch.float32, "kept singular values")
    assert S1[k:].abs().max() < 1e-5 * S0[0]
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["kasa_diag", "lora_A", "lora_B"]


def test_kasa_matches_peft():
    """PEFT's KaSA variant (LoraConfig(kasa_config=...)): the same truncated W, the same output and
    gradients once the trained tensors are copied across, and the same auxiliary loss."""
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "KasaConfig"):
        pytest.skip("this peft has no KaSA")
    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Linear(K, N))
    theirs = peft.get_peft_model(copy.deepcopy(original),
                                 peft.LoraConfig(r=R, target_modules=["0"], kasa_config=peft.KasaConfig()))
    ours = lk.convert(copy.deepcopy(original), method="kasa", rank=R, backend="reference")
    peer, layer = theirs.base_model.model[0], ours[0]
    assert torch.equal(peer.base_layer.weight, layer.weight)
    assert peer.scaling["default"] == layer.scaling
    with torch.no_grad():
        peer.lora_B["default"].weight.normal_()
        layer.lora_A.copy_(peer.lora_A["default"].weight)
        layer.lora_B.copy_(peer.lora_B["default"].weight)
        layer.kasa_diag.copy_(peer.lora_diag["default"])
    x = torch.randn(M, K)
    y_peer, y = theirs(x), ours(x)
    assert_close(y, y_peer.detach().double(), torch.float32)
    (y_peer.square().sum() + theirs.base_model._get_kasa_loss()).backward()
    (y.square().sum() + kasa_regularization(ours)).backward()
    for mine, name in ((layer.lora_A, "lora_A"), (layer.lora_B, "lora_B")):
        assert_close(mine.grad, getattr(peer, name)["default"].weight.grad.double(), torch.float32, name)
    assert_close(layer.kasa_diag.grad, peer.lora_diag["default"].grad.double(), torch.float32, "lora_diag")
    assert kasa_regularization(ours).item() == pytest.approx(theirs.base_model._get_kasa_loss().item(), rel=1e-6)


def _float64_forward(method, layer, x):
    """The papers' y in float64 from the layer's own tensors, and its differentiable leaves."""
    W, b = layer.weight.double(), layer.bias.double()
    x64 = x.detach().double().requires_grad_()
    if method == "kasa":
        leaves = [t.detach().double().requires_grad_() for t in (layer.kasa_diag, layer.lora_A, layer.lora_B)]
        d, A, B = leaves
        y = x64 @ W.t() + b + layer.scaling * (((x64 @ A.t()) * d) @ B.t())
        return y, [x64] + leaves
    sigma = layer.spectral_sigma.detach().double().requires_grad_()
    A, B = layer.spectral_A.double(), layer.spectral_B.double()
    leaves = [x64, sigma]
    scale = 1.0
    if method == "loldu":
        scale = layer.loldu_scale.detach().double().requires_grad_()
        leaves.append(scale)
    y = x64 @ W.t() + b + scale * (((x64 @ A.t()) * sigma) @ B.t())
    return y, leaves


def _params(method, layer):
    names = {"svfit": ["spectral_sigma"], "loldu": ["spectral_sigma", "loldu_scale"],
             "kasa": ["kasa_diag", "lora_A", "lora_B"]}[method]
    return [getattr(layer, n) for n in names]


# The interpreted Triton kernels are slow: fp32 for every method, fp16 once per kernel (the VeRA
# product for SVFit and LoLDU, the LoRA one for KaSA); the reference backend in every dtype.
_CASES = ([("reference", d, m) for m in ("svfit", "loldu", "kasa") for d in (torch.float32, torch.float16)]
          + [("triton", torch.float32, m) for m in ("svfit", "loldu", "kasa")]
          + [("triton", torch.float16, m) for m in ("svfit", "kasa")])


@pytest.mark.parametrize("backend,dtype,method", _CASES)
def test_forward_and_gradients_match_float64(method, dtype, backend):
    layer, _ = _layer(method, dtype, backend, adapter_dtype=torch.float32 if dtype != torch.float32 else None)
    with torch.no_grad():
        # Trained-looking adapters, large next to the base term: a wrong adapter term cannot hide.
        for p in _params(method, layer):
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(0.5))
    x = torch.randn(M, 2 * K, device=DEVICE).to(dtype)[:, ::2].requires_grad_()
    y = layer(x)
    ref, leaves = _float64_forward(method, layer, x)
    assert_close(y - torch.nn.functional.linear(x, layer.weight, layer.bias),
                 ref - (x.double() @ layer.weight.double().t() + layer.bias.double()), dtype, "adapter term")
    assert_close(y, ref, dtype)
    dy = torch.randn_like(ref)
    y.backward(dy.to(y.dtype))
    ref.backward(dy)
    assert_close(x.grad, leaves[0].grad, dtype, "dx")
    for p, leaf in zip(_params(method, layer), leaves[1:]):
        assert_close(p.grad, leaf.grad, dtype, f"d{tuple(p.shape)}")


@pytest.mark.parametrize("method", ["svfit", "loldu", "kasa"])
def test_convert_merge_and_state_dict(method):
    torch.manual_seed(1)
    original = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.ReLU(), torch.nn.Linear(N, 20))
    x = torch.randn(M, K)
    y0 = original(x)
    model = lk.convert(copy.deepcopy(original), method=method, rank=R, backend="reference")
    if method != "kasa":
        # At creation the residual plus the frozen-basis term is the original layer.
        assert_close(model(x).detach(), y0.detach().double(), torch.float32, "output at creation")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        y = model(x)
    restored = lk.convert(copy.deepcopy(original), method=method, rank=R, backend="reference")
    restored.load_state_dict(model.state_dict())
    # An adapter-only checkpoint on a fresh conversion of the same base model: the factorisation
    # (and W's residual) are recomputed, the trained diagonal (and KaSA's factors) loaded.
    fresh = lk.convert(copy.deepcopy(original), method=method, rank=R, backend="reference")
    lk.load_adapter_state_dict(fresh, lk.adapter_state_dict(model))
    with torch.no_grad():
        assert torch.equal(restored(x), y)
        assert_close(fresh(x), y.double(), torch.float32, "adapter checkpoint")
        merged = lk.merge_and_unload(model)
        assert all(type(m) is not LowRankLinear for m in merged.modules())
        assert_close(merged(x), y.double(), torch.float32, "merged output")


def test_bad_rank():
    with pytest.raises(ValueError, match="rank <= 33"):
        _layer("svfit", rank=34)
    with pytest.raises(ValueError, match="rank <= 32"):
        _layer("kasa", rank=33)
    with pytest.raises(TypeError, match="unexpected option"):
        _layer("loldu", bases="seeded")
