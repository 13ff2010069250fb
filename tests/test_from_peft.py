"""from_peft against plain PEFT in the cases PEFT's own tests exercise: every layer that can run
fused does and the rest stay on PEFT (with a report), fused layers fall back to PEFT's forward for
zero or several active VeRA/RandLoRA adapters, PEFT's argument checks and repr, DoRA's exact
no-op at initialisation, VeRA/RandLoRA over transformers' Conv1D and on 16-bit bases, KaSA; and
PEFT's forward for a layer whose base or adapter modules carry hooks (FSDP2 sharding a base layer
on its own included), PEFT's compiled hot-swap (tensor scalings) fused under torch.compile; and
the clear errors of convert, calibrate and load_adapters."""

import copy
import logging
import warnings

import pytest
import torch
from _helpers import rel_err
from test_lora_module import run
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


def assert_parity(reference, ours, x, tol):
    y_p, g_p = run(reference, x)
    y_o, g_o = run(ours, x)
    assert y_o.dtype == y_p.dtype and rel_err(y_o, y_p) <= tol, rel_err(y_o, y_p)
    assert g_o.keys() == g_p.keys()
    for name, g in g_p.items():
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
    import lowrank_kernels.nn.peft.lora as nn_peft_lora

    calls = []
    monkeypatch.setattr(nn_peft_lora, "lora_linear", lambda *a, **k: calls.append(1) or lk.lora_linear(*a, **k))
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
# Module hooks: PEFT's forward (the fused op would read the modules' tensors and skip their hooks)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, module, op", [("lora", "base_layer", "lora.lora_linear"),
                                                ("lora", "lora_A.default", "lora.lora_linear"),
                                                ("lora", "lora_dropout.default", "lora.lora_linear"),
                                                ("lora-two", "base_layer", "multi_lora.multi_lora_linear"),
                                                ("lora-two", "lora_B.other", "multi_lora.multi_lora_linear"),
                                                ("vera", "base_layer", "random_basis.vera_linear"),
                                                ("vera", "vera_dropout.default", "random_basis.vera_linear")])
def test_module_hooks_run_peft_forward_logged_once(method, module, op, caplog, monkeypatch):
    """("lora-two": two active LoRA adapters, which run multi_lora_linear.)"""
    import importlib

    owner, name = op.split(".")
    owner = importlib.import_module(f"lowrank_kernels.nn.peft.{owner}")
    calls = []
    fused_op = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or fused_op(*a, **k))
    lora = LoraConfig(r=2, target_modules=["a", "b"])
    reference = get_peft_model(Net(), lora if method.startswith("lora") else random_basis_config(method))
    if method == "lora-two":
        reference.add_adapter("other", lora)
        reference.base_model.set_adapter(["default", "other"])
    perturb(reference)
    ours = lk.from_peft(copy.deepcopy(reference))
    hooks = [m.base_model.model.a.get_submodule(module).register_forward_hook(lambda _m, _a, out: out * 2)
             for m in (reference, ours)]  # a hook that changes the result: skipping it shows
    x = torch.randn(4, 12)
    with caplog.at_level(logging.WARNING, logger="lowrank_kernels.nn.peft"):
        assert_parity(reference, ours, x, 1e-6)
        assert_parity(reference, ours, x, 1e-6)
    assert len(calls) == 2  # layer b (no hooks) fused, a on PEFT's forward
    logged = [r.getMessage() for r in caplog.records if "runs PEFT's forward" in r.getMessage()]
    assert len(logged) == 1 and "'base_model.model.a'" in logged[0] and module.split(".")[0] in logged[0], logged
    for hook in hooks:
        hook.remove()
    assert_parity(reference, ours, x, 1e-6)
    assert len(calls) == 4  # both fused again


def test_fsdp2_base_layer_sharded_on_its_own_runs_peft_forward(one_rank_group):
    """fully_shard on a LoRA layer's base layer apart from the LoRA layer: the base weight is
    gathered by the base layer's own hook, which PEFT's forward runs (the fused op would read the
    sharded DTensor); a merge after a forward keeps the sharded base weights, as with PEFT."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    reference = get_peft_model(Net(), LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    reference.add_adapter("other", LoraConfig(r=3, target_modules=["a", "b"], init_lora_weights=False))
    ours = lk.from_peft(copy.deepcopy(reference), backend="reference")
    mesh = init_device_mesh("cpu", (1,))
    x = torch.randn(5, 12)
    results = []
    for model in (reference, ours):
        fully_shard(model.base_model.model.a.base_layer, mesh=mesh, reshard_after_forward=False)
        fully_shard(model.base_model.model.a, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        y = model(x)
        y.square().sum().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            model(x)
        model.merge_adapter()
        model.set_adapter("other")  # unmerges first
        weights = {k: v.full_tensor() for k, v in model.state_dict().items() if "base_layer" in k}
        results.append((y.detach(), grads, weights))
    (y_p, g_p, w_p), (y_o, g_o, w_o) = results
    assert rel_err(y_o, y_p) <= 1e-6
    assert g_o.keys() == g_p.keys() and all(rel_err(g_o[n], g) <= 1e-6 for n, g in g_p.items())
    assert w_o.keys() == w_p.keys() and all(rel_err(w_o[k], w) <= 1e-6 for k, w in w_p.items())


# ----------------------------------------------------------------------------------------------
# PEFT's compiled hot-swap: scalings held as tensors, ranks padded
# ----------------------------------------------------------------------------------------------
def saved_adapters(tmp_path, base, configs, x):
    """Each config's PEFT model on a copy of ``base`` saved under tmp_path/<i>, and its eval output on x."""
    expected = []
    for i, config in enumerate(configs):
        model = get_peft_model(copy.deepcopy(base), config).eval()
        model.save_pretrained(tmp_path / str(i))
        with torch.no_grad():
            expected.append(model(x))
    return expected


@pytest.mark.parametrize("use_dora", [False, True])
def test_compiled_hotswap_tensor_scaling_runs_fused_with_peft_parity(use_dora, tmp_path, monkeypatch):
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
    from torch._dynamo.testing import CompileCounter

    import lowrank_kernels.nn.peft.dora as nn_peft_dora
    import lowrank_kernels.nn.peft.lora as nn_peft_lora

    base, x = Net(), torch.randn(3, 12)
    configs = [LoraConfig(r=r, lora_alpha=alpha, target_modules=["a", "b"], init_lora_weights=False,
                          use_dora=use_dora) for r, alpha in ((2, 4), (3, 9))]
    expected = saved_adapters(tmp_path, base, configs, x)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "0", is_trainable=True)
    ours = lk.from_peft(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "0", is_trainable=True))
    for model in (reference, ours):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert isinstance(ours.base_model.model.a.scaling["default"], torch.Tensor)
    calls = []
    monkeypatch.setattr(nn_peft_lora, "lora_linear", lambda *a, **k: calls.append(1) or lk.lora_linear(*a, **k))
    monkeypatch.setattr(nn_peft_dora, "dora_linear", lambda *a, **k: calls.append(1) or lk.dora_linear(*a, **k))
    assert_parity(reference, ours, x, 1e-6)
    assert len(calls) == 2  # both layers fused, with the tensor scaling
    monkeypatch.undo()
    counter = CompileCounter()
    compiled = torch.compile(ours.eval(), backend=counter, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), expected[0], rtol=1e-5, atol=1e-6)
        for i in () if use_dora else (1, 0):  # (PEFT's hot-swap does not take DoRA's magnitude)
            hotswap_adapter(compiled, tmp_path / str(i), adapter_name="default")
            torch.testing.assert_close(compiled(x), expected[i], rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1  # the swapped alpha is read from the tensor: no recompilation


def test_qlora_tensor_scaling_runs_fused_with_peft_parity(monkeypatch):
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    import lowrank_kernels.nn.peft.lora as nn_peft_lora

    bnb = pytest.importorskip("bitsandbytes")
    base = nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)).to("cpu")  # (quantises)
    base.is_loaded_in_4bit = True
    reference = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    ours = lk.from_peft(copy.deepcopy(reference))
    for model in (reference, ours):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert isinstance(ours.base_model.model[0].scaling["default"], torch.Tensor)
    calls = []
    monkeypatch.setattr(nn_peft_lora, "lora_linear", lambda *a, **k: calls.append(1) or lk.lora_linear(*a, **k))
    assert_parity(reference, ours, torch.randn(3, 64), 1e-5)
    assert len(calls) == 1

def test_compiled_several_active_adapters_with_tensor_scalings_have_peft_parity(monkeypatch):
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap
    from torch._dynamo.testing import CompileCounter

    import lowrank_kernels.nn.peft.multi_lora as nn_multi

    reference = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"]))
    reference.add_adapter("other", LoraConfig(r=3, lora_alpha=9, target_modules=["a", "b"]))
    perturb(reference)
    ours = lk.from_peft(copy.deepcopy(reference))
    for model in (reference, ours):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
        model.base_model.set_adapter(["default", "other"])
    calls = []
    monkeypatch.setattr(nn_multi, "multi_lora_linear", lambda *a, **k: calls.append(1) or lk.multi_lora_linear(*a, **k))
    x = torch.randn(3, 12)
    assert_parity(reference, ours, x, 1e-6)
    assert len(calls) == 2  # both layers fused
    monkeypatch.undo()
    counter = CompileCounter()
    compiled = torch.compile(ours.base_model.model, backend=counter, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
        for model in (ours, reference):
            model.base_model.model.a.scaling["other"].fill_(0.5)  # as a hot-swap of its alpha does
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1  # the scalings are read from their tensors: no recompilation

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
