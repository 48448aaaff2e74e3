"""bitsandbytes: what kind of quantized weight a layer holds, its dense value, and the Linear4bit flags the
precision policy pins.

Recognition is by class (`isinstance` against bitsandbytes' own Params4bit and Int8Params), checked once to exist:
had bitsandbytes renamed them, a class-name comparison would find no quantized layer and every check built on it
would pass without checking anything.

Under FSDP (distributed.shard) a 4-bit layer's weight is no longer a Params4bit: between forwards it is this rank's
DTensor shard of the packed codes, inside the layer's forward and backward the plain tensor FSDP gathered. Such a
layer is recognised through the QuantState bitsandbytes keeps on the Linear4bit itself (`module.quant_state`, the
copy its own forward re-attaches after FSDP), checked against the codes' size.
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
    """'4bit' / 'int8' for a quantized linear layer (its own weight is quantized, or sharded by FSDP), None
    otherwise."""
    weight = own_weight(module)
    kind = weight_kind(weight)
    if kind == "4bit" and quant_state(module.weight) is None:
        return None  # not quantized yet (still on the meta device, or before .to() quantizes it)
    if kind is None and weight is not None and sharded_4bit(module):
        return "4bit"
    return kind


def is_dtensor(tensor) -> bool:
    """A torch DTensor (FSDP's shard of a parameter): this rank holds a part of it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed has none
        return False
    return isinstance(tensor, DTensor)


def sharded_4bit(module: torch.nn.Module) -> bool:
    """Whether `module` is a quantized Linear4bit whose weight FSDP replaced (a DTensor shard, or the plain tensor it
    gathered for a forward): packed codes whose size matches the QuantState kept on the layer."""
    _, _, linear4bit, _, _ = _classes()
    weight = own_weight(module)
    # exactly what FSDP puts there (a Params4bit renamed upstream is not taken for one: its layers go unrecognised,
    # and the policy check then refuses a quantized model with none)
    if not isinstance(module, linear4bit) or not (is_dtensor(weight) or type(weight) in (torch.Tensor,
                                                                                         torch.nn.Parameter)):
        return False
    state = module_quant_state(module)
    if state is None:
        return False  # a Linear4bit whose weight was never quantized
    shape = tuple(require(PACKAGE, state, "shape", "QuantState"))
    values = 1
    for size in shape:
        values *= int(size)
    # two 4-bit codes a byte, packed into the storage dtype; the weight's [bytes / itemsize, 1] (its global shape
    # when sharded)
    if weight.dim() != 2 or weight.shape[1] != 1 or weight.numel() * weight.element_size() != (values + 1) // 2:
        raise changed(PACKAGE, "how a Linear4bit stores its codes",
                      f"a layer's weight of shape {list(weight.shape)} ({weight.dtype}) is not the packed codes of "
                      f"its QuantState's shape {list(shape)}")
    return True


def module_quant_state(module: torch.nn.Module):
    """The QuantState bitsandbytes keeps on a Linear4bit (set when its weight is quantized) for a weight that lost
    its own, as FSDP's do."""
    return require(PACKAGE, module, "quant_state", "Linear4bit")


def layer_quant_state(module: torch.nn.Module):
    """The QuantState of a 4-bit layer: its Params4bit's, or the layer's own when FSDP replaced the weight."""
    weight = module.weight
    if weight_kind(weight) == "4bit":
        return quant_state(weight)
    if sharded_4bit(module):
        return module_quant_state(module)
    return quant_state(weight)  # (raises the UpstreamError naming Params4bit.quant_state)


def keep_quant_state_on_layer(module: torch.nn.Module) -> None:
    """Before FSDP replaces a 4-bit layer's Params4bit: the layer's own QuantState made the weight's (the one the
    precision policy pinned), which is what qlorakit, and bitsandbytes' forward, read afterwards."""
    state = quant_state(module.weight)
    module_quant_state(module)  # the attribute exists
    module.quant_state = state


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
    state = layer_quant_state(module)
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
    state = layer_quant_state(module)
    require(PACKAGE, state, "dtype", "QuantState")
    for flag in _LINEAR4BIT_FLAGS:
        require(PACKAGE, module, flag, "Linear4bit")
    state.dtype = dequantized
    module.compute_dtype = compute
    module.compute_type_is_set = True
    module.support_avx512bf16_for_cpu = False


def pinned_compute(module) -> tuple[torch.dtype, torch.dtype]:
    """(dequantized dtype, compute dtype) of a 4-bit layer."""
    return layer_quant_state(module).dtype, require(PACKAGE, module, "compute_dtype", "Linear4bit")


def repacked_for_cpu(layer) -> bool:
    """Whether bitsandbytes repacked this 4-bit layer (or weight) for its bf16 CPU inference kernel (block scales
    rounded). Pass the layer: a weight FSDP sharded has no QuantState of its own."""
    state = layer_quant_state(layer) if isinstance(layer, torch.nn.Module) else quant_state(layer)
    return bool(getattr(state, "packing_format_for_cpu", False))


# -- dense values --------------------------------------------------------------------------------------------


def dequantize(module: torch.nn.Module) -> torch.Tensor:
    """The dense [out, in] weight of a linear layer: a 4-bit weight in its quant_state's dtype, an LLM.int8 weight
    in fp32 (bitsandbytes computes codes x row scales in fp32), a plain weight as it is."""
    weight = module.weight
    kind = weight_kind(weight)
    if kind is None and sharded_4bit(module):
        if is_dtensor(weight):
            from ..errors import TrainingError

            raise TrainingError(
                "a 4-bit layer's weight is sharded across the run's processes (FSDP) and this one holds only a part "
                "of it; it is dequantized inside the layer's forward, where FSDP gathers it whole"
            )
        kind = "4bit"
    if kind == "4bit":
        if repacked_for_cpu(module):
            from ..errors import PrecisionError

            raise PrecisionError(
                "a 4-bit layer was repacked by bitsandbytes for its bf16 CPU inference kernel (its block scales are "
                "now rounded to bf16); load the model through qlorakit.load, which keeps 4-bit layers out of it"
            )
        return functional().dequantize_4bit(weight.data, layer_quant_state(module))
    if kind == "int8":
        # The row scales live on the parameter until bitsandbytes' own forward moves them to the layer's state.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = require(PACKAGE, require(PACKAGE, module, "state", "Linear8bitLt"), "SCB", "MatmulLtState")
        return functional().int8_vectorwise_dequant(weight.data, scales)
    return weight


class FrozenLinear:
    """The frozen base of a LoRA layer as qlorakit's kernels take it: `dense(compute)`, the weight in the compute
    dtype, `bias`, and `name` for messages. The module is read at each call, so a weight replaced or moved later is
    seen."""

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
    if kind is None and sharded_4bit(module):
        return None  # sharded by FSDP: gathered whole inside the layer's forward and backward, where kernels run
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
