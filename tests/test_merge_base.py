"""What you trained is what you ship: `merge` and `export_gguf` add an adapter's delta to the base it was trained
against — the source quantized and dequantized exactly as the training run did — unless asked for the original
weights. Checked on tiny random models: the rebuilt base is bit-equal to what qlorakit.load dequantizes, the merged
model loaded in plain transformers reproduces the evaluated model's logits, and bad requests are refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlorakit
from conftest import save_tiny_bpe_model
from qlorakit.adapters import load_adapter
from qlorakit.errors import QLoraKitError
from qlorakit.upstream.bitsandbytes import dequantize

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROWS = [{"messages": [{"role": "user", "content": f"export number {i} as a gguf file"},
                      {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}]}
        for i in range(16)]
PROMPT = "merge the low rank update into the base weights"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_bpe_model(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def nf4_base(base, tmp_path_factory):
    """The base saved already quantized (bf16 compute, no double quantization), as `qlorakit quantize` writes it."""
    model, tokenizer = qlorakit.load(base, quant="nf4", double_quant=False, dtype="bf16", device="cpu")
    return qlorakit.save_quantized(model, tokenizer, tmp_path_factory.mktemp("nf4") / "base")


def _train(base, output, quant, dtype="fp32"):
    data = output.parent / f"{output.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    qlorakit.train(model=str(base), data=str(data), output=str(output), quant=quant, dtype=dtype, device="cpu",
                   rank=4, alpha=8, lr=3e-2, batch_size=4, max_steps=3, seed=0, progress=False, **QUIET)
    return output


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {quant: _train(base, root / quant, quant) for quant in ("nf4", "int8")}


def _ids(model_dir):
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]])


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------------------------- the rebuilt base


@pytest.mark.parametrize("quant, double_quant, dtype, stored", [
    ("nf4", True, "bf16", False), ("nf4", False, "fp16", False), ("fp4", True, "fp32", False),
    ("int8", False, "bf16", False), ("int8", False, "fp16", False), ("nf4", False, "fp16", True),
    ("none", False, "bf16", False),
])
def test_quantized_base_is_bit_equal_to_what_training_holds(base, nf4_base, quant, double_quant, dtype, stored):
    """Every tensor of the rebuilt base equals, bit for bit, what a model from qlorakit.load holds: the dequantized
    weight of each quantized layer (as the fused LoRA kernel dequantizes it) and every other weight in the compute
    dtype. `stored`: the source is a bitsandbytes checkpoint (quantized in bf16, loaded in fp16); quant 'none':
    the weights in the compute dtype only."""
    from qlorakit.export.source import QuantizedBase

    source = nf4_base if stored else base
    compute = DTYPES[dtype]
    model, _ = qlorakit.load(source, quant=quant, double_quant=double_quant, dtype=dtype, device="cpu")
    rebuilt = QuantizedBase(source, quant, double_quant, compute)
    modules = dict(model.named_modules())
    quantized = {f"{name}.weight" for name, m in modules.items()
                 if type(getattr(m, "weight", None)).__name__ in ("Params4bit", "Int8Params")}
    assert len(quantized) == (0 if quant == "none" else 14) and quantized <= set(rebuilt.names)
    parameters = dict(model.named_parameters())
    for name in rebuilt.names:
        tensor = rebuilt.get(name)
        assert tensor.dtype == torch.float32
        if name in quantized:
            expected = dequantize(modules[name[: -len(".weight")]]).to(compute)
        else:
            expected = parameters[name].detach()
            assert expected.dtype == compute
        assert torch.equal(tensor, expected.float()), name


# ---------------------------------------------------------------------------------------------- merged models


def _plain_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(input_ids=ids).logits


def _qlorakit_logits(base, adapter, ids, quant):
    model, _ = qlorakit.load(base, quant=quant, dtype="fp32", device="cpu")
    model = load_adapter(model, adapter)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("quant", ("nf4", "int8"))
def test_merged_model_computes_what_the_trained_model_computes(base, adapters, tmp_path, quant):
    """Merged in fp32 into the default base and loaded with plain transformers, the model gives the logits of the
    one trained and evaluated (qlorakit.load(quant) + the adapter, fp32 compute) within fp32 rounding (measured
    ~2e-6 relative; the bound is 1e-5). Merged into the original weights it is another model (> 1e-3 away),
    the one the unquantized base plus adapter computes."""
    adapter, ids = adapters[quant], _ids(base)
    trained = qlorakit.merge(adapter, tmp_path / "trained", dtype="fp32", **QUIET)
    evaluated = _qlorakit_logits(base, adapter, ids, quant)
    assert _rel(_plain_logits(trained, ids), evaluated) < 1e-5
    original = qlorakit.merge(adapter, tmp_path / "original", dtype="fp32", base="original", **QUIET)
    assert _rel(_plain_logits(original, ids), evaluated) > 1e-3
    assert _rel(_plain_logits(original, ids), _qlorakit_logits(base, adapter, ids, "none")) < 1e-5


def test_adapter_trained_on_a_quantized_checkpoint_merges_into_its_stored_codes(nf4_base, tmp_path):
    """An adapter trained on a bitsandbytes checkpoint in fp32 compute merges into those codes, dequantized in
    fp32 (they were quantized under bf16): the merged model computes what the trained one does."""
    adapter = _train(nf4_base, tmp_path / "adapter", "nf4")
    merged = qlorakit.merge(adapter, tmp_path / "merged", dtype="fp32", **QUIET)
    ids = _ids(nf4_base)
    assert _rel(_plain_logits(merged, ids), _qlorakit_logits(nf4_base, adapter, ids, "nf4")) < 1e-5


def test_gguf_export_from_an_adapter_takes_the_same_base(adapters, tmp_path):
    """export_gguf(adapter=...) writes the tensors merge writes, for either base (f16, an unpermuted matrix)."""
    import gguf

    adapter, name = adapters["nf4"], "model.layers.0.mlp.down_proj.weight"
    for choice in ("quantized", "original"):
        path = qlorakit.export_gguf(tmp_path / f"{choice}.gguf", adapter=adapter, base=choice, **QUIET)
        merged = qlorakit.merge(adapter, tmp_path / choice, dtype="fp32", base=choice, **QUIET)
        tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
        written = torch.from_numpy(tensor.data.copy()).reshape(load_file(merged / "model.safetensors")[name].shape)
        assert torch.equal(written, load_file(merged / "model.safetensors")[name].half()), choice
    trained, original = (load_file(tmp_path / c / "model.safetensors")[name] for c in ("quantized", "original"))
    assert not torch.equal(trained, original)


def test_command_line_base_flag(adapters, tmp_path, capsys):
    from qlorakit.cli import main

    adapter = str(adapters["nf4"])
    assert main(["merge", "--adapter", adapter, "--output", str(tmp_path / "cli"), "--dtype", "fp32",
                 "--base", "original"]) == 0
    api = qlorakit.merge(adapter, tmp_path / "api", dtype="fp32", base="original", **QUIET)
    a, b = load_file(tmp_path / "cli" / "model.safetensors"), load_file(api / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert main(["export", "gguf", "--adapter", adapter, "--output", str(tmp_path / "m.gguf"), "--base",
                 "original"]) == 0
    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    (foreign / "qlorakit.json").unlink()
    assert main(["merge", "--adapter", str(foreign), "--output", str(tmp_path / "x")]) == 2
    assert "no qlorakit.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- bad requests


def _copy_adapter(adapters, tmp, edit=None, drop=False):
    adapter = tmp / "adapter"
    shutil.copytree(adapters["nf4"], adapter)
    if drop:
        (adapter / "qlorakit.json").unlink()
    elif edit is not None:
        saved = json.loads((adapter / "qlorakit.json").read_text())
        (adapter / "qlorakit.json").write_text(json.dumps(edit(saved)))
    return adapter


def _renamed_base(base, tmp):
    """The base with one quantized layer's weight stored under another name."""
    renamed = tmp / "renamed"
    shutil.copytree(base, renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.layers.0.mlp.down.weight"] = tensors.pop("model.layers.0.mlp.down_proj.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    return renamed


def _unbuildable_base(base, tmp):
    odd = tmp / "odd"
    shutil.copytree(base, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(config | {"model_type": "no-such-architecture"}))
    return odd


def _int8_base(base, tmp):
    model, tokenizer = qlorakit.load(base, quant="int8", dtype="fp32", device="cpu")
    return qlorakit.save_quantized(model, tokenizer, tmp / "int8")


# (case, how to provoke it with (adapters, base, tmp, out), what the message must say)
CASES = [
    ("merge: adapter without qlorakit.json",
     lambda a, b, t, o: qlorakit.merge(_copy_adapter(a, t, drop=True), o, **QUIET),
     r"adapter: no qlorakit\.json, so how the base was quantized in training is unknown .*; merge into the "
     r"original unquantized weights with --base original"),
    ("GGUF export: adapter without qlorakit.json",
     lambda a, b, t, o: qlorakit.export_gguf(o / "m.gguf", adapter=_copy_adapter(a, t, drop=True), **QUIET),
     r"adapter: no qlorakit\.json, .* --base original"),
    ("merge: unknown base", lambda a, b, t, o: qlorakit.merge(a["nf4"], o, base="dequantized", **QUIET),
     r"base='dequantized': merge into 'quantized' \(the base the adapter was trained against, the default\) or "
     r"'original'"),
    ("merge: qlorakit.json field invalid",
     lambda a, b, t, o: qlorakit.merge(_copy_adapter(a, t, lambda s: s | {"quant": "nf5"}), o, **QUIET),
     r"adapter/qlorakit\.json: 'quant' is 'nf5' \(expected nf4, fp4, int8, none\), so the quantized base the "
     r"adapter was trained against cannot be rebuilt; fix the file or merge into the original weights with "
     r"--base original"),
    ("merge: qlorakit.json field missing",
     lambda a, b, t, o: qlorakit.merge(_copy_adapter(a, t, lambda s: {k: v for k, v in s.items() if k != "dtype"}),
                                       o, **QUIET),
     r"adapter/qlorakit\.json: 'dtype' is missing \(expected fp32, bf16, fp16\)"),
    ("merge: base stored in another quantization",
     lambda a, b, t, o: qlorakit.merge(a["nf4"], o, model=str(_int8_base(b, t)), **QUIET),
     r"int8 is quantized as int8 with bitsandbytes, but the adapter was trained on a nf4 base \(.*qlorakit\.json\): "
     r"pass the base it was trained on with --model, or merge into these weights as stored with --base original"),
    ("merge: quantized layer not in the checkpoint",
     lambda a, b, t, o: qlorakit.merge(a["nf4"], o, model=str(_renamed_base(b, t)), **QUIET),
     r"renamed: training quantizes model\.layers\.0\.mlp\.down_proj\.weight, which the checkpoint does not hold "
     r"under that name, so the quantized base cannot be rebuilt; merge into the original weights with --base "
     r"original"),
    ("merge: model cannot be built from config.json",
     lambda a, b, t, o: qlorakit.merge(a["nf4"], o, model=str(_unbuildable_base(b, t)), **QUIET),
     r"odd: cannot build the model from config\.json to tell which layers training quantized \(.*\); merge into "
     r"the original weights with --base original"),
]


@pytest.mark.parametrize("case, provoke, message", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_with_a_clear_message(adapters, base, tmp_path, case, provoke, message):
    out = tmp_path / "out"
    with pytest.raises(QLoraKitError) as info:
        provoke(adapters, base, tmp_path, out)
    assert re.search(message, str(info.value)), str(info.value)
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_every_case_is_documented():
    docs = DOCS.read_text()
    for case, _, _ in CASES:
        assert f"| {case} |" in docs, case
