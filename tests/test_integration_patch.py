"""apply_to: a transformers model converted in place by its architecture's projection names, with
a report of every converted layer; outputs unchanged at init, only the adapters train."""

import pytest
import torch
from _helpers import assert_close

transformers = pytest.importorskip("transformers")

from integration_models import VOCAB, tiny_llama, token_batches  # noqa: E402

import lowrank_kernels as lk  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=64, head_dim=8)


def build(kind):
    torch.manual_seed(0)
    if kind == "llama":
        return tiny_llama()
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                         eos_token_id=2)
        return transformers.GPT2LMHeadModel(config)
    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                             "gemma": ("GemmaConfig", "GemmaForCausalLM"),
                             "gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}[kind]
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**SMALL))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2"])
def test_apply_to_converts_the_projections_and_reports_them(kind, capsys):
    model = build(kind)
    targets = lk.integrations.patch.TARGETS[model.config.model_type]
    expected = sorted(n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    # Every target name in each of the 2 blocks (GPT-2's c_proj twice: attention and MLP).
    assert len(expected) == 2 * (len(targets) + (kind == "gpt2"))
    ids = token_batches(1)[0]
    with torch.no_grad():
        before = model(ids).logits
    report = lk.apply_to(model, method="lora", rank=4, alpha=8)
    assert sorted(report.converted) == expected
    assert report.from_conv1d == (expected if kind == "gpt2" else [])
    assert all(isinstance(model.get_submodule(n), lk.LowRankLinear) for n in expected)
    assert f"{len(expected)} layers of a {model.config.model_type} model" in capsys.readouterr().out
    # LoRA starts at B = 0: the output is the base model's; only the adapters train.
    out = model(ids, labels=ids)
    assert_close(out.logits.detach(), before.double(), torch.float32, "logits after apply_to")
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"{n}.{ab}" for n in expected for ab in ("lora_A", "lora_B")}


def test_apply_to_refusals_and_explicit_targets():
    model = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                           intermediate_size=64, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="no target list for model type 'bert'"):
        lk.apply_to(model)
    report = lk.apply_to(model, rank=4, target_modules=["query", "value"], verbose=False)
    assert sorted(report.converted) == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    with pytest.raises(ValueError, match="already converted"):
        lk.apply_to(model, rank=4, target_modules=["query"], verbose=False)
    with pytest.raises(TypeError, match="target_modules"):
        lk.apply_to(tiny_llama(), target_modules="q_proj")
