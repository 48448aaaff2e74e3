"""Per-example attention over packed rows equals transformers' sdpa with its block-diagonal mask, and every other
case (padded batches, generation with a cache) is handed to sdpa unchanged."""

from __future__ import annotations

import torch

import qlorakit
from qlorakit.data import collate, load_data
from qlorakit.kernels.attention import NAME
from conftest import randomize_lora_b, tiny_tokenizer


def _models(model_dir):
    """The same model and adapter twice: with qlorakit's packed attention, and with plain sdpa."""
    out = []
    for attention in (NAME, "sdpa"):
        torch.manual_seed(0)
        model, _ = qlorakit.load(model_dir, quant="none", dtype="fp32", device="cpu")
        model = qlorakit.add_lora(model, rank=4, alpha=8)
        if attention == "sdpa":
            model.get_base_model().set_attn_implementation("sdpa")
        randomize_lora_b(model, std=0.05)
        assert model.get_base_model().config._attn_implementation == attention
        out.append(model)
    return out


def test_packed_rows_match_the_block_diagonal_mask(tiny_model_dir):
    rows = [{"text": " ".join(f"w{(i * 11 + j) % 200 + 10}" for j in range(n))} for i, n in enumerate((12, 5, 20))]
    batch = collate(load_data(rows, tiny_tokenizer(), max_length=64).train, pad_id=0, packed=True)
    results = []
    for model in _models(tiny_model_dir):
        logits = model(**batch.model_inputs()).logits
        loss_sum, n = qlorakit.causal_lm_loss(logits, batch.labels)
        (loss_sum / n).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((logits.detach(), grads))
    (ours, our_grads), (sdpa, sdpa_grads) = results
    torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_grads, sdpa_grads, rtol=1e-4, atol=1e-6)


def test_padded_batches_and_generation_are_unchanged(tiny_model_dir):
    ours, sdpa = _models(tiny_model_dir)
    ids = torch.tensor([[1, 20, 21, 22, 23, 24], [0, 0, 1, 30, 31, 32]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   sdpa(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
        generated = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                pad_token_id=0) for m in (ours, sdpa)]
    assert torch.equal(generated[0], generated[1])
