"""Preference data: rows of a prompt with a chosen and a rejected answer, in each accepted form, read as any data
is (files, dataset directories, --field, validation, bad rows), tokenized into pairs of sequences whose labels
mask exactly the prompt, and batched so that each pair's two sequences go through one forward — packed or padded,
over epochs from a resume position, and shared among ranks. Token ids and labels are compared exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import CHATML, chat_tokenizer, tiny_tokenizer
from qlorakit.checkpoint import data_fingerprint
from qlorakit.data import (
    IGNORE_INDEX, PreferenceData, PreferenceExample, TokenizedPair, collate, collate_pairs, load_data, read_data,
)
from qlorakit.data.batches import placeholder
from qlorakit.data.formats import detect_format
from qlorakit.data.files import Row
from qlorakit.errors import ConfigError, DataError
from qlorakit.precision import LOSS_DTYPE

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


TEXT = [{"prompt": "w10 w11", "chosen": " w20 w21", "rejected": " w30"},
        {"prompt": "w12", "chosen": " w22", "rejected": " w31 w32 w33"}]
CHAT = [{"prompt": [_user("w10")], "chosen": [_assistant("w20 w21")], "rejected": [_assistant("w30")]}]
CONVERSATIONS = [{"chosen": [_user("w10"), _assistant("w20 w21")], "rejected": [_user("w10"), _assistant("w30")]}]


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer(CHATML)


def _words(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def _trained(tokenizer, item):
    return _words(tokenizer, [t for t in item.labels if t != IGNORE_INDEX])


def _pairs(n, words=2):
    """n text pairs with distinct prompts and answers (answers of `words` words and one word)."""
    return [{"prompt": f"w{10 + i}", "chosen": " " + " ".join(f"w{100 + i}" for _ in range(words)),
             "rejected": f" w{200 + i}"} for i in range(n)]


# ---- reading and tokenizing each form

def test_text_pairs_train_each_answer_and_eos(tokenizer):
    data = load_data(TEXT, tokenizer, max_length=64)
    assert isinstance(data, PreferenceData) and data.format == "preference"
    first = data.train[0]
    assert isinstance(first, TokenizedPair) and first.where == "data row 0" and first.reference is None
    assert _words(tokenizer, first.chosen.input_ids) == ["w10", "w11", "w20", "w21", "</s>"]
    assert _words(tokenizer, first.rejected.input_ids) == ["w10", "w11", "w30", "</s>"]
    # the labels mask exactly the prompt: every answer token and the EOS train
    assert first.chosen.labels == [IGNORE_INDEX, IGNORE_INDEX, *first.chosen.input_ids[2:]]
    assert first.rejected.labels == [IGNORE_INDEX, IGNORE_INDEX, *first.rejected.input_ids[2:]]
    assert (first.trained_tokens, first.tokens) == (3 + 2, 5 + 4)
    assert data.report.examples == 2 and data.report.tokens == 9 + 3 + 5
    assert data.describe() == "2 pairs, 17 tokens (11 trained)"
    # text needs no chat template: the plain word tokenizer gives the same ids (its words have the same ids)
    plain = load_data(TEXT, tiny_tokenizer(), max_length=64).train
    assert [(p.chosen.input_ids, p.chosen.labels, p.rejected.labels) for p in plain] == [
        (p.chosen.input_ids, p.chosen.labels, p.rejected.labels) for p in data.train]


def test_each_side_is_the_sft_example_of_its_answer(tokenizer):
    """A pair's sequences are what prompt-completion SFT data makes of (prompt, chosen) and (prompt, rejected)."""
    for rows in (TEXT, CHAT):
        pairs = load_data(rows, tokenizer, max_length=64).train
        for name in ("chosen", "rejected"):
            sft = load_data([{"prompt": r["prompt"], "completion": r[name]} for r in rows], tokenizer,
                            max_length=64).train
            assert [(getattr(p, name).input_ids, getattr(p, name).labels) for p in pairs] == [
                (s.input_ids, s.labels) for s in sft]


def test_chat_pairs_train_only_the_answer_turns(tokenizer):
    (pair,) = load_data(CHAT, tokenizer, max_length=64).train
    prompt = ["<|im_start|>", "user", "w10", "<|im_end|>", "<|im_start|>", "assistant"]
    assert _words(tokenizer, pair.chosen.input_ids) == [*prompt, "w20", "w21", "<|im_end|>"]
    assert pair.chosen.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert _trained(tokenizer, pair.chosen) == ["w20", "w21", "<|im_end|>"]
    assert _trained(tokenizer, pair.rejected) == ["w30", "<|im_end|>"]


@pytest.mark.parametrize("row", [
    {"prompt": "w10", "chosen": [_assistant("w20 w21")], "rejected": [_assistant("w30")]},  # prompt: a user turn
    {"prompt": [_user("w10")], "chosen": "w20 w21", "rejected": "w30"},  # answers: an assistant turn each
    CONVERSATIONS[0],  # no prompt: the turns both open with
], ids=["string-prompt", "string-answers", "no-prompt"])
def test_every_chat_form_reads_as_the_same_pair(tokenizer, row):
    (expected,) = load_data(CHAT, tokenizer, max_length=64).train
    (pair,) = load_data([row], tokenizer, max_length=64).train
    assert (pair.chosen.input_ids, pair.chosen.labels) == (expected.chosen.input_ids, expected.chosen.labels)
    assert (pair.rejected.input_ids, pair.rejected.labels) == (expected.rejected.input_ids, expected.rejected.labels)


def test_conversations_share_the_longest_common_prefix_of_turns(tokenizer):
    """The prompt is every shared turn, a shared few-shot answer included: it does not train."""
    shared = [_user("w10"), _assistant("w11"), _user("w12")]
    row = {"chosen": [*shared, _assistant("w20"), _user("w13"), _assistant("w21")],
           "rejected": [*shared, _assistant("w30")]}
    (example,) = read_data([row]).train
    assert isinstance(example, PreferenceExample)
    assert example.chosen.first_trained_turn == example.rejected.first_trained_turn == 3
    assert example.chosen.messages == row["chosen"] and example.rejected.messages == row["rejected"]
    (pair,) = load_data([row], tokenizer, max_length=64).train
    assert _trained(tokenizer, pair.chosen) == ["w20", "<|im_end|>", "w21", "<|im_end|>"]
    assert _trained(tokenizer, pair.rejected) == ["w30", "<|im_end|>"]


def test_format_detection(tokenizer):
    assert detect_format(Row({"prompt": "a", "chosen": "b", "rejected": "c"}, "r")) == "preference"
    # chosen and rejected win over the fields of other formats the row also holds
    assert detect_format(Row({"messages": [], "chosen": [], "rejected": []}, "r")) == "preference"
    assert detect_format(Row({"prompt": "a", "completion": "b", "chosen": "c"}, "r")) == "prompt-completion"
    with pytest.raises(DataError, match=r"or 'chosen' \+ 'rejected' \(\+ 'prompt'\) for preference pairs"):
        detect_format(Row({"chosen": "b"}, "r"))
    assert read_data(TEXT).format == "preference"
    assert read_data(TEXT, format="preference").format == "preference"


def test_field_mapping_reads_pairs_from_other_columns(tokenizer):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in TEXT]
    mapped = load_data(rows, tokenizer, max_length=64,
                       fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    plain = load_data(TEXT, tokenizer, max_length=64)
    assert data_fingerprint(mapped.fingerprinted()) == data_fingerprint(plain.fingerprinted())
    with pytest.raises(DataError, match=r"--field completion=bad maps a field the preference format does not read "
                                        r"\(it reads prompt, chosen, rejected\)"):
        read_data([{"prompt": "w1", "chosen": "w2", "bad": "w3"}], format="preference", fields={"completion": "bad"})


def test_files_and_dataset_directories_read_the_same_pairs(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = CHAT + CONVERSATIONS
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(CONVERSATIONS * 2), tmp_path / "p.parquet")
    Dataset.from_list(TEXT).save_to_disk(str(tmp_path / "saved"))
    (expected,) = load_data(CHAT, tokenizer, max_length=64).train
    for source in ("p.jsonl", "p.parquet"):
        data = load_data(str(tmp_path / source), tokenizer, max_length=64)
        assert [(p.chosen.input_ids, p.rejected.labels) for p in data.train] == [
            (expected.chosen.input_ids, expected.rejected.labels)] * 2
    assert [p.where for p in load_data(str(tmp_path / "p.jsonl"), tokenizer).train] == ["p.jsonl line 1",
                                                                                       "p.jsonl line 2"]
    saved = load_data(str(tmp_path / "saved"), tokenizer, max_length=64)
    assert [p.chosen.input_ids for p in saved.train] == [p.chosen.input_ids for p in
                                                          load_data(TEXT, tokenizer, max_length=64).train]


def test_validation_pairs(tmp_path, tokenizer):
    data = load_data(_pairs(8), tokenizer, max_length=64, validation=0.25, seed=3)
    assert (len(data.train), len(data.validation)) == (6, 2)
    assert all(isinstance(p, TokenizedPair) for p in data.validation)
    assert {p.where for p in data.train + data.validation} == {f"data row {i}" for i in range(8)}
    (tmp_path / "val.jsonl").write_text(json.dumps(TEXT[0]) + "\n")
    held = load_data(_pairs(3), tokenizer, max_length=64, validation_source=str(tmp_path / "val.jsonl"))
    assert len(held.validation) == 1 and held.validation[0].where == "val.jsonl line 1"


# ---- bad rows: (case, as docs/errors.md names it; the row; read_data's keywords; what the message must say)

CASES = [
    ("preference row without chosen or rejected", {"prompt": "w1", "completion": "w2"}, {"format": "preference"},
     r"^data row 0: missing field 'chosen' \(fields present: completion, prompt\); preference data needs 'prompt', "
     r"'chosen' and 'rejected' .* --field chosen=COLUMN --field rejected=COLUMN"),
    ("preference row without rejected", {"prompt": "w1", "chosen": "w2"}, {"format": "preference"},
     r"^data row 0: missing field 'rejected' \(fields present: chosen, prompt\); preference data needs"),
    ("preference answer that is empty", {"prompt": "w1", "chosen": " ", "rejected": "w3"}, {},
     r"^data row 0: field 'chosen' is empty; a preference pair needs a prompt and two answers: fill it in, or leave "
     r"the row out \(--skip-bad-rows skips such rows\)"),
    ("preference answer that is null", {"prompt": "w1", "chosen": "w2", "rejected": None}, {},
     r"^data row 0: field 'rejected' is empty \(a null, or an empty CSV cell\), but this format needs it"),
    ("preference prompt that is null", {"prompt": None, "chosen": "w2", "rejected": "w3"}, {},
     r"^data row 0: field 'prompt' is empty \(a null, or an empty CSV cell\), but this format needs it"),
    ("preference answer of the wrong type", {"prompt": "w1", "chosen": 5, "rejected": "w3"}, {},
     r"^data row 0: field 'chosen' must be a string, not int"),
    ("preference prompt that is an empty list", {"prompt": [], "chosen": "w2", "rejected": [_assistant("w3")]}, {},
     r"^data row 0: field 'prompt' is an empty list of messages; fill it in, or leave the row out"),
    ("preference pair of the same answer", {"prompt": "w1", "chosen": "w2", "rejected": "w2"}, {},
     r"^data row 0: 'chosen' and 'rejected' are the same answer: nothing to learn from this pair; fix the row, or "
     r"leave it out \(--skip-bad-rows skips such rows\)"),
    ("preference conversations that are the same", {"chosen": CHAT[0]["prompt"] + CHAT[0]["chosen"],
                                                     "rejected": CHAT[0]["prompt"] + CHAT[0]["chosen"]}, {},
     r"^data row 0: 'chosen' and 'rejected' are the same answer: nothing to learn from this pair"),
    ("preference answer without an assistant turn", {"prompt": [_user("w1")], "chosen": [_user("w2")],
                                                     "rejected": [_assistant("w3")]}, {},
     r"^data row 0: 'chosen' has no assistant turn, so there is nothing to score; give the answer as assistant "
     r"turns \(or a string\)"),
    ("preference answer turn with an unknown role", {"prompt": "w1", "chosen": [{"role": "bot", "content": "w2"}],
                                                     "rejected": "w3"}, {},
     r"^data row 0: chosen\[0\]: unknown role 'bot'; use one of system, user, assistant"),
    ("preference text answers without a prompt", {"chosen": "w2", "rejected": "w3"}, {},
     r"^data row 0: no 'prompt', and 'chosen' is a string: without a prompt, 'chosen' and 'rejected' must be whole "
     r"conversations \(lists of messages\) that share their first turns; give the prompt in a 'prompt' field"),
    ("preference conversations without a shared prompt", {"chosen": [_user("w1"), _assistant("w2")],
                                                          "rejected": [_user("w4"), _assistant("w3")]}, {},
     r"^data row 0: no 'prompt', and 'chosen' and 'rejected' differ from their first turn, so there is no prompt "
     r"they share: give the prompt in a 'prompt' field \(--field prompt=COLUMN\)"),
    ("preference conversations that differ after a user turn",
     {"chosen": [_user("w1"), _assistant("w2"), _user("w5"), _assistant("w6")],
      "rejected": [_user("w1"), _assistant("w2"), _user("w7"), _assistant("w8")]}, {},
     r"^data row 0: no 'prompt'; 'chosen' and 'rejected' share their first 2 turns \(the prompt\), and 'chosen' "
     r"goes on with a user turn, not an assistant turn: each answer must start with an assistant turn"),
    ("preference conversation that ends where the other goes on",
     {"chosen": [_user("w1"), _assistant("w2")], "rejected": [_user("w1"), _assistant("w2"), _user("w7"),
                                                              _assistant("w8")]}, {},
     r"^data row 0: no 'prompt'; 'chosen' and 'rejected' share their first 2 turns \(the prompt\), and 'chosen' "
     r"ends there, with no answer of its own: each answer must start with an assistant turn"),
]


@pytest.mark.parametrize("case,row,kw,message", CASES, ids=[c[0] for c in CASES])
def test_bad_rows_name_the_row_and_field(case, row, kw, message):
    with pytest.raises(DataError) as e:
        read_data([row], **kw)
    assert re.search(message, str(e.value)), str(e.value)


def test_bad_rows_in_a_file_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n" + json.dumps({"prompt": "w1", "chosen": "w2", "rejected": "w2"}))
    with pytest.raises(DataError, match=r"^p\.jsonl line 2: 'chosen' and 'rejected' are the same answer"):
        read_data(str(path))


def test_skip_bad_rows_counts_them(tokenizer):
    bad = [case[1] for case in CASES if "format" not in case[2]]
    rows = [TEXT[0], *bad, TEXT[1]]
    data = load_data(rows, tokenizer, max_length=64, skip_bad_rows=True)
    assert [p.where for p in data.train] == ["data row 0", f"data row {len(rows) - 1}"]
    assert len(data.report.skipped_rows) == len(bad)
    assert data.report.skipped_rows[0].startswith("data row 1: field 'chosen' is empty")
    assert data.describe() == f"2 pairs, 17 tokens (11 trained), {len(bad)} bad rows skipped"
    with pytest.raises(DataError, match=r"^data: all 2 rows are bad and were skipped \(the first: data row 0: "):
        read_data(bad[:2], skip_bad_rows=True)


def test_every_case_is_documented():
    section = DOCS.read_text()
    section = section[section.index("## Preference data"):]
    for case, *_ in CASES + TOKENIZE_CASES + [STREAMING]:
        assert f"| {case} |" in section, case


# ---- max_length

def test_truncation_keeps_the_start_and_drops_pairs_without_an_answer(tokenizer):
    """max_length 4: row 0's chosen sequence (prompt 1 + 5 answer words + EOS) is cut to its first 4 tokens;
    row 1's prompt fills the limit, so its answers are gone and the pair is dropped (counted as truncated too, as
    SFT counts such examples); row 2's rejected sequence loses its EOS."""
    rows = [{"prompt": "w10", "chosen": " w20 w21 w22 w23 w24", "rejected": " w30"},
            {"prompt": "w11 w12 w13 w14", "chosen": " w25", "rejected": " w31"}, TEXT[1]]
    data = load_data(rows, tokenizer, max_length=4)
    assert [p.where for p in data.train] == ["data row 0", "data row 2"]
    first = data.train[0]
    assert _words(tokenizer, first.chosen.input_ids) == ["w10", "w20", "w21", "w22"]
    assert _trained(tokenizer, first.chosen) == ["w20", "w21", "w22"]
    assert _words(tokenizer, first.rejected.input_ids) == ["w10", "w30", "</s>"]  # the other side is left whole
    assert (data.report.truncated, data.report.dropped_long, data.report.examples) == (3, 1, 2)
    assert data.describe() == ("2 pairs, 14 tokens (10 trained), 3 truncated to max_length, 1 dropped as too long")


def _long(tokenizer, **kw):
    rows = [TEXT[1], {"prompt": "w10", "chosen": " w20", "rejected": " w30 w31 w32 w33 w34"}]
    return load_data(rows, tokenizer, max_length=5, **kw)


# A template that leaves assistant turns out (and has no generation prompt): nothing of an answer is rendered.
SILENT_ASSISTANT = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ '<|im_start|>' + m['role'] + '\\n' "
                    "+ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}")

# (case, as docs/errors.md names it; how to provoke it (tokenizer); what the message must say)
TOKENIZE_CASES = [
    ("preference pair longer than max_length (on_long=error)", lambda tok: _long(tok, on_long="error"),
     r"^data row 1: the rejected sequence \(the prompt and the rejected answer\) is 7 tokens, longer than "
     r"max_length 5; raise --max-length, or let qlorakit truncate \(--on-long truncate\) or drop \(--on-long drop\) "
     r"such pairs"),
    ("every preference pair beyond max_length",
     lambda tok: load_data([{"prompt": "w10 w11 w12", "chosen": " w20", "rejected": " w30"}], tok, max_length=3),
     r"^data: nothing to train on — all 1 pairs were longer than max_length with an answer beyond it; raise "
     r"--max-length"),
    ("preference answer with no token to score", lambda tok: load_data(CHAT, chat_tokenizer(SILENT_ASSISTANT)),
     r"^data row 0: the chosen answer has no token to score \(the chat template renders no text for its assistant "
     r"turns, or the answer tokenizes to nothing\); fix the data or the chat template"),
    ("preference data with train_on all", lambda tok: load_data(TEXT, tok, train_on="all"),
     r"^train_on='all' does not apply to preference data: the answers are scored, never the prompt; leave it out"),
]


@pytest.mark.parametrize("case,provoke,message", TOKENIZE_CASES, ids=[c[0] for c in TOKENIZE_CASES])
def test_tokenizing_errors_are_clear(tokenizer, case, provoke, message):
    with pytest.raises((DataError, ConfigError)) as e:
        provoke(tokenizer)
    assert re.search(message, str(e.value)), str(e.value)


def test_on_long_drop_drops_the_pair(tokenizer):
    data = _long(tokenizer, on_long="drop")
    assert [p.where for p in data.train] == ["data row 0"]
    assert (data.report.dropped_long, data.report.truncated, data.report.examples) == (1, 0, 1)


# ---- batches

def _with_reference(pairs):
    for i, pair in enumerate(pairs):
        pair.reference = (-1.0 - i, -10.0 - i)
    return pairs


def test_collate_pairs_packed(tokenizer):
    """One row: chosen_0, rejected_0, chosen_1, rejected_1 end to end, positions restarting for each, each token's
    sequence id, the labels of each sequence in place, the reference in the same order."""
    pairs = _with_reference(load_data(TEXT, tokenizer, max_length=64).train)
    batch = collate_pairs(pairs, 0, packed=True)
    sequences = [pairs[0].chosen, pairs[0].rejected, pairs[1].chosen, pairs[1].rejected]
    assert batch.input_ids.tolist() == [[t for s in sequences for t in s.input_ids]]
    assert batch.labels.tolist() == [[t for s in sequences for t in s.labels]]
    assert batch.position_ids.tolist() == [[p for s in sequences for p in range(len(s.input_ids))]]
    assert batch.sequences.tolist() == [[k for k, s in enumerate(sequences) for _ in s.input_ids]]
    assert batch.attention_mask is None and batch.pairs == 2 and not batch.placeholder
    assert batch.reference.dtype == LOSS_DTYPE and batch.reference.tolist() == [-1.0, -10.0, -2.0, -11.0]
    assert batch.trained_tokens == sum(p.trained_tokens for p in pairs)  # the labels, as SFT normalises by
    assert batch.real_tokens == sum(p.tokens for p in pairs)
    moved = batch.to("cpu")
    assert torch.equal(moved.sequences, batch.sequences) and torch.equal(moved.reference, batch.reference)
    assert moved.pairs == 2


def test_collate_pairs_padded(tokenizer):
    pairs = _with_reference(load_data(TEXT, tokenizer, max_length=64).train)
    batch = collate_pairs(pairs, 0, packed=False)
    sequences = [pairs[0].chosen, pairs[0].rejected, pairs[1].chosen, pairs[1].rejected]
    length = max(len(s.input_ids) for s in sequences)
    assert batch.input_ids.shape == (4, length) and batch.pairs == 2
    for k, s in enumerate(sequences):
        n = len(s.input_ids)
        assert batch.input_ids[k].tolist() == s.input_ids + [0] * (length - n)
        assert batch.labels[k].tolist() == s.labels + [IGNORE_INDEX] * (length - n)
        assert batch.sequences[k].tolist() == [k] * n + [-1] * (length - n)
        assert batch.attention_mask[k].tolist() == [1] * n + [0] * (length - n)
    assert batch.reference.tolist() == [-1.0, -10.0, -2.0, -11.0]
    assert batch.real_tokens == sum(p.tokens for p in pairs)
    pairs[1].reference = None  # a pair without its reference: the batch has none
    assert collate_pairs(pairs, 0, packed=False).reference is None


def test_sft_batches_and_placeholders_are_unchanged(tokenizer):
    items = load_data([{"prompt": "w10", "completion": " w20"}], tokenizer, max_length=64).train
    batch = collate(items, 0)
    assert (batch.sequences, batch.pairs, batch.reference) == (None, 0, None)
    empty = placeholder(0)
    assert empty.pairs == 0 and empty.sequences.tolist() == [[-1, -1]] and empty.trained_tokens == 0


def _pairs_of(batch, pairs):
    """The pairs a packed batch holds, in order, told by their chosen sequences' first tokens (the prompts of
    _pairs differ)."""
    by_first = {pair.chosen.input_ids[0]: pair.where for pair in pairs}
    starts = (batch.position_ids[0] == 0) & (batch.sequences[0] % 2 == 0)
    return [by_first[int(t)] for t in batch.input_ids[0][starts]]


def _key(batch):
    return (batch.input_ids.tolist(), batch.sequences.tolist(), batch.pairs)


def test_pair_batches_over_epochs_from_a_resume_position(tokenizer):
    """Batches of 2 pairs from 5 pairs: each epoch takes every pair once, in a seeded order of its own, and a
    stream started at a saved position takes exactly the batches the uninterrupted stream took from there."""
    data = load_data(_pairs(5), tokenizer, max_length=64)
    assert data.micro_batches_per_epoch(2) == 3
    stream = data.batches(2, seed=7, pad_id=0, packed=True, position={"epoch": 0, "micro": 0})
    batches = stream.take(6)  # two epochs
    assert stream.position == {"epoch": 1, "micro": 3}
    for epoch in (batches[:3], batches[3:]):
        assert sorted(where for b in epoch for where in _pairs_of(b, data.train)) == sorted(
            p.where for p in data.train)
        assert [b.pairs for b in epoch] == [2, 2, 1]
    assert [_key(b) for b in batches[:3]] != [_key(b) for b in batches[3:]]  # another order
    resumed = data.batches(2, seed=7, pad_id=0, packed=True, position={"epoch": 0, "micro": 2})
    assert [_key(b) for b in resumed.take(4)] == [_key(b) for b in batches[2:]]


def test_ranks_take_their_shares_of_the_pairs(tokenizer):
    """Two ranks with batch 2 take what one process with batch 4 takes; a share's sequence ids count from 0; the
    rank whose share of the lone last pair is empty (rank 0: data/batches.py's share) gets the placeholder (no
    pairs, no sequence)."""
    data = load_data(_pairs(5), tokenizer, max_length=64)
    one = data.batches(4, 0, 0, True, {"epoch": 0, "micro": 0})
    ranks = [data.batches(2, 0, 0, True, {"epoch": 0, "micro": 0}, rank=r, world=2) for r in range(2)]
    for _ in range(2):
        whole, parts = one.take(1)[0], [r.take(1)[0] for r in ranks]
        real = [p for p in parts if not p.placeholder]
        assert torch.equal(torch.cat([p.input_ids for p in real], dim=1), whole.input_ids)
        assert sum(p.pairs for p in parts) == whole.pairs
        assert all(p.sequences.tolist()[0][0] == 0 and p.sequences.max() == 2 * p.pairs - 1 for p in real)
    assert [p.placeholder for p in parts] == [True, False]
    assert parts[0].pairs == 0 and parts[0].sequences.tolist() == [[-1, -1]] and parts[0].trained_tokens == 0


def test_fingerprint_sees_a_changed_rejected_answer(tokenizer):
    rows = _pairs(3)
    before = data_fingerprint(load_data(rows, tokenizer, max_length=64).fingerprinted())
    assert before == data_fingerprint(load_data(_pairs(3), tokenizer, max_length=64).fingerprinted())
    assert before["train"]["examples"] == 6  # each pair's two sequences
    rows[1]["rejected"] = " w250"
    after = data_fingerprint(load_data(rows, tokenizer, max_length=64).fingerprinted())
    assert after["train"]["sha256"] != before["train"]["sha256"]
    assert after["train"]["tokens"] == before["train"]["tokens"]


# ---- streaming

@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


STREAMING = ("--streaming of preference data",)


def test_streaming_is_refused(tmp_path, datasets_cache):
    directory = tmp_path / "prefs"
    (directory / "data").mkdir(parents=True)
    (directory / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    whole = read_data(str(directory))
    assert whole.format == "preference" and len(whole.train) == 2
    with pytest.raises(ConfigError, match=r"^preference training reads the data whole: each pair's reference "
                                          r"log-probabilities are computed once, before the first step, and .*prefs "
                                          r"\(train\) holds preference pairs; drop --streaming"):
        read_data(str(directory), streaming=True)
    with pytest.raises(ConfigError, match=r"^preference training reads the data whole: .*; drop --streaming"):
        read_data(str(tmp_path / "not-opened"), format="preference", streaming=True)  # before anything is opened
