"""Adapter directories as merge reads them (damaged settings files, PEFT's lora_bias), and numbers checked by one
rule wherever they come from. Every case is listed, with its message, in docs/errors.md."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import qlorakit
from conftest import save_tiny_bpe_model
from qlorakit.cli import main
from qlorakit.config import TrainConfig
from qlorakit.errors import ConfigError, QLoraKitError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_bpe_model(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_bpe_model(tmp_path_factory.mktemp("qwen") / "base", arch="qwen2")


def _peft_adapter(base, out, lora_bias=False):
    """A PEFT LoRA adapter on q/v_proj with trained-looking (random) B and B bias, plus the qlorakit.json a
    training run in fp32 without quantization writes. Returns (adapter directory, the PEFT model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_bias=lora_bias)
    with warnings.catch_warnings():  # PEFT warns that a Llama layer without a bias cannot be merged
        warnings.simplefilter("ignore")
        model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    (Path(out) / "qlorakit.json").write_text(json.dumps(
        {"base_model": str(base), "quant": "none", "double_quant": False, "dtype": "fp32"}))
    return Path(out), model


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    return _peft_adapter(llama, tmp_path_factory.mktemp("adapter") / "adapter")[0]


def _damaged(adapter, tmp, file, content):
    copy = tmp / "damaged"
    shutil.copytree(adapter, copy)
    (copy / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return copy


def _merge(adapter, tmp, **kw):
    return qlorakit.merge(adapter, tmp / "merged", dtype="fp32", **(QUIET | kw))


# (case, how to provoke it (tmp_path, adapter directory), what the message must say)
CASES = [
    ("adapter qlorakit.json not valid JSON", lambda t, a: _merge(_damaged(a, t, "qlorakit.json", '{"quant": '), t),
     r"qlorakit\.json: not valid JSON \(line 1, column 11: Expecting value\), so what qlorakit recorded about the "
     r"base cannot be read; restore it from the training run's --output directory, or save the adapter again"),
    ("adapter qlorakit.json not a JSON object", lambda t, a: _merge(_damaged(a, t, "qlorakit.json", "[1, 2]"), t),
     r"qlorakit\.json: a JSON list, not the object of what qlorakit recorded about the base; restore it"),
    ("adapter settings file not UTF-8", lambda t, a: _merge(_damaged(a, t, "qlorakit.json", b'{"quant": "\xff"}'), t),
     r"qlorakit\.json: not UTF-8 text \(byte 11\), so what qlorakit recorded about the base cannot be read"),
    ("adapter_config.json not valid JSON",
     lambda t, a: _merge(_damaged(a, t, "adapter_config.json", "{'r': 2}"), t, base="original"),
     r"adapter_config\.json: not valid JSON \(line 1, column 2: .*\), so PEFT's adapter settings cannot be read"),
    ("adapter qlorakit.json field of the wrong kind",
     lambda t, a: _merge(_damaged(a, t, "qlorakit.json", json.dumps(
         {"base_model": str(_LLAMA[0]), "quant": "nf4" * 100_000, "double_quant": True, "dtype": "fp32"})), t),
     r"qlorakit\.json: 'quant' is 'nf4nf4.*\.\.\..*' \(expected nf4, fp4, int8, none\), so the quantized base"),
    ("adapter qlorakit.json base_model not a string",
     lambda t, a: _merge(_damaged(a, t, "qlorakit.json", json.dumps({"base_model": [1] * 100})), t),
     r"qlorakit\.json: 'base_model' is \[1, 1, 1, 1, 1, 1, \.\.\.\], not a path or model name; fix the file, or "
     r"pass the base model with --model"),
    ("lora_bias adapter on a layer without a bias", lambda t, a: _merge(_lora_bias_llama(t), t),
     r"the adapter was trained with lora_bias=True: its model\.layers\.0\.self_attn\.q_proj has "
     r"a lora_B bias, which a merge adds to the layer's bias, but that layer has no bias in .*; use the adapter "
     r"unmerged \(qlorakit chat/eval --adapter\), or train without lora_bias"),
    ("lora_B bias of the wrong shape", lambda t, a: _merge(_with_bias(a, t, torch.zeros(3)), t),
     r"adapter_model\.safetensors: model\.layers\.0\.self_attn\.q_proj: lora_B's bias is \(3,\), not \(64,\) like "
     r"lora_B's rows"),
    ("fewer prompt names than prompts (Python API)", lambda t, a: _generate_with_names(a, ["one"]),
     r"names: 1 names for 2 prompts; give one name per prompt \(or none\)"),
    ("TrainStep learning rate above 1 (Python API)", lambda t, a: qlorakit.TrainStep(_lora(a), lr=5.0),
     r"^lr=5\.0 must be a finite number in \[0, 1\] \(typical for LoRA: 1e-4 to 1e-3\)$"),
]


def _lora_bias_llama(tmp):
    return _peft_adapter(_LLAMA[0], tmp / "bias_adapter", lora_bias=True)[0]


def _with_bias(adapter, tmp, bias):
    from safetensors.torch import load_file, save_file

    copy = _damaged(adapter, tmp, "qlorakit.json", (adapter / "qlorakit.json").read_bytes())
    tensors = load_file(copy / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = bias
    save_file(tensors, copy / "adapter_model.safetensors")
    return copy


def _lora(adapter):
    model, _ = qlorakit.load(_LLAMA[0], quant="none", dtype="fp32", device="cpu")
    return qlorakit.add_lora(model, rank=2, alpha=4)


def _generate_with_names(adapter, names):
    model, tokenizer = qlorakit.load(_LLAMA[0], quant="none", dtype="fp32", device="cpu")
    return qlorakit.generate(model, tokenizer, ["first prompt", "second prompt"], max_new_tokens=2, names=names)


_LLAMA: list = []


@pytest.fixture(autouse=True)
def _remember_llama(llama):
    _LLAMA[:] = [llama]


@pytest.mark.parametrize("case, provoke, message", CASES, ids=[c[0] for c in CASES])
def test_refused_with_a_clear_bounded_message(tmp_path, adapter, case, provoke, message):
    with pytest.raises(QLoraKitError) as e:
        provoke(tmp_path, adapter)
    assert re.search(message, str(e.value)), str(e.value)
    assert len(str(e.value)) < 800  # a value as large as a file never goes whole into a message
    assert not (tmp_path / "merged").exists()


def test_every_case_is_documented():
    docs = DOCS.read_text()
    missing = [case for case, _, _ in CASES if f"| {case} |" not in docs]
    assert not missing, missing


@pytest.mark.parametrize("file, content", [("qlorakit.json", "[1, 2]"), ("qlorakit.json", "{"),
                                           ("adapter_config.json", b"\xff\xfe")])
def test_cli_merge_of_a_damaged_adapter_exits_2_without_a_traceback(tmp_path, adapter, capsys, file, content):
    damaged = _damaged(adapter, tmp_path, file, content)
    assert main(["merge", "--adapter", str(damaged), "--output", str(tmp_path / "merged"), "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"qlorakit: error: .*{re.escape(file)}: (not valid JSON|a JSON list|not UTF-8)", err), err
    assert "Traceback" not in err and not (tmp_path / "merged").exists()


def test_lora_bias_adapter_merges_as_peft_merges_it(qwen, tmp_path):
    """An adapter with PEFT's lora_bias on Qwen2's q/v_proj (which have biases): qlorakit's merge adds s·b_B to
    each layer's bias as PEFT's merge_and_unload does; the merged models' logits agree within fp32 rounding
    (bound 1e-5 relative), in both bases (the recorded quant is none, so they are the same fp32 weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, model = _peft_adapter(qwen, tmp_path / "adapter", lora_bias=True)
    ids = torch.tensor([AutoTokenizer.from_pretrained(qwen)("merge the bias of lora b")["input_ids"]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        expected = model.merge_and_unload()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)(input_ids=ids).logits
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(unmerged, expected) < 1e-5 and rel(plain, expected) > 1e-2  # the bias delta matters
    for base in ("quantized", "original"):
        merged = _merge(adapter, tmp_path / base, base=base)
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits
        assert rel(logits, expected) < 1e-5, base


def test_number_ranges_are_one_rule_wherever_the_value_comes_from(tmp_path, adapter):
    """The same bad value gets the same message from a config, add_lora and TrainStep; TrainStep alone allows
    lr=0 (a step that moves nothing)."""
    model = _lora(adapter)

    def message(call):
        with pytest.raises(ConfigError) as e:
            call()
        return str(e.value).removeprefix("config: ")

    for key, value in (("alpha", 0), ("alpha", float("inf")), ("dropout", 1.0)):
        base, _ = qlorakit.load(_LLAMA[0], quant="none", dtype="fp32", device="cpu")
        assert message(lambda: TrainConfig.build(None, **{key: value})) == \
            message(lambda: qlorakit.add_lora(base, **{key: value})), (key, value)
    for key, value in (("weight_decay", float("nan")), ("weight_decay", -0.1), ("max_grad_norm", 0.0)):
        assert message(lambda: TrainConfig.build(None, **{key: value})) == \
            message(lambda: qlorakit.TrainStep(model, **{key: value})), (key, value)
    for value in (5.0, float("nan")):  # lr: (0, 1] for a run, [0, 1] for TrainStep
        assert message(lambda: TrainConfig.build(None, lr=value)).replace("(0, 1]", "[0, 1]") == \
            message(lambda: qlorakit.TrainStep(model, lr=value)), value
    assert message(lambda: TrainConfig.build(None, lr=0.0)).startswith("lr=0.0 must be a finite number in (0, 1]")
    qlorakit.TrainStep(model, lr=0.0)


def test_a_gguf_key_as_large_as_the_file_is_shown_bounded(tmp_path, monkeypatch):
    """A GGUF metadata key of 200,000 characters with a value of unknown type: the message names the key
    shortened (errors.show), not whole."""
    import struct

    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    key = b"k" * 200_000
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<I", 99) + bytes(64))
    with pytest.raises(QLoraKitError, match=r"the value of 'kkkk.*\.\.\..*k' has an unknown type 99") as e:
        qlorakit.load(str(path), device="cpu")
    assert len(str(e.value)) < 800
