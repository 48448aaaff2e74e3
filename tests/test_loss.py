"""loss.token_logps: each trained next token's log-probability, through the chunked kernel or the full logits, equal
to log_softmax of the model's full logits, on padded and packed batches."""

from __future__ import annotations

import pytest
import torch

import qlorakit
import qlorakit.upstream.transformers as upstream
from conftest import randomize_lora_b
from qlorakit.data import IGNORE_INDEX
from qlorakit.loss import token_logps
from qlorakit.precision import dtype_name


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def model(request, tiny_model_dir):
    torch.manual_seed(0)
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype=request.param, device="cpu")
    model = randomize_lora_b(qlorakit.add_lora(model, rank=4, alpha=8), std=0.05)
    assert not isinstance(upstream.plain_output_head(model), str)  # token_logps takes the chunked kernel's path
    return model


def _padded():
    """Two rows, the second 7 tokens shorter (right-padded), the first one's 5-token prompt untrained."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 256, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 13:], mask[1, 13:] = 0, 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :5] = IGNORE_INDEX
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(20).expand(2, -1),
              "use_cache": False}
    sequences = torch.tensor([[0] * 20, [1] * 13 + [-1] * 7])
    return inputs, labels, sequences


def _packed():
    """One row of three sequences (9, 12 and 7 tokens), position ids restarting at each; each one's first label and
    a 3-token prompt untrained, as data/batches.py packs them."""
    g = torch.Generator().manual_seed(6)
    lengths = (9, 12, 7)
    ids = torch.randint(4, 256, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.masked_fill(positions < 3, IGNORE_INDEX)
    sequences = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}, labels, sequences


def _reference(model, inputs, labels, temperature=1.0):
    """log_softmax of the model's full logits in fp32 (divided by the temperature), gathered at the trained next
    tokens."""
    logits = model(**inputs).logits[:, :-1].float() / temperature
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return logps[trained], trained.reshape(-1)


def _run(model, compute, inputs, labels):
    """(log-probabilities, trained positions, LoRA gradients of a random per-token weighting of them)."""
    model.zero_grad(set_to_none=True)
    with qlorakit.precision_of(model).autocast():
        logps, trained = compute(model, inputs, labels)
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(7))
    (logps * weights).sum().backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
    return logps.detach(), trained, grads


# Values: the same lm_head products in both paths, log-sum-exp summed in another order; measured 1e-6 absolute in
# fp32 and bf16. LoRA gradients, as the norm of the difference relative to the reference's: measured fp32 8e-7; bf16
# 1e-2, the gradient rounded to bf16 at other points of the backward (the kernel's accuracy against fp64 is
# test_kernels_cross_entropy's).
TOL = {"fp32": dict(rtol=1e-5, atol=1e-5), "bf16": dict(rtol=1e-4, atol=1e-4)}
GRAD_TOL = {"fp32": 1e-5, "bf16": 2e-2}


def _assert_grads_close(grads, expected, dtype):
    difference = float((grads - expected).norm() / expected.norm())
    assert difference <= GRAD_TOL[dtype], difference


@pytest.mark.parametrize("batch", [_padded, _packed], ids=["padded", "packed"])
def test_token_logps_equal_the_full_logits(model, batch):
    inputs, labels, sequences = batch()
    dtype = dtype_name(qlorakit.precision_of(model).compute)
    logps, trained, grads = _run(model, token_logps, inputs, labels)
    ref, ref_trained, ref_grads = _run(model, _reference, inputs, labels)

    assert logps.dtype == torch.float32 and trained.dtype == torch.bool
    assert torch.equal(trained, ref_trained) and logps.shape == (int(trained.sum()),)
    torch.testing.assert_close(logps, ref, **TOL[dtype])
    _assert_grads_close(grads, ref_grads, dtype)

    # summed per sequence, as preference losses do
    owner = sequences[:, 1:].reshape(-1)[trained]
    assert bool((owner >= 0).all())
    count = int(sequences.max()) + 1
    sums = torch.zeros(count).index_add(0, owner, logps)
    expected = torch.zeros(count).index_add(0, owner, ref)
    torch.testing.assert_close(sums, expected, **TOL[dtype])


def test_token_logps_from_full_logits_when_the_head_is_not_plain(model, monkeypatch):
    """Soft-capped, scaled or tied heads: log_softmax of the model's logits, in fp32."""
    inputs, labels, _ = _packed()
    chunked = _run(model, token_logps, inputs, labels)
    monkeypatch.setattr(upstream, "plain_output_head", lambda model: "the logits are soft-capped or scaled")
    full = _run(model, token_logps, inputs, labels)
    dtype = dtype_name(qlorakit.precision_of(model).compute)

    assert full[0].dtype == torch.float32 and torch.equal(full[1], chunked[1])
    torch.testing.assert_close(full[0], chunked[0], **TOL[dtype])
    _assert_grads_close(full[2], chunked[2], dtype)


def test_packed_sequences_score_as_alone(tiny_model_dir):
    """The packed row's per-sequence sums are each sequence's own: nothing is attended or scored across them."""
    torch.manual_seed(0)
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    model = randomize_lora_b(qlorakit.add_lora(model, rank=4, alpha=8), std=0.05)
    inputs, labels, sequences = _packed()
    with torch.no_grad():
        logps, trained = token_logps(model, inputs, labels)
        owner = sequences[:, 1:].reshape(-1)[trained]
        sums = torch.zeros(3).index_add(0, owner, logps)
        alone = []
        for i in range(3):
            cols = sequences[0] == i
            one = {"input_ids": inputs["input_ids"][:, cols], "position_ids": inputs["position_ids"][:, cols],
                   "use_cache": False}
            alone.append(token_logps(model, one, labels[:, cols])[0].sum())
    # the same tokens through the same weights, in other matmul shapes (measured: equal)
    torch.testing.assert_close(sums, torch.stack(alone), rtol=1e-5, atol=1e-5)


# ---- sampling temperature: GRPO's log-probabilities are those of logits / T (as TRL's)

@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("path", ["chunked", "full logits"])
def test_token_logps_with_temperature_equal_the_tempered_logits(model, temperature, path, monkeypatch):
    if path == "full logits":  # as a soft-capped, scaled or tied head takes it
        monkeypatch.setattr(upstream, "plain_output_head", lambda model: "the logits are soft-capped or scaled")
    inputs, labels, _ = _padded()
    dtype = dtype_name(qlorakit.precision_of(model).compute)
    logps, trained, grads = _run(model, lambda *a: token_logps(*a, temperature=temperature), inputs, labels)
    ref, ref_trained, ref_grads = _run(model, lambda *a: _reference(*a, temperature=temperature), inputs, labels)
    untempered = _run(model, token_logps, inputs, labels)[0]

    assert logps.dtype == torch.float32 and torch.equal(trained, ref_trained)
    # Values: the untempered comparison's tolerance; measured (chunked path) 9.5e-7 absolute in fp32, 1.9e-6 in
    # bf16; the full-logits path is the reference's arithmetic (measured: equal). LoRA gradients, relative norm of
    # the difference: measured fp32 7.8e-7, bf16 1.4e-2 (T = 1.3, padded; 0.7 gives 1.3e-2), so bf16 is held to
    # 3e-2 here, not the untempered tests' 2e-2.
    torch.testing.assert_close(logps, ref, **TOL[dtype])
    difference = float((grads - ref_grads).norm() / ref_grads.norm())
    assert difference <= {"fp32": 1e-5, "bf16": 3e-2}[dtype], difference
    assert float((logps - untempered).abs().max()) > 1e-2  # the temperature took effect


@pytest.mark.parametrize("path", ["chunked", "full logits"])
def test_token_logps_temperature_one_is_the_call_without_it(model, path, monkeypatch):
    if path == "full logits":
        monkeypatch.setattr(upstream, "plain_output_head", lambda model: "the logits are soft-capped or scaled")
    inputs, labels, _ = _packed()
    plain = _run(model, token_logps, inputs, labels)
    one = _run(model, lambda *a: token_logps(*a, temperature=1.0), inputs, labels)
    assert all(torch.equal(a, b) for a, b in zip(plain, one))


@pytest.mark.parametrize("temperature", [0, -0.5, float("nan"), "1.0"])
def test_token_logps_refuse_a_temperature_that_is_not_positive(model, temperature):
    inputs, labels, _ = _packed()
    with pytest.raises(ValueError, match="temperature=.*positive finite"):
        token_logps(model, inputs, labels, temperature=temperature)
