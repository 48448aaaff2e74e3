"""The training run's configuration: one dataclass, filled from defaults, then a YAML file, then command-line flags;
every value validated with an error that names the key (and the file) and says what to use."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


@dataclass
class TrainConfig:
    # model and quantization
    model: str = "smollm2-135m-instruct"
    quant: str = "nf4"
    double_quant: bool = True
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # data (no data: the built-in demo task)
    data: str | None = None
    format: str = "auto"
    train_on: str = "assistant"
    max_length: int = 1024
    on_long: str = "truncate"
    skip_bad_rows: bool = False
    validation: float = 0.0
    validation_data: str | None = None
    packing: bool = True
    # adapters
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | list = "all-linear"
    rslora: bool = False
    adapter: str | None = None  # continue training this LoRA adapter (PEFT format) instead of fresh ones
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: 3% of the steps
    max_grad_norm: float | None = 1.0
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # CUDA: keep the checkpointed layer inputs in pinned CPU memory
    seed: int = 0
    # bookkeeping
    output: str = "qlorakit-run"
    eval_every: int = 0  # 0: evaluate at the end only (when there is validation data)
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_last: int = 2
    resume: bool = False
    log_every: int = 1

    @classmethod
    def build(cls, yaml_path: str | Path | None = None, **overrides) -> "TrainConfig":
        """Defaults, then the YAML file's keys, then `overrides` (None values are ignored: flags not given)."""
        values = {}
        if yaml_path is not None:
            values.update(read_yaml(yaml_path))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, where=str(yaml_path) if yaml_path else "config")

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                raise ConfigError(
                    f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; the keys are: {', '.join(sorted(known))}"
                )
        config = cls(**values)
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        def bad(key, why):
            raise ConfigError(f"{where}: {key}={getattr(self, key)!r} {why}")

        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if value is None or default is None or f.name == "targets":
                continue  # optional fields are checked one by one below
            if isinstance(default, float) and isinstance(value, str):
                try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                    value = float(value)
                    setattr(self, f.name, value)
                except ValueError:
                    pass
            if isinstance(default, bool):
                ok = isinstance(value, bool)
                kind = "true or false"
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
                kind = "a whole number"
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                kind = "a number"
            else:
                ok = isinstance(value, str)
                kind = "a string"
            if not ok:
                bad(f.name, f"must be {kind}")
        from .load import QUANT_KINDS

        if self.quant not in QUANT_KINDS:
            bad("quant", f"is not a quantization; use one of {', '.join(QUANT_KINDS)}")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16"):
            bad("dtype", "is not a compute dtype; use auto, fp32, bf16 or fp16")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"is not a schedule; use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"is not an optimizer; use one of {', '.join(OPTIMIZERS)}")
        for key in ("batch_size", "grad_accum", "rank", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                bad(key, "must be at least 1")
        for key in ("eval_every", "save_every"):
            if getattr(self, key) < 0:
                bad(key, "must be 0 (off) or a number of steps")
        if self.max_grad_norm is not None and (
            not isinstance(self.max_grad_norm, (int, float)) or self.max_grad_norm <= 0
        ):
            bad("max_grad_norm", "must be a positive number, or null for no clipping")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            bad("max_steps", "must be a positive whole number")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            bad("warmup_steps", "must be a whole number of steps (0 for none)")
        if self.epochs <= 0:
            bad("epochs", "must be positive")
        if not self.lr > 0:
            bad("lr", "must be positive (typical for LoRA: 1e-4 to 1e-3)")
        if self.alpha <= 0:
            bad("alpha", "must be positive (typical: twice the rank)")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)")
        if not 0 <= self.validation < 1:
            bad("validation", "must be a fraction in [0, 1)")
        if self.max_length < 2:
            bad("max_length", "must be at least 2 tokens")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the YAML must be a mapping of keys to values, not a {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
