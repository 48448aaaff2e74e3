"""The gated MLP of Llama-family decoders, down(act(gate(x)) · up(x)), with LoRA on all three projections, as one
autograd function.

Layer by layer, autograd keeps four [tokens x intermediate] tensors per MLP for the backward (gate output, up
output, act(gate), and their product, the down projection's input); this keeps two (gate and up outputs) and
recomputes the rest (and keeps its input as the norm's input when it is an rms_norm output, see rmsnorm.py), which is elementwise. The input gradient of gate and up is one matrix product over
[dgate, dup, s·dgate·Bg, s·dup·Bu] · [Wg; Wu; Ag; Au] — accumulated in fp32 and rounded once, like the forward
products (see lora.py). The activation's derivative is taken in fp32, whatever the activation (SiLU for
SwiGLU, tanh-GELU for GeGLU). Recognised by structure — a module with gate_proj, up_proj, down_proj and act_fn whose
projections are fused LoRA layers — not by class name.
"""

from __future__ import annotations

import torch

from .lora import (_one_rounding_matmul, dequantize_weight, fast_path_parts, install_block_forward, lora_bias_grad,
                   lora_product, runs_its_own_hooks)
from .rmsnorm import compact_input, restore_input


class _LoRAGatedMLP(torch.autograd.Function):
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
            wd = dequantize_weight(ctx.bases[2], c)
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
            weights = [dequantize_weight(ctx.bases[0], c), dequantize_weight(ctx.bases[1], c)]
            grad_x = _one_rounding_matmul([dgate32, dup32, dg_bg * sg, du_bu * su], [*weights, ag, au], dtype=c)
        grads = [g.to(p.dtype) for g, p in zip((grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd),
                                                (ag, bg, au, bu, ad, bd))]
        return (grad_x.reshape(*ctx.lead, -1), *grads, None, None, None, None, grad_cg, grad_cu, grad_cd)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    parts = [fast_path_parts(p) for p in projections]
    # The projections are not called here, so one with hooks (PEFT's per-row adapter_names, a user's probe) must be.
    if (any(p is None or p.dropout_p > 0 or p.base.bias is not None for p in parts)
            or any(runs_its_own_hooks(p) for p in projections)):
        return type(self).forward(self, x)
    g, u, d = parts
    return _LoRAGatedMLP.apply(x, g.a, g.b, u.a, u.b, d.a, d.b, (g.base, u.base, d.base), (g.scale, u.scale, d.scale),
                               self.act_fn, self.gate_proj.qlorakit_compute_dtype, g.b_bias, u.b_bias, d.b_bias)


def install_fused_mlp(model: torch.nn.Module) -> int:
    """Route every gated MLP whose three projections are fused LoRA layers through `_LoRAGatedMLP`."""
    return install_block_forward(model, ("gate_proj", "up_proj", "down_proj"), _fused_mlp_forward,
                                 "qlorakit_fused_mlp", required=("act_fn",))
