"""PEFT's LoRA layers: which modules they are, and what qlorakit's fused kernels need from one.

The fused kernels compute PEFT's vanilla LoRA forward, `base(x) + lora_B(lora_A(dropout(x))) * scaling`, for one
active adapter. Everything else PEFT's own forward does — DoRA, variants (aLoRA, ...), several active adapters,
disabled or merged adapters, per-row adapter_names, non-standard dropout or A/B modules, fan_in_fan_out weights —
is detected here, per call, and named, so the layer falls back to PEFT's forward and the fast-path report can say
why. The layer attributes read are checked to exist when the fast path is installed (check_layer).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch

from . import changed
from .bitsandbytes import FrozenLinear, supported_base

PACKAGE = "peft"

# What lora_parts and qlorakit's merge read from a LoRA layer. A missing one would make its test read as "not
# used" (no DoRA, no variant...) and the fused path would compute something else than PEFT: a hard error instead.
LAYER_ATTRIBUTES = ("lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant", "lora_magnitude_vector",
                    "active_adapters", "disable_adapters", "merged", "fan_in_fan_out", "get_base_layer")


@functools.lru_cache(maxsize=None)
def lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:
        raise changed(PACKAGE, "peft.tuners.lora.LoraLayer", f"import failed: {e}") from None
    return LoraLayer


def check_layer(layer) -> None:
    """Raise UpstreamError when a LoRA layer lacks an attribute qlorakit reads."""
    for attribute in LAYER_ATTRIBUTES:
        if not hasattr(layer, attribute):
            raise changed(PACKAGE, f"LoraLayer.{attribute}", f"{type(layer).__name__} layers have no {attribute}")


def lora_linear_layers(model: torch.nn.Module):
    """(name, layer) of every PEFT LoRA layer of `model` that adapts a linear layer (embeddings and convolutions
    keep PEFT's forward), each checked to have what qlorakit reads."""
    lora_layer = lora_layer_class()
    for name, module in model.named_modules():
        if isinstance(module, lora_layer):
            if not hasattr(module, "get_base_layer"):
                raise changed(PACKAGE, "LoraLayer.get_base_layer", f"{type(module).__name__} layers have none")
            if isinstance(module.get_base_layer(), torch.nn.Linear):  # bitsandbytes' layers are Linear subclasses
                check_layer(module)
                yield name, module


def _dropout_p(module: torch.nn.Module) -> float | None:
    if isinstance(module, torch.nn.Identity):
        return 0.0
    if type(module) is torch.nn.Dropout:
        return module.p
    return None


class LoRAParts(NamedTuple):
    """What the fused kernels need from a LoRA layer whose forward they compute."""

    base: FrozenLinear
    a: torch.Tensor  # lora_A.weight [r, in]
    b: torch.Tensor  # lora_B.weight [out, r]
    b_bias: torch.Tensor | None  # PEFT's lora_bias: lora_B's bias, scaled with the product
    scale: float
    dropout_p: float


def lora_parts(layer) -> LoRAParts | str:
    """The parts of `layer`'s single active vanilla LoRA adapter, or — as a string — why PEFT's own forward must
    compute this layer. Read at each call, not at install: adapters can be added, switched, merged, disabled or
    made trainable afterwards."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged into the base"
    active = layer.active_adapters
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    if name not in layer.lora_A:
        return "the active adapter is not on this layer"
    if name in layer.lora_variant:
        return f"LoRA variant {type(layer.lora_variant[name]).__name__} (DoRA, aLoRA, ...)"
    if name in layer.lora_magnitude_vector:
        return "DoRA"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out weights"
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
        return f"lora_A/lora_B are {type(lora_a).__name__}/{type(lora_b).__name__}, not Linear"
    if lora_a.bias is not None:
        return "lora_A has a bias"
    dropout_p = _dropout_p(layer.lora_dropout[name])
    if dropout_p is None:
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    base = layer.get_base_layer()
    why_not = supported_base(base)
    if why_not is not None:
        return why_not
    return LoRAParts(FrozenLinear(base, layer.__dict__.get("qlorakit_name", "a LoRA layer's base")), lora_a.weight, lora_b.weight, lora_b.bias, float(layer.scaling[name]),
                     dropout_p)


@contextlib.contextmanager
def base_only(model: torch.nn.Module):
    """`model` computing its base alone through the same path it computes with its adapters: each LoRA layer's active
    scaling set to 0 (its adapter's product, and its lora_bias, contribute nothing), restored on exit. PEFT's
    disable_adapter() would send the layers to PEFT's own forward, whose LLM.int8 base quantizes the activations where
    qlorakit's fused layer dequantizes the weight: the two differ (measured ~0.04 nats per token), so a reference
    computed that way is not the policy's base."""
    saved = []
    try:
        for _, layer in lora_linear_layers(model):
            for name in layer.active_adapters:
                if name in layer.scaling:
                    saved.append((layer, name, layer.scaling[name]))
                    layer.scaling[name] = 0.0
        yield model
    finally:
        for layer, name, scale in saved:
            layer.scaling[name] = scale
