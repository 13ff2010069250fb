"""Small models and data for the integration tests (tests/test_integration_*.py): transformers
models built from configs (no download), token batches, and a word-level tokenizer built in memory."""

import torch

VOCAB = 128


def tiny_llama(seed=0, hidden=32, layers=2):
    """A LlamaForCausalLM with hidden 32, 2 layers, vocabulary 128, untied head, fp32, eval mode off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def token_batches(n, batch=2, seq=16, seed=1):
    """``n`` batches of random token ids (batch, seq) from their own generator."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, seq), generator=generator) for _ in range(n)]


def word_tokenizer():
    """A PreTrainedTokenizerFast over the words "w3" ... "w127" (ids 3..127; 0 pad, 1 bos, 2 eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
