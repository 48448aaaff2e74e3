"""Precision.resolve / apply / check, and the refusals that happen before the first step."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from qlorakit import Precision, PrecisionError
from qlorakit.precision import cpu_auto_dtype, cpu_has_native_bf16


@pytest.mark.parametrize(
    "dtype, adapter, scaler, autocast",
    [
        ("fp32", torch.float32, False, False),
        ("bf16", torch.bfloat16, False, True),
        ("fp16", torch.float32, True, True),
    ],
)
def test_table(dtype, adapter, scaler, autocast):
    p = Precision.resolve(dtype, device="cpu")
    assert p.adapter == adapter
    assert p.uses_grad_scaler == scaler and (p.grad_scaler() is not None) == scaler
    assert p.uses_autocast == autocast


def test_bf16_fp32_masters_on_request():
    assert Precision.resolve("bf16", adapter_dtype="fp32", device="cpu").adapter == torch.float32


def test_cpu_auto_rule():
    # the documented rule: bf16 only with native bf16 units, and then only if measured faster
    auto = Precision.resolve("auto", device="cpu").compute
    assert auto == cpu_auto_dtype()
    if not cpu_has_native_bf16():
        assert auto == torch.float32
    else:
        assert auto in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize(
    "dtype, adapter_dtype, match",
    [
        ("fp16", "bfloat16", "GradScaler rule.*adapter_dtype='auto'"),
        ("fp16", "fp16", "GradScaler rule"),
        ("fp32", "bf16", "under fp32 compute every trainable parameter is fp32"),
        ("bf16", "fp16", "not in the policy"),
        ("int4", "auto", "dtype='int4'|dtype=.int4. is not a floating dtype"),
    ],
)
def test_refused_combinations(dtype, adapter_dtype, match):
    with pytest.raises(PrecisionError, match=match):
        Precision.resolve(dtype, adapter_dtype=adapter_dtype, device="cpu")


def test_add_lora_refuses_bf16_adapters_under_fp16(tiny_model_dir):
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp16", device="cpu")
    with pytest.raises(PrecisionError, match=r"adapter_dtype=bf16 with dtype=fp16 breaks the GradScaler rule"):
        qlorakit.add_lora(model, adapter_dtype="bfloat16")


def _adapted(model_dir, dtype, quant="nf4"):
    model, _ = qlorakit.load(model_dir, quant=quant, dtype=dtype, device="cpu")
    return qlorakit.add_lora(model, rank=4, alpha=8)


def test_check_names_a_cast_adapter_before_the_first_step(tiny_model_dir):
    model = _adapted(tiny_model_dir, "fp16")
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    param.data = param.data.to(torch.bfloat16)  # what TRL does to quantized models
    with pytest.raises(PrecisionError, match=rf"{name}: trainable parameter is bf16 \(rule 2"):
        qlorakit.TrainStep(model)


def test_check_refuses_a_stale_quant_state(tiny_model_dir):
    model = _adapted(tiny_model_dir, "fp16")
    layer = model.base_model.model.model.layers[1].mlp.down_proj.base_layer
    layer.weight.quant_state.dtype = torch.bfloat16
    with pytest.raises(PrecisionError, match=r"layers\.1\.mlp\.down_proj.*dequantizes to bf16.*rule 1"):
        qlorakit.TrainStep(model)
    qlorakit.precision_of(model).apply(model)  # apply repairs it
    qlorakit.TrainStep(model)


@pytest.mark.parametrize("dtype, scaler_on", [("fp16", False), ("bf16", True), ("fp32", True)])
def test_check_scaler_rule(tiny_model_dir, dtype, scaler_on):
    model = _adapted(tiny_model_dir, dtype)
    scaler = torch.amp.GradScaler("cpu") if scaler_on else None
    with pytest.raises(PrecisionError, match="rule 2: a GradScaler is on exactly when the compute dtype is fp16"):
        qlorakit.precision_of(model).check(model, scaler)


@pytest.mark.parametrize("quant", ["int8", "none"])
def test_check_refuses_a_trainable_base_weight(tiny_model_dir, quant):
    model = _adapted(tiny_model_dir, "fp32", quant=quant)
    model.base_model.model.model.norm.weight.requires_grad = True
    with pytest.raises(PrecisionError, match=r"model\.norm\.weight: base weight is trainable \(rule 3"):
        qlorakit.precision_of(model).check(model, None)


def test_check_refuses_a_model_with_nothing_to_train(tiny_model_dir):
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    with pytest.raises(PrecisionError, match="no trainable parameters; add adapters"):
        qlorakit.TrainStep(model)


def test_model_without_policy_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(PrecisionError, match="no qlorakit precision policy; load it with qlorakit.load"):
        qlorakit.add_lora(model)


def test_frozen_weights_follow_compute_dtype_and_norms_compute_in_fp32(tiny_model_dir):
    model = _adapted(tiny_model_dir, "fp16")
    norm = model.base_model.model.model.norm
    assert norm.weight.dtype == torch.float16
    x = torch.full((1, 2, 64), 300.0, dtype=torch.float16)  # x**2 overflows fp16; fp32 inside the norm does not
    assert torch.isfinite(norm(x)).all()


def test_rslora_and_targets(tiny_model_dir):
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4, alpha=8, targets="q_proj,v_proj", rslora=True)
    names = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank=0 must be a positive integer"),
        ({"alpha": -1}, "alpha=-1 must be a positive finite number"),
        ({"dropout": 1.5}, r"dropout=1.5 must be a finite number in \[0, 1\)"),
        ({"targets": "nonexistent_proj"}, "matches no layer.*q_proj"),
        ({"targets": []}, "use 'all-linear' or module names"),
    ],
)
def test_add_lora_bad_arguments(tiny_model_dir, kwargs, match):
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    with pytest.raises(qlorakit.ConfigError, match=match):
        qlorakit.add_lora(model, **kwargs)
