"""Data files -> rows, each with the place it came from ("train.jsonl line 12"), so every later error can point
at it. JSONL, JSON (a list of objects, or an object holding one), CSV and Parquet are read here; a directory (saved
with `datasets`' save_to_disk, or data files in a Hub dataset repository's layout) is read through `datasets`
(data/hub.py). Text files must be UTF-8; an empty CSV cell is a missing value (CSV has no null)."""

from __future__ import annotations

import csv
import io
import json
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Rows are flat objects; nothing legitimate nests this deep, and deeper values would overflow Python's recursion
# in the JSON parser (and in any repr of them).
MAX_JSON_DEPTH = 100


@dataclass(frozen=True)
class Row:
    fields: dict
    where: str  # "data.jsonl line 3", "data.parquet row 7"


def file_kind(path: Path) -> str:
    if path.is_dir():  # a dataset directory, read through `datasets` (data/hub.py)
        return "datasets"
    if path.exists() and not path.is_file():  # a FIFO would block the read forever, a device never ends
        raise DataError(
            f"{path}: not a regular file but a {_special_kind(path)}; qlorakit reads data from regular files "
            "only: save the data to a file and pass its path"
        )
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown data file type {path.suffix or '(no extension)'!r}; use .jsonl, .json, .csv or "
            ".parquet, a dataset directory (written by datasets' save_to_disk, or in a Hub dataset's layout) or a "
            "Hub dataset id (org/name)"
        )
    return kind


def _special_kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_data_file(path: str | Path, option: str = "--data") -> str:
    """The kind of a data file, after making sure it exists, is a regular file (or a dataset directory) and
    can be opened — cheap checks to run before minutes of model loading. Returns the kind ("jsonl", ...)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data file not found; check the path given to {option}")
    kind = file_kind(path)
    if kind != "datasets":
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise _unreadable(path, e) from None
    return kind


def _unreadable(path: Path, e: OSError) -> DataError:
    return DataError(f"{path}: cannot read the data file ({e.strerror or e}); check its permissions")


def read_rows(path: str | Path, option: str = "--data") -> list[Row]:
    """Every row of a data file, in order. An unreadable file or row is a DataError naming the file and line."""
    path = Path(path).expanduser()
    kind = check_data_file(path, option)
    try:
        rows = list(_READERS[kind](path))
    except OSError as e:
        raise _unreadable(path, e) from None
    if not rows:
        raise DataError(f"{path}: the file holds no rows; a data file needs at least one example")
    return rows


def _decode(path: Path, data: bytes, line: int | None = None) -> str:
    """`data` as text; invalid UTF-8 is a DataError naming the line (`line` when `data` is one line)."""
    try:
        return data.decode("utf-8-sig" if line in (None, 1) else "utf-8")
    except UnicodeDecodeError as e:
        data = e.object  # positions count from after a byte order mark
        if line is None:
            line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path} line {line}: not valid UTF-8 (byte {data[e.start]:#04x} at byte {column} of the line); "
            "save the file as UTF-8"
        ) from None


_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{\]},]')


def _too_deep_at(text: str, limit: int, items_at: int = 1) -> tuple[int, int | None] | None:
    """Where JSON text first nests more than `limit` lists and objects deep (strings skipped): (the offset of that
    bracket, the index of the element it lies in within the list opened at depth `items_at`, None outside it), or
    None. The one depth check of JSON data; the line number is counted from the offset only for a message."""
    if text.count("[") + text.count("{") <= limit:  # the common case, without walking the text
        return None
    depth, index, in_items = 0, 0, False
    for match in _JSON_TOKENS.finditer(text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            if depth > limit:
                return match.start(), index if in_items else None
            if depth == items_at and char == "[":
                index, in_items = 0, True
        elif char in "]}":
            if depth == items_at:
                in_items = False
            depth -= 1
        elif char == "," and depth == items_at:
            index += 1
    return None


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _too_deep_error(where: str) -> DataError:
    return DataError(
        f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep; an example is an object of strings (a "
        "conversation: a list of message objects), so this is not training data"
    )


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:  # bytes, so that bad UTF-8 is reported with its line
        for number, raw in enumerate(f, start=1):
            line = _decode(path, raw, number)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); every line of a .jsonl "
                    "file must be one JSON object"
                ) from None
            except RecursionError:  # deeper than the parser reaches
                raise _too_deep_error(f"{path} line {number}") from None
            if _too_deep_at(line, MAX_JSON_DEPTH) is not None:
                raise _too_deep_error(f"{path} line {number}")
            if not isinstance(value, dict):
                raise DataError(
                    f"{path} line {number}: a JSON {type(value).__name__}, not an object; every line must be an "
                    'object such as {"messages": [...]}'
                )
            yield Row(value, f"{path.name} line {number}")


def _json(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # deeper than the parser reaches
        deep = _too_deep_at(text, MAX_JSON_DEPTH)
        raise _too_deep_error(f"{path}" + (f" line {_line_of(text, deep[0])}" if deep else "")) from None
    item_depth = 2  # the depth of an example in the file: inside the top-level list ...
    if isinstance(value, dict):  # {"data": [...]} and the like: the one list-valued field
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: a JSON object; expected a list of examples, or an object with exactly one list field "
                f"(found list fields: {lists or 'none'})"
            )
        value = value[lists[0]]
        item_depth = 3  # ... or inside the object's list
    if not isinstance(value, list):
        raise DataError(f"{path}: the JSON holds a {type(value).__name__}; expected a list of example objects")
    # An example may nest MAX_JSON_DEPTH levels, counted from the example itself.
    deep = _too_deep_at(text, MAX_JSON_DEPTH + item_depth - 1, items_at=item_depth - 1)
    if deep is not None and deep[1] is None:  # in another field of the object, beside the examples
        raise _too_deep_error(f"{path} line {_line_of(text, deep[0])}")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {index}: a JSON {type(item).__name__}, not an object")
        if deep is not None and index == deep[1]:
            raise _too_deep_error(f"{path} item {index} (line {_line_of(text, deep[0])})")
        yield Row(item, f"{path.name} item {index}")


def _csv(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        return
    for record in reader:
        # DictReader puts surplus cells under the key None, and gives the columns a short row lacks None.
        if None in record:
            raise DataError(
                f"{path} line {reader.line_num}: more cells than the header's {len(reader.fieldnames)} columns; "
                "quote cells that contain commas"
            )
        if None in record.values():
            cells = sum(v is not None for v in record.values())
            missing = [k for k, v in record.items() if v is None]
            raise DataError(
                f"{path} line {reader.line_num}: {cells} cells, fewer than the header's {len(reader.fieldnames)} "
                f"columns (no cell for {', '.join(map(repr, missing))}); write every cell — an empty one as "
                "nothing between two commas — and quote cells that contain line breaks"
            )
        # An empty cell is a missing value: a required field left empty is then an error, not a "" that trains
        # only the end-of-turn token.
        yield Row({k: (None if v == "" else v) for k, v in record.items()}, f"{path.name} line {reader.line_num}")


def _table_rows(table, path: Path) -> Iterator[Row]:
    for index, record in enumerate(table.to_pylist()):
        yield Row(record, f"{path.name} row {index}")


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    yield from _table_rows(table, path)


def _datasets_dir(path: Path) -> Iterator[Row]:
    from .hub import open_dataset

    yield from open_dataset(str(path)).rows("train")


_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "datasets": _datasets_dir}
