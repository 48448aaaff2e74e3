"""bitsandbytes: what kind of quantized weight a layer holds, its dense value, and the Linear4bit flags the
precision policy pins.

Recognition is by class (`isinstance` against bitsandbytes' own Params4bit and Int8Params), checked once to exist:
had bitsandbytes renamed them, a class-name comparison would find no quantized layer and every check built on it
would pass without checking anything.
"""

from __future__ import annotations

import functools

import torch

from . import changed, require

PACKAGE = "bitsandbytes"


@functools.lru_cache(maxsize=None)
def _classes():
    """(Params4bit, Int8Params, Linear4bit, Linear8bitLt, functional module), each checked to exist."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as functional
    except ImportError as e:
        raise changed(PACKAGE, "its module layout", f"import failed: {e}") from None
    nn = bnb.nn
    classes = tuple(require(PACKAGE, nn, name, "bitsandbytes.nn")
                    for name in ("Params4bit", "Int8Params", "Linear4bit", "Linear8bitLt"))
    for name in ("dequantize_4bit", "quantize_4bit", "int8_vectorwise_dequant", "int8_vectorwise_quant", "QuantState"):
        require(PACKAGE, functional, name, "bitsandbytes.functional")
    return (*classes, functional)


def functional():
    """bitsandbytes.functional, its quantize/dequantize functions checked to exist."""
    return _classes()[4]


def weight_kind(weight) -> str | None:
    """'4bit' for a Params4bit (NF4/FP4), 'int8' for an Int8Params that holds int8 codes, None for anything else."""
    if not isinstance(weight, torch.Tensor) or type(weight) in (torch.Tensor, torch.nn.Parameter):
        return None
    params4bit, int8params, *_ = _classes()
    if isinstance(weight, params4bit):
        return "4bit"
    if isinstance(weight, int8params):
        # Int8Params with has_fp16_weights holds a floating weight that bitsandbytes' own forward quantizes.
        return "int8" if weight.dtype == torch.int8 else None
    return None


def own_weight(module: torch.nn.Module):
    """The module's own `weight` parameter; None for wrappers (PEFT's LoRA layers) that only forward one."""
    return module._parameters.get("weight") if hasattr(module, "_parameters") else None


def layer_kind(module: torch.nn.Module) -> str | None:
    """'4bit' / 'int8' for a quantized linear layer (its own weight is quantized), None otherwise."""
    kind = weight_kind(own_weight(module))
    if kind == "4bit" and quant_state(module.weight) is None:
        return None  # not quantized yet (still on the meta device, or before .to() quantizes it)
    return kind


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """A bitsandbytes linear layer class (quantized or about to be): a linear layer for LoRA targets."""
    _, _, linear4bit, linear8bit, _ = _classes()
    return isinstance(module, (linear4bit, linear8bit))


def is_quantized_tensor(param: torch.Tensor) -> bool:
    """Quantized storage: a bitsandbytes parameter or any non-floating tensor (codes, absmax, quant maps)."""
    return weight_kind(param) is not None or not param.dtype.is_floating_point


def quant_state(weight):
    return require(PACKAGE, weight, "quant_state", "Params4bit")


def quantized_layers(model: torch.nn.Module, kind: str | None = None):
    """(name, module, kind) of every quantized linear layer, optionally of one kind ('4bit' / 'int8')."""
    for name, module in model.named_modules():
        found = layer_kind(module)
        if found is not None and (kind is None or found == kind):
            yield name, module, found


def describe_4bit(module) -> tuple[str, bool, torch.dtype, tuple]:
    """(quant_type, double-quantized, dequantized dtype, [out, in] shape) of a 4-bit layer."""
    state = quant_state(module.weight)
    return (require(PACKAGE, state, "quant_type", "QuantState"), bool(require(PACKAGE, state, "nested", "QuantState")),
            require(PACKAGE, state, "dtype", "QuantState"), tuple(require(PACKAGE, state, "shape", "QuantState")))


# -- the flags the precision policy pins on Linear4bit --------------------------------------------------------

# Linear4bit attributes Precision.apply writes. Writing an attribute a newer bitsandbytes no longer reads would be a
# silent no-op, so each must exist on the layer before it is written.
_LINEAR4BIT_FLAGS = ("compute_dtype", "compute_type_is_set", "support_avx512bf16_for_cpu")


def pin_4bit_compute(module, dequantized: torch.dtype, compute: torch.dtype) -> None:
    """Make a 4-bit layer dequantize to `dequantized` and compute in `compute`, for good: its stored
    quant_state.dtype (bf16 in many pre-quantized checkpoints) rewritten, its compute dtype pinned so bitsandbytes
    does not switch it from the first input it sees, and its bf16 CPU inference kernel turned off. That kernel
    would repack the weight the first time the layer runs in eval mode without gradients: it computes in bf16
    whatever the compute dtype, rounds the block scales to bf16 for good, and its inverse does not restore them."""
    state = quant_state(module.weight)
    require(PACKAGE, state, "dtype", "QuantState")
    for flag in _LINEAR4BIT_FLAGS:
        require(PACKAGE, module, flag, "Linear4bit")
    state.dtype = dequantized
    module.compute_dtype = compute
    module.compute_type_is_set = True
    module.support_avx512bf16_for_cpu = False


def pinned_compute(module) -> tuple[torch.dtype, torch.dtype]:
    """(dequantized dtype, compute dtype) of a 4-bit layer."""
    return quant_state(module.weight).dtype, require(PACKAGE, module, "compute_dtype", "Linear4bit")


def repacked_for_cpu(weight) -> bool:
    """Whether bitsandbytes repacked this 4-bit weight for its bf16 CPU inference kernel (block scales rounded)."""
    return bool(getattr(quant_state(weight), "packing_format_for_cpu", False))


# -- dense values --------------------------------------------------------------------------------------------


def dequantize(module: torch.nn.Module) -> torch.Tensor:
    """The dense [out, in] weight of a linear layer: a 4-bit weight in its quant_state's dtype, an LLM.int8 weight
    in fp32 (bitsandbytes computes codes x row scales in fp32), a plain weight as it is."""
    weight = module.weight
    kind = weight_kind(weight)
    if kind == "4bit":
        if repacked_for_cpu(weight):
            from ..errors import PrecisionError

            raise PrecisionError(
                "a 4-bit layer was repacked by bitsandbytes for its bf16 CPU inference kernel (its block scales are "
                "now rounded to bf16); load the model through qlorakit.load, which keeps 4-bit layers out of it"
            )
        return functional().dequantize_4bit(weight.data, quant_state(weight))
    if kind == "int8":
        # The row scales live on the parameter until bitsandbytes' own forward moves them to the layer's state.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = require(PACKAGE, require(PACKAGE, module, "state", "Linear8bitLt"), "SCB", "MatmulLtState")
        return functional().int8_vectorwise_dequant(weight.data, scales)
    return weight


class FrozenLinear:
    """The frozen base of a LoRA layer as qlorakit's kernels take it: `dense(compute)`, the weight in the compute
    dtype, `bias`, and `name` for messages. The module is read at each call, so a weight replaced or moved later is seen."""

    __slots__ = ("module", "name")

    def __init__(self, module: torch.nn.Module, name: str = "a frozen base layer"):
        self.module, self.name = module, name

    @property
    def bias(self):
        return self.module.bias

    def dense(self, compute: torch.dtype) -> torch.Tensor:
        dense = dequantize(self.module)
        if weight_kind(self.module.weight) == "int8":  # the fp32 codes x scales product, not a stored dtype
            from ..precision import dequantized_to  # (here, not per call: precision imports this module)

            dense = dense.to(dequantized_to("int8", compute))
        return dense


def supported_base(module: torch.nn.Module) -> str | None:
    """None when `module` is a frozen linear base the fused kernels compute exactly (4-bit, LLM.int8 or a plain
    torch.nn.Linear, nothing trainable), else why not."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return "the base layer has no weight"
    if weight.requires_grad:
        return "the base weight is trainable"
    bias = getattr(module, "bias", None)
    if bias is not None and bias.requires_grad:
        return "the base bias is trainable"
    if type(module) is torch.nn.Linear:
        return None
    kind = weight_kind(weight)
    if kind == "4bit":
        return None if quant_state(weight) is not None else "the 4-bit weight is not quantized yet"
    if is_quantized_linear(module):
        if kind is None:
            return ("the 8-bit layer keeps fp16 weights (has_fp16_weights)" if isinstance(weight, _classes()[1])
                    else "the quantized layer's weight is not quantized")
        return None
    # A subclass may compute something else than x·Wᵀ + b.
    return f"the base layer is a {type(module).__name__}, not a Linear qlorakit's kernels compute"


# -- serialized weights (merge reads a saved quantized base tensor by tensor) ---------------------------------


def dequantize_serialized_4bit(codes: torch.Tensor, state: dict, dequantized: torch.dtype | None) -> torch.Tensor:
    """A 4-bit weight saved by bitsandbytes (its codes and `weight.quant_state.*` tensors, names without the
    prefix) as a dense tensor in `dequantized` (None: the dtype it was quantized in)."""
    f = functional()
    quant_state_ = f.QuantState.from_dict(state, device=torch.device("cpu"))
    if dequantized is not None:
        quant_state_.dtype = dequantized
    return f.dequantize_4bit(codes, quant_state_)


def dequantize_serialized_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An LLM.int8 weight saved by bitsandbytes (codes and SCB row scales) as a dense fp32 tensor."""
    return functional().int8_vectorwise_dequant(codes, scales)


def quantize_dequantize(weight: torch.Tensor, quant: str, double_quant: bool, blocksize: int,
                        dequantized: torch.dtype) -> torch.Tensor:
    """`weight` as a layer quantized from it dequantizes: bitsandbytes' own calls, with the arguments its Params4bit
    (quant 'nf4'/'fp4') and Int8Params ('int8') use when transformers quantizes a model."""
    f = functional()
    if quant == "int8":
        codes, scales, _ = f.int8_vectorwise_quant(weight)
        return f.int8_vectorwise_dequant(codes, scales).to(dequantized)
    codes, state = f.quantize_4bit(weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                   quant_type=quant, quant_storage=torch.uint8)
    state.dtype = dequantized
    return f.dequantize_4bit(codes, state)
