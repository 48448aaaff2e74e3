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

import types
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import PrecisionError


def dequantize_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight of a linear layer as a dense [out, in] tensor in `dtype`: bitsandbytes 4-bit (NF4/FP4,
    double-quantized or not), bitsandbytes LLM.int8, or a plain floating weight."""
    weight = base.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise PrecisionError(
                "a 4-bit layer was repacked by bitsandbytes for its bf16 CPU inference kernel (its block scales are "
                "now rounded to bf16); load the model through qlorakit.load, which keeps 4-bit layers out of it"
            )
        dense = bnbf.dequantize_4bit(weight.data, state)
    elif kind == "Int8Params":
        import bitsandbytes.functional as bnbf

        # The row scales live on the parameter until bitsandbytes' own forward moves them to the layer's state.
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
        dense = bnbf.int8_vectorwise_dequant(weight.data, scales)
    else:
        dense = weight
    return dense.to(dtype)


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
    weight = dequantize_weight(base, compute)
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
            weight = dequantize_weight(ctx.base, compute)
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
    """x·W0ᵀ (+ bias) + scale·((dropout(x)·Aᵀ)·Bᵀ (+ lora_b_bias)) for the frozen linear layer `base` in the `compute`
    dtype — PEFT's base(x) + lora_B(lora_A(dropout(x)))·scaling, B's bias (lora_bias) scaled too."""
    x_lora = F.dropout(x, dropout_p, training) if dropout_p > 0 and training else x
    return _LoRALinear.apply(x, x_lora, lora_a, lora_b, lora_b_bias, float(scale), base, compute)


# ---------------------------------------------------------------------------------------------- PEFT layers


def _base_supported(base: torch.nn.Module) -> bool:
    """A frozen linear base: 4-bit, 8-bit or plain weight, no trainable bias (the fused functions give the base no
    gradient)."""
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad:
        return False
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return False
    kind = type(weight).__name__
    if kind == "Params4bit":
        return getattr(weight, "quant_state", None) is not None
    if kind == "Int8Params":
        return weight.dtype == torch.int8  # not yet quantized (has_fp16_weights): bitsandbytes' forward
    return type(base) is torch.nn.Linear  # a subclass may compute something else than x·Wᵀ + b


def _dropout_p(module: torch.nn.Module) -> float | None:
    if isinstance(module, torch.nn.Identity):
        return 0.0
    if type(module) is torch.nn.Dropout:
        return module.p
    return None


class LoRAParts(NamedTuple):
    base: torch.nn.Module
    a: torch.Tensor
    b: torch.Tensor
    b_bias: torch.Tensor | None  # PEFT's lora_bias: lora_B has a bias, scaled with the product
    scale: float
    dropout_p: float


def fast_path_parts(layer) -> LoRAParts | None:
    """What the fused functions need from `layer` (a PEFT LoRA linear routed by install_fused_lora), or None for
    every case PEFT's forward must handle: disabled or merged adapters, several active adapters, DoRA and other
    variants (aLoRA, ...), a non-standard dropout, lora_A/lora_B that are not plain linear layers (lora_A with a
    bias), fan_in_fan_out weights, a base with trainable weight or bias. Read at each call, not at install: adapters
    can be added, switched, merged or made trainable afterwards."""
    if not getattr(layer, "qlorakit_fused", False):
        return None
    active = layer.active_adapters
    name = active[0] if len(active) == 1 else None
    if name not in layer.lora_A or layer.disable_adapters or layer.merged:
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    dropout_p = _dropout_p(layer.lora_dropout[name])
    if (
        dropout_p is None or name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False)
        or name in getattr(layer, "lora_magnitude_vector", {}) or getattr(layer, "fan_in_fan_out", False)
        or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear or lora_a.bias is not None
        or not _base_supported(base := layer.get_base_layer())
    ):
        return None
    return LoRAParts(base, lora_a.weight, lora_b.weight, lora_b.bias, layer.scaling[name], dropout_p)


def runs_its_own_hooks(module: torch.nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones: PEFT's per-row adapter_names, a user's
    probe) — a fused block that computes the module's output without calling it must then call it instead."""
    from torch.nn.modules import module as nn_module

    return bool(
        module._forward_pre_hooks or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks
        or nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks
        or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks
    )


def _take_precomputed(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The output a fused multi-layer function (qkv.py) computed for `layer` on exactly this input, handed over
    once."""
    ready = layer.__dict__.get("qlorakit_precomputed")
    if ready is None or ready[0] is not x:
        return None
    layer.qlorakit_precomputed = None
    return ready[1]


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a PEFT LoRA linear layer through `lora_linear`, or PEFT's own (see fast_path_parts)."""
    ready = None if args or kwargs else _take_precomputed(self, x)
    if ready is not None:
        return ready
    parts = None if args or kwargs else fast_path_parts(self)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    return lora_linear(x, parts.base, parts.a, parts.b, parts.scale, self.qlorakit_compute_dtype, parts.dropout_p,
                       self.training, parts.b_bias)


def install_fused_lora(model: torch.nn.Module, compute: torch.dtype) -> int:
    """Route every eligible PEFT LoRA linear layer of `model` through `lora_linear` in the `compute` dtype;
    returns how many layers were routed. The PEFT modules stay as they are (state dict, saving, merging)."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        if not _base_supported(module.get_base_layer()):
            continue
        module.qlorakit_compute_dtype = compute
        if not getattr(module, "qlorakit_fused", False):
            module.forward = types.MethodType(_fused_forward, module)
            module.qlorakit_fused = True
        count += 1
    return count


def install_block_forward(model: torch.nn.Module, projections: tuple[str, ...], forward, marker: str,
                          required=()) -> int:
    """Give every module whose `projections` are all fused LoRA layers (and which has the `required` attributes)
    the fused `forward`, marking it with `marker`; returns how many modules qualify. Recognition is by structure,
    not class name, so every Llama-family architecture takes it."""
    count = 0
    for module in model.modules():
        if not all(getattr(getattr(module, n, None), "qlorakit_fused", False) for n in projections):
            continue
        if not all(hasattr(module, attribute) for attribute in required):
            continue
        if not getattr(module, marker, False):
            module.forward = types.MethodType(forward, module)
            setattr(module, marker, True)
        count += 1
    return count
