"""The query, key and value projections of an attention block, with LoRA on each, as one autograd function over their
shared input.

Per layer, autograd would produce three input gradients, each rounded to bf16/fp16, then add them — two more
roundings. Here the input is saved once (as the norm's input when it is an rms_norm output, see rmsnorm.py) and its
gradient is one matrix product over [dq, dk, dv, s·dq·Bq, s·dk·Bk, s·dv·Bv] · [Wq; Wk; Wv; Aq; Ak; Av], accumulated
in fp32 and rounded once (see lora.py for why the rounding matters). Frozen biases (Qwen2) are kept, and so are the
B biases of PEFT's lora_bias. The output projection takes the single-layer function in lora.py; it has its own
input. (qlorakit/fast_path.py hooks it into attention modules.)
"""

from __future__ import annotations

import torch

from .lora import _one_rounding_matmul, frozen_weight, lora_bias_grad, lora_product
from .rmsnorm import compact_input, restore_input

class LoRASharedInput(torch.autograd.Function):
    """Several LoRA linear layers applied to one input: outputs x·Wᵢᵀ (+ biasᵢ) + sᵢ·((x·Aᵢᵀ)·Bᵢᵀ (+ b_Bᵢ)); `lora`
    is (Aᵢ, Bᵢ, b_Bᵢ) per layer, b_Bᵢ None without lora_bias."""

    @staticmethod
    def forward(ctx, x, bases, scales, compute, *lora):
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(compute)
            outs, xas = zip(*(lora_product(x2, base, a, b, s, compute, b_bias=b_bias)
                              for base, a, b, b_bias, s in zip(bases, lora[0::3], lora[1::3], lora[2::3], scales)))
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
            for grad, base, scale, xa, a, b, b_bias in zip(grads, ctx.bases, ctx.scales, xas, lora[0::3], lora[1::3],
                                                           lora[2::3]):
                if grad is None:  # an output the caller did not use
                    lora_grads += [torch.zeros_like(a), torch.zeros_like(b),
                                   None if b_bias is None else torch.zeros_like(b_bias)]
                    continue
                g = grad.reshape(-1, grad.shape[-1]).to(c)
                g32 = g.float()
                gb32 = g32 @ b.float()  # [tokens, r]
                lora_grads += [(scale * (gb32.t() @ x32)).to(a.dtype), (scale * (g32.t() @ xa.float())).to(b.dtype),
                               lora_bias_grad(g32, scale, b_bias)]
                left += [g, gb32 * scale]
                right += [frozen_weight(base, c), a]
            grad_x = None
            if ctx.needs_input_grad[0] and left:
                grad_x = _one_rounding_matmul(left, right, dtype=c).reshape(*ctx.lead, -1)
        return (grad_x, None, None, None, *lora_grads)
