"""LowRankLinear(method="vera" | "randlora"), convert() with shared bases, and from_peft parity with PEFT."""

import copy
import io

import pytest
import torch
from _helpers import DEVICE, assert_close
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.ops import random_basis as rb

METHODS = ["vera", "randlora"]


class Net(nn.Module):
    """Targets "a" (in < out) and "b" (in > out) of different shapes; "c" stays plain."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(24, 40)
        self.b = nn.Linear(40, 16)
        self.c = nn.Linear(16, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _perturb(model):
    """Move the trainable scales off their init (λ_b = 0 / λ = 0 would hide the adapter)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 0.1))


def _ref_layer(layer, x):
    """The layer recomputed with the op's float64 reference from its own tensors."""
    seed = layer._method.basis_seed(layer)
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    if layer.method == "vera":
        return rb.vera_linear_reference(x.double(), d(layer.weight), d(layer.vera_A), d(layer.vera_B),
                                        d(layer.vera_lambda_d), d(layer.vera_lambda_b), d(layer.bias),
                                        basis_seed=seed, basis_scale=layer.basis_scale)
    return rb.randlora_linear_reference(x.double(), d(layer.weight), d(layer.randlora_A), d(layer.randlora_B),
                                        d(layer.randlora_lambda), d(layer.randlora_gamma), layer.scaling,
                                        d(layer.bias), basis_seed=seed)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bases", ["stored", "seeded"])
def test_layer_init_forward_merge(method, bases):
    linear = nn.Linear(30, 12, device=DEVICE)
    layer = lk.LowRankLinear.from_linear(linear, method=method, rank=4, alpha=8, bases=bases)
    assert layer.weight is linear.weight and not layer.weight.requires_grad
    x = torch.randn(5, 30, device=DEVICE)
    # PEFT's init: the update starts at zero.
    torch.testing.assert_close(layer(x), linear(x))
    if method == "vera":
        assert torch.all(layer.vera_lambda_d == 0.1) and torch.all(layer.vera_lambda_b == 0)
    else:
        assert torch.all(layer.randlora_lambda == 0)
        assert torch.allclose(layer.randlora_gamma, torch.full_like(layer.randlora_gamma, 1 / 12))
    if bases == "seeded":
        assert layer._buffers[layer._method.basis_names[0]] is None
    _perturb(layer)
    y = layer(x)
    assert_close(y, _ref_layer(layer, x), torch.float32)
    assert (y - linear(x)).abs().max() > 1e-3
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_triton_backend_module_matches_reference(method):
    torch.manual_seed(1)
    ref = lk.convert(Net(), method=method, rank=3, alpha=6, target_modules=["a", "b"], dropout=0.0)
    _perturb(ref)
    tri = copy.deepcopy(ref)
    for m in tri.modules():
        if isinstance(m, lk.LowRankLinear):
            m.backend = "triton"
    x = torch.randn(6, 24, device=DEVICE)
    y_ref, y_tri = ref(x), tri(x)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [p for p in ref.parameters() if p.requires_grad])
    g_tri = torch.autograd.grad(y_tri.square().sum(), [p for p in tri.parameters() if p.requires_grad])
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_convert_shares_one_pair_of_bases(method):
    model = lk.convert(Net(), method=method, rank=4, target_modules=["a", "b"], projection_prng_key=5)
    a, b = model.a, model.b
    names = a._method.basis_names
    for name in names:
        assert getattr(a, name) is getattr(b, name), f"{name} is not shared"
    # Sized for the largest layer, as PEFT does: in 40 (b), out 40 (a).
    if method == "vera":
        assert a.vera_A.shape == (4, 40) and a.vera_B.shape == (40, 4)
    else:
        assert a.randlora_A.shape == (4, 1, 40) and a.randlora_B.shape == (40, 10, 4)
    # Regenerated from the key, so not saved: a fresh conversion with the key loads the state.
    state = model.state_dict()
    assert not any(k.endswith(names[0]) or k.endswith(names[1]) for k in state)
    _perturb(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = lk.convert(Net(), method=method, rank=4, target_modules=["a", "b"], projection_prng_key=5)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(3, 24, device=DEVICE)
    torch.testing.assert_close(fresh(x), model(x))
    only = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.split(".")[-1] in ("vera_lambda_d", "vera_lambda_b", "randlora_lambda", "randlora_gamma")
               for n in only)


@pytest.mark.parametrize("method", METHODS)
def test_convert_seeded_bases_cost_no_memory_and_merge_and_unload(method):
    model = lk.convert(Net(), method=method, rank=4, target_modules=["a", "b"], bases="seeded")
    assert all(b is None for m in (model.a, model.b) for b in (m._buffers[n] for n in m._method.basis_names))
    _perturb(model)
    x = torch.randn(3, 24, device=DEVICE)
    y = model(x)
    h = torch.relu(_ref_layer(model.a, x)).float()
    assert_close(model.b(h), _ref_layer(model.b, h), torch.float32)
    merged = lk.merge_and_unload(copy.deepcopy(model))
    assert type(merged.a) is nn.Linear
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_bad_options():
    with pytest.raises(ValueError, match="bases"):
        lk.LowRankLinear(8, 4, 2, method="vera", bases="dense")
    with pytest.raises(ValueError, match="projection_prng_key"):
        lk.LowRankLinear(8, 4, 2, method="randlora", projection_prng_key=-1)
    with pytest.raises(ValueError, match="vera_B"):
        lk.LowRankLinear(8, 4, 2, method="vera", vera_A=torch.randn(2, 8))
    with pytest.raises(TypeError, match="adapter_dtype"):
        lk.LowRankLinear(8, 4, 2, method="vera", adapter_dtype=torch.float16)


# ----------------------------------------------------------------------------------------------
# PEFT parity: from_peft on a PEFT model, and convert() with PEFT's key, against PEFT itself
# ----------------------------------------------------------------------------------------------
def _peft_config(method):
    if method == "vera":
        from peft import VeraConfig

        return VeraConfig(r=4, target_modules=["a", "b"], projection_prng_key=3)
    from peft import RandLoraConfig

    return RandLoraConfig(r=4, target_modules=["a", "b"], projection_prng_key=3, randlora_alpha=8)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_peft_parity_over_optimizer_steps(method, backend):
    """from_peft(PEFT model) and convert(model, key=PEFT's key) train exactly as PEFT does."""
    from peft import get_peft_model

    torch.manual_seed(0)
    base = Net()
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config(method))
    fused = lk.from_peft(copy.deepcopy(peft_model), backend=backend)
    ours = lk.convert(copy.deepcopy(base), method=method, rank=4, alpha=8 if method == "randlora" else None,
                      target_modules=["a", "b"], projection_prng_key=3, backend=backend)
    models = {"peft": peft_model, "from_peft": fused, "convert": ours}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for k, m in models.items()}
    for step in range(3):
        x = torch.randn(5, 24)
        outs = {}
        for k, m in models.items():
            y = m(x)
            opts[k].zero_grad()
            y.square().sum().backward()
            outs[k] = y.detach()
        for k in ("from_peft", "convert"):
            torch.testing.assert_close(outs[k], outs["peft"], rtol=1e-5, atol=1e-6, msg=f"{k} output, step {step}")
            for name, p in _trainable(models[k]).items():
                torch.testing.assert_close(p.grad, _trainable(peft_model)[name].grad, rtol=1e-4, atol=1e-6,
                                           msg=f"{k} grad of {name}, step {step}")
        for opt in opts.values():
            opt.step()
    for k in ("from_peft", "convert"):
        for name, p in _trainable(models[k]).items():
            torch.testing.assert_close(p, _trainable(peft_model)[name], rtol=1e-5, atol=1e-6, msg=f"{k} {name}")


def _trainable(model):
    """Trainable parameters by (layer, PEFT name): "a.vera_lambda_d", ... whatever the wrapping."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = [q for q in name.split(".") if q not in ("base_model", "model", "default")]
            out[".".join(parts)] = p
    return out


@pytest.mark.parametrize("method", METHODS)
def test_from_peft_honours_disable_merge_and_eval_dropout(method):
    from peft import get_peft_model

    torch.manual_seed(0)
    cfg = _peft_config(method)
    setattr(cfg, "vera_dropout" if method == "vera" else "randlora_dropout", 0.3)
    peft_model = get_peft_model(Net(), cfg)
    _perturb(peft_model)
    fused = lk.from_peft(copy.deepcopy(peft_model))
    x = torch.randn(4, 24)
    peft_model.eval()
    fused.eval()
    torch.testing.assert_close(fused(x), peft_model(x), rtol=1e-5, atol=1e-6)
    with fused.disable_adapter(), peft_model.disable_adapter():
        torch.testing.assert_close(fused(x), peft_model(x))
    fused.merge_adapter()
    torch.testing.assert_close(fused(x), peft_model(x), rtol=1e-5, atol=1e-5)
    fused.unmerge_adapter()
    # Training mode with dropout: the package's mask, so only the shape and finiteness are comparable.
    fused.train()
    y = fused(x)
    assert y.shape == (4, 8) and torch.isfinite(y).all()
