"""Attention over padding-free packed rows, one example at a time.

A packed row holds several examples end to end with position ids restarting at 0 for each. transformers' sdpa path
handles that with a block-diagonal mask over the whole row, so attention costs (sum of lengths)² — eight examples
of ~330 tokens cost as much as one of 2,600, about 8x the work that matters, and on a CPU that made attention half
of a training step. Here each example's block is its own causal attention call (is_causal, no mask), so the cost
is the sum of the squares. The blocks are read from the mask transformers built (block_diagonal_segments; the
attention function in qlorakit/fast_path.py decides when), so the result is sdpa's by construction; anything else — padding (at any batch size), generation with a KV cache, sliding windows,
soft-capped logits — goes to transformers' sdpa function unchanged.

On the CPU all segments go through one autograd function that runs torch's flash kernel in the dtype the
precision policy gives it (precision.attention_kernel_dtype: fp32 on CPUs without AMX tiles, where it is both
faster and 3-5x closer to fp64 in the key/value gradients) on the compute-dtype q/k/v, rounding each result once.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..upstream.torch_private import flash_attention_cpu, version_counter

# Every layer of one forward gets the same mask tensor: its blocks are read once (one device sync per forward, not
# per layer). Keyed on the tensor itself through a weak reference, and its version counter, so a later mask — even
# one allocated where a freed one was — or an in-place edit is never taken for the cached one.
_last_mask: tuple | None = None


def block_diagonal_segments(mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """The (start, end) blocks of a [1, 1, length, length] boolean attention mask (True: attend) that is
    block-diagonal causal, else None."""
    global _last_mask
    cached = _last_mask
    if cached is not None and cached[0]() is mask and cached[1] == version_counter(mask):
        return cached[2]
    segments = _read_blocks(mask[0, 0])
    _last_mask = (weakref.ref(mask), version_counter(mask), segments)
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


def _kernel_inputs(query, key, value, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One segment's q, k, v for the flash kernel: in `dtype`, kv heads repeated to the query heads."""
    heads = query.shape[1]
    return (query[:, :, start:end].to(dtype), _repeat_heads(key[:, :, start:end], heads, dtype),
            _repeat_heads(value[:, :, start:end], heads, dtype))


class PackedCausalAttention(torch.autograd.Function):
    """Causal attention within each (start, end) segment of one packed row, on the CPU: q [1, heads, length, dim],
    k and v [1, kv_heads, length, dim]; returns [1, length, heads, dim] in q's dtype, as transformers' attention
    functions do. `kernel` is the dtype the flash kernel runs in (the precision policy's attention_kernel_dtype).
    Saved for the backward: q, k, v and the output in their own dtype and each segment's fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value, segments, scale, kernel):
        heads = query.shape[1]
        flash, _ = flash_attention_cpu()
        out = query.new_empty(query.shape[0], query.shape[2], heads, query.shape[3])
        lses = []
        for start, end in segments:
            o, lse = flash(*_kernel_inputs(query, key, value, start, end, kernel), 0.0, True, scale=scale)
            out[:, start:end] = o.transpose(1, 2)
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.segments, ctx.scale, ctx.kernel = segments, scale, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *lses = ctx.saved_tensors
        heads, kv_heads, kernel = query.shape[1], key.shape[1], ctx.kernel
        _, flash_backward = flash_attention_cpu()
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        for (start, end), lse in zip(ctx.segments, lses):
            q, k, v = _kernel_inputs(query, key, value, start, end, kernel)
            dq, dk, dv = flash_backward(grad_out[:, start:end].transpose(1, 2).to(kernel), q, k, v,
                                        out[:, start:end].transpose(1, 2).to(kernel), lse, 0.0, True, scale=ctx.scale)
            b, _, n, d = dk.shape  # key/value gradients: summed over the query heads sharing each kv head
            grad_q[:, :, start:end] = dq
            grad_k[:, :, start:end] = dk.view(b, kv_heads, heads // kv_heads, n, d).sum(2)
            grad_v[:, :, start:end] = dv.view(b, kv_heads, heads // kv_heads, n, d).sum(2)
        return grad_q, grad_k, grad_v, None, None, None


def packed_causal_attention(query, key, value, segments: list[tuple[int, int]], scale: float, kernel: torch.dtype,
                            dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each (start, end) segment of one packed row (shapes as PackedCausalAttention):
    torch's CPU flash kernel through PackedCausalAttention, or scaled_dot_product_attention per segment elsewhere
    (and with dropout). Returns [1, length, heads, dim]."""
    if query.device.type == "cpu" and dropout == 0:
        return PackedCausalAttention.apply(query, key, value, segments, scale, kernel)
    gqa = key.shape[1] != query.shape[1]
    out = torch.cat([
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                       is_causal=True, scale=scale, enable_gqa=gqa)
        for s, e in segments
    ], dim=2)
    return out.transpose(1, 2).contiguous()
