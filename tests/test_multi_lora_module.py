"""Front-ends of multi_lora_linear: LowRankLinear(method="multi_lora"), convert, adapter_context,
TopKRouter, and PEFT's mixed-adapter batches / several active adapters through from_peft."""

import copy

import pytest
import torch
from _helpers import DEVICE, assert_close, rel_err
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.nn.multi_lora import TopKRouter, adapter_context

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def multi_model(n=3, backend="reference", rank=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 7)).to(DEVICE)
    lk.convert(model, method="multi_lora", rank=rank, adapters=n, backend=backend)
    for m in model.modules():
        if isinstance(m, lk.LowRankLinear):
            nn.init.normal_(m.lora_B, std=0.3)  # B = 0 at init would hide the adapters' terms
    return model


def single_adapter_copy(model, a):
    """The same network with plain LoRA layers holding adapter a's weights."""
    single = copy.deepcopy(model)
    for name, m in list(single.named_modules()):
        if isinstance(m, lk.LowRankLinear):
            lin = nn.Linear(m.in_features, m.out_features, device=DEVICE)
            lin.weight, lin.bias = m.weight, m.bias
            lora = lk.LowRankLinear.from_linear(lin, method="lora", rank=m.rank, alpha=m.alpha, backend="reference")
            with torch.no_grad():
                lora.lora_A.copy_(m.lora_A[a])
                lora.lora_B.copy_(m.lora_B[a])
            single._modules[name] = lora
    return single


def test_module_and_convert_options():
    m = lk.LowRankLinear(10, 6, rank=4, method="multi_lora", adapters=5, device=DEVICE)
    assert m.lora_A.shape == (5, 4, 10) and m.lora_B.shape == (5, 6, 4) and not m.lora_B.any()
    assert m.scaling == 8 / 4 and not m.weight.requires_grad
    assert "adapters=5" in repr(m)
    with pytest.raises(RuntimeError, match="adapter_context"):
        m(torch.randn(2, 10, device=DEVICE))
    with pytest.raises(ValueError, match="adapters"):
        lk.LowRankLinear(10, 6, method="multi_lora", adapters=0)
    with pytest.raises(ValueError, match="no multi_lora layers"):
        with adapter_context(nn.Linear(3, 3), torch.zeros(1, dtype=torch.int64)):
            pass
    with pytest.raises(ValueError, match="one update per adapter"):
        m.merge()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_equals_separate_runs(backend):
    """One batch of samples on three adapters (and one on the base): every adapter's gradients
    equal those of that adapter trained alone on its samples (loss summed over samples)."""
    model = multi_model(backend=backend)
    x = torch.randn(7, 5, 12, device=DEVICE)  # 7 samples of 5 tokens
    index = torch.tensor([0, 2, 1, 0, -1, 2, 0], device=DEVICE)
    with adapter_context(model, index):
        y = model(x)
    loss = (y * torch.linspace(-1, 1, 7, device=DEVICE)[:, None, None]).square().sum()
    loss.backward()
    layers = [m for m in model.modules() if isinstance(m, lk.LowRankLinear)]
    for a in range(3):
        single = single_adapter_copy(model, a)
        rows = (index == a).nonzero().squeeze(1)
        y_a = single(x[rows])
        assert_close(y[rows], y_a, torch.float32, f"adapter {a} output")
        (y_a * torch.linspace(-1, 1, 7, device=DEVICE)[rows, None, None]).square().sum().backward()
        for m, s in zip(layers, [m for m in single.modules() if isinstance(m, lk.LowRankLinear)]):
            assert_close(m.lora_A.grad[a], s.lora_A.grad, torch.float32, f"dA[{a}]")
            assert_close(m.lora_B.grad[a], s.lora_B.grad, torch.float32, f"dB[{a}]")
    # sample 4 (index -1): the base alone
    with adapter_context(model, torch.tensor([-1], device=DEVICE)):
        assert_close(y[4:5], model(x[4:5]), torch.float32, "index -1")
    assert_close(y[4:5], nn.functional.linear(nn.functional.gelu(nn.functional.linear(
        x[4:5], model[0].weight, model[0].bias)), model[2].weight, model[2].bias), torch.float32, "base")


def test_router_mixture_matches_weighted_sum_and_trains_the_gate():
    """X-LoRA-style: a top-2 router over 4 adapters on the input; each token's output is the
    router-weighted sum of its two adapters' terms, and the gate receives a gradient."""
    torch.manual_seed(1)
    layer = lk.LowRankLinear(12, 9, rank=2, method="multi_lora", adapters=4, backend="reference", device=DEVICE)
    nn.init.normal_(layer.lora_B)
    router = TopKRouter(12, 4, k=2, device=DEVICE)
    x = torch.randn(3, 5, 12, device=DEVICE)
    index, weight = router(x)
    with adapter_context(layer, index, weight):
        y = layer(x)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    per_adapter = torch.stack([(x @ layer.lora_A[a].t()) @ layer.lora_B[a].t() for a in range(4)], 2)
    chosen = per_adapter.gather(2, index[..., None].expand(3, 5, 2, 9))
    terms = (weight[..., None] * chosen).sum(2) * layer.scaling
    assert_close(y - base, terms, torch.float32, "mixture term")
    y.square().sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_hf_model_per_sample_adapters():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE)
    lk.convert(model, method="multi_lora", rank=2, adapters=3, target_modules=["q_proj", "v_proj"],
               backend="reference")
    for m in model.modules():
        if isinstance(m, lk.LowRankLinear):
            nn.init.normal_(m.lora_B)
    ids = torch.randint(0, 50, (3, 6), device=DEVICE)
    with adapter_context(model, torch.tensor([2, 0, -1], device=DEVICE)):
        logits = model(ids).logits
    for row, a in enumerate((2, 0, -1)):
        with adapter_context(model, torch.tensor([a], device=DEVICE)):
            alone = model(ids[row:row + 1]).logits
        assert rel_err(logits[row:row + 1], alone) <= 1e-5


def peft_two_adapters():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(17, 33), nn.GELU(), nn.Linear(33, 9)).to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["0"]))
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            p.requires_grad_(True)  # PEFT trains the active adapter only; here both are checked
    return model


def grads_of(model, x, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    y = model(x, **kwargs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if "lora_" in n])
    return y.detach(), dict(zip(("x",) + names, torch.autograd.grad(y, (x, *params), dy, allow_unused=True)))


@pytest.mark.parametrize("backend", [None, "triton"])
def test_peft_mixed_batch_matches_peft(backend, monkeypatch):
    import lowrank_kernels.nn.peft.multi_lora as nml
    calls = []
    monkeypatch.setattr(nml, "multi_lora_linear", lambda *a, **k: calls.append(1) or lk.multi_lora_linear(*a, **k))
    reference = peft_two_adapters()
    ours = lk.from_peft(copy.deepcopy(reference), backend=backend)
    x = torch.randn(5, 17, device=DEVICE)
    names = ["default", "other", "__base__", "other", "default"]
    reference.eval()  # PEFT takes adapter_names in eval mode only
    ours.eval()
    y_p, g_p = grads_of(reference, x, adapter_names=names)
    y_o, g_o = grads_of(ours, x, adapter_names=names)
    assert rel_err(y_o, y_p) <= 1e-5
    for name in g_p:
        if g_p[name] is None:
            assert g_o[name] is None or not g_o[name].any(), name
        else:
            assert rel_err(g_o[name], g_p[name]) <= 1e-5, name
    assert len(calls) == 2  # both layers ran the fused op


def test_peft_several_active_adapters_match_peft():
    reference = peft_two_adapters()
    ours = lk.from_peft(copy.deepcopy(reference))
    for m in (reference, ours):
        m.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 3, 17, device=DEVICE)
    y_p, g_p = grads_of(reference, x)
    y_o, g_o = grads_of(ours, x)
    assert rel_err(y_o, y_p) <= 1e-5
    for name in g_p:
        assert rel_err(g_o[name], g_p[name]) <= 1e-5, name


def test_peft_per_adapter_save_and_load(tmp_path):
    """Adapters of a fused PEFT model save and load one at a time in PEFT's own format."""
    ours = lk.from_peft(peft_two_adapters())
    ours.save_pretrained(str(tmp_path), selected_adapters=["other"])
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(17, 33), nn.GELU(), nn.Linear(33, 9)).to(DEVICE)
    fresh = peft.PeftModel.from_pretrained(base, str(tmp_path / "other"), adapter_name="other")
    saved = {k: v for k, v in ours.state_dict().items() if ".other." in k}
    loaded = fresh.state_dict()
    assert saved and all(torch.equal(v, loaded[k]) for k, v in saved.items())
