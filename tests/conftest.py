"""Shared fixtures: tiny random models built from configs (unit tests) and the real default model (integration)."""

from __future__ import annotations

import pytest
import torch


VOCAB = 256
DTYPES = ("fp32", "fp16", "bf16")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Large random weights give peaked logits, so quantization error is visible in the loss (with the default
        # 0.02 every variant sits at ln(vocab) and a tolerance test could not fail).
        initializer_range=0.3,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_tokenizer():
    """A word-level tokenizer over 'w0'..'w255' with a chat template, for trainers that need one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )


def save_tiny_model(path, seed=0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_batch():
    """A fixed batch of token ids: 4 rows x 32 tokens, with a learnable pattern."""
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(4, VOCAB - 40, (4, 1), generator=g)
    return (starts + torch.arange(32)).clamp(max=VOCAB - 1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
