"""Rows -> examples. Formats, detected from a row's fields or named by the user:

    chat               {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
                       ShareGPT style too: {"conversations": [{"from": "human", "value": ...}, ...]}
    instruction        {"instruction": ..., "input": ... (optional), "output": ...}   (Alpaca)
    prompt-completion  {"prompt": ..., "completion": ...}   (strings; or lists of messages, then it is a chat)
    text               {"text": ...}

An example is either a conversation (rendered with the tokenizer's chat template) or a prompt/completion pair of
plain strings (a `text` row is a completion with an empty prompt). The trained part is the assistant turns, or
the completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..choices import FORMATS  # re-exported: its home is torch-free, for TrainConfig and the CLI's parser
from ..errors import ConfigError, DataError
from .files import Row

ROLES = ("system", "user", "assistant")
# Every field a format reads: the TARGETs `--field TARGET=COLUMN` may name.
FIELDS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text")
FORMAT_FIELDS = {"chat": ("messages", "conversations"), "instruction": ("instruction", "input", "output"),
                 "prompt-completion": ("prompt", "completion"), "text": ("text",)}
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


def detect_format(row: Row) -> str:
    keys = set(row.fields)
    if keys & {"messages", "conversations"}:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "instruction"
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{row.where}: cannot tell the data format from the fields {sorted(keys)}; expected 'messages' (or "
        "'conversations') for chat, 'instruction' + 'output', 'prompt' + 'completion', or 'text' — or name the "
        "format with --format, or read those fields from other columns with --field TARGET=COLUMN (e.g. --field "
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


def to_example(row: Row, fmt: str) -> Example:
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
    return value


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


_CONVERTERS = {"chat": _chat, "instruction": _instruction, "prompt-completion": _prompt_completion, "text": _text}
