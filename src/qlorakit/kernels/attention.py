"""Attention over padding-free packed rows, one example at a time.

A packed row holds several examples end to end with position ids restarting at 0 for each. transformers' sdpa path
handles that with a block-diagonal mask over the whole row, so attention costs (sum of lengths)² — eight examples
of ~330 tokens cost as much as one of 2,600, about 8x the work that matters, and on a CPU that made attention half
of a training step. Here each example's block is its own causal attention call (is_causal, no mask), so the cost
is the sum of the squares. The blocks are read from the mask transformers built (see _segments), so the result is
sdpa's by construction; anything else — padding (at any batch size), generation with a KV cache, sliding windows,
soft-capped logits — goes to transformers' sdpa function unchanged.

On the CPU all segments go through one autograd function that runs torch's flash kernel in fp32 on the
compute-dtype q/k/v and rounds each result once. On a CPU without AMX tiles (AVX-512/AVX2) the kernel's fp32 path
is faster than its bf16 one (the bf16 path converts blocks to fp32 anyway, and its backward is the slow part: a
mixed-length batch of SmolLM2's shapes, forward plus backward, 98 -> 88 ms per layer), and the key/value gradients
come out 3-5x closer to fp64 (they sum over the query heads that share them). With AMX the bf16 kernel is kept.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

NAME = "qlorakit_packed"


def _segments(module, query, key, attention_mask, kwargs) -> list[tuple[int, int]] | None:
    """The (start, end) blocks of causal attention that transformers' sdpa would compute for this call, when its mask
    is exactly block-diagonal causal over one row; None for anything else (padding, a cache, several rows, sliding
    windows, soft-capping, bidirectional attention), which sdpa handles. Derived from the mask, not from position ids:
    a left-padded row can have position ids that look like one example, and transformers builds the block-diagonal
    mask of a packed row only when nothing else is masked."""
    length = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != length:
        return None
    if getattr(module, "sliding_window", None) is not None or kwargs.get("softcap") is not None:
        return None
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        return None
    if attention_mask is None:  # transformers leaves the mask out when it is plain causal: sdpa's is_causal
        return [(0, length)]
    if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (1, 1, length, length):
        return None
    return _block_diagonal_segments(attention_mask)


# Every layer of one forward gets the same mask tensor: its blocks are read once (one device sync per forward, not
# per layer). Keyed on the tensor itself through a weak reference, and its version counter, so a later mask — even
# one allocated where a freed one was — or an in-place edit is never taken for the cached one.
_last_mask: tuple | None = None


def _block_diagonal_segments(mask: torch.Tensor) -> list[tuple[int, int]] | None:
    global _last_mask
    cached = _last_mask
    if cached is not None and cached[0]() is mask and cached[1] == mask._version:
        return cached[2]
    segments = _read_blocks(mask[0, 0])
    _last_mask = (weakref.ref(mask), mask._version, segments)
    return segments


def _read_blocks(m: torch.Tensor) -> list[tuple[int, int]] | None:
    """The blocks of a [length, length] boolean mask (True: attend) that is block-diagonal causal, else None. Such a
    mask is False just below its diagonal exactly where a block starts; the candidate blocks are then checked entry
    by entry (one comparison over the mask: ~5x less work than transformers spent building it)."""
    n = m.shape[-1]
    begins = torch.nonzero(torch.cat([m.new_ones(1), ~m.diagonal(-1)])).flatten().tolist()
    ends = begins[1:] + [n]
    longest = max(e - s for s, e in zip(begins, ends))
    causal = torch.ones(longest, longest, dtype=torch.bool, device=m.device).tril()
    expected = m.new_zeros(n, n)
    for s, e in zip(begins, ends):
        expected[s:e, s:e] = causal[: e - s, : e - s]
    return list(zip(begins, ends)) if torch.equal(m, expected) else None


def _repeat_heads(t: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, kv_heads, length, dim] -> [batch, heads, length, dim] in `dtype`, each kv head repeated for the query
    heads that share it (grouped-query attention); one pass."""
    b, kv, n, d = t.shape
    out = t.new_empty((b, heads, n, d), dtype=dtype)
    out.view(b, kv, heads // kv, n, d).copy_(t[:, :, None].expand(b, kv, heads // kv, n, d))
    return out


def _kernel_dtype(compute: torch.dtype) -> torch.dtype:
    return compute if torch.cpu._is_amx_tile_supported() else torch.float32


def _kernel_inputs(query, key, value, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One segment's q, k, v for the flash kernel: in `dtype`, kv heads repeated to the query heads."""
    heads = query.shape[1]
    return (query[:, :, start:end].to(dtype), _repeat_heads(key[:, :, start:end], heads, dtype),
            _repeat_heads(value[:, :, start:end], heads, dtype))


class _PackedCausalAttention(torch.autograd.Function):
    """Causal attention within each (start, end) segment of one packed row: q [1, heads, length, dim], k and v
    [1, kv_heads, length, dim]; returns [1, length, heads, dim] in q's dtype, as transformers' attention functions
    do. Saved for the backward: q, k, v and the output in their own dtype and each segment's fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value, segments, scale):
        heads, kernel = query.shape[1], _kernel_dtype(query.dtype)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out = query.new_empty(query.shape[0], query.shape[2], heads, query.shape[3])
        lses = []
        for start, end in segments:
            o, lse = flash(*_kernel_inputs(query, key, value, start, end, kernel), 0.0, True, scale=scale)
            out[:, start:end] = o.transpose(1, 2)
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.segments, ctx.scale = segments, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *lses = ctx.saved_tensors
        heads, kv_heads, kernel = query.shape[1], key.shape[1], _kernel_dtype(query.dtype)
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        for (start, end), lse in zip(ctx.segments, lses):
            q, k, v = _kernel_inputs(query, key, value, start, end, kernel)
            dq, dk, dv = flash_backward(grad_out[:, start:end].transpose(1, 2).to(kernel), q, k, v,
                                        out[:, start:end].transpose(1, 2).to(kernel), lse, 0.0, True, scale=ctx.scale)
            b, _, n, d = dk.shape  # key/value gradients: summed over the query heads sharing each kv head
            grad_q[:, :, start:end] = dq
            grad_k[:, :, start:end] = dk.view(b, kv_heads, heads // kv_heads, n, d).sum(2)
            grad_v[:, :, start:end] = dv.view(b, kv_heads, heads // kv_heads, n, d).sum(2)
        return grad_q, grad_k, grad_v, None, None


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers attention-interface function: per-example causal attention for packed rows, sdpa otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = _segments(module, query, key, attention_mask, kwargs)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.device.type == "cpu" and dropout == 0:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return _PackedCausalAttention.apply(query, key, value, segments, scale), None
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
