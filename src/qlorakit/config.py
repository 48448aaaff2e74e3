"""The training run's configuration: one dataclass, filled from defaults, then a YAML file, then command-line flags;
every value validated with an error that names the key (and the file) and says what to use.

Each TrainConfig field is declared once, with `option`: its type (the annotation), default, the values it takes and
what it does. `qlorakit train`'s flags are generated from these declarations (cli.add_train_flags), and validate()
checks the same choices, so a setting, its flag, its help and its check cannot drift apart. Importing it imports
no torch (its choices come from choices.py): the parser is built from it, and `--help` answers at once."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .choices import (
    COMPUTE_CHOICES, DEFAULT_MODEL, FORMATS, GRPO_LOSSES, ON_LONG, PREFERENCE_LOSSES, QUANT_KINDS, TRACKERS, TRAIN_ON,
    is_dtype_name,
)
from .errors import ConfigError, check_number, show

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
# A config is a few dozen settings: anything far bigger is the wrong file or a YAML alias bomb ("billion laughs"),
# which would take minutes and gigabytes to expand, copy or print.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 10_000
MAX_SEED = 2**32 - 1
# name: (low, high, low included, high included, typical values): the one range of each number that TrainConfig,
# add_lora and TrainStep all check (errors.check_number), wherever the value comes from.
OPTIMIZER_RANGES = {
    "lr": (0.0, 1.0, False, True, "typical for LoRA: 1e-4 to 1e-3"),
    "weight_decay": (0.0, None, True, True, "typical: 0 to 0.1"),
    "max_grad_norm": (0.0, None, False, True, "None: no clipping; null in a config file"),
}
LORA_RANGES = {
    "alpha": (0.0, None, False, True, "typical: twice the rank"),
    "dropout": (0.0, 1.0, True, False, "typical: 0 to 0.1"),
}
PARSE_SPECIAL_HELP = ("read special-token strings such as <|im_end|> inside message content as the control tokens "
                      "they name (by default they are plain text, so content cannot forge a turn)")


def option(default, help: str, *, choices: tuple[str, ...] | None = None, default_note: str | None = None,
           heading: str | None = None, repeatable: bool = False):
    """One TrainConfig setting. `help` says what it does (`qlorakit train --help` adds "(default ...)" from
    `default`, and `default_note` after it: what the default means); `choices` are the values it takes (the flag's
    choices and validate()'s check); `heading` starts a group of flags in the help, which runs to the next one;
    `repeatable`: the flag may be given several times, each adding one value to a list."""
    return field(default=default, metadata={"help": help, "choices": choices, "default_note": default_note,
                                            "heading": heading, "repeatable": repeatable})


def value_kinds(f: dataclasses.Field) -> set[str]:
    """The type names a field's annotation allows: 'int | None' -> {'int', 'None'}."""
    return {kind.strip() for kind in str(f.type).split("|")}


@dataclass
class TrainConfig:
    OBJECTIVE = "sft"  # what the run minimises (config.json's "objective"): next-token loss on examples
    COMMAND = "train"  # the `qlorakit` command that runs (and resumes) such a run
    KIND = "fine-tuning"  # the run in words
    # Settings a subclass's run does not have: their flags are left out of its command, a config that sets them is
    # refused, a resume does not compare them.
    NOT_APPLICABLE = {}
    model: str = option(DEFAULT_MODEL, "HF model directory, .gguf file, Hub id (org/name or org/name@revision; a "
                        "local path of that name wins), or the default model's name", heading="model")
    quant: str = option("nf4", "base weight quantization", choices=QUANT_KINDS)
    double_quant: bool = option(True, "4-bit double quantization")
    dtype: str = option("auto", "compute dtype; `qlorakit precision` shows what it resolves to here",
                        choices=COMPUTE_CHOICES)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    trust_remote_code: bool = option(False, "run code shipped in the model directory")

    data: str | None = option(None, "training data: .jsonl, .json, .csv, .parquet, a datasets directory, or a Hub "
                              "dataset id (org/name or org/name@revision) (none: the built-in demo task)",
                              heading="data")
    data_config: str | None = option(None, "the dataset's configuration (subset) name, for datasets that have several")
    split: str = option("train", "the dataset split trained on")
    validation_split: str | None = option(None, "a split of the same dataset used as validation data, e.g. "
                                          "validation or test")
    streaming: bool = option(False, "read the dataset as a stream, for datasets too large for memory")
    field: list | None = option(None, "TARGET=COLUMN: read the format's field TARGET from the data's column COLUMN, "
                                "e.g. messages=conversations or prompt=question; repeat for several",
                                repeatable=True)
    format: str = option("auto", "data format", choices=("auto", *FORMATS), default_note="detected from the fields")
    train_on: str = option("assistant", "assistant: train on the assistant/completion tokens only; all: on "
                           "every token", choices=TRAIN_ON)
    max_length: int = option(1024, "tokens per example")
    on_long: str = option("truncate", "examples over --max-length: truncate (counted), drop, or stop with an error",
                          choices=ON_LONG)
    skip_bad_rows: bool = option(False, "skip and count bad rows instead of stopping")
    validation: float = option(0.0, "fraction of examples held out for evaluation")
    validation_data: str | None = option(None, "a separate validation file")
    packing: bool = option(True, "padding-free packed batches")
    parse_special_tokens: bool = option(False, PARSE_SPECIAL_HELP)

    rank: int = option(16, "LoRA rank", heading="adapters")
    alpha: float = option(32.0, "LoRA alpha")
    dropout: float = option(0.0, "LoRA dropout")
    targets: str | list = option("all-linear", "'all-linear' or comma-separated module names, e.g. q_proj,v_proj")
    rslora: bool = option(False, "rank-stabilised scaling alpha/sqrt(r)")
    adapter: str | None = option(None, "continue training this LoRA adapter (a qlorakit run's --output or any PEFT "
                                 "LoRA adapter); its rank, alpha and targets are used")

    batch_size: int = option(8, "examples per micro-batch", heading="optimisation")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    optimizer: str = option("adamw", "adamw: torch's AdamW; the others: bitsandbytes' 8-bit / paged AdamW, "
                            "on CUDA", choices=OPTIMIZERS)
    schedule: str = option("cosine", "learning rate schedule after warmup", choices=SCHEDULES)
    warmup_steps: int | None = option(None, "linear warmup steps", default_note="3% of the run")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm")
    epochs: float = option(1.0, "passes over the data")
    max_steps: int | None = option(None, "optimizer steps; overrides --epochs")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward")
    offload_activations: bool = option(False, "CUDA: with gradient checkpointing, keep each layer's saved input "
                                       "in CPU memory")
    fsdp: bool = option(False, "on several processes: shard the frozen quantized base across them (FSDP2, "
                        "per decoder layer) instead of a copy on each")
    seed: int = option(0, "seed for adapters, data order and dropout")

    output: str = option("qlorakit-run", "run directory: adapter, config, metrics, checkpoints", heading="run")
    eval_every: int = option(0, "evaluate every N steps", default_note="at the end, when there is validation data")
    save_every: int = option(0, "checkpoint every N steps", default_note="none")
    keep_last: int = option(2, "checkpoints kept")
    resume: bool = option(False, "continue from the newest checkpoint in --output")
    log_every: int = option(1, "metrics.jsonl line every N steps")
    report_to: str = option("none", "where metrics also go: none, or comma-separated " + ", ".join(TRACKERS)
                            + " (each an extra: pip install qlorakit[NAME])")

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
                    f"{where}: unknown key {show(key)}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; the keys are: {', '.join(sorted(known))}"
                )
        config = cls(**values)
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        """Every field: its type (from the annotation), then its range. Numbers must be finite: a NaN or infinite
        learning rate, norm or epoch count would otherwise train to an all-NaN adapter without a word."""

        def bad(key, why):
            raise ConfigError(f"{where}: {key}={show(getattr(self, key))} {why}")

        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for key, why in self.NOT_APPLICABLE.items():
            if getattr(self, key) != defaults[key]:
                bad(key, f"does not apply to {self.KIND}: {why}; leave it out")

        for f in fields(self):
            value = getattr(self, f.name)
            kinds = value_kinds(f)
            if value is None:
                if "None" not in kinds:
                    bad(f.name, "must be set (it has no 'none' value)")
                continue
            if "float" in kinds and isinstance(value, str):
                try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                    value = float(value)
                    setattr(self, f.name, value)
                except ValueError:
                    pass
            if "bool" in kinds:
                ok, kind = isinstance(value, bool), "true or false"
            elif "int" in kinds:
                ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
            elif "float" in kinds:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                kind = "a number"
                if ok and f.name not in OPTIMIZER_RANGES and f.name not in LORA_RANGES:
                    check_number(f.name, value, where=where)  # finite; the ranged ones are checked below
            elif "list" in kinds:  # targets: checked below
                ok, kind = True, ""
            else:
                ok, kind = isinstance(value, str), "a string"
                if ok and not value.strip():
                    bad(f.name, "must not be empty" + (" (leave it out for none)" if "None" in kinds else ""))
            if not ok:
                bad(f.name, f"must be {kind}" + (", or null" if "None" in kinds else "")
                    + f", not {type(value).__name__}")

        def one_of(key, what):
            choices = choices_of(key)
            if getattr(self, key) not in choices:
                bad(key, f"is not {what}; use one of {', '.join(choices)}")

        one_of("quant", "a quantization")
        if not is_dtype_name(self.dtype, allow_auto=True):  # also the long names parse_dtype reads (bfloat16...)
            bad("dtype", f"is not a compute dtype; use one of {', '.join(choices_of('dtype'))}")
        one_of("format", "a data format")
        one_of("train_on", "what to train on")
        one_of("on_long", "a way to handle long examples")
        one_of("schedule", "a schedule")
        one_of("optimizer", "an optimizer")
        for key in ("batch_size", "grad_accum", "rank", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                bad(key, "must be at least 1")
        for key in ("eval_every", "save_every"):
            if getattr(self, key) < 0:
                bad(key, "must be 0 (off) or a number of steps")
        # The ranges of LoRA and optimizer numbers are LORA_RANGES / OPTIMIZER_RANGES, which add_lora and TrainStep
        # check too: one rule wherever a value comes from.
        for key, (low, high, low_ok, high_ok, hint) in {**OPTIMIZER_RANGES, **LORA_RANGES}.items():
            check_number(key, getattr(self, key), low, high, low_ok=low_ok, high_ok=high_ok, hint=hint, where=where,
                         allow_none=key == "max_grad_norm")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", "must be a positive whole number")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad("warmup_steps", "must be a whole number of steps (0 for none)")
        if self.warmup_steps is not None and self.max_steps is not None and self.warmup_steps > self.max_steps:
            bad("warmup_steps", f"is longer than the run (max_steps={self.max_steps}): the learning rate would "
                "never reach lr; use fewer warmup steps")
        if self.epochs <= 0:
            bad("epochs", "must be positive")
        if self.lr * self.weight_decay >= 1:
            bad("weight_decay", f"times lr={self.lr:g} must be below 1: AdamW multiplies the weights by "
                "(1 - lr * weight_decay) each step (typical weight_decay: 0 to 0.1)")
        check_number("validation", self.validation, 0.0, 1.0, low_ok=True, high_ok=False,
                     hint="the fraction of the data held out", where=where)
        if self.validation and self.validation_data is not None:
            bad("validation", f"and validation_data={show(self.validation_data)} are both given; hold out a "
                "fraction of the training data or use a separate file, not both")
        if self.validation_split is not None and (self.validation or self.validation_data is not None):
            other = "validation" if self.validation else "validation_data"
            bad("validation_split", f"and {other}={show(getattr(self, other))} are both given; use one source of "
                "validation data")
        if self.validation_split is not None and self.validation_split == self.split:
            bad("validation_split", f"is the split trained on (split={show(self.split)}): its loss would not measure "
                "anything held out; name another split")
        try:
            self.field_map()
            self.trackers()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if self.max_length < 2:
            bad("max_length", "must be at least 2 tokens")
        if not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"must be a whole number from 0 to {MAX_SEED}")
        from .adapters import _target_modules

        try:
            _target_modules(self.targets)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def field_map(self) -> dict[str, str]:
        """`field` as {TARGET: COLUMN} (parse_field_map); {} when not set."""
        return parse_field_map(self.field)

    def trackers(self) -> tuple[str, ...]:
        """`report_to` as tracker names; () for none."""
        if not isinstance(self.report_to, str):
            raise ConfigError(f"report_to={show(self.report_to)} must be none or comma-separated names of "
                              f"{', '.join(TRACKERS)}")
        names = [name.strip().lower() for name in self.report_to.split(",")]
        if names == ["none"]:
            return ()
        for name in names:
            if name not in TRACKERS:
                raise ConfigError(f"report_to={show(self.report_to)}: {name!r} is not a tracker qlorakit reports "
                                  f"to; use none, or comma-separated names of {', '.join(TRACKERS)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"report_to={show(self.report_to)} names a tracker twice")
        return tuple(names)


@dataclass
class PreferenceConfig(TrainConfig):
    """A preference-tuning run (`qlorakit dpo`, preference.train_preference): TrainConfig's settings, less those
    that do not apply (NOT_APPLICABLE: their flags are left out of `qlorakit dpo`, a config file that sets them is
    refused), plus the loss and its strengths. Its data are pairs: prompt, chosen, rejected."""

    OBJECTIVE = "preference"
    COMMAND = "dpo"
    KIND = "preference training"
    NOT_APPLICABLE = {
        "train_on": "preference training scores the chosen and rejected completions, never the prompt",
        "streaming": "preference training reads the data whole: each pair's reference log-probabilities are "
                     "computed once, before the first step",
    }

    # TrainConfig's settings said of pairs (their help), or with a preference run's own defaults
    format: str = option("auto", "data format: preference pairs (prompt, chosen, rejected)",
                         choices=("auto", "preference"), default_note="detected from the fields")
    max_length: int = option(1024, "tokens per sequence (the prompt and one answer)")
    on_long: str = option("truncate", "pairs with a sequence over --max-length: truncate (counted), drop, or stop "
                          "with an error", choices=ON_LONG)
    validation: float = option(0.0, "fraction of pairs held out for evaluation")
    adapter: str | None = option(None, "continue this LoRA adapter (e.g. an SFT run's --output); the run's reference "
                                 "is then this adapter, as it starts")
    batch_size: int = option(8, "pairs per micro-batch", heading="optimisation")
    lr: float = option(5e-5, "peak learning rate")
    output: str = option("qlorakit-dpo", "run directory: adapter, config, metrics, checkpoints", heading="run")
    loss: str = option("sigmoid", "sigmoid: DPO; ipo: IPO (per-token log-ratios); hinge: SLiC's hinge; orpo: ORPO "
                       "(odds ratio plus the chosen answers' NLL, no reference); simpo: SimPO (length-normalised, "
                       "no reference)", choices=PREFERENCE_LOSSES, heading="preference")
    beta: float = option(0.1, "strength: DPO/hinge/SimPO's inverse temperature, IPO's 1/(2 beta) target margin, "
                         "ORPO's weight of the odds-ratio term")
    simpo_gamma: float = option(0.5, "SimPO's target reward margin gamma: its loss is -log sigmoid(beta x (mean "
                                "log-prob of chosen - of rejected) - gamma)")

    def validate(self, where: str = "config") -> None:
        super().validate(where)
        if self.format not in ("auto", "preference"):
            raise ConfigError(f"{where}: format={show(self.format)}: preference training reads pairs (prompt, chosen, "
                              "rejected); use format auto or preference")
        if self.loss not in PREFERENCE_LOSSES:
            raise ConfigError(f"{where}: loss={show(self.loss)} is not a preference loss; use one of "
                              f"{', '.join(PREFERENCE_LOSSES)}")
        check_number("beta", self.beta, 0.0, None, low_ok=False, where=where, hint="typical: 0.1 (0.01 to 0.5)")
        check_number("simpo_gamma", self.simpo_gamma, 0.0, None, low_ok=True, where=where,
                     hint="typical: 0.5 to 1.5")
        gamma_default = next(f.default for f in fields(self) if f.name == "simpo_gamma")
        if self.simpo_gamma != gamma_default and self.loss != "simpo":
            raise ConfigError(f"{where}: simpo_gamma={show(self.simpo_gamma)} is SimPO's margin, and loss="
                              f"{show(self.loss)} has none; use --loss simpo, or leave simpo_gamma out")


@dataclass
class GRPOConfig(TrainConfig):
    """A GRPO run (`qlorakit grpo`, grpo.train_grpo): reinforcement learning with verifiable rewards on prompts.
    TrainConfig's settings less those that do not apply (NOT_APPLICABLE), plus the rewards, the sampling of each
    prompt's group of completions and the loss. Its data are prompts: {"prompt": ..., any fields the rewards read}."""

    OBJECTIVE = "grpo"
    COMMAND = "grpo"
    KIND = "GRPO"
    NOT_APPLICABLE = {
        "train_on": "GRPO trains on the completions it generates, never the prompt",
        "streaming": "GRPO reads the prompts whole",
        "fsdp": "generation reads each layer's whole weights, which FSDP shards across the processes; train on "
                "several processes without --fsdp (each holds the quantized base)",
    }

    format: str = option("auto", "data format: prompts ({\"prompt\": text or messages, plus the fields the rewards "
                         "read})", choices=("auto", "prompt"), default_note="prompt")
    max_length: int = option(1024, "tokens per sequence: a prompt and its completion (prompts longer than "
                             "max_length - max_new_tokens are dropped or refused, --on-long)")
    on_long: str = option("drop", "prompts too long for --max-length with --max-new-tokens: drop (counted) or stop "
                          "with an error", choices=("drop", "error"))
    validation: float = option(0.0, "fraction of prompts held out: the run reports their mean reward (greedy "
                               "answers)")
    batch_size: int = option(4, "prompts per micro-batch (each with --group-size completions)",
                             heading="optimisation")
    lr: float = option(1e-5, "peak learning rate")
    output: str = option("qlorakit-grpo", "run directory: adapter, config, metrics, checkpoints", heading="run")
    reward: list | None = option(None, "a reward: exact:FIELD, regex:PATTERN, numeric:FIELD, overlong:N, truncated, "
                                 "or MODULE:FUNCTION / FILE.py:FUNCTION (called with prompts, completions, rows; "
                                 "returns a number per completion); repeat for several", heading="GRPO",
                                 repeatable=True)
    reward_weights: str | list | None = option(None, "the rewards' weights, comma-separated in --reward order",
                                               default_note="1 each")
    group_size: int = option(8, "completions sampled per prompt; advantages are rewards normalised within a group")
    max_new_tokens: int = option(256, "longest completion in tokens")
    temperature: float = option(1.0, "sampling temperature (the log-probabilities trained on use it too)")
    top_p: float = option(1.0, "nucleus sampling: 1.0 turns it off")
    top_k: int = option(0, "sample among the k most likely tokens: 0 turns it off")
    loss: str = option("dapo", "how the completion tokens' terms are averaged: dapo, over all the step's completion "
                       "tokens (TRL's default); grpo, each completion's token mean, then over completions; dr_grpo, "
                       "the sum / (completions x max_new_tokens), advantages not divided by the group's std",
                       choices=GRPO_LOSSES)
    beta: float = option(0.0, "KL penalty towards the model as the run starts: the base (fresh adapters), or the "
                         "--adapter continued (0: none, and no reference forward)")
    epsilon: float = option(0.2, "clipping of the policy ratio: [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = option(None, "the upper clip (DAPO: 0.28)", default_note="epsilon")

    def validate(self, where: str = "config") -> None:
        if isinstance(self.reward, str):  # a YAML `reward: exact:answer`
            self.reward = [self.reward]
        if self.reward is not None and not isinstance(self.reward, list):  # before the type checks' wording
            raise ConfigError(f"{where}: reward={show(self.reward)}: give one or more reward specs as strings (a "
                              "YAML list of them, or --reward SPEC repeated), e.g. exact:answer")
        super().validate(where)
        if self.format not in ("auto", "prompt"):
            raise ConfigError(f"{where}: format={show(self.format)}: GRPO reads prompts ({{\"prompt\": ...}}); use "
                              "format auto or prompt")
        if self.on_long not in ("drop", "error"):
            raise ConfigError(f"{where}: on_long={show(self.on_long)}: a prompt is never truncated (that would cut "
                              "its instruction); use drop or error")
        if self.reward is not None and (not isinstance(self.reward, list) or not self.reward
                                        or not all(isinstance(s, str) for s in self.reward)):
            raise ConfigError(f"{where}: reward={show(self.reward)}: give one or more reward specs as strings (a "
                              "YAML list of them, or --reward SPEC repeated), e.g. exact:answer")
        if self.loss not in GRPO_LOSSES:
            raise ConfigError(f"{where}: loss={show(self.loss)} is not a GRPO loss; use one of "
                              f"{', '.join(GRPO_LOSSES)}")
        if self.group_size < 2:
            raise ConfigError(f"{where}: group_size={show(self.group_size)}: advantages compare the completions of a "
                              "prompt, so a group needs at least 2 (typical: 4 to 16)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}: max_new_tokens={show(self.max_new_tokens)}: generate at least 1 token")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError(f"{where}: max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                              f"max_length={self.max_length}; raise --max-length or lower --max-new-tokens")
        check_number("temperature", self.temperature, 0.0, None, low_ok=False, where=where,
                     hint="typical: 0.7 to 1.0; GRPO samples, so it must be above 0")
        check_number("top_p", self.top_p, 0.0, 1.0, low_ok=False, where=where, hint="1.0 turns it off")
        if self.top_k < 0:
            raise ConfigError(f"{where}: top_k={show(self.top_k)}: use 0 (off) or a positive number of tokens")
        check_number("beta", self.beta, 0.0, None, low_ok=True, where=where, hint="typical: 0 to 0.04")
        check_number("epsilon", self.epsilon, 0.0, 1.0, low_ok=False, high_ok=False, where=where,
                     hint="typical: 0.2")
        if self.epsilon_high is not None:
            check_number("epsilon_high", self.epsilon_high, 0.0, None, low_ok=False, where=where,
                         hint="typical: 0.2 to 0.28")


CONFIG_CLASSES = {c.OBJECTIVE: c for c in (TrainConfig, PreferenceConfig, GRPOConfig)}


def config_class(objective: str | None) -> type[TrainConfig]:
    """The config class of a run whose config.json says `objective` (None: a run saved before there were several)."""
    return CONFIG_CLASSES.get(objective, TrainConfig)


def command_of(objective: str | None) -> str:
    """The `qlorakit` command that runs (and resumes) a run of `objective`."""
    return config_class(objective).COMMAND


def parse_field_map(given) -> dict[str, str]:
    """--field as {TARGET: COLUMN}: from TARGET=COLUMN strings (flags, or a YAML list or string) or a YAML
    mapping; {} for None."""
    if given is None:
        return {}
    if isinstance(given, dict):
        pairs = list(given.items())
    else:
        entries = [given] if isinstance(given, str) else given
        if not isinstance(entries, list):
            raise ConfigError(f"field={show(given)} must be TARGET=COLUMN strings or a mapping TARGET: COLUMN")
        pairs = []
        for entry in entries:
            if not isinstance(entry, str) or entry.count("=") != 1:
                raise ConfigError(f"field={show(entry)} must be TARGET=COLUMN, e.g. messages=conversations")
            pairs.append(tuple(entry.split("=")))
    mapping: dict[str, str] = {}
    for target, column in pairs:
        if not isinstance(target, str) or not isinstance(column, str) or not target.strip() or not column.strip():
            raise ConfigError(f"field {show(target)}={show(column)}: TARGET and COLUMN must both be non-empty "
                              "names, e.g. messages=conversations")
        target, column = target.strip(), column.strip()
        if target in mapping:
            raise ConfigError(f"field: {target!r} is mapped twice ({mapping[target]!r} and {column!r}); map "
                              "each field once")
        mapping[target] = column
    return mapping


def choices_of(name: str) -> tuple[str, ...] | None:
    """The values TrainConfig's field `name` takes (its flag's choices), or None when it is not a choice."""
    return next(f.metadata["choices"] for f in fields(TrainConfig) if f.name == name)


class _SelfReference(Exception):
    pass


def _expanded_size(node, sizes: dict, open_: set) -> int:
    """How many values a YAML node stands for once its aliases are expanded (shared nodes counted each time they
    are used), without expanding anything."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise _SelfReference
    open_.add(key)
    if isinstance(node.value, list):
        children = [n for pair in node.value for n in (pair if isinstance(pair, tuple) else (pair,))]
        size = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    else:
        size = 1
    open_.discard(key)
    sizes[key] = size
    return size


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes is far too big for a config file (at most {MAX_YAML_BYTES:,}); "
                          "a qlorakit config is a short mapping of settings — is this the right file?")
    try:
        text = path.read_bytes()[:MAX_YAML_BYTES].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); a config is YAML text") from None
    loader = yaml.SafeLoader(text)
    try:
        # Composed once: the node graph is checked (alias expansion, duplicate keys), then the values are built
        # from that same graph.
        node = loader.get_single_node()
        if node is not None:
            try:
                count = _expanded_size(node, {}, set())
            except _SelfReference:
                raise ConfigError(f"{path}: a YAML alias refers to itself (a value that contains itself); write the "
                                  "values out instead of using anchors (&) and aliases (*)") from None
            if count > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{path}: the YAML's aliases expand to {count:,} values (at most {MAX_YAML_VALUES:,}): a "
                    "config is a short mapping of settings; write the values out instead of using anchors (&) and "
                    "aliases (*)"
                )
            if isinstance(node, yaml.MappingNode):
                seen = {}
                for key_node, _ in node.value:
                    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                    if name is not None and name in seen:
                        raise ConfigError(
                            f"{path} line {key_node.start_mark.line + 1}: key {show(name)} is given twice (first on "
                            f"line {seen[name]}); YAML would silently keep only the last — keep one"
                        )
                    seen[name] = key_node.start_mark.line + 1
        values = loader.construct_document(node) if node is not None else None
    except RecursionError:  # PyYAML composes nested values recursively
        raise ConfigError(f"{path}: values nested too deeply; a config is a flat mapping of settings") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or show(str(e))})") from None
    finally:
        loader.dispose()
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the YAML must be a mapping of keys to values, not a {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
