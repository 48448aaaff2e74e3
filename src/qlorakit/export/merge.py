"""`qlorakit merge`: base weights + LoRA delta -> a standard transformers model directory in 16 or 32 bits.

The base is, by default, the one the adapter was trained against (the source quantized as training quantized it,
dequantized; see source.QuantizedBase), or on request the source's unquantized weights; the delta is added in
fp32 (never re-quantized: that would round it away), and each tensor is cast and written shard by shard. The
output needs only transformers to load: config.json without any quantization_config, safetensors shards with an
index when there are several, the tokenizer with the chat template the model was trained with, and a model
card (README.md: model_card.merged_card).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import struct
from pathlib import Path

import torch

from ..errors import ConfigError, show
from ..model_card import merged_card
from ..outputs import check_output, staged_output
from ..precision import DEFAULT_SAVED_DTYPE, DTYPE_NAMES, is_dtype_name, parse_dtype, torch_config_name
from .source import ModelTensors, check_base, merge_base, merged_tensors, read_lora

# What a merged model is saved in unless asked otherwise: 16 bits, with fp32's exponent range.


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    if text.isdigit():
        return int(text)
    raise ConfigError(f"max_shard_size={size!r}: give a size such as 5GB, 500MB or 2GiB")


def output_dtype(dtype: str) -> torch.dtype:
    """The dtype a merged model is saved in: one of precision.DTYPE_NAMES (or its long name, bfloat16...)."""
    if not is_dtype_name(dtype):
        raise ConfigError(f"dtype={show(dtype)}: a merged model is saved in one of {', '.join(DTYPE_NAMES)}")
    return parse_dtype(dtype)


def resolve_adapter(adapter: str | Path, model: str | None = None):
    """(adapter LoRA weights, base model directory, the base the adapter names) for an adapter directory;
    `model` overrides the base the adapter was trained on."""
    from ..adapters import adapter_base, read_adapter_info
    from ..load import resolve_source

    info = read_adapter_info(adapter)
    base = model or adapter_base(info, adapter)
    return read_lora(adapter), resolve_source(base), info["peft"].get("base_model_name_or_path")


def save_tokenizer(source_dir: Path, output: Path) -> None:
    """The source's tokenizer, with the chat template qlorakit trains and chats with (the source's own, or
    qlorakit's ChatML default when it has none)."""
    from transformers import AutoTokenizer

    from ..data.tokenize import chat_template

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    tokenizer.chat_template = chat_template(tokenizer)
    tokenizer.save_pretrained(output)
    generation = source_dir / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, output / generation.name)  # the umask's mode, not the source's


def _write_config(source_dir: Path, output: Path, dtype: torch.dtype) -> None:
    config = json.loads((source_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = torch_config_name(dtype)
    config.pop("torch_dtype", None)
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@functools.cache
def _safetensors_code(dtype: torch.dtype) -> str:
    """The name safetensors gives `dtype` in a file header ('BF16', 'F32', 'I64'...), read from the header the
    library itself writes for an empty tensor, so the streaming writer below spells every dtype as it does."""
    from safetensors.torch import save

    data = save({"t": torch.empty(0, dtype=dtype)})
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])["t"]["dtype"]


def _write_shard(path: Path, entries: list[tuple[str, tuple, torch.dtype]], tensors) -> None:
    """A safetensors file written tensor by tensor: the header comes from the shapes and dtypes planned ahead,
    then each tensor's bytes are appended as `tensors` yields it, so only one tensor is ever in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _safetensors_code(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for (name, shape, dtype), (got, tensor) in zip(entries, tensors):
            assert got == name and tuple(tensor.shape) == tuple(shape), (name, got)
            data = tensor.to(dtype).contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().tobytes())


def _write_shards(source: ModelTensors, tensors, output: Path, dtype: torch.dtype, max_shard_bytes: int, log) -> int:
    """Write the (name, tensor) pairs of `tensors` (in `source.names` order) as safetensors shards of at most
    max_shard_bytes (a larger single tensor gets a shard of its own); floating tensors are cast to `dtype`.
    Returns the number of bytes written."""
    shards, current, size, total = [], [], 0, 0
    for name in source.names:
        shape, stored = source.shape(name), source.dtype(name)
        out_dtype = dtype if stored.is_floating_point else stored
        nbytes = math.prod(shape) * torch.empty((), dtype=out_dtype).element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), out_dtype))
        size += nbytes
        total += nbytes
    if current:
        shards.append(current)
    stream = iter(tensors)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file_name, entries in zip(names, shards):
        _write_shard(output / file_name, entries, (next(stream) for _ in entries))
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, entries in zip(names, shards) for name, _, _ in entries}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    log(f"wrote {total / 1e6:.1f} MB in {len(shards)} shard{'s' if len(shards) > 1 else ''}")
    return total


def merge(adapter: str | Path, output: str | Path, dtype: str = DEFAULT_SAVED_DTYPE, model: str | None = None,
          max_shard_size: str | int = "5GB", overwrite: bool = False, base: str = "quantized", log=print) -> Path:
    """Merge a LoRA adapter into its base and save a standard safetensors model directory at `output`.

    `base` is what the delta is added to: 'quantized' (the default), the base the adapter was trained against —
    the source quantized and dequantized exactly as the training run did (qlorakit.json in the adapter says how),
    so the merged model answers as the trained and evaluated one; or 'original', the source's unquantized weights.
    An adapter without qlorakit.json (trained outside qlorakit) needs base='original'. `model` overrides the base
    model the adapter names (with base='quantized' it is quantized as recorded, or its stored bitsandbytes codes
    are used); `dtype` is bf16, fp16 or fp32. Returns the directory, which
    `AutoModelForCausalLM.from_pretrained` loads without qlorakit."""
    torch_dtype = output_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    check_base(base)
    output = check_output(output, "merge", overwrite)  # before any work; staged_output checks again under its lock
    lora, source_dir, trained_on = resolve_adapter(adapter, model)
    source = merge_base(adapter, source_dir, base)
    tensors = merged_tensors(source, lora, trained_on)
    log(f"merging {len(lora)} LoRA layers from {adapter} into {source.description} of {source_dir} ({dtype})")
    with staged_output(output, "merge", overwrite) as staging:
        _write_shards(source, tensors, staging, torch_dtype, max_bytes, log)
        _write_config(source_dir, staging, torch_dtype)
        save_tokenizer(source_dir, staging)
        settings = {"output": output, "dtype": dtype, "base": base, "model": model, "max_shard_size": max_shard_size}
        card = merged_card(adapter, source_dir, model or trained_on, settings)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return output
