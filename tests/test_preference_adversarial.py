"""Preference data an auditor would try: conversations held as JSON text in CSV cells, text that is not valid
Unicode, and pairs whose two answers are the same tokens. Each test failed before its fix (data/formats.py,
data/preference.py). Exact token ids and messages: no tolerance."""

from __future__ import annotations

import json
import re

import pytest

from conftest import CHATML, chat_tokenizer, tiny_tokenizer
from qlorakit.data import load_data, read_data
from qlorakit.errors import DataError

USER = {"role": "user", "content": "w5"}


def _csv(path, header, *rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("prompt", ["w5", json.dumps([USER])], ids=["text prompt", "chat prompt"])
def test_csv_answers_holding_conversations_as_json_are_chats(tmp_path, prompt):
    """A CSV cell holds a list of messages as JSON text: read as the conversation it is (as a `messages` cell is),
    never trained on as the literal JSON text (before: '[{"role": ...}]' was the answer's text)."""
    path = _csv(tmp_path / "pairs.csv", ["prompt", "chosen", "rejected"],
                [prompt, json.dumps([{"role": "assistant", "content": "w6"}]),
                 json.dumps([{"role": "assistant", "content": "w7"}])])
    pair = read_data(str(path)).train[0]
    assert pair.chosen.messages == [USER, {"role": "assistant", "content": "w6"}]
    assert pair.rejected.messages == [USER, {"role": "assistant", "content": "w7"}]
    assert pair.chosen.first_trained_turn == 1
    tokens = load_data(str(path), chat_tokenizer(CHATML), max_length=64).train[0]
    assert "role" not in chat_tokenizer(CHATML).decode(tokens.chosen.input_ids)


@pytest.mark.parametrize("answer", ["[1, 2, 3]", '[{"name": "w6"}]', "[not json"])
def test_text_answers_that_look_like_json_stay_text(answer):
    """Only a JSON list of message objects (with a role) is read as turns: a text answer that is JSON stays text."""
    pair = read_data([{"prompt": "w5", "chosen": answer, "rejected": "w7"}]).train[0]
    assert pair.chosen.messages is None and pair.chosen.completion == answer


@pytest.mark.parametrize("row, field", [
    ({"prompt": "w5 \ud83d", "chosen": "w6", "rejected": "w7"}, "field 'prompt'"),
    ({"prompt": [{"role": "user", "content": "w5"}], "chosen": [{"role": "assistant", "content": "\udc00"}],
      "rejected": "w7"}, "chosen[0]: 'content'"),
    ({"text": "w5 \ud83d"}, "field 'text'"),  # every format reads strings through the same check
], ids=["preference text", "preference chat", "sft text"])
def test_a_lone_surrogate_is_a_data_error_naming_the_field(tmp_path, row, field):
    """JSON's "\\ud83d" escape without its other half decodes to no character; before, the tokenizer raised a
    TypeError naming nothing."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")  # (json escapes the surrogate as \ud83d)
    with pytest.raises(DataError, match=rf"^bad\.jsonl line 1: {re.escape(field)} holds .* half of a "
                                        r"UTF-16 surrogate pair"):
        load_data(str(path), tiny_tokenizer(), max_length=64)


def test_answers_that_tokenize_alike_are_refused():
    """'w6' and 'w6 ' differ as text, and the word-level tokenizer makes both [w6, EOS]: the pair could teach
    nothing (its delta is 0 whatever the weights) and would count as a miss in reward accuracy."""
    with pytest.raises(DataError, match=r"^data row 0: the chosen and rejected answers differ as text but tokenize "
                                        r"to the same tokens"):
        load_data([{"prompt": "w5 ", "chosen": "w6", "rejected": "w6 "}], tiny_tokenizer(), max_length=64)


def test_answers_that_differ_only_beyond_max_length_are_dropped_and_counted():
    """Truncated to max_length, both answers keep the same tokens (w8 w9): the pair is dropped as too long, as a
    pair with an answer wholly beyond the limit is, and the other pair is kept."""
    rows = [{"prompt": "w5 w6 w7", "chosen": " w8 w9 w10", "rejected": " w8 w9 w11"},
            {"prompt": "w5", "chosen": " w8", "rejected": " w9"}]
    data = load_data(rows, tiny_tokenizer(), max_length=5)
    assert [pair.where for pair in data.train] == ["data row 1"]
    assert data.report.dropped_long == 1 and data.report.examples == 1
