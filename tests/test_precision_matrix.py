"""The precision matrix: {fp32, fp16, bf16} x {nf4+dq, nf4, fp4, int8, none}, 5 optimizer steps per cell."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from conftest import DTYPES
from qlorakit.upstream.bitsandbytes import own_weight

QUANTS = {  # id -> (quant, double_quant)
    "nf4-dq": ("nf4", True),
    "nf4": ("nf4", False),
    "fp4": ("fp4", False),
    "int8": ("int8", False),
    "none": ("none", False),
}
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# First-step loss vs the unquantized fp32 reference, relative. Measured on this tiny model: 4-bit 0.8-1.6%,
# int8 0.3%, unquantized bf16 0.05%; the bounds leave about 2x headroom.
TOL_VS_FP32_UNQUANTIZED = {"nf4": 3e-2, "fp4": 3e-2, "int8": 1e-2, "none": 2e-3}
# First-step loss vs fp32 with the *same* quantization: isolates the compute dtype's own rounding.
TOL_VS_FP32_SAME_QUANT = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 8e-3}
STEPS = 5


def _quantized_snapshot(model):
    """Every quantized storage tensor and 4-bit statistic, cloned."""
    snap = {}
    for name, module in model.named_modules():
        weight = own_weight(module)
        kind = type(weight).__name__
        if kind == "Params4bit":
            state = weight.quant_state
            snap[name] = [weight.data.clone(), state.absmax.clone()]
            if state.nested:
                snap[name] += [state.state2.absmax.clone(), state.offset.clone()]
        elif kind == "Int8Params":
            # the row scales move from the parameter to the layer's state on the first forward
            scb = weight.SCB if weight.SCB is not None else module.state.SCB
            snap[name] = [weight.data.clone(), scb.clone()]
    return snap


def _train(model_dir, dtype, quant, double_quant, batch):
    torch.manual_seed(0)
    model, _ = qlorakit.load(model_dir, quant=quant, double_quant=double_quant, dtype=dtype, device="cpu")
    model = qlorakit.add_lora(model, rank=8, alpha=16)
    before = _quantized_snapshot(model)
    step = qlorakit.TrainStep(model, lr=1e-2)
    results = [step(batch) for _ in range(STEPS)]
    assert not any(r.skipped for r in results)  # fp16: the scaler's start scale does not overflow
    return model, step, before, [r.loss for r in results]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_batch):
    """First-step losses in fp32 for every quantization kind."""
    out = {}
    for qid, (quant, dq) in QUANTS.items():
        out[qid] = _train(tiny_model_dir, "fp32", quant, dq, tiny_batch)[3][0]
    return out


@pytest.mark.parametrize("qid", list(QUANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cell(tiny_model_dir, tiny_batch, reference, dtype, qid):
    quant, double_quant = QUANTS[qid]
    compute = TORCH[dtype]
    model, step, before, losses = _train(tiny_model_dir, dtype, quant, double_quant, tiny_batch)
    precision = qlorakit.precision_of(model)
    assert precision.compute == compute

    # 1. every 4-bit layer dequantizes to the compute dtype
    n4 = 0
    for _, module in model.named_modules():
        if type(own_weight(module)).__name__ == "Params4bit":
            n4 += 1
            state = module.weight.quant_state
            assert state.dtype == compute and module.compute_dtype == compute
            assert state.quant_type == quant and state.blocksize == 64 and state.nested == double_quant
    assert n4 == (14 if quant in ("nf4", "fp4") else 0)  # 2 layers x 7 projections
    n8 = sum(type(own_weight(m)).__name__ == "Int8Params" for m in model.modules())
    assert n8 == (14 if quant == "int8" else 0)

    # 2. trainable parameters have the policy's dtype: fp32 under fp32 and fp16, bf16 under bf16
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 28 and all("lora_" in n for n in trainable)
    expected = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert set(trainable.values()) == {expected}
    # frozen non-quantized weights (norms, embeddings, head) are in the compute dtype
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point]
    assert frozen and all(p.dtype == compute for p in frozen)

    # 3. base weights are still quantized, frozen, and bit-identical after 5 steps
    after = _quantized_snapshot(model)
    assert before.keys() == after.keys()
    for name in before:
        for a, b in zip(before[name], after[name]):
            assert torch.equal(a, b), f"{name} changed during training"

    # GradScaler exactly for fp16
    assert (step.scaler is not None and step.scaler.is_enabled()) == (dtype == "fp16")

    # loss finite, lower after 5 steps, and close to the references
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    ref_unquantized = reference["none"]
    assert abs(losses[0] - ref_unquantized) / ref_unquantized <= TOL_VS_FP32_UNQUANTIZED[quant], (losses[0], reference)
    ref_same = reference[qid]
    assert abs(losses[0] - ref_same) / ref_same <= TOL_VS_FP32_SAME_QUANT[dtype], (losses[0], ref_same)
