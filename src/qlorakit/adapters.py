"""LoRA adapters on a loaded model, through PEFT, in the dtypes the precision policy gives them."""

from __future__ import annotations

import warnings

import torch

from .errors import ConfigError, check_number, show

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
    return isinstance(module, torch.nn.Linear)  # bitsandbytes' Linear4bit and Linear8bitLt are Linear subclasses


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
    PEFT's layers and transformers' sdpa attention otherwise; `qlorakit.fast_path_report(model)` says what took the
    kernels (it is logged to the 'qlorakit' logger, as a warning when something falls back). Returns the PEFT model."""
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
        from .fast_path import install_fast_path

        install_fast_path(peft_model, precision.compute)
    return precision.attach(peft_model)


def read_adapter_info(path) -> dict:
    """What an adapter directory says about its base: PEFT's adapter_config.json, and qlorakit.json when qlorakit
    wrote it (base source, quantization, dtype). A qlorakit adapter's files must be those its qlorakit.json
    records (see save_adapter); a plain PEFT adapter, without qlorakit.json, has no record to check."""
    from pathlib import Path

    path = Path(path)
    config_file = path / "adapter_config.json"
    extra = path / "qlorakit.json"
    saved = _json_object(extra, "what qlorakit recorded about the base") if path.is_dir() and extra.is_file() else {}
    if saved:
        _check_saved_together(path, saved)
    if not path.is_dir() or not config_file.is_file():
        raise ConfigError(
            f"{path}: not an adapter directory (no adapter_config.json); pass the --output directory of a "
            "qlorakit run, or a PEFT LoRA adapter"
        )
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{path}: adapter_model.safetensors is missing (qlorakit loads safetensors adapters only)")
    return {"peft": _json_object(config_file, "PEFT's adapter settings"), "qlorakit": saved}


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
    """The base model an adapter belongs on, as a source qlorakit.load takes: the source qlorakit trained it from
    (a Hub base pinned to the commit it was trained on: "org/name@<commit>"), else PEFT's base_model_name_or_path
    when that is a local path, the default model's name or a Hub id (pinned to PEFT's revision when it has one)."""
    from pathlib import Path

    from .hub import parse_hub_id
    from .load import DEFAULT_MODEL

    record = Path(adapter_dir) / "qlorakit.json"
    recorded = info["qlorakit"].get("base_model")
    if recorded is not None and not isinstance(recorded, str):
        raise ConfigError(f"{record}: 'base_model' is {show(recorded)}, not a path or model name; fix the file, or "
                          "pass the base model with --model")
    revision = info["qlorakit"].get("base_revision")
    if revision is not None and not (isinstance(revision, str) and revision):
        raise ConfigError(f"{record}: 'base_revision' is {show(revision)}, not the commit of a Hub base model; fix "
                          "the file, or pass the base model with --model")
    if recorded:
        return f"{recorded}@{revision}" if revision else recorded
    named = info["peft"].get("base_model_name_or_path")
    if isinstance(named, str) and named and (named == DEFAULT_MODEL or Path(named).expanduser().exists()):
        return named
    if isinstance(named, str) and parse_hub_id(named) is not None:
        pinned = info["peft"].get("revision")
        return f"{named}@{pinned}" if isinstance(pinned, str) and pinned and "@" not in named else named
    raise ConfigError(
        f"{adapter_dir}: the adapter names its base model as {show(named)}, which is neither a local path nor a "
        "Hugging Face Hub id (org/name); pass the base model with --model (a local directory, a .gguf file or a "
        "Hub id)"
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
        from .fast_path import install_fast_path

        install_fast_path(peft_model, precision.compute)
    return precision.attach(peft_model)


# ---------------------------------------------------------------------------------------------- saving

# The files of a saved adapter that are loaded (PEFT's model card, README.md, is not: editing it changes nothing).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_adapter(model, out, cfg, precision, data=None, state: dict | None = None, world_size: int = 1):
    """Save a training run's adapter into the directory `out`: PEFT's format (adapter_config.json,
    adapter_model.safetensors), its model card README.md (model_card.adapter_card) and qlorakit.json — how to load
    the base again (`cfg`: the run's TrainConfig; `precision` its Precision; `data` its TrainingData, for the format)
    and the size and SHA-256 of each file of ADAPTER_FILES. `state`: the adapter's tensors by name, where the model
    holds them sharded; `world_size`: the run's processes, for the card's command. Returns `out`.

    The files are one unit: staged together, then renamed into place one at a time, qlorakit.json first. Its
    record names the new files, so until the last rename a reader finds a file missing or one that does not match
    the record (an earlier save's config or weights) and read_adapter_info refuses the directory; a kill never
    leaves files of two saves that load together. (Renaming one directory would be a single step, but PEFT reads
    the files at the top of the directory the user names, which also holds the rest of the run.)

    `state`: the trainable parameters whole, by name, for a model sharded by FSDP (distributed.full_trainable_state),
    whose own parameters hold this rank's parts."""
    import json
    from pathlib import Path

    from .outputs import staged_files
    from .precision import dtype_name

    out = Path(out)
    # A Hub base (qlorakit.load's model.qlorakit_hub) is recorded as its id and the commit it resolved to, so that
    # chat, eval, merge and export load the very weights it was trained on; a local base as its absolute path (a
    # relative one would name another directory, or read as a Hub id, from elsewhere); the default model by name.
    hub = getattr(model, "qlorakit_hub", None)
    local = Path(str(cfg.model)).expanduser()
    base_model, base_revision = ((hub.repo_id, hub.commit) if hub is not None
                                 else (str(local.resolve()) if local.exists() else str(cfg.model), None))
    with staged_files(out, order=("qlorakit.json", "README.md", *ADAPTER_FILES)) as tmp:
        peft_config = model.peft_config["default"]
        base_path, peft_revision = peft_config.base_model_name_or_path, peft_config.revision
        # the source as given (not a cache directory); PEFT's own readers load a Hub base at `revision`
        peft_config.base_model_name_or_path, peft_config.revision = base_model, base_revision
        try:
            # save_embedding_layers=False: qlorakit never adapts embeddings, and PEFT's "auto" asks the Hub for
            # the base's config.json when base_model_name_or_path is a name (the default model's is).
            model.save_pretrained(tmp, save_embedding_layers=False, state_dict=state)
        finally:
            peft_config.base_model_name_or_path, peft_config.revision = base_path, peft_revision
        record = {
            "base_model": base_model, "base_revision": base_revision, "quant": cfg.quant,
            "double_quant": cfg.double_quant,
            "dtype": dtype_name(precision.compute), "adapter_dtype": dtype_name(precision.adapter),
            "format": data.format if data else None, "max_length": cfg.max_length,
            "files": {name: _file_record(tmp / name) for name in ADAPTER_FILES},
        }
        (tmp / "qlorakit.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        from .model_card import adapter_card  # (in place of PEFT's placeholder README.md)

        card = adapter_card(cfg.to_dict() | {"world_size": world_size, "objective": cfg.OBJECTIVE}, record, out,
                            base_path)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def _file_record(file) -> dict:
    return {"bytes": file.stat().st_size, "sha256": _sha256(file)}


_HASHED: dict = {}  # (device, inode, size, mtime) -> SHA-256


def _sha256(file) -> str:
    """The file's SHA-256, remembered by its identity (device, inode, size, modification time, which a rename
    keeps): an adapter's record is read several times per command (train, merge, export), its weights hashed once."""
    import hashlib

    stat = file.stat()
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity not in _HASHED:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if len(_HASHED) >= 64:
            _HASHED.clear()
        _HASHED[identity] = digest.hexdigest()
    return _HASHED[identity]


def _check_saved_together(path, saved: dict) -> None:
    """Refuse a qlorakit adapter whose files are not those its qlorakit.json records (save_adapter): a save cut
    short, or a file copied in from another adapter. qlorakit.json written before the record existed has none."""
    files = saved.get("files")
    where = path / "qlorakit.json"
    if files is None:
        return
    if not isinstance(files, dict) or not all(
            isinstance(files.get(name), dict) and isinstance(files[name].get("bytes"), int)
            and isinstance(files[name].get("sha256"), str) for name in ADAPTER_FILES):
        raise ConfigError(f"{where}: 'files' is {show(files)}, not the record of the adapter's files (for each of "
                          f"{', '.join(ADAPTER_FILES)}: bytes and sha256); save the adapter again")
    fix = ("the adapter's files are from different saves (a save cut short, or a file copied in from another "
           "adapter): save it again, or continue its run from the last checkpoint (qlorakit train --resume). A file "
           "you edited on purpose: delete the 'files' entry of qlorakit.json")
    for name in ADAPTER_FILES:
        file, expected = path / name, files[name]
        if not file.is_file():
            raise ConfigError(f"{path}: {name} is missing, though qlorakit.json records it (a save cut short, or the "
                              "file was removed); save the adapter again, or continue its run from the last checkpoint "
                              "(qlorakit train --resume)")
        size = file.stat().st_size
        if size != expected["bytes"]:
            found = f"{size:,} bytes, where it records {expected['bytes']:,}"
        elif _sha256(file) != expected["sha256"]:
            found = "other contents (SHA-256) than it records"
        else:
            continue
        raise ConfigError(f"{file}: does not match {where} ({found}); {fix}")
