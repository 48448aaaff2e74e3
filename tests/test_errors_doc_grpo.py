"""docs/errors.md's sections on GRPO's prompt data, rewards and settings quote each message as the code words it:
every row of those sections is provoked here and its documented message compared with the raised one, whole (a
'...' in the docs stands for what varies: an absolute path, an exception's own words, a long list), and its error
class with the row's. A row without a case here, or a case without a row, fails too."""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

import pytest

from conftest import CHATML, chat_tokenizer
from qlorakit.config import GRPOConfig
from qlorakit.data import load_data, read_data
from qlorakit.errors import QLoraKitError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
SECTIONS = ("## Prompt data", "## Rewards", "## GRPO settings")
MAX_NEW = 8


def _documented(title: str) -> dict[str, tuple[str, str]]:
    """The rows of the section `title`: case -> (error class, message)."""
    text = DOCS.read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    rows = {}
    for line in text[start:end if end > 0 else None].splitlines():
        if not line.startswith("| ") or line.startswith(("| case |", "|---")):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 3, line
        case, error, message = cells
        quoted = re.fullmatch(r"``\s?(.+?)\s?``|`(.+)`", message)
        assert quoted, f"{case}: the message is not quoted whole: {message}"
        rows[case] = (error, (quoted[1] or quoted[2]).replace("\\|", "|"))
    return rows


def _matches(documented: str, actual: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, documented.split("..."))), actual, re.DOTALL) is not None


# ---------------------------------------------------------------------------------------------- prompt data


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _read(rows, **kw):
    return lambda: read_data(rows, **kw)


LENGTHS = [{"prompt": " ".join(["w10"] * n), "answer": str(n)} for n in (3, 4, 5)]


def _load(rows=LENGTHS, **kw):
    settings = {"max_length": 64, "max_new_tokens": MAX_NEW, "on_long": "drop"} | kw
    return lambda: load_data(rows, chat_tokenizer(CHATML), **settings)


def _streamed(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LENGTHS))
    return read_data("prompts", format="prompt", streaming=True)


def _check_format(rows, objective):
    from qlorakit.train import check_format

    return lambda: check_format(read_data(rows), objective)


PROMPT_DATA = {
    "prompt row without a prompt (format prompt)": _read([{"question": "w1"}], format="prompt"),
    "prompt that is null": _read([{"prompt": None, "answer": "1"}]),
    "prompt that is blank": _read([{"prompt": "  ", "answer": "1"}]),
    "prompt of the wrong type": _read([{"prompt": 5}]),
    "prompt that is an empty list": _read([{"prompt": []}]),
    "prompt ending in an assistant turn": _read([{"prompt": [_user("w1"), _assistant("w2")]}]),
    "prompt turn with an unknown role": _read([{"prompt": [{"role": "bot", "content": "w1"}]}]),
    "prompt turn that is not an object": _read([{"prompt": [_user("w1"), "w2"]}]),
    "prompt turn without content": _read([{"prompt": [{"role": "user"}]}]),
    "prompt text that is not valid Unicode": _read([{"prompt": "w10 \ud83d"}]),
    "prompt that tokenizes to nothing": lambda: load_data(
        [{"prompt": [_user("w1")]}], chat_tokenizer("{% for m in messages %}{% endfor %}"), max_length=64,
        max_new_tokens=MAX_NEW, on_long="drop"),
    "prompt longer than max_length - max_new_tokens (on_long=error)": _load(max_length=8, max_new_tokens=4,
                                                                           on_long="error"),
    "every prompt longer than max_length - max_new_tokens": _load(max_length=8, max_new_tokens=6),
    "prompt data without max_new_tokens (Python API)": _load(max_new_tokens=0),
    "max_new_tokens that leaves no room for a prompt": _load(max_length=8, max_new_tokens=8),
    "on_long=truncate for prompts": _load(on_long="truncate"),
    "train_on for prompt data": _load(train_on="all"),
    "--streaming of prompt data": _streamed,
    "SFT data given to `qlorakit grpo`": _check_format([{"prompt": "w1", "completion": "w2"}], "grpo"),
    "prompt data given to `qlorakit train`": _check_format(LENGTHS, "sft"),
    "prompt data given to `qlorakit dpo`": _check_format(LENGTHS, "preference"),
}


# ---------------------------------------------------------------------------------------------- rewards


FUNCTIONS = '''
def length(prompts, completions, rows):
    return [float(len(c)) for c in completions]
def picky(prompts, completions, rows):
    return [1.0 / (len(c) - 3) for c in completions]
def batch_only(prompts, completions, rows):
    return [0.0] if len(completions) == 1 else 1 / 0
def one(prompts, completions, rows):
    return 1.0
def short(prompts, completions, rows):
    return [1.0]
def nan(prompts, completions, rows):
    return [float("nan")] * len(completions)
def exits(prompts, completions, rows):
    import sys
    if "abc" in completions:
        sys.exit(0)
    return [0.0] * len(completions)
def huge(prompts, completions, rows):
    return [1e39] * len(completions)
def big(prompts, completions, rows):
    return [3e38] * len(completions)
def two(prompts, completions):
    return []
THRESHOLD = 3
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A fresh module of reward functions in the current directory (imports are cached by name), forgotten
    afterwards; tests refer to it as my_rewards (its real name is swapped in)."""
    name = f"my_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FUNCTIONS)
    (tmp_path / "broken.py").write_text("def fn(:\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "folder.py").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading a reward puts its directory there for good
    yield name
    sys.modules.pop(name, None)


def _parse(specs, weights=None):
    from qlorakit.rewards import parse_rewards

    return lambda m: parse_rewards([s.replace("my_rewards", m) for s in specs] if isinstance(specs, list) else specs,
                                   weights)


def _check_rows(spec, row):
    from qlorakit.rewards import check_rows, parse_rewards

    return lambda m: check_rows(parse_rewards(spec), [{"answer": "1"}, row], ["prompts.jsonl line 1",
                                                                              "prompts.jsonl line 2"])


def _score(function, completions=("abcdef", "abc", "ab")):
    from qlorakit.rewards import parse_rewards, score

    def provoke(m):
        n = len(completions)
        score(parse_rewards(f"{m}:{function}"), ["q"] * n, list(completions), [{}] * n,
              [f"prompts.jsonl line {i + 1}" for i in range(n)], [1] * n, [True] * n, MAX_NEW)

    return provoke


def _total(m):
    from qlorakit.rewards import parse_rewards, score

    score(parse_rewards([f"{m}:big", "truncated"], [2, 1]), ["q"], ["a"], [{}], ["prompts.jsonl line 1"], [1], [True],
          MAX_NEW)


REWARDS = {
    "no reward (Python API: `reward=[]`)": _parse([]),
    "reward spec that is not a string, or empty": _parse(["exact:answer", ""]),
    "reward given twice": _parse(["exact:answer", "truncated", "exact:answer"]),
    "unknown reward name": _parse("exactt"),
    "built-in reward without its argument": _parse("numeric:"),
    "`truncated` with an argument": _parse("truncated:5"),
    "regex reward whose pattern does not compile": _parse("regex:(unclosed"),
    "`overlong:N` without a positive whole N": _parse("overlong:0"),
    "function spec without a function name": _parse("my_rewards:"),
    "function spec that names neither a module nor a file": _parse("my module:fn"),
    "reward module that cannot be imported": _parse("nowhere_qlk:fn"),
    "reward module named like a built-in, miscased": _parse("Exact:answer"),
    "reward file that does not exist": _parse("missing/rewards.py:fn"),
    "reward file that is a directory": _parse("folder.py:fn"),
    "reward file that fails to run": _parse("broken.py:fn"),
    "reward file or module that calls `sys.exit` when loaded (a module: `importing module 'NAME' called ...`)":
        _parse("exits.py:fn"),
    "reward function the module does not define": _parse(["my_rewards:lenght"]),
    "reward that is not a function": _parse(["my_rewards:THRESHOLD"]),
    "reward function that does not take (prompts, completions, rows)": _parse(["my_rewards:two"]),
    "weights that are not numbers": _parse(["exact:a", "truncated"], "1,x"),
    "weights of another type (Python API)": _parse(["exact:a", "truncated"], {"a": 1}),
    "weight that is not a number (Python API)": _parse(["exact:a", "truncated"], [True, 1]),
    "weights not one per reward": _parse(["exact:a", "truncated"], "1"),
    "weight that is not finite": _parse(["exact:a", "truncated"], "1,nan"),
    "every weight 0": _parse(["exact:a", "truncated"], "0,0"),
    "row without the field a reward reads": _check_rows("exact:answer", {"solution": "1"}),
    "field a reward reads that is null": _check_rows("exact:answer", {"answer": None}),
    "`exact` field holding a list or an object": _check_rows("exact:answer", {"answer": ["1"]}),
    "`numeric` field without a number": _check_rows("numeric:answer", {"answer": "about ten"}),
    "reward function that raises": _score("picky"),
    "reward function that calls `sys.exit`": _score("exits"),
    "reward function that raises on the whole batch only": _score("batch_only", ("a", "b")),
    "reward function returning one number for all": _score("one"),
    "reward function returning too few values": _score("short"),
    "reward function returning NaN, None, a bool, a string": _score("nan", ("a", "b")),
    "reward function returning a number past float32 (1e39, an int of 400 digits)": _score("huge", ("a",)),
    "weighted total of a completion's rewards past float32": _total,
}


# ---------------------------------------------------------------------------------------------- GRPO settings


def _config(**settings):
    return lambda: GRPOConfig.build(None, **({"data": "prompts.jsonl"} | settings))


def _yaml(text):
    def provoke(tmp_path):
        (tmp_path / "grpo.yaml").write_text(text)
        return GRPOConfig.build("grpo.yaml")

    return provoke


def _no_reward():
    from qlorakit.grpo import GRPOObjective

    GRPOObjective.of(GRPOConfig.build(None, data="prompts.jsonl"))


GRPO_SETTINGS = {
    "no reward (`qlorakit grpo` without `--reward`)": _no_reward,
    "`reward` that is not a list of specs": _config(reward=[]),
    "a data format other than auto or prompt": _config(format="chat"),
    "`on_long=truncate`": _config(on_long="truncate"),
    "an unknown GRPO loss": _config(loss="sigmoid"),
    "`group_size` below 2": _config(group_size=1),
    "`max_new_tokens` below 1": _config(max_new_tokens=0),
    "`max_new_tokens` not below `max_length`": _config(max_new_tokens=1024),
    "`temperature` 0 or not finite": _config(temperature=0.0),
    "`top_p` out of (0, 1]": _config(top_p=1.5),
    "`top_k` below 0": _config(top_k=-1),
    "`beta` negative": _config(beta=-0.1),
    "`epsilon` out of (0, 1)": _config(epsilon=1.0),
    "`epsilon_high` not positive": _config(epsilon_high=0.0),
    "`train_on`, `streaming` or `fsdp` in a grpo config file (the flags do not exist for grpo)": _yaml(
        "data: prompts.jsonl\ntrain_on: all\n"),
}


CASES = [(SECTIONS[0], case, provoke) for case, provoke in PROMPT_DATA.items()] + \
        [(SECTIONS[1], case, provoke) for case, provoke in REWARDS.items()] + \
        [(SECTIONS[2], case, provoke) for case, provoke in GRPO_SETTINGS.items()]


def _provoke(provoke, tmp_path, request):
    import inspect

    names = list(inspect.signature(provoke).parameters)
    if names == ["m"]:
        return provoke(request.getfixturevalue("module"))
    return provoke(tmp_path) if names else provoke()


@pytest.mark.parametrize("title,case,provoke", CASES, ids=[c[1] for c in CASES])
def test_the_documented_message_is_the_one_raised(tmp_path, monkeypatch, request, title, case, provoke):
    monkeypatch.chdir(tmp_path)
    rows = _documented(title)
    assert case in rows, f"{title}: no row for {case!r}"
    error, message = rows[case]
    with pytest.raises(QLoraKitError) as caught:
        _provoke(provoke, tmp_path, request)
    actual = str(caught.value)
    if "my_rewards_" in actual:  # the module's per-test name, documented as my_rewards
        actual = re.sub(r"my_rewards_[0-9a-f]{8}", "my_rewards", actual)
    assert type(caught.value).__name__ == error, (case, type(caught.value).__name__)
    assert _matches(message, actual), f"{case}\n  documented: {message}\n  raised:     {actual}"


@pytest.mark.parametrize("title,cases", [(SECTIONS[0], PROMPT_DATA), (SECTIONS[1], REWARDS),
                                         (SECTIONS[2], GRPO_SETTINGS)])
def test_every_documented_row_is_checked(title, cases):
    assert set(_documented(title)) == set(cases)
