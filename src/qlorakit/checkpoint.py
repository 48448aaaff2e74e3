"""Checkpoints. Nothing here pickles: tensors go to safetensors, everything else to JSON.

A checkpoint directory (`DIR/checkpoints/step-000120/`) holds the adapter weights, the optimizer's tensors and
hyper-parameters, the scheduler, the GradScaler, the RNG states and the data position — everything a resumed run
needs to continue to the same result. It is written under a temporary name and renamed into place (outputs.py),
so a killed run leaves either a whole checkpoint or none; older ones beyond `keep_last` are removed after the new
one is in place.

Resuming checks, before anything is restored, that it continues the same run: the settings config.json saved
(`check_resumable`), the compute dtype the run started in (`resumed_dtype`), and the data (`data_fingerprint`, kept
in each checkpoint, against the data the resumed run reads: `check_same_data`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError, TrainingError, show
from .outputs import atomic_directory, is_disk_full

_STEP_PREFIX = "step-"


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


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random states: (tensors, plain values)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _rank_prefix(rank: int) -> str:
    return "" if rank == 0 else f"rank{rank}."  # rank 0's keys are those of a one-process checkpoint


def _set_rng_state(tensors: dict, plain: dict, rank: int = 0) -> None:
    prefix = _rank_prefix(rank)
    torch.set_rng_state(tensors[f"{prefix}rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith(f"{prefix}rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, scaler, position: dict,
                    metrics: dict, keep_last: int, data: dict | None = None,
                    rng_states: list[tuple[dict, dict]] | None = None, adapter_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write checkpoint `step` into `directory` atomically and prune to the newest `keep_last`. `data` is the
    training data's fingerprint: a resume compares it with the data it is given. `rng_states`: every rank's
    rng_state(), in rank order, on several processes (default: this process's). `adapter_state` and
    `optimizer_state`: the trainable parameters and optimizer.state_dict() whole, for a sharded model (FSDP), whose
    own hold this rank's parts (default: the model's and the optimizer's)."""
    directory = Path(directory)
    final = directory / f"{_STEP_PREFIX}{step:06d}"
    try:
        # (a checkpoint of the same step from an earlier, interrupted attempt is replaced once this one is whole)
        with atomic_directory(final) as tmp:
            adapter_state = trainable_state(model) if adapter_state is None else adapter_state
            save_file({k: v.contiguous() for k, v in adapter_state.items()}, tmp / "adapter.safetensors")
            opt_tensors: dict = {}
            optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
            opt_plain = _split_state(optimizer_state, "optimizer", opt_tensors, {})
            rng_states = rng_states or [rng_state()]
            rng_tensors = {_rank_prefix(rank) + k: v for rank, (tensors, _) in enumerate(rng_states)
                           for k, v in tensors.items()}
            save_file({k: v.contiguous().cpu() for k, v in (opt_tensors | rng_tensors).items()},
                      tmp / "state.safetensors")
            state = {
                "step": step,
                "position": position,
                "optimizer": opt_plain,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states[0][1],
                "world_size": len(rng_states),
                "rng_ranks": [plain for _, plain in rng_states[1:]],  # ranks 1.. (their tensors: rankN.rng.*)
                "metrics": metrics,
                "data": data,
            }
            (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default) + "\n")
    except OSError as e:
        if not is_disk_full(e):
            raise
        earlier = [p for p in list_checkpoints(directory) if p != final]
        raise TrainingError(
            f"{final}: the disk is full (no space left on device) while writing this checkpoint; "
            + (f"the previous checkpoint {earlier[-1]} is intact: free some space and continue with --resume"
               if earlier else "no earlier checkpoint was written: free some space and run again")) from None
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
             and p.name[len(_STEP_PREFIX):].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX):]))


class DamagedCheckpoint(TrainingError):
    """A checkpoint's files cannot be read back whole (truncated, overwritten, edited)."""


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's files, read and checked whole before anything is restored from them: {"state", "tensors",
    "adapter"}. Raises DamagedCheckpoint saying what is wrong."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(path / "state.safetensors")
        adapter = load_file(path / "adapter.safetensors")
    except (OSError, ValueError, SafetensorError) as e:
        raise DamagedCheckpoint(f"{path}: checkpoint cannot be read ({show(str(e))})") from None
    problem = None
    if not isinstance(state, dict) or not {"step", "position", "optimizer", "scheduler", "rng"} <= state.keys():
        problem = "state.json lacks the step, position, optimizer, scheduler or RNG state"
    elif not isinstance(state["step"], int) or not isinstance(state["position"], dict) or not all(
            isinstance(state["position"].get(k), int) for k in ("epoch", "micro")):
        problem = "state.json's step or data position is not a whole number"
    elif "rng.torch" not in tensors or not _tensor_refs(state["optimizer"]) <= tensors.keys():
        problem = "state.safetensors lacks tensors that state.json refers to"
    else:
        broken = [name for name, value in adapter.items() if value.is_floating_point() and not value.isfinite().all()]
        if broken:
            problem = f"the adapter weight {broken[0]} holds NaN or infinite values"
    if problem:
        raise DamagedCheckpoint(f"{path}: checkpoint is damaged ({problem})")
    return {"state": state, "tensors": tensors, "adapter": adapter}


def _tensor_refs(value) -> set[str]:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return {value["__tensor__"]}
        return set().union(*(_tensor_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_tensor_refs(v) for v in value))
    return set()


def newest_intact_checkpoint(directory: Path, log=print) -> tuple[Path, dict]:
    """The newest checkpoint that reads back whole, and its contents. A damaged newer one (a disk that filled up,
    a copy cut short) is named in a log line and passed over; when none is intact the run cannot resume."""
    damaged = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, read_checkpoint(path)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            log(f"warning: {e}; resuming from an older checkpoint")
    raise TrainingError(
        f"{directory}: no intact checkpoint to resume from ({len(damaged)} damaged: {'; '.join(damaged[:3])}); "
        "start the run again without --resume (with --overwrite)"
    )


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, contents: dict | None = None,
                    rank: int = 0, load_optimizer=None) -> dict:
    """Restore a checkpoint into live objects; returns its JSON state (step, position, metrics, data).
    `contents` is what read_checkpoint(path) returned, when the caller has read it already. On several processes
    each rank restores its own random states (a rank the checkpoint has none for keeps its seeded ones: a resume on
    another number of processes, which check_resumable allows only where randomness plays no part).
    A sharded model (FSDP) takes each rank's part of the saved whole tensors; `load_optimizer(state)` then restores
    the whole optimizer.state_dict() into its sharded optimizer (default: optimizer.load_state_dict)."""
    path = Path(path)
    contents = contents or read_checkpoint(path)
    state, tensors, adapter = contents["state"], contents["tensors"], contents["adapter"]
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
            params[name].copy_(_part_of(value, params[name]))
    try:
        (load_optimizer or optimizer.load_state_dict)(_join_state(state["optimizer"], tensors))
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        plains = [state["rng"], *state.get("rng_ranks", [])]
        if rank < len(plains):
            _set_rng_state(tensors, plains[rank], rank)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DamagedCheckpoint(f"{path}: checkpoint cannot be restored ({show(str(e))})") from None
    return state


def _part_of(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value`, a whole saved tensor, as `param` holds it: this rank's shard when FSDP sharded it (every rank has
    the whole value, so none is sent), else as it is."""
    from .upstream.bitsandbytes import is_dtensor

    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)


# ------------------------------------------------------------------------------------------------- resuming


# What makes a resumed run the same run: a change to any of these since config.json was written is refused.
# (batch_size: as the global batch, batch_size x processes, by check_world)
SAME_RUN = ("model", "data", "data_config", "split", "field", "streaming", "quant", "double_quant", "rank", "alpha",
            "rslora", "targets", "adapter", "seed", "grad_accum", "max_length", "packing", "train_on", "format",
            "parse_special_tokens", "objective", "loss", "beta", "simpo_gamma", "reward", "reward_weights",
            "group_size", "max_new_tokens", "temperature", "top_p", "top_k", "epsilon", "epsilon_high")


def check_resumable(out: Path, config, world: int = 1) -> dict:
    """Refuse a --resume of `out` (a claimed run directory) that cannot continue the same run: no checkpoint, a
    setting of SAME_RUN different from what the run saved in config.json, or another global batch (check_world).
    `world`: the processes this resume runs on. Returns the saved settings ({} when there is no config.json)."""
    out = Path(out)
    if not list_checkpoints(out / "checkpoints"):
        raise TrainingError(
            f"{out}: no checkpoint to resume from (checked {out / 'checkpoints'}); point --output at the "
            "interrupted run, or start without --resume"
        )
    saved_path = out / "config.json"
    if not saved_path.is_file():
        return {}
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{saved_path}: the run's saved settings cannot be read ({show(str(e))}), so --resume "
                            "cannot check it continues the same run; start a new run (--overwrite)") from None
    if not isinstance(saved, dict):
        raise TrainingError(f"{saved_path}: not the run's saved settings (a JSON object); start a new run "
                            "(--overwrite)")
    if saved.get("objective", "sft") != config.OBJECTIVE:  # (runs saved before preference tuning have none)
        from .config import CONFIG_CLASSES

        theirs = CONFIG_CLASSES.get(saved.get("objective"))
        kind, command = (theirs.KIND, f"qlorakit {theirs.COMMAND}") if theirs else ("other", "the command that made it")
        raise TrainingError(f"{out}: the run there is a {kind} run ({command}); qlorakit {config.COMMAND} --resume "
                            f"cannot continue it: resume it with {command} --resume")
    now = config.to_dict()
    skipped = getattr(config, "NOT_APPLICABLE", {})  # (settings a preference run does not have)
    changed = [k for k in SAME_RUN if k in saved and k in now and _setting(k, saved[k]) != _setting(k, now[k])]
    if changed:
        k = changed[0]
        raise TrainingError(
            f"{out}: --resume with {k}={show(now[k])}, but the run was started with {k}={show(saved[k])}; "
            f"a resumed run must keep {', '.join(s for s in SAME_RUN if s in now and s not in skipped)}"
        )
    check_world(out, saved, config, world)
    return saved


def check_world(out: Path, saved: dict, config, world: int) -> None:
    """A resume on another number of processes continues the run exactly when the global micro-batch (batch_size x
    processes) is the one the run had — its batches are then the same examples, from the same position — and no
    randomness is drawn per process (LoRA dropout: each rank draws from its own stream). Anything else is refused."""
    if "batch_size" not in saved:
        return

    def processes(n: int) -> str:
        return f"{n} process{'es' if n > 1 else ''}"

    was_world = saved.get("world_size", 1)
    was, now = saved["batch_size"] * was_world, config.batch_size * world
    started = f"{processes(was_world)} x batch_size {saved['batch_size']}"
    resumed = f"{processes(world)} x batch_size {config.batch_size}"
    if was != now:
        fits = [f"--batch-size {was // world} on {processes(world)}"] if was % world == 0 else []
        raise TrainingError(
            f"{out}: the run was started on {started} ({was} examples a micro-batch); this resume has {resumed} "
            f"({now}), which would train on other batches. Resume with the run's global batch: "
            + " or ".join([f"--batch-size {saved['batch_size']} on {processes(was_world)}", *fits])
        )
    dropout = max(saved.get("dropout") or 0.0, config.dropout)  # (the run's, even where the resume leaves it out)
    if world != was_world and dropout > 0:
        raise TrainingError(
            f"{out}: the run was started on {started}; this resume has {resumed}. With LoRA dropout "
            f"({dropout:g}) each process draws its masks from its own random stream, and {was_world} "
            f"stream(s) cannot continue as {world}: resume on {processes(was_world)}"
        )


def _setting(key: str, value):
    """A setting as a resume compares it: --field by the mapping it gives (flags in another order, or a YAML mapping,
    name the same columns), --reward-weights by the numbers it gives."""
    if key == "field":
        from .config import parse_field_map

        try:
            return parse_field_map(value)
        except ConfigError:
            return value
    if key == "reward_weights" and value is not None:  # "1,0.5", "1, .5" and [1, 0.5] are the same weights
        parts = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        try:
            return [float(part) for part in parts]
        except (TypeError, ValueError):
            return value
    return value


def resumed_source(out: Path, saved: dict, source: str, log=print) -> tuple[str, str | None]:
    """(source, revision) a resumed run loads its base from: for a Hub base, the commit the run started from, as
    its config.json recorded (`base_revision`) — the id's branch may have moved since, and the checkpoint's adapter
    belongs on the weights it was trained on. Any other source as it is."""
    from .hub import parse_hub_id

    recorded = saved.get("base_revision")
    if recorded is None or Path(str(source)).expanduser().exists():
        return source, None
    parsed = parse_hub_id(str(source))
    if not isinstance(recorded, str) or parsed is None:
        raise TrainingError(f"{Path(out) / 'config.json'}: 'base_revision' is {show(recorded)}, not the commit of "
                            f"the Hub model {show(source)}; restore the file, or start a new run (--overwrite)")
    log(f"model: {parsed[0]} at commit {recorded}, which the run started from")
    return parsed[0], recorded


def resumed_dtype(out: Path, saved: dict, asked: str, log=print) -> str:
    """The compute dtype a resumed run trains in: the one its config.json recorded (`compute_dtype`) when the run
    started. `auto` can resolve differently from one start to the next (another GPU; on a CPU, a measured race
    between bf16 and fp32), and a resume must not switch the dtype of the weights it restores; an explicit `asked`
    dtype other than the recorded one is refused. `asked` is returned for a run written before the record."""
    from .precision import is_dtype_name, parse_dtype

    where = Path(out) / "config.json"
    recorded = saved.get("compute_dtype")
    if recorded is None:
        if saved:
            log(f"warning: {where} does not record the run's compute dtype (an older qlorakit wrote it); it cannot "
                f"be checked to be the same (dtype={asked})")
        return asked
    if not is_dtype_name(recorded):
        raise TrainingError(f"{where}: 'compute_dtype' is {show(recorded)}, not a dtype name (fp32, bf16, fp16); "
                            "restore the file, or start a new run (--overwrite)")
    if str(asked).lower() == "auto":
        log(f"dtype: auto, resumed in {recorded} (the compute dtype the run started in, as {where} records)")
        return recorded
    if parse_dtype(asked) != parse_dtype(recorded):
        raise TrainingError(
            f"{out}: --resume with dtype={asked}, but the run was started in {recorded} ({where}: compute_dtype); a "
            f"resumed run keeps its compute dtype: resume with dtype={recorded} (or auto), or start a new run "
            "(another --output, or --overwrite)"
        )
    return asked


def data_fingerprint(data) -> dict:
    """What makes a resumed run see the same data (`data`: what data.TrainingData.fingerprinted() and its kin give):
    the token ids and labels of every example, in order (hashed, so cheap to keep in each checkpoint), with counts to
    say what changed. A GRPO prompt has no labels; its row's other fields are hashed instead, since the rewards read
    them (a changed answer column is other data)."""
    import hashlib
    from array import array

    from .data import IGNORE_INDEX

    def of(items) -> dict:
        digest = hashlib.sha256()
        tokens = trained = 0
        for item in items:
            ids, labels = array("q", item.input_ids), getattr(item, "labels", None)
            digest.update(array("q", [len(ids)]).tobytes() + ids.tobytes())
            if labels is not None:
                digest.update(array("q", labels).tobytes())
                trained += len(labels[1:]) - labels[1:].count(IGNORE_INDEX)  # item.trained_tokens, faster
            row = getattr(item, "row", None)
            if row is not None:  # its length first, so that no two items' bytes run into each other alike
                text = json.dumps(row, sort_keys=True, default=str).encode()
                digest.update(array("q", [len(text)]).tobytes() + text)
            tokens += len(ids)
        return {"examples": len(items), "tokens": tokens, "trained_tokens": trained, "sha256": digest.hexdigest()}

    return {"train": of(data.train), "validation": of(data.validation)}


def data_change(saved: dict, now: dict) -> str | None:
    """How the data `now` differs from the `saved` fingerprint, in words; None when it is the same."""
    for part in ("train", "validation"):
        a, b = saved.get(part), now[part]
        if a is None or a == b:
            continue
        name = "training" if part == "train" else "validation"
        if a["examples"] != b["examples"]:
            return f"the {name} data now gives {b['examples']} examples; the run was started on {a['examples']}"
        for key, words in (("tokens", "tokens"), ("trained_tokens", "trained (label) tokens")):
            if a[key] != b[key]:
                return (f"the {b['examples']} {name} examples now hold {b[key]:,} {words}; the run was started "
                        f"with {a[key]:,}")
        return (f"the {b['examples']} {name} examples have as many tokens as before but different token ids, "
                "labels or (prompts) fields the rewards read (rows edited or reordered, or another tokenizer or chat "
                "template)")
    return None


def check_same_data(out: Path, checkpoint: Path, contents: dict, fingerprint: dict, data_name, log=print) -> None:
    """Refuse to resume from `checkpoint` (its read_checkpoint `contents`) on data other than it was trained on."""
    saved = contents["state"].get("data")
    if not isinstance(saved, dict):
        log(f"warning: {checkpoint} does not record its data (an older qlorakit wrote it); the data cannot be "
            "checked to be the same")
        return
    change = data_change(saved, fingerprint)
    if change:
        raise TrainingError(
            f"{out}: --resume with different data than {checkpoint} was trained on: {change}. A resumed run "
            f"must see the same data: restore {data_name or 'the data'}, or start a new run (another --output, "
            "or --overwrite)"
        )
