"""Data: files or Hub datasets -> rows -> examples -> token ids + labels -> batches.

    data = load_data("train.jsonl", tokenizer, max_length=1024)   # format detected, answers-only labels
    data = load_data("org/name", tokenizer, split="train", fields={"prompt": "question", "completion": "answer"})
    for items in micro_batches(data.train, batch_size=8, epoch=0, seed=0):
        batch = collate(items, pad_id, packed=True)

Reading (`read_data`: rows, column mapping, format, examples) needs no tokenizer, so a run does it before the model
loads; `load_data` tokenizes what it read. With `streaming=True` (a dataset directory or Hub id) the training split
is not read up front: `data.train` is a TokenStream whose rows are read, converted and tokenized as the run needs
them (data/batches.py's StreamedBatches), with the semantics written out in docs/errors.md "## Hub datasets".

Preference data (format "preference": prompt, chosen, rejected) is read the same way, and `load_data` makes it a
PreferenceData of TokenizedPairs (data/preference.py), whose batches put each pair's two sequences through one
forward. It is always read whole. So is GRPO's prompt data (format "prompt": a prompt alone, with any other fields
for the rewards): `load_data` makes it a PromptData of TokenizedPrompts (data/prompts.py), tokenized as generation
tokenizes prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError
from .batches import Batch, MicroBatchStream, StreamedBatches, collate, epoch_order, micro_batches, split_validation
from .files import Row, check_data_file, read_rows
from .formats import (
    FORMATS, Example, PreferenceExample, PromptExample, check_columns, check_field_map, check_fields_used,
    detect_format, map_fields, to_example,
)
from .hub import OpenedDataset, RowStream, is_dataset, open_dataset
from .preference import PreferenceData, TokenizedPair, collate_pairs, load_pairs, pair_tokenizer
from .prompts import PromptData, TokenizedPrompt, collate_prompts, load_prompts
from .tokenize import (
    DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, Tokenized, TokenizeReport, check_trainable, encode_chat, encode_text,
    example_tokenizer, pad_id_of, render_chat, special_token_pattern, tokenize_examples,
)

__all__ = [
    "Batch", "DEFAULT_CHAT_TEMPLATE", "Example", "ExampleData", "ExampleStream", "FORMATS", "IGNORE_INDEX",
    "PreferenceData", "PreferenceExample", "PromptData", "PromptExample", "Row", "TokenStream", "Tokenized",
    "TokenizeReport", "TokenizedPair", "TokenizedPrompt", "TrainingData", "check_data_file", "check_trainable",
    "collate", "collate_pairs", "collate_prompts", "detect_format", "encode_chat", "encode_text", "epoch_order",
    "load_data", "load_prompts", "micro_batches", "pad_id_of", "pair_tokenizer", "read_data",
    "read_examples", "read_rows", "render_chat", "special_token_pattern", "split_validation", "to_example",
    "tokenize_examples",
]

# A streamed run's checkpoints fingerprint its data by the examples of this many rows at its start, in the
# dataset's order (and every validation example): reading it all again at each start would undo what streaming is
# for.
FINGERPRINT_ROWS = 64


class ExampleStream:
    """Training examples read as they are needed (--streaming): a RowStream's rows, with --field applied, in the
    data format. A bad row raises its DataError when it is read, or with `skip_bad_rows` is skipped and counted."""

    def __init__(self, rows: RowStream, fields: dict[str, str], format: str, skip_bad_rows: bool,
                 report: TokenizeReport):
        self.rows, self.fields, self.format = rows, fields, format
        self.skip_bad_rows, self.report = skip_bad_rows, report
        self.label, self.num_rows = rows.label, rows.num_rows

    def examples(self, epoch: int | None = None, skip: int = 0) -> Iterator[tuple[int, Example]]:
        """(rows read so far, example) in the dataset's order (epoch None) or the epoch's shuffled order, after
        passing over `skip` rows. A whole epoch without a good row is the error an in-memory read gives."""
        read, first_bad = skip, None
        produced = 0
        for row in self.rows.rows(epoch, skip):
            read += 1
            try:
                example = to_example(map_fields(row, self.fields), self.format)
            except DataError as e:
                if not self.skip_bad_rows:
                    raise
                self.report.skipped_rows.append(str(e))
                first_bad = first_bad or str(e)
                continue
            produced += 1
            yield read, example
        if skip == 0 and not produced and read:
            raise DataError(f"{self.label}: all {read} rows are bad and were skipped (the first: {first_bad}); fix "
                            "the data or its --format")
        if skip == 0 and not read:
            raise DataError(f"{self.label}: the split holds no rows; a training set needs at least one example")


class TokenStream:
    """An ExampleStream tokenized one example at a time, for StreamedBatches: `items(epoch, skip)`. `tokenizer_for`
    gives example_tokenizer's function counting into a report. A whole epoch with nothing to train on is the error
    an in-memory read gives (check_trainable)."""

    def __init__(self, examples: ExampleStream, tokenizer_for, report: TokenizeReport, train_on: str):
        self.examples, self.tokenizer_for, self.report, self.train_on = examples, tokenizer_for, report, train_on
        self._fit = tokenizer_for(report)

    def items(self, epoch: int | None = None, skip: int = 0) -> Iterator[tuple[int, Tokenized]]:
        kept = trained = 0
        dropped_before = self.report.dropped_long
        for read, example in self.examples.examples(epoch, skip):
            item = self._fit(example)
            if item is not None:
                kept += 1
                trained += item.trained_tokens
                yield read, item
        if skip == 0 and not trained:  # (check_trainable asks only whether any item was kept)
            epoch_report = TokenizeReport(examples=kept, dropped_long=self.report.dropped_long - dropped_before)
            check_trainable(range(kept), epoch_report, self.examples.label, self.train_on)

    def head(self, rows: int) -> list[Tokenized]:
        """The items of the first `rows` rows in the dataset's order, counted in no report of the run: what a
        checkpoint fingerprints."""
        stream, fit, out = self.examples, self.tokenizer_for(TokenizeReport()), []
        for row in stream.rows.head(rows):
            try:
                example = to_example(map_fields(row, stream.fields), stream.format)
            except DataError:
                if not stream.skip_bad_rows:
                    raise
                continue
            item = fit(example)
            if item is not None:
                out.append(item)
        return out


@dataclass
class ExampleData:
    """What `read_data` read, before tokenization: the training examples (a list, or an ExampleStream), the
    validation examples, the format, and the rows skipped so far. Preference data's examples are
    PreferenceExamples, prompt data's PromptExamples."""

    train: list[Example] | list[PreferenceExample] | list[PromptExample] | ExampleStream
    validation: list[Example] | list[PreferenceExample] | list[PromptExample]
    format: str
    report: TokenizeReport
    label: str  # what messages call the training data: "train.jsonl", "org/name (train)"
    origin: str = ""  # where a Hub dataset was read from, when not datasets' own path (offline: the hub cache)


@dataclass
class TrainingData:
    train: list[Tokenized] | TokenStream
    validation: list[Tokenized]
    format: str
    report: TokenizeReport
    origin: str = ""

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, TokenStream)

    def describe(self) -> str:
        where = f" ({self.origin})" if self.origin else ""
        if not self.streamed:
            return self.report.describe() + where
        rows = self.train.examples.num_rows
        return (f"streamed{where}: {rows if rows is not None else 'an unknown number of'} rows, read and tokenized "
                "as training needs them")

    def micro_batches_per_epoch(self, batch_size: int) -> int | None:
        """None when streamed: the number of examples is known only once an epoch has been read. `batch_size`: of
        a global micro-batch, on several processes."""
        return None if self.streamed else math.ceil(len(self.train) / batch_size)

    def batches(self, batch_size: int, seed: int, pad_id: int, packed: bool, position: dict,
                grad_accum: int = 1, rank: int = 0, world: int = 1) -> MicroBatchStream | StreamedBatches:
        """The run's micro-batches from `position` (a checkpoint's, or the start's {"epoch": 0, "micro": 0}); on
        `world` processes, rank `rank`'s shares of global micro-batches of world x batch_size examples."""
        if not self.streamed:
            return MicroBatchStream(self.train, batch_size, seed, pad_id, packed, position, rank, world)
        return StreamedBatches(self.train.items, batch_size, pad_id, packed, position, grad_accum,
                               self.train.examples.num_rows, rank, world)

    def fingerprinted(self) -> "TrainingData":
        """The data a checkpoint's fingerprint covers (checkpoint.data_fingerprint): all of it; of streamed data, the
        training examples of its first FINGERPRINT_ROWS rows in the dataset's order, and the validation examples."""
        if not self.streamed:
            return self
        return TrainingData(self.train.head(FINGERPRINT_ROWS), self.validation, self.format, self.report)


def _open(source, name: str, option: str, config: str | None, split: str, streaming: bool, seed: int,
          fields: dict[str, str]) -> tuple[list[Row] | RowStream, str, OpenedDataset | None]:
    """The rows of `source` (a data file, a dataset directory, a Hub id, or a list of dicts) at `split`: a list, or
    a RowStream when streaming; with the label messages name it by and the opened dataset (None for a file)."""
    if is_dataset(source):
        opened = open_dataset(str(source), config, streaming, option)
        columns = opened.columns(split)
        if columns is not None:
            check_columns(f"{opened.label} ({split})", columns, fields)
        if streaming:
            return opened.stream(split, seed), f"{opened.label} ({split})", opened
        return opened.rows(split), str(source) if opened.single else f"{opened.label} ({split})", opened
    is_file = isinstance(source, (str, Path))
    label = str(source) if is_file else name
    one_split = (f"{label} is a single file" if is_file else f"{name} is given as a list of rows") + \
        ", which has no splits or configurations"
    if split != "train":
        raise ConfigError(f"--split {split}: {one_split}; --split picks a split of a dataset directory or Hub "
                          "dataset: leave it out")
    if config is not None:
        raise ConfigError(f"--data-config {config}: {one_split}; --data-config picks a configuration of a "
                          "dataset directory or Hub dataset: leave it out")
    if streaming and is_file:
        raise ConfigError(f"--streaming: {label} is a single file, which qlorakit reads whole (its errors name the "
                          "line); to stream it, put it in a directory of its own and pass the directory (datasets "
                          "reads that as a stream), or drop --streaming")
    if streaming:
        raise ConfigError(f"streaming=True: {name} is given as a list of rows, in memory already: drop streaming")
    if is_file:
        return read_rows(source, option), label, None
    rows = [Row(dict(record), f"{name} row {i}") for i, record in enumerate(source)]
    if not rows:
        raise DataError(f"{name}: no rows; a training set needs at least one example")
    return rows, name, None


# The formats read whole, never streamed (the data's kind, and why), for _no_streaming.
_READ_WHOLE = {
    "preference": ("preference pairs", "preference training reads the data whole: each pair's reference "
                   "log-probabilities are computed once, before the first step"),
    "prompt": ("prompts", "GRPO reads its prompts whole (they are few and short: a run's time goes to generating "
               "their answers)"),
}


def _no_streaming(label: str, fmt: str) -> ConfigError:
    kind, why = _READ_WHOLE[fmt]
    return ConfigError(f"{why}, and {label} holds {kind}; drop --streaming")


def _examples(rows: list[Row], label: str, format: str, fields: dict[str, str], skip_bad_rows: bool,
              report: TokenizeReport | None) -> tuple[list[Example], str]:
    """Examples from rows, with --field applied and the format detected from the first row unless named."""
    if format == "auto":
        format = detect_format(map_fields(rows[0], fields))
    elif format not in FORMATS:
        raise DataError(f"format={format!r} is not a data format; use auto or one of {', '.join(FORMATS)}")
    check_fields_used(label, fields, format)
    examples, first_skipped = [], None
    for row in rows:
        try:
            examples.append(to_example(map_fields(row, fields), format))
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


def read_examples(source, format: str = "auto", skip_bad_rows: bool = False, report: TokenizeReport | None = None,
                  name: str = "data", option: str = "--data", fields: dict[str, str] | None = None,
                  config: str | None = None, split: str = "train") -> tuple[list[Example], str]:
    """Examples from a data file, a dataset directory or Hub id (its `split`), or a list of dicts, with the format
    detected from the first row unless named. `option` is the flag that named the source, for messages; `fields`
    maps format fields to other columns ({"prompt": "question"})."""
    fields = dict(fields or {})
    check_field_map(fields)
    rows, label, _ = _open(source, name, option, config, split, False, 0, fields)
    return _examples(rows, label, format, fields, skip_bad_rows, report)


def read_data(
    source, format: str = "auto", skip_bad_rows: bool = False, validation: float = 0.0, validation_source=None,
    seed: int = 0, name: str = "data", *, config: str | None = None, split: str = "train",
    validation_split: str | None = None, fields: dict[str, str] | None = None, streaming: bool = False,
) -> ExampleData:
    """Read the training (and validation) examples, without tokenizing: everything a run can check before its model
    loads — a file's rows, a Hub dataset resolved and downloaded (or, streaming, opened and its first rows read),
    the split, the mapped columns, the format. Arguments as for `load_data`."""
    fields = dict(fields or {})
    check_field_map(fields)
    if not 0.0 <= validation < 1.0:
        raise DataError(f"validation={validation!r} must be a fraction in [0, 1)")
    if validation_split is not None and (validation or validation_source is not None):
        raise ConfigError("validation_split names the validation data, and so does "
                          f"{'validation' if validation else 'validation_data'}; use one of them")
    if streaming and format in _READ_WHOLE:  # before a dataset is opened
        raise _no_streaming(str(source), format)
    if streaming and validation:
        raise ConfigError(
            f"validation={validation:g} holds out a random fraction of the examples, which needs all of them read "
            "first; with --streaming name the validation data instead: --validation-split NAME (a split of the "
            "same dataset) or --validation-data FILE"
        )
    report = TokenizeReport()
    rows, label, opened = _open(source, name, "--data", config, split, streaming, seed, fields)
    if isinstance(rows, RowStream):
        head = rows.head(FINGERPRINT_ROWS)  # (read once: the fingerprint's rows too)
        if not head:
            raise DataError(f"{label}: the split holds no rows; a training set needs at least one example")
        first = head[0]
        fmt = detect_format(map_fields(first, fields)) if format == "auto" else format
        if fmt not in FORMATS:
            raise DataError(f"format={format!r} is not a data format; use auto or one of {', '.join(FORMATS)}")
        if fmt in _READ_WHOLE:
            raise _no_streaming(label, fmt)
        check_fields_used(label, fields, fmt)
        if not skip_bad_rows:  # the first rows' problems, before the model loads
            for row in head:
                to_example(map_fields(row, fields), fmt)
        train = ExampleStream(rows, fields, fmt, skip_bad_rows, report)
    else:
        train, fmt = _examples(rows, label, format, fields, skip_bad_rows, report)
    if validation_split is not None:
        if opened is None:
            raise ConfigError(
                f"--validation-split {validation_split}: {label} is not a dataset with splits; name validation "
                "data with --validation-data FILE, or hold out a fraction with --validation"
            )
        held_rows = opened.rows(validation_split, "--validation-split")  # read whole, even when streaming
        held, _ = _examples(held_rows, f"{opened.label} ({validation_split})", fmt, fields, skip_bad_rows, None)
    elif validation_source:
        held, _ = read_examples(validation_source, fmt, skip_bad_rows, None, f"{name} (validation)",
                                "--validation-data", fields)
    else:
        train, held = split_validation(train, validation, seed)
    return ExampleData(train, held, fmt, report, label, opened.origin if opened is not None else "")


def load_data(
    source, tokenizer, format: str = "auto", max_length: int = 1024, train_on: str = "assistant",
    on_long: str = "truncate", skip_bad_rows: bool = False, validation: float = 0.0, validation_source=None,
    seed: int = 0, name: str = "data", parse_special_tokens: bool = False, *, config: str | None = None,
    split: str = "train", validation_split: str | None = None, fields: dict[str, str] | None = None,
    streaming: bool = False, max_new_tokens: int = 0, context: int | None = None,
) -> TrainingData | PreferenceData | PromptData:
    """Read, convert, split and tokenize a data source: a file path, a dataset directory (saved by save_to_disk, or
    data files in a Hub dataset repository's layout), a Hub dataset id ("org/name" or "org/name@revision"), a list
    of dicts — or the ExampleData `read_data` read from one (then only the tokenizing arguments apply).

    `config` and `split` pick a dataset's configuration and split; `fields` reads format fields from other columns
    ({"messages": "conversations"}). `validation` holds out that fraction of the examples (seeded);
    `validation_source` is separate data instead, `validation_split` another split of the same dataset.
    `streaming` (a dataset directory or Hub id) reads the training split as it is needed: `train` is then a
    TokenStream. Bad rows raise a DataError naming where they are, or with `skip_bad_rows` are skipped and
    counted. Special-token strings in message content are text unless `parse_special_tokens` (data/tokenize.py).
    Preference data (format "preference") gives a PreferenceData of TokenizedPairs (data/preference.py); prompt
    data (format "prompt") a PromptData of TokenizedPrompts (data/prompts.py), each prompt within max_length -
    `max_new_tokens` (the room its generated answers take; used only for prompts, where it is required).
    """
    read = source if isinstance(source, ExampleData) else read_data(
        source, format, skip_bad_rows, validation, validation_source, seed, name, config=config, split=split,
        validation_split=validation_split, fields=fields, streaming=streaming)
    if read.format == "preference":
        return load_pairs(read, tokenizer, max_length, train_on, on_long, parse_special_tokens)
    if read.format == "prompt":
        if train_on != "assistant":
            raise ConfigError(f"train_on={train_on!r} does not apply to prompt data: GRPO trains on the answers it "
                              "generates, never on the prompt; leave it out (assistant)")
        return load_prompts(read, tokenizer, max_length, max_new_tokens, on_long, parse_special_tokens, context)
    report = read.report

    def tokenizer_for(counted: TokenizeReport):
        return example_tokenizer(tokenizer, max_length, train_on, on_long, counted, parse_special_tokens)

    if isinstance(read.train, ExampleStream):
        train = TokenStream(read.train, tokenizer_for, report, train_on)
    else:
        train = [item for item in map(tokenizer_for(report), read.train) if item is not None]
        check_trainable(train, report, read.label, train_on)
    val, _ = tokenize_examples(tokenizer, read.validation, max_length, train_on, "truncate", None,
                               parse_special_tokens)
    return TrainingData(train, val, read.format, report, read.origin)
