"""from_peft against plain PEFT in the cases PEFT's own tests exercise: every layer that can run
fused does and the rest stay on PEFT (with a report), fused layers fall back to PEFT's forward for
zero or several active VeRA/RandLoRA adapters, PEFT's argument checks and repr, DoRA's exact
no-op at initialisation, VeRA/RandLoRA over transformers' Conv1D and on 16-bit bases, KaSA; and
the clear errors of convert, calibrate and load_adapters."""

import copy
import logging
import warnings

import pytest
import torch
from conftest import rel_err
from torch import nn

import lowrank_kernels as lk

peft = pytest.importorskip("peft")
from peft import LoraConfig, RandLoraConfig, VeraConfig, get_peft_model  # noqa: E402


def perturb(model, seed=1):
    """Non-zero values for every trainable adapter tensor (B = 0 and λ_b = 0 at init hide the adapter term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * 0.5).to(p.dtype))
    return model


def outputs_and_grads(model, x):
    """The output and the gradients of x and of every trainable parameter, by name."""
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return y.detach(), dict(zip(("x",) + names, torch.autograd.grad(y, (x, *params), dy, allow_unused=True)))


def assert_parity(reference, ours, x, tol):
    y_p, g_p = outputs_and_grads(reference, x)
    y_o, g_o = outputs_and_grads(ours, x)
    assert y_o.dtype == y_p.dtype and rel_err(y_o, y_p) <= tol, rel_err(y_o, y_p)
    assert g_o.keys() == g_p.keys()
    for name, g in g_p.items():
        if g is None:
            assert g_o[name] is None or not g_o[name].any(), name
        else:
            assert rel_err(g_o[name], g) <= tol, (name, rel_err(g_o[name], g))


def fused_names(model):
    return sorted(n for n, m in model.named_modules() if type(m).__name__.startswith("Fused"))


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Linear(12, 20, dtype=dtype)
        self.b = nn.Linear(20, 6, dtype=dtype)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def random_basis_config(method, **kwargs):
    if method == "vera":
        return VeraConfig(r=4, target_modules=["a", "b"], projection_prng_key=3, **kwargs)
    return RandLoraConfig(r=4, target_modules=["a", "b"], projection_prng_key=3, randlora_alpha=8, **kwargs)


# ----------------------------------------------------------------------------------------------
# Per-layer fusing and the report
# ----------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    """A Linear that fuses next to layers that stay on PEFT: an Embedding, a Conv2d, and a
    MultiheadAttention (whose out_proj is a Linear subclass the attention reads directly)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin = nn.Linear(8, 5)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)
        h = self.mha(h, h, h, need_weights=False)[0]
        return self.lin(h)


def test_every_fusable_layer_fuses_and_the_others_stay_on_peft(caplog):
    torch.manual_seed(0)
    reference = perturb(get_peft_model(Mixed(), LoraConfig(r=2, target_modules=["emb", "conv", "mha", "lin"])))
    ours = copy.deepcopy(reference)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, "lowrank_kernels.nn.peft"):
        warnings.simplefilter("always")
        assert lk.from_peft(ours) is ours
    assert not caught  # a log record, not a warning: PEFT's own warnings stay the last ones
    report = ours.lowrank_report
    assert report.fused == {"base_model.model.lin": "peft.tuners.lora.layer.Linear"}
    assert fused_names(ours) == ["base_model.model.lin"]
    assert set(report.unfused) == {f"base_model.model.{n}" for n in ("emb", "conv", "mha", "mha.base_layer.out_proj")}
    assert "NonDynamicallyQuantizableLinear" in report.unfused["base_model.model.mha.base_layer.out_proj"]
    assert "Embedding has no fused counterpart" in report.unfused["base_model.model.emb"]
    assert ours.lowrank_unconverted == report.unfused  # the attribute earlier versions set
    records = [r for r in caplog.records if r.name == "lowrank_kernels.nn.peft"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.WARNING, str(report))]
    ids = torch.randint(0, 10, (3, 4))
    y_p, y_o = reference(ids), ours(ids)
    assert rel_err(y_o, y_p) <= 1e-6
    # strict=True: the old all-or-nothing behaviour, every refusal named, nothing swapped.
    untouched = copy.deepcopy(reference)
    with pytest.raises(ValueError, match=r"strict=True\): 4 of 5 PEFT layers cannot run fused: "
                                         r".*mha\.base_layer\.out_proj"):
        lk.from_peft(untouched, strict=True)
    assert not fused_names(untouched)
    with pytest.raises(TypeError, match="strict"):
        lk.from_peft(untouched, strict="yes")


def test_fully_fused_model_logs_at_info_only(caplog):
    model = perturb(get_peft_model(Net(), LoraConfig(r=2, target_modules=["a", "b"])))
    with caplog.at_level(logging.INFO, "lowrank_kernels.nn.peft"):
        lk.from_peft(model)
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "lowrank_kernels.nn.peft"] == [
        (logging.INFO, "from_peft: 2 layers run fused, 0 stay on PEFT's own path")]


# ----------------------------------------------------------------------------------------------
# PEFT's runtime behaviour kept: zero or several active adapters, argument checks, repr
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_random_basis_zero_and_several_active_adapters_run_peft(method):
    torch.manual_seed(0)
    reference = get_peft_model(Net(), random_basis_config(method))
    reference.add_adapter("other", random_basis_config(method))
    perturb(reference)
    ours = lk.from_peft(copy.deepcopy(reference))
    assert fused_names(ours) == ["base_model.model.a", "base_model.model.b"]
    x = torch.randn(5, 12)
    for model in (reference, ours):
        model.base_model.set_adapter(["default", "other"])  # PEFT sums the adapters' terms
    assert_parity(reference, ours, x, 1e-6)
    for model in (reference, ours):
        model.delete_adapter("other")
        model.delete_adapter("default")  # no adapter left: the base layers alone
    assert not ours.base_model.model.a.active_adapters
    # (PeftModel's own forward needs an active config: run the tuned model inside.)
    torch.testing.assert_close(ours.base_model.model(x), reference.base_model.model(x), rtol=0, atol=0)


def test_mixed_batch_arguments_are_checked_with_peft_messages():
    reference = perturb(get_peft_model(Net(), LoraConfig(r=2, target_modules=["a", "b"])))
    ours = lk.from_peft(copy.deepcopy(reference))
    x = torch.randn(3, 12)
    messages = []
    for model in (reference, ours):
        model.eval()
        with pytest.raises(ValueError) as err:
            model(x, adapter_names=["default", "__base__"])
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("Length of `adapter_names` should be the same as the number of inputs")


@pytest.mark.parametrize("config", [
    LoraConfig(r=2, target_modules=["a", "b"]),
    LoraConfig(r=2, target_modules=["a", "b"], use_dora=True),
    random_basis_config("vera"),
    random_basis_config("randlora"),
], ids=["lora", "dora", "vera", "randlora"])
def test_repr_is_peft_repr(config):
    reference = get_peft_model(Net(), copy.deepcopy(config))
    ours = lk.from_peft(copy.deepcopy(reference))
    assert len(fused_names(ours)) == 2
    assert repr(ours) == repr(reference)
    assert repr(ours.base_model.model.a).split("(")[0] in ("lora.Linear", "vera.Linear", "randlora.Linear")


def test_qlora_repr_is_peft_repr():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)).to("cpu")
    base.is_loaded_in_4bit = True  # what transformers sets; PEFT then builds its bnb QLoRA layer
    reference = get_peft_model(base, LoraConfig(r=2, target_modules=["0"]))
    ours = lk.from_peft(copy.deepcopy(reference))
    assert fused_names(ours) == ["base_model.model.0"]
    assert repr(ours) == repr(reference) and "lora.Linear4bit(" in repr(ours)


# ----------------------------------------------------------------------------------------------
# DoRA at initialisation: an exact no-op, as in PEFT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_dora_init_is_exactly_the_base_layer_on_the_reference_backend(bias):
    # 1000 wide: ‖W_j‖ as a sum of squares and torch.linalg.norm (PEFT's magnitude) differ in the
    # last bit there, and so do x Wᵀ + bias and F.linear's fused addmm.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1000, 1000, bias=bias))
    x = torch.randn(6, 1000)
    expected = base(x)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["0"], use_dora=True))
    assert torch.equal(model(x), expected)  # PEFT's own no-op
    lk.from_peft(model, backend="reference")
    assert torch.equal(model(x), expected)
    own = lk.LowRankLinear.from_linear(copy.deepcopy(base[0]), method="dora", rank=8, backend="reference")
    assert torch.equal(own(x), expected)


def test_dora_init_on_triton_is_its_lora_no_op():
    """Triton's GEMM rounds differently from torch's, so no fused layer reproduces F.linear bit for
    bit there; DoRA's magnitude scale is exactly 1 at init, so DoRA's output is LoRA's (B = 0)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(160, 96))
    x = torch.randn(5, 160)
    dora = lk.from_peft(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["0"], use_dora=True)),
                        backend="triton")
    lora = lk.from_peft(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["0"])), backend="triton")
    assert torch.equal(dora(x), lora(x))
    assert rel_err(dora(x), base(x)) <= 1e-6


# ----------------------------------------------------------------------------------------------
# VeRA / RandLoRA over transformers' Conv1D and on 16-bit bases
# ----------------------------------------------------------------------------------------------
class GPT2ish(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(20, 12)  # weight (12, 20): in 12, out 20
        self.c_proj = Conv1D(6, 20)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_attn(x)))


@pytest.mark.parametrize("method", ["vera", "randlora"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_random_basis_over_conv1d_fuses_with_peft_parity(method, backend):
    torch.manual_seed(0)
    config = random_basis_config(method, fan_in_fan_out=True)
    config.target_modules = ["c_attn", "c_proj"]
    reference = perturb(get_peft_model(GPT2ish(), config))
    ours = lk.from_peft(copy.deepcopy(reference), backend=backend)
    assert fused_names(ours) == ["base_model.model.c_attn", "base_model.model.c_proj"]
    assert_parity(reference, ours, torch.randn(2, 3, 12), 1e-5)


@pytest.mark.parametrize("method", ["vera", "randlora"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_random_basis_fp16_base_with_fp32_scales_fuses_with_peft_parity(method, backend):
    torch.manual_seed(0)
    reference = perturb(get_peft_model(Net(torch.float16), random_basis_config(method)))
    layer = reference.base_model.model.a
    scale = layer.vera_lambda_d["default"] if method == "vera" else layer.randlora_lambda["default"]
    assert layer.base_layer.weight.dtype == torch.float16 and scale.dtype == torch.float32
    ours = lk.from_peft(copy.deepcopy(reference), backend=backend)
    assert len(fused_names(ours)) == 2
    assert_parity(reference, ours, torch.randn(4, 12).half(), 1e-2)


def test_randlora_fp16_bases_with_fp32_scales_fuse_as_peft_casts_them():
    torch.manual_seed(0)
    reference = perturb(get_peft_model(Net(), random_basis_config("randlora")))
    for name in ("randlora_A", "randlora_B"):
        shared = getattr(reference.base_model.model.a, name)  # one BufferDict, shared by the layers
        shared["default"] = shared["default"].half()
    ours = lk.from_peft(copy.deepcopy(reference))
    assert len(fused_names(ours)) == 2
    assert_parity(reference, ours, torch.randn(4, 12), 1e-5)


# ----------------------------------------------------------------------------------------------
# KaSA (PEFT's LoRA variant): fused as lora_linear with B·diag(ΔΣ)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kasa_fuses_with_peft_parity_over_steps(backend, monkeypatch):
    import lowrank_kernels.nn.peft as nn_peft

    calls = []
    monkeypatch.setattr(nn_peft, "lora_linear", lambda *a, **k: calls.append(1) or lk.lora_linear(*a, **k))
    torch.manual_seed(0)
    reference = perturb(get_peft_model(Net(), LoraConfig(r=3, lora_alpha=6, target_modules=["a", "b"],
                                                         kasa_config=peft.tuners.lora.config.KasaConfig())))
    ours = lk.from_peft(copy.deepcopy(reference), backend=backend)
    assert len(fused_names(ours)) == 2 and not ours.lowrank_report.unfused
    assert any("lora_diag" in n for n, p in ours.named_parameters() if p.requires_grad)
    x = torch.randn(2, 3, 12)
    assert_parity(reference, ours, x, 1e-5)
    assert len(calls) == 2  # each fused layer ran lora_linear once
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (reference, ours)]
    for _ in range(2):
        xs = torch.randn(4, 12)
        for model, opt in zip((reference, ours), opts):
            opt.zero_grad()
            model(xs).square().mean().backward()
            opt.step()
    assert_parity(reference, ours, x, 1e-5)


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------
def test_convert_rejects_a_non_iterable_target_modules():
    with pytest.raises(TypeError, match="target_modules must be .*got int 123"):
        lk.convert(Net(), method="lora", rank=2, target_modules=123)


def test_calibrate_names_the_layer_and_width_for_a_wrong_input_width():
    model = lk.convert(Net(), method="lora", rank=2, target_modules=["a"])
    with pytest.raises(ValueError, match=r"batches: layer 'a' takes inputs whose last dim is in_features = 12, "
                                         r"got \(4, 13\)"):
        lk.nn.calibrate(model, [torch.randn(4, 13)], init="corda")


def test_load_adapters_on_an_empty_file_names_the_path(tmp_path):
    model = lk.convert(Net(), method="lora", rank=2, target_modules=["a"])
    for suffix in ("pt", "safetensors"):
        empty = tmp_path / f"empty.{suffix}"
        empty.write_bytes(b"")
        with pytest.raises(ValueError, match=rf"path '.*empty\.{suffix}' is an empty file"):
            lk.load_adapters(model, empty)
