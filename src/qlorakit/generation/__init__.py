"""Generation: answers of a (quantized, adapted) model to chat or plain-text prompts, for eval, chat and rollouts."""

from __future__ import annotations

import torch

from ..data import pad_id_of
from ..errors import ConfigError, show
from ..precision import precision_of
from .prompts import check_context, context_length, encode_prompts, stop_ids

__all__ = ["check_context", "context_length", "encode_prompts", "generate", "stop_ids"]


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
                    pad_token_id=pad_id, eos_token_id=stop_ids(tokenizer),
                )
            for row in out[:, width:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers
