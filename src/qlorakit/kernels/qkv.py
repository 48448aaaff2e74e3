"""The query, key and value projections of an attention block, with LoRA on each, as one autograd function over
their shared input.

Per layer, autograd would produce three input gradients, each rounded to bf16/fp16, then add them — two more roundings. Here the input is
saved once (as the norm's input when it is an rms_norm output, see rmsnorm.py) and its gradient is one matrix product over [dq, dk, dv, s·dq·Bq, s·dk·Bk, s·dv·Bv] · [Wq; Wk; Wv; Aq;
Ak; Av], accumulated in fp32 and rounded once (see lora.py for why the rounding matters). Frozen biases (Qwen2) are
kept. The output projection takes the single-layer function in lora.py; it has its own input.

Hooked in without touching the model's attention code: the attention module's forward computes the three outputs
first and hands each projection its own, which the projection returns when it is called on that same input; an
architecture that transforms the input before projecting simply recomputes, so the result is always right.
Recognised by structure — q_proj, k_proj, v_proj that are fused LoRA layers — not by class name.
"""

from __future__ import annotations

import torch

from .lora import _one_rounding_matmul, dequantize_weight, fast_path_parts, install_block_forward, lora_product
from .rmsnorm import compact_input, restore_input

NAMES = ("q_proj", "k_proj", "v_proj")


class _LoRASharedInput(torch.autograd.Function):
    """Several LoRA linear layers applied to one input: outputs x·Wᵢᵀ + sᵢ·(x·Aᵢᵀ)·Bᵢᵀ (+ biasᵢ)."""

    @staticmethod
    def forward(ctx, x, bases, scales, compute, *lora):
        lead = x.shape[:-1]
        a_s, b_s = lora[0::2], lora[1::2]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(compute)
            outs, xas = zip(*(lora_product(x2, base, a, b, s, compute)
                              for base, a, b, s in zip(bases, a_s, b_s, scales)))
        saved_x, ctx.norm = compact_input(x, x2)
        ctx.save_for_backward(saved_x, *xas, *lora)
        ctx.bases, ctx.scales, ctx.compute, ctx.lead, ctx.x_shape = bases, scales, compute, lead, x2.shape
        return tuple(out.reshape(*lead, out.shape[-1]) for out in outs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.bases)
        saved = ctx.saved_tensors  # read once: checkpointing allows a single unpack
        x2, xas, lora = restore_input(saved[0], ctx.norm, ctx.x_shape), saved[1:n + 1], saved[n + 1:]
        c = ctx.compute
        lora_grads, left, right = [], [], []
        with torch.autocast(x2.device.type, enabled=False):
            x32 = x2.float()
            for grad, base, scale, xa, a, b in zip(grads, ctx.bases, ctx.scales, xas, lora[0::2], lora[1::2]):
                if grad is None:  # an output the caller did not use
                    lora_grads += [torch.zeros_like(a), torch.zeros_like(b)]
                    continue
                g = grad.reshape(-1, grad.shape[-1]).to(c)
                g32 = g.float()
                gb32 = g32 @ b.float()  # [tokens, r]
                lora_grads += [(scale * (gb32.t() @ x32)).to(a.dtype), (scale * (g32.t() @ xa.float())).to(b.dtype)]
                left += [g, gb32 * scale]
                right += [dequantize_weight(base, c), a]
            grad_x = None
            if ctx.needs_input_grad[0] and left:
                grad_x = _one_rounding_matmul(left, right, dtype=c).reshape(*ctx.lead, -1)
        return (grad_x, None, None, None, *lora_grads)


def _fused_attention_forward(self, *args, **kwargs):
    """The attention module's own forward, with q, k and v computed beforehand by `_LoRASharedInput`."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    projections = [getattr(self, name) for name in NAMES]
    parts = [fast_path_parts(p) for p in projections]
    if not isinstance(x, torch.Tensor) or any(p is None or (p[4] > 0 and self.training) for p in parts):
        return type(self).forward(self, *args, **kwargs)
    lora = [t for p in parts for t in (p[1], p[2])]
    outs = _LoRASharedInput.apply(x, tuple(p[0] for p in parts), tuple(float(p[3]) for p in parts),
                                  projections[0].qlorakit_compute_dtype, *lora)
    for projection, out in zip(projections, outs):
        projection.qlorakit_precomputed = (x, out)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        for projection in projections:
            projection.qlorakit_precomputed = None


def install_fused_qkv(model: torch.nn.Module) -> int:
    """Route every attention module whose q, k and v projections are fused LoRA layers through
    `_LoRASharedInput`; returns how many."""
    return install_block_forward(model, NAMES, _fused_attention_forward, "qlorakit_fused_qkv")
