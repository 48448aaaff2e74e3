"""kernels/decoding.py, the arithmetic of a generation step: the no-grad RMSNorm gives normalize()'s bits; one-query
attention over a cache with per-row lengths gives sdpa's result; a bias column sums base and LoRA biases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlorakit.kernels import normalize
from qlorakit.kernels.decoding import bias_column, rms_norm_no_grad, single_query_attention
from qlorakit.precision import parse_dtype


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_rms_norm_no_grad_gives_normalize_bits(dtype):
    g = torch.Generator().manual_seed(0)
    dt = parse_dtype(dtype)
    for scale in (1e-3, 1.0, 30.0):
        x = (torch.randn(37, 576, generator=g) * scale).to(dt)
        weight = torch.randn(576, generator=g).to(dt)
        assert torch.equal(rms_norm_no_grad(x, weight, 1e-5), normalize(x, weight, 1e-5)[0])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_single_query_attention_equals_sdpa_over_each_rows_length(dtype):
    """Grouped-query attention of one query per row over the first p+1 cached positions (p per row), keys and
    values in fp32 as the CPU cache keeps them: sdpa's output, within fp32 summation order (bf16: one rounding)."""
    g = torch.Generator().manual_seed(1)
    dt = parse_dtype(dtype)
    rows, heads, kv_heads, length, d = 4, 9, 3, 20, 16
    q = torch.randn(rows, heads, 1, d, generator=g).to(dt)
    keys, values = (torch.randn(rows, kv_heads, length, d, generator=g).to(dt).float() for _ in range(2))
    positions = torch.tensor([0, 5, 19, 11])
    mask = torch.zeros(rows, 1, 1, length).masked_fill_(
        (torch.arange(length)[None] > positions[:, None])[:, None, None], float("-inf"))
    ours = single_query_attention(q, keys, values, mask, 0.25)
    assert ours.dtype == dt and ours.shape == q.shape
    for r, p in enumerate(positions.tolist()):
        expected = F.scaled_dot_product_attention(q[r:r + 1].float(), keys[r:r + 1, :, :p + 1],
                                                  values[r:r + 1, :, :p + 1], scale=0.25, enable_gqa=True)
        tolerance = 1e-6 if dtype == "fp32" else 8e-3
        assert torch.allclose(ours[r:r + 1].float(), expected, atol=tolerance, rtol=tolerance)


def test_bias_column_sums_in_fp32_and_rounds_once():
    like = torch.zeros(1, dtype=parse_dtype("bf16"))
    base, lora = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([1e-3, 0.0, 4e-3])
    column = bias_column(3, base, lora, 0.5, like)
    assert column.dtype == like.dtype
    assert torch.equal(column, (base + 0.5 * lora).to(like.dtype))
    assert torch.equal(bias_column(2, None, None, 1.0, like), torch.zeros(2, dtype=like.dtype))
