"""GRPO's prompts: a prompt (and the row's other fields, for the rewards) -> its token ids -> micro-batches of
prompts, from which the run generates the answers it trains on.

    data = load_data("prompts.jsonl", tokenizer, max_length=1024, max_new_tokens=256)  # format "prompt": PromptData
    batch = collate_prompts(data.train[:4], pad_id, packed=True)                         # a PromptBatch of 4 prompts

Rows are read as any data is (read_data: files, dataset directories, Hub ids, --field, splits, validation, bad
rows); formats.py makes each a PromptExample. A prompt is tokenized exactly as generation tokenizes one
(generation.prompts.encode_prompts): a string as plain text with the tokenizer's BOS (encode_text), a list of
messages in the chat template with the generation prompt (encode_chat), so the model is trained on answers to the
very token ids it generated them from. A prompt and its answer must fit max_length together: a prompt longer than
max_length - max_new_tokens is dropped and counted (--on-long drop) or an error (--on-long error); it is never
truncated, which would cut its end — the instruction or question the answer is to follow.

A batch of prompts holds them as token lists (PromptBatch): the run generates each prompt's group of answers and
collates those itself. The order over epochs, a resume's position and the ranks' shares are MicroBatchStream's, as
for every other kind of data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..choices import ON_LONG
from ..errors import ConfigError, DataError
from .batches import MicroBatchStream
from .formats import PromptExample
from .tokenize import TokenizeReport, encode_chat, encode_text, special_token_pattern

__all__ = ["PromptBatch", "PromptData", "PromptExample", "TokenizedPrompt", "check_prompts", "collate_prompts",
           "encode_prompt", "load_prompts", "prompt_tokenizer"]

UNIT = "prompts"  # what a TokenizeReport of prompt data counts


@dataclass
class TokenizedPrompt:
    where: str
    input_ids: list[int]
    prompt: str | list[dict]  # as the row gave it (the messages checked): what a reward function is passed
    row: dict  # the row's other fields, for the rewards

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def encode_prompt(tokenizer, prompt: str | list[dict], parse_special_tokens: bool = False, where: str = "prompt",
                  specials: re.Pattern | None = None) -> list[int]:
    """The token ids of one checked prompt, as generation.prompts.encode_prompts gives them: plain text with the
    tokenizer's special tokens (encode_text), a conversation in the chat template with the generation prompt
    (encode_chat; special-token strings in its content are text unless `parse_special_tokens`)."""
    if isinstance(prompt, str):
        return encode_text(tokenizer, prompt)[0]
    return encode_chat(tokenizer, prompt, True, parse_special_tokens, where, specials)[1]


def check_lengths(max_length: int, max_new_tokens: int, on_long: str) -> None:
    """The settings, checked before any prompt (limit_words gives the longest prompt they leave room for)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r}: prompt data (rows with a 'prompt' alone, for GRPO) "
                          "needs the length of the answers generated from it, which must fit max_length with the "
                          "prompt; give max_new_tokens of at least 1 (--max-new-tokens)")
    if on_long == "truncate":
        raise ConfigError("on_long='truncate' does not apply to prompts: truncating a prompt cuts its end, the "
                          "instruction or question its answer is to follow; use drop (leave such prompts out, "
                          "counted) or error")
    if on_long not in ON_LONG:
        raise ConfigError(f"on_long={on_long!r}: for prompts use drop or error")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ConfigError(f"max_length={max_length!r} must be an integer of at least 2 tokens")
    if max_length - max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_length={max_length} "
                          "(a prompt and its answer must fit together); raise --max-length or lower "
                          "--max-new-tokens")


def limit_words(max_length: int, max_new_tokens: int, context: int | None) -> tuple[int, str, str]:
    """(the longest prompt, what sets that limit, what to do about it): max_length, or the model's context when it
    is shorter (raising --max-length cannot help then)."""
    if context is not None and context < max_length:
        return (context - max_new_tokens, f"the model's context of {context} tokens leaves beside max_new_tokens "
                f"{max_new_tokens}", "lower --max-new-tokens or shorten the prompts")
    return (max_length - max_new_tokens, f"max_length {max_length} leaves beside max_new_tokens {max_new_tokens}",
            "raise --max-length or lower --max-new-tokens")


def prompt_tokenizer(tokenizer, max_length: int, max_new_tokens: int, on_long: str = "drop",
                     report: TokenizeReport | None = None, parse_special_tokens: bool = False,
                     context: int | None = None):
    """A function from one PromptExample to its TokenizedPrompt (or None when dropped as too long), counting prompts
    and their tokens into `report` (nothing trains in a prompt: trained_tokens stays 0). `context`: the model's
    (max_position_embeddings), when it is shorter than max_length the limit."""
    check_lengths(max_length, max_new_tokens, on_long)
    limit, why, fix = limit_words(max_length, max_new_tokens, context)
    report = report if report is not None else TokenizeReport()
    report.unit = UNIT
    specials = None if parse_special_tokens else special_token_pattern(tokenizer)

    def fit(example: PromptExample) -> TokenizedPrompt | None:
        ids = encode_prompt(tokenizer, example.prompt, parse_special_tokens, example.where, specials)
        if not ids:  # (a tokenizer without BOS that reads the text as nothing): no prompt to generate from
            raise DataError(f"{example.where}: the prompt tokenizes to no tokens, so there is nothing to generate "
                            "an answer from; fix the row, or leave it out (--skip-bad-rows skips such rows)")
        if len(ids) > limit:
            if on_long == "error":
                raise DataError(
                    f"{example.where}: the prompt is {len(ids)} tokens, longer than the {limit} that {why} for its "
                    f"answer; {fix}, or leave such prompts out (--on-long drop)"
                )
            report.dropped_long += 1
            return None
        report.examples += 1
        report.tokens += len(ids)
        return TokenizedPrompt(example.where, ids, example.prompt, example.row)

    return fit


def check_prompts(items: list[TokenizedPrompt], report: TokenizeReport, source: str, max_length: int,
                  max_new_tokens: int, context: int | None = None) -> None:
    """Training prompts of which none was kept are an error that says why (check_pairs, for prompts)."""
    if items:
        return
    if report.dropped_long:
        limit, why, fix = limit_words(max_length, max_new_tokens, context)
        cause = f"all {report.dropped_long} prompts were longer than the {limit} tokens {why}; {fix}"
    else:
        cause = "no prompt is left for training (a validation fraction took them all?); add prompts"
    raise DataError(f"{source}: nothing to train on — {cause}")


@dataclass
class PromptBatch:
    """A micro-batch of prompts, as token lists: the run generates their answers and collates those itself."""

    items: list[TokenizedPrompt]
    placeholder = False  # (a rank's empty share is data.batches.placeholder, a Batch)

    @property
    def real_tokens(self) -> int:
        return sum(len(item.input_ids) for item in self.items)

    @property
    def trained_tokens(self) -> int:
        return 0  # the answers, generated later, are what trains


def collate_prompts(items: list[TokenizedPrompt], pad_id: int = 0, packed: bool = True) -> PromptBatch:
    """A batch of prompts (MicroBatchStream's collate_fn; `pad_id` and `packed` do not apply: generation pads)."""
    return PromptBatch(list(items))


@dataclass
class PromptData:
    """Tokenized prompts: TrainingData's interface for a run (train, validation, format, report, origin, describe,
    micro_batches_per_epoch, batches, fingerprinted), over TokenizedPrompts. Always read whole."""

    train: list[TokenizedPrompt]
    validation: list[TokenizedPrompt]
    format: str
    report: TokenizeReport
    origin: str = ""

    streamed = False  # (a class constant: prompt data is never streamed)

    def describe(self) -> str:
        """The report's, without its trained tokens (nothing in a prompt trains) or truncation (none is)."""
        report = self.report
        parts = [f"{report.examples} prompts", f"{report.tokens} tokens"]
        if report.dropped_long:
            parts.append(f"{report.dropped_long} dropped as too long")
        if report.skipped_rows:
            parts.append(f"{len(report.skipped_rows)} bad rows skipped")
        return ", ".join(parts) + (f" ({self.origin})" if self.origin else "")

    def micro_batches_per_epoch(self, batch_size: int) -> int:
        """`batch_size` prompts a micro-batch (of a global micro-batch, on several processes)."""
        return math.ceil(len(self.train) / batch_size)

    def batches(self, batch_size: int, seed: int, pad_id: int, packed: bool, position: dict,
                grad_accum: int = 1, rank: int = 0, world: int = 1) -> MicroBatchStream:
        """The run's micro-batches of `batch_size` prompts from `position`, as TrainingData.batches (the same
        order, positions and ranks' shares), collated by collate_prompts."""
        return MicroBatchStream(self.train, batch_size, seed, pad_id, packed, position, rank, world, collate_prompts)

    def fingerprinted(self) -> "PromptData":
        """What a checkpoint's fingerprint covers: every prompt's token ids and its row's other fields (a changed
        answer changes the rewards), in order."""
        return self


def load_prompts(read, tokenizer, max_length: int = 1024, max_new_tokens: int = 0, on_long: str = "drop",
                 parse_special_tokens: bool = False, context: int | None = None) -> PromptData:
    """Tokenize the prompts `read_data` read (an ExampleData of format "prompt"): load_data's part for prompt data.
    A prompt must leave room for max_new_tokens within max_length, and within the model's `context` when given
    (past it generation is refused). Validation prompts too long for the limit are dropped, never an error."""
    check_lengths(max_length, max_new_tokens, on_long)
    if not isinstance(read.train, list):
        raise ConfigError("GRPO reads its prompts whole (they are few and short: a run's time goes to generating "
                          "their answers); drop --streaming")
    report = read.report
    fit = prompt_tokenizer(tokenizer, max_length, max_new_tokens, on_long, report, parse_special_tokens, context)
    train = [item for item in map(fit, read.train) if item is not None]
    check_prompts(train, report, read.label, max_length, max_new_tokens, context)
    held = prompt_tokenizer(tokenizer, max_length, max_new_tokens, "drop", None, parse_special_tokens, context)
    validation = [item for item in map(held, read.validation) if item is not None]
    return PromptData(train, validation, read.format, report, read.origin)
