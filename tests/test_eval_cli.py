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


# ---- prompt data (format prompt, GRPO's): the mean reward of the greedy answers, --reward

PROMPTS = [{"prompt": f"w{10 + i} w{30 + i} w{50 + 2 * i}", "answer": f"w{20 + i}"} for i in range(5)]
PROMPTS.insert(3, {"prompt": " ".join(f"w{60 + i}" for i in range(20)), "answer": "w99"})  # 21 tokens: dropped
REWARD_FILE = '''
def distinct(prompts, completions, rows):
    """The share of an answer's words that are distinct (a model that repeats itself scores low)."""
    return [len(set(c.split())) / max(len(c.split()), 1) for c in completions]
'''
# truncated: -1 for an answer cut at --max-new-tokens; regex: 1 for an answer with a word w100..w199
SPECS = ["truncated", r"regex:.*\bw1\d\d\b.*", "distinct.py:distinct"]
WEIGHTS = [1.0, 2.0, 0.5]
# (--max-length 24 and --max-new-tokens 6 leave 18 tokens to a prompt: the 21-token one is dropped)
REWARD_FLAGS = [flag for spec in SPECS for flag in ("--reward", spec)] + [
    "--reward-weights", ",".join(f"{w:g}" for w in WEIGHTS), "--max-new-tokens", "6", "--max-length", "24"]


@pytest.fixture
def prompts(tmp_path, monkeypatch):
    """prompts.jsonl and the reward file beside it, in the current directory (the file reward is named from it)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    (tmp_path / "distinct.py").write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture(scope="module")
def direct(adapter):
    """mean_reward of the adapter's model, called directly on the prompts load_data keeps: what eval must print."""
    from qlorakit.adapters import load_adapter
    from qlorakit.data import load_data
    from qlorakit.evaluate import mean_reward
    from qlorakit.rewards import parse_rewards

    model, tokenizer = qlorakit.load(str(adapter_base_of(adapter)), quant="none", dtype="fp32", device="cpu")
    model = load_adapter(model, adapter)
    directory = Path(adapter).parent / "direct"  # (the same file names: the same `where`s and reward specs)
    directory.mkdir(exist_ok=True)
    (directory / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    (directory / "distinct.py").write_text(REWARD_FILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        data = load_data("prompts.jsonl", tokenizer, max_length=24, max_new_tokens=6, on_long="drop")
        rewards = parse_rewards(SPECS, WEIGHTS)
    return data, mean_reward(qlorakit.Generator(model, tokenizer), data.train, rewards, 6)


def adapter_base_of(adapter):
    from qlorakit.adapters import adapter_base, read_adapter_info

    return adapter_base(read_adapter_info(adapter), adapter)


def test_prompt_eval_prints_the_mean_reward_mean_reward_gives(adapter, prompts, direct, capsys, loads):
    """Exact: the command's numbers are mean_reward's on the same model, prompts, rewards and weights."""
    data, scored = direct
    assert _eval(adapter, prompts, *REWARD_FLAGS, "--json", "--show", "0") == 0
    printed = capsys.readouterr().out.splitlines()
    result = json.loads(printed[-1])
    assert result == {"data": str(prompts), "prompts": 5, "dropped_long": 1, "reward": scored["reward"],
                      "rewards": scored["rewards"]}
    assert len(set(s["reward"] for s in scored["samples"])) > 1  # the rewards tell the answers apart
    assert any(v != 0 for v in scored["rewards"].values())
    assert printed[0] == f"mean reward {scored['reward']:.4f} over 5 prompts (greedy answers of at most 6 tokens)"
    width = max(map(len, SPECS))
    assert printed[1:4] == [f"  {spec:<{width}}  {scored['rewards'][spec]: .4f}  (weight {w:g})"
                            for spec, w in zip(SPECS, WEIGHTS)]
    assert printed[4] == "  (1 dropped: longer than the 18 tokens max_length 24 leaves beside max_new_tokens 6)"
    assert len(printed) == 6 and loads == [1]
    assert [item.where for item in data.train] == [f"prompts.jsonl line {i}" for i in (1, 2, 3, 5, 6)]


def test_prompt_eval_output_has_each_answer_and_its_rewards(adapter, prompts, direct, capsys):
    """Exact: each line's rewards are mean_reward's samples, its total the weighted sum, and their mean the mean."""
    data, scored = direct
    out = prompts.parent / "answers.jsonl"
    assert _eval(adapter, prompts, *REWARD_FLAGS, "--output", str(out), "--limit", "5", "--show", "0") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == (f"4 answers written to {out} (a JSON line each: where, prompt, row, answer, reward, "
                           "rewards)")
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    fields = list(qlorakit.evaluate.REWARD_ANSWER_FIELDS)
    assert [list(line) for line in lines] == [fields] * 4  # --limit 5: 5 rows, 1 dropped
    for line, item, sample, row in zip(lines, data.train, scored["samples"], [PROMPTS[i] for i in (0, 1, 2, 4)]):
        assert (line["where"], line["prompt"], line["row"]) == (item.where, row["prompt"], {"answer": row["answer"]})
        assert line["answer"] == sample["answer"] and line["reward"] == sample["reward"]
        assert line["rewards"] == {spec: sample[spec] for spec in SPECS}
        total = 0.0
        for spec, weight in zip(SPECS, WEIGHTS):
            total += weight * line["rewards"][spec]
        assert line["reward"] == total
    assert sorted(p.name for p in prompts.parent.iterdir()) == ["answers.jsonl", "distinct.py", "prompts.jsonl"]


def test_prompt_eval_shows_the_lowest_rewards_first(adapter, prompts, direct, capsys):
    _, scored = direct
    assert _eval(adapter, prompts, *REWARD_FLAGS, "--show", "3") == 0
    table = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("lowest rewards"))
    table = table[start:]
    lowest = sorted(scored["samples"], key=lambda s: s["reward"])  # (stable: ties in the data's order)
    assert table[0] == "lowest rewards (3 of 5):"
    assert table[1].split() == ["where", "prompt", "answer", "reward"]
    for line, sample in zip(table[2:5], lowest):
        assert line.startswith(f"  {sample['where']}  ") and line.endswith(f"  {sample['reward']:.4g}"), line
    assert table[5] == "  ... and 2 more; --show 5 prints them all (--output FILE.jsonl writes every answer)"
    assert len(table) == 6 and all(len(line) <= 100 for line in table)


def test_every_prompt_too_long_is_an_error_naming_the_limit(adapter, prompts, capsys, loads):
    assert _eval(adapter, prompts, "--reward", "truncated", "--max-new-tokens", "6", "--max-length", "8") == 2
    assert capsys.readouterr().err.strip() == (  # (the shortest prompts are 3 tokens: the tiny tokenizer adds no BOS)
        f"qlorakit: error: {prompts}: nothing to evaluate — all 6 prompts are longer than the 2 tokens max_length "
        "8 leaves beside max_new_tokens 6; raise --max-length or lower --max-new-tokens")
    assert loads == [1]  # (the tokenizer counts a prompt's tokens)


def _pairs_file(directory: Path) -> Path:
    path = directory / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "w10", "chosen": "w11", "rejected": "w12"}) + "\n")
    return path


# case (as docs/errors.md names it), the data (prompts, the instruction data, pairs), flags, the message (run in
# the directory of the data)
PROMPT_REFUSALS = [
    ("prompt data without `--reward`", "prompts", [],
     "prompts.jsonl holds prompts (format prompt), with no reference answers to match: name how to score the "
     "model's answers with --reward SPEC (e.g. --reward exact:answer, --reward numeric:answer, or your own --reward "
     "my_rewards:score), repeatable"),
    ("`--reward` on data other than prompts", "eval", ["--reward", "exact:output"],
     "--reward exact:output: --reward scores the model's answers to prompt data (rows of a 'prompt' and the fields "
     "the rewards read: format prompt), and eval.jsonl holds instruction data, which eval scores against the answers "
     "it holds; leave out --reward, or evaluate on prompt data"),
    ("`--reward` on data other than prompts", "pairs", ["--reward", "truncated"],
     "--reward truncated: --reward scores the model's answers to prompt data (rows of a 'prompt' and the fields the "
     "rewards read: format prompt), and pairs.jsonl holds preference data, which eval scores against the answers it "
     "holds; leave out --reward, or evaluate on prompt data"),
    ("`--reward-weights` without `--reward`", "prompts", ["--reward-weights", "1,2"],
     "--reward-weights 1,2 weighs the rewards --reward names, and none is given; add --reward SPEC (one per "
     "weight), or leave out --reward-weights"),
    ("`--no-exact-match` on prompt data", "prompts", ["--reward", "truncated", "--no-exact-match"],
     "--no-exact-match: prompts.jsonl holds prompts (format prompt), which have no answers to take a loss over; "
     "their generated answers are scored by --reward: leave out --no-exact-match"),
    ("a bad reward (any of the Rewards section's refusals before the model loads)", "prompts", ["--reward", "exactt"],
     "reward 'exactt': not a built-in reward nor a function (built-in rewards: exact:FIELD, regex:PATTERN, "
     "numeric:FIELD, overlong:N, truncated; or a function of yours: module:function or path/to/file.py:function); "
     "did you mean exact:FIELD?"),
    ("a bad reward (any of the Rewards section's refusals before the model loads)", "prompts",
     ["--reward", "truncated", "--reward", "exact:answer", "--reward-weights", "1"],
     "--reward-weights '1': 1 weight(s) for 2 reward(s) (truncated, exact:answer); give one weight per --reward, "
     "in the same order"),
    ("a bad reward (any of the Rewards section's refusals before the model loads)", "prompts",
     ["--reward", "nofile.py:score"],
     "reward 'nofile.py:score': nofile.py is no such file (looked in {cwd}); name a Python file and a function in "
     "it, path/to/file.py:function"),
    ("a row without the field a reward reads", "prompts", ["--reward", "numeric:solution"],
     "prompts.jsonl line 1: no field 'solution' for the reward numeric:solution (fields present: 'answer'); add it "
     "to every row, or name the column that holds it (numeric:COLUMN)"),
    ("`--max-new-tokens` that leaves no room for a prompt in `--max-length`", "prompts",
     ["--reward", "truncated", "--max-new-tokens", "64", "--max-length", "64"],
     "max_new_tokens=64 leaves no room for a prompt in max_length=64 (a prompt and its answer must fit together); "
     "raise --max-length or lower --max-new-tokens"),
]


@pytest.mark.parametrize("case,which,flags,message", PROMPT_REFUSALS, ids=[" ".join(c[2]) or c[0]
                                                                            for c in PROMPT_REFUSALS])
def test_prompt_eval_refusals_come_before_the_model_loads(data, prompts, capsys, loads, case, which, flags, message):
    """Refused before loading: never loaded (`loads`), and the adapter, which does not exist, is not reached."""
    source = {"prompts": prompts, "eval": data, "pairs": _pairs_file(prompts.parent)}[which]
    source = source.rename(prompts.parent / source.name) if source.parent != prompts.parent else source
    assert main(["eval", "--adapter", "no-such-adapter", "--data", source.name, "--device", "cpu", *flags]) == 2
    assert capsys.readouterr().err.strip() == "qlorakit: error: " + message.format(cwd=prompts.parent)
    assert loads == []


def test_an_earlier_reward_answers_file_is_replaced_with_overwrite(adapter, prompts, capsys):
    out = prompts.parent / "answers.jsonl"
    assert _eval(adapter, prompts, *REWARD_FLAGS, "--output", str(out), "--limit", "1") == 0
    assert _eval(adapter, prompts, *REWARD_FLAGS, "--output", str(out)) == 2
    assert "already exists (a file of eval answers qlorakit wrote)" in capsys.readouterr().err
    assert _eval(adapter, prompts, *REWARD_FLAGS, "--output", str(out), "--overwrite") == 0
    assert len(out.read_text().splitlines()) == 5


def test_every_prompt_case_is_documented():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    section = docs[docs.index("## eval and start-up"):]
    section = section[:section.index("\n## ")]
    for case, _, _, message in PROMPT_REFUSALS:
        assert f"| {case} |" in section, case
    first = {}  # (a case's first message is the one quoted)
    for case, _, _, message in PROMPT_REFUSALS:
        first.setdefault(case, message)
    for case, message in first.items():
        if not case.startswith("a bad reward"):
            assert f"`{message}`" in section, message
    assert "| every prompt longer than `--max-length` - `--max-new-tokens` |" in section
