"""Examples -> token ids + labels.

Conversations are rendered with the tokenizer's chat template (ChatML where it has none) and tokenized once, as the
model will see them. Which tokens train is derived from the template's own rendering of each turn: the assistant
turn i occupies the characters between render(turns[:i], add_generation_prompt=True) and render(turns[:i+1]) of
the whole rendering, so the mask holds for any template that renders conversations incrementally (each prefix of
the turns renders to a prefix of the text) — ChatML, Llama 3, Gemma, Mistral and the like. A template that does not
(one that rewrites earlier turns) is an error naming the example, never a silently wrong mask. Tokens that overlap
a trained span train; the first token of every example never does (nothing predicts it, and in a packed row that
keeps one example's last token from being trained to predict the next example's first).

Where the template puts a message's content is found the same way, from the template's own output: the conversation
is rendered once more with that content replaced by a marker. A conversation that opens with an assistant turn has
no generation prompt to render before it (an empty conversation), so that turn trains from where its content is
put: never the BOS, role header or default system prompt a template injects before it.

Message content is text. A special token's string inside it ("<|im_end|>" in a user message) is tokenized as text,
not as the control token, so data cannot forge a turn; the template's own control tokens are parsed as usual.
`parse_special_tokens=True` parses them in content too. Content without such strings (nearly all data) is tokenized
in one piece with the template text, exactly as `tokenizer(rendered_text)` would. `encode_chat` does this for
training data and for generation (chat, eval) alike, so a model is prompted with the token ids it was trained on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..choices import ON_LONG, TRAIN_ON  # re-exported: their home is torch-free, for TrainConfig and the CLI
from ..errors import ConfigError, DataError
from .formats import Example

IGNORE_INDEX = -100

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
    """What tokenizing kept and dropped. Preference data counts pairs (`unit` "pairs") and both answers' tokens."""

    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_long: int = 0  # on_long="drop", or nothing left to train after truncation
    skipped_rows: list[str] = field(default_factory=list)
    unit: str = "examples"  # what `examples` counts

    def describe(self) -> str:
        parts = [f"{self.examples} {self.unit}", f"{self.tokens} tokens ({self.trained_tokens} trained)"]
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


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the tokenizer's special tokens' strings (longest first), or None if it has none."""
    strings = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    strings |= set(tokenizer.all_special_tokens)
    strings = sorted((s for s in strings if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def _marker(text: str) -> str:
    """A string that does not occur in `text`, to stand in for a message's content."""
    marker, n = "QLORAKITCONTENTMARKER", 0
    while marker in text:
        n += 1
        marker = f"QLORAKITCONTENTMARKER{n}Q"
    return marker


def _content_spans(tokenizer, messages: list[dict], k: int, text: str, add_generation_prompt: bool, where: str,
                   found: str) -> list[tuple[int, int]]:
    """Where the template renders message k's content in `text` (its rendering of `messages`): rendered again with
    the content replaced by a marker, the marker's places are the content's. Several places if the template shows
    the content more than once; none if it leaves it out."""
    marker = _marker(text)
    probe = render_chat(tokenizer, [*messages[:k], {**messages[k], "content": marker}, *messages[k + 1:]],
                        add_generation_prompt)
    parts = probe.split(marker)
    content = messages[k]["content"]
    if len(parts) == 1 and probe == text:
        return []
    for shown in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):  # `| trim` etc.
        if shown.join(parts) == text:
            spans, at = [], 0
            for part in parts[:-1]:
                at += len(part)
                spans.append((at, at + len(shown)))
                at += len(shown)
            return spans
    raise DataError(
        f"{where}: messages[{k}] ({messages[k]['role']}) contains the special token string {found!r}, and the chat "
        "template changes that message's text as it renders it, so qlorakit cannot find the string to keep it as "
        "plain text; remove it from the data, or parse it as the control token it names with "
        "--parse-special-tokens (parse_special_tokens=True)"
    )


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                parse_special_tokens: bool = False, where: str = "conversation",
                specials: re.Pattern | None = None) -> tuple[str, list[int], list[tuple[int, int]]]:
    """(rendered text, token ids, character offsets of each token) of a conversation in the tokenizer's chat
    template — for training data and for generation prompts alike. Special-token strings inside message content
    are tokenized as text unless `parse_special_tokens` (the template's own control tokens always parse).
    `specials`: special_token_pattern(tokenizer), when the caller encodes many conversations."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    as_text = []  # content spans that hold special-token strings
    if not parse_special_tokens:
        if specials is None:
            specials = special_token_pattern(tokenizer)
        for k, message in enumerate(messages):
            content = message.get("content")
            found = specials.search(content) if specials and isinstance(content, str) else None
            if found:
                as_text += _content_spans(tokenizer, messages, k, text, add_generation_prompt, where, found.group())
    if not as_text:  # the common case: one call, exactly as the template's text tokenizes
        return text, *_encode(tokenizer, text, add_special_tokens=False)
    ids, offsets, cursor = [], [], 0
    for start, end in sorted(as_text) + [(len(text), len(text))]:
        start = max(start, cursor)
        for lo, hi, split in ((cursor, start, False), (start, end, True)):
            if hi > lo:
                piece_ids, piece_offsets = _encode(tokenizer, text[lo:hi], False, split_special_tokens=split)
                ids += piece_ids
                offsets += [(a + lo, b + lo) for a, b in piece_offsets]
        cursor = max(cursor, end)
    return text, ids, offsets


def encode_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, offsets) of plain text (a `text` row, a prompt + completion, a plain generation prompt): the
    tokenizer's own special tokens (BOS) added, written special tokens parsed — the user wrote the model's input."""
    return _encode(tokenizer, text, add_special_tokens=True)


def _encode(tokenizer, text: str, add_special_tokens: bool, **kwargs) -> tuple[list[int], list[tuple[int, int]]]:
    # Offsets need a fast tokenizer; training insists on one, generation (which needs no offsets) does not.
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=fast, **kwargs)
    return list(encoded["input_ids"]), list(encoded["offset_mapping"]) if fast else []


def _assistant_spans(tokenizer, example: Example, full: str) -> list[tuple[int, int]]:
    """The character spans that train: each assistant turn's answer and what closes the turn."""
    messages = example.messages
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < example.first_trained_turn:
            continue
        end = render_chat(tokenizer, messages[: i + 1])
        start = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else None
        if not (full.startswith(end) and (start is None or end.startswith(start))):
            raise DataError(
                f"{example.where}: the chat template does not render this conversation turn by turn (the rendering "
                f"of its first {i + 1} turns is not a prefix of the whole), so the assistant tokens cannot be told "
                "from the template's own output. Train on every token with --train-on all, or give the tokenizer "
                "a template that renders incrementally."
            )
        spans.append((len(start) if start is not None else _first_answer_start(tokenizer, message, end), len(end)))
    return spans


def _first_answer_start(tokenizer, message: dict, end: str) -> int:
    """Where an assistant turn that opens the conversation begins its answer in `end`, its rendering. The model's
    answer to the other turns starts after the generation prompt; an empty conversation has none to render
    (transformers refuses it), and everything before this content is the template's (a BOS, a default system
    prompt it injects, the role header) — not the answer. So: where the template puts the content, found by
    rendering the turn with a marker for its content; a template that renders text before the content from the
    content itself (a reasoning block) starts it where the two renderings part."""
    marker = _marker(end)
    probe = render_chat(tokenizer, [{**message, "content": marker}])
    at = probe.rfind(marker)
    if at < 0:  # the template renders no content for the turn: none of it trains
        return len(end)
    return min(at, len(os.path.commonprefix([probe, end])))


def tokenize_example(tokenizer, example: Example, train_on: str = "assistant", parse_special_tokens: bool = False,
                     specials: re.Pattern | None = None) -> Tokenized:
    """Token ids and labels (IGNORE_INDEX where nothing trains) of one example, untruncated."""
    if example.messages is not None:
        text, ids, offsets = encode_chat(tokenizer, example.messages, False, parse_special_tokens, example.where,
                                         specials)
        spans = _assistant_spans(tokenizer, example, text) if train_on != "all" else []
    else:
        text = example.prompt + example.completion
        spans = [(len(example.prompt), len(text))]
        ids, offsets = encode_text(tokenizer, text)
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
    report: TokenizeReport | None = None, parse_special_tokens: bool = False,
) -> tuple[list[Tokenized], TokenizeReport]:
    report = report or TokenizeReport()
    fit = example_tokenizer(tokenizer, max_length, train_on, on_long, report, parse_special_tokens)
    return [item for item in map(fit, examples) if item is not None], report


def example_tokenizer(tokenizer, max_length: int, train_on: str = "assistant", on_long: str = "truncate",
                      report: TokenizeReport | None = None, parse_special_tokens: bool = False):
    """A function from one Example to its Tokenized item fitted to `max_length` (truncated, or None when dropped
    per `on_long`), counting into `report`: the settings are checked once, here, for a list or a stream."""
    check_settings(tokenizer, max_length, train_on, on_long)
    report = report if report is not None else TokenizeReport()
    specials = None if parse_special_tokens else special_token_pattern(tokenizer)

    def fit(example: Example) -> Tokenized | None:
        item = tokenize_example(tokenizer, example, train_on, parse_special_tokens, specials)
        if len(item.input_ids) > max_length:
            if on_long == "error":
                raise DataError(
                    f"{example.where}: the example is {len(item.input_ids)} tokens, longer than max_length "
                    f"{max_length}; raise --max-length, or let qlorakit truncate (--on-long truncate) or drop "
                    "(--on-long drop) such examples"
                )
            if on_long == "drop":
                report.dropped_long += 1
                return None
            item = Tokenized(item.input_ids[:max_length], item.labels[:max_length], item.where)
            report.truncated += 1
            if train_on == "assistant" and item.trained_tokens == 0:
                report.dropped_long += 1  # its answer lay wholly beyond max_length
                return None
        report.examples += 1
        report.tokens += len(item.input_ids)
        report.trained_tokens += item.trained_tokens
        return item

    return fit


def check_settings(tokenizer, max_length: int, train_on: str, on_long: str) -> None:
    """The tokenizing settings (example_tokenizer's, preference.pair_tokenizer's), checked before any example."""
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


def pad_id_of(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0 (masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
