"""The training step: fp32 loss, padding masked, GradScaler overflow handled as a skipped step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import qlorakit
from qlorakit.train import IGNORE_INDEX, causal_lm_loss


def test_loss_is_fp32_and_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 50, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[0, 4:] = IGNORE_INDEX
    total, count = causal_lm_loss(logits, labels)
    assert total.dtype == torch.float32 and count == 8
    expected = F.cross_entropy(logits[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(total / count, expected, rtol=1e-6, atol=1e-6)


def test_padding_is_not_trained_on(tiny_model_dir, tiny_batch):
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4, alpha=8)
    step = qlorakit.TrainStep(model, lr=0.0)
    mask = torch.ones_like(tiny_batch)
    mask[:, 20:] = 0
    assert step(tiny_batch, attention_mask=mask).tokens == 4 * 19
    assert step(tiny_batch).tokens == 4 * 31


def test_fp16_overflow_is_a_skipped_step(tiny_model_dir, tiny_batch):
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp16", device="cpu")
    model = qlorakit.add_lora(model, rank=4, alpha=8)
    step = qlorakit.TrainStep(model, lr=1e-2)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # scaled fp16 gradients overflow for sure
    before = [p.detach().clone() for p in step.params]
    result = step(tiny_batch)
    assert result.skipped and step.scaler.get_scale() == 2.0**39
    assert all(torch.equal(a, p) for a, p in zip(before, step.params))
    # the scaler backs off until a step goes through, and then the adapters move
    for _ in range(40):
        if not step(tiny_batch).skipped:
            break
    assert step.scaler.get_scale() < 2.0**24
    assert not all(torch.equal(a, p) for a, p in zip(before, step.params))
