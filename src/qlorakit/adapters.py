"""LoRA adapters on a loaded model, through PEFT, in the dtypes the precision policy gives them."""

from __future__ import annotations

import warnings

import torch

from .errors import ConfigError, check_number, show
from .kernels import install_fast_path

# PEFT reads a transformers attribute that transformers 5 deprecates; the warning is about their code, not the user's.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
from .precision import precision_of


def _target_modules(targets) -> str | list[str]:
    if targets == "all-linear":
        return "all-linear"  # PEFT: every linear layer except the output head
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else targets
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(t, str) and t for t in names):
        raise ConfigError(
            f"targets={show(targets)}: use 'all-linear' or module names such as ['q_proj', 'v_proj'] "
            "(a comma-separated string works too)"
        )
    return list(names)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)})


def _check_rank(model: torch.nn.Module, rank: int, targets) -> None:
    """A rank above min(in, out) of every targeted layer adds nothing a full-rank update would not, and a rank of
    millions from a typo would allocate gigabytes: refuse it."""
    widths = [min(m.in_features, m.out_features) for name, m in model.named_modules()
              if _is_linear(m) and hasattr(m, "in_features") and (
                  name.rsplit(".", 1)[-1] != "lm_head" if targets == "all-linear"
                  else any(name == t or name.endswith("." + t) for t in targets))]
    if widths and rank > max(widths):
        raise ConfigError(
            f"rank={rank} is more than the full rank of every targeted layer (a rank-r update of an m x n layer "
            f"needs r <= min(m, n), at most {max(widths)} here); use a rank of at most {max(widths)} "
            "(typical: 8 to 64)"
        )


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every named target must be a linear layer of this model. PEFT matches a name against the end of each module
    path and proceeds as long as one name matches anything, so a typo beside a real name would silently train
    fewer layers; it also puts LoRA on embeddings, which merge and GGUF export cannot fold into the base."""
    modules = dict(model.named_modules())
    for target in targets:
        matched = [name for name in modules if name == target or name.endswith("." + target)]
        if not matched:
            raise ConfigError(
                f"targets: {show(target)} matches no layer of this model; its linear layers are named: "
                f"{', '.join(_linear_names(model))} (or use 'all-linear')"
            )
        other = [name for name in matched if not _is_linear(modules[name])]
        if other:
            raise ConfigError(
                f"targets: {show(target)} names {type(modules[other[0]]).__name__} modules ({other[0]}"
                f"{', ...' if len(other) > 1 else ''}), not linear layers; LoRA goes on linear layers, named here: "
                f"{', '.join(_linear_names(model))} (or use 'all-linear')"
            )


def add_lora(
    model: torch.nn.Module,
    rank: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    targets: str | list[str] = "all-linear",
    rslora: bool = False,
    adapter_dtype: str | torch.dtype = "auto",
    fused: bool = True,
):
    """Add trainable LoRA adapters, W = W0 + (alpha/r)·B·A (alpha/sqrt(r) with rslora), to a model from
    qlorakit.load. The base stays frozen and quantized; adapters get the policy's trainable dtype (adapter_dtype
    'auto' follows DESIGN.md's table, an explicit one is validated against it). With `fused` (the default) the
    LoRA linear layers run through qlorakit.kernels.lora_linear, which adds the adapter's delta to the base output
    before rounding to the compute dtype, and packed rows get per-example attention (qlorakit.kernels.attention);
    PEFT's layers and transformers' sdpa attention otherwise. Returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    from .config import LORA_RANGES

    precision = precision_of(model).with_adapter_dtype(adapter_dtype)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank={show(rank)} must be a positive integer (typical: 8, 16, 32, 64)")
    for name, value in (("alpha", alpha), ("dropout", dropout)):
        low, high, low_ok, high_ok, hint = LORA_RANGES[name]
        check_number(name, value, low, high, low_ok=low_ok, high_ok=high_ok, hint=hint)
    target_modules = _target_modules(targets)
    if target_modules != "all-linear":
        _check_targets(model, target_modules)
    _check_rank(model, rank, target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=target_modules,
        use_rslora=bool(rslora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype=False: PEFT would otherwise pick the adapters' dtype itself; the policy decides.
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:
        # Named targets are checked above; only 'all-linear' can match nothing (a model whose one linear layer is
        # its output head, which PEFT leaves out).
        if "not found in the base model" not in str(e) and "Target modules" not in str(e):
            raise
        raise ConfigError(
            "targets='all-linear': this model has no linear layer besides its output head for LoRA to go on; "
            f"its linear layers are named: {', '.join(_linear_names(model)) or 'none'}"
        ) from None
    if fused:
        install_fast_path(peft_model, precision.compute)
    return precision.attach(peft_model)


def read_adapter_info(path) -> dict:
    """What an adapter directory says about its base: PEFT's adapter_config.json, and qlorakit.json when qlorakit
    wrote it (base source, quantization, dtype)."""
    from pathlib import Path

    path = Path(path)
    config_file = path / "adapter_config.json"
    if not path.is_dir() or not config_file.is_file():
        raise ConfigError(
            f"{path}: not an adapter directory (no adapter_config.json); pass the --output directory of a "
            "qlorakit run, or a PEFT LoRA adapter"
        )
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{path}: adapter_model.safetensors is missing (qlorakit loads safetensors adapters only)")
    extra = path / "qlorakit.json"
    return {"peft": _json_object(config_file, "PEFT's adapter settings"),
            "qlorakit": _json_object(extra, "what qlorakit recorded about the base") if extra.is_file() else {}}


def _json_object(file, what: str) -> dict:
    """A JSON object file of an adapter directory, or a ConfigError naming it: a damaged file must not end in a
    traceback (or a TypeError where a list stands for the object)."""
    import json

    fix = "restore it from the training run's --output directory, or save the adapter again"
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text (byte {e.start}), so {what} cannot be read; {fix}") from None
    except ValueError as e:  # json.JSONDecodeError
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"{file}: not valid JSON{where}, so {what} cannot be read; {fix}") from None
    except RecursionError:
        raise ConfigError(f"{file}: JSON nested too deeply, so {what} cannot be read; {fix}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: a JSON {type(value).__name__}, not the object of {what}; {fix}")
    return value


def adapter_base(info: dict, adapter_dir) -> str:
    """The base model an adapter belongs on: the source qlorakit trained it from, else PEFT's
    base_model_name_or_path when that is a local path or the default model's name."""
    from pathlib import Path

    from .load import DEFAULT_MODEL

    recorded = info["qlorakit"].get("base_model")
    if recorded is not None and not isinstance(recorded, str):
        raise ConfigError(f"{Path(adapter_dir) / 'qlorakit.json'}: 'base_model' is {show(recorded)}, not a path or "
                          "model name; fix the file, or pass the base model with --model")
    if recorded:
        return recorded
    named = info["peft"].get("base_model_name_or_path")
    if isinstance(named, str) and named and (named == DEFAULT_MODEL or Path(named).expanduser().exists()):
        return named
    raise ConfigError(
        f"{adapter_dir}: the adapter names its base model as {show(named)}, which is not a local path; pass the "
        "base model with --model (a local directory or .gguf file: qlorakit never downloads)"
    )


def load_adapter(model: torch.nn.Module, path, trainable: bool = False, fused: bool = True):
    """Put a saved LoRA adapter (PEFT format) on a model from qlorakit.load; returns the PEFT model under the
    model's precision policy."""
    from peft import PeftModel

    info = read_adapter_info(path)
    if info["peft"].get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: a {show(info['peft'].get('peft_type'))} adapter; qlorakit loads LoRA adapters")
    precision = precision_of(model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable, autocast_adapter_dtype=False)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{path}: the adapter does not fit this base model ({show(first)}); it was trained on "
            f"{show(info['peft'].get('base_model_name_or_path'))}"
        ) from None
    if fused:
        install_fast_path(peft_model, precision.compute)
    return precision.attach(peft_model)
