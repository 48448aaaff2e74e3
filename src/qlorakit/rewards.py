"""GRPO's rewards: what a completion is worth. A reward is named by a SPEC string (`--reward SPEC`, repeatable, or
`reward=[...]` in Python), which is also its metric's name (reward/<spec>):

    exact:FIELD      1.0 when the completion, stripped, is str(row[FIELD]) stripped, else 0.0
    regex:PATTERN    1.0 when PATTERN matches the whole stripped completion (re.fullmatch, re.DOTALL), else 0.0
    numeric:FIELD    1.0 when the completion's answer equals row[FIELD] as a number (relative tolerance 1e-6,
                     absolute 1e-9 near 0), else 0.0. The answer is the number in the last \\boxed{...}, else the
                     first number after the last '####', else the last number in the text; "1,234", "$5", "-3.5",
                     "42.", "3/4", "\\frac{3}{4}" and "1e-3" all read as numbers. A string field is read the same way
                     (a GSM8K solution ending "#### 72" gives 72). No number: 0.0.
    overlong:N       DAPO's soft overlong penalty: 0.0 up to max_new_tokens - N completion tokens, then falling
                     linearly to -1.0 at max_new_tokens
    truncated        -1.0 when the completion stopped at max_new_tokens without ending, else 0.0
    module:function  a function of yours, fn(prompts, completions, rows) -> one number per completion: parallel
                     lists of the prompts as the rows give them (a string or a list of messages), the completions
                     (strings) and the rows' other fields (dicts, copies: changing them changes nothing). The current
                     directory is put first on sys.path and stays there, as `python -m` does: the module, and what
                     it imports then or later (inside the function, while training), is found there.
    path/to/file.py:function   the same, from a file; its directory stays on sys.path the same way.

The built-in names are reserved: `exact:fn` is the exact reward of the field fn. A module of yours named like a
built-in (exact.py) is reached by its file: `./exact.py:fn`.

Rewards are weighted (`--reward-weights 1,0.5`, one per reward, 1 each by default); a completion's total reward is
sum(weight * reward). Everything that can be checked before the model loads is: the specs and the weights
(parse_rewards: user functions are imported there) and the fields the built-ins read (check_rows). A user function
that raises (or calls sys.exit), or returns something that is not one finite number per completion, stops training
with a RewardError naming the reward, the row (its file and line) and the completion. So does a value, or a
completion's weighted total, beyond FLOAT32_MAX: GRPO's rewards are float32 tensors, in which it would be infinite.

No torch here: the specs are parsed and the rows checked before the heavy libraries load; a user function's tensors
and numpy values are read through .tolist() / .item().
"""

from __future__ import annotations

import copy
import decimal
import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import zlib
from pathlib import Path

from .errors import ConfigError, DataError, TrainingError, show

BUILTINS = ("exact", "regex", "numeric", "overlong", "truncated")
_USAGE = {"exact": "exact:FIELD", "regex": "regex:PATTERN", "numeric": "numeric:FIELD", "overlong": "overlong:N",
          "truncated": "truncated"}
_KINDS = ("built-in rewards: exact:FIELD, regex:PATTERN, numeric:FIELD, overlong:N, truncated; or a function of "
          "yours: module:function or path/to/file.py:function")
# Keyword arguments TRL's GRPOTrainer adds to the dataset's columns when it calls a reward function (1.16).
_TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric", "environments")
# The dataset column as_trl's functions read the rows' `where` from ("prompts.jsonl line 3"); not a row field.
WHERE_COLUMN = "qlorakit_where"
RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 1e-6, 1e-9
# The largest float32, torch.finfo(precision.LOSS_DTYPE).max (tests/test_rewards.py checks it): GRPO puts the totals
# into LOSS_DTYPE tensors, where a larger magnitude is infinite. Written out because this module imports no torch.
FLOAT32_MAX = 3.4028234663852886e38


class RewardError(TrainingError):
    """A reward function failed on a completion, or returned something that is not one finite number per
    completion; the message names the reward, the row and the completion."""


def _clip(text, limit: int = 60) -> str:
    """A completion as a message shows it: repr of its first `limit` characters."""
    if not isinstance(text, str):
        return show(text)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _failure(error: BaseException) -> str:
    """What a user's code did, as a message says it: "raised ValueError: 'its words'" or "called sys.exit(0)"."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({show(error.code) if error.code is not None else ''})"
    return f"raised {type(error).__name__}: {show(str(error))}"


def _span(wheres) -> str:
    if not wheres:
        return "no rows"
    return wheres[0] if len(wheres) == 1 else f"{wheres[0]} .. {wheres[-1]}"


# ---------------------------------------------------------------------------------------------- the rewards


class Reward:
    """One reward. `spec` is the string it was named by (its metric's name), `weight` its factor in the total,
    `fields` the row fields it reads (check_rows checks them before the model loads)."""

    fields: tuple[str, ...] = ()

    def __init__(self, spec: str, weight: float = 1.0):
        self.spec = spec
        self.weight = float(weight)

    def __call__(self, prompts: list, completions: list[str], rows: list[dict], wheres: list[str],
                 completion_tokens: list[int], finished: list[bool], max_new_tokens: int) -> list[float]:
        raise NotImplementedError

    def check_row(self, row: dict, where: str) -> None:
        """Raises DataError when `row` cannot be scored by this reward."""

    def __repr__(self):
        return f"Reward({self.spec!r}, weight={self.weight:g})"


def _field_value(reward: Reward, field: str, row: dict, where: str):
    if not isinstance(row, dict) or field not in row:
        present = ", ".join(map(repr, sorted(row))) if isinstance(row, dict) and row else "none"
        kind = reward.spec.partition(":")[0]
        raise DataError(f"{where}: no field {field!r} for the reward {reward.spec} (fields present: {present}); add "
                        f"it to every row, or name the column that holds it ({kind}:COLUMN)")
    value = row[field]
    if value is None:
        raise DataError(f"{where}: field {field!r} is empty (a null, or an empty CSV cell), but the reward "
                        f"{reward.spec} compares completions with it; give every row a value")
    return value


class _Exact(Reward):
    def __init__(self, spec, field):
        super().__init__(spec)
        self.field = field
        self.fields = (field,)

    def check_row(self, row, where):
        value = _field_value(self, self.field, row, where)
        if isinstance(value, (dict, list)):
            raise DataError(f"{where}: field {self.field!r} holds a {type(value).__name__} ({show(value)}), but "
                            f"{self.spec} compares the completion with a text or a number; give the answer as text")

    def __call__(self, prompts, completions, rows, wheres, completion_tokens, finished, max_new_tokens):
        scores = []
        for completion, row, where in zip(completions, rows, wheres):
            self.check_row(row, where)
            scores.append(1.0 if completion.strip() == str(row[self.field]).strip() else 0.0)
        return scores


class _Regex(Reward):
    def __init__(self, spec, pattern):
        super().__init__(spec)
        self.pattern = pattern

    def __call__(self, prompts, completions, rows, wheres, completion_tokens, finished, max_new_tokens):
        return [1.0 if self.pattern.fullmatch(completion.strip()) else 0.0 for completion in completions]


class _Numeric(Reward):
    def __init__(self, spec, field):
        super().__init__(spec)
        self.field = field
        self.fields = (field,)

    def expected(self, row, where) -> float:
        value = _field_value(self, self.field, row, where)
        number = value_as_number(value)
        if number is None:
            raise DataError(f"{where}: field {self.field!r} holds {show(value)}, in which {self.spec} finds no "
                            "number; give the answer as a number (42, \"1,234.5\", \"3/4\", \"... #### 42\"), or "
                            "name the column that holds it as a number (numeric:COLUMN)")
        return number

    def check_row(self, row, where):
        self.expected(row, where)

    def __call__(self, prompts, completions, rows, wheres, completion_tokens, finished, max_new_tokens):
        scores = []
        for completion, row, where in zip(completions, rows, wheres):
            expected, answer = self.expected(row, where), parse_answer(completion)
            same = answer is not None and math.isclose(answer, expected, rel_tol=RELATIVE_TOLERANCE,
                                                       abs_tol=ABSOLUTE_TOLERANCE)
            scores.append(1.0 if same else 0.0)
        return scores


class _Overlong(Reward):
    def __init__(self, spec, margin):
        super().__init__(spec)
        self.margin = margin

    def __call__(self, prompts, completions, rows, wheres, completion_tokens, finished, max_new_tokens):
        start = max_new_tokens - self.margin  # the last length without a penalty
        return [min(0.0, max(-1.0, (start - tokens) / self.margin)) for tokens in completion_tokens]


class _Truncated(Reward):
    def __call__(self, prompts, completions, rows, wheres, completion_tokens, finished, max_new_tokens):
        return [0.0 if done else -1.0 for done in finished]


class _Function(Reward):
    """A user function: called with copies, its result checked, its failures traced to one completion."""

    def __init__(self, spec, fn):
        super().__init__(spec)
        self.fn = fn

    @staticmethod
    def _copies(prompts, completions, rows):
        # A function that edits its rows or prompts must not change the data (or what the next reward sees).
        return copy.deepcopy(list(prompts)), list(completions), copy.deepcopy(list(rows))

    def __call__(self, prompts, completions, rows, wheres, completion_tokens, finished, max_new_tokens):
        arguments = self._copies(prompts, completions, rows)
        # Anything a user function raises is reported with its row; a sys.exit too (SystemExit is no Exception: it
        # would end the run with its code, 0 for sys.exit(0), as if training had finished). An interrupt is not.
        try:
            result = self.fn(*arguments)
        except (Exception, SystemExit) as error:  # noqa: BLE001
            for i, (prompt, completion, row) in enumerate(zip(prompts, completions, rows)):
                arguments = self._copies([prompt], [completion], [row])
                try:
                    self.fn(*arguments)
                except (Exception, SystemExit) as single:  # noqa: BLE001
                    raise RewardError(
                        f"reward {self.spec} {_failure(single)} on {wheres[i]} (completion {_clip(completion)}); "
                        "fix the function, or make it return 0.0 for completions it cannot score") from single
            raise RewardError(
                f"reward {self.spec} {_failure(error)} on the {len(completions)} completions of {_span(wheres)}, "
                "though on none of them alone; fix the function") from error
        return self._values(result, completions, wheres)

    def _values(self, result, completions, wheres) -> list[float]:
        n = len(completions)
        if isinstance(result, (list, tuple)):
            items = list(result)
        elif getattr(result, "ndim", None) == 1 and hasattr(result, "tolist"):  # a 1-d tensor or array
            items = result.tolist()
        else:
            raise RewardError(f"reward {self.spec} returned {type(result).__name__} {show(result)} for the {n} "
                              f"completions of {_span(wheres)}; return one number per completion, in order: a list, "
                              "a tuple, a 1-d tensor or an array")
        if len(items) != n:
            raise RewardError(f"reward {self.spec} returned {len(items)} values for {n} completions "
                              f"({_span(wheres)}); return exactly one number per completion, in order")
        values = []
        for item, completion, where in zip(items, completions, wheres):
            value = _as_number(item)
            if value is None:
                raise RewardError(f"reward {self.spec} returned {show(item)} ({type(item).__name__}) for {where} "
                                  f"(completion {_clip(completion)}); every value must be a finite number: an int, "
                                  "a float, a Decimal, a numpy number or a 0-d tensor (for a bool, float(ok))")
            if value is _TOO_LARGE or abs(value) > FLOAT32_MAX:
                raise RewardError(f"reward {self.spec} returned {_magnitude(item)} for {where} (completion "
                                  f"{_clip(completion)}), which is too large: GRPO's rewards are float32, at most "
                                  f"{FLOAT32_MAX:.4g} in magnitude; scale the reward down")
            values.append(value)
        return values


_TOO_LARGE = object()  # _as_number's answer for a finite number past float range (an int of 400 digits)


def _as_number(item):
    """A finite float from an int, float, Decimal, numpy scalar or 0-d tensor/array; _TOO_LARGE for a finite one
    that no float holds; None for anything else (bools too: a True is more often a bug than a reward of 1)."""
    if getattr(item, "ndim", None) == 0 and hasattr(item, "item"):
        item = item.item()
    if isinstance(item, decimal.Decimal):  # not a numbers.Real, but as much a number as a float
        if not item.is_finite():
            return None
        value = float(item)
        return value if math.isfinite(value) else _TOO_LARGE  # Decimal("1e400") is finite, its float is not
    if isinstance(item, bool) or not isinstance(item, numbers.Real):
        return None
    try:
        value = float(item)
    except OverflowError:  # an int (or a Fraction) past float range
        return _TOO_LARGE
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _magnitude(item) -> str:
    """A too-large number as a message shows it: in scientific notation (an int's repr may be thousands of digits,
    more than Python converts to text)."""
    if getattr(item, "ndim", None) == 0 and hasattr(item, "item"):
        item = item.item()
    try:
        if isinstance(item, numbers.Rational):  # an int or a Fraction, exactly
            item = decimal.Decimal(item.numerator) / item.denominator
        return f"{item.normalize():.4g}" if isinstance(item, decimal.Decimal) else f"{float(item):.4g}"
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        return show(item)


# ---------------------------------------------------------------------------------------------- numbers in text

# A number as answers write it: an optional sign (not a hyphen after a word: "x-3" is 3), an optional '$', digits
# with or without thousands commas, a decimal part, an exponent, and an optional "/denominator".
_NUMBER = re.compile(
    r"(?:(?<![\w.)\]}])(?P<sign>[-\u2212]))?\$?"
    r"(?P<digits>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+)"
    r"(?P<exponent>[eE][-+]?\d+)?"
    r"(?:\s*/\s*(?P<denominator>\d+(?:\.\d+)?)(?![\d,]))?"
)
_FRACTION = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*([\d.,]+)\s*\}")


def _numbers(text: str) -> list[float | None]:
    found = []
    for match in _NUMBER.finditer(text):
        value = float(match["digits"].replace(",", "") + (match["exponent"] or ""))
        if match["denominator"] is not None:
            denominator = float(match["denominator"])
            value = value / denominator if denominator else None
        if value is not None and match["sign"]:
            value = -value
        found.append(value if value is None or math.isfinite(value) else None)
    return found


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


def parse_answer(text: str) -> float | None:
    """The number a completion (or a row's answer text) gives as its answer: in the last \\boxed{}, else the first
    after the last '####', else the last in the text. None when there is none."""
    text = _FRACTION.sub(r"\1/\2", text)
    boxed = _boxed(text)
    if boxed is not None:
        found = _numbers(boxed)
        return found[-1] if found else None
    if "####" in text:
        found = _numbers(text.rsplit("####", 1)[1])
        return found[0] if found else None
    found = _numbers(text)
    return found[-1] if found else None


def value_as_number(value) -> float | None:
    """A row field as numeric:FIELD reads it: a number as is, a string as parse_answer reads it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return parse_answer(value)
    return None


# ---------------------------------------------------------------------------------------------- parsing specs


def _builtin(spec: str) -> Reward:
    name, _, argument = spec.partition(":")
    if name == "truncated":
        if argument or ":" in spec:
            raise ConfigError(f"reward {spec!r}: truncated takes no argument; write it as 'truncated'")
        return _Truncated(spec)
    if not argument:
        example = {"exact": "exact:answer", "numeric": "numeric:answer", "regex": "regex:Answer: .+",
                   "overlong": "overlong:64"}[name]
        raise ConfigError(f"reward {spec!r}: {name} needs its argument, {_USAGE[name]} (e.g. {example})")
    if name in ("exact", "numeric"):
        return (_Exact if name == "exact" else _Numeric)(spec, argument)
    if name == "regex":
        try:
            pattern = re.compile(argument, re.DOTALL)
        except re.error as e:
            raise ConfigError(f"reward {spec!r}: the pattern {argument!r} is not a valid regular expression ({e}); "
                              "the pattern is Python's re syntax, matched against the whole stripped completion"
                              ) from None
        return _Regex(spec, pattern)
    if not re.fullmatch(r"[0-9]+", argument) or int(argument) == 0:
        raise ConfigError(f"reward {spec!r}: overlong:N takes a positive whole number of tokens, not {argument!r}: "
                          "the penalty starts N tokens before max_new_tokens (e.g. overlong:64)")
    return _Overlong(spec, int(argument))


def _importable(directory: str) -> None:
    """Put `directory` first on sys.path, once, for good: as `python -m` keeps the current directory there. A reward
    function may import a module of its own (a helper beside it) when it is called, long after it was loaded."""
    if directory not in sys.path:
        sys.path.insert(0, directory)


def _import_module(spec: str, name: str):
    # As `python -m`: the current directory first, so a reward module beside the data is found.
    here = os.getcwd()
    importlib.invalidate_caches()  # a module written since the last import must be seen
    _importable(here)
    try:
        return importlib.import_module(name)
    except SystemExit as e:  # not an Exception: it would end qlorakit, quietly with sys.exit(0)
        raise ConfigError(f"reward {spec!r}: importing module {name!r} {_failure(e)}; a reward module is imported, "
                          "not run: put its script part under `if __name__ == \"__main__\":`") from e
    except Exception as e:  # noqa: BLE001 - a module's own import errors are the user's to see, with the reward
        close = difflib.get_close_matches(name.lower(), BUILTINS, n=1)
        hint = f"; did you mean the built-in {_USAGE[close[0]]}?" if close and "." not in name else ""
        raise ConfigError(f"reward {spec!r}: cannot import module {name!r} ({type(e).__name__}: {show(str(e))}); "
                          f"the current directory is {here}: run from the directory that holds {name.split('.')[0]}"
                          f".py, or name the file (path/to/file.py:function){hint}") from e


def _load_file(spec: str, path_text: str, loaded: dict):
    path = Path(path_text).expanduser()
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        raise ConfigError(f"reward {spec!r}: {path_text} is {what} (looked in {Path.cwd()}); name a Python file "
                          "and a function in it, path/to/file.py:function")
    resolved = path.resolve()
    if resolved in loaded:  # two functions of one file share its module (and its state)
        return loaded[resolved]
    # A module name of its own per file, so two reward files with one name do not replace each other.
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"qlorakit_reward_{stem}_{zlib.crc32(str(resolved).encode()):08x}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a module up by name
    _importable(str(resolved.parent))  # as `python file.py`: the file's neighbours are importable, now and later
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as e:  # not an Exception: it would end qlorakit, quietly with sys.exit(0)
        sys.modules.pop(module_name, None)
        raise ConfigError(f"reward {spec!r}: running {path_text} {_failure(e)}; a reward file is imported, not run: "
                          "put its script part under `if __name__ == \"__main__\":`") from e
    except Exception as e:  # noqa: BLE001
        sys.modules.pop(module_name, None)
        raise ConfigError(f"reward {spec!r}: running {path_text} failed ({type(e).__name__}: {show(str(e))}); fix "
                          "the file (it is run once, before the model loads)") from e
    loaded[resolved] = module
    return module


def _function(spec: str, loaded: dict) -> Reward:
    source, _, attribute = spec.rpartition(":")
    is_file = source.endswith(".py") or "/" in source or "\\" in source
    if not source or not attribute or not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigError(f"reward {spec!r}: not a reward; {_KINDS}")
    if not is_file and not all(part.isidentifier() for part in source.split(".")):
        raise ConfigError(f"reward {spec!r}: {source!r} is neither a module name nor a .py file; {_KINDS}")
    module = _load_file(spec, source, loaded) if is_file else _import_module(spec, source)
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            names = [n for n in dir(fn) if not n.startswith("_") and callable(getattr(fn, n, None))
                     and not inspect.ismodule(getattr(fn, n, None))]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            listed = (f"close names: {', '.join(close)}" if close else
                      f"its functions: {', '.join(names[:12]) + (', ...' if len(names) > 12 else '')}" if names
                      else "it defines no functions")
            raise ConfigError(f"reward {spec!r}: {source} has no {attribute!r} ({listed})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {source}:{attribute} is {type(fn).__name__} {show(fn)}, not a "
                          "function; name "
                          "a function fn(prompts, completions, rows) that returns one number per completion")
    try:
        inspect.signature(fn).bind([], [], [])
    except TypeError as e:
        raise ConfigError(f"reward {spec!r}: {attribute} cannot be called as fn(prompts, completions, rows) ({e}); "
                          "a reward function takes those three lists and returns one number per completion"
                          ) from None
    except ValueError:  # no signature to read (some builtins): the first call will tell
        pass
    return _Function(spec, fn)


def _parse_weights(weights, specs: list[str]) -> list[float]:
    if weights is None:
        return [1.0] * len(specs)
    given = weights
    if isinstance(weights, str):
        weights = [w.strip() for w in weights.split(",")]
    elif isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [weights]
    elif not isinstance(weights, (list, tuple)):
        raise ConfigError(f"reward_weights={show(given)} must be a list of numbers, or a comma-separated string "
                          "such as '1,0.5', one weight per reward")
    values = []
    for i, weight in enumerate(weights):
        if isinstance(weight, str):
            try:
                weight = float(weight)
            except ValueError:
                raise ConfigError(f"--reward-weights {show(given)}: {weight!r} is not a number; give one number "
                                  "per reward, comma-separated (e.g. 1,0.5)") from None
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ConfigError(f"--reward-weights {show(given)}: {show(weight)} is not a number; give one number "
                              "per reward")
        values.append(float(weight))
    if len(values) != len(specs):
        raise ConfigError(f"--reward-weights {show(given)}: {len(values)} weight(s) for {len(specs)} reward(s) "
                          f"({', '.join(specs)}); give one weight per --reward, in the same order")
    for spec, value in zip(specs, values):
        if not math.isfinite(value):
            raise ConfigError(f"--reward-weights {show(given)}: the weight of {spec} is {value}; weights must be "
                              "finite numbers")
    if not any(values):
        raise ConfigError(f"--reward-weights {show(given)}: every weight is 0, so every completion's reward is 0 "
                          "and nothing is learned; give at least one reward a non-zero weight")
    return values


def parse_rewards(specs, weights=None) -> list[Reward]:
    """The rewards named by `specs` (a string or a list of them) with `weights` (None: 1 each; a list of numbers;
    or a comma-separated string "1,0.5"). User functions are imported here, before the model loads; every problem
    is a ConfigError naming the spec."""
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ConfigError(f"reward={show(specs)}: GRPO needs at least one reward, e.g. --reward numeric:answer "
                          f"({_KINDS})")
    for spec in specs:
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"reward {show(spec)}: a reward is named by a non-empty string; {_KINDS}")
    seen = set()
    for spec in specs:
        if spec in seen:
            raise ConfigError(f"reward {spec!r} is given twice; give it once (its weight counts it more: "
                              "--reward-weights 2)")
        seen.add(spec)
    values = _parse_weights(weights, list(specs))
    rewards, loaded = [], {}
    for spec, weight in zip(specs, values):
        name = spec.partition(":")[0]
        if name in BUILTINS:
            reward = _builtin(spec)
        elif ":" not in spec:
            close = difflib.get_close_matches(spec.lower(), BUILTINS, n=1)
            hint = f"; did you mean {_USAGE[close[0]]}?" if close else ""
            raise ConfigError(f"reward {spec!r}: not a built-in reward nor a function ({_KINDS}){hint}")
        else:
            reward = _function(spec, loaded)
        reward.weight = weight
        rewards.append(reward)
    return rewards


# ---------------------------------------------------------------------------------------------- using them


def check_rows(rewards: list[Reward], rows: list[dict], wheres: list[str]) -> None:
    """Every row has what the built-ins read (exact:FIELD, numeric:FIELD: the field, not null; numeric: a number
    in it). A DataError names the row's file and line; called before the model loads."""
    for reward in rewards:
        if reward.fields:
            for row, where in zip(rows, wheres):
                reward.check_row(row, where)


def score(rewards: list[Reward], prompts: list, completions: list[str], rows: list[dict], wheres: list[str],
          completion_tokens: list[int], finished: list[bool], max_new_tokens: int
          ) -> tuple[dict[str, list[float]], list[float]]:
    """Each reward's values (by spec) and each completion's weighted total. The lists are parallel: one entry
    per completion (a prompt, its row and where repeated for each of its completions). A total beyond FLOAT32_MAX
    (a user function's values are checked as they come) is a RewardError naming the row."""
    n = len(completions)
    lengths = {len(prompts), len(rows), len(wheres), len(completion_tokens), len(finished)}
    if lengths != {n}:
        raise ValueError(f"score: the lists must be parallel, one entry per completion; got {len(prompts)} prompts, "
                         f"{n} completions, {len(rows)} rows, {len(wheres)} wheres, {len(completion_tokens)} "
                         f"lengths, {len(finished)} finished flags")
    by_spec, totals = {}, [0.0] * n
    for reward in rewards:
        values = reward(prompts, completions, rows, wheres, completion_tokens, finished, max_new_tokens)
        by_spec[reward.spec] = values
        totals = [total + reward.weight * value for total, value in zip(totals, values)]
    for i, total in enumerate(totals):  # each value is at most FLOAT32_MAX; weights and sums can pass it
        if not abs(total) <= FLOAT32_MAX:
            terms = " + ".join(f"{r.weight:g} * {by_spec[r.spec][i]:.4g} ({r.spec})" for r in rewards)
            raise RewardError(f"the weighted total of the rewards is {total:.4g} for {wheres[i]} (completion "
                              f"{_clip(completions[i])}): {terms}; GRPO's rewards are float32, at most "
                              f"{FLOAT32_MAX:.4g} in magnitude; scale the rewards or their weights down")
    return by_spec, totals


def completion_text(completion) -> str:
    """A completion as text: a string as is; a conversational one ([{"role": "assistant", "content": ...}], as
    TRL passes it) as its assistant turns' text, joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content blocks: their text parts
            parts.extend(block.get("text", "") for block in content
                         if isinstance(block, dict) and block.get("type") == "text")
    return "".join(parts)


class _TrlReward:
    """One reward as TRL's GRPOTrainer calls a reward function (TRL 1.16, GRPOTrainer._calculate_rewards):

        reward_func(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=..., log_extra=...,
                    log_metric=... [, environments=...]) -> list of floats

    all by keyword; `columns` are the dataset's other columns as lists, one entry per completion. TRL names the
    metric rewards/<__name__>, so __name__ is the spec. A class rather than a closure: TRL's async rollout worker
    pickles reward functions."""

    def __init__(self, reward: Reward, max_new_tokens: int, eos_token_ids):
        self.reward, self.max_new_tokens = reward, max_new_tokens
        self.eos_token_ids = None if eos_token_ids is None else set(eos_token_ids)
        self.__name__ = self.__qualname__ = reward.spec

    def __call__(self, prompts, completions, completion_ids=None, **columns):
        for extra in _TRL_EXTRAS:
            columns.pop(extra, None)
        n = len(completions)
        wheres = columns.pop(WHERE_COLUMN, None) or [f"completion {i} of the batch" for i in range(n)]
        rows = [{key: values[i] for key, values in columns.items()} for i in range(n)]
        texts = [completion_text(c) for c in completions]
        if completion_ids is None:  # TRL always passes them; a caller that does not gets lengths only if needed
            if isinstance(self.reward, (_Overlong, _Truncated)):
                raise ValueError(f"reward {self.reward.spec} needs completion_ids (the completions' token ids)")
            completion_ids = [[] for _ in range(n)]
        tokens = [len(ids) for ids in completion_ids]
        if self.eos_token_ids is None:  # TRL keeps the ids up to the first EOS: a full-length one did not end
            finished = [length < self.max_new_tokens for length in tokens]
        else:  # TRL's own rule (its clipped_ratio): the last id is not an EOS (or pad)
            finished = [bool(ids) and int(ids[-1]) in self.eos_token_ids for ids in completion_ids]
        return self.reward(list(prompts), texts, rows, list(wheres), tokens, finished, self.max_new_tokens)

    def __repr__(self):
        return f"<TRL reward {self.__name__}>"


def as_trl(rewards: list[Reward], max_new_tokens: int, eos_token_ids=None) -> list:
    """The rewards as TRL GRPOTrainer reward functions (their weights go to GRPOConfig.reward_weights:
    [r.weight for r in rewards]). A completion's length is len(completion_ids), its EOS included, as TRL counts
    it. It finished when its last id is one of `eos_token_ids` (pass the EOS and pad ids for TRL's own rule), or,
    without them, when it is shorter than max_new_tokens. A dataset column named WHERE_COLUMN gives the rows'
    `where` for error messages; it is not passed on as a field."""
    return [_TrlReward(reward, max_new_tokens, eos_token_ids) for reward in rewards]
