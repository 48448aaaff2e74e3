"""LoRA adapters on a loaded model, through PEFT, in the dtypes the precision policy gives them."""

from __future__ import annotations

import warnings

import torch

from .errors import ConfigError
from .kernels import install_fast_path

# PEFT reads a transformers attribute that transformers 5 deprecates; the warning is about their code, not the user's.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
from .precision import precision_of


def _target_modules(targets) -> str | list[str]:
    if targets == "all-linear":
        return "all-linear"  # PEFT: every linear layer except the output head
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(
            f"targets={targets!r}: use 'all-linear' or module names such as ['q_proj', 'v_proj'] "
            "(a comma-separated string works too)"
        )
    return list(targets)


def _linear_names(model: torch.nn.Module) -> list[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


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

    precision = precision_of(model).with_adapter_dtype(adapter_dtype)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank={rank!r} must be a positive integer (typical: 8, 16, 32, 64)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ConfigError(f"alpha={alpha!r} must be a positive number (typical: twice the rank)")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout={dropout!r} must be in [0, 1)")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=_target_modules(targets),
        use_rslora=bool(rslora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype=False: PEFT would otherwise pick the adapters' dtype itself; the policy decides.
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise ConfigError(
                f"targets={targets!r} matches no layer of this model; its linear layers are named: "
                f"{', '.join(_linear_names(model))}"
            ) from e
        raise
    if fused:
        install_fast_path(peft_model, precision.compute)
    return precision.attach(peft_model)


def read_adapter_info(path) -> dict:
    """What an adapter directory says about its base: PEFT's adapter_config.json, and qlorakit.json when qlorakit
    wrote it (base source, quantization, dtype)."""
    import json
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
    info = {"peft": json.loads(config_file.read_text())}
    extra = path / "qlorakit.json"
    info["qlorakit"] = json.loads(extra.read_text()) if extra.is_file() else {}
    return info


def adapter_base(info: dict, adapter_dir) -> str:
    """The base model an adapter belongs on: the source qlorakit trained it from, else PEFT's
    base_model_name_or_path when that is a local path or the default model's name."""
    from pathlib import Path

    from .load import DEFAULT_MODEL

    if info["qlorakit"].get("base_model"):
        return info["qlorakit"]["base_model"]
    named = info["peft"].get("base_model_name_or_path")
    if named and (named == DEFAULT_MODEL or Path(named).expanduser().exists()):
        return named
    raise ConfigError(
        f"{adapter_dir}: the adapter names its base model as {named!r}, which is not a local path; pass the base "
        "model with --model (a local directory or .gguf file: qlorakit never downloads)"
    )


def load_adapter(model: torch.nn.Module, path, trainable: bool = False, fused: bool = True):
    """Put a saved LoRA adapter (PEFT format) on a model from qlorakit.load; returns the PEFT model under the
    model's precision policy."""
    from peft import PeftModel

    info = read_adapter_info(path)
    if info["peft"].get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: a {info['peft'].get('peft_type')} adapter; qlorakit loads LoRA adapters")
    precision = precision_of(model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable, autocast_adapter_dtype=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"{path}: the adapter does not fit this base model ({str(e).splitlines()[0][:300]}); it was trained on "
            f"{info['peft'].get('base_model_name_or_path')!r}"
        ) from None
    if fused:
        install_fast_path(peft_model, precision.compute)
    return precision.attach(peft_model)
