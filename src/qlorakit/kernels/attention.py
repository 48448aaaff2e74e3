"""Attention over padding-free packed rows, one example at a time.

A packed row holds several examples end to end with position ids restarting at 0 for each. transformers' sdpa path
handles that with a block-diagonal mask over the whole row, so attention costs (sum of lengths)² — eight examples
of ~330 tokens cost as much as one of 2,600, about 8x the work that matters, and on a CPU that made attention half
of a training step. Here each example's block is its own causal attention call (is_causal, no mask), so the cost
is the sum of the squares. Anything else — padded batches, generation with a KV cache, sliding windows, soft-capped
logits — goes to transformers' sdpa function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "qlorakit_packed"


def _segments(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[tuple[int, int]] | None:
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    positions = position_ids.reshape(-1)
    if positions.numel() != query.shape[2]:
        return None
    starts = torch.nonzero(positions == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    ends = starts[1:] + [positions.numel()]
    return list(zip(starts, ends))


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers attention-interface function: per-example causal attention for packed rows, sdpa otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = None
    if getattr(module, "sliding_window", None) is None and kwargs.get("softcap") is None:
        segments = _segments(kwargs.get("position_ids"), query, key)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    out = torch.cat([
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in segments
    ], dim=2)
    return out.transpose(1, 2).contiguous(), None


def install_packed_attention(model) -> bool:
    """Switch a transformers model that uses sdpa attention to `packed_attention_forward`; True if switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # masks for the cases handed to sdpa
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    base.set_attn_implementation(NAME)
    return base.config._attn_implementation == NAME
