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


SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}


def _word_vocab() -> dict:
    # ids 0-3 are the special tokens; they are not named w0..w3, which would match inside w10, w21, ...
    return SPECIALS | {f"w{i}": i for i in range(4, VOCAB)}


def tiny_tokenizer():
    """A word-level tokenizer over 'w4'..'w255' (ids 4-255; 0-3 are <pad> <s> </s> <unk>), no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(_word_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
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


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3 style: a BOS, header tokens around the role, a blank line, <|eot_id|> ending each turn.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>"]


def chat_tokenizer(template: str | None):
    """The tiny word-level tokenizer plus chat markers and role words, with `template` (None: no template)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _word_vocab()
    for word in ("system", "user", "assistant"):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = template
    return tokenizer


BPE_CORPUS = [
    "the quick brown fox jumps over the lazy dog", "a model learns from examples of questions and answers",
    "export the adapter as a gguf file for llama.cpp", "numbers like 12 345 and 6789 split into digits",
    "hello world, this is a tiny tokenizer for tests", "merge the low rank update into the base weights",
] * 4


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences (~330 tokens) with ChatML specials and template — the
    kind of tokenizer (SmolLM, Qwen, Llama 3) a GGUF file can carry, unlike the word-level one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(BPE_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_bpe_model(path, arch="llama", seed=0, context=128):
    """A tiny random Llama or Qwen2 (with q/k/v biases) over bpe_tokenizer(), saved as a model directory;
    `context`: its max_position_embeddings."""
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = bpe_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=context, **ids))
    else:
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=context, initializer_range=0.3,
                             tie_word_embeddings=False, **ids)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def randomize_lora_b(model, std=0.02, seed=1):
    """Give every LoRA B a trained-looking value instead of PEFT's zeros, so every LoRA gradient is non-zero and
    the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            weight = module.lora_B["default"].weight
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=g) * std)
    return model
