"""`qlorakit merge`: base weights + LoRA delta -> a standard transformers model directory in 16 or 32 bits.

The base is read unquantized from its source (a bitsandbytes source is dequantized, never the 4-bit copy training
used: merging into quantized weights would round the delta away), the delta is added in fp32, and each tensor is
cast and written shard by shard. The output needs only transformers to load: config.json without any
quantization_config, safetensors shards with an index when there are several, the tokenizer with the chat template
the model was trained with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from .source import ModelTensors, merged_tensors, read_lora

OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CONFIG_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


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
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype={dtype!r}: a merged model is saved in one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[dtype]


def resolve_adapter(adapter: str | Path, model: str | None = None):
    """(adapter LoRA weights, base model directory, the base the adapter names) for an adapter directory;
    `model` overrides the base the adapter was trained on."""
    from ..adapters import adapter_base, read_adapter_info
    from ..load import resolve_source

    info = read_adapter_info(adapter)
    base = model or adapter_base(info, adapter)
    return read_lora(adapter), resolve_source(base), info["peft"].get("base_model_name_or_path")


def prepare_output(output: str | Path, overwrite: bool, what: str) -> Path:
    output = Path(output).expanduser()
    if output.exists() and (output.is_file() or any(output.iterdir())) and not overwrite:
        raise ConfigError(f"{output}: already exists and is not empty; choose another {what} or pass --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def replace_atomically(staging: Path, output: Path) -> None:
    """Move a finished staging directory or file into place; an earlier output is removed only once the new one
    is complete."""
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(staging, output)


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
        shutil.copy2(generation, output / generation.name)


def _write_config(source_dir: Path, output: Path, dtype: torch.dtype) -> None:
    config = json.loads((source_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = _CONFIG_DTYPE[dtype]
    config.pop("torch_dtype", None)
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_shards(tensors, output: Path, dtype: torch.dtype, max_shard_bytes: int, log) -> int:
    """Write (name, tensor) pairs as safetensors shards of at most max_shard_bytes (a larger single tensor gets
    a shard of its own); returns the number of bytes written."""
    from safetensors.torch import save_file

    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            path = output / f".shard-{len(shards):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            shards.append((path, list(current)))
            current, size = {}, 0

    for name, tensor in tensors:
        out = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor.contiguous()
        nbytes = out.numel() * out.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = out
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        os.replace(shards[0][0], output / "model.safetensors")
    else:
        weight_map = {}
        for i, (path, names) in enumerate(shards, start=1):
            final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            os.replace(path, output / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    log(f"wrote {total / 1e6:.1f} MB in {len(shards)} shard{'s' if len(shards) > 1 else ''}")
    return total


def merge(adapter: str | Path, output: str | Path, dtype: str = "bf16", model: str | None = None,
          max_shard_size: str | int = "5GB", overwrite: bool = False, log=print) -> Path:
    """Merge a LoRA adapter into its base and save a standard safetensors model directory at `output`.

    `model` overrides the base model the adapter names; `dtype` is bf16, fp16 or fp32. Returns the directory,
    which `AutoModelForCausalLM.from_pretrained` loads without qlorakit."""
    torch_dtype = output_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    output = prepare_output(output, overwrite, "--output")
    lora, source_dir, trained_on = resolve_adapter(adapter, model)
    source = ModelTensors(source_dir)
    tensors = merged_tensors(source, lora, trained_on)
    log(f"merging {len(lora)} LoRA layers from {adapter} into {source_dir} ({dtype})")
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        _write_shards(tensors, staging, torch_dtype, max_bytes, log)
        _write_config(source_dir, staging, torch_dtype)
        save_tokenizer(source_dir, staging)
        replace_atomically(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
