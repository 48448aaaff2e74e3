"""Exports of a real fine-tune of the default model (SmolLM2-135M-Instruct): the merged model and the GGUF file
generate what qlorakit generates, and the GGUF file has the layout, metadata and tokenizer of the llama.cpp-made
GGUF the model ships as."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

import qlorakit
from qlorakit.adapters import load_adapter
from qlorakit.demo import demo_rows
from qlorakit.load import DEFAULT_MODEL, default_model_gguf

pytestmark = pytest.mark.integration

NEW_TOKENS = 24
# Descriptive fields of the original file that a fine-tune does not inherit.
DESCRIPTIVE = {"general.name", "general.organization", "general.finetune", "general.basename", "general.size_label",
               "general.license", "general.languages", "general.type", "general.file_type"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short real training run on the demo task: its adapter, output directory and two held-out prompts."""
    rows, held = demo_rows(n_train=48, n_heldout=8, seed=3)
    out = tmp_path_factory.mktemp("run")
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    qlorakit.train(model=DEFAULT_MODEL, quant="nf4", dtype="bf16", device="cpu", max_steps=6, batch_size=8,
                   lr=1e-3, output=str(out / "adapter"), data=str(data), log=lambda _: None, progress=False)
    return {"adapter": out / "adapter", "root": out, "prompts": held[:2]}


def _prompt_ids(tokenizer, row):
    messages = row["messages"][:-1]  # the question; the last turn is the reference answer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _greedy(model, ids, tokenizer):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def merged(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = qlorakit.merge(run["adapter"], run["root"] / "merged", dtype="fp32", log=lambda _: None)
    return path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_merged_model_generates_what_the_trained_model_generates(run, merged):
    """The default merge (the dequantized NF4 base training saw) answers as the trained model, NF4 + adapter in
    bf16, does; the merge into the original weights answers as qlorakit does on those weights."""
    _, model, tokenizer = merged
    trained, _ = qlorakit.load(DEFAULT_MODEL, quant="nf4", dtype="bf16", device="cpu")
    trained = load_adapter(trained, run["adapter"])
    for row in run["prompts"]:
        ids = _prompt_ids(tokenizer, row)
        assert _greedy(model, ids, tokenizer) == _greedy(trained, ids, tokenizer)
    from transformers import AutoModelForCausalLM

    path = qlorakit.merge(run["adapter"], run["root"] / "merged-original", dtype="fp32", base="original",
                          log=lambda _: None)
    original = AutoModelForCausalLM.from_pretrained(path)
    base, _ = qlorakit.load(DEFAULT_MODEL, quant="none", dtype="fp32", device="cpu")
    ours = load_adapter(base, run["adapter"])
    for row in run["prompts"]:
        ids = _prompt_ids(tokenizer, row)
        assert _greedy(original, ids, tokenizer) == _greedy(ours, ids, tokenizer)


def test_gguf_has_the_layout_and_tokenizer_of_the_shipped_gguf(run, tmp_path):
    path = qlorakit.export_gguf(tmp_path / "tuned.gguf", adapter=run["adapter"], log=lambda _: None)
    ours, original = gguf.GGUFReader(path), gguf.GGUFReader(default_model_gguf())
    for key, field in original.fields.items():
        if key in DESCRIPTIVE or key.startswith("GGUF."):
            continue
        assert key in ours.fields, key
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            assert [bytes(ours.fields[key].parts[i]) for i in ours.fields[key].data] == \
                   [bytes(field.parts[i]) for i in field.data], key
        else:
            assert ours.fields[key].contents() == field.contents(), key
    assert ours.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert {t.name: tuple(t.shape) for t in ours.tensors} == {t.name: tuple(t.shape) for t in original.tensors}


@pytest.mark.parametrize("gguf_type", ("f16", "q8_0"))
def test_gguf_loaded_by_transformers_generates_like_the_merged_model(run, merged, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM

    _, reference, tokenizer = merged
    qlorakit.export_gguf(tmp_path / "tuned.gguf", adapter=run["adapter"], gguf_type=gguf_type, log=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tuned.gguf", dtype=torch.float32)
    for row in run["prompts"]:
        ids = _prompt_ids(tokenizer, row)
        expected = _greedy(reference, ids, tokenizer)
        got = _greedy(model, ids, tokenizer)
        # Measured on 8 held-out prompts: every answer identical for f16, bf16 and q8_0. q8_0 rounds each weight
        # to 8 bits, so near-ties may flip on another CPU: its bar is the first 8 tokens (the answer's fields).
        assert got == expected if gguf_type == "f16" else got[:8] == expected[:8]
        with torch.no_grad():
            a, b = model(input_ids=ids).logits, reference(input_ids=ids).logits
        # Relative error of the logits over the prompt; measured at most f16 7.5e-4, bf16 8.4e-3, q8_0 2.4e-2.
        assert float((a - b).norm() / b.norm()) < {"f16": 3e-3, "q8_0": 6e-2}[gguf_type]
