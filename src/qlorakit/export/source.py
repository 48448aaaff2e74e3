"""The weights to export, one tensor at a time: a model directory's tensors in fp32 (dequantized when the directory
holds a bitsandbytes checkpoint) with a LoRA adapter's delta, s·B·A, added in fp32.

Two bases an adapter can be merged into: `quantized` (QuantizedBase), the weights exactly as the training run held
them — quantized by bitsandbytes as recorded in the adapter's qlorakit.json and dequantized to the compute dtype,
the base the adapter learned to correct and the model that was evaluated — and `original`, the source's
unquantized weights.

Nothing here holds more than one fp32 tensor at once, so merging an 8B model needs about as much memory as its
largest matrix, not two copies of the model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..choices import BASES  # re-exported: its home is torch-free, for the CLI's parser
from ..errors import ConfigError, SourceError, show
from ..precision import DTYPE_NAMES, EXPORT_DTYPE, dequantized_to, frozen_dtype, quantized_from
from ..upstream import bitsandbytes as bnb

_QUANT_STATE_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_SAFETENSORS_TO_TORCH = {"F32": EXPORT_DTYPE, "F16": EXPORT_DTYPE, "BF16": EXPORT_DTYPE, "F64": EXPORT_DTYPE,
                         "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                         "U8": torch.uint8, "BOOL": torch.bool}


class ModelTensors:
    """The tensors of a Hugging Face model directory (safetensors), read lazily, each as a dense fp32 tensor:
    bitsandbytes 4-bit weights (with their quant-state entries) and int8 weights (with their row scales) are
    dequantized; everything else is read as stored."""

    def __init__(self, directory: str | Path, compute: torch.dtype | None = None):
        from safetensors import safe_open

        self.directory = Path(directory)
        # bitsandbytes weights dequantize as a training run in this compute dtype dequantizes them (precision.
        # dequantized_to); None: to the dtype their quant state records.
        self.compute = compute
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{self.directory}: no *.safetensors weights to export")
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self._file_of = {key: f for f, handle in self._handles.items() for key in handle.keys()}
        keys = set(self._file_of)
        aux, self._quant = set(), {}
        for key in keys:
            if key.endswith(".weight") and f"{key}.absmax" in keys:
                state = [k for k in keys if k.startswith(f"{key}.quant_state.")]
                self._quant[key] = "4bit"
                aux.update(k for k in (f"{key}.{s}" for s in _QUANT_STATE_4BIT) if k in keys)
                aux.update(state)
            elif key.endswith(".weight") and f"{key[:-len('weight')]}SCB" in keys:
                self._quant[key] = "int8"
                aux.update(k for k in (f"{key[:-len('weight')]}SCB", f"{key}_format") if k in keys)
        # The checkpoint's own order (transformers writes module order), which GGUF and shards follow.
        order = {key: i for i, key in enumerate(k for handle in self._handles.values() for k in handle.keys())}
        self.names = sorted((k for k in keys if k not in aux), key=order.get)

    def _raw(self, key: str) -> torch.Tensor:
        return self._handles[self._file_of[key]].get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        kind = self._quant.get(name)
        if kind == "4bit":
            state = next(k for k in self._file_of if k.startswith(f"{name}.quant_state."))
            return tuple(json.loads(bytes(self._raw(state).tolist()).decode())["shape"])
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `get` returns: fp32 for floating and quantized weights, the stored one otherwise."""
        if name in self._quant:
            return EXPORT_DTYPE
        stored = self._handles[self._file_of[name]].get_slice(name).get_dtype()
        return _SAFETENSORS_TO_TORCH.get(stored, EXPORT_DTYPE)

    def quantized(self, name: str) -> str | None:
        return self._quant.get(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` in fp32 (integer tensors as stored)."""
        kind = self._quant.get(name)
        if kind == "4bit":
            state = {k[len(name) + 1:]: self._raw(k) for k in self._file_of if k.startswith(f"{name}.")}
            dequantized = None if self.compute is None else dequantized_to("4bit", self.compute)  # as Precision.apply
            return bnb.dequantize_serialized_4bit(self._raw(name), state, dequantized).to(EXPORT_DTYPE)
        if kind == "int8":
            dense = bnb.dequantize_serialized_int8(self._raw(name), self._raw(f"{name[:-len('weight')]}SCB"))
            return (dense if self.compute is None else dense.to(dequantized_to("int8", self.compute))).to(EXPORT_DTYPE)
        tensor = self._raw(name)
        return tensor.to(EXPORT_DTYPE) if tensor.is_floating_point() else tensor


# ---------------------------------------------------------------------------------------------- the base

class QuantizedBase:
    """A model directory's tensors as the training run held them, in fp32 like ModelTensors: every floating tensor
    rounded to the compute dtype, and every weight bitsandbytes quantized replaced by its dequantized codes. A plain
    source is quantized here one tensor at a time exactly as qlorakit.load quantizes it (the weight cast to the
    compute dtype, then bitsandbytes' 4-bit blockwise quantization, blocksize 64, or LLM.int8's row-wise one from
    fp16); a bitsandbytes checkpoint's stored codes are the trained base already. Codes are computed on the CPU:
    a base quantized on a GPU may differ in a value that lies exactly between two codes."""

    def __init__(self, directory: str | Path, quant: str, double_quant: bool, compute: torch.dtype):
        from ..precision import dtype_name

        self.tensors = ModelTensors(directory, compute=compute)
        self.directory, self.names = self.tensors.directory, self.tensors.names
        self.shape, self.dtype, self.quantized = self.tensors.shape, self.tensors.dtype, self.tensors.quantized
        self.quant, self.double_quant, self.compute = quant, double_quant, compute
        stored = any(self.tensors.quantized(name) for name in self.names)
        self._to_quantize = set() if stored or quant == "none" else _quantized_by_training(self.directory, quant)
        missing = sorted(self._to_quantize - set(self.names))
        if missing:
            raise ConfigError(
                f"{self.directory}: training quantizes {missing[0]}, which the checkpoint does not hold under that "
                "name, so the quantized base cannot be rebuilt; merge into the original weights with --base original"
            )
        kind = f"{quant}{'+dq' if double_quant and quant != 'int8' else ''}"
        self.description = (f"the stored {quant} codes" if stored else "the weights" if quant == "none" else
                            f"the weights quantized to {kind}") + f" in {dtype_name(compute)}, as trained"

    def get(self, name: str) -> torch.Tensor:
        tensor = self.tensors.get(name)
        if not tensor.is_floating_point():
            return tensor
        tensor = tensor.to(frozen_dtype(self.compute))  # what from_pretrained(dtype=compute) and Precision hold
        if name in self._to_quantize:
            tensor = _quantize_dequantize(tensor, self.quant, self.double_quant, self.compute)
        return tensor.to(EXPORT_DTYPE)


def _quantize_dequantize(weight: torch.Tensor, quant: str, double_quant: bool, compute: torch.dtype) -> torch.Tensor:
    """The weight as a layer quantized from it dequantizes in the fused LoRA kernel: bitsandbytes' own calls, with
    the arguments its Params4bit / Int8Params use when transformers quantizes a model."""
    from ..load import BLOCKSIZE_4BIT

    return bnb.quantize_dequantize(weight.to(quantized_from(quant, compute)), quant, double_quant, BLOCKSIZE_4BIT,
                                   dequantized_to(quant, compute))


def _quantized_by_training(directory: Path, quant: str) -> set[str]:
    """The weights qlorakit.load quantizes in this model: transformers' bitsandbytes integration asked on an empty
    (meta-device) model built from config.json — every linear layer except the output head and what the
    architecture keeps unquantized."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    from ..load import _bnb_config
    from ..precision import Precision

    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise ConfigError(
            f"{directory}: cannot build the model from config.json to tell which layers training quantized "
            f"({show(str(e).splitlines()[0] if str(e) else type(e).__name__)}); merge into the original weights "
            "with --base original"
        ) from None
    settings = _bnb_config(quant, False, Precision(EXPORT_DTYPE, EXPORT_DTYPE))  # (only which layers it quantizes)
    AutoHfQuantizer.from_config(settings, pre_quantized=False).preprocess_model(model, device_map={"": "cpu"})
    return {f"{name}.weight" for name, module in model.named_modules() if bnb.is_quantized_linear(module)}


def _trained_as(adapter_dir: Path, info: dict) -> tuple[str, bool, torch.dtype]:
    """(quant, double_quant, compute dtype) of the training run, from the adapter's qlorakit.json."""
    from ..load import QUANT_KINDS
    from ..precision import parse_dtype

    saved = info["qlorakit"]
    if not saved:
        raise ConfigError(
            f"{adapter_dir}: no qlorakit.json, so how the base was quantized in training is unknown (an adapter "
            "trained outside qlorakit); merge into the original unquantized weights with --base original "
            "(base='original')"
        )
    where = adapter_dir / "qlorakit.json"
    checks = (("quant", lambda v: v in QUANT_KINDS, ", ".join(QUANT_KINDS)),
              ("double_quant", lambda v: isinstance(v, bool), "true or false"),
              ("dtype", lambda v: v in DTYPE_NAMES, ", ".join(DTYPE_NAMES)))
    for field, valid, expected in checks:
        if field not in saved or not valid(saved[field]):
            got = f"is {show(saved[field])}" if field in saved else "is missing"
            raise ConfigError(f"{where}: {field!r} {got} (expected {expected}), so the quantized base the adapter "
                              "was trained against cannot be rebuilt; fix the file or merge into the original "
                              "weights with --base original")
    return saved["quant"], saved["double_quant"], parse_dtype(saved["dtype"])


def check_base(base: str) -> None:
    if base not in BASES:
        raise ConfigError(f"base={show(base)}: merge into 'quantized' (the base the adapter was trained against, "
                          "the default) or 'original' (the unquantized source weights)")


def merge_base(adapter_dir: str | Path, source_dir: Path, base: str = "quantized"):
    """The base tensors to add `adapter_dir`'s LoRA delta to: `quantized`, the base as its training run held it
    (QuantizedBase, settings from the adapter's qlorakit.json), or `original`, the source's weights unquantized
    (a bitsandbytes checkpoint, which has no others, dequantized). Each has `description` for the log."""
    import json
    from types import SimpleNamespace

    from ..adapters import read_adapter_info
    from ..load import _stored_quantization

    check_base(base)
    adapter_dir = Path(adapter_dir)
    if base == "original":
        tensors = ModelTensors(source_dir)
        stored = any(tensors.quantized(name) for name in tensors.names)
        tensors.description = "the stored quantized weights (the checkpoint has no others)" if stored else \
            "the original unquantized weights"
        return tensors
    quant, double_quant, compute = _trained_as(adapter_dir, read_adapter_info(adapter_dir))
    config = json.loads((Path(source_dir) / "config.json").read_text())
    stored = _stored_quantization(SimpleNamespace(quantization_config=config.get("quantization_config")))
    if stored is not None and stored[0] != quant:
        raise ConfigError(
            f"{source_dir} is quantized as {stored[0]} with bitsandbytes, but the adapter was trained on a {quant} "
            f"base ({adapter_dir / 'qlorakit.json'}): pass the base it was trained on with --model, or merge into "
            "these weights as stored with --base original"
        )
    return QuantizedBase(source_dir, quant, double_quant, compute)


# ---------------------------------------------------------------------------------------------- adapters


@dataclass
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    bias: torch.Tensor | None = None  # [out]: lora_B's bias (PEFT's lora_bias=True)

    def delta(self) -> torch.Tensor:
        """s·B·A in fp32, [out, in]."""
        return (self.b.to(EXPORT_DTYPE) @ self.a.to(EXPORT_DTYPE)) * self.scale

    def bias_delta(self) -> torch.Tensor:
        """s·b_B in fp32, [out]: what PEFT's merge adds to the base layer's bias."""
        return self.bias.to(EXPORT_DTYPE) * self.scale


_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.(?P<kind>weight|bias)$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path ending in it (regex allowed)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora(adapter_dir: str | Path) -> dict[str, LoraWeights]:
    """An adapter's LoRA weights keyed by the base weight they modify (`model.layers.0.self_attn.q_proj.weight`),
    with PEFT's scaling (alpha/r, alpha/sqrt(r) for rsLoRA, per-module rank and alpha patterns). Refuses what
    cannot be merged as a plain linear delta (DoRA, embedding LoRA, fully trained modules, fan_in_fan_out)."""
    from safetensors.torch import load_file

    from ..adapters import read_adapter_info

    adapter_dir = Path(adapter_dir)
    config = read_adapter_info(adapter_dir)["peft"]
    where = adapter_dir / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where}: a {config.get('peft_type')} adapter; qlorakit merges LoRA adapters")
    for field, why in (("use_dora", "DoRA's magnitude vector"), ("fan_in_fan_out", "transposed (Conv1D) layers")):
        if config.get(field):
            raise ConfigError(f"{where}: {field}=true ({why}) is not supported by qlorakit's merge; merge it with "
                              f"PEFT's merge_and_unload instead")
    file = adapter_dir / "adapter_model.safetensors"
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{file}: cannot read the adapter weights ({e})") from None
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None or (match["kind"] == "bias" and match["ab"] == "A"):
            raise ConfigError(
                f"{file}: holds {show(key)}, which is not a LoRA A/B weight (or lora_B bias) of a linear layer "
                f"(embedding LoRA and modules_to_save are not supported by qlorakit's merge)"
            )
        part = "bias" if match["kind"] == "bias" else match["ab"]
        pairs.setdefault(match["module"], {})[part] = tensor
    lora = {}
    for module, pair in pairs.items():
        if {"A", "B"} - set(pair):
            raise ConfigError(f"{file}: {module} has lora_{'A' if 'A' in pair else 'B'} but not its partner")
        a, b, bias = pair["A"], pair["B"], pair.get("bias")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(f"{file}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                              f"form a rank-r product B·A")
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise ConfigError(f"{file}: {module}: lora_B's bias is {tuple(bias.shape)}, not ({b.shape[0]},) "
                              "like lora_B's rows")
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        lora[f"{module}.weight"] = LoraWeights(a, b, float(scale), bias)
    if not lora:
        raise ConfigError(f"{file}: no LoRA weights in it")
    return lora


def merged_tensors(source: ModelTensors, lora: dict[str, LoraWeights] | None, adapter_base: str | None = None):
    """(name, fp32 tensor) for every tensor of `source`, with the LoRA delta added where the adapter has one.
    Checks first that every adapter weight meets a base weight of the right shape."""
    lora = lora or {}
    known = set(source.names)
    trained_on = f"; the adapter was trained on {show(adapter_base)}" if adapter_base else ""
    for name, weights in lora.items():
        if name not in known:
            raise ConfigError(
                f"the adapter modifies {name}, which {source.directory} does not have: it is not this adapter's "
                f"base model{trained_on}"
            )
        shape = source.shape(name)
        expected = (weights.b.shape[0], weights.a.shape[1])
        if tuple(shape) != expected:
            raise ConfigError(
                f"the adapter's {name} is {expected[0]}x{expected[1]} (lora_B {tuple(weights.b.shape)} · lora_A "
                f"{tuple(weights.a.shape)}) but {source.directory} has {shape[0]}x{shape[1]}: not this adapter's "
                f"base model{trained_on}"
            )
    biases = {}  # base bias name -> the LoRA whose lora_B bias is added to it, as PEFT's merge does
    for name, weights in lora.items():
        if weights.bias is None:
            continue
        bias_name = f"{name[:-len('weight')]}bias"
        if bias_name not in known:
            raise ConfigError(
                f"the adapter was trained with lora_bias=True: its {name[:-len('.weight')]} has a lora_B bias, which "
                f"a merge adds to the layer's bias, but that layer has no bias in {source.directory} (adding one "
                "would change the architecture); use the adapter unmerged (qlorakit chat/eval --adapter), or train "
                "without lora_bias"
            )
        if tuple(source.shape(bias_name)) != tuple(weights.bias.shape):
            raise ConfigError(f"the adapter's lora_B bias of {name} has {tuple(weights.bias.shape)} values but "
                              f"{source.directory}'s {bias_name} has {tuple(source.shape(bias_name))}: not this "
                              f"adapter's base model{trained_on}")
        biases[bias_name] = weights
    for name in source.names:
        tensor = source.get(name)
        if name in lora:
            tensor = tensor + lora[name].delta()
        elif name in biases:
            tensor = tensor + biases[name].bias_delta()
        yield name, tensor
