"""Evaluation: loss and perplexity on tokenized data, greedy answers to chat prompts, exact-match accuracy."""

from __future__ import annotations

import math

import torch

from .data import Example, Tokenized, collate, encode_chat, encode_text, special_token_pattern
from .errors import ConfigError, DataError, show
from .precision import precision_of
from .loss import batch_loss


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


@torch.no_grad()
def eval_loss(model, items: list[Tokenized], pad_id: int, batch_size: int = 8, packed: bool = True) -> dict:
    """Mean loss per trained token over `items`, and its perplexity."""
    precision = precision_of(model)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(items), batch_size):
            batch = collate(items[start : start + batch_size], pad_id, packed).to(device)
            with precision.autocast():
                loss_sum, n = batch_loss(model, batch.model_inputs(), batch.labels)
            total += float(loss_sum)
            tokens += n
    finally:
        model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def prompt_and_reference(example: Example) -> tuple[list[dict] | str, str]:
    """What the model is asked (the turns before the last assistant turn, or the plain prompt) and the answer."""
    if example.messages is not None:
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        if last == 0:
            raise DataError(
                f"{example.where}: the conversation's only answer is its first turn, so there is no prompt to "
                "generate it from; exact match needs a turn before the answer (--no-exact-match: loss only)"
            )
        return example.messages[:last], example.messages[last]["content"]
    return example.prompt, example.completion


def context_length(model) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), or None if its config has none."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def encode_prompts(tokenizer, prompts: list, parse_special_tokens: bool = False,
                   names: list[str] | None = None) -> list[list[int]]:
    """Token ids of generation prompts, exactly as training tokenizes them: a chat prompt (a list of messages) in
    the chat template with the generation prompt appended (data.encode_chat), plain text with the tokenizer's
    BOS (data.encode_text)."""
    specials = None if parse_special_tokens else special_token_pattern(tokenizer)
    names = names or [f"prompt {i + 1}" for i in range(len(prompts))]
    if len(names) != len(prompts):  # zip would silently drop the prompts past the shorter list
        raise ConfigError(f"names: {len(names)} names for {len(prompts)} prompts; give one name per prompt (or none)")
    return [encode_chat(tokenizer, p, True, parse_special_tokens, name, specials)[1] if isinstance(p, list)
            else encode_text(tokenizer, p)[0] for p, name in zip(prompts, names, strict=True)]


def check_context(model, lengths: list[int], max_new_tokens: int, names: list[str] | None = None) -> None:
    """Refuse prompts that, with the answer, do not fit the model's context: past it a model generates garbage."""
    limit = context_length(model)
    if limit is None:
        return
    for i, n in enumerate(lengths):
        name = names[i] if names else f"prompt {i + 1}"
        if n >= limit:
            raise ConfigError(
                f"{name}: the prompt is {n} tokens, more than the model's context of "
                f"{limit} tokens (max_position_embeddings) can hold with an answer; shorten the prompt"
                + (" (in a chat, /reset clears the conversation)" if name == "chat" else "")
            )
        if n + max_new_tokens > limit:
            raise ConfigError(
                f"{name}: the prompt is {n} tokens and --max-new-tokens {max_new_tokens} more would make "
                f"{n + max_new_tokens}, past the model's context of {limit} tokens (max_position_embeddings); "
                f"lower --max-new-tokens to at most {limit - n}, or shorten the prompt"
            )


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 64, batch_size: int = 16,
             parse_special_tokens: bool = False, names: list[str] | None = None) -> list[str]:
    """Greedy completions of chat prompts (lists of messages) or plain-text prompts, batched with left padding.

    Prompts are tokenized as training tokenizes data (special-token strings in message content are text unless
    `parse_special_tokens`). A prompt that does not fit the model's context with `max_new_tokens` is refused;
    `names` name the prompts in that error ("--prompt", "eval.jsonl line 3")."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={show(max_new_tokens)}: generate at least 1 token")
    encoded = encode_prompts(tokenizer, prompts, parse_special_tokens, names)
    for i, ids in enumerate(encoded):
        if not ids:  # an empty plain-text prompt of a tokenizer without BOS: the model has nothing to go on
            raise ConfigError(f"{names[i] if names else f'prompt {i + 1}'}: the prompt is empty (0 tokens); "
                              "give the model something to answer")
    check_context(model, [len(ids) for ids in encoded], max_new_tokens, names)
    precision = precision_of(model)
    device = next(p.device for p in model.parameters())
    pad_id = pad_id_of(tokenizer)
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            with precision.autocast():
                out = model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=pad_id, eos_token_id=_stop_ids(tokenizer),
                )
            for row in out[:, width:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int = 64,
                parse_special_tokens: bool = False) -> dict:
    """The share of examples whose greedy answer equals the reference answer (whitespace-trimmed)."""
    prompts, references = zip(*(prompt_and_reference(e) for e in examples))
    answers = generate(model, tokenizer, list(prompts), max_new_tokens, parse_special_tokens=parse_special_tokens,
                       names=[e.where for e in examples])
    hits = [a.strip() == r.strip() for a, r in zip(answers, references)]
    return {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "total": len(hits),
            "samples": [{"answer": a, "reference": r} for a, r in list(zip(answers, references))[:3]]}
