"""Generation prompts: token ids exactly as training tokenizes them, checked against the model's context; the
tokens that end an answer."""

from __future__ import annotations

from ..data import special_token_pattern
from ..data.prompts import encode_prompt
from ..data.formats import check_messages
from ..errors import ConfigError, show


def context_length(model) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), or None if its config has none."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def encode_prompts(tokenizer, prompts: list, parse_special_tokens: bool = False,
                   names: list[str] | None = None) -> list[list[int]]:
    """Token ids of generation prompts, exactly as training tokenizes them: a chat prompt (a list of messages) in
    the chat template with the generation prompt appended (data.encode_chat), plain text with the tokenizer's
    BOS (data.encode_text)."""
    if not isinstance(prompts, (list, tuple)):  # a string would be read as one prompt per character
        raise ConfigError(f"prompts: a {type(prompts).__name__}, not a list of prompts; pass a list (one prompt: "
                          "[prompt])")
    specials = None if parse_special_tokens else special_token_pattern(tokenizer)
    names = names or [f"prompt {i + 1}" for i in range(len(prompts))]
    if len(names) != len(prompts):  # zip would silently drop the prompts past the shorter list
        raise ConfigError(f"names: {len(names)} names for {len(prompts)} prompts; give one name per prompt (or none)")
    encoded = []
    for prompt, name in zip(prompts, names, strict=True):
        if isinstance(prompt, str):
            encoded.append(encode_prompt(tokenizer, prompt))
        elif isinstance(prompt, list) and prompt:
            messages = check_messages(prompt, name)
            encoded.append(encode_prompt(tokenizer, messages, parse_special_tokens, name, specials))
        else:
            raise ConfigError(f"{name}: a prompt is a string or a non-empty list of messages ({{'role': ..., "
                              f"'content': ...}}), not {show(prompt) if isinstance(prompt, list) else type(prompt).__name__}")
    return encoded


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


def stop_ids(tokenizer) -> list[int]:
    """The token ids that end an answer: EOS and the end-of-turn tokens of the common chat templates."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
