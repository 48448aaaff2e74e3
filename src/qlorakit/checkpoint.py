"""Checkpoints and atomic writes. Nothing here pickles: tensors go to safetensors, everything else to JSON.

A checkpoint directory (`DIR/checkpoints/step-000120/`) holds the adapter weights, the optimizer's tensors and
hyper-parameters, the scheduler, the GradScaler, the RNG states and the data position — everything a resumed run
needs to continue to the same result. It is written under a temporary name and renamed into place, so a killed run
leaves either a whole checkpoint or none; older ones beyond `keep_last` are removed after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import TrainingError

_STEP_PREFIX = "step-"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _split_state(value, prefix: str, tensors: dict, plain: dict):
    """Tensors of a nested state dict into `tensors` (flattened keys), everything else into `plain`."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {str(k): _split_state(v, f"{prefix}.{k}", tensors, plain) for k, v in value.items()} | (
            {"__int_keys__": [k for k in value if isinstance(k, int)]} if any(isinstance(k, int) for k in value) else {}
        )
    if isinstance(value, (list, tuple)):
        return [_split_state(v, f"{prefix}.{i}", tensors, plain) for i, v in enumerate(value)]
    return value


def _join_state(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        int_keys = {str(k) for k in value.get("__int_keys__", [])}
        return {
            (int(k) if k in int_keys else k): _join_state(v, tensors)
            for k, v in value.items() if k != "__int_keys__"
        }
    if isinstance(value, list):
        return [_join_state(v, tensors) for v in value]
    return value


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, scaler, position: dict,
                    metrics: dict, keep_last: int) -> Path:
    """Write checkpoint `step` into `directory` atomically and prune to the newest `keep_last`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{_STEP_PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{final.name}."))
    try:
        save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, tmp / "adapter.safetensors")
        opt_tensors: dict = {}
        opt_plain = _split_state(optimizer.state_dict(), "optimizer", opt_tensors, {})
        rng_tensors, rng_plain = _rng_state()
        save_file({k: v.contiguous().cpu() for k, v in (opt_tensors | rng_tensors).items()}, tmp / "state.safetensors")
        state = {
            "step": step,
            "position": position,
            "optimizer": opt_plain,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_plain,
            "metrics": metrics,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are not listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX):]))


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> dict:
    """Restore a checkpoint into live objects; returns its JSON state (step, position, metrics)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
        adapter = load_file(path / "adapter.safetensors")
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: checkpoint cannot be read ({e}); delete it to resume from an older one") from e
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in adapter]
    if missing or any(name not in params for name in adapter):
        raise TrainingError(
            f"{path}: checkpoint does not match this model's adapters (e.g. {(missing or list(adapter))[0]}); "
            "resume with the same model, rank and targets it was written with"
        )
    with torch.no_grad():
        for name, value in adapter.items():
            if params[name].shape != value.shape:
                raise TrainingError(f"{path}: {name} has shape {tuple(value.shape)} in the checkpoint, "
                                    f"{tuple(params[name].shape)} in the model; resume with the same rank")
            params[name].copy_(value)
    optimizer.load_state_dict(_join_state(state["optimizer"], tensors))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(tensors, state["rng"])
    return state
