"""GRPO's prompt data: rows of a prompt alone (a string, or messages ending in a user or system turn) with any
other fields, read as any data is (files, dataset directories, --field, validation, bad rows), tokenized exactly as
generation tokenizes prompts, kept within max_length - max_new_tokens (dropped or refused, never truncated),
fingerprinted with their other fields, and batched as MicroBatchStream batches every kind of data. Token ids are
compared exactly; there is nothing numeric to approximate here."""

from __future__ import annotations

import hashlib
import json
import re
from array import array

import pytest

from conftest import CHATML, chat_tokenizer, tiny_tokenizer
from qlorakit.checkpoint import data_fingerprint
from qlorakit.data import (
    IGNORE_INDEX, PromptData, PromptExample, TokenizedPrompt, collate_prompts, load_data, load_prompts, read_data,
)
from qlorakit.data.batches import micro_batches
from qlorakit.data.files import Row
from qlorakit.data.formats import detect_format
from qlorakit.data.prompts import PromptBatch
from qlorakit.errors import ConfigError, DataError
from qlorakit.generation.prompts import encode_prompts


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _system(text):
    return {"role": "system", "content": text}


TEXT = [{"prompt": "w10 w11", "answer": "4"}, {"prompt": "w12", "answer": 7, "level": {"hard": True}}]
CHAT = [{"prompt": [_system("w5"), _user("w10 w11")], "answer": "4"},
        {"prompt": [_user("w12"), _assistant("w13"), _user("w14")], "answer": "9"}]  # a few-shot answer inside


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer(CHATML)


def _load(rows, tokenizer, max_length=64, max_new_tokens=8, on_long="drop", **kw):
    return load_data(rows, tokenizer, max_length=max_length, max_new_tokens=max_new_tokens, on_long=on_long, **kw)


def _prompts(n, words=2):
    """n distinct string prompts of `words` words, each with its answer."""
    return [{"prompt": " ".join(f"w{10 + i}" for _ in range(words)), "answer": str(i)} for i in range(n)]


# ---- the format

def test_format_detection():
    assert detect_format(Row({"prompt": "a"}, "r")) == "prompt"
    assert detect_format(Row({"prompt": [_user("a")], "answer": "b", "id": 3}, "r")) == "prompt"
    # every existing detection is unchanged: a prompt with another format's field reads as that format
    assert detect_format(Row({"prompt": "a", "completion": "b"}, "r")) == "prompt-completion"
    assert detect_format(Row({"prompt": "a", "chosen": "b", "rejected": "c"}, "r")) == "preference"
    assert detect_format(Row({"prompt": "a", "messages": []}, "r")) == "chat"
    assert detect_format(Row({"prompt": "a", "text": "b"}, "r")) == "text"
    assert detect_format(Row({"prompt": "a", "instruction": "b", "output": "c"}, "r")) == "instruction"
    assert detect_format(Row({"prompt": "a", "conversations": []}, "r")) == "chat"
    for half in ({"prompt": "a", "chosen": "b"}, {"prompt": "a", "rejected": "c"}, {"prompt": "a", "instruction": "b"}):
        with pytest.raises(DataError, match=r"or 'prompt' alone for GRPO prompts — or name the format with --format"):
            detect_format(Row(half, "r"))
    with pytest.raises(DataError, match=r"^r: cannot tell the data format from the fields \['question'\]; .*'chosen' "
                                        r"\+ 'rejected' \(\+ 'prompt'\) for preference pairs, or 'prompt' alone for "
                                        r"GRPO prompts — "):
        detect_format(Row({"question": "a"}, "r"))
    assert read_data(TEXT).format == "prompt" and read_data(CHAT, format="prompt").format == "prompt"
    example = read_data(TEXT).train[1]
    assert example == PromptExample("data row 1", "w12", {"answer": 7, "level": {"hard": True}})


def test_prompts_tokenize_exactly_as_generation(tokenizer):
    data = _load(TEXT + CHAT, tokenizer)
    assert isinstance(data, PromptData) and data.format == "prompt"
    assert all(isinstance(item, TokenizedPrompt) for item in data.train)
    expected = encode_prompts(tokenizer, [row["prompt"] for row in TEXT + CHAT])
    assert [item.input_ids for item in data.train] == expected
    # the chat prompts end in the generation prompt; the string prompts are plain text (this tokenizer adds no BOS)
    assert tokenizer.convert_ids_to_tokens(data.train[2].input_ids)[-3:] == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert data.train[0].input_ids == tiny_tokenizer()("w10 w11")["input_ids"] == [10, 11]
    assert [item.prompt for item in data.train] == [row["prompt"] for row in TEXT + CHAT]
    assert [item.tokens for item in data.train] == [len(ids) for ids in expected]
    assert data.report.unit == "prompts" and data.report.examples == 4
    assert data.report.tokens == sum(map(len, expected)) and data.report.trained_tokens == 0
    assert data.describe() == f"4 prompts, {sum(map(len, expected))} tokens"
    assert data_fingerprint(data.fingerprinted())["train"]["trained_tokens"] == 0


@pytest.mark.parametrize("parse", [False, True])
def test_special_token_strings_in_a_prompt_as_generation_reads_them(tokenizer, parse):
    rows = [{"prompt": [_user("w10 <|im_end|> w11")]}, {"prompt": "w10 <|im_end|>"}]
    data = _load(rows, tokenizer, parse_special_tokens=parse)
    assert [item.input_ids for item in data.train] == encode_prompts(tokenizer, [r["prompt"] for r in rows],
                                                                     parse_special_tokens=parse)


def test_other_fields_stay_with_the_prompt(tokenizer):
    data = _load(TEXT, tokenizer)
    assert [item.row for item in data.train] == [{"answer": "4"}, {"answer": 7, "level": {"hard": True}}]
    assert [item.where for item in data.train] == ["data row 0", "data row 1"]


def test_field_mapping_reads_prompts_from_another_column(tokenizer):
    rows = [{"question": "w10 w11", "answer": "4"}, {"question": "w12", "answer": "7"}]
    mapped = _load(rows, tokenizer, fields={"prompt": "question"})
    assert mapped.format == "prompt"
    assert [item.row for item in mapped.train] == [{"answer": "4"}, {"answer": "7"}]  # no 'question' beside it
    plain = _load([{"prompt": r["question"], "answer": r["answer"]} for r in rows], tokenizer)
    assert data_fingerprint(mapped.fingerprinted()) == data_fingerprint(plain.fingerprinted())
    # with a completion mapped too the rows are SFT data, as before
    assert read_data(rows, fields={"prompt": "question", "completion": "answer"}).format == "prompt-completion"
    with pytest.raises(DataError, match=r"^data: --field completion=answer maps a field the prompt format does not "
                                        r"read \(it reads prompt\); name the format you mean with --format"):
        read_data(rows, format="prompt", fields={"prompt": "question", "completion": "answer"})


def test_files_read_the_same_prompts(tmp_path, tokenizer):
    import csv

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    with open(tmp_path / "p.csv", "w", newline="") as f:  # a CSV cell holds a conversation as JSON text
        writer = csv.writer(f)
        writer.writerow(["prompt", "answer"])
        writer.writerows([[json.dumps(r["prompt"]), r["answer"]] for r in CHAT])
    expected = [item.input_ids for item in _load(CHAT, tokenizer).train]
    for name in ("p.jsonl", "p.csv"):
        data = _load(str(tmp_path / name), tokenizer)
        assert [item.input_ids for item in data.train] == expected
        assert [item.where for item in data.train] == [f"{name} line {i}" for i in ((1, 2) if name == "p.jsonl"
                                                                                     else (2, 3))]
        assert [item.row for item in data.train] == [{"answer": "4"}, {"answer": "9"}]


def test_dataset_directory(tmp_path, tokenizer):
    from datasets import Dataset

    Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in TEXT]).save_to_disk(
        str(tmp_path / "saved"))
    data = _load(str(tmp_path / "saved"), tokenizer)
    assert [item.input_ids for item in data.train] == [[10, 11], [12]]
    assert [item.row for item in data.train] == [{"answer": "4"}, {"answer": "7"}]


# ---- bad rows: (case; the row; read_data's keywords; what the message must say)

SURROGATE = "w10 \ud83d"
CASES = [
    ("prompt missing", {"question": "w1"}, {"format": "prompt"},
     r"^data row 0: missing field 'prompt' \(fields present: question\); GRPO data needs a prompt in each row: read "
     r"it from another column with --field prompt=COLUMN$"),
    ("prompt that is null", {"prompt": None, "answer": "1"}, {},
     r"^data row 0: field 'prompt' is empty \(a null, or an empty CSV cell\), but this format needs it; fill it in, "
     r"or leave the row out \(--skip-bad-rows skips such rows\)$"),
    ("prompt that is blank", {"prompt": "  ", "answer": "1"}, {},
     r"^data row 0: field 'prompt' is empty; GRPO generates answers to the prompt: fill it in, or leave the row out "
     r"\(--skip-bad-rows skips such rows\)$"),
    ("prompt of the wrong type", {"prompt": 5}, {},
     r"^data row 0: field 'prompt' must be a string or a list of messages, not int; fix the row, or leave it out "
     r"\(--skip-bad-rows skips such rows\)$"),
    ("prompt that is an empty list", {"prompt": []}, {},
     r"^data row 0: field 'prompt' is an empty list of messages; fill it in, or leave the row out "
     r"\(--skip-bad-rows skips such rows\)$"),
    ("prompt ending in an assistant turn", {"prompt": [_user("w1"), _assistant("w2")]}, {},
     r"^data row 0: the prompt's messages end with an assistant turn, and GRPO generates the assistant's answer to "
     r"the prompt itself; drop the final assistant turn \(an earlier one may stay, as an example answer\), so that "
     r"the prompt ends with a user or system turn$"),
    ("prompt turn with an unknown role", {"prompt": [{"role": "bot", "content": "w1"}]}, {},
     r"^data row 0: prompt\[0\]: unknown role 'bot'; use one of system, user, assistant$"),
    ("prompt turn that is not an object", {"prompt": [_user("w1"), "w2"]}, {},
     r"^data row 0: prompt\[1\] is a str; each turn must be an object with 'role' and 'content'$"),
    ("prompt turn without content", {"prompt": [{"role": "user"}]}, {},
     r"^data row 0: prompt\[0\]: missing field 'content'$"),
    ("prompt turn content of the wrong type", {"prompt": [{"role": "user", "content": 3}]}, {},
     r"^data row 0: prompt\[0\]: 'content' must be a string, not int$"),
    ("prompt text that is not valid Unicode", {"prompt": SURROGATE}, {},
     r"^data row 0: field 'prompt' holds '\\ud83d' at character 4, half of a UTF-16 surrogate pair .*; fix the text, "
     r"or leave the row out \(--skip-bad-rows skips such rows\)$"),
    ("prompt turn that is not valid Unicode", {"prompt": [_user(SURROGATE)]}, {},
     r"^data row 0: prompt\[0\]: 'content' holds '\\ud83d' at character 4"),
]


@pytest.mark.parametrize("case,row,kw,message", CASES, ids=[c[0] for c in CASES])
def test_bad_rows_name_the_row_and_what_to_do(case, row, kw, message):
    with pytest.raises(DataError) as e:
        read_data([row], **kw)
    assert re.search(message, str(e.value)), str(e.value)


def test_bad_rows_in_a_file_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n" + json.dumps({"prompt": [_user("w1"), _assistant("w2")]}) + "\n")
    with pytest.raises(DataError, match=r"^p\.jsonl line 2: the prompt's messages end with an assistant turn"):
        read_data(str(path))
    path.write_text(json.dumps(TEXT[0]) + "\n" + '{"prompt": "w1 \\ud83d"}\n')  # JSON's lone surrogate escape
    with pytest.raises(DataError, match=r"^p\.jsonl line 2: field 'prompt' holds '\\ud83d' at character 3"):
        read_data(str(path))


def test_skip_bad_rows_counts_them(tokenizer):
    bad = [row for _, row, kw, _ in CASES if not kw]
    rows = [TEXT[0], *bad, {"question": "w1"}, TEXT[1]]  # (the format is the first row's: 'question' lacks a prompt)
    data = _load(rows, tokenizer, skip_bad_rows=True)
    assert [item.where for item in data.train] == ["data row 0", f"data row {len(rows) - 1}"]
    assert len(data.report.skipped_rows) == len(bad) + 1
    assert data.report.skipped_rows[0].startswith("data row 1: field 'prompt' is empty (a null")
    assert data.report.skipped_rows[-1].startswith(f"data row {len(rows) - 2}: missing field 'prompt'")
    assert data.describe() == f"2 prompts, 3 tokens, {len(bad) + 1} bad rows skipped"
    with pytest.raises(DataError, match=r"^data: all 2 rows are bad and were skipped \(the first: data row 0: "):
        read_data(bad[:2], skip_bad_rows=True)


def test_a_prompt_that_tokenizes_to_nothing():
    silent = chat_tokenizer("{% for m in messages %}{% endfor %}")  # a template that renders no text
    with pytest.raises(DataError, match=r"^data row 0: the prompt tokenizes to no tokens, so there is nothing to "
                                        r"generate an answer from; fix the row, or leave it out"):
        _load([{"prompt": [_user("w1")]}], silent)


# ---- max_length: a prompt fits max_length - max_new_tokens, or is dropped or refused, never truncated

LENGTHS = [{"prompt": " ".join(["w10"] * n), "answer": str(n)} for n in (3, 4, 5)]


def test_on_long_drop_keeps_prompts_up_to_the_limit(tokenizer):
    data = _load(LENGTHS, tokenizer, max_length=8, max_new_tokens=4)  # room for 4 prompt tokens
    assert [item.tokens for item in data.train] == [3, 4]
    assert data.report.dropped_long == 1 and data.report.truncated == 0
    assert data.describe() == "2 prompts, 7 tokens, 1 dropped as too long"
    with pytest.raises(DataError, match=r"^data: nothing to train on — all 3 prompts were longer than the 2 tokens "
                                        r"max_length 8 leaves beside max_new_tokens 6; raise --max-length or lower "
                                        r"--max-new-tokens$"):
        _load(LENGTHS, tokenizer, max_length=8, max_new_tokens=6)


def test_on_long_error_names_the_prompt_and_the_limit(tokenizer):
    with pytest.raises(DataError, match=r"^data row 2: the prompt is 5 tokens, longer than the 4 that max_length 8 "
                                        r"leaves beside max_new_tokens 4 for its answer; raise --max-length or lower "
                                        r"--max-new-tokens, or leave such prompts out \(--on-long drop\)$"):
        _load(LENGTHS, tokenizer, max_length=8, max_new_tokens=4, on_long="error")
    assert len(_load(LENGTHS, tokenizer, max_length=9, max_new_tokens=4, on_long="error").train) == 3


SETTINGS = [
    ({"on_long": "truncate"}, r"^on_long='truncate' does not apply to prompts: truncating a prompt cuts its end, the "
                              r"instruction or question its answer is to follow; use drop \(leave such prompts out, "
                              r"counted\) or error$"),
    ({"on_long": "cut"}, r"^on_long='cut': for prompts use drop or error$"),
    ({"max_new_tokens": 0}, r"^max_new_tokens=0: prompt data \(rows with a 'prompt' alone, for GRPO\) needs the "
                            r"length of the answers generated from it, .*give max_new_tokens of at least 1 "
                            r"\(--max-new-tokens\)$"),
    ({"max_new_tokens": 8, "max_length": 8}, r"^max_new_tokens=8 leaves no room for a prompt in max_length=8 \(a "
                                             r"prompt and its answer must fit together\); raise --max-length or lower "
                                             r"--max-new-tokens$"),
    ({"train_on": "all"}, r"^train_on='all' does not apply to prompt data: GRPO trains on the answers it generates, "
                          r"never on the prompt; leave it out \(assistant\)$"),
]


@pytest.mark.parametrize("settings,message", SETTINGS, ids=[str(s) for s, _ in SETTINGS])
def test_settings_that_do_not_apply_are_refused(tokenizer, settings, message):
    with pytest.raises(ConfigError, match=message):
        _load(LENGTHS, tokenizer, **({"max_length": 64, "max_new_tokens": 8, "on_long": "drop"} | settings))


def test_load_data_without_max_new_tokens_is_refused_for_prompts_only(tokenizer):
    with pytest.raises(ConfigError, match=r"^max_new_tokens=0: prompt data"):
        load_data(LENGTHS, tokenizer, on_long="drop")  # (max_new_tokens is for prompts alone: 0 by default)
    assert len(load_data([{"prompt": "w10", "completion": " w11"}], tokenizer).train) == 1
    read = read_data(LENGTHS)
    assert [i.input_ids for i in load_prompts(read, tokenizer, 16, 4, "error").train] == [
        i.input_ids for i in load_data(read, tokenizer, max_length=16, max_new_tokens=4, on_long="error").train]


# ---- validation

def test_validation_prompts(tmp_path, tokenizer):
    data = _load(_prompts(8), tokenizer, validation=0.25, seed=3)
    assert (len(data.train), len(data.validation)) == (6, 2)
    assert all(isinstance(item, TokenizedPrompt) for item in data.validation)
    assert {item.where for item in data.train + data.validation} == {f"data row {i}" for i in range(8)}
    assert all(item.row == {"answer": item.where.split()[-1]} for item in data.validation)
    # a separate file; its over-long prompts are dropped, never an error (on_long applies to training prompts)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LENGTHS))
    held = _load(_prompts(3), tokenizer, max_length=8, max_new_tokens=4, on_long="error",
                 validation_source=str(tmp_path / "val.jsonl"))
    assert [item.where for item in held.validation] == ["val.jsonl line 1", "val.jsonl line 2"]
    assert held.report.dropped_long == 0 and len(held.train) == 3
    with pytest.raises(DataError, match=r"^data: nothing to train on — no prompt is left for training \(a validation "
                                        r"fraction took them all\?\); add prompts$"):
        _load(_prompts(1), tokenizer, validation=0.5)


# ---- the checkpoint fingerprint

def test_fingerprint_sees_a_changed_answer(tokenizer):
    rows = _prompts(3)
    before = data_fingerprint(_load(rows, tokenizer).fingerprinted())
    assert before == data_fingerprint(_load(_prompts(3), tokenizer).fingerprinted())
    assert before["train"] == before["train"] | {"examples": 3, "tokens": 6, "trained_tokens": 0}
    # the same fields in another order are the same row
    reordered = [{"answer": r["answer"], "prompt": r["prompt"]} for r in rows]
    assert data_fingerprint(_load(reordered, tokenizer).fingerprinted()) == before
    rows[1]["answer"] = "42"
    after = data_fingerprint(_load(rows, tokenizer).fingerprinted())
    assert after["train"]["sha256"] != before["train"]["sha256"]
    assert {k: v for k, v in after["train"].items() if k != "sha256"} == {
        k: v for k, v in before["train"].items() if k != "sha256"}
    rows[1]["source"] = "gsm8k"  # a field added
    assert data_fingerprint(_load(rows, tokenizer).fingerprinted())["train"]["sha256"] != after["train"]["sha256"]
    changed = _prompts(3)
    changed[2]["prompt"] = "w12 w40"
    assert data_fingerprint(_load(changed, tokenizer).fingerprinted())["train"]["sha256"] != before["train"]["sha256"]


def _old_fingerprint(data) -> dict:
    """checkpoint.data_fingerprint as it was before prompts had rows: what every existing checkpoint holds."""
    def of(items):
        digest, tokens, trained = hashlib.sha256(), 0, 0
        for item in items:
            ids, labels = array("q", item.input_ids), array("q", item.labels)
            digest.update(array("q", [len(ids)]).tobytes() + ids.tobytes() + labels.tobytes())
            tokens += len(ids)
            trained += sum(label != IGNORE_INDEX for label in item.labels[1:])
        return {"examples": len(items), "tokens": tokens, "trained_tokens": trained, "sha256": digest.hexdigest()}

    return {"train": of(data.train), "validation": of(data.validation)}


def test_existing_kinds_fingerprint_as_before(tokenizer):
    sft = [{"messages": [_user(f"w{10 + i}"), _assistant(f"w{20 + i} w21")]} for i in range(4)]
    pairs = [{"prompt": f"w{10 + i}", "chosen": f" w{20 + i}", "rejected": " w30 w31"} for i in range(4)]
    for rows in (sft, pairs):
        data = load_data(rows, tokenizer, max_length=64, validation=0.25).fingerprinted()
        assert len(data.validation) > 0
        assert data_fingerprint(data) == _old_fingerprint(data)


# ---- batches

def _wheres(batch):
    return [item.where for item in batch.items]


def test_collate_prompts():
    items = [TokenizedPrompt("a", [5, 6, 7], "w5 w6 w7", {}), TokenizedPrompt("b", [8], "w8", {"answer": 1})]
    batch = collate_prompts(items, 0, True)
    assert isinstance(batch, PromptBatch) and batch.items == items and batch.items is not items
    assert (batch.real_tokens, batch.trained_tokens, batch.placeholder) == (4, 0, False)
    assert collate_prompts(items, 0, False) == batch  # (padding and packing are generation's)


def test_prompt_batches_over_epochs_from_a_resume_position(tokenizer):
    """Batches of 2 prompts from 5: each epoch takes every prompt once, in micro_batches' seeded order for the
    epoch, and a stream started at a saved position takes exactly the batches the uninterrupted stream took."""
    data = _load(_prompts(5), tokenizer)
    assert data.micro_batches_per_epoch(2) == 3
    stream = data.batches(2, seed=7, pad_id=0, packed=True, position={"epoch": 0, "micro": 0})
    batches = stream.take(6)  # two epochs
    assert stream.position == {"epoch": 1, "micro": 3}
    for epoch, taken in enumerate((batches[:3], batches[3:])):
        assert [_wheres(b) for b in taken] == [[item.where for item in group]
                                               for group in micro_batches(data.train, 2, epoch, 7)]
        assert sorted(w for b in taken for w in _wheres(b)) == sorted(item.where for item in data.train)
        assert [len(b.items) for b in taken] == [2, 2, 1]
    assert [_wheres(b) for b in batches[:3]] != [_wheres(b) for b in batches[3:]]  # another order
    resumed = data.batches(2, seed=7, pad_id=0, packed=True, position={"epoch": 0, "micro": 2})
    assert [_wheres(b) for b in resumed.take(4)] == [_wheres(b) for b in batches[2:]]
    assert all(b.real_tokens == 2 * len(b.items) and b.trained_tokens == 0 for b in batches)


def test_ranks_take_their_shares_of_the_prompts(tokenizer):
    """Two ranks with batch 2 take what one process with batch 4 takes, rank 0 the first half; the rank whose share
    of the lone last prompt is empty (rank 0: data/batches.py's share) gets the placeholder Batch."""
    data = _load(_prompts(5), tokenizer)
    one = data.batches(4, 0, 0, True, {"epoch": 0, "micro": 0})
    ranks = [data.batches(2, 0, 0, True, {"epoch": 0, "micro": 0}, rank=r, world=2) for r in range(2)]
    for _ in range(2):
        whole, parts = one.take(1)[0], [r.take(1)[0] for r in ranks]
        real = [p for p in parts if not p.placeholder]
        assert [w for p in real for w in _wheres(p)] == _wheres(whole)
    assert [p.placeholder for p in parts] == [True, False]
    assert parts[0].trained_tokens == 0 and parts[0].real_tokens == 0 and len(parts[1].items) == 1


# ---- streaming

@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


def test_streaming_is_refused(tmp_path, datasets_cache, tokenizer):
    directory = tmp_path / "prompts"
    (directory / "data").mkdir(parents=True)
    rows = [{"prompt": "w10 w11", "answer": "4"}, {"prompt": "w12", "answer": "7"}]  # (one type per column: datasets
    # 4.0's JSON reader refuses a column of strings and numbers)
    (directory / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = read_data(str(directory))
    assert whole.format == "prompt" and len(whole.train) == 2
    with pytest.raises(ConfigError, match=r"^GRPO reads its prompts whole \(they are few and short: a run's time goes "
                                          r"to generating their answers\), and .*prompts \(train\) holds prompts; "
                                          r"drop --streaming$"):
        read_data(str(directory), streaming=True)
    with pytest.raises(ConfigError, match=r"^GRPO reads its prompts whole .*; drop --streaming$"):
        read_data(str(tmp_path / "not-opened"), format="prompt", streaming=True)  # before anything is opened
