"""A LoRA linear layer, y = x·W0ᵀ (+ bias) + s·((x·Aᵀ)·Bᵀ (+ b_B)), as one autograd function over any frozen base
(b_B: the bias of B that PEFT adds with lora_bias=True).

Why not PEFT's layer: in a half-precision compute dtype PEFT computes the base output, rounds it to bf16/fp16,
and only then adds the adapter's delta. Early in training the delta is far below half a unit in the last place of
the output (a bf16 ULP near 1.0 is 2^-7), so `round(round(x·W0ᵀ) + delta)` gives back `round(x·W0ᵀ)`: the update
is lost, deterministically. On SmolLM2-135M (NF4, bf16, lr 2e-4) that made the first optimizer step worth half of
the fp32 one and left bf16 runs 8% behind fp32 after 15 steps. Here the base and adapter products are one matrix
product, `[x, s·x·Aᵀ] · [W0, B]ᵀ`, accumulated in fp32 by the matmul kernel and rounded once; the input gradient
is computed the same way. In fp32 compute there is no rounding problem and the plain products are used.

The base weight is dequantized in the forward and again in the backward (never kept); saved for backward are
only the input and the rank-r product x·Aᵀ. LoRA gradients are accumulated in fp32 (the products are rank-r, so
this costs little) and returned in the adapters' own dtype. The compute dtype comes from the precision policy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PrecisionError


def frozen_weight(base, compute: torch.dtype) -> torch.Tensor:
    """The dense [out, in] weight of a frozen base (anything with `dense(dtype)` and `bias`: qlorakit's
    FrozenLinear over a 4-bit, LLM.int8 or plain layer) in the compute dtype. The precision policy guarantees that
    dtype — 4-bit layers dequantize to it (rule 1), frozen weights are stored in it — so another one is a policy
    violation, reported, never cast away (a cast here would hide it on eval and chat paths that never run
    Precision.check)."""
    dense = base.dense(compute)
    if dense.dtype != compute:
        from ..precision import dtype_name

        raise PrecisionError(
            f"{getattr(base, 'name', 'a frozen base layer')}: the frozen weight is {dtype_name(dense.dtype)} but the "
            f"compute dtype is {dtype_name(compute)} (the precision policy: every frozen and dequantized weight is in "
            "the compute dtype). Something changed the model after qlorakit set it up; call "
            "qlorakit.precision_of(model).apply(model)"
        )
    return dense


def _concatenate(parts: list[torch.Tensor], dim: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(parts, dim) in `dtype`, each part converted while it is copied in: no converted intermediates."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    out = parts[0].new_empty(shape, dtype=dtype)
    offset = 0
    for part in parts:
        out.narrow(dim, offset, part.shape[dim]).copy_(part)
        offset += part.shape[dim]
    return out


def _one_rounding_matmul(left: list[torch.Tensor], right: list[torch.Tensor], right_transposed: bool = False,
                         dtype: torch.dtype | None = None):
    """sum_i left[i] @ right[i] as one product over the concatenated inner dimension in `dtype` (default: left[0]'s;
    parts in another dtype, e.g. fp32 gradients, are converted as they are concatenated): fp32 accumulation, one
    rounding to the output dtype. With `right_transposed`, right[i] are given as [out, k_i] and the product uses
    their transpose, the layout of x @ W.t() (it matters to the CPU's half-precision GEMM: ~2x)."""
    dtype = dtype or left[0].dtype
    if len(left) == 1:
        return left[0].to(dtype) @ (right[0].t() if right_transposed else right[0]).to(dtype)
    if right_transposed:
        return _concatenate(left, -1, dtype) @ _concatenate(right, 1, dtype).t()
    return _concatenate(left, -1, dtype) @ _concatenate(right, 0, dtype)


def lora_product(x2, base, a, b, scale, compute, x_lora=None, b_bias=None):
    """x·W0ᵀ + bias + s·((x'·Aᵀ)·Bᵀ + b_B) for a 2-D input already in `compute`, rounded once, where x' is `x_lora`
    (the adapter's input after dropout) or x and b_B is B's own bias (PEFT's lora_bias; None without); returns
    (output, x'·Aᵀ), which the fused functions save for the LoRA gradients."""
    xa = (x2 if x_lora is None else x_lora) @ a.to(compute).t()
    weight = frozen_weight(base, compute)
    bias = base.bias
    if compute == torch.float32:
        out = torch.addmm(x2 @ weight.t(), xa, b.to(compute).t(), alpha=scale)
        if bias is not None:
            out += bias.to(compute)
        if b_bias is not None:
            out += scale * b_bias.to(compute)
        return out, xa
    left, right = [x2, xa * scale], [weight, b.to(compute)]
    # Each bias is its own column of ones in the product, so a small s·b_B is not lost against the base bias either.
    for extra in (bias, None if b_bias is None else b_bias.float() * scale):
        if extra is not None:
            left.append(x2.new_ones(x2.shape[0], 1))
            right.append(extra.to(compute).reshape(-1, 1))
    return _one_rounding_matmul(left, right, right_transposed=True), xa


def lora_bias_grad(grad32: torch.Tensor, scale: float, b_bias: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of B's bias (lora_bias) from the fp32 output gradient [tokens, out]: s·Σ_tokens grad."""
    return None if b_bias is None else (scale * grad32.sum(0)).to(b_bias.dtype)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, lora_b_bias, scale, base, compute):
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False):
            in_features = x.shape[-1]
            lead = x.shape[:-1]
            x2 = x.reshape(-1, in_features).to(compute)
            same = x_lora is x
            xd2 = x2 if same else x_lora.reshape(-1, in_features).to(compute)
            out, xa = lora_product(x2, base, lora_a, lora_b, scale, compute, None if same else xd2, lora_b_bias)
        ctx.save_for_backward(x2, None if same else xd2, xa, lora_a, lora_b, lora_b_bias)
        ctx.same, ctx.scale, ctx.base, ctx.compute, ctx.lead = same, scale, base, compute, lead
        return out.reshape(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xd2, xa, lora_a, lora_b, lora_b_bias = ctx.saved_tensors
        if ctx.same:
            xd2 = x2
        scale, compute = ctx.scale, ctx.compute
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(compute)
            weight = frozen_weight(ctx.base, compute)
            a = lora_a.to(compute)
            g32 = g.float()
            gb32 = g32 @ lora_b.float()  # [tokens, r]
            grad_x = grad_x_lora = None
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                gb = (gb32 * scale).to(compute)
                if ctx.same:
                    grad_x = _one_rounding_matmul([g, gb], [weight, a])
                else:
                    grad_x = g @ weight
                    grad_x_lora = (gb @ a).reshape(*ctx.lead, -1)
                grad_x = grad_x.reshape(*ctx.lead, -1)
            grad_a = grad_b = None
            if ctx.needs_input_grad[2]:
                grad_a = (scale * (gb32.t() @ xd2.float())).to(lora_a.dtype)
            if ctx.needs_input_grad[3]:
                grad_b = (scale * (g32.t() @ xa.float())).to(lora_b.dtype)
            grad_b_bias = lora_bias_grad(g32, scale, lora_b_bias) if ctx.needs_input_grad[4] else None
        return grad_x, grad_x_lora, grad_a, grad_b, grad_b_bias, None, None, None


def lora_linear(x, base, lora_a, lora_b, scale: float, compute: torch.dtype, dropout_p: float = 0.0, training=False,
                lora_b_bias=None):
    """x·W0ᵀ (+ bias) + scale·((dropout(x)·Aᵀ)·Bᵀ (+ lora_b_bias)) for the frozen linear layer `base` (see
    frozen_weight) in the `compute` dtype — PEFT's base(x) + lora_B(lora_A(dropout(x)))·scaling, B's bias
    (lora_bias) scaled too."""
    x_lora = F.dropout(x, dropout_p, training) if dropout_p > 0 and training else x
    return _LoRALinear.apply(x, x_lora, lora_a, lora_b, lora_b_bias, float(scale), base, compute)
