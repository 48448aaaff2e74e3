"""`qlorakit export gguf`: a GGUF file for llama.cpp / Ollama, written with the `gguf` Python package — no llama.cpp
build.

Llama-family architectures only (what llama.cpp calls llama — Llama, Mistral, SmolLM — and qwen2, qwen3). The
tensors are streamed: the header is written from the shapes alone, then each tensor is merged (base + LoRA delta
in fp32), converted and appended, so memory holds one tensor at a time. As in llama.cpp's own converter, llama's
q and k projections are permuted from the Hugging Face rotary layout to GGML's, 1-D tensors (norms, biases) stay
fp32, and q8_0 falls back to f16 for a tensor whose rows are not a multiple of the 32-value block.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..choices import GGUF_TYPES  # re-exported: its home is torch-free, for the CLI's parser
from ..errors import ConfigError, SourceError
from ..outputs import GGUF_KEY, check_output, staged_output, version
from ..precision import EXPORT_DTYPE
from .merge import resolve_adapter, save_tokenizer
from .source import ModelTensors, check_base, merge_base, merged_tensors

# Hugging Face model_type -> GGUF architecture (llama.cpp converts Mistral checkpoints as llama).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# The pre-tokenizer llama.cpp must use, recognised from tokenizer.json's pre_tokenizer (llama.cpp hashes the
# tokenizer's output instead; these are the splits of the families qlorakit exports).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_scaling(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    return params | {"rope_type": kind}


def llama3_rope_factors(config) -> np.ndarray:
    """The per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp reads them (rope_freqs.weight): 1
    for high frequencies, `factor` for low ones, a smooth blend between."""
    params = _rope_scaling(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = _rope_theta(config)
    factor, low, high = params["factor"], params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _permute_for_ggml(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half q/k rows -> GGML's interleaved pairs, head by head (transformers' GGUF loader and
    llama.cpp undo/expect exactly this)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _pre_tokenizer(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if _LLAMA3_SPLIT in splits:
        return "llama-bpe"
    if _QWEN2_SPLIT in splits:
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    return "default"


def _prepends_space(tokenizer_json: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (a Prepend normalizer or a Metaspace
    pre-tokenizer that prepends)."""
    def steps(part):
        part = part or {}
        return part.get("normalizers", part.get("pretokenizers", [part]))

    normalizers = steps(tokenizer_json.get("normalizer"))
    pre = steps(tokenizer_json.get("pre_tokenizer"))
    return any(n.get("type") == "Prepend" for n in normalizers) or any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in pre)


def _add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int, pre: str | None = None) -> None:
    """Vocabulary, merges, special tokens and chat template, read with the gguf package's own vocab classes.
    `pre` is llama.cpp's pre-tokenizer name when the source recorded it (a model converted from GGUF)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    try:
        if model.get("type") == "BPE" and not model.get("byte_fallback"):
            vocab, kind, pre = gguf.vocab.BpeVocab(tokenizer_dir), "gpt2", pre or _pre_tokenizer(tokenizer_json)
        else:
            vocab, kind, pre = gguf.vocab.LlamaHfVocab(tokenizer_dir), "llama", pre or "default"
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SourceError(f"{tokenizer_dir / 'tokenizer.json'}: a tokenizer GGUF cannot describe ({e}); qlorakit "
                          "exports byte-level BPE (Llama 3, Qwen, SmolLM) and SentencePiece-style tokenizers") from None
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    for added in tokenizer_json.get("added_tokens", []):  # llama.cpp tells control tokens by their type
        if added["id"] < len(types):
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_add_space_prefix(kind == "llama" and _prepends_space(tokenizer_json))
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    if kind == "llama":
        writer.add_token_scores(scores[:vocab_size])
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=kind == "gpt2", n_vocab=vocab_size)
    # Whether BOS/EOS are added is what the tokenizer does, not what a config key may say (often absent).
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bos is not None and bool(probe) and probe[0] == bos
    special.add_special_token["eos"] = eos is not None and bool(probe) and probe[-1] == eos
    special.add_to_gguf(writer, quiet=True)


def _hyperparameters(writer, config, arch: str, file_type, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    scaling = _rope_scaling(config)
    if scaling["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling["rope_type"] not in ("default", "llama3"):
        raise ConfigError(f"rope scaling {scaling['rope_type']!r} is not exported by qlorakit's GGUF writer "
                          "(default, linear and llama3 are)")


def _tensor_plan(source: ModelTensors, arch_enum, n_layers: int, qtype):
    """(hf name, gguf name, shape, ggml type) for every exported tensor."""
    import gguf

    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    plan = []
    for hf_name in source.names:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta by every loader
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SourceError(f"{source.directory}: tensor {hf_name} has no GGUF counterpart for this architecture")
        shape = tuple(source.shape(hf_name))
        kind = qtype
        if len(shape) == 1:
            kind = gguf.GGMLQuantizationType.F32
        elif kind == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16
        plan.append((hf_name, gguf_name, shape, kind))
    return plan


def _encode(tensor: torch.Tensor, kind) -> np.ndarray:
    import gguf

    data = tensor.to(EXPORT_DTYPE).numpy()
    if kind == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, kind)  # BF16 and Q8_0 as raw bytes


def _nbytes(shape, kind) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(shape)) // block * size


def export_gguf(output: str | Path, adapter: str | Path | None = None, model: str | Path | None = None,
                gguf_type: str = "f16", overwrite: bool = False, base: str = "quantized", log=print) -> Path:
    """Write `output` (.gguf) from an adapter merged into its base (`adapter`, with `model` overriding the base)
    or from a model directory (`model` alone, e.g. the output of `qlorakit merge`). With an adapter, `base` is
    what its delta is added to, as in `merge`: 'quantized' (the base it was trained against) or 'original'."""
    import gguf
    from transformers import AutoConfig

    from ..load import gguf_origin, resolve_source

    if not isinstance(gguf_type, str) or gguf_type not in GGUF_TYPES:
        raise ConfigError(f"type={gguf_type!r}: a GGUF export is one of {', '.join(GGUF_TYPES)}")
    if adapter is None and model is None:
        raise ConfigError("export gguf needs --adapter DIR (merged into its base on the way) or --model DIR")
    check_base(base)
    if Path(output).suffix.lower() != ".gguf":
        raise ConfigError(f"{output}: name the output file *.gguf")
    output = check_output(output, "gguf", overwrite)  # before any work; staged_output checks again under its lock
    if adapter is not None:
        lora, source_dir, trained_on = resolve_adapter(adapter, model)
    else:
        lora, source_dir, trained_on = None, resolve_source(model), None
    config = AutoConfig.from_pretrained(source_dir)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ConfigError(f"{source_dir}: model type {config.model_type!r}; qlorakit writes GGUF for "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    qtype_name, file_type_name = GGUF_TYPES[gguf_type]
    qtype, file_type = gguf.GGMLQuantizationType[qtype_name], gguf.LlamaFileType[file_type_name]
    source = merge_base(adapter, source_dir, base) if adapter is not None else ModelTensors(source_dir)
    plan = _tensor_plan(source, arch_enum, config.num_hidden_layers, qtype)
    rope_factors = llama3_rope_factors(config) if _rope_scaling(config)["rope_type"] == "llama3" else None
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads

    # The tokenizer as it will be used: the source's, with the chat template qlorakit trained with.
    with tempfile.TemporaryDirectory() as tokenizer_dir, staged_output(output, "gguf", overwrite) as staging:
        save_tokenizer(source_dir, Path(tokenizer_dir))
        writer = gguf.GGUFWriter(str(staging), arch)
        try:
            name = Path(str(adapter or model)).name
            _hyperparameters(writer, config, arch, file_type, name)
            writer.add_string(GGUF_KEY, version())  # how a later --overwrite knows this file is qlorakit's
            _add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size,
                           gguf_origin(source_dir).get("tokenizer.ggml.pre"))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            if rope_factors is not None:
                writer.add_tensor_info(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                       rope_factors.shape, np.dtype(np.float32), rope_factors.nbytes)
            for _, gguf_name, shape, kind in plan:
                writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, kind),
                                       raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            if rope_factors is not None:
                writer.write_tensor_data(rope_factors)
            kinds = {hf_name: kind for hf_name, _, _, kind in plan}
            for hf_name, tensor in merged_tensors(source, lora, trained_on):
                if hf_name not in kinds:  # left out by _tensor_plan
                    continue
                kind = kinds[hf_name]
                if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    tensor = _permute_for_ggml(tensor, heads)
                elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    tensor = _permute_for_ggml(tensor, kv_heads)
                writer.write_tensor_data(_encode(tensor, kind))
        finally:
            writer.close()
    merged = f"; {adapter} merged into {source.description}" if adapter is not None else ""
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, {gguf_type}, {len(plan)} tensors, {arch}{merged})")
    return output
