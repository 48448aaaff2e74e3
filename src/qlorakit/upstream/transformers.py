"""transformers: the attention registry and the conventions of an attention call, the shapes of the modules the fast
path computes itself (gated MLP, RMSNorm, output head: each formula checked on the module, not assumed from its class
name), activation checkpointing, and the quantizer a GGUF conversion drops."""

from __future__ import annotations

import contextlib
import inspect
from typing import NamedTuple

import torch

from . import changed, require

PACKAGE = "transformers"


# -- attention ---------------------------------------------------------------------------------------------


def register_attention(name: str, function) -> None:
    """Register `function` as attention implementation `name`, with sdpa's masks (the cases it hands to sdpa)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError as e:
        raise changed(PACKAGE, "the attention registry (AttentionInterface, masking_utils)", str(e)) from None
    try:
        require(PACKAGE, AttentionInterface, "register", "AttentionInterface")(name, function)
        require(PACKAGE, ALL_MASK_ATTENTION_FUNCTIONS, "register", "ALL_MASK_ATTENTION_FUNCTIONS")(name, sdpa_mask)
    except TypeError as e:
        raise changed(PACKAGE, "AttentionInterface.register", str(e)) from None
    # Registered where the models look it up?
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        registered = ALL_ATTENTION_FUNCTIONS[name] is function
    except (ImportError, KeyError, TypeError):
        registered = False
    if not registered:
        raise changed(PACKAGE, "AttentionInterface.register", f"{name!r} is not in ALL_ATTENTION_FUNCTIONS after it")


def sdpa_attention():
    """transformers' own sdpa attention function, which the packed attention hands every other case to."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError as e:
        raise changed(PACKAGE, "transformers.integrations.sdpa_attention.sdpa_attention_forward", str(e)) from None
    return sdpa_attention_forward


def attention_implementation(model) -> str | None:
    """The attention implementation the model's config names ('sdpa', 'eager', ...)."""
    config = _base(model).config
    return require(PACKAGE, config, "_attn_implementation", type(config).__name__)


def set_attention_implementation(model, name: str) -> None:
    base = _base(model)
    require(PACKAGE, base, "set_attn_implementation", type(base).__name__)(name)
    if attention_implementation(model) != name:
        raise changed(PACKAGE, "set_attn_implementation", f"config._attn_implementation did not become {name!r}")


def packed_causal_segments(module, query, key, attention_mask, kwargs, read_blocks) -> list[tuple[int, int]] | None:
    """The (start, end) blocks of causal attention that transformers' sdpa would compute for this attention call,
    when its mask is exactly block-diagonal causal over one row (`read_blocks` reads a [length, length] boolean
    mask); None for anything else (padding, a cache, several rows, sliding windows, soft-capping, bidirectional
    attention), which sdpa handles. Derived from the mask, not from position ids: a left-padded row can have
    position ids that look like one example, and transformers builds the block-diagonal mask of a packed row only
    when nothing else is masked. transformers leaves the mask out (None) when it is plain causal."""
    length = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != length:
        return None
    if getattr(module, "sliding_window", None) is not None or kwargs.get("softcap") is not None:
        return None
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        return None
    if attention_mask is None:
        return [(0, length)]
    if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (1, 1, length, length):
        return None
    return read_blocks(attention_mask)


# -- module shapes -------------------------------------------------------------------------------------------


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _probe(module: torch.nn.Module, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)  # a fixed input, not the global RNG the run is seeded with
    return torch.randn(1, 3, width, generator=generator).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """`module` and its children in eval mode (dropout off), their modes restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def gated_mlp_mismatch(module, compute: torch.dtype) -> str | None:
    """None when `module` computes down(act(gate(x)) · up(x)) from its gate_proj, up_proj, down_proj and act_fn —
    checked by running its own forward once on a fixed input against that formula, in eval mode; and, as training
    mode could add something the check does not see (a dropout inside the forward), only a module with no other
    submodule and its class's own forward qualifies — else why not. The result is kept per class, compute dtype
    and device type: a class computes one formula."""
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        return f"no {', '.join(missing)}"
    others = [n for n, _ in module.named_children() if n not in names]
    if others:
        return f"{type(module).__name__} has other submodules ({', '.join(others)}) the fused MLP would not run"
    if "forward" in vars(module) and not getattr(module, "qlorakit_fused_mlp", False):
        return "its forward was replaced on the module (a hook or wrapper)"
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return _formula_checked((type(module), "mlp", compute, device.type), lambda: _check_gated_mlp(module, compute))


def _check_gated_mlp(module, compute) -> str | None:
    weight = next((p for p in module.parameters() if p.dtype.is_floating_point), None)
    device = weight.device if weight is not None else torch.device("cpu")
    width = getattr(module.gate_proj, "in_features", None)
    if width is None:
        return "gate_proj has no in_features"
    x = _probe(module, width, compute, device)
    with torch.no_grad(), _eval_mode(module):
        own = type(module).forward(module, x)
        formula = module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))
    if not isinstance(own, torch.Tensor) or own.shape != formula.shape or not torch.allclose(
            own, formula.to(own.dtype), rtol=1e-3, atol=1e-5):
        return f"{type(module).__name__}.forward computes something other than down(act(gate(x)) * up(x))"
    return None


def is_rms_norm(module) -> bool:
    """A module shaped like transformers' RMSNorms: a 1-D weight, `variance_epsilon`, no submodules."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")
            and not any(True for _ in module.children()))


def rms_norm_mismatch(module, normalize) -> str | None:
    """None when `module` (an is_rms_norm module) computes `normalize(x, weight, eps)` (the Llama formula, see
    kernels/rmsnorm.py) — checked by running its forward once on a fixed input — else why not (kept per class,
    dtype and device type)."""
    if "forward" in vars(module) and not getattr(module, "qlorakit_fused_norm", False):
        return "its forward was replaced on the module (a hook or wrapper)"
    weight = module.weight
    key = (type(module), "norm", weight.dtype, weight.device.type)
    return _formula_checked(key, lambda: _check_rms_norm(module, normalize))


def _check_rms_norm(module, normalize) -> str | None:
    weight = module.weight
    x = _probe(module, weight.shape[0], weight.dtype, weight.device)
    with torch.no_grad():
        own = type(module).forward(module, x)
        formula = normalize(x, weight, float(module.variance_epsilon))[0]
    if not isinstance(own, torch.Tensor) or own.shape != formula.shape or not torch.equal(own, formula):
        return f"{type(module).__name__}.forward computes something other than the Llama RMSNorm"
    return None


_FORMULA_CHECKS: dict = {}


def _formula_checked(key: tuple, check) -> str | None:
    if key not in _FORMULA_CHECKS:
        _FORMULA_CHECKS[key] = check()
    return _FORMULA_CHECKS[key]


# Causal-LM families whose logits are exactly lm_head(last hidden state): no soft-capping, scaling or bias after it.
_PLAIN_HEADS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "granite", "smollm3"}


def plain_output_head(model) -> tuple[torch.nn.Module, torch.nn.Linear] | str:
    """(decoder, lm_head) when the model's logits are exactly lm_head(decoder(...).last_hidden_state), so a loss
    may be computed from the hidden states; else why not."""
    base = _base(model)
    config = getattr(base, "config", None)
    head = getattr(base, "lm_head", None)
    decoder = getattr(base, "model", None)
    if config is None or decoder is None:
        return "no decoder and config"
    if getattr(config, "model_type", None) not in _PLAIN_HEADS:
        return f"model_type {getattr(config, 'model_type', None)!r} is not known to compute plain lm_head logits"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", 1.0) not in (1, 1.0):
        return "the logits are soft-capped or scaled"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "lm_head is adapted or has a bias"
    if head.weight.requires_grad:
        return "lm_head is trainable"
    return decoder, head


def declared_quantization(model) -> str:
    """'nf4' / 'fp4' / 'int8' when the model's config declares a bitsandbytes quantization, else 'none'."""
    settings = getattr(getattr(_base(model), "config", None), "quantization_config", None)
    if settings is None:
        return "none"
    settings = settings if isinstance(settings, dict) else settings.to_dict()
    if settings.get("quant_method") != "bitsandbytes":
        return "none"
    if settings.get("load_in_8bit"):
        return "int8"
    return str(settings.get("bnb_4bit_quant_type", "fp4")) if settings.get("load_in_4bit") else "none"


# -- the decoder stack, as generation computes it ------------------------------------------------------------


class DecoderLayout(NamedTuple):
    """The modules of a Llama-shaped decoder (Llama, Mistral, SmolLM, Qwen2, Qwen3): an embedding, layers of
    RMSNorm -> attention (q/k/v/o projections, rotary positions, optional per-head q/k RMSNorms) -> residual ->
    RMSNorm -> gated MLP -> residual, a final RMSNorm, the model's rotary-embedding module and lm_head."""

    embed: torch.nn.Module
    layers: list  # (input_norm, attention, post_attention_norm, mlp) per layer
    norm: torch.nn.Module
    rotary: torch.nn.Module
    head: torch.nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None  # the shortest sliding attention window: full attention up to it is the same attention


def decoder_layout(model) -> DecoderLayout | str:
    """The layout of `model`'s decoder, or why generation cannot compute it itself. What the layout does not say (the rotary convention, the residual wiring) is checked by comparing
    logits with the model's own forward (generation/decoder.py)."""
    base = _base(model)
    config = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    if config is None or inner is None:
        return "the model has no decoder and config"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"the decoder has no {name}"
    if not hasattr(base, "lm_head"):
        return "the model has no lm_head"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps its logits"
    if getattr(config, "logits_scaling", 1.0) not in (1, 1.0):
        return "the model scales its logits"
    windows = [getattr(config, "sliding_window", None)] if getattr(config, "use_sliding_window", True) else []
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    layers = []
    for i, layer in enumerate(inner.layers):
        parts = [getattr(layer, n, None) for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")]
        if any(p is None for p in parts):
            return f"decoder layer {i} is not norm -> self_attn -> norm -> mlp"
        attention = parts[1]
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        missing = [n for n in names if not hasattr(attention, n)]
        if missing:
            return f"layer {i}'s attention has no {', '.join(missing)}"
        windows.append(getattr(attention, "sliding_window", None))
        for norm in (parts[0], parts[2], getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)):
            if norm is not None and not is_rms_norm(norm):
                return f"layer {i}'s {type(norm).__name__} is not an RMSNorm"
        others = {n for n, _ in attention.named_children()} - {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm",
                                                               "k_norm"}
        if others:
            return f"layer {i}'s attention has other submodules ({', '.join(sorted(others))})"
        layers.append(tuple(parts))
    if not layers or not isinstance(heads, int) or not isinstance(kv_heads, int):
        return "the config does not give the number of attention heads"
    if not is_rms_norm(inner.norm):
        return "the final norm is not an RMSNorm"
    windows = [w for w in windows if isinstance(w, int)]
    return DecoderLayout(inner.embed_tokens, layers, inner.norm, inner.rotary_emb, base.lm_head, heads, kv_heads,
                         int(layers[0][1].head_dim), min(windows) if windows else None)


def rotary_tables(rotary: torch.nn.Module, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """(cos, sin), each [length, head_dim] in `dtype`, for positions 0..length-1, from the model's own rotary
    module (so its scaling — Llama 3, YaRN, ... — is the model's)."""
    positions = torch.arange(length, device=device)[None]
    try:
        cos, sin = rotary(torch.zeros(1, dtype=dtype, device=device), positions)
    except TypeError as e:
        raise changed(PACKAGE, "the rotary embedding's forward(x, position_ids)", str(e)) from None
    return cos[0].to(dtype), sin[0].to(dtype)


# -- training and loading -------------------------------------------------------------------------------------


def enable_checkpointing(model, offload: bool = False) -> None:
    """Activation checkpointing on every decoder layer: each keeps only its input for the backward, where it runs
    again (non-reentrant). With `offload` (CUDA), those inputs — layers x tokens x hidden, what remains of activation
    memory at long sequence lengths — go to pinned CPU memory and come back for the layer's backward (transformers'
    offload: torch's save_on_cpu around each checkpoint); it costs a copy each way per layer."""
    enable = require(PACKAGE, model, "activation_checkpointing_enable", type(_base(model)).__name__)
    parameters = inspect.signature(enable).parameters  # (PEFT models forward the method to their base)
    if "activation_checkpointing_kwargs" not in parameters or "offload" not in parameters:
        raise changed(PACKAGE, "activation_checkpointing_enable's arguments", f"it takes {', '.join(parameters)}")
    enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=offload)


def save_dequantized(model, directory) -> None:
    """Save a model that transformers loaded from a GGUF file (dequantized to plain weights) as a plain model, and
    check that it was: with its GGUF quantization marker, transformers would treat the directory as GGUF again."""
    import json
    from pathlib import Path

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model.hf_quantizer = None  # transformers reads it with getattr(model, "hf_quantizer", None)
    model.save_pretrained(directory, safe_serialization=True)
    saved = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved:
        raise changed(PACKAGE, "how a model converted from a GGUF file is saved",
                      "its config.json still declares a quantization")


def check() -> None:
    """The attention registry and sdpa function exist."""
    sdpa_attention()
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: F401
    except ImportError as e:
        raise changed(PACKAGE, "the attention registry (AttentionInterface, masking_utils)", str(e)) from None
