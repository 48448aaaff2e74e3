"""Rows -> examples. Formats, detected from a row's fields or named by the user:

    chat               {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
                       ShareGPT style too: {"conversations": [{"from": "human", "value": ...}, ...]}
    instruction        {"instruction": ..., "input": ... (optional), "output": ...}   (Alpaca)
    prompt-completion  {"prompt": ..., "completion": ...}   (strings; or lists of messages, then it is a chat)
    text               {"text": ...}
    preference         {"prompt": ..., "chosen": ..., "rejected": ...}   (strings, or a chat: the prompt's turns and
                       each answer's; or no prompt and two whole conversations that share their first turns)
    prompt             {"prompt": ..., any other fields}   (a string, or a list of messages ending in a user or system
                       turn: GRPO's prompts, whose answers the model generates; the other fields are for the rewards)

An example is either a conversation (rendered with the tokenizer's chat template) or a prompt/completion pair of
plain strings (a `text` row is a completion with an empty prompt). The trained part is the assistant turns, or
the completion. A preference row becomes a PreferenceExample: two such examples, the chosen answer's and the
rejected one's, with the same prompt (data/preference.py tokenizes and batches them). A prompt row becomes a
PromptExample: the prompt, and the row's other fields (data/prompts.py tokenizes and batches them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..choices import FORMATS  # re-exported: its home is torch-free, for TrainConfig and the CLI's parser
from ..errors import ConfigError, DataError
from .files import Row

ROLES = ("system", "user", "assistant")
# Every field a format reads: the TARGETs `--field TARGET=COLUMN` may name.
FIELDS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text", "chosen",
          "rejected")
FORMAT_FIELDS = {"chat": ("messages", "conversations"), "instruction": ("instruction", "input", "output"),
                 "prompt-completion": ("prompt", "completion"), "text": ("text",),
                 "preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",)}
_SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
}


@dataclass
class Example:
    where: str
    messages: list[dict] | None = None  # a conversation: role in ROLES, content a string
    first_trained_turn: int = 0  # assistant turns before this index are context (a chat prompt's few-shot turns)
    prompt: str = ""  # plain text: the untrained prefix ...
    completion: str = ""  # ... and the trained rest


@dataclass
class PreferenceExample:
    """A preference pair: the chosen answer's and the rejected answer's examples, ordinary ones with the same
    prompt (the answers are their trained parts)."""

    where: str
    chosen: Example
    rejected: Example


@dataclass
class PromptExample:
    """A GRPO prompt: plain text, or a conversation that ends where the assistant's answer starts; `row` holds the
    row's other fields (after --field mapping), which the rewards read (an answer column)."""

    where: str
    prompt: str | list[dict]
    row: dict


# A prompt row holds a prompt and none of these: with any of them it is another format's row (or half of one).
_NOT_PROMPT_ONLY = {"completion", "chosen", "rejected", "messages", "conversations", "instruction", "text"}


def detect_format(row: Row) -> str:
    keys = set(row.fields)
    if "chosen" in keys and "rejected" in keys:  # first: a preference row may also hold a chat or a completion
        return "preference"
    if keys & {"messages", "conversations"}:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "instruction"
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    if "prompt" in keys and not keys & _NOT_PROMPT_ONLY:
        return "prompt"
    raise DataError(
        f"{row.where}: cannot tell the data format from the fields {sorted(keys)}; expected 'messages' (or "
        "'conversations') for chat, 'instruction' + 'output', 'prompt' + 'completion', 'text', or 'chosen' + "
        "'rejected' (+ 'prompt') for preference pairs, or 'prompt' alone for GRPO prompts — or name the format "
        "with --format, or read those fields from other columns with --field TARGET=COLUMN (e.g. --field "
        "prompt=question --field completion=answer)"
    )


def check_field_map(mapping: dict[str, str]) -> None:
    """Each TARGET of `--field TARGET=COLUMN` is a field some format reads."""
    for target, column in mapping.items():
        if target not in FIELDS:
            raise ConfigError(f"--field {target}={column}: {target!r} is not a field of any data format; TARGET is "
                              f"one of {', '.join(FIELDS)}")


def check_fields_used(where: str, mapping: dict[str, str], fmt: str) -> None:
    """Every TARGET of `--field TARGET=COLUMN` is a field of the format the data is read as: a mapping the format
    ignores would drop its column without a word (a row with messages and prompt/completion columns reads as chat)."""
    unused = [target for target in mapping if target not in FORMAT_FIELDS[fmt]]
    if unused:
        target = unused[0]
        raise DataError(f"{where}: --field {target}={mapping[target]} maps a field the {fmt} format does not read "
                        f"(it reads {', '.join(FORMAT_FIELDS[fmt])}); name the format you mean with --format, or "
                        "drop the mapping")


def check_columns(where: str, columns, mapping: dict[str, str]) -> None:
    """Every COLUMN of `--field TARGET=COLUMN` is one of `columns` (a dataset's, or a row's fields)."""
    for target, column in mapping.items():
        if column not in columns:
            raise DataError(f"{where}: no column {column!r} for --field {target}={column}; the columns are "
                            f"{', '.join(map(repr, sorted(columns))) or 'none'}")


def map_fields(row: Row, mapping: dict[str, str]) -> Row:
    """`row` with each mapped COLUMN read as its TARGET field (`--field TARGET=COLUMN`). The mapped columns' own
    names are dropped, so they play no part in detecting the format."""
    if not mapping:
        return row
    check_columns(row.where, row.fields, mapping)
    fields = {k: v for k, v in row.fields.items() if k not in mapping.values()}
    return Row(fields | {target: row.fields[column] for target, column in mapping.items()}, row.where)


def to_example(row: Row, fmt: str) -> Example | PreferenceExample | PromptExample:
    if fmt not in FORMATS:
        raise DataError(f"format={fmt!r} is not a data format; use one of {', '.join(FORMATS)} or auto")
    return _CONVERTERS[fmt](row)


def _field(row: Row, name: str, kind=str, optional=False):
    if name not in row.fields or row.fields[name] is None:
        if optional:
            return None
        if name in row.fields:
            raise DataError(
                f"{row.where}: field {name!r} is empty (a null, or an empty CSV cell), but this format needs it; "
                "fill it in, or leave the row out (--skip-bad-rows skips such rows)"
            )
        raise DataError(
            f"{row.where}: missing field {name!r} (fields present: {', '.join(sorted(row.fields)) or 'none'})"
        )
    value = row.fields[name]
    if kind is list and isinstance(value, str) and value.lstrip().startswith("["):
        try:  # CSV cells hold a conversation as JSON text
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{row.where}: field {name!r} holds text that is not valid JSON ({e.msg})") from None
    if not isinstance(value, kind):
        raise DataError(
            f"{row.where}: field {name!r} must be a {'string' if kind is str else 'list'}, "
            f"not {type(value).__name__}"
        )
    if kind is str:
        _check_unicode(f"{row.where}: field {name!r}", value)
    return value


def _check_unicode(here: str, text: str) -> None:
    """Text the tokenizer can encode: a lone UTF-16 surrogate (JSON's "\\ud83d" without its pair) is no
    character, and the tokenizer would fail on it with a TypeError naming nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{here} holds {text[e.start]!r} at character {e.start}, half of a UTF-16 surrogate pair "
                        "(a JSON \\uXXXX escape without its other half), which is not text; fix the text, or leave "
                        "the row out (--skip-bad-rows skips such rows)") from None


def _messages(row: Row, name: str, turns: list) -> list[dict]:
    sharegpt = name == "conversations"
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out = []
    for index, turn in enumerate(turns):
        here = f"{row.where}: {name}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{here} is a {type(turn).__name__}; each turn must be an object with "
                            f"{role_key!r} and {content_key!r}")
        for key in (role_key, content_key):
            if key not in turn:
                raise DataError(f"{here}: missing field {key!r}")
        role = turn[role_key]
        role = _SHAREGPT_ROLES.get(str(role).lower()) if sharegpt else role
        if role not in ROLES:
            allowed = ", ".join(sorted(_SHAREGPT_ROLES)) if sharegpt else ", ".join(ROLES)
            raise DataError(f"{here}: unknown role {turn[role_key]!r}; use one of {allowed}")
        content = turn[content_key]
        if not isinstance(content, str):
            raise DataError(f"{here}: {content_key!r} must be a string, not {type(content).__name__}")
        _check_unicode(f"{here}: {content_key!r}", content)
        out.append({"role": role, "content": content})
    if not out:
        raise DataError(f"{row.where}: {name!r} is empty; a conversation needs at least one assistant turn")
    return out


def check_messages(messages: list, where: str) -> list[dict]:
    """A conversation given in code (a generation prompt), checked as a data file's `messages` field is: each turn
    an object with a known role and string content; DataError naming `where` and the turn."""
    return _messages(Row({"messages": messages}, where), "messages", messages)


def _chat(row: Row) -> Example:
    name = "messages" if "messages" in row.fields else "conversations"
    messages = _messages(row, name, _field(row, name, list))
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.where}: the conversation has no assistant turn, so there is nothing to train on")
    return Example(row.where, messages=messages)


def _instruction(row: Row) -> Example:
    instruction = _field(row, "instruction")
    extra = _field(row, "input", optional=True)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return Example(row.where, messages=[
        {"role": "user", "content": user}, {"role": "assistant", "content": _field(row, "output")}
    ])


def _prompt_completion(row: Row) -> Example:
    prompt, completion = row.fields.get("prompt"), row.fields.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
        messages = _messages(row, "prompt", _field(row, "prompt", list))
        completion = _messages(row, "completion", _field(row, "completion", list))
        if not any(m["role"] == "assistant" for m in completion):
            raise DataError(f"{row.where}: the completion has no assistant turn, so there is nothing to train on")
        return Example(row.where, messages=messages + completion, first_trained_turn=len(messages))
    return Example(row.where, prompt=_field(row, "prompt"), completion=_field(row, "completion"))


def _text(row: Row) -> Example:
    text = _field(row, "text")
    if not text.strip():
        raise DataError(f"{row.where}: field 'text' is empty")
    return Example(row.where, completion=text)


_PAIR = ("chosen", "rejected")


def _preference(row: Row) -> PreferenceExample:
    """A pair in one of three forms: strings (plain text, EOS after each answer when tokenized); a chat (prompt and
    answers as lists of messages, a string prompt being one user turn and a string answer one assistant turn); or
    no prompt and two whole conversations, whose longest common prefix of turns is the prompt."""
    missing = [name for name in _PAIR if name not in row.fields]
    if missing:
        raise DataError(
            f"{row.where}: missing field {missing[0]!r} (fields present: {', '.join(sorted(row.fields)) or 'none'});"
            " preference data needs 'prompt', 'chosen' and 'rejected' (or 'chosen' and 'rejected' alone, as whole "
            "conversations that share their first turns): read them from other columns with --field "
            "chosen=COLUMN --field rejected=COLUMN (and --field prompt=COLUMN)"
        )
    row = Row(row.fields | {name: _conversation_text(row.fields[name]) for name in ("prompt", *_PAIR)
                            if name in row.fields}, row.where)
    values = {name: row.fields.get(name) for name in ("prompt", *_PAIR)}
    # No prompt: whole conversations. (A null prompt with two strings is a text pair with its prompt missing.)
    if values["prompt"] is None and not ("prompt" in row.fields and all(isinstance(values[n], str) for n in _PAIR)):
        return _implicit_prompt(row)
    if any(isinstance(value, list) for value in values.values()):
        prompt = values["prompt"]
        turns = (_turns(row, "prompt") if isinstance(prompt, list)
                 else [{"role": "user", "content": _text_field(row, "prompt")}])
        chosen, rejected = (_answer(row, name) for name in _PAIR)
        _check_differ(row, chosen, rejected)
        return PreferenceExample(row.where, *(
            Example(f"{row.where} ({name})", messages=turns + answer, first_trained_turn=len(turns))
            for name, answer in zip(_PAIR, (chosen, rejected))))
    prompt, chosen, rejected = (_text_field(row, name) for name in ("prompt", *_PAIR))
    _check_differ(row, chosen, rejected)
    return PreferenceExample(row.where, Example(f"{row.where} (chosen)", prompt=prompt, completion=chosen),
                             Example(f"{row.where} (rejected)", prompt=prompt, completion=rejected))


def _conversation_text(value):
    """A string that holds a list of messages as JSON (a CSV cell, a column stored as text) -> that list, so a
    chat pair in CSV is read as one, not trained on its JSON text. Only a list of objects with a 'role' (or
    'from') key counts: a text answer that happens to be JSON ("[1, 2]", '[{"name": "x"}]') stays text."""
    if not (isinstance(value, str) and value.lstrip().startswith("[")):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    if isinstance(parsed, list) and parsed and all(isinstance(turn, dict) and ("role" in turn or "from" in turn)
                                                   for turn in parsed):
        return parsed
    return value


def _text_field(row: Row, name: str) -> str:
    value = _field(row, name)
    if not value.strip():
        raise DataError(f"{row.where}: field {name!r} is empty; a preference pair needs a prompt and two answers: "
                        "fill it in, or leave the row out (--skip-bad-rows skips such rows)")
    return value


def _turns(row: Row, name: str) -> list[dict]:
    turns = _field(row, name, list)
    if not turns:
        raise DataError(f"{row.where}: field {name!r} is an empty list of messages; fill it in, or leave the row out "
                        "(--skip-bad-rows skips such rows)")
    return _messages(row, name, turns)


def _answer(row: Row, name: str) -> list[dict]:
    """A chat pair's answer as turns: a list of messages with an assistant turn, or a string (one assistant turn)."""
    if not isinstance(row.fields.get(name), list):
        return [{"role": "assistant", "content": _text_field(row, name)}]
    turns = _turns(row, name)
    if not any(m["role"] == "assistant" for m in turns):
        raise DataError(f"{row.where}: {name!r} has no assistant turn, so there is nothing to score; give the "
                        "answer as assistant turns (or a string)")
    return turns


def _check_differ(row: Row, chosen, rejected) -> None:
    if chosen == rejected:
        raise DataError(f"{row.where}: 'chosen' and 'rejected' are the same answer: nothing to learn from this pair; "
                        "fix the row, or leave it out (--skip-bad-rows skips such rows)")


def _implicit_prompt(row: Row) -> PreferenceExample:
    """No prompt: chosen and rejected are whole conversations; the prompt is the turns they open with alike."""
    for name in _PAIR:
        value = row.fields[name]
        if isinstance(value, str) and not value.lstrip().startswith("["):  # (a CSV cell holds a list as JSON)
            raise DataError(
                f"{row.where}: no 'prompt', and {name!r} is a string: without a prompt, 'chosen' and 'rejected' "
                "must be whole conversations (lists of messages) that share their first turns; give the prompt "
                "in a 'prompt' field (--field prompt=COLUMN)"
            )
    chosen, rejected = (_turns(row, name) for name in _PAIR)
    _check_differ(row, chosen, rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(
            f"{row.where}: no 'prompt', and 'chosen' and 'rejected' differ from their first turn, so there is no "
            "prompt they share: give the prompt in a 'prompt' field (--field prompt=COLUMN), or make both whole "
            "conversations that open with the same turns"
        )
    for name, turns in zip(_PAIR, (chosen, rejected)):
        rest = turns[shared:]
        if not rest or rest[0]["role"] != "assistant":
            what = ("ends there, with no answer of its own" if not rest
                    else f"goes on with a {rest[0]['role']} turn, not an assistant turn")
            raise DataError(
                f"{row.where}: no 'prompt'; 'chosen' and 'rejected' share their first {shared} turns (the prompt), "
                f"and {name!r} {what}: each answer must start with an assistant turn right after the shared "
                "prompt; fix the row, or give the prompt in a 'prompt' field"
            )
    prompt = chosen[:shared]
    return PreferenceExample(row.where, *(
        Example(f"{row.where} ({name})", messages=turns, first_trained_turn=len(prompt))
        for name, turns in zip(_PAIR, (chosen, rejected))))


def _prompt(row: Row) -> PromptExample:
    """A GRPO prompt: a string (plain text, as generation prompts it), or a list of messages (a CSV cell may hold it
    as JSON) that ends in a user or system turn, where the generated answer follows. The other fields stay with it."""
    if "prompt" not in row.fields:
        raise DataError(f"{row.where}: missing field 'prompt' (fields present: "
                        f"{', '.join(sorted(row.fields)) or 'none'}); GRPO data needs a prompt in each row: read it "
                        "from another column with --field prompt=COLUMN")
    value = row.fields["prompt"]
    if value is not None and not isinstance(value, (str, list)):
        raise DataError(f"{row.where}: field 'prompt' must be a string or a list of messages, not "
                        f"{type(value).__name__}; fix the row, or leave it out (--skip-bad-rows skips such rows)")
    value = _conversation_text(value)
    if isinstance(value, list):
        turns = _turns(Row(row.fields | {"prompt": value}, row.where), "prompt")
        if turns[-1]["role"] == "assistant":
            raise DataError(
                f"{row.where}: the prompt's messages end with an assistant turn, and GRPO generates the assistant's "
                "answer to the prompt itself; drop the final assistant turn (an earlier one may stay, as an example "
                "answer), so that the prompt ends with a user or system turn"
            )
        prompt = turns
    else:
        prompt = _field(row, "prompt")  # (a null named; the text checked as Unicode)
        if not prompt.strip():
            raise DataError(f"{row.where}: field 'prompt' is empty; GRPO generates answers to the prompt: fill it "
                            "in, or leave the row out (--skip-bad-rows skips such rows)")
    return PromptExample(row.where, prompt, {k: v for k, v in row.fields.items() if k != "prompt"})


_CONVERTERS = {"chat": _chat, "instruction": _instruction, "prompt-completion": _prompt_completion, "text": _text,
               "preference": _preference, "prompt": _prompt}
