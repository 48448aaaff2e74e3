"""The gated MLP of Llama-family decoders, down(act(gate(x)) · up(x)), with LoRA on all three projections, as one
autograd function.

Layer by layer, autograd keeps four [tokens x intermediate] tensors per MLP for the backward (gate output, up
output, act(gate), and their product, the down projection's input); this keeps two (gate and up outputs) and
recomputes the rest (and keeps its input as the norm's input when it is an rms_norm output, see rmsnorm.py), which
is elementwise. The input gradient of gate and up is one matrix product over [dgate, dup, s·dgate·Bg, s·dup·Bu] ·
[Wg; Wu; Ag; Au] — accumulated in fp32 and rounded once, like the forward products (see lora.py). The activation's
derivative is taken in fp32, whatever the activation (SiLU for SwiGLU, tanh-GELU for GeGLU). (qlorakit/fast_path.py
routes the MLP modules whose formula this is through it.)
"""

from __future__ import annotations

import torch

from .lora import _one_rounding_matmul, frozen_weight, lora_bias_grad, lora_product
from .rmsnorm import compact_input, restore_input


class LoRAGatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ag, bg, au, bu, ad, bd, bases, scales, act, compute, cg=None, cu=None, cd=None):
        # cg, cu, cd: the B biases of PEFT's lora_bias (None without)
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(compute)
            gate, xag = lora_product(x2, bases[0], ag, bg, scales[0], compute, b_bias=cg)
            up, xau = lora_product(x2, bases[1], au, bu, scales[1], compute, b_bias=cu)
            hidden = act(gate) * up
            out, had = lora_product(hidden, bases[2], ad, bd, scales[2], compute, b_bias=cd)
        saved_x, ctx.norm = compact_input(x, x2)
        ctx.save_for_backward(saved_x, gate, up, xag, xau, had, ag, bg, au, bu, ad, bd, cg, cu, cd)
        ctx.bases, ctx.scales, ctx.act, ctx.compute = bases, scales, act, compute
        ctx.lead, ctx.x_shape = lead, x2.shape
        return out.reshape(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        saved_x, gate, up, xag, xau, had, ag, bg, au, bu, ad, bd, cg, cu, cd = ctx.saved_tensors
        x2 = restore_input(saved_x, ctx.norm, ctx.x_shape)
        sg, su, sd = ctx.scales
        c, act = ctx.compute, ctx.act
        with torch.autocast(grad_out.device.type, enabled=False):
            dy = grad_out.reshape(-1, grad_out.shape[-1]).to(c)
            dy32 = dy.float()
            # Elementwise work over [tokens x intermediate] is a large part of this function's time on a CPU: the
            # steps below reuse their buffers in place where the value is not needed again.
            # down projection
            with torch.enable_grad():
                gate32 = gate.float().requires_grad_()
                act32 = act(gate32)
            act32_value = act32.detach()
            hidden = act32_value.to(c, copy=True).mul_(up)  # as in the forward
            dy_bd = dy32 @ bd.float()
            grad_ad = sd * (dy_bd.t() @ hidden.float())
            del hidden
            grad_bd = sd * (dy32.t() @ had.float())
            grad_cd = lora_bias_grad(dy32, sd, cd)
            wd = frozen_weight(ctx.bases[2], c)
            dhidden = _one_rounding_matmul([dy, dy_bd * sd], [wd, ad], dtype=c).float()
            del wd
            # activation and product, in fp32
            dup32 = dhidden * act32_value
            (dgate32,) = torch.autograd.grad(act32, gate32, dhidden.mul_(up.float()))
            del act32, gate32, dhidden
            # gate and up projections: LoRA gradients in fp32, the input gradient as one product
            dg_bg, du_bu = dgate32 @ bg.float(), dup32 @ bu.float()
            x32 = x2.float()
            grad_ag, grad_bg = sg * (dg_bg.t() @ x32), sg * (dgate32.t() @ xag.float())
            grad_au, grad_bu = su * (du_bu.t() @ x32), su * (dup32.t() @ xau.float())
            grad_cg, grad_cu = lora_bias_grad(dgate32, sg, cg), lora_bias_grad(dup32, su, cu)
            weights = [frozen_weight(ctx.bases[0], c), frozen_weight(ctx.bases[1], c)]
            grad_x = _one_rounding_matmul([dgate32, dup32, dg_bg * sg, du_bu * su], [*weights, ag, au], dtype=c)
        grads = [g.to(p.dtype) for g, p in zip((grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd),
                                                (ag, bg, au, bu, ad, bd))]
        return (grad_x.reshape(*ctx.lead, -1), *grads, None, None, None, None, grad_cg, grad_cu, grad_cd)
