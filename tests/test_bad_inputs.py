"""Bad input gets a clear error naming the file, line, field or parameter, and what to do. Every case here is
listed, with its message, in docs/errors.md (the last test keeps the two in step)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import qlorakit
from conftest import CHATML, chat_tokenizer
from qlorakit.config import TrainConfig
from qlorakit.data import load_data
from qlorakit.errors import QLoraKitError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
# A template that leaves assistant turns out: every label would be masked.
USER_TURNS_ONLY = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] + ' ' }}{% endif %}{% endfor %}"
GOOD = {"messages": [{"role": "user", "content": "w10"}, {"role": "assistant", "content": "w11"}]}


def _jsonl(tmp_path, *lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _data(source, **kw):
    return load_data(source, chat_tokenizer(CHATML), **({"max_length": 64} | kw))


def _load(tmp_path, **kw):
    return qlorakit.load(**({"source": str(tmp_path / "no-such-model"), "device": "cpu"} | kw))


# (case, how to provoke it, what the message must say)
CASES = [
    ("malformed JSON line", lambda t: _data(_jsonl(t, GOOD, '{"messages": [}')),
     r"train\.jsonl line 2: not valid JSON \(.*\); every line of a \.jsonl file must be one JSON object"),
    ("JSON line that is not an object", lambda t: _data(_jsonl(t, GOOD, "[1, 2]")),
     r"train\.jsonl line 2: a JSON list, not an object"),
    ("missing field", lambda t: _data(_jsonl(t, {"instruction": "w10", "output": "w11"}, {"instruction": "w12"})),
     r"train\.jsonl line 2: missing field 'output' \(fields present: instruction\)"),
    ("unknown role", lambda t: _data(_jsonl(t, GOOD, {"messages": [{"role": "bot", "content": "w1"}]})),
     r"train\.jsonl line 2: messages\[0\]: unknown role 'bot'; use one of system, user, assistant"),
    ("unknown ShareGPT speaker", lambda t: _data(_jsonl(t, {"conversations": [{"from": "robot", "value": "x"}]})),
     r"train\.jsonl line 1: conversations\[0\]: unknown role 'robot'; use one of"),
    ("field of the wrong type", lambda t: _data(_jsonl(t, {"messages": [{"role": "user", "content": 7}]})),
     r"train\.jsonl line 1: messages\[0\]: 'content' must be a string, not int"),
    ("conversation without an assistant turn",
     lambda t: _data(_jsonl(t, {"messages": [{"role": "user", "content": "w10"}]})),
     r"train\.jsonl line 1: the conversation has no assistant turn, so there is nothing to train on"),
    ("empty file", lambda t: _data(_jsonl(t)), r"train\.jsonl: the file holds no rows"),
    ("data file not found", lambda t: _data(t / "missing.jsonl"),
     r"missing\.jsonl: data file not found; check the path given to --data"),
    ("unknown file type", lambda t: _data(_jsonl(t, GOOD, name="train.txt")),
     r"train\.txt: unknown data file type '\.txt'; use \.jsonl, \.json, \.csv or \.parquet"),
    ("CSV row with extra cells", lambda t: _data(_write(t / "train.csv", "text\nw10 w11\n\"w12\",w13\n")),
     r"train\.csv line 3: more cells than the header's 1 columns; quote cells that contain commas"),
    ("format not recognisable", lambda t: _data(_jsonl(t, {"question": "w1", "answer": "w2"})),
     r"train\.jsonl line 1: cannot tell the data format from the fields \['answer', 'question'\]"),
    ("unknown format", lambda t: _data(_jsonl(t, GOOD), format="xml"),
     r"format='xml' is not a data format; use auto or one of chat, instruction, prompt-completion, text"),
    ("all labels masked", lambda t: load_data(_jsonl(t, GOOD), chat_tokenizer(USER_TURNS_ONLY), max_length=64),
     r"nothing to train on — every label is masked: no example has assistant or completion tokens \(empty "
     r"answers, or a chat template that renders no text for assistant turns\)"),
    ("every answer beyond max_length", lambda t: _data(
        _jsonl(t, {"messages": [{"role": "user", "content": " ".join(["w10"] * 40)},
                                {"role": "assistant", "content": "w11"}]}), max_length=16),
     r"nothing to train on — all 1 examples were longer than max_length with their answers beyond it"),
    ("example longer than max_length (on_long=error)",
     lambda t: _data(_jsonl(t, GOOD, {"messages": [{"role": "user", "content": " ".join(["w10"] * 40)},
                                                   {"role": "assistant", "content": "w11"}]}),
                     on_long="error", max_length=16),
     r"train\.jsonl line 2: the example is \d+ tokens, longer than max_length 16; raise --max-length"),
    ("missing model path", lambda t: _load(t),
     r"no-such-model.*(not found|does not exist|no such)"),
    ("unknown quant name", lambda t: _load(t, quant="nf3"), r"quant='nf3'.*nf4, fp4, int8, none"),
    ("unknown YAML key", lambda t: TrainConfig.build(_write(t / "run.yaml", "lr: 1e-4\nlearning_rat: 2\n")),
     r"run\.yaml: unknown key 'learning_rat'"),
    ("YAML that does not parse", lambda t: TrainConfig.build(_write(t / "run.yaml", "lr: [1e-4\n")),
     r"run\.yaml line \d+: not valid YAML"),
    ("YAML value of the wrong type", lambda t: TrainConfig.build(_write(t / "run.yaml", "lr: fast\n")),
     r"run\.yaml: lr='fast' must be a number"),
    ("unknown quant in the config", lambda t: TrainConfig.build(None, quant="int4"),
     r"quant='int4' is not a quantization; use one of nf4, fp4, int8, none"),
    ("resume with nothing to resume", lambda t: qlorakit.train(output=str(t / "run"), resume=True, data="x.jsonl"),
     r"run: no checkpoint to resume from .*; point --output at the interrupted run, or start without --resume"),
    ("adapter directory that is not one", lambda t: qlorakit.adapters.read_adapter_info(t),
     r"not an adapter directory \(no adapter_config\.json\)"),
    ("adapter without its weights file", lambda t: qlorakit.merge(_write(t / "adapter_config.json", "{}").parent,
                                                                  t / "merged"),
     r"adapter_model\.safetensors is missing"),
    ("adapter merged into another base model", lambda t: _merge_into_other_base(t),
     r"the adapter's model\.layers\.0\..*\.weight is 64x\d+ .* but .*narrow has 32x\d+: not this adapter's base "
     r"model; the adapter was trained on '.*wide'"),
    ("GGUF output not named .gguf", lambda t: qlorakit.export_gguf(t / "model.bin", model=str(t)),
     r"model\.bin: name the output file \*\.gguf"),
    ("activation offloading without CUDA", lambda t: qlorakit.train(output=str(t / "run"), device="cpu",
                                                                    data=str(_jsonl(t, GOOD)), offload_activations=True),
     r"offload_activations=true moves activations from a CUDA device to CPU memory; this run is on cpu"),
]


def _merge_into_other_base(tmp_path):
    """Merge a LoRA adapter made on a 64-wide tiny model into a 32-wide one."""
    from conftest import save_tiny_model

    wide = save_tiny_model(tmp_path / "wide")
    narrow = save_tiny_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    model = qlorakit.add_lora(qlorakit.load(wide, quant="none", dtype="fp32", device="cpu")[0], rank=2, alpha=4)
    model.save_pretrained(tmp_path / "adapter")
    return qlorakit.merge(tmp_path / "adapter", tmp_path / "merged", model=str(narrow), base="original")


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case,provoke,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(tmp_path, case, provoke, message):
    with pytest.raises(QLoraKitError) as e:
        provoke(tmp_path)
    assert re.search(message, str(e.value)), str(e.value)


def test_skip_bad_rows_skips_and_counts(tmp_path):
    path = _jsonl(tmp_path, GOOD, {"messages": [{"role": "bot", "content": "w1"}]}, GOOD)
    data = _data(path, skip_bad_rows=True)
    assert data.report.examples == 2 and len(data.report.skipped_rows) == 1
    assert "train.jsonl line 2" in data.report.skipped_rows[0]
    assert "1 bad rows skipped" in data.report.describe()


def test_refuses_to_mix_a_new_run_into_an_old_one(tmp_path, tiny_model_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(QLoraKitError, match=r"run: holds an earlier run .*--resume.*--overwrite"):
        qlorakit.train(output=str(tmp_path / "run"), data="x.jsonl")


def test_every_case_is_documented():
    docs = DOCS.read_text()
    for case, _, _ in CASES:
        assert f"| {case} |" in docs, case
