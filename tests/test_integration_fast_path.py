"""The default model (SmolLM2-135M-Instruct, NF4 + double quantization) takes qlorakit's kernels everywhere: every
LoRA linear layer, gated MLP, q/k/v block and RMSNorm, the packed attention and the chunked loss — in training and
evaluation, in each compute dtype. A change upstream that made any of them fall back fails here, by name."""

from __future__ import annotations

import pytest

import qlorakit
from qlorakit.load import DEFAULT_MODEL

pytestmark = pytest.mark.integration

LAYERS = 30  # SmolLM2-135M's decoder layers


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_the_default_model_is_100_percent_fused(dtype):
    model, _ = qlorakit.load(DEFAULT_MODEL, quant="nf4", dtype=dtype, device="cpu")
    model = qlorakit.add_lora(model, rank=16, alpha=32, dropout=0.0)
    expected = {"LoRA linear": 7 * LAYERS, "gated MLP": LAYERS, "q/k/v": LAYERS, "RMSNorm": 2 * LAYERS + 1,
                "attention": 1, "loss": 1}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        report = qlorakit.fast_path_report(model)
        assert report.total == expected, mode
        assert report.fully_fused, report.describe()
