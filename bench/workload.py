"""The benchmark's workload, shared by every worker: chats of mixed lengths and a held-out loss both sides compute
the same way."""

from __future__ import annotations

import random

import torch

from qlorakit.demo import make_examples


def mixed_length_chats(n: int, seed: int = 0, max_turns: int = 12) -> list[dict]:
    """`n` multi-turn chats of the built-in extraction task, 1 to `max_turns` exchanges each (about 70 to 550
    tokens with SmolLM2's template), so batches mix short and long rows as real chat data does."""
    rng = random.Random(seed)
    pool = make_examples(n * max_turns, seed=seed)
    chats, cursor = [], 0
    for _ in range(n):
        turns = rng.randint(1, max_turns)
        messages = [m for ex in pool[cursor : cursor + turns] for m in ex["messages"]]
        cursor += turns
        chats.append({"messages": messages})
    return chats


@torch.no_grad()
def heldout_loss(model, tokenizer, chats: list[dict], dtype: torch.dtype, max_length: int = 512) -> float:
    """Mean next-token loss over every token of `chats` (each rendered with the chat template), in fp32."""
    model.eval()
    total, count = 0.0, 0
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat["messages"], tokenize=True, return_tensors="pt",
                                            return_dict=True)["input_ids"][:, :max_length]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=ids).logits
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def hf_stack_base(model: str, dtype: torch.dtype, device: str):
    """(model, tokenizer) as the HF stack loads a QLoRA base: transformers with bitsandbytes' NF4 + double quant,
    computing in `dtype` — the peer side of bench/run.py and bench/dpo.py."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlorakit.load import resolve_source

    source = resolve_source(model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    base = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, device_map={"": device},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype),
    )
    return base, tokenizer
