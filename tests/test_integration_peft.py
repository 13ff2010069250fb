"""peft_config / peft_from_pretrained: get_peft_model builds fused layers, equal to plain PEFT's in
outputs, gradients, saved files and merged weights; saved adapters stay plain PEFT adapters."""

import json

import pytest
import torch
from _helpers import assert_close

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from integration_models import VOCAB, tiny_llama, token_batches  # noqa: E402

import lowrank_kernels as lk  # noqa: E402
from lowrank_kernels.nn.peft import FusedLoraLinear  # noqa: E402

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(**kw):
    # init_lora_weights=False: B is random too, so the adapters' term is not zero.
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL_PROJ, "init_lora_weights": False, **kw})


def pair(make_base, **kw):
    """(plain PEFT model, PEFT model built with peft_config), from the same seed."""
    torch.manual_seed(0)
    plain = peft.get_peft_model(make_base(), lora_config(**kw))
    torch.manual_seed(0)
    fused = peft.get_peft_model(make_base(), lk.peft_config(lora_config(**kw)))
    return plain, fused


def adapter_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("kw", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_get_peft_model_builds_fused_layers_equal_to_peft(kw):
    plain, fused = pair(tiny_llama, **kw)
    layers = adapter_layers(fused)
    assert len(layers) == 2 * len(ALL_PROJ) and all(type(m) is FusedLoraLinear for m in layers.values())
    assert all(type(m) is not FusedLoraLinear for m in adapter_layers(plain).values())
    # Same parameters, names and values (PEFT built both).
    assert plain.state_dict().keys() == fused.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, fused.state_dict()[key]), key
    ids = token_batches(1)[0]
    logits, grads = loss_and_grads(plain, ids)
    f_logits, f_grads = loss_and_grads(fused, ids)
    assert_close(f_logits, logits.double(), torch.float32, "logits")
    assert grads.keys() == f_grads.keys() and len(grads) >= 2 * len(ALL_PROJ)
    for name, grad in grads.items():
        assert_close(f_grads[name], grad.double(), torch.float32, name)


def test_saved_files_and_merged_weights_equal_peft_and_reload_both_ways(tmp_path):
    plain, fused = pair(tiny_llama)
    plain.save_pretrained(tmp_path / "plain")
    fused.save_pretrained(tmp_path / "fused")
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fused").iterdir())
    assert json.loads((tmp_path / "plain/adapter_config.json").read_text()) == \
        json.loads((tmp_path / "fused/adapter_config.json").read_text())
    a = safetensors_torch.load_file(tmp_path / "plain/adapter_model.safetensors")
    b = safetensors_torch.load_file(tmp_path / "fused/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ids = token_batches(1)[0]
    with torch.no_grad():
        expected = plain(ids).logits
    # Plain PEFT loads the fused model's adapter; peft_from_pretrained loads it fused.
    reloaded_plain = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "fused")
    reloaded_fused = lk.peft_from_pretrained(tiny_llama(), tmp_path / "fused")
    assert all(type(m) is not FusedLoraLinear for m in adapter_layers(reloaded_plain).values())
    assert all(type(m) is FusedLoraLinear for m in adapter_layers(reloaded_fused).values())
    with torch.no_grad():
        assert torch.equal(reloaded_plain(ids).logits, expected)
        assert_close(reloaded_fused(ids).logits, expected.double(), torch.float32, "reloaded fused logits")

    merged_plain = plain.merge_and_unload().state_dict()
    merged_fused = fused.merge_and_unload().state_dict()
    assert merged_plain.keys() == merged_fused.keys()
    assert all(torch.equal(merged_plain[k], merged_fused[k]) for k in merged_plain)


def test_gpt2_conv1d_runs_fused_with_peft_fan_in_fan_out():
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                          eos_token_id=2))

    torch.manual_seed(0)
    plain = peft.get_peft_model(gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                        init_lora_weights=False, fan_in_fan_out=True))
    torch.manual_seed(0)
    # fan_in_fan_out left False: PEFT sets it on the config for Conv1D, as it does without peft_config.
    config = lk.peft_config(peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        fused = peft.get_peft_model(gpt2(), config)
    assert config.fan_in_fan_out
    assert all(type(m) is FusedLoraLinear for m in adapter_layers(fused).values())
    ids = token_batches(1)[0]
    logits, grads = loss_and_grads(plain, ids)
    f_logits, f_grads = loss_and_grads(fused, ids)
    assert_close(f_logits, logits.double(), torch.float32, "logits")
    for name, grad in grads.items():
        assert_close(f_grads[name], grad.double(), torch.float32, name)


def test_layers_without_fused_counterpart_stay_peft_and_are_listed():
    config = lk.peft_config(lora_config(target_modules=["q_proj", "embed_tokens"]))
    model = peft.get_peft_model(tiny_llama(), config)
    assert lk.unfused_layers(config) == {
        "model.embed_tokens": "peft.tuners.lora.layer.Embedding has no fused counterpart"}
    assert sum(type(m) is FusedLoraLinear for m in adapter_layers(model).values()) == 2


def test_settings_the_fused_op_cannot_reproduce_stay_peft_or_raise_with_strict():
    config = lk.peft_config(lora_config(target_modules=["q_proj"], lora_bias=True))
    model = peft.get_peft_model(tiny_llama(), config)
    assert not any(type(m) is FusedLoraLinear for m in adapter_layers(model).values())
    unfused = lk.unfused_layers(config)
    assert sorted(unfused) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert all("lora_bias" in why for why in unfused.values())
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*lora_bias|lora_bias.*q_proj"):
        peft.get_peft_model(tiny_llama(), lk.peft_config(lora_config(lora_bias=True), strict=True))


def test_refusals():
    with pytest.raises(TypeError, match="config must be a peft.LoraConfig"):
        lk.peft_config(peft.VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="backend"):
        lk.peft_config(lora_config(), backend="gpu")
    with pytest.raises(ValueError, match="not registered"):
        lk.unfused_layers(lora_config())
