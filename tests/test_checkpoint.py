"""Adapter-only checkpoints: adapter_state_dict, load_adapter_state_dict, save_adapters, load_adapters."""

import os

import pytest
import torch
from torch import nn

import lowrank_kernels as lk

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj"]


def tiny_llama():
    torch.manual_seed(0)  # the same base model every time
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def randomize(model, seed):
    """Other values in every LowRankLinear's trainable tensors (the rest of the model is the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lk.LowRankLinear):
                for p in m.parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def converted(method="lora", seed=1, **options):
    model = lk.convert(tiny_llama(), method=method, rank=4, target_modules=TARGETS, **options)
    randomize(model, seed)
    return model


def test_lora_adapters_only_and_round_trip(tmp_path):
    model = converted()
    logits = model(IDS).logits
    sd = lk.adapter_state_dict(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, lk.LowRankLinear)]
    assert set(sd) == {f"{n}.{w}" for n in layers for w in ("lora_A", "lora_B")}
    assert sum(t.numel() for t in sd.values()) == lk.nn.num_parameters(model, trainable_only=True)
    for name in ("adapters.safetensors", "adapters.pt"):
        path = tmp_path / name
        lk.save_adapters(model, path)
        assert os.path.getsize(path) < 0.2 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
        fresh = converted(seed=2)
        assert not torch.equal(fresh(IDS).logits, logits)
        assert lk.load_adapters(fresh, path) == ([], [])
        torch.testing.assert_close(fresh(IDS).logits, logits, rtol=0, atol=0)


def test_strict_about_adapter_keys_only():
    model = converted()
    sd = lk.adapter_state_dict(model)
    missing = dict(sd)
    dropped = sorted(missing)[0]
    del missing[dropped]
    with pytest.raises(ValueError, match=rf"missing keys \['{dropped}'\]"):
        lk.load_adapter_state_dict(converted(seed=2), missing)
    extra = {**sd, "model.layers.0.self_attn.q_proj.lora_C": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.self_attn.q_proj.lora_C'\]"):
        lk.load_adapter_state_dict(converted(seed=2), extra)
    assert lk.load_adapter_state_dict(converted(seed=2), missing, strict=False) == ([dropped], [])
    merged = converted(seed=2)
    merged.model.layers[1].self_attn.v_proj.merge()
    with pytest.raises(ValueError, match="v_proj' is merged"):
        lk.load_adapter_state_dict(merged, sd)
    with pytest.raises(ValueError, match="no LowRankLinear layers"):
        lk.adapter_state_dict(tiny_llama())


@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_seeded_bases_store_the_seed_not_the_basis(method, tmp_path):
    model = converted(method, bases="seeded", projection_prng_key=7)
    logits = model(IDS).logits
    sd = lk.adapter_state_dict(model)
    assert not any(k.endswith(("_A", "_B")) for k in sd)
    assert all(int(v) == 7 for k, v in sd.items() if k.endswith("projection_prng_key"))
    lk.save_adapters(model, tmp_path / "a.safetensors")
    fresh = converted(method, seed=2, bases="seeded", projection_prng_key=3)
    lk.load_adapters(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(fresh(IDS).logits, logits, rtol=0, atol=0)


def test_stored_bases_from_another_seed_are_refused():
    sd = lk.adapter_state_dict(converted("vera", projection_prng_key=7))
    with pytest.raises(ValueError, match="projection_prng_key=7.*convert with projection_prng_key=7"):
        lk.load_adapter_state_dict(converted("vera", projection_prng_key=3), sd)


def test_sltrain_layers_keep_their_support(tmp_path):
    model = converted("sltrain", density=0.25, support="block", block=(4, 4), seed=0)
    logits = model(IDS).logits
    sd = lk.adapter_state_dict(model)
    q = "model.layers.0.self_attn.q_proj"
    assert {k[len(q) + 1:] for k in sd if k.startswith(q + ".")} == {"lr_A", "lr_B", "sp_values", "sp_index",
                                                                     "sp_block"}
    lk.save_adapters(model, tmp_path / "s.safetensors")
    fresh = converted("sltrain", seed=2, density=0.1)  # another support: the checkpoint's replaces it
    lk.load_adapters(fresh, tmp_path / "s.safetensors")
    torch.testing.assert_close(fresh(IDS).logits, logits, rtol=0, atol=0)
    assert isinstance(fresh.lm_head, nn.Linear)
