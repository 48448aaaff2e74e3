"""Examples -> token ids + labels.

Conversations are rendered with the tokenizer's chat template (ChatML where it has none) and tokenized once, as the
model will see them. Which tokens train is derived from the template's own rendering of each turn: the assistant
turn i occupies the characters between render(turns[:i], add_generation_prompt=True) and render(turns[:i+1]) of
the whole rendering, so the mask holds for any template that renders conversations incrementally (each prefix of
the turns renders to a prefix of the text) — ChatML, Llama 3, Gemma, Mistral and the like. A template that does not
(one that rewrites earlier turns) is an error naming the example, never a silently wrong mask. Tokens that overlap
a trained span train; the first token of every example never does (nothing predicts it, and in a packed row that
keeps one example's last token from being trained to predict the next example's first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError, DataError
from .formats import Example

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all")
ON_LONG = ("truncate", "drop", "error")

# ChatML, for tokenizers that come without a template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    where: str

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class TokenizeReport:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_long: int = 0  # on_long="drop", or nothing left to train after truncation
    skipped_rows: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{self.examples} examples", f"{self.tokens} tokens ({self.trained_tokens} trained)"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.dropped_long:
            parts.append(f"{self.dropped_long} dropped as too long")
        if self.skipped_rows:
            parts.append(f"{len(self.skipped_rows)} bad rows skipped")
        return ", ".join(parts)


def chat_template(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template(tokenizer)
    )


def _chat_text_and_spans(tokenizer, example: Example) -> tuple[str, list[tuple[int, int]]]:
    messages = example.messages
    full = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < example.first_trained_turn:
            continue
        start = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = render_chat(tokenizer, messages[: i + 1])
        if not (full.startswith(end) and end.startswith(start)):
            raise DataError(
                f"{example.where}: the chat template does not render this conversation turn by turn (the rendering "
                f"of its first {i + 1} turns is not a prefix of the whole), so the assistant tokens cannot be told "
                "from the template's own output. Train on every token with --train-on all, or give the tokenizer "
                "a template that renders incrementally."
            )
        spans.append((len(start), len(end)))
    return full, spans


def tokenize_example(tokenizer, example: Example, train_on: str = "assistant") -> Tokenized:
    """Token ids and labels (IGNORE_INDEX where nothing trains) of one example, untruncated."""
    if example.messages is not None:
        text, spans = _chat_text_and_spans(tokenizer, example)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    else:
        text = example.prompt + example.completion
        spans = [(len(example.prompt), len(text))]
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        if tokenizer.eos_token_id is not None:  # so the model learns where a completion ends
            ids.append(tokenizer.eos_token_id)
            offsets.append((len(text), len(text) + 1))
            spans = [(spans[0][0], len(text) + 1)]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [
            token if any(end > s and start < e for s, e in spans) and end > start else IGNORE_INDEX
            for token, (start, end) in zip(ids, offsets)
        ]
    if labels:
        labels[0] = IGNORE_INDEX
    return Tokenized(ids, labels, example.where)


def tokenize_examples(
    tokenizer, examples: list[Example], max_length: int, train_on: str = "assistant", on_long: str = "truncate",
    report: TokenizeReport | None = None,
) -> tuple[list[Tokenized], TokenizeReport]:
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on={train_on!r}: use 'assistant' (answers only) or 'all' (every token)")
    if on_long not in ON_LONG:
        raise ConfigError(f"on_long={on_long!r}: use one of {', '.join(ON_LONG)}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length={max_length!r} must be an integer of at least 2 tokens")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "the tokenizer is a slow (Python) tokenizer; qlorakit needs a fast one (tokenizer.json) to map the "
            "chat template's text to tokens"
        )
    report = report or TokenizeReport()
    out = []
    for example in examples:
        item = tokenize_example(tokenizer, example, train_on)
        if len(item.input_ids) > max_length:
            if on_long == "error":
                raise DataError(
                    f"{example.where}: the example is {len(item.input_ids)} tokens, longer than max_length "
                    f"{max_length}; raise --max-length, or let qlorakit truncate (--on-long truncate) or drop "
                    "(--on-long drop) such examples"
                )
            if on_long == "drop":
                report.dropped_long += 1
                continue
            item = Tokenized(item.input_ids[:max_length], item.labels[:max_length], item.where)
            report.truncated += 1
            if train_on == "assistant" and item.trained_tokens == 0:
                report.dropped_long += 1  # its answer lay wholly beyond max_length
                continue
        out.append(item)
        report.examples += 1
        report.tokens += len(item.input_ids)
        report.trained_tokens += item.trained_tokens
    return out, report


def check_trainable(items: list[Tokenized], report: TokenizeReport, source: str, train_on: str) -> None:
    """A dataset with nothing to train on is an error that says why — never a silent zero-loss run."""
    if report.trained_tokens > 0:
        return
    if report.dropped_long and not items:
        cause = (f"all {report.dropped_long} examples were longer than max_length with their answers beyond it; "
                 "raise --max-length")
    elif train_on == "assistant":
        cause = ("every label is masked: no example has assistant or completion tokens (empty answers, or a chat "
                 "template that renders no text for assistant turns); fix the data or the template, or train on "
                 "every token with --train-on all")
    else:
        cause = "every example is a single token"
    raise DataError(f"{source}: nothing to train on — {cause}")
