"""Per-example attention over packed rows equals transformers' sdpa with its block-diagonal mask, and every other
case (padded batches, generation with a cache) is handed to sdpa unchanged."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from qlorakit.data import collate, load_data
from qlorakit.fast_path import ATTENTION as NAME
from conftest import randomize_lora_b, tiny_tokenizer


def _models(model_dir):
    """The same model and adapter twice: with qlorakit's packed attention, and with plain sdpa."""
    out = []
    for attention in (NAME, "sdpa"):
        torch.manual_seed(0)
        model, _ = qlorakit.load(model_dir, quant="none", dtype="fp32", device="cpu")
        model = qlorakit.add_lora(model, rank=4, alpha=8)
        if attention == "sdpa":
            model.get_base_model().set_attn_implementation("sdpa")
        randomize_lora_b(model, std=0.05)
        assert model.get_base_model().config._attn_implementation == attention
        out.append(model)
    return out


def test_packed_rows_match_the_block_diagonal_mask(tiny_model_dir):
    rows = [{"text": " ".join(f"w{(i * 11 + j) % 200 + 10}" for j in range(n))} for i, n in enumerate((12, 5, 20))]
    batch = collate(load_data(rows, tiny_tokenizer(), max_length=64).train, pad_id=0, packed=True)
    results = []
    for model in _models(tiny_model_dir):
        logits = model(**batch.model_inputs()).logits
        loss_sum, n = qlorakit.causal_lm_loss(logits, batch.labels)
        (loss_sum / n).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((logits.detach(), grads))
    (ours, our_grads), (sdpa, sdpa_grads) = results
    torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_grads, sdpa_grads, rtol=1e-4, atol=1e-6)


def test_padded_batches_and_generation_are_unchanged(tiny_model_dir):
    ours, sdpa = _models(tiny_model_dir)
    ids = torch.tensor([[1, 20, 21, 22, 23, 24], [0, 0, 1, 30, 31, 32]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   sdpa(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
        generated = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                pad_token_id=0) for m in (ours, sdpa)]
    assert torch.equal(generated[0], generated[1])


def _segment_reference(q, k, v, segments, scale, dtype):
    """Per-segment causal sdpa in `dtype`, kv heads repeated for grouped-query attention: [1, length, heads, dim]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scale) for s, e in segments], dim=2)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_attention_function_matches_fp64_segments(dtype):
    """Output and q/k/v gradients of the CPU packed function vs fp64 per-segment attention; grouped-query heads (9
    query heads on 3 kv heads, as SmolLM2). Tolerance: the output and gradients are rounded once to `dtype`, so they
    must be no further from fp64 than transformers' per-segment sdpa in `dtype` (plus a small margin), and in fp32
    within 1e-5."""
    from qlorakit.kernels.attention import PackedCausalAttention
    from qlorakit.precision import attention_kernel_dtype

    torch.manual_seed(0)
    lengths = (37, 130, 1, 64, 90)
    segments, start = [], 0
    for n in lengths:
        segments.append((start, start + n))
        start += n
    q = torch.randn(1, 9, start, 32).to(dtype).requires_grad_()
    k = torch.randn(1, 3, start, 32).to(dtype).requires_grad_()
    v = torch.randn(1, 3, start, 32).to(dtype).requires_grad_()
    grad = torch.randn(1, start, 9, 32).to(dtype)
    scale = 32 ** -0.5

    def run(fn, inputs):
        out = fn(*inputs)
        out.backward(grad.to(out.dtype))
        return [out.detach().double()] + [t.grad.double() for t in inputs]

    ours = run(lambda *t: PackedCausalAttention.apply(*t, segments, scale, attention_kernel_dtype(dtype)), (q, k, v))
    assert ours[0].shape == (1, start, 9, 32)
    exact = run(lambda *t: _segment_reference(*t, segments, scale, torch.float64),
                [t.detach().double().requires_grad_() for t in (q, k, v)])
    usual = run(lambda *t: _segment_reference(*t, segments, scale, dtype),
                [t.detach().clone().requires_grad_() for t in (q, k, v)])
    for name, o, u, e in zip(("output", "dq", "dk", "dv"), ours, usual, exact):
        scale_e = e.abs().max()
        ours_err, usual_err = float((o - e).abs().max() / scale_e), float((u - e).abs().max() / scale_e)
        if dtype == torch.float32:
            assert ours_err < 1e-5, (name, ours_err)
        else:
            assert ours_err <= 1.1 * usual_err + 1e-6, (name, ours_err, usual_err)
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == dtype
