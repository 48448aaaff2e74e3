"""Generation on the default model (SmolLM2-135M-Instruct, NF4 + double quant, r=16 adapter with trained-looking B):
qlorakit's decoder gives transformers' greedy tokens in fp32 and agrees with them in bf16 as measured; the model
comes back as it was (training mode, fully fused)."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from conftest import randomize_lora_b
from qlorakit.demo import make_examples
from qlorakit.generation import Generator, Sampling, encode_prompts, stop_ids
from qlorakit.generation.reference import generate_with_transformers

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Explain gravity in one sentence.",
             "List three fruits and their colours."]


def _model(dtype):
    torch.manual_seed(0)
    model, tokenizer = qlorakit.load(qlorakit.DEFAULT_MODEL, quant="nf4", double_quant=True, dtype=dtype)
    model = randomize_lora_b(qlorakit.add_lora(model, rank=16, alpha=32), std=0.01)
    prompts = [row["messages"][:1] for row in make_examples(4, seed=5)] + [
        [{"role": "user", "content": q}] for q in QUESTIONS]
    return model, tokenizer, encode_prompts(tokenizer, prompts)


def _compare(model, tokenizer, ids):
    sampling = Sampling(max_new_tokens=32)
    reference = generate_with_transformers(model, tokenizer, ids, sampling, stop_ids(tokenizer), batch_size=8)
    generator = Generator(model, tokenizer, batch_size=8)
    ours = generator.run(ids, sampling)
    assert generator.decoder is not None, generator.describe()
    return ours, reference


def test_fp32_greedy_tokens_identical_to_transformers():
    model, tokenizer, ids = _model("fp32")
    ours, reference = _compare(model, tokenizer, ids)
    assert [a.tokens for a in ours] == [r.tokens for r in reference]
    assert model.training
    assert qlorakit.fast_path_report(model).fully_fused


def test_bf16_greedy_agreement_with_transformers():
    """bf16 (`auto` on the CI CPU): measured 8/8 answers identical over 32 tokens; a near-tie may round the other
    way in another matrix shape, so the test allows one answer to part from transformers' after its fourth
    token."""
    model, tokenizer, ids = _model("bf16")
    ours, reference = _compare(model, tokenizer, ids)
    same = sum(a.tokens == r.tokens for a, r in zip(ours, reference))
    assert same >= 7, f"{same}/8 identical"
    assert all(a.tokens[:4] == r.tokens[:4] for a, r in zip(ours, reference))
