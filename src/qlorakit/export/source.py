"""The weights to export, one tensor at a time: a model directory's tensors in fp32 (dequantized when the directory
holds a bitsandbytes checkpoint) with a LoRA adapter's delta, s·B·A, added in fp32.

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

from ..errors import ConfigError, SourceError

_QUANT_STATE_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_SAFETENSORS_TO_TORCH = {"F32": torch.float32, "F16": torch.float32, "BF16": torch.float32, "F64": torch.float32,
                         "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                         "U8": torch.uint8, "BOOL": torch.bool}


class ModelTensors:
    """The tensors of a Hugging Face model directory (safetensors), read lazily, each as a dense fp32 tensor:
    bitsandbytes 4-bit weights (with their quant-state entries) and int8 weights (with their row scales) are
    dequantized; everything else is read as stored."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
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
            return torch.float32
        stored = self._handles[self._file_of[name]].get_slice(name).get_dtype()
        return _SAFETENSORS_TO_TORCH.get(stored, torch.float32)

    def quantized(self, name: str) -> str | None:
        return self._quant.get(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` in fp32 (integer tensors as stored)."""
        kind = self._quant.get(name)
        if kind == "4bit":
            import bitsandbytes.functional as bnbf

            state = {k[len(name) + 1:]: self._raw(k) for k in self._file_of if k.startswith(f"{name}.")}
            quant_state = bnbf.QuantState.from_dict(state, device=torch.device("cpu"))
            return bnbf.dequantize_4bit(self._raw(name), quant_state).float()
        if kind == "int8":
            import bitsandbytes.functional as bnbf

            scales = self._raw(f"{name[:-len('weight')]}SCB")
            return bnbf.int8_vectorwise_dequant(self._raw(name), scales).float()
        tensor = self._raw(name)
        return tensor.float() if tensor.is_floating_point() else tensor


# ---------------------------------------------------------------------------------------------- adapters


@dataclass
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    def delta(self) -> torch.Tensor:
        """s·B·A in fp32, [out, in]."""
        return (self.b.float() @ self.a.float()) * self.scale


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")


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
        if match is None:
            raise ConfigError(
                f"{file}: holds {key!r}, which is not a LoRA A/B weight of a linear layer (embedding LoRA and "
                f"modules_to_save are not supported by qlorakit's merge)"
            )
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    lora = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ConfigError(f"{file}: {module} has lora_{'A' if 'A' in pair else 'B'} but not its partner")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(f"{file}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                              f"form a rank-r product B·A")
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        lora[f"{module}.weight"] = LoraWeights(a, b, float(scale))
    if not lora:
        raise ConfigError(f"{file}: no LoRA weights in it")
    return lora


def merged_tensors(source: ModelTensors, lora: dict[str, LoraWeights] | None, adapter_base: str | None = None):
    """(name, fp32 tensor) for every tensor of `source`, with the LoRA delta added where the adapter has one.
    Checks first that every adapter weight meets a base weight of the right shape."""
    lora = lora or {}
    known = set(source.names)
    trained_on = f"; the adapter was trained on {adapter_base!r}" if adapter_base else ""
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
    for name in source.names:
        tensor = source.get(name)
        if name in lora:
            tensor = tensor + lora[name].delta()
        yield name, tensor
