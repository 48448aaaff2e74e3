"""`qlorakit eval`: after the exact-match score, a table of the first wrong answers (--show N) fitted to the
terminal; with --output, every answer as a JSON line, written atomically and only where qlorakit may write (an
earlier answers file with --overwrite, never a file qlorakit did not write), refused before the model loads.

The answers come from a stand-in for generation, keyed by prompt, so each example's outcome is known; the model,
adapter and data are loaded and evaluated as in a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qlorakit
import qlorakit.cli as cli
from qlorakit.cli import main
from qlorakit.evaluate import ANSWER_FIELDS, exact_match

LONG = " ".join(f"w{i}" for i in range(10, 90))  # a prompt far wider than any terminal
# prompt (the user's message) -> (reference answer, the model's answer)
ROWS = [
    ("w10 w50", "w100 w101", "w100 w101"),
    ("w11 w51", "w100 w101", "w7 w8"),
    ("w12 w52", "w102", " w102 \n"),  # right: compared whitespace-trimmed
    (LONG, "w103", "w103 w104"),
    ("w13 w53", "w104", "w9\nw9"),  # a newline, shown as \n on its one line
    ("w14 w54", "w105", "\x1b[31mw105"),  # a terminal escape, shown escaped
    ("w15 w55", "w106", ""),
]
WRONG = [1, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    from qlorakit.adapters import save_adapter
    from qlorakit.config import TrainConfig

    model, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=2, alpha=4)
    config = TrainConfig(model=str(tiny_model_dir), quant="none", dtype="fp32")
    return save_adapter(model, tmp_path_factory.mktemp("adapter"), config, qlorakit.precision_of(model))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"instruction": prompt, "output": expected}) + "\n"
                            for prompt, expected, _ in ROWS))
    return path


@pytest.fixture(autouse=True)
def answers(monkeypatch):
    """Generation answers each prompt with ROWS' answer; the prompts it was asked are recorded."""
    got = {prompt: answer for prompt, _, answer in ROWS}
    asked = []

    def generate(model, tokenizer, prompts, max_new_tokens=64, **kwargs):
        asked.extend(prompts)
        return [got[prompt[-1]["content"]] for prompt in prompts]

    monkeypatch.setattr("qlorakit.evaluate.generate", generate)
    monkeypatch.setenv("COLUMNS", "100")
    return asked


@pytest.fixture
def loads(monkeypatch):
    """How many times a command loaded the model."""
    calls, load = [], cli._load_with_adapter
    monkeypatch.setattr(cli, "_load_with_adapter", lambda args: calls.append(1) or load(args))
    return calls


def _eval(adapter, data, *flags):
    return main(["eval", "--adapter", str(adapter), "--data", str(data), "--device", "cpu", *flags])


def _table(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("wrong answers"))
    return lines[start:]


def test_exact_match_returns_every_example_with_its_outcome(data):
    from qlorakit.data import read_examples

    examples, _ = read_examples(str(data))
    match = exact_match(None, None, examples)  # (the stand-in generation needs no model)
    assert (match["correct"], match["total"], match["accuracy"]) == (2, 7, 2 / 7)
    assert [list(sample) for sample in match["samples"]] == [list(ANSWER_FIELDS)] * len(ROWS)
    assert [s["where"] for s in match["samples"]] == [f"eval.jsonl line {i}" for i in range(1, 8)]
    assert [s["prompt"] for s in match["samples"]] == [[{"role": "user", "content": p}] for p, _, _ in ROWS]
    assert [(s["expected"], s["got"]) for s in match["samples"]] == [(e, a) for _, e, a in ROWS]
    assert [i for i, s in enumerate(match["samples"]) if not s["correct"]] == WRONG


def test_the_table_shows_the_first_wrong_answers_and_how_many_more(adapter, data, capsys):
    assert _eval(adapter, data, "--show", "2") == 0
    out = capsys.readouterr().out
    assert "exact match 28.6% (2/7)" in out
    table = _table(out)
    assert table[0] == "wrong answers (2 of 5):"
    assert table[1].split() == ["where", "prompt", "expected", "got"]
    assert table[2].split() == ["eval.jsonl", "line", "2", "w11", "w51", "w100", "w101", "w7", "w8"]
    assert table[3].startswith("  eval.jsonl line 4  w10 w11 w12") and table[3].endswith("  w103       w103 w104")
    assert table[4] == "  ... and 3 more wrong; --show 5 prints them all (--output FILE.jsonl writes every answer)"
    assert len(table) == 5
    assert all(len(line) <= 100 for line in table)


def test_the_default_shows_five_wrong_answers_escaped_on_one_line_each(adapter, data, capsys):
    assert _eval(adapter, data) == 0
    table = _table(capsys.readouterr().out)
    assert table[0] == "wrong answers (5 of 5):" and len(table) == 2 + 5  # the title, the header, every wrong one
    assert [line.split()[2] for line in table[2:]] == ["2", "4", "5", "6", "7"]
    assert table[4].endswith("w104       w9\\nw9")
    assert table[5].endswith("w105       \\x1b[31mw105")  # not a colour code the terminal would obey
    assert table[6].endswith("w106")  # an empty answer


def test_show_0_prints_no_table(adapter, data, capsys):
    assert _eval(adapter, data, "--show", "0") == 0
    out = capsys.readouterr().out
    assert "exact match 28.6% (2/7)" in out and "wrong answers" not in out


def test_a_long_prompt_keeps_its_start_and_end_within_a_narrow_terminal(adapter, data, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    assert _eval(adapter, data, "--show", "2") == 0
    table = _table(capsys.readouterr().out)
    assert len(table) == 5 and all(len(line) <= 60 for line in table[:4]), table  # (the last: how many more)
    prompt = table[3].split("  ")[2]
    assert "..." in prompt and prompt.startswith("w10 w11") and prompt.endswith("w88 w89"), prompt


def test_output_writes_one_json_line_per_example(adapter, data, tmp_path, capsys):
    out = tmp_path / "answers" / "eval.jsonl"  # (its directory is made)
    assert _eval(adapter, data, "--output", str(out), "--limit", "6", "--json") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2] == f"6 answers written to {out} (a JSON line each: where, prompt, expected, got, correct)"
    assert json.loads(printed[-1])["exact_match"] == 2 / 6
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 6 and all(list(line) == list(ANSWER_FIELDS) for line in lines)
    assert lines[3] == {"where": "eval.jsonl line 4", "prompt": [{"role": "user", "content": LONG}],
                        "expected": "w103", "got": "w103 w104", "correct": False}
    assert [line["correct"] for line in lines] == [True, False, True, False, False, False]
    assert lines[5]["got"] == "\x1b[31mw105"  # the answer as it was, escaped only by JSON
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.jsonl"]  # no temporary left


def test_an_earlier_answers_file_is_replaced_only_with_overwrite(adapter, data, tmp_path, capsys, loads):
    out = tmp_path / "answers.jsonl"
    assert _eval(adapter, data, "--output", str(out), "--limit", "2") == 0
    first = out.read_text()
    assert _eval(adapter, data, "--output", str(out)) == 2
    assert capsys.readouterr().err.strip() == (
        f"qlorakit: error: {out}: already exists (a file of eval answers qlorakit wrote); choose another --output "
        "or pass --overwrite to replace it")
    assert out.read_text() == first and len(loads) == 1  # refused before the model was loaded
    assert _eval(adapter, data, "--output", str(out), "--overwrite") == 0
    assert len(out.read_text().splitlines()) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "eval.jsonl"]


def test_the_data_file_itself_is_never_overwritten(adapter, data, capsys, loads):
    text = data.read_text()
    assert _eval(adapter, data, "--output", str(data), "--overwrite") == 2
    assert "was not written by qlorakit" in capsys.readouterr().err
    assert data.read_text() == text and loads == []


@pytest.mark.parametrize("contents", ['{"id": 1, "text": "my own data"}\n', "", "not json\n",
                                      json.dumps(dict.fromkeys(ANSWER_FIELDS[:-1], "x")) + "\n"])
def test_a_file_qlorakit_did_not_write_is_never_replaced(adapter, data, tmp_path, capsys, loads, contents):
    out = tmp_path / "mine.jsonl"
    out.write_text(contents)
    assert _eval(adapter, data, "--output", str(out), "--overwrite") == 2
    assert capsys.readouterr().err.strip() == (
        f"qlorakit: error: {out}: already exists and was not written by qlorakit (its first line is not an eval "
        "answer: where, prompt, expected, got, correct); qlorakit replaces only its own files, even with "
        "--overwrite: choose another --output")
    assert out.read_text() == contents and loads == []


# case (as docs/errors.md names it), flags, the message (paths relative to the directory of the data, eval.jsonl)
BAD_SETTINGS = [
    ("`--output` not named `*.jsonl` (a directory, `answers.json`)", ["--output", "answers.json"],
     "--output answers.json: name the output file *.jsonl (one JSON line per example)"),
    ("`--output` not named `*.jsonl` (a directory, `answers.json`)", ["--output", "."],
     "--output .: name the output file *.jsonl (one JSON line per example)"),
    ("an output path through a file (any command's `--output`)", ["--output", "eval.jsonl/x/answers.jsonl"],
     "eval.jsonl/x/answers.jsonl: cannot write here (a part of its path is a file, not a directory); choose another "
     "--output"),
    ("`--output` with `--no-exact-match`", ["--output", "a.jsonl", "--no-exact-match"],
     "--output writes each example's exact-match answer, and --no-exact-match asks for none; leave out one of them"),
    ("`--show` below 0", ["--show", "-1"], "--show -1: the number of wrong answers to print must be 0 (none) or more"),
]


@pytest.mark.parametrize("case,flags,message", BAD_SETTINGS, ids=[" ".join(c[1]) for c in BAD_SETTINGS])
def test_bad_output_settings_are_refused_before_the_model_loads(adapter, data, capsys, loads, monkeypatch, case,
                                                                 flags, message):
    monkeypatch.chdir(data.parent)
    assert _eval(adapter, data, *flags) == 2
    assert capsys.readouterr().err.strip() == "qlorakit: error: " + message
    assert loads == [] and sorted(p.name for p in data.parent.iterdir()) == ["eval.jsonl"]


def test_plain_text_data_has_no_answers_to_write(adapter, tmp_path, capsys, loads):
    data = tmp_path / "text.jsonl"
    data.write_text('{"text": "w10 w11 w12"}\n')
    assert _eval(adapter, data, "--output", str(tmp_path / "a.jsonl")) == 2
    assert capsys.readouterr().err.strip() == (
        f"qlorakit: error: --output {tmp_path / 'a.jsonl'}: {data} is plain text (format text), which has no "
        "reference answers to match; leave out --output")
    assert loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["text.jsonl"]


def test_every_case_is_documented():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    section = docs[docs.index("## eval and start-up"):]
    cases = {case for case, _, _ in BAD_SETTINGS} | {
        "`--output` on plain-text data", "an earlier answers file, no `--overwrite`",
        "a file qlorakit did not write (the data file itself, an empty file, other JSON), even with `--overwrite`"}
    for case in cases:
        assert f"| {case} |" in section, case
    for _, flags, message in BAD_SETTINGS:
        assert f"`{message}`" in section or flags == ["--output", "."], message
