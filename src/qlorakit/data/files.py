"""Data files -> rows, each with the place it came from ("train.jsonl line 12"), so every later error can point
at it. JSONL, JSON (a list of objects, or an object holding one), CSV, Parquet, and a directory saved with
`datasets.Dataset.save_to_disk`."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Row:
    fields: dict
    where: str  # "data.jsonl line 3", "data.parquet row 7"


def file_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "datasets"
        raise DataError(
            f"{path}: a directory that is not a saved `datasets` dataset (no dataset_info.json / state.json); "
            "pass a .jsonl, .json, .csv or .parquet file, or a directory written by Dataset.save_to_disk"
        )
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown data file type {path.suffix or '(no extension)'!r}; use .jsonl, .json, .csv or "
            ".parquet, or a directory written by datasets' save_to_disk"
        )
    return kind


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a data file, in order. An unreadable file or row is a DataError naming the file and line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data file not found; check the path given to --data")
    kind = file_kind(path)
    rows = list(_READERS[kind](path))
    if not rows:
        raise DataError(f"{path}: the file holds no rows; a training file needs at least one example")
    return rows


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); every line of a .jsonl "
                    "file must be one JSON object"
                ) from None
            if not isinstance(value, dict):
                raise DataError(
                    f"{path} line {number}: a JSON {type(value).__name__}, not an object; every line must be an "
                    'object such as {"messages": [...]}'
                )
            yield Row(value, f"{path.name} line {number}")


def _json(path: Path) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict):  # {"data": [...]} and the like: the one list-valued field
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: a JSON object; expected a list of examples, or an object with exactly one list field "
                f"(found list fields: {lists or 'none'})"
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"{path}: the JSON holds a {type(value).__name__}; expected a list of example objects")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {index}: a JSON {type(item).__name__}, not an object")
        yield Row(item, f"{path.name} item {index}")


def _csv(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return
        for record in reader:
            # DictReader puts surplus cells under the key None; a short row gets None values.
            if None in record:
                raise DataError(
                    f"{path} line {reader.line_num}: more cells than the header's {len(reader.fieldnames)} columns; "
                    "quote cells that contain commas"
                )
            yield Row({k: ("" if v is None else v) for k, v in record.items()}, f"{path.name} line {reader.line_num}")


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
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]
    for index, record in enumerate(dataset):
        yield Row(dict(record), f"{path.name} row {index}")


_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "datasets": _datasets_dir}
