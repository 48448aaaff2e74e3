"""Evaluation: loss and perplexity on tokenized data, greedy answers to chat prompts, exact-match accuracy."""

from __future__ import annotations

import math

import torch

from .data import Example, Tokenized, collate, render_chat
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
        return example.messages[:last], example.messages[last]["content"]
    return example.prompt, example.completion


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy completions of chat prompts (lists of messages) or plain-text prompts, batched with left padding."""
    precision = precision_of(model)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts = [render_chat(tokenizer, p, add_generation_prompt=True) if isinstance(p, list) else p for p in prompts]
    answers = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=not isinstance(prompts[start], list)).to(device)
            with precision.autocast():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id_of(tokenizer),
                    eos_token_id=_stop_ids(tokenizer),
                )
            for row in out[:, enc["input_ids"].shape[1]:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int = 64) -> dict:
    """The share of examples whose greedy answer equals the reference answer (whitespace-trimmed)."""
    prompts, references = zip(*(prompt_and_reference(e) for e in examples))
    answers = generate(model, tokenizer, list(prompts), max_new_tokens)
    hits = [a.strip() == r.strip() for a, r in zip(answers, references)]
    return {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "total": len(hits),
            "samples": [{"answer": a, "reference": r} for a, r in list(zip(answers, references))[:3]]}
