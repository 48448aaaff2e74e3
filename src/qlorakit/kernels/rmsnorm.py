"""RMSNorm (the Llama formula: w · (x / sqrt(mean(x²) + eps)) cast back, computed in fp32) as one autograd function
that saves only its input, in its own dtype, and the per-row 1/rms.

transformers' RMSNorm is a chain of fp32 operations; under bf16 autograd keeps the fp32 copy of the input for the
backward — 4 bytes per hidden unit per token, two norms a layer. This keeps the bf16 input (2 bytes) and computes
the same gradient analytically in fp32, in fewer passes over memory. The norm's weight is frozen in QLoRA, so no
weight gradient is computed.

A norm's output feeds the fused q/k/v and gated-MLP functions, which would save it for their LoRA gradients — a
second [tokens x hidden] tensor per norm, next to the input the norm keeps. `compact_input` lets them save the
norm's input (the same storage the norm keeps) and recompute the output bit for bit in the backward: two fewer
activations per decoder layer.
"""

from __future__ import annotations

import torch

def normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight · (x / sqrt(mean(x²) + eps)) rounded back to x's dtype, the fp32 1/rms per row): the Llama RMSNorm."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = normalize(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.float() * rstd
        g = (grad_out * weight).float()
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = _RMSNorm.apply(x, weight, eps)
    out.qlorakit_norm_of = (x, weight, eps)  # for compact_input
    return out


def compact_input(x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """What a fused function should save for its input `x2` (x as a 2-D matrix in the compute dtype): the norm's
    input and (weight, eps) when x is an rms_norm output that x2 merely reshapes, else x2 itself and None."""
    recipe = getattr(x, "qlorakit_norm_of", None)
    if recipe is None or x2.dtype != x.dtype or x2.data_ptr() != x.data_ptr():
        return x2, None
    return recipe[0], recipe[1:]


def restore_input(saved: torch.Tensor, recipe: tuple | None, shape: torch.Size) -> torch.Tensor:
    """The input compact_input stood in for: recomputed from the norm's input (the same bits as the forward)."""
    if recipe is None:
        return saved
    with torch.no_grad():
        return normalize(saved, *recipe)[0].reshape(shape)
