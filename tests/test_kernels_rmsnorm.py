"""The lean RMSNorm gives transformers' LlamaRMSNorm output and input gradient, and keeps half as much under bf16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import qlorakit
from qlorakit.kernels import rms_norm

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}  # bf16: the input gradient is rounded to bf16 on both sides


def _saved_bytes(fn, x):
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return out, sum(sizes.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_llama_rmsnorm(dtype):
    g = torch.Generator().manual_seed(0)
    reference = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.rand(96, generator=g) + 0.5)
    reference = reference.to(dtype).requires_grad_(False)
    lean = LlamaRMSNorm(96, eps=1e-5).to(dtype).requires_grad_(False)
    lean.load_state_dict(reference.state_dict())
    x = (torch.randn(64, 96, generator=g) * 3).to(dtype)
    grad_out = torch.randn(64, 96, generator=g).to(dtype)
    results = []
    for norm in (lambda t: rms_norm(t, lean.weight, lean.variance_epsilon), reference):
        xi = x.clone().requires_grad_()
        out, saved = _saved_bytes(norm, xi)
        out.backward(grad_out)
        results.append((out.detach(), xi.grad, saved))
    (out, grad, saved), (ref_out, ref_grad, ref_saved) = results
    assert out.dtype == ref_out.dtype == dtype
    torch.testing.assert_close(out, ref_out, rtol=TOL[dtype], atol=TOL[dtype])
    assert float((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()) < TOL[dtype]
    # bf16: the input in bf16 instead of its fp32 copy (12.6 KB vs 24.9 KB here); fp32: the same tensors
    assert saved < 0.6 * ref_saved if dtype == torch.bfloat16 else saved <= ref_saved


def test_fused_functions_save_the_norm_input_and_recompute_its_output_exactly(tiny_model_dir, tiny_batch,
                                                                                 monkeypatch):
    """q/k/v and the gated MLP keep the norm's input instead of its output (two fewer activations a layer); the
    recomputed output is the same bits, so loss and every LoRA gradient are identical to saving the output."""
    import qlorakit.kernels.mlp as mlp
    import qlorakit.kernels.qkv as qkv
    from conftest import randomize_lora_b

    def run(compact):
        if not compact:
            for module in (mlp, qkv):
                monkeypatch.setattr(module, "compact_input", lambda x, x2: (x2, None))
        torch.manual_seed(0)
        model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="bf16", device="cpu")
        model = randomize_lora_b(qlorakit.add_lora(model, rank=4, alpha=8))
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            loss_sum, tokens = qlorakit.causal_lm_loss(model(input_ids=tiny_batch).logits, tiny_batch)
        (loss_sum / tokens).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        # the fused functions' inputs, as they save them: [tokens x hidden]
        return float(loss_sum), grads, saved.count((tiny_batch.numel(), 64))

    compact_loss, compact_grads, compact_inputs = run(True)
    plain_loss, plain_grads, plain_inputs = run(False)
    assert compact_loss == plain_loss
    for name in plain_grads:
        assert torch.equal(compact_grads[name], plain_grads[name]), name
    # two layers: q/k/v's and the MLP's inputs go, o_proj's (the attention output) stays
    assert (plain_inputs, compact_inputs) == (3 * 2, 1 * 2)
