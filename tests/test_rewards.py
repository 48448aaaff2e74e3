"""GRPO's rewards (qlorakit.rewards): the built-ins on hand-made completions, weights and totals, every spec error
before the model loads, user functions from a module and from a file, their failures traced to the failing row,
and the same rewards as TRL reward functions. No model: everything here is exact (values compared with ==)."""

from __future__ import annotations

import decimal
import re
import sys
import uuid

import numpy as np
import pytest
import torch

from qlorakit.errors import ConfigError, DataError
from qlorakit.precision import LOSS_DTYPE
from qlorakit.rewards import (FLOAT32_MAX, WHERE_COLUMN, RewardError, as_trl, check_rows, completion_text,
                              parse_answer, parse_rewards, score)

MAX_NEW = 10


@pytest.fixture(autouse=True)
def _sys_path(monkeypatch):
    """Loading a user function puts its directory on sys.path for good (as `python -m` does); here, for the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def _score(specs, completions, rows=None, weights=None, tokens=None, finished=None, prompts=None, max_new=MAX_NEW):
    rewards = parse_rewards(specs, weights)
    n = len(completions)
    rows = rows if rows is not None else [{} for _ in range(n)]
    wheres = [f"prompts.jsonl line {i + 1}" for i in range(n)]
    return score(rewards, prompts or [f"q{i}" for i in range(n)], completions, rows, wheres,
                 tokens or [3] * n, finished or [True] * n, max_new)


# ---------------------------------------------------------------------------------------------- built-ins


def test_exact_compares_stripped_text_with_the_field_as_text():
    completions = ["Paris", "  Paris\n", "paris", "Paris.", "42", "42.0"]
    rows = [{"answer": "Paris"}, {"answer": " Paris "}, {"answer": "Paris"}, {"answer": "Paris"}, {"answer": 42},
            {"answer": 42}]
    values, totals = _score("exact:answer", completions, rows)
    assert values == {"exact:answer": [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]} and totals == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_regex_must_match_the_whole_stripped_completion_across_lines():
    spec = r"regex:<think>.*</think>\s*Answer: \d+"
    completions = ["<think>a\nb</think>\nAnswer: 12\n", "<think>a</think> Answer: 12 extra", "Answer: 12",
                   "  <think></think>Answer: 7  "]
    values, _ = _score(spec, completions)
    assert values[spec] == [1.0, 0.0, 0.0, 1.0]  # DOTALL: '.' spans the newline; fullmatch: no trailing text


@pytest.mark.parametrize("text, expected", [
    ("42", 42.0), ("The answer is 42.", 42.0), ("-7", -7.0), ("x = -7", -7.0), ("x-7", 7.0), ("10 - 5", 5.0),
    ("$1,234.50", 1234.5), ("-$5", -5.0), ("1,000,000", 1e6), ("1,2,3", 3.0), ("3/4", 0.75), ("-3/4", -0.75),
    (".5", 0.5), ("3.14.", 3.14), ("1.5e3", 1500.0), ("\u22124", -4.0), ("2023-2024", 2024.0),
    ("2 + 3 = 5\n#### 1,000 apples, not 7", 1000.0), (r"so \boxed{\frac{3}{4}}, not 9", 0.75),
    (r"\boxed{-12} after 3 tries", -12.0), (r"\boxed{x}", None), ("no number", None), ("1/0", None), ("", None),
])
def test_parse_answer_reads_the_answer_number(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("So the total is 1,234.", "1234", 1.0),
    ("$1,234.00", 1234, 1.0),
    ("It is 0.75", "3/4", 1.0),
    ("3/4", 0.75, 1.0),
    ("We get 72 in the end", "Natalia sold 48/2 = 24 clips... 48+24 = 72\n#### 72", 1.0),  # a GSM8K solution
    ("#### 72", "72", 1.0),
    ("I think 71", "72", 0.0),
    ("72 at first, then 73", "72", 0.0),  # the last number counts
    ("no idea", "72", 0.0),
    ("-5", "5", 0.0),
    ("1000000.5", "1000000", 1.0),  # relative tolerance 1e-6: 5e-7 apart
    ("1000002", "1000000", 0.0),  # 2e-6 apart
    ("0.0000000001", "0", 1.0),  # absolute tolerance 1e-9 near 0
    ("0.00001", "0", 0.0),
    (r"\boxed{42}. Check: 6*7=42, 3 cases", 42, 1.0),
])
def test_numeric_compares_the_last_number_with_the_field(completion, answer, expected):
    values, _ = _score("numeric:answer", [completion], [{"answer": answer}])
    assert values["numeric:answer"] == [expected]


def test_overlong_is_a_linear_ramp_to_minus_one_at_max_new_tokens():
    # max_new_tokens 10, N 4: no penalty up to 6 tokens, then -1/4 per token to -1.0 at 10.
    tokens = list(range(0, 12))
    values, _ = _score("overlong:4", ["x"] * len(tokens), tokens=tokens)
    assert values["overlong:4"] == [0.0] * 7 + [-0.25, -0.5, -0.75, -1.0, -1.0]


def test_truncated_is_minus_one_for_a_completion_that_did_not_end():
    values, _ = _score("truncated", ["a", "b", "c"], tokens=[10, 4, 10], finished=[False, True, True])
    assert values["truncated"] == [-1.0, 0.0, 0.0]


def test_weighted_totals():
    values, totals = _score(["exact:answer", "truncated", "overlong:4"], ["yes", "yes", "no"],
                            [{"answer": "yes"}] * 3, weights="2,0.5,1", tokens=[3, 10, 8],
                            finished=[True, False, True])
    assert values == {"exact:answer": [1.0, 1.0, 0.0], "truncated": [0.0, -1.0, 0.0],
                      "overlong:4": [0.0, -1.0, -0.5]}
    assert totals == [2.0, 2.0 - 0.5 - 1.0, -0.5]
    assert [r.weight for r in parse_rewards(["exact:a", "truncated"], [1, -0.25])] == [1.0, -0.25]
    assert [r.weight for r in parse_rewards("truncated")] == [1.0]


# ---------------------------------------------------------------------------------------------- spec errors


@pytest.mark.parametrize("specs, message", [
    ([], r"at least one reward"),
    ("exactt", r"'exactt'.*did you mean exact:FIELD"),
    ("Exact:answer", r"'Exact:answer'.*cannot import module 'Exact'.*did you mean the built-in exact:FIELD"),
    ("exact", r"'exact'.*exact needs its argument, exact:FIELD"),
    ("numeric:", r"'numeric:'.*numeric:FIELD"),
    ("regex:(unclosed", r"'regex:\(unclosed'.*not a valid regular expression \(missing \), unterminated"),
    ("overlong:0", r"'overlong:0'.*positive whole number"),
    ("overlong:-3", r"'overlong:-3'.*positive whole number"),
    ("overlong:1.5", r"'overlong:1.5'.*positive whole number"),
    ("overlong:abc", r"'overlong:abc'.*positive whole number"),
    ("truncated:5", r"'truncated:5'.*takes no argument"),
    (["exact:answer", "truncated", "exact:answer"], r"'exact:answer' is given twice"),
    (["exact:a", ""], r"reward '': a reward is named by a non-empty string"),
    ("mod:", r"'mod:': not a reward"),
    ("my module:fn", r"'my module:fn'.*neither a module name nor a .py file"),
    ("missing_dir/rewards.py:fn", r"'missing_dir/rewards.py:fn': missing_dir/rewards.py is no such file"),
])
def test_a_bad_spec_is_a_config_error_naming_it(specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_rewards(specs)


@pytest.mark.parametrize("weights, message", [
    ("1", r"1 weight\(s\) for 2 reward\(s\) \(exact:a, truncated\)"),
    ([1, 2, 3], r"3 weight\(s\) for 2 reward\(s\)"),
    ("1,x", r"'x' is not a number"),
    ([1, float("nan")], r"the weight of truncated is nan"),
    ("inf,1", r"the weight of exact:a is inf"),
    ([0, 0.0], r"every weight is 0"),
    ([True, 1], r"True is not a number"),
])
def test_bad_weights_are_config_errors(weights, message):
    with pytest.raises(ConfigError, match=message):
        parse_rewards(["exact:a", "truncated"], weights)


# ---------------------------------------------------------------------------------------------- user functions


@pytest.fixture
def module_name():
    """A fresh module name per test (imports are cached by name), forgotten afterwards."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    yield name
    sys.modules.pop(name, None)


FUNCTIONS = '''
import math
def length(prompts, completions, rows):
    return [float(len(c)) for c in completions]
def shout(prompts, completions, rows):
    for row in rows:
        row["answer"] = "CHANGED"
        row.setdefault("extra", []).append(1)
    for p in prompts:
        if isinstance(p, list):
            p.append({"role": "user", "content": "CHANGED"})
    return [1.0 if c.isupper() else 0.0 for c in completions]
def picky(prompts, completions, rows):
    return [1.0 / (len(c) - 3) for c in completions]  # fails on a 3-character completion
def returns(prompts, completions, rows):
    return [rows[i]["value"] for i in range(len(completions))]
def whole(prompts, completions, rows):
    return rows[0]["value"]
def two(a, b):
    return []
THRESHOLD = 3
'''


def test_a_module_function_is_imported_from_the_current_directory(tmp_path, monkeypatch, module_name):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    rewards = parse_rewards([f"{module_name}:length", "truncated"], [0.5, 1])
    assert sys.path[0] == str(tmp_path)  # the current directory first, as `python -m` puts it
    values, totals = score(rewards, ["q", "q"], ["ab", "abcd"], [{}, {}], ["a line 1", "a line 2"], [2, 10],
                           [True, False], MAX_NEW)
    assert values == {f"{module_name}:length": [2.0, 4.0], "truncated": [0.0, -1.0]} and totals == [1.0, 1.0]


def test_module_errors_name_the_module_and_what_to_do(tmp_path, monkeypatch, module_name):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    (tmp_path / "broken_rewards_x1.py").write_text("import no_such_package_qlk\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"'nowhere_qlk:fn': cannot import module 'nowhere_qlk' "
                                          rf"\(ModuleNotFoundError: .*No module named 'nowhere_qlk'.*\); the current "
                                          rf"directory is .*nowhere_qlk\.py, or name the file"):
        parse_rewards("nowhere_qlk:fn")
    with pytest.raises(ConfigError, match=r"cannot import module 'broken_rewards_x1' \(ModuleNotFoundError: .*"
                                          r"no_such_package_qlk"):
        parse_rewards("broken_rewards_x1:fn")
    sys.modules.pop("broken_rewards_x1", None)
    with pytest.raises(ConfigError, match=rf"'{module_name}:lenght': {module_name} has no 'lenght' "
                                          r"\(close names: length"):
        parse_rewards(f"{module_name}:lenght")
    with pytest.raises(ConfigError, match=rf"{module_name}:THRESHOLD is int 3, not a function"):
        parse_rewards(f"{module_name}:THRESHOLD")
    with pytest.raises(ConfigError, match=r"two cannot be called as fn\(prompts, completions, rows\)"):
        parse_rewards(f"{module_name}:two")


def test_a_file_function_and_a_module_named_like_a_built_in(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "helper_qlk_h1.py").write_text("BONUS = 0.25\n")
    (tmp_path / "sub" / "exact.py").write_text(
        "from helper_qlk_h1 import BONUS\n"  # the file's neighbours are importable while it loads
        "def fn(prompts, completions, rows):\n"
        "    return [BONUS + (c == r['answer']) for c, r in zip(completions, rows)]\n")
    monkeypatch.chdir(tmp_path)
    rewards = parse_rewards(["./sub/exact.py:fn", "exact:answer"])
    assert sys.path[0] == str(tmp_path / "sub")
    values, totals = score(rewards, ["q", "q"], ["7", "8"], [{"answer": "7"}] * 2, ["l1", "l2"], [1, 1],
                           [True, True], MAX_NEW)
    assert values == {"./sub/exact.py:fn": [1.25, 0.25], "exact:answer": [1.0, 0.0]} and totals == [2.25, 0.25]
    sys.modules.pop("helper_qlk_h1", None)
    (tmp_path / "bad.py").write_text("def fn(:\n")
    with pytest.raises(ConfigError, match=r"'bad.py:fn': running bad.py failed \(SyntaxError: "):
        parse_rewards("bad.py:fn")


def test_a_function_imports_its_own_modules_when_called(tmp_path, monkeypatch, module_name):
    """A reward function that imports a helper beside it inside its body (while training, long after it was
    loaded) finds it: the directory stays on sys.path, once however often it is loaded."""
    helper = f"helper_{module_name}"
    (tmp_path / "sub").mkdir()
    for directory in (tmp_path, tmp_path / "sub"):
        (directory / f"{helper}.py").write_text(f"BONUS = {0.5 if directory == tmp_path else 0.25}\n")
    lazy = ("def fn(prompts, completions, rows):\n"
            f"    from {helper} import BONUS\n"
            "    return [BONUS] * len(completions)\n")
    (tmp_path / f"{module_name}.py").write_text(lazy)
    (tmp_path / "sub" / "lazy_file.py").write_text(lazy)
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    rewards = parse_rewards([f"{module_name}:fn"])
    parse_rewards([f"{module_name}:fn", "exact:a"])
    assert sys.path == [str(tmp_path)] + before
    monkeypatch.chdir(tmp_path / "sub")  # (training does not change directory; the entry holds even so)
    assert rewards[0](["q"], ["a"], [{}], ["l1"], [1], [True], MAX_NEW) == [0.5]
    sys.modules.pop(helper)
    file_rewards = parse_rewards(["lazy_file.py:fn"])
    assert sys.path == [str(tmp_path / "sub"), str(tmp_path)] + before
    assert file_rewards[0](["q"], ["a"], [{}], ["l1"], [1], [True], MAX_NEW) == [0.25]  # its neighbour, first
    sys.modules.pop(helper)


EXITS = """
import sys
def fn(prompts, completions, rows):
    if any("stop" in c for c in completions):
        sys.exit(0)
    return [1.0] * len(completions)
def interrupted(prompts, completions, rows):
    raise KeyboardInterrupt
"""


@pytest.mark.parametrize("form", ["module", "file"])
def test_a_reward_module_that_exits_at_import_is_a_config_error(tmp_path, monkeypatch, module_name, form):
    """sys.exit(0) at import used to end qlorakit quietly with exit code 0: SystemExit is no Exception."""
    (tmp_path / f"{module_name}.py").write_text("import sys\nsys.exit(0)\ndef fn(p, c, r):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    spec, what = ((f"{module_name}:fn", f"importing module '{module_name}'") if form == "module" else
                  (f"./{module_name}.py:fn", f"running ./{module_name}.py"))
    with pytest.raises(ConfigError, match=rf"^reward '{spec}': {what} called sys.exit\(0\); a reward "
                                          rf"{form} is imported, not run: put its script part under "
                                          r"`if __name__ == \"__main__\":`$") as caught:
        parse_rewards(spec)
    assert isinstance(caught.value.__cause__, SystemExit)
    assert not any(name.endswith(module_name) for name in sys.modules)  # nothing half-imported stays


def test_a_reward_function_that_exits_is_an_error_naming_the_row(tmp_path, monkeypatch, module_name):
    (tmp_path / f"{module_name}.py").write_text(EXITS)
    monkeypatch.chdir(tmp_path)
    fn, interrupted = parse_rewards([f"{module_name}:fn", f"{module_name}:interrupted"])
    with pytest.raises(RewardError, match=rf"^reward {module_name}:fn called sys.exit\(0\) on l2 \(completion "
                                          r"'a stop'\); fix the function, or make it return 0.0 for completions it "
                                          r"cannot score$") as caught:
        fn(["q"] * 3, ["fine", "a stop", "stop"], [{}] * 3, ["l1", "l2", "l3"], [1] * 3, [True] * 3, MAX_NEW)
    assert isinstance(caught.value.__cause__, SystemExit)
    fn.fn = lambda p, c, r: [0.0] if len(c) == 1 else sys.exit("batch")
    with pytest.raises(RewardError, match=rf"^reward {module_name}:fn called sys.exit\('batch'\) on the 2 "
                                          r"completions of l1 \.\. l2, though on none of them alone"):
        fn(["q"] * 2, ["a", "b"], [{}] * 2, ["l1", "l2"], [1] * 2, [True] * 2, MAX_NEW)
    with pytest.raises(KeyboardInterrupt):  # an interrupt stays one
        interrupted(["q"], ["a"], [{}], ["l1"], [1], [True], MAX_NEW)


def test_the_float32_limit_is_loss_dtypes():
    assert FLOAT32_MAX == torch.finfo(LOSS_DTYPE).max


@pytest.mark.parametrize("value, shown", [
    (1e39, "1e+39"), (-3.5e38, "-3.5e+38"), (10 ** 400, "1e+400"), (-(10 ** 5000), "-1e+5000"),
    (decimal.Decimal("1e400"), "1e+400"), (np.float64(2e300), "2e+300"), (torch.tensor(1e300, dtype=torch.float64),
                                                                          "1e+300"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)  # (10**5000 has more digits than str() writes)
def test_a_value_too_large_for_float32_is_an_error_naming_the_row(tmp_path, monkeypatch, module_name, value, shown):
    """1e39 is finite, but infinite in the float32 tensor GRPO puts rewards in; an int past float range is too
    large, not "not an int"."""
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    reward = parse_rewards(f"{module_name}:returns")[0]
    with pytest.raises(RewardError, match=rf"^reward {module_name}:returns returned {re.escape(shown)} for line 2 "
                                          r"\(completion 'b'\), which is too large: GRPO's rewards are float32, at "
                                          r"most 3\.403e\+38 in magnitude; scale the reward down$"):
        reward(["q"] * 2, ["a", "b"], [{"value": 1.0}, {"value": value}], ["line 1", "line 2"], [1] * 2, [True] * 2,
               MAX_NEW)
    reward.fn = lambda p, c, r: [FLOAT32_MAX, -FLOAT32_MAX]  # the limit itself is fine
    assert reward(["q"] * 2, ["a", "b"], [{}] * 2, ["l1", "l2"], [1] * 2, [True] * 2, MAX_NEW) == [FLOAT32_MAX,
                                                                                                 -FLOAT32_MAX]


def test_a_weighted_total_too_large_for_float32_is_an_error_naming_the_row(tmp_path, monkeypatch, module_name):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    rewards = parse_rewards([f"{module_name}:returns", "truncated"], [2, 1])
    rows = [{"value": 1.0}, {"value": 3e38}]
    with pytest.raises(RewardError, match=rf"^the weighted total of the rewards is 6e\+38 for line 2 \(completion "
                                          rf"'b'\): 2 \* 3e\+38 \({module_name}:returns\) \+ 1 \* 0 \(truncated\); "
                                          r"GRPO's rewards are float32, at most 3\.403e\+38 in magnitude; scale the "
                                          r"rewards or their weights down$"):
        score(rewards, ["q"] * 2, ["a", "b"], rows, ["line 1", "line 2"], [1] * 2, [True] * 2, MAX_NEW)
    rewards[0].weight = 1.0  # 3e38 alone is within float32
    assert score(rewards, ["q"] * 2, ["a", "b"], rows, ["line 1", "line 2"], [1] * 2, [True] * 2, MAX_NEW)[1] == [
        1.0, 3e38]


def test_a_raising_function_names_the_failing_row_not_the_first(tmp_path, monkeypatch, module_name):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    rewards = parse_rewards(f"{module_name}:picky")
    completions = ["abcdef", "abcde", "abc", "ab"]
    wheres = ["prompts.jsonl line 1", "prompts.jsonl line 2", "prompts.jsonl line 3", "prompts.jsonl line 4"]
    with pytest.raises(RewardError, match=rf"reward {module_name}:picky raised ZeroDivisionError: 'float division by "
                                          r"zero' on prompts.jsonl line 3 \(completion 'abc'\)") as caught:
        score(rewards, ["q"] * 4, completions, [{}] * 4, wheres, [1] * 4, [True] * 4, MAX_NEW)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    reward = rewards[0]
    reward.fn = lambda p, c, r: [1.0 if "bad" not in x else int(x) for x in c]
    long = "bad" + "y" * 200  # shown as its first 60 characters
    with pytest.raises(RewardError, match=r"raised ValueError: .* on w2 \(completion 'badyyy+'\.\.\.\)") as caught:
        reward(["q", "q"], ["fine", long], [{}, {}], ["w1", "w2"], [1, 1], [True, True], MAX_NEW)
    assert f"'bad{'y' * 57}'..." in str(caught.value)
    reward.fn = lambda p, c, r: [0.0] if len(c) == 1 else 1 / 0  # fails on the batch only
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError: 'division by zero' on the 2 completions of "
                                          r"w1 \.\. w2, though on none of them alone"):
        reward(["q", "q"], ["a", "b"], [{}, {}], ["w1", "w2"], [1, 1], [True, True], MAX_NEW)


@pytest.mark.parametrize("value, message", [
    (float("nan"), r"returned nan \(float\) for line 2 \(completion 'b'\)"),
    (float("inf"), r"returned inf \(float\) for line 2"),
    (None, r"returned None \(NoneType\) for line 2"),
    ("1.0", r"returned '1.0' \(str\) for line 2"),
    (True, r"returned True \(bool\) for line 2.*float\(ok\)"),
    (np.float32("nan"), r"returned .*nan.* for line 2"),
    (torch.tensor([1.0]), r"returned tensor\(\[1\.\]\) \(Tensor\) for line 2"),  # a 1-d tensor as one value
    (decimal.Decimal("NaN"), r"returned Decimal\('NaN'\) \(Decimal\) for line 2.*finite number: an int, a float, "
                             r"a Decimal"),
])
def test_a_value_that_is_not_a_finite_number_is_an_error_naming_the_row(tmp_path, monkeypatch, module_name, value,
                                                                         message):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    reward = parse_rewards(f"{module_name}:returns")[0]
    with pytest.raises(RewardError, match=rf"reward {module_name}:returns {message}"):
        reward(["q"] * 3, ["a", "b", "c"], [{"value": 1.0}, {"value": value}, {"value": 0}], ["line 1", "line 2",
               "line 3"], [1] * 3, [True] * 3, MAX_NEW)


@pytest.mark.parametrize("result, message", [
    ([1.0, 2.0], r"returned 2 values for 3 completions \(line 1 \.\. line 3\)"),
    (np.zeros(4), r"returned 4 values for 3 completions"),
    (1.0, r"returned float 1\.0 for the 3 completions of line 1 \.\. line 3"),
    (torch.zeros(3, 1), r"returned Tensor (.|\n)* for the 3 completions"),
    ((x for x in range(3)), r"returned generator"),
])
def test_a_result_that_is_not_one_number_per_completion_is_an_error(tmp_path, monkeypatch, module_name, result,
                                                                      message):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    reward = parse_rewards(f"{module_name}:length")[0]
    reward.fn = lambda prompts, completions, rows: result
    with pytest.raises(RewardError, match=rf"reward {module_name}:length {message}"):
        reward(["q"] * 3, ["a", "b", "c"], [{}] * 3, ["line 1", "line 2", "line 3"], [1] * 3, [True] * 3, MAX_NEW)


@pytest.mark.parametrize("result", [
    [1, 0.5, -2], (1, 0.5, -2), np.array([1, 0.5, -2]), torch.tensor([1, 0.5, -2]),
    [np.int64(1), np.float32(0.5), torch.tensor(-2.0)], [np.array(1), np.float64(0.5), torch.tensor(-2)],
    [decimal.Decimal(1), decimal.Decimal("0.5"), decimal.Decimal("-2.000")],  # a Decimal used to be "not finite"
])
def test_numbers_in_every_usual_container_are_accepted(tmp_path, monkeypatch, module_name, result):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    reward = parse_rewards(f"{module_name}:whole")[0]
    values = reward(["q"] * 3, ["a", "b", "c"], [{"value": result}] * 3, ["l1", "l2", "l3"], [1] * 3, [True] * 3,
                    MAX_NEW)
    assert values == [1.0, 0.5, -2.0] and all(type(v) is float for v in values)


def test_a_function_that_changes_its_rows_and_prompts_changes_nothing(tmp_path, monkeypatch, module_name):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    rewards = parse_rewards([f"{module_name}:shout", "exact:answer"])
    prompts = [[{"role": "user", "content": "hi"}], "plain"]
    rows = [{"answer": "YES", "tags": ["a"]}, {"answer": "no"}]
    values, _ = score(rewards, prompts, ["YES", "no"], rows, ["l1", "l2"], [1, 1], [True, True], MAX_NEW)
    assert rows == [{"answer": "YES", "tags": ["a"]}, {"answer": "no"}]
    assert prompts == [[{"role": "user", "content": "hi"}], "plain"]
    assert values == {f"{module_name}:shout": [1.0, 0.0], "exact:answer": [1.0, 1.0]}  # exact saw the real rows


# ---------------------------------------------------------------------------------------------- rows


def test_check_rows_names_the_line_the_field_and_what_to_do():
    rewards = parse_rewards(["regex:.*", "exact:answer", "numeric:total"])
    good = {"answer": "a", "total": "#### 1,000", "x": 1}
    check_rows(rewards, [good, good | {"total": 3}], ["p.jsonl line 1", "p.jsonl line 2"])
    wheres = ["p.jsonl line 1", "p.jsonl line 2", "p.jsonl line 3"]
    with pytest.raises(DataError, match=r"^p.jsonl line 3: no field 'answer' for the reward exact:answer \(fields "
                                        r"present: 'solution', 'total'\); add it to every row, or name the column "
                                        r"that holds it \(exact:COLUMN\)$"):
        check_rows(rewards, [good, good, {"solution": "a", "total": 1}], wheres)
    with pytest.raises(DataError, match=r"^p.jsonl line 2: field 'answer' is empty"):
        check_rows(rewards, [good, good | {"answer": None}, good], wheres)
    with pytest.raises(DataError, match=r"^p.jsonl line 2: field 'answer' holds a list"):
        check_rows(rewards, [good, good | {"answer": ["a"]}, good], wheres)
    with pytest.raises(DataError, match=r"^p.jsonl line 3: field 'total' holds 'about ten', in which numeric:total "
                                        r"finds no number.*\(numeric:COLUMN\)$"):
        check_rows(rewards, [good, good, good | {"total": "about ten"}], wheres)
    with pytest.raises(DataError, match=r"^p.jsonl line 1: field 'total' holds True"):
        check_rows(rewards, [good | {"total": True}], wheres[:1])
    with pytest.raises(DataError, match=r"^l9: no field 'answer'"):  # scoring a row check_rows never saw
        score(rewards, ["q"], ["a"], [{"total": 1}], ["l9"], [1], [True], MAX_NEW)


# ---------------------------------------------------------------------------------------------- as TRL functions


def test_as_trl_gives_the_values_score_gives(tmp_path, monkeypatch, module_name):
    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    specs = ["numeric:answer", "exact:answer", "overlong:2", "truncated", f"{module_name}:length"]
    rewards = parse_rewards(specs)
    prompts = ["q1", "q1", "q2", "q2"]
    texts = ["it is 4", "4", "8", "seven!"]
    ids = [[5, 2], [5, 6, 2], [5, 6, 7, 8], [5, 6, 7, 8]]  # TRL keeps the ids up to and including the first EOS (2)
    rows = [{"answer": "4"}, {"answer": "4"}, {"answer": "7"}, {"answer": "7"}]
    wheres = ["p line 1", "p line 1", "p line 2", "p line 2"]
    expected, _ = score(rewards, prompts, texts, rows, wheres, [2, 3, 4, 4], [True, True, False, False], 4)
    assert expected == {"numeric:answer": [1.0, 1.0, 0.0, 0.0], "exact:answer": [0.0, 1.0, 0.0, 0.0],
                        "overlong:2": [0.0, -0.5, -1.0, -1.0], "truncated": [0.0, 0.0, -1.0, -1.0],
                        f"{module_name}:length": [7.0, 1.0, 1.0, 6.0]}
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    extras = dict(trainer_state=object(), log_extra=lambda *a: None, log_metric=lambda *a: None)
    for eos in ([2, 0], None):  # TRL's rule (the last id an EOS or pad), or: shorter than max_new_tokens
        functions = as_trl(rewards, 4, eos_token_ids=eos)
        assert [f.__name__ for f in functions] == specs
        for completions, ps in ((texts, prompts), (conversational, chat_prompts)):
            got = {f.__name__: f(prompts=ps, completions=completions, completion_ids=ids, answer=["4", "4", "7", "7"],
                                 **{WHERE_COLUMN: wheres}, **extras) for f in functions}
            assert got == expected
    # A completion of max_new_tokens ending in EOS: finished by TRL's rule; without the EOS ids, by length, not.
    full = dict(prompts=["q"], completions=["x"], completion_ids=[[5, 6, 7, 2]])
    assert as_trl(rewards, 4, [2])[3](**full) == [0.0] and as_trl(rewards, 4)[3](**full) == [-1.0]
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]) == "ab"


def test_as_trl_functions_called_by_trls_own_reward_code(tmp_path, monkeypatch, module_name):
    """GRPOTrainer._calculate_rewards (TRL's code, not a copy of it) on a stand-in trainer: the calling convention
    and the names TRL logs are those as_trl expects."""
    trl = pytest.importorskip("trl")
    from types import SimpleNamespace

    (tmp_path / f"{module_name}.py").write_text(FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    rewards = parse_rewards(["numeric:answer", "overlong:2", "truncated", f"{module_name}:shout"])
    functions = as_trl(rewards, 4, eos_token_ids=[2, 0])
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=SimpleNamespace(report_to=[]), state=SimpleNamespace(global_step=0), reward_funcs=functions,
        reward_processing_classes=[None] * len(functions), reward_func_names=[f.__name__ for f in functions],
        environments=None, _log_completion_extra=lambda *a, **k: None, _log_metric=lambda *a, **k: None)
    inputs = [{"prompt": "q1", "answer": "4", WHERE_COLUMN: "p line 1"},
              {"prompt": "q2", "answer": "#### 7", WHERE_COLUMN: "p line 2"}]
    got = trl.GRPOTrainer._calculate_rewards(trainer, inputs, ["q1", "q2"], ["it is 4", "EIGHT"],
                                             [[5, 6, 2], [5, 6, 7, 8]])
    assert trainer.reward_func_names == ["numeric:answer", "overlong:2", "truncated", f"{module_name}:shout"]
    assert got.tolist() == [[1.0, -0.5, 0.0, 0.0], [0.0, -1.0, -1.0, 1.0]]
    assert inputs[1] == {"prompt": "q2", "answer": "#### 7", WHERE_COLUMN: "p line 2"}  # shout changed copies
    with pytest.raises(RewardError, match=r"returned 'x' \(str\) for p line 2 \(completion 'EIGHT'\)"):
        bad = as_trl(parse_rewards(f"{module_name}:returns"), 4)
        bad[0](prompts=["q1", "q2"], completions=["a", "EIGHT"], completion_ids=[[1], [1]], value=[1, "x"],
               **{WHERE_COLUMN: ["p line 1", "p line 2"]}, trainer_state=None)
