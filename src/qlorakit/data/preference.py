"""Preference pairs: a prompt with a chosen and a rejected answer -> two token sequences -> micro-batches in which
both go through one forward.

    data = load_data("prefs.jsonl", tokenizer, max_length=1024)   # format "preference": a PreferenceData
    batch = collate_pairs(data.train[:4], pad_id, packed=True)      # chosen_0, rejected_0, chosen_1, ... in one row

Rows are read as any data is (read_data: files, dataset directories, Hub ids, --field, splits, validation, bad
rows); formats.py makes each a PreferenceExample, two ordinary examples with the same prompt whose trained part is
the answer. Each of the two sequences (prompt + answer) is tokenized exactly as an SFT example with
train_on="assistant" (a text answer and the EOS after it; a chat's answer turns and their end-of-turn tokens) and
fitted to max_length on its own: truncation keeps its start, --on-long drop or error act on the pair, and a pair
one of whose answers lies wholly beyond the limit is dropped and counted — a pair scores both answers or nothing.

A batch of pairs has the layouts of SFT batches (data/batches.py), the sequences in the order chosen_0,
rejected_0, chosen_1, ...: packed, end to end in one row with position ids restarting at 0 for each (the
block-diagonal mask), or right-padded, a row each. `Batch.sequences` says which sequence each token is in, so the
preference objective (qlorakit/preference.py) sums each answer's log-probabilities out of one forward.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from ..precision import LOSS_DTYPE
from .batches import Batch, MicroBatchStream, collate_sequences
from .formats import PreferenceExample
from .tokenize import TokenizeReport, Tokenized, check_settings, special_token_pattern, tokenize_example

__all__ = ["PairSequences", "PreferenceData", "PreferenceExample", "TokenizedPair", "check_pairs", "collate_pairs",
           "load_pairs", "pair_tokenizer", "tokenize_pairs"]

UNIT = "pairs"  # what a TokenizeReport of preference data counts


@dataclass
class TokenizedPair:
    where: str
    chosen: Tokenized
    rejected: Tokenized
    # The reference model's log-probabilities of the two answers (chosen, rejected): set by the run before training
    # (preference.PreferenceObjective.prepare), None until then and for reference-free losses.
    reference: tuple[float, float] | None = None

    @property
    def trained_tokens(self) -> int:
        """The two answers' trained tokens."""
        return self.chosen.trained_tokens + self.rejected.trained_tokens

    @property
    def tokens(self) -> int:
        """The two sequences' lengths, together."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def pair_tokenizer(tokenizer, max_length: int, on_long: str = "truncate", report: TokenizeReport | None = None,
                   parse_special_tokens: bool = False):
    """A function from one PreferenceExample to its TokenizedPair (or None when dropped), each sequence fitted to
    `max_length`, counting pairs and both sequences' tokens into `report` (example_tokenizer's, for pairs; the
    answers always train, the prompt never)."""
    check_settings(tokenizer, max_length, "assistant", on_long)
    report = report if report is not None else TokenizeReport()
    report.unit = UNIT
    specials = None if parse_special_tokens else special_token_pattern(tokenizer)

    def fit(pair: PreferenceExample) -> TokenizedPair | None:
        sides, truncated = [], False
        for name, example in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            item = tokenize_example(tokenizer, example, "assistant", parse_special_tokens, specials)
            if len(item.input_ids) > max_length:
                if on_long == "error":
                    raise DataError(
                        f"{pair.where}: the {name} sequence (the prompt and the {name} answer) is "
                        f"{len(item.input_ids)} tokens, longer than max_length {max_length}; raise --max-length, or "
                        "let qlorakit truncate (--on-long truncate) or drop (--on-long drop) such pairs"
                    )
                if on_long == "drop":
                    report.dropped_long += 1
                    return None
                item, truncated = Tokenized(item.input_ids[:max_length], item.labels[:max_length], item.where), True
            elif item.trained_tokens == 0:  # not the limit's doing: nothing of the answer trains
                raise DataError(
                    f"{pair.where}: the {name} answer has no token to score (the chat template renders no text for "
                    "its assistant turns, or the answer tokenizes to nothing); fix the data or the chat template"
                )
            sides.append(item)
        same = sides[0].input_ids == sides[1].input_ids and sides[0].labels == sides[1].labels
        if same and not truncated:  # answers that differ as text but not as tokens ("w6 " and "w6")
            raise DataError(
                f"{pair.where}: the chosen and rejected answers differ as text but tokenize to the same tokens "
                "(they differ only in spaces the tokenizer drops, or in characters it reads alike), so the pair "
                "has nothing to compare; fix the row, or leave it out"
            )
        report.truncated += truncated
        if same or any(side.trained_tokens == 0 for side in sides):
            # an answer lay wholly beyond max_length, or the answers differ only beyond it: nothing to compare
            report.dropped_long += 1
            return None
        item = TokenizedPair(pair.where, *sides)
        report.examples += 1
        report.tokens += item.tokens
        report.trained_tokens += item.trained_tokens
        return item

    return fit


def tokenize_pairs(tokenizer, pairs: list[PreferenceExample], max_length: int, on_long: str = "truncate",
                   report: TokenizeReport | None = None, parse_special_tokens: bool = False
                   ) -> tuple[list[TokenizedPair], TokenizeReport]:
    report = report if report is not None else TokenizeReport(unit=UNIT)
    fit = pair_tokenizer(tokenizer, max_length, on_long, report, parse_special_tokens)
    return [item for item in map(fit, pairs) if item is not None], report


def check_pairs(items: list[TokenizedPair], report: TokenizeReport, source: str) -> None:
    """Training data that kept no pair is an error that says why (check_trainable, for pairs)."""
    if items:
        return
    if report.dropped_long:
        cause = (f"all {report.dropped_long} pairs were longer than max_length with an answer beyond it; raise "
                 "--max-length")
    else:
        cause = "no pair is left for training (a validation fraction took them all?); add pairs"
    raise DataError(f"{source}: nothing to train on — {cause}")


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, packed: bool = True) -> Batch:
    """A batch of pairs: their sequences chosen_0, rejected_0, chosen_1, ... in collate's layout (packed: one row,
    positions restarting per sequence; else a right-padded row each), with each token's sequence (2i, 2i+1; -1 for
    padding), the number of pairs, and the reference log-probabilities in the same order when every pair has
    them."""
    batch = collate_sequences([side for pair in pairs for side in (pair.chosen, pair.rejected)], pad_id, packed)
    reference = None
    if pairs and all(pair.reference is not None for pair in pairs):
        reference = torch.tensor([value for pair in pairs for value in pair.reference], dtype=LOSS_DTYPE)
    return dataclasses.replace(batch, pairs=len(pairs), reference=reference)


@dataclass
class PairSequences:
    """The sequences of pairs as a list of Tokenized each (each pair's chosen, then its rejected): what
    checkpoint.data_fingerprint reads."""

    train: list[Tokenized]
    validation: list[Tokenized]


def _sequences(pairs: list[TokenizedPair]) -> list[Tokenized]:
    return [side for pair in pairs for side in (pair.chosen, pair.rejected)]


@dataclass
class PreferenceData:
    """Tokenized preference pairs: TrainingData's interface for a run (train, validation, format, report, origin,
    describe, micro_batches_per_epoch, batches, fingerprinted), over TokenizedPairs. Always read whole."""

    train: list[TokenizedPair]
    validation: list[TokenizedPair]
    format: str
    report: TokenizeReport
    origin: str = ""

    streamed = False  # (a class constant: preference data is never streamed)

    def describe(self) -> str:
        return self.report.describe() + (f" ({self.origin})" if self.origin else "")

    def micro_batches_per_epoch(self, batch_size: int) -> int:
        """`batch_size` pairs a micro-batch (of a global micro-batch, on several processes)."""
        return math.ceil(len(self.train) / batch_size)

    def batches(self, batch_size: int, seed: int, pad_id: int, packed: bool, position: dict,
                grad_accum: int = 1, rank: int = 0, world: int = 1) -> MicroBatchStream:
        """The run's micro-batches of `batch_size` pairs from `position`, as TrainingData.batches (the same order,
        positions and ranks' shares), collated by collate_pairs."""
        return MicroBatchStream(self.train, batch_size, seed, pad_id, packed, position, rank, world, collate_pairs)

    def fingerprinted(self) -> PairSequences:
        """What a checkpoint's fingerprint covers: every pair's two sequences, in order."""
        return PairSequences(_sequences(self.train), _sequences(self.validation))


def load_pairs(read, tokenizer, max_length: int = 1024, train_on: str = "assistant", on_long: str = "truncate",
               parse_special_tokens: bool = False) -> PreferenceData:
    """Tokenize the preference pairs `read_data` read (an ExampleData of format "preference"): load_data's part for
    preference data. Validation pairs are truncated, never refused."""
    if train_on != "assistant":
        raise ConfigError(f"train_on={train_on!r} does not apply to preference data: the answers are scored, never "
                          "the prompt; leave it out (assistant)")
    if not isinstance(read.train, list):
        raise ConfigError("preference training reads the data whole: each pair's reference log-probabilities are "
                          "computed once, before the first step; drop --streaming")
    report = read.report
    train, _ = tokenize_pairs(tokenizer, read.train, max_length, on_long, report, parse_special_tokens)
    check_pairs(train, report, read.label)
    validation, _ = tokenize_pairs(tokenizer, read.validation, max_length, "truncate", None, parse_special_tokens)
    return PreferenceData(train, validation, read.format, report, read.origin)
