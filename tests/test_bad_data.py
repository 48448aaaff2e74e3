"""Bad data and prompts get a clear error naming the file and line (or the flag), before the model loads where the
input allows — never a traceback, a hang, or a silently wrong example. Every case here is listed, with its
message, in docs/errors.md (the last test keeps the two in step)."""

from __future__ import annotations

import builtins
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

import qlorakit
from conftest import CHATML, chat_tokenizer
from qlorakit.cli import build_parser
from qlorakit.data import load_data, read_rows
from qlorakit.errors import QLoraKitError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
GOOD = {"messages": [{"role": "user", "content": "w10"}, {"role": "assistant", "content": "w11"}]}
GOOD_LINE = json.dumps(GOOD).encode()


def _file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _data(source, **kw):
    return load_data(source, chat_tokenizer(CHATML), **({"max_length": 64} | kw))


def _fifo(tmp_path, name="train.jsonl"):
    """A named pipe. A writer thread feeds it one good row if some reader opens it within a few seconds, so code
    that does read from it gets a file (and the test fails on its message) instead of hanging forever."""
    path = tmp_path / name
    os.mkfifo(path)

    def writer():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.02)
                continue
            os.write(fd, GOOD_LINE + b"\n")
            os.close(fd)
            return

    threading.Thread(target=writer, daemon=True).start()
    return path


def _unreadable(tmp_path):
    """A data file that cannot be opened (permission denied). chmod 000 does not stop root, which CI may be, so
    open() itself refuses this one path — the same error the OS gives a normal user."""
    path = _file(tmp_path, "train.jsonl", GOOD_LINE + b"\n")
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", guarded)
        return read_rows(path)


def _cli(*argv):
    """Run a qlorakit command's function, so its error propagates (main() would print it and return 2)."""
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def _train(tmp_path, **kw):
    # The model does not exist: a refusal that names the data proves the data was checked before loading.
    return qlorakit.train(**({"model": str(tmp_path / "no-such-model"), "output": str(tmp_path / "run"),
                              "data": str(_file(tmp_path, "good.jsonl", GOOD_LINE + b"\n"))} | kw))


def _chat(tiny_model_dir, words, *flags):
    prompt = " ".join(f"w{10 + i % 200}" for i in range(words))
    return _cli("chat", "--model", tiny_model_dir, "--quant", "none", "--dtype", "fp32", "--device", "cpu",
                "--prompt", prompt, *flags)


# (case, how to provoke it (tmp_path, tiny_model_dir), what the message must say)
CASES = [
    ("data file that is not UTF-8 (.jsonl)",
     lambda t, m: _data(_file(t, "train.jsonl", GOOD_LINE + b'\n{"text": "w1\xff"}\n')),
     r"train\.jsonl line 2: not valid UTF-8 \(byte 0xff at byte 13 of the line\); save the file as UTF-8"),
    ("data file that is not UTF-8 (.json)",
     lambda t, m: _data(_file(t, "train.json", b'[\n{"text": "w1"},\n{"text": "w\xe92"}\n]')),
     r"train\.json line 3: not valid UTF-8 \(byte 0xe9 at byte 12 of the line\)"),
    ("data file that is not UTF-8 (.csv)",
     lambda t, m: _data(_file(t, "train.csv", b"text\nw10\nw1\x811\n")),
     r"train\.csv line 3: not valid UTF-8 \(byte 0x81 at byte 3 of the line\)"),
    ("unreadable data file", lambda t, m: _unreadable(t),
     r"train\.jsonl: cannot read the data file \(Permission denied\); check its permissions"),
    ("JSON nested too deeply (.jsonl)",
     lambda t, m: _data(_file(t, "train.jsonl", GOOD_LINE + b'\n{"text": ' + b"[" * 100_000 + b"]" * 100_000
                              + b"}\n")),
     r"train\.jsonl line 2: JSON nested more than 100 levels deep"),
    ("JSON nested too deeply (.jsonl, within the parser's reach)",
     lambda t, m: _data(_file(t, "train.jsonl", GOOD_LINE + b'\n{"messages": [{"role": ' + b"[" * 500
                              + b"]" * 500 + b', "content": "w1"}]}\n')),
     r"train\.jsonl line 2: JSON nested more than 100 levels deep"),
    ("JSON nested too deeply (.json)",
     lambda t, m: _data(_file(t, "train.json", b'[\n{"text": "w1"},\n{"text": ' + b"[" * 100_000
                              + b"]" * 100_000 + b"}\n]")),
     r"train\.json line 3: JSON nested more than 100 levels deep"),
    ("JSON nested too deeply (.json, within the parser's reach)",
     lambda t, m: _data(_file(t, "train.json", b'{"rows": [\n{"text": "w1"},\n{"text": ' + b"[" * 300
                              + b"]" * 300 + b"}\n]}")),
     r"train\.json item 1 \(line 3\): JSON nested more than 100 levels deep"),
    ("data path that is not a regular file", lambda t, m: _data(_fifo(t)),
     r"train\.jsonl: not a regular file but a named pipe \(FIFO\); qlorakit reads data from regular files only"),
    ("FIFO as --data, refused before the model loads", lambda t, m: _train(t, data=str(_fifo(t))),
     r"train\.jsonl: not a regular file but a named pipe \(FIFO\)"),
    ("FIFO as --validation-data, refused before the model loads",
     lambda t, m: _train(t, validation_data=str(_fifo(t, "val.jsonl"))),
     r"val\.jsonl: not a regular file but a named pipe \(FIFO\)"),
    ("missing --validation-data file, refused before the model loads",
     lambda t, m: _train(t, validation_data=str(t / "val.jsonl")),
     r"val\.jsonl: data file not found; check the path given to --validation-data"),
    ("CSV row with a missing cell",
     lambda t, m: _data(_file(t, "train.csv", "instruction,input,output\nw10,,w20\nw11,w21\n")),
     r"train\.csv line 3: 2 cells, fewer than the header's 3 columns \(no cell for 'output'\); write every cell"),
    ("CSV row with an empty required cell",
     lambda t, m: _data(_file(t, "train.csv", "instruction,input,output\nw10,,w20\nw11,w12,\n")),
     r"train\.csv line 3: field 'output' is empty \(a null, or an empty CSV cell\), but this format needs it"),
    ("every row bad and skipped",
     lambda t, m: _data(_file(t, "train.jsonl", '{"text": ""}\n{"text": " "}\n'), skip_bad_rows=True),
     r"train\.jsonl: all 2 rows are bad and were skipped \(the first: train\.jsonl line 1: field 'text' is "
     r"empty\)"),
    ("special-token string in content the template rewrites",
     lambda t, m: load_data([{"messages": [{"role": "user", "content": "w10 <|im_end|>"}, GOOD["messages"][1]]}],
                            chat_tokenizer(CHATML.replace("m['content']", "m['content'].replace('w', 'W')")),
                            max_length=64),
     r"data row 0: messages\[0\] \(user\) contains the special token string '<\|im_end\|>', and the chat template "
     r"changes that message's text"),
    ("chat prompt longer than the model's context", lambda t, m: _chat(m, 200),
     r"--prompt: the prompt is 2\d\d tokens, more than the model's context of 128 "
     r"tokens \(max_position_embeddings\) can hold with an answer; shorten the prompt"),
    ("chat prompt and answer longer than the model's context", lambda t, m: _chat(m, 100, "--max-new-tokens", 64),
     r"--prompt: the prompt is 1\d\d tokens and --max-new-tokens 64 more would make 1\d\d, past the model's "
     r"context of 128 tokens \(max_position_embeddings\); lower --max-new-tokens to at most \d+"),
    ("eval prompt and answer longer than the model's context",
     lambda t, m: _cli("eval", "--model", m, "--quant", "none", "--dtype", "fp32", "--device", "cpu",
                       "--max-new-tokens", 100, "--data", _file(t, "eval.jsonl", json.dumps(
                           {"messages": [{"role": "user", "content": " w11" * 40},
                                         {"role": "assistant", "content": "w12"}]}) + "\n")),
     r"eval\.jsonl line 1: the prompt is \d+ tokens and --max-new-tokens 100 more would make \d+, past the "
     r"model's context of 128 tokens"),
    ("eval of a conversation whose only answer is its first turn",
     lambda t, m: _cli("eval", "--model", t / "no-such-model", "--data", _file(t, "eval.jsonl", json.dumps(
         {"messages": [{"role": "assistant", "content": "w12"}]}) + "\n")),
     r"eval\.jsonl line 1: the conversation's only answer is its first turn, so there is no prompt to generate it "
     r"from; exact match needs a turn before the answer \(--no-exact-match: loss only\)"),
    ("generation with --max-new-tokens below 1", lambda t, m: _chat(m, 3, "--max-new-tokens", 0),
     r"max_new_tokens=0: generate at least 1 token"),
    ("eval on an empty file, refused before the model loads",
     lambda t, m: _cli("eval", "--model", t / "no-such-model", "--data", _file(t, "eval.jsonl", "")),
     r"eval\.jsonl: the file holds no rows"),
]


@pytest.mark.parametrize("case,provoke,message", CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_a_clear_error(tmp_path, tiny_model_dir, case, provoke, message):
    with pytest.raises(QLoraKitError) as e:
        provoke(tmp_path, str(tiny_model_dir))
    assert re.search(message, str(e.value)), str(e.value)


def test_a_prompt_that_fits_still_generates(tiny_model_dir, capsys):
    """At the edge: prompt + max_new_tokens exactly the context generates (and prints) an answer."""
    from qlorakit.data import encode_chat
    from conftest import tiny_tokenizer

    words = 100
    prompt = " ".join(f"w{10 + i % 200}" for i in range(words))
    n = len(encode_chat(tiny_tokenizer(), [{"role": "user", "content": prompt}], True)[1])
    assert _chat(str(tiny_model_dir), words, "--max-new-tokens", 128 - n) == 0
    assert capsys.readouterr().out.strip()


def test_every_case_is_documented():
    docs = DOCS.read_text()
    for case, _, _ in CASES:
        assert f"| {case} |" in docs, case


def test_interactive_chat_reports_an_overlong_turn_and_goes_on(tiny_model_dir, monkeypatch, capsys):
    """A message that does not fit the context is refused with the numbers, and the conversation goes on."""
    said = iter([" ".join(["w10"] * 200), "w11 w12", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(said))
    assert _cli("chat", "--model", tiny_model_dir, "--quant", "none", "--dtype", "fp32", "--device", "cpu",
                "--max-new-tokens", 4) == 0
    out, err = capsys.readouterr()
    assert re.search(r"qlorakit: chat: the prompt is 2\d\d tokens, .* context of 128 tokens .*/reset clears", err), err
    assert out.count("model> ") == 1  # the second message was answered


def test_train_passes_parse_special_tokens_to_the_data(tmp_path, monkeypatch):
    """--parse-special-tokens reaches TrainConfig and load_data (off by default)."""
    import importlib

    from qlorakit.config import TrainConfig

    train_module = importlib.import_module("qlorakit.train")  # the module; qlorakit.train is the function

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("parse_special_tokens"))
        raise KeyboardInterrupt  # enough: stop before training

    monkeypatch.setattr(train_module, "load_data", recording)
    model = qlorakit.load(str(_tiny_dir(tmp_path)), quant="none", dtype="fp32", device="cpu")
    data = _file(tmp_path, "good.jsonl", GOOD_LINE + b"\n")
    for argv, expected in (([], False), (["--parse-special-tokens"], True)):
        args = build_parser().parse_args(["train", "--data", str(data), *argv])
        flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "overwrite", "quiet")}
        config = TrainConfig.build(None, **flags)
        assert config.parse_special_tokens is expected
        with pytest.raises(KeyboardInterrupt):
            qlorakit.train(config, loaded=model, output=str(tmp_path / f"run{expected}"), device="cpu")
    assert seen == [False, True]


def _tiny_dir(tmp_path):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path / "tiny")
