"""The chunked cross-entropy equals F.cross_entropy on the full logits, in value and gradient."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from conftest import randomize_lora_b
from qlorakit.data import IGNORE_INDEX
from qlorakit.kernels.cross_entropy import chunked_causal_lm_loss, chunked_token_logps
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


# ---- per-token log-probabilities (preference losses)

# Tolerances of the SFT kernel's tests above (fp16 held to bf16's). Measured on these inputs: values ~1e-7 relative
# in every dtype (the same products, fp32 log-sum-exp in another order; up to 6e-7 with one-row chunks, another
# matmul path); gradients vs fp64 as the full path's within 5%: fp32 4.5e-7 (full 4.5e-7), bf16 7.8e-3 (8.1e-3),
# fp16 1.2e-3 (1.2e-3).
LOGP_TOL = TOL | {torch.float16: TOL[torch.bfloat16]}


def _full_logps(hidden, weight, targets):
    logits = (hidden.to(weight.dtype) @ weight.t()).to(torch.promote_types(weight.dtype, torch.float32))
    return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("hidden_dtype", ["weight", "fp32"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000, None])  # 7 and 16 do not divide the 61 tokens
def test_token_logps_match_log_softmax(dtype, hidden_dtype, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(61, 48, generator=g) * 2).to(dtype if hidden_dtype == "weight" else torch.float32)
    hidden.requires_grad_()
    weight = torch.randn(301, 48, generator=g).to(dtype)
    targets = torch.randint(0, 301, (61,), generator=g)
    grad_out = torch.randn(61, generator=g)  # each row its own weight, as per-sequence sums and rewards give

    full = _full_logps(hidden, weight, targets)
    full.backward(grad_out)
    full_grad = hidden.grad.clone()
    hidden.grad = None
    ours = chunked_token_logps(hidden, weight, targets, chunk=chunk)
    ours.backward(grad_out)
    exact = hidden.detach().to(dtype).double().requires_grad_()
    _full_logps(exact, weight.double(), targets).backward(grad_out.double())

    assert ours.dtype == torch.float32 and ours.shape == (61,)
    assert hidden.grad.dtype == hidden.dtype
    torch.testing.assert_close(ours, full.detach(), rtol=LOGP_TOL[dtype], atol=LOGP_TOL[dtype])

    def error(grad):
        return float((grad.double() - exact.grad).norm() / exact.grad.norm())

    # As for the loss: no less accurate than the full-logits path, measured against fp64.
    assert error(hidden.grad) <= 1.3 * error(full_grad) + 1e-6, (error(hidden.grad), error(full_grad))
    if dtype == torch.float32:
        torch.testing.assert_close(hidden.grad, full_grad, rtol=1e-5, atol=1e-5)


def test_token_logps_are_the_loss_per_token():
    """One pass for both kernels: the gradients they keep are the same tensor (bit for bit, when the backward brings
    the same scale), and the loss is the negated sum of the log-probabilities."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 40, 32, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(97, 32, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 97, (2, 40), generator=g)
    labels[1, :9] = IGNORE_INDEX
    keep = labels[:, 1:].reshape(-1) != IGNORE_INDEX

    loss, count = chunked_causal_lm_loss(hidden, weight, labels, chunk=16)
    (loss * 0.5).backward()
    loss_grad = hidden.grad.clone()
    hidden.grad = None
    logps = chunked_token_logps(hidden[:, :-1].reshape(-1, 32)[keep], weight, labels[:, 1:].reshape(-1)[keep],
                                chunk=16)
    logps.backward(torch.full_like(logps, -0.5))

    assert logps.shape == (count,)
    assert float(-logps.sum()) == pytest.approx(float(loss), rel=1e-6)
    assert torch.equal(hidden.grad, loss_grad)


def test_token_logps_refuse_what_they_cannot_compute():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        chunked_token_logps(hidden, weight, torch.tensor([1, 2, IGNORE_INDEX, 3]))
    with pytest.raises(ValueError, match="frozen"):
        chunked_token_logps(hidden, weight.requires_grad_(), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="one target id per row"):
        chunked_token_logps(hidden, weight.detach(), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="chunk"):
        chunked_token_logps(hidden, weight.detach(), torch.tensor([1, 2, 3, 4]), chunk=-1)
    assert chunked_token_logps(hidden[:0], weight.detach(), torch.tensor([], dtype=torch.long)).shape == (0,)


# ---- sampling temperature (GRPO scores completions under the distribution it sampled them from, as TRL does)

def _tempered_logps(hidden, weight, targets, temperature):
    """log_softmax(full fp32 logits / T) at the targets: the product in the weight's dtype, divided in fp32."""
    logits = (hidden.to(weight.dtype) @ weight.t()).to(torch.promote_types(weight.dtype, torch.float32))
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def _tempered_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(61, 48, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(301, 48, generator=g).to(dtype)
    targets = torch.randint(0, 301, (61,), generator=g)
    grad_out = torch.randn(61, generator=g)
    return hidden, weight, targets, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_token_logps_with_temperature_match_log_softmax(dtype, temperature, chunk):
    hidden, weight, targets, grad_out = _tempered_inputs(dtype)
    full = _tempered_logps(hidden, weight, targets, temperature)
    full.backward(grad_out)
    full_grad = hidden.grad.clone()
    hidden.grad = None
    ours = chunked_token_logps(hidden, weight, targets, temperature, chunk=chunk)
    ours.backward(grad_out)
    exact = hidden.detach().double().requires_grad_()
    _tempered_logps(exact, weight.double(), targets, temperature).backward(grad_out.double())

    assert ours.dtype == torch.float32 and hidden.grad.dtype == dtype
    # Values against the same products divided in fp32: measured 1.2e-7 relative in fp32 and bf16 (5.8e-7 with
    # one-row chunks, another matmul path) for every temperature; the bar is the tests' above (1e-5 / 1e-4).
    torch.testing.assert_close(ours, full.detach(), rtol=LOGP_TOL[dtype], atol=LOGP_TOL[dtype])

    def error(grad):
        return float((grad.double() - exact.grad).norm() / exact.grad.norm())

    # Gradients against fp64, as above: no less accurate than the full-logits path. Measured: fp32 3.6e-7 to
    # 7.1e-7 (full 4.3e-7 to 7.2e-7); bf16 7.3e-3 to 9.2e-3 (full 7.6e-3 to 9.2e-3).
    assert error(hidden.grad) <= 1.3 * error(full_grad) + 1e-6, (error(hidden.grad), error(full_grad))
    if dtype == torch.float32:
        # and the closed form, (softmax(z / T) - one_hot)·W / T per row, scaled by the row's -incoming gradient.
        # With rtol 1e-5 (gradients up to 11.5 here) the atol needed, measured: 9.2e-6 at most (T = 0.7), against
        # the closed form and the full-logits path alike; relative norm of the difference <= 7.1e-7.
        z = (hidden.detach().double() @ weight.double().t()) / temperature
        one_hot = torch.nn.functional.one_hot(targets, z.shape[1]).double()
        closed = -grad_out.double().unsqueeze(1) * ((z.softmax(dim=1) - one_hot) @ weight.double()) / temperature
        torch.testing.assert_close(hidden.grad.double(), closed, rtol=1e-5, atol=3e-5)
        torch.testing.assert_close(hidden.grad, full_grad, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_temperature_one_is_the_call_without_it(dtype):
    """1.0 does nothing extra: values and gradients bit for bit those of the call without a temperature."""
    results = []
    for extra in ({}, {"temperature": 1.0}, {"temperature": 1}):
        hidden, weight, targets, grad_out = _tempered_inputs(dtype, seed=3)
        logps = chunked_token_logps(hidden, weight, targets, chunk=16, **extra)
        logps.backward(grad_out)
        results.append((logps.detach(), hidden.grad))
    for logps, grad in results[1:]:
        assert torch.equal(logps, results[0][0]) and torch.equal(grad, results[0][1])
    # and another temperature does change them
    hidden, weight, targets, _ = _tempered_inputs(dtype, seed=3)
    assert not torch.equal(chunked_token_logps(hidden, weight, targets, 1.3, chunk=16), results[0][0])


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), "hot", None])
def test_token_logps_refuse_a_temperature_that_is_not_positive(temperature):
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="temperature=.*positive finite"):
        chunked_token_logps(hidden, weight, torch.tensor([1, 2, 3, 4]), temperature)
