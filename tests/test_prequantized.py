"""The seed's bug: a checkpoint quantized in bf16 reloaded for fp16 (or fp32) training.

bitsandbytes stores each 4-bit layer's quant_state with the dtype it was quantized in; reloaded as-is, the layers
dequantize to bf16 while fp16 activations flow in. qlorakit rewrites the state at load time (rule 1).
"""

from __future__ import annotations

import pytest
import torch

import qlorakit
from qlorakit.upstream.bitsandbytes import own_weight


def _state_dtypes(model):
    return {
        type(own_weight(m)).__name__ == "Params4bit" and own_weight(m).quant_state.dtype
        for m in model.modules()
        if type(own_weight(m)).__name__ == "Params4bit"
    }


@pytest.fixture(scope="module")
def bf16_quantized_dir(tiny_model_dir, tmp_path_factory):
    """A tiny model quantized to NF4 (double quant) in bf16 by bitsandbytes through transformers, then saved,
    like the '-bnb-4bit' checkpoints people download."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=config, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    out = tmp_path_factory.mktemp("tiny-bnb-4bit")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_plain_reload_keeps_the_stored_bf16_state(bf16_quantized_dir):
    """Without qlorakit, asking transformers for fp16 leaves layers dequantizing to bf16: the bug is real here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_quantized_dir, dtype=torch.float16, device_map={"": "cpu"})
    assert _state_dtypes(model) == {torch.bfloat16}
    with pytest.raises(qlorakit.PrecisionError, match="rule 1"):
        qlorakit.Precision.resolve("fp16", device="cpu").check(model)


@pytest.mark.parametrize("dtype, compute", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_reload_follows_requested_dtype(bf16_quantized_dir, tiny_batch, dtype, compute):
    model, _ = qlorakit.load(bf16_quantized_dir, quant="nf4", dtype=dtype, device="cpu")
    assert _state_dtypes(model) == {compute}
    for m in model.modules():
        if type(own_weight(m)).__name__ == "Params4bit":
            assert m.compute_dtype == compute
            assert m.weight.quant_state.nested  # the checkpoint's double quantization is kept
    model = qlorakit.add_lora(model, rank=4, alpha=8)
    step = qlorakit.TrainStep(model, lr=1e-2)
    first = step(tiny_batch)
    second = step(tiny_batch)
    assert torch.isfinite(torch.tensor([first.loss, second.loss])).all()
    assert first.grad_norm > 0 and not first.skipped
    assert second.loss < first.loss
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora)  # the optimizer step moved the adapters
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_reload_with_other_quant_kind_is_refused(bf16_quantized_dir):
    with pytest.raises(qlorakit.ConfigError, match="already quantized as nf4.*quant='nf4'"):
        qlorakit.load(bf16_quantized_dir, quant="int8", dtype="fp32", device="cpu")
