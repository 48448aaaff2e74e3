"""The chunked cross-entropy equals F.cross_entropy on the full logits, in value and gradient."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from conftest import randomize_lora_b
from qlorakit.data import IGNORE_INDEX
from qlorakit.kernels.cross_entropy import chunked_causal_lm_loss
from qlorakit.upstream.transformers import plain_output_head

# Relative error against the full-logits loss computed in the same dtypes. Measured: fp32 ~1e-7, bf16 ~1e-6
# (the same bf16 products, summed in another order).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}


def _full(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_matches_full_logits(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 33, 48, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(301, 48, generator=g).to(dtype)
    labels = torch.randint(0, 301, (2, 33), generator=g)
    labels[0, 5:12] = IGNORE_INDEX
    grad_out = torch.tensor(0.37)

    full = _full(hidden, weight, labels)
    (full * grad_out).backward()
    full_grad = hidden.grad.clone()
    hidden.grad = None
    ours, count = chunked_causal_lm_loss(hidden, weight, labels, chunk=chunk)
    (ours * grad_out).backward()
    exact = hidden.detach().double().requires_grad_()
    (_full(exact, weight.double(), labels) * grad_out.double()).backward()

    assert ours.dtype == torch.float32 and count == 2 * 32 - 7
    assert float(ours) == pytest.approx(float(full), rel=TOL[dtype])
    assert hidden.grad.dtype == dtype

    def error(grad):
        return float((grad.double() - exact.grad).norm() / exact.grad.norm())

    # The gradient is rounded in another order than the full-logits path (its scale comes after the product), so
    # the bar is fp64: no less accurate than the full path. Measured: fp32 0.8e-6 (full path 0.8e-6); bf16 1.1e-2
    # both.
    assert error(hidden.grad) <= 1.3 * error(full_grad) + 1e-6, (error(hidden.grad), error(full_grad))


def test_model_loss_and_lora_gradients_match_the_logits_path(tiny_model_dir, tiny_batch):
    losses, grads = [], []
    for chunked in (True, False):
        torch.manual_seed(0)
        model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
        model = randomize_lora_b(qlorakit.add_lora(model, rank=4, alpha=8), std=0.05)
        inputs = {"input_ids": tiny_batch, "use_cache": False}
        assert not isinstance(plain_output_head(model), str)
        if chunked:
            loss_sum, n = qlorakit.loss.batch_loss(model, inputs, tiny_batch)
        else:
            loss_sum, n = qlorakit.causal_lm_loss(model(**inputs).logits, tiny_batch)
        (loss_sum / n).backward()
        losses.append(float(loss_sum / n))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
