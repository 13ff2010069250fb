"""LowRankLinear (LoRA), convert(), merge_and_unload() and from_peft(): the module front-end."""

import copy
import io
import logging
import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, rel_err
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.nn import registry
from lowrank_kernels.nn.lora import LoRAMethod
from lowrank_kernels.ops import _rng
from lowrank_kernels.ops.lora import lora_linear_reference

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

BACKENDS = ["reference", "triton"]


def randomize_adapters(module_or_model, generator=None):
    """Non-zero B (and a fresh A) so the adapter's term is about as large as the base's."""
    for name, p in module_or_model.named_parameters():
        if p.dim() != 2:
            continue
        with torch.no_grad():
            if "lora_A" in name:  # PEFT's init range, U(-1/sqrt(K), 1/sqrt(K))
                p.copy_((2 * torch.rand(p.shape, generator=generator) - 1) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


def float64_lora(mod, x, seed=None):
    """The module's output in float64 through the differentiable reference, and its base term."""
    p = mod.dropout if mod.training else 0.0
    args = [t.detach().double() for t in (x, mod.weight, mod.lora_A, mod.lora_B)]
    bias = None if mod.bias is None else mod.bias.detach().double()
    y = lora_linear_reference(*args, mod.scaling, bias, p, seed)
    return y, F.linear(args[0], args[1], bias)


def module_seed(generator_seed):
    """The dropout seed lora_linear draws from torch's default generator after manual_seed."""
    torch.manual_seed(generator_seed)
    return int(torch.randint(0, 2**_rng.SEED_BITS, (), dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# LowRankLinear
# ----------------------------------------------------------------------------------------------
def test_construction_and_peft_init():
    m = lk.LowRankLinear(129, 65, 3, alpha=6.0)
    assert m.weight.shape == (65, 129) and m.bias.shape == (65,)
    assert m.lora_A.shape == (3, 129) and m.lora_B.shape == (65, 3)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert m.scaling == 2.0
    assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B))
    # kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(K), 1/sqrt(K)), PEFT's lora_A init.
    bound = 1 / math.sqrt(129)
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound
    assert abs(m.lora_A.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert "rank=3" in repr(m) and "scaling=2" in repr(m)
    assert lk.LowRankLinear(8, 4, 2, bias=False).bias is None


@pytest.mark.parametrize("alpha, use_rslora, expected", [(16, False, 4.0), (16, True, 8.0), (None, False, 2.0)])
def test_scaling(alpha, use_rslora, expected):
    m = lk.LowRankLinear(12, 10, 4, alpha=alpha, use_rslora=use_rslora)
    assert m.scaling == expected
    assert m.alpha == (8.0 if alpha is None else alpha)  # PEFT's lora_alpha default


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_shares_frozen_weight_and_bias(bias):
    lin = nn.Linear(20, 12, bias=bias)
    m = lk.LowRankLinear.from_linear(lin, rank=4, alpha=8)
    assert m.weight is lin.weight and not m.weight.requires_grad
    assert m.bias is lin.bias and (m.bias is None or not m.bias.requires_grad)
    assert m.scaling == 2.0
    x = torch.randn(3, 20)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)  # B = 0: the adapter starts as a no-op


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_grads_match_float64(backend):
    m = lk.LowRankLinear(33, 17, 3, alpha=6, backend=backend)
    randomize_adapters(m)
    x = torch.randn(2, 5, 66)[..., ::2].requires_grad_(True)  # leading dims, non-contiguous
    y = m(x)
    ref, base = float64_lora(m, x)
    assert_close(y, ref, torch.float32)
    assert_close(y - F.linear(x, m.weight, m.bias), ref - base, torch.float32, "adapter term")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, m.lora_A, m.lora_B), dy)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, m.lora_A, m.lora_B)]
    y64 = lora_linear_reference(leaves[0], m.weight.double(), leaves[1], leaves[2], m.scaling, m.bias.double())
    for name, g, g64 in zip(("x", "lora_A", "lora_B"), grads, torch.autograd.grad(y64, leaves, dy.double())):
        assert_close(g, g64, torch.float32, f"grad {name}")


def test_fp32_adapters_on_bf16_base():
    m = lk.LowRankLinear(40, 24, 4, alpha=8, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    randomize_adapters(m)
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
    x = torch.randn(7, 40, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref, base = float64_lora(m, x)
    assert_close(y, ref, torch.bfloat16)
    assert_close(y.double() - base, ref - base, torch.bfloat16, "adapter term")
    y.sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    m = lk.LowRankLinear(48, 32, 4, alpha=8, dtype=dtype)
    randomize_adapters(m)
    x = torch.randn(5, 48, dtype=dtype)
    w0, y0 = m.weight.detach().clone(), m(x)
    m.merge()
    assert m.merged
    expected = (w0.float() + (m.lora_B.float() @ m.lora_A.float()) * m.scaling).to(dtype)
    assert torch.equal(m.weight, expected)  # fp32 math, rounded once
    assert_close(m(x), y0.double(), dtype, "merged output")
    m.merge()  # a second merge is a no-op
    assert torch.equal(m.weight, expected)
    m.unmerge()
    assert not m.merged and torch.isfinite(m.weight).all()
    # Two roundings, to the merged value and back: each within half an ulp of its magnitude.
    bound = torch.finfo(dtype).eps / 2 * (w0.float().abs() + expected.float().abs())
    assert ((m.weight.float() - w0.float()).abs() <= bound).all()
    assert (m.weight.float() - w0.float()).abs().max() > 0 or dtype == torch.float32


@pytest.mark.parametrize("dtype, poison", [(torch.float32, float("nan")), (torch.float32, float("inf")),
                                           (torch.float16, 3e4)])
def test_merge_refuses_non_finite_result(dtype, poison):
    m = lk.LowRankLinear(8, 6, 2, alpha=2, dtype=dtype)
    with torch.no_grad():
        m.weight.fill_(6e4 if dtype == torch.float16 else 0.5)
        m.lora_A.fill_(1.0)
        m.lora_B.fill_(1.0)
        m.lora_B[0, 0] = poison  # fp16: finite update, but weight + update overflows
    w0 = m.weight.detach().clone()
    with pytest.raises(ValueError, match="refusing to merge"):
        m.merge()
    assert not m.merged and torch.equal(m.weight, w0)


def test_merged_state_survives_state_dict():
    m = lk.LowRankLinear(16, 8, 2, alpha=4)
    randomize_adapters(m)
    x = torch.randn(3, 16)
    y = m(x)
    m.merge()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    fresh = lk.LowRankLinear(16, 8, 2, alpha=4)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.merged
    assert_close(fresh(x), y.double(), torch.float32)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=2.5), ValueError, "rank"),
    (dict(in_features=-1), ValueError, "in_features"),
    (dict(out_features=True), ValueError, "out_features"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha="8"), ValueError, "alpha"),
    (dict(method="nope"), ValueError, "method"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(dtype=torch.bfloat16, adapter_dtype=torch.float16), TypeError, "adapter_dtype"),
])
def test_bad_constructor_args(kwargs, exc, name):
    args = dict(in_features=8, out_features=4, rank=2) | kwargs
    with pytest.raises(exc, match=name):
        lk.LowRankLinear(**args)


def test_from_linear_rejects_non_linear_and_subclasses():
    with pytest.raises(TypeError, match="linear"):
        lk.LowRankLinear.from_linear(nn.Conv1d(4, 4, 1))
    out_proj = nn.MultiheadAttention(8, 2).out_proj  # a Linear subclass the attention reads directly
    with pytest.raises(TypeError, match="plain nn.Linear"):
        lk.LowRankLinear.from_linear(out_proj)


# ----------------------------------------------------------------------------------------------
# Dropout: checkpointing, statistics, determinism, backward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointing_with_dropout_gives_same_gradients(backend):
    m = lk.LowRankLinear(24, 20, 4, alpha=8, dropout=0.5, backend=backend)
    randomize_adapters(m)
    x = torch.randn(2, 8, 24, requires_grad=True)
    params = (x, m.lora_A, m.lora_B)
    torch.manual_seed(3)
    y = m(x)
    dy = torch.randn_like(y)
    plain = torch.autograd.grad(y, params, dy)
    torch.manual_seed(3)
    y_ck = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False)
    ck = torch.autograd.grad(y_ck, params, dy)
    assert torch.equal(y_ck, y)
    for a, b in zip(plain, ck):
        assert torch.equal(a, b)


def test_dropout_statistics_and_determinism():
    p, K, M = 0.3, 64, 512
    m = lk.LowRankLinear(K, K, K, alpha=K, dropout=p, bias=False)  # scaling 1
    with torch.no_grad():
        m.lora_A.copy_(torch.eye(K))
        m.lora_B.copy_(torch.eye(K))
    x = torch.sign(torch.randn(M, K)) * (1 + torch.rand(M, K))  # 1 <= |x| <= 2
    torch.manual_seed(11)
    y = m(x)
    lora = (y - F.linear(x, m.weight)).detach()  # = drop(x), up to rounding of the base term
    kept = lora.abs() > 0.5
    frac = kept.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(frac - (1 - p)) < 5 * sigma, (frac, sigma)
    torch.testing.assert_close(lora[kept], x[kept] / (1 - p), rtol=1e-5, atol=1e-5)
    assert (lora[~kept].abs() < 1e-5).all()
    torch.manual_seed(11)
    assert torch.equal(m(x), y)  # same generator state, same seed, same mask
    assert not torch.equal(m(x), y)  # the next call draws a fresh seed
    m.eval()
    torch.testing.assert_close(m(x), F.linear(x, m.weight) + x, rtol=1e-5, atol=1e-5)  # no dropout in eval


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_backward_matches_reference_with_same_seed(backend):
    m = lk.LowRankLinear(33, 17, 3, alpha=6, dropout=0.4, backend=backend)
    randomize_adapters(m)
    x = torch.randn(19, 33, requires_grad=True)
    seed = module_seed(7)
    torch.manual_seed(7)
    y = m(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, m.lora_A, m.lora_B), dy)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, m.lora_A, m.lora_B)]
    y64 = lora_linear_reference(leaves[0], m.weight.double(), leaves[1], leaves[2], m.scaling,
                                m.bias.double(), 0.4, seed)
    assert_close(y, y64.detach(), torch.float32)
    assert_close(y - F.linear(x, m.weight, m.bias),
                 y64.detach() - F.linear(leaves[0].detach(), m.weight.double(), m.bias.double()),
                 torch.float32, "adapter term")
    for name, g, g64 in zip(("x", "lora_A", "lora_B"), grads, torch.autograd.grad(y64, leaves, dy.double())):
        assert_close(g, g64, torch.float32, f"grad {name}")


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dropout, train", [
    ("reference", 0.0, False), ("reference", 0.0, True), ("reference", 0.25, True), ("reference", 0.25, False),
    ("triton", 0.25, True),
])
def test_compile_fullgraph(backend, dropout, train):
    net = nn.Sequential(lk.LowRankLinear(16, 12, 2, alpha=4, dropout=dropout, backend=backend), nn.GELU(),
                        lk.LowRankLinear(12, 8, 2, alpha=4, dropout=dropout, backend=backend))
    randomize_adapters(net)
    net.train(train)
    x = torch.randn(6, 16, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    y = compiled(x)
    torch.manual_seed(4)
    y_eager = net(x)
    torch.testing.assert_close(y, y_eager)
    params = [x] + [p for p in net.parameters() if p.requires_grad]
    dy = torch.randn_like(y)
    for g, w in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(y_eager, params, dy)):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------------------------
# convert() / merge_and_unload() on a tiny Llama
# ----------------------------------------------------------------------------------------------
def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("targets, n_converted", [(["q_proj", "v_proj"], 4), (None, 2 * 7), ("all-linear", 2 * 7)])
def test_convert_tiny_llama(targets, n_converted):
    model = tiny_llama()
    logits0 = model(IDS).logits
    assert lk.convert(model, rank=4, alpha=8, target_modules=targets) is model
    converted = {n for n, m in model.named_modules() if isinstance(m, lk.LowRankLinear)}
    assert len(converted) == n_converted
    if isinstance(targets, list):
        assert all(n.endswith(("q_proj", "v_proj")) for n in converted)
    assert type(model.lm_head) is nn.Linear  # PEFT's "all-linear" leaves the output layer alone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in converted for w in ("lora_A", "lora_B")}
    torch.testing.assert_close(model(IDS).logits, logits0, rtol=0, atol=0)  # B = 0 at init
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_submodule(n).lora_B.grad.abs().sum() > 0 for n in converted)


def test_convert_merge_and_unload_and_state_dict_round_trip():
    model = lk.convert(tiny_llama(), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    randomize_adapters(model)
    logits = model(IDS).logits
    lora_term = logits - tiny_llama()(IDS).logits
    assert lora_term.norm() > 0.1 * logits.norm()  # the adapters change the output noticeably

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = lk.convert(tiny_llama(seed=1), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), strict=True)
    torch.testing.assert_close(fresh(IDS).logits, logits, rtol=0, atol=0)
    with tempfile.TemporaryDirectory() as folder:  # safetensors holds tensors only
        model.save_pretrained(folder)
        saved = safetensors_torch.load_file(f"{folder}/model.safetensors")
    fresh = lk.convert(tiny_llama(seed=1), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    fresh.load_state_dict(saved, strict=True)
    torch.testing.assert_close(fresh(IDS).logits, logits, rtol=0, atol=0)

    assert lk.merge_and_unload(model) is model
    assert not any(isinstance(m, lk.LowRankLinear) for m in model.modules())
    assert all(type(model.get_submodule(f"model.layers.{i}.self_attn.{p}")) is nn.Linear
               for i in range(2) for p in ("q_proj", "v_proj"))
    assert_close(model(IDS).logits, logits.double(), torch.float32, "merged logits")


def test_convert_triton_backend_matches_reference():
    model = lk.convert(tiny_llama(), rank=3, alpha=6, target_modules=["q_proj"])
    randomize_adapters(model)
    ref = model(IDS).logits
    for m in model.modules():
        if isinstance(m, lk.LowRankLinear):
            m.backend = "triton"
    assert_close(model(IDS).logits, ref.double(), torch.float32)


def test_convert_target_forms_and_errors():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)))

    by_regex = lk.convert(net(), target_modules=r"2\.\d")
    assert [type(m).__name__ for m in (by_regex[0], by_regex[2][0], by_regex[2][1])] == \
        ["Linear", "LowRankLinear", "LowRankLinear"]
    by_callable = lk.convert(net(), target_modules=lambda name, mod: mod.out_features == 6)
    assert isinstance(by_callable[2][0], lk.LowRankLinear) and type(by_callable[2][1]) is nn.Linear
    by_name = lk.convert(net(), target_modules=["2.1"])
    assert isinstance(by_name[2][1], lk.LowRankLinear) and type(by_name[0]) is nn.Linear
    assert not by_name[0].weight.requires_grad  # unconverted layers are frozen too

    with pytest.raises(ValueError, match="q_proj"):
        lk.convert(net(), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="method"):
        lk.convert(net(), method="nope")
    with pytest.raises(TypeError, match="model"):
        lk.convert("model")

    shared = nn.Linear(8, 8)
    tied = nn.Sequential(shared, nn.ReLU(), shared)
    lk.convert(tied)
    assert isinstance(tied[0], lk.LowRankLinear) and tied[0] is tied[2]

    attn = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    lk.convert(attn)  # None skips MultiheadAttention's out_proj (not a plain nn.Linear) ...
    assert isinstance(attn[0], lk.LowRankLinear) and type(attn[1].out_proj) is not lk.LowRankLinear
    with pytest.raises(ValueError, match="out_proj"):  # ... and naming it is an error
        lk.convert(nn.Sequential(nn.MultiheadAttention(8, 2)), target_modules=["out_proj"])

    assert isinstance(lk.convert(nn.Linear(4, 3), rank=2), lk.LowRankLinear)


def test_convert_prepare_hook_shares_state_across_layers(monkeypatch):
    calls = []

    class SharedState(LoRAMethod):
        name = "test-shared-state"
        options = {**LoRAMethod.options, "shared": (None, "shared tensor"), "tag": (None, "a label")}

        def prepare_convert(self, model, targets, rank, **options):
            calls.append(([n for n, _ in targets], rank, options))
            return {"shared": torch.randn(rank)}

        def create(self, module, base, device, dtype, shared=None, tag=None, **options):
            module.shared, module.tag = shared, tag
            super().create(module, base, device, dtype, **options)

    monkeypatch.setitem(registry._METHODS, SharedState.name, SharedState())
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lk.convert(model, method="test-shared-state", rank=3, tag="t")
    assert calls == [(["0", "2"], 3, {"tag": "t"})]
    assert model[0].shared is model[2].shared and model[0].tag == "t"


@pytest.mark.parametrize("method, config", [("lora", "LoraConfig"), ("randlora", "RandLoraConfig")])
@pytest.mark.parametrize("rank", [4, 8])
def test_default_scaling_matches_peft_with_only_r(method, config, rank):
    ours = lk.convert(tiny_llama(), method=method, rank=rank, target_modules=["q_proj"])
    theirs = get_peft_model(tiny_llama(), getattr(peft, config)(r=rank, target_modules=["q_proj"]))
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.scaling == theirs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert lk.LowRankLinear.from_linear(nn.Linear(8, 8), method=method, rank=rank).scaling == layer.scaling


def test_default_ranks_are_the_peers():
    for method, config in (("lora", "LoraConfig"), ("vera", "VeraConfig"), ("randlora", "RandLoraConfig")):
        assert registry.get_method(method).default_rank == getattr(peft, config)().r
    assert lk.LowRankLinear(16, 16).rank == 8


def test_second_convert_keeps_earlier_adapters_trainable():
    model = lk.convert(tiny_llama(), method="vera", rank=4, target_modules=["q_proj", "v_proj"])
    lk.convert(model, method="randlora", rank=4)
    methods = {n: m.method for n, m in model.named_modules() if isinstance(m, lk.LowRankLinear)}
    assert sorted(set(methods.values())) == ["randlora", "vera"] and len(methods) == 2 * 7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "vera_lambda" in n} == {f"{n}.{p}" for n, m in methods.items() if m == "vera"
                                                           for p in ("vera_lambda_d", "vera_lambda_b")}
    assert all(("vera_lambda" in n) or ("randlora_" in n) for n in trainable)
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad


def test_convert_on_a_peft_model_keeps_peft_adapters_trainable():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lk.convert(model, method="lora", rank=2)  # all-linear skips PEFT's own layers and their parts
    converted = [n for n, m in model.named_modules() if isinstance(m, lk.LowRankLinear)]
    assert len(converted) == 2 * 6 and not any("q_proj" in n for n in converted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert peft_trainable <= trainable
    assert trainable - peft_trainable == {f"{n}.{w}" for n in converted for w in ("lora_A", "lora_B")}


def test_convert_messages():
    with pytest.raises(ValueError, match="use_dora=True: DoRA is its own method, method='dora'"):
        lk.convert(tiny_llama(), rank=2, use_dora=True)
    with pytest.raises(TypeError, match=r"method 'lora' got unexpected option\(s\) \['use_dorra'\]; its options"):
        lk.convert(tiny_llama(), rank=2, use_dorra=True)
    model = lk.convert(tiny_llama(), rank=2)
    with pytest.raises(ValueError, match=r"already converted \(14 LowRankLinear layers, method 'lora'"):
        lk.convert(model, rank=2)


def test_convert_takes_peft_names_and_configs():
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=["q_proj", "v_proj"])
    by_config = lk.convert(tiny_llama(), config)
    by_names = lk.convert(tiny_llama(), r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True,
                          target_modules=["q_proj", "v_proj"])
    theirs = get_peft_model(tiny_llama(), config).base_model.model
    for model in (by_config, by_names):
        ours = {n: m for n, m in model.named_modules() if isinstance(m, lk.LowRankLinear)}
        assert len(ours) == 4
        for name, layer in ours.items():
            peft_layer = theirs.get_submodule(name)
            assert (layer.rank, layer.scaling, layer.dropout) == (4, peft_layer.scaling["default"], 0.1)
    default_targets = lk.convert(tiny_llama(), LoraConfig(r=2))  # PEFT's defaults for the architecture
    assert sorted({n.rsplit(".", 1)[1] for n, m in default_targets.named_modules()
                   if isinstance(m, lk.LowRankLinear)}) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"LoraConfig\.bias='all' is not supported"):
        lk.convert(tiny_llama(), LoraConfig(r=2, bias="all", target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="'rank' twice"):
        lk.convert(tiny_llama(), rank=2, r=2)
    with pytest.raises(TypeError, match="PEFT config and also"):
        lk.convert(tiny_llama(), config, rank=2)


def test_public_api_surface():
    import inspect

    assert "_base" not in inspect.signature(lk.LowRankLinear).parameters
    for doc in (lk.LowRankLinear.__doc__, lk.convert.__doc__):
        for method in lk.available_methods():
            assert f"'{method}': default rank" in doc
        for option in ("density=0.03", "support='uniform'", "block=(16, 16)", "seed=None", "init=None",
                       "bases='stored'", "projection_prng_key=0", "d_initial=0.1", "use_rslora=False"):
            assert option in doc, option
    assert lk.memory_report is lk.nn.memory_report and lk.GraphedStep is lk.optim.GraphedStep
    assert {"lora", "lowrank", "randlora", "sltrain", "vera"} <= set(lk.available_methods())


def test_merge_and_unload_errors_name_the_layer():
    model = lk.convert(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    with torch.no_grad():
        model[1].lora_B.fill_(float("nan"))
        model[1].lora_A.fill_(1.0)
    with pytest.raises(ValueError, match="'1'"):
        lk.merge_and_unload(model)
    assert isinstance(model[0], lk.LowRankLinear)  # nothing replaced on failure


# ----------------------------------------------------------------------------------------------
# from_peft: parity with PEFT's LoRA layers
# ----------------------------------------------------------------------------------------------
def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(17, 33), nn.GELU(), nn.Linear(33, 33), nn.GELU(), nn.Linear(33, 9)).to(dtype)


def peft_mlp(dtype=torch.float32, **config):
    config = dict(r=4, lora_alpha=8, target_modules=["0", "4"], lora_dropout=0.0) | config
    model = get_peft_model(mlp(dtype), LoraConfig(**config))
    randomize_adapters(model, torch.Generator().manual_seed(1))
    return model


def run(model, x):
    """Output and the gradients (for a fixed random dy) of x and of every trainable parameter, by name."""
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(y, (x, *params), dy)
    return y.detach(), dict(zip(("x",) + names, grads))


def assert_parity(peft_model, ours, x, tol=1e-6):
    y_p, g_p = run(peft_model, x)
    y_o, g_o = run(ours, x)
    assert y_o.dtype == y_p.dtype
    assert rel_err(y_o, y_p) <= tol, rel_err(y_o, y_p)
    assert g_p.keys() == g_o.keys() and len(g_p) > 1
    for name in g_p:
        assert g_o[name].dtype == g_p[name].dtype, name
        assert rel_err(g_o[name], g_p[name]) <= tol, (name, rel_err(g_o[name], g_p[name]))


def fused_layers(model):
    return [m for m in model.modules() if type(m).__name__ == "FusedLoraLinear"]


@pytest.mark.parametrize("backend", [None, "triton"])
def test_from_peft_parity_and_training_steps(backend):
    reference = peft_mlp()
    ours = copy.deepcopy(reference)
    opt_ref = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    before = [id(p) for p in ours.parameters()]
    assert lk.from_peft(ours, backend=backend) is ours  # after the optimizer was built
    assert [id(p) for p in ours.parameters()] == before  # the very same parameter objects
    assert len(fused_layers(ours)) == 2
    x = torch.randn(3, 5, 17)
    tol = 1e-6 if backend is None else 1e-5
    assert_parity(reference, ours, x, tol)
    for step in range(3):
        xs = torch.randn(6, 17)
        for model, opt in ((reference, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            model(xs).square().mean().backward()
            opt.step()
    for (n, p), (_, q) in zip(reference.named_parameters(), ours.named_parameters()):
        assert rel_err(q, p) <= tol, n
    assert_parity(reference, ours, x, tol)


def test_from_peft_tiny_llama_parity():
    reference = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(reference, torch.Generator().manual_seed(2))
    ours = lk.from_peft(copy.deepcopy(reference))
    assert len(fused_layers(ours)) == 4
    y_p = reference(IDS, labels=IDS)
    y_o = ours(IDS, labels=IDS)
    assert rel_err(y_o.logits, y_p.logits) <= 1e-6
    lora_p = [p for n, p in reference.named_parameters() if p.requires_grad]
    lora_o = [p for n, p in ours.named_parameters() if p.requires_grad]
    for gp, go in zip(torch.autograd.grad(y_p.loss, lora_p), torch.autograd.grad(y_o.loss, lora_o)):
        assert rel_err(go, gp) <= 1e-5


def test_from_peft_rslora_and_eval_mode_dropout():
    reference = peft_mlp(use_rslora=True, lora_dropout=0.2)
    assert reference.base_model.model[0].scaling["default"] == 4.0  # 8 / sqrt(4)
    ours = lk.from_peft(copy.deepcopy(reference))
    reference.eval()
    ours.eval()
    assert_parity(reference, ours, torch.randn(4, 17))
    # Training mode: our mask comes from our RNG; it is active, and fixed by torch's seed.
    ours.train()
    x = torch.randn(64, 17)
    torch.manual_seed(9)
    y1 = ours(x)
    torch.manual_seed(9)
    assert torch.equal(ours(x), y1)
    assert not torch.equal(y1, reference(x))


def test_from_peft_fp32_adapters_on_bf16_base():
    reference = peft_mlp(torch.bfloat16)
    layer = reference.base_model.model[0]
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    ours = lk.from_peft(copy.deepcopy(reference))
    assert_parity(reference, ours, torch.randn(5, 17, dtype=torch.bfloat16), tol=1e-2)


def test_from_peft_autocast():
    reference = peft_mlp()
    ours = lk.from_peft(copy.deepcopy(reference))
    x = torch.randn(6, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_parity(reference, ours, x, tol=1e-2)


@pytest.mark.parametrize("backend", [None, "triton"])
def test_from_peft_fan_in_fan_out_conv1d(backend):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(17, 20))
    base.add_module("c_attn", Conv1D(9, 20))
    reference = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    randomize_adapters(reference, torch.Generator().manual_seed(3))
    ours = lk.from_peft(copy.deepcopy(reference), backend=backend)
    assert_parity(reference, ours, torch.randn(4, 17), 1e-6 if backend is None else 1e-5)


def test_from_peft_respects_disable_merge_and_active_adapter():
    base_copy = mlp()
    reference = peft_mlp()
    ours = lk.from_peft(copy.deepcopy(reference))
    x = torch.randn(4, 17)
    with ours.disable_adapter():
        torch.testing.assert_close(ours(x), base_copy(x), rtol=0, atol=0)
    assert_parity(reference, ours, x)
    ours.merge_adapter()
    assert_close(ours(x), reference(x).double(), torch.float32, "merged")
    ours.unmerge_adapter()
    assert_parity(reference, ours, x)
    mixed = ["default", "__base__", "default", "__base__"]  # a mixed-adapter batch runs PEFT's own path
    ours.eval()
    reference.eval()
    assert rel_err(ours(x, adapter_names=mixed), reference(x, adapter_names=mixed)) <= 1e-6
    ours.train()
    reference.train()

    ours.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["2"]))
    reference.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["2"]))
    randomize_adapters(ours, torch.Generator().manual_seed(4))
    randomize_adapters(reference, torch.Generator().manual_seed(4))
    ours.set_adapter("second")
    reference.set_adapter("second")
    # The new adapter's layer "2" was created by PEFT after from_peft: convert it too.
    lk.from_peft(ours)
    assert_parity(reference, ours, x)
    # several active adapters run multi_lora_linear (tests/test_multi_lora_module.py has the parity)
    ours.base_model.set_adapter(["default", "second"])
    reference.base_model.set_adapter(["default", "second"])
    assert_parity(reference, ours, x, 1e-5)
    # An unsupported adapter added to an already fused layer runs PEFT's own forward (PEFT's result);
    # with strict=True it is refused when it runs.
    for model in (ours, reference):
        model.add_adapter("biased", LoraConfig(r=2, target_modules=["0"], lora_bias=True))
        model.set_adapter("biased")
    randomize_adapters(ours, torch.Generator().manual_seed(6))
    randomize_adapters(reference, torch.Generator().manual_seed(6))
    assert_parity(reference, ours, x)
    strict = lk.from_peft(peft_mlp(), strict=True)
    strict.add_adapter("biased", LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    strict.set_adapter("biased")
    with pytest.raises(ValueError, match="lora_bias"):
        strict(x)


def test_from_peft_save_and_load():
    reference = peft_mlp(lora_dropout=0.1)
    ours = lk.from_peft(copy.deepcopy(reference))
    ours.eval()
    x = torch.randn(3, 17)
    y = ours(x)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(mlp(), folder).eval()
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    lk.from_peft(loaded)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(loaded, buf)  # whole-model pickle: the fused class must be importable
    again = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert len(fused_layers(again)) == 2
    torch.testing.assert_close(again(x), y, rtol=0, atol=0)


def test_from_peft_compiles_without_graph_breaks():
    ours = lk.from_peft(peft_mlp())
    x = torch.randn(5, 17)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ours(x))


@pytest.mark.parametrize("config, match", [
    (dict(lora_bias=True), "lora_bias"),
])
def test_from_peft_unsupported_settings_stay_on_peft_or_raise_with_strict(config, match):
    model = peft_mlp(**config)
    with pytest.raises(ValueError, match=rf"strict=True.*layer 'base_model\.model\.0'.*{match}"):
        lk.from_peft(model, strict=True)
    assert not fused_layers(model)  # checked before anything is swapped
    reference = copy.deepcopy(model)
    lk.from_peft(model)
    assert not fused_layers(model)
    assert match in model.lowrank_report.unfused["base_model.model.0"]
    assert_parity(reference, model, torch.randn(4, 17))


def test_from_peft_rejects_bitsandbytes_base():
    bnb = pytest.importorskip("bitsandbytes")
    for layer in (bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False), bnb.nn.Linear4bit(16, 8)):
        model = get_peft_model(nn.Sequential(layer), LoraConfig(r=2, target_modules=["0"]))
        with pytest.raises(ValueError, match=rf"'base_model\.model\.0'.*{type(layer).__name__}"):
            lk.from_peft(model, strict=True)


def test_from_peft_leaves_unsupported_layer_types_on_peft_and_reports_them(caplog):
    torch.manual_seed(0)
    conv = get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)),
                          LoraConfig(r=2, target_modules=["0", "2"]))
    randomize_adapters(conv)
    x = torch.randn(2, 3, 3, 3)
    expected = conv(x)
    with caplog.at_level(logging.INFO, logger="lowrank_kernels.nn.peft"):
        assert lk.from_peft(conv) is conv
    records = [r for r in caplog.records if r.name == "lowrank_kernels.nn.peft"]
    assert [r.levelno for r in records] == [logging.WARNING]
    message = records[0].getMessage()
    assert message == ("from_peft: 1 layers run fused, 1 stay on PEFT's own path: 'base_model.model.0' "
                       "(peft.tuners.lora.layer.Conv2d has no fused counterpart)")
    assert message == str(conv.lowrank_report)
    assert conv.lowrank_report.fused == {"base_model.model.2": "peft.tuners.lora.layer.Linear"}
    assert conv.lowrank_unconverted == conv.lowrank_report.unfused == {
        "base_model.model.0": "peft.tuners.lora.layer.Conv2d has no fused counterpart"}
    assert len(fused_layers(conv)) == 1
    torch.testing.assert_close(conv(x), expected)

    only_conv = get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3)), LoraConfig(r=2, target_modules=["0"]))
    assert not lk.from_peft(only_conv).lowrank_report.fused  # nothing fused, nothing refused
    with pytest.raises(ValueError, match=r"1 of 1 PEFT layers.*Conv2d.*Supported: \['peft\.tuners\.lora") as err:
        lk.from_peft(only_conv, strict=True)
    assert "lowrank_kernels" not in str(err.value)  # only PEFT's class names are listed


@pytest.mark.parametrize("train", [True, False])
def test_from_peft_dropout_one_matches_peft(train):
    """p = 1: PEFT drops the adapter's whole input in training (zero adapter gradients) and applies
    no dropout in eval mode; the fused layers give the same."""
    torch.manual_seed(0)
    model = peft_mlp(lora_dropout=1.0)
    randomize_adapters(model)
    ref = copy.deepcopy(model)
    lk.from_peft(model)
    for m in (model, ref):
        m.train(train)
    x = torch.randn(5, 17)
    assert_parity(ref, model, x)


def test_from_peft_unsupported_layers_raise():

    class QuantisedLinear(nn.Linear):  # what PEFT wraps in a plain lora.Linear when bitsandbytes has no GPU
        pass

    quantised = get_peft_model(nn.Sequential(QuantisedLinear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="base layer .*QuantisedLinear"):
        lk.from_peft(quantised, strict=True)
    assert "QuantisedLinear" in lk.from_peft(quantised).lowrank_report.unfused["base_model.model.0"]

    with pytest.raises(ValueError, match="no PEFT adapter layers"):
        lk.from_peft(mlp())
    with pytest.raises(ValueError, match="backend"):
        lk.from_peft(peft_mlp(), backend="gpu")
