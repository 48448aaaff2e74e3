"""Data: files -> rows -> examples -> token ids + labels -> batches.

    data = load_data("train.jsonl", tokenizer, max_length=1024)   # format detected, answers-only labels
    for items in micro_batches(data.train, batch_size=8, epoch=0, seed=0):
        batch = collate(items, pad_id, packed=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .batches import Batch, collate, epoch_order, micro_batches, split_validation
from .files import Row, check_data_file, read_rows
from .formats import FORMATS, Example, detect_format, to_example
from .tokenize import (
    DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, Tokenized, TokenizeReport, check_trainable, encode_chat, encode_text,
    pad_id_of, render_chat, special_token_pattern, tokenize_examples,
)

__all__ = [
    "Batch", "DEFAULT_CHAT_TEMPLATE", "Example", "FORMATS", "IGNORE_INDEX", "Row", "Tokenized", "TokenizeReport",
    "TrainingData", "check_data_file", "check_trainable", "collate", "detect_format", "encode_chat", "encode_text",
    "epoch_order", "load_data", "micro_batches", "pad_id_of", "read_examples", "read_rows", "render_chat",
    "special_token_pattern", "split_validation", "to_example", "tokenize_examples",
]


@dataclass
class TrainingData:
    train: list[Tokenized]
    validation: list[Tokenized]
    format: str
    report: TokenizeReport


def _rows(source, name: str, option: str = "--data") -> tuple[list[Row], str]:
    if isinstance(source, (str, Path)):
        return read_rows(source, option), str(source)
    rows = [Row(dict(record), f"{name} row {i}") for i, record in enumerate(source)]
    if not rows:
        raise DataError(f"{name}: no rows; a training set needs at least one example")
    return rows, name


def read_examples(source, format: str = "auto", skip_bad_rows: bool = False, report: TokenizeReport | None = None,
                  name: str = "data", option: str = "--data") -> tuple[list[Example], str]:
    """Examples from a data file (or a list of dicts), with the format detected from the first row unless named.
    `option` is the flag that named the file, for the not-found message."""
    rows, label = _rows(source, name, option)
    if format == "auto":
        format = detect_format(rows[0])
    elif format not in FORMATS:
        raise DataError(f"format={format!r} is not a data format; use auto or one of {', '.join(FORMATS)}")
    examples, first_skipped = [], None
    for row in rows:
        try:
            examples.append(to_example(row, format))
        except DataError as e:
            if not skip_bad_rows:
                raise
            if report is not None:
                report.skipped_rows.append(str(e))
            first_skipped = first_skipped or str(e)
    if not examples:  # every row was bad and skipped: say so, rather than "nothing to train on" later
        raise DataError(f"{label}: all {len(rows)} rows are bad and were skipped (the first: {first_skipped}); "
                        "fix the data or its --format")
    return examples, format


def load_data(
    source, tokenizer, format: str = "auto", max_length: int = 1024, train_on: str = "assistant",
    on_long: str = "truncate", skip_bad_rows: bool = False, validation: float = 0.0, validation_source=None,
    seed: int = 0, name: str = "data", parse_special_tokens: bool = False,
) -> TrainingData:
    """Read, convert, split and tokenize a data source (a file path, a saved dataset directory, or a list of dicts).

    `validation` holds out that fraction of the examples (seeded); `validation_source` is a separate file instead.
    Bad rows raise a DataError naming file, line and field, or with `skip_bad_rows` are skipped and counted.
    Special-token strings in message content are text unless `parse_special_tokens` (see data/tokenize.py).
    """
    if not 0.0 <= validation < 1.0:
        raise DataError(f"validation={validation!r} must be a fraction in [0, 1)")
    report = TokenizeReport()
    examples, fmt = read_examples(source, format, skip_bad_rows, report, name)
    if validation_source:
        held, _ = read_examples(validation_source, fmt, skip_bad_rows, None, f"{name} (validation)",
                                "--validation-data")
    else:
        examples, held = split_validation(examples, validation, seed)
    train, report = tokenize_examples(tokenizer, examples, max_length, train_on, on_long, report,
                                      parse_special_tokens)
    check_trainable(train, report, str(source) if isinstance(source, (str, Path)) else name, train_on)
    val, _ = tokenize_examples(tokenizer, held, max_length, train_on, "truncate", None, parse_special_tokens)
    return TrainingData(train, val, fmt, report)
