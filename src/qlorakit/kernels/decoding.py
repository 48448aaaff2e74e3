"""The arithmetic of a generation step (generation/decoder.py), no autograd: the RMSNorm, a bias column's value, and
attention of one query per row over a KV cache. Same formulas as the training kernels, fewer operations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_no_grad(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """normalize()'s Llama RMSNorm — normalized in fp32, rounded to x's dtype, times the weight — as torch's fused
    norm (which normalizes half-precision input in fp32) and one product: 2 operations instead of 7, the same bits
    (tests/test_kernels_rmsnorm.py)."""
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


def bias_column(width: int, base_bias: torch.Tensor | None, lora_bias: torch.Tensor | None, scale: float,
                like: torch.Tensor) -> torch.Tensor:
    """The one bias column of a product `[x, s·x·Aᵀ, 1]·[W0, B, bias]ᵀ`: the base bias plus s·b_B, summed in fp32,
    in `like`'s dtype and device."""
    total = torch.zeros(width, device=like.device)
    if base_bias is not None:
        total += base_bias.float()
    if lora_bias is not None:
        total += scale * lora_bias.float()
    return total.to(like.dtype)


def single_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v for one query per row: q [rows, heads, 1, d], keys/values [rows, kv_heads, t, d]
    in the cache's dtype, mask [rows, 1, 1, t] additive. The query heads sharing a key head (grouped-query
    attention) are that head's rows of one product, computed in the cache's dtype (fp32 on a CPU, as torch's flash
    kernel computes half-precision attention internally; 3-6x faster than it for a single query); the output in
    q's dtype."""
    rows, heads, _, d = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, d).to(keys.dtype)
    scores = (grouped @ keys.transpose(-1, -2)) * scale + mask
    out = torch.softmax(scores, dim=-1) @ values
    return out.reshape(rows, heads, 1, d).to(q.dtype)
