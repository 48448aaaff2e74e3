"""Training under the precision policy: one optimizer step (`TrainStep`) and a whole run (`train`), the latter
written out top to bottom — model, data, adapters, optimizer, resume, loop, outputs. Its parts live beside it:
optim.py (optimizer, schedule), data/batches.py (the micro-batch stream), checkpoint.py (checkpoints, what a resume
must keep), outputs.py (the run directory's claim, atomic writes), adapters.py (the saved adapter).

A step: autocast in the compute dtype, loss in fp32, each micro-batch's loss divided by the trained tokens of the
whole accumulated step (so accumulation equals one big batch), a GradScaler exactly under fp16, clipping on
unscaled gradients. A non-finite loss under fp16 is the scaler's skipped step; under fp32/bf16 it stops the run
before the optimizer touches the weights.

On several processes (distributed.py, launched by torchrun) each rank runs the same step on its share of the
global micro-batches; the trained tokens are counted over all ranks and DDP sums the adapters' gradients, so the
step is the one a single process takes on the whole global batch. Rank 0 alone writes the run's files.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import add_lora, load_adapter, read_adapter_info, save_adapter
from .checkpoint import (
    check_resumable, check_same_data, data_fingerprint, list_checkpoints, load_checkpoint, newest_intact_checkpoint,
    resumed_dtype, resumed_source, rng_state, save_checkpoint,
)
from .config import OPTIMIZER_RANGES, TrainConfig
from .data import IGNORE_INDEX, Batch, load_data, pad_id_of, read_data
from .distributed import (
    LostContact, Processes, check_shardable, device_of, full_optimizer_state, full_trainable_state,
    is_communication_error, join_run, load_full_optimizer_state, lost_contact, shard, wrap,
)
from .errors import ConfigError, DataError, TrainingError, check_number, show
from .evaluate import eval_loss
from .load import load, quantization_summary
from .loss import batch_loss, causal_lm_loss
from .metrics import MetricsLog, peak_memory, plot_loss_curve, still_falling
from .optim import make_optimizer, make_scheduler
from .outputs import atomic_write_json, claim_run_directory, is_disk_full
from .fast_path import fast_path_report
from .precision import Precision, dtype_name, precision_of, resolve_device
from .preference import write_reference
from .trackers import Trackers, check_trackers
from .upstream.torch_private import is_compiled, is_out_of_memory
from .upstream.transformers import enable_checkpointing

__all__ = ["LanguageModeling", "RunResult", "StepResult", "TrainStep", "causal_lm_loss", "run", "train"]


@dataclass
class StepResult:
    loss: float  # the objective's fp32 loss (SFT: mean per trained token)
    tokens: int  # trained tokens
    grad_norm: float
    skipped: bool  # the GradScaler found inf/nan gradients and skipped the update
    stats: dict = field(default_factory=dict)  # the objective's metrics of the step (preference: rewards...)


class LanguageModeling:
    """What SFT minimises: the next-token cross-entropy, in fp32, summed over the trained tokens of the step's
    micro-batches (on every rank) and divided by their number, so accumulation and several processes equal one big
    batch. The interface train.py's step and run use; preference.PreferenceObjective and grpo.GRPOObjective are
    the others."""

    config_class = TrainConfig

    @classmethod
    def of(cls, config: TrainConfig) -> "LanguageModeling":
        return cls()

    def counts(self, batch: Batch) -> list[float]:
        return [batch.trained_tokens]

    def forward(self, model, inputs: dict, labels: torch.Tensor, sequences=None):
        return batch_loss(model, inputs, labels)

    def loss(self, outputs, batch: Batch, counts: list[float]) -> tuple[torch.Tensor, dict]:
        loss_sum, _ = outputs
        return loss_sum / max(counts[0], 1), {}

    def stat_names(self) -> tuple[str, ...]:
        return ()

    def summary(self, stats: dict, counts: list[float]) -> dict:
        return {}

    memory_hint = ""  # what else the out-of-memory advice names (GRPO: its group size)

    def check_examples(self, examples) -> None:
        pass  # the format check (check_format) is all

    def data_options(self, model) -> dict:
        return {}  # the config's

    def prepare(self, *args, **kwargs):
        return None  # nothing to compute before training

    def collect(self, model, batches: list, step: int) -> tuple[list, dict]:
        return batches, {}  # the data's micro-batches are what the step trains on

    def check_resumable(self, out: Path) -> None:
        pass  # nothing of its own in the run directory

    def evaluate(self, model, items, pad_id: int, batch_size: int, packed: bool, processes=None) -> dict:
        return eval_loss(model, items, pad_id, batch_size, packed, processes)

    @staticmethod
    def describe_eval(result: dict) -> str:
        return (f"validation: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
                f"({result['tokens']} tokens)")

    @staticmethod
    def eval_record(result: dict) -> dict:
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}


class TrainStep:
    """One optimizer step at a time on a model from qlorakit.load + add_lora.

    The policy is checked here, before the first step: a violation raises PrecisionError naming the parameter.
    """

    def __init__(self, model, lr: float = 2e-4, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 optimizer: torch.optim.Optimizer | None = None, processes: Processes | None = None,
                 fsdp: bool = False, objective=None):
        _check_number("max_grad_norm", max_grad_norm, allow_none=True)
        if optimizer is None:
            _check_number("lr", lr)
            _check_number("weight_decay", weight_decay)
        else:
            for group in optimizer.param_groups:
                _check_number("lr", group.get("lr"), name="the optimizer's lr")
        if is_compiled(model):
            # Measured (CPU, torch 2.13): the step computes its loss through the decoder, around the compiled
            # wrapper, so nothing would be compiled; and the fused functions break dynamo's graph at every layer.
            raise ConfigError(
                "this model was compiled with torch.compile; qlorakit's training step computes the loss from the "
                "decoder, around the compiled wrapper, and its fused LoRA functions break dynamo's graph at every "
                "layer, so compiling gains nothing here. Pass the model from add_lora uncompiled"
            )
        self.model = model
        self.precision = precision_of(model)
        self.scaler = self.precision.grad_scaler(sharded=fsdp)
        self.precision.check(model, self.scaler)
        self.processes = processes or Processes()
        self.objective = objective or LanguageModeling()
        # fsdp: the base sharded across the ranks (distributed.shard; its root computes the loss, as DDP's wrapper
        # does), before the optimizer is made: sharding replaces the parameters (a given optimizer follows them)
        self.fsdp = shard(model, self.processes, optimizer, self.objective.forward) if fsdp else None
        if self.fsdp is not None:
            self.precision.check(model, self.scaler)  # the policy holds on the sharded model too
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.device = self.params[0].device
        # None on one process
        self.ddp = wrap(model, self.processes, self.objective.forward) if self.fsdp is None else None

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask=None) -> StepResult:
        """A step on one padded micro-batch; labels default to the input ids outside the attention mask."""
        if labels is None:
            labels = input_ids.clone()
            if attention_mask is not None:
                labels[attention_mask == 0] = IGNORE_INDEX
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.run([Batch(input_ids, labels, positions, attention_mask)])

    def run(self, batches: list[Batch]) -> StepResult:
        """A step over accumulated micro-batches, normalised together (SFT: by their trained tokens; on several
        processes: by those of every rank's micro-batches)."""
        try:
            return self._run(batches)
        except RuntimeError as e:  # DDP's gradient sums and FSDP's gathers run inside the forward and backward
            if not (self.processes.distributed and is_communication_error(e)):
                raise
            raise lost_contact(self.processes, e) from None

    def _run(self, batches: list[Batch]) -> StepResult:
        self.model.train()
        processes, world, objective = self.processes, self.processes.world, self.objective
        # the step's trained tokens and what the objective divides by, summed over micro-batches (and ranks)
        counts = [sum(b.trained_tokens for b in batches)]
        counts += [sum(values) for values in zip(*(objective.counts(b) for b in batches))]
        if processes.distributed:
            counts = processes.sum(counts, self.device)
        total_tokens, counts = int(counts[0]), counts[1:]
        loss_total, stats = 0.0, dict.fromkeys(objective.stat_names(), 0.0)
        wrapper = self.ddp if self.ddp is not None else self.fsdp
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            last = i == len(batches) - 1
            if self.fsdp is not None:  # FSDP's no_sync: gradients reduced on the step's last micro-batch only
                self.fsdp.set_requires_gradient_sync(last)
            with processes.no_sync(self.ddp, last=last):
                with self.precision.autocast():
                    if wrapper is None:
                        outputs = objective.forward(self.model, batch.model_inputs(), batch.labels, batch.sequences)
                    else:
                        outputs = wrapper(batch.model_inputs(), batch.labels, batch.sequences)
                    loss, batch_stats = objective.loss(outputs, batch, counts)  # this micro-batch's share
                # DDP (and FSDP) average the ranks' gradients; x world makes that their sum, the gradient of the
                # global loss
                scaled = loss if world == 1 else loss * world
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_total += float(loss.detach())
            for name, value in batch_stats.items():
                stats[name] += value
        if processes.distributed:
            loss_total, *summed = processes.sum([loss_total, *stats.values()], self.device)
            stats = dict(zip(stats, summed))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.fsdp is not None:  # over the sharded gradients: the norm of the whole, as a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
            if skipped:  # inf/NaN gradients are fp16's normal overflow, unless the weights themselves are NaN
                broken = non_finite_parameter(self.model)
                if broken:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise TrainingError(
                        f"the trainable parameter {broken} holds NaN or infinite values under "
                        f"{self.precision.describe()}, so every further step would be skipped. Lower the learning "
                        "rate or check the data"
                    )
        else:
            if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"non-finite {'loss' if not math.isfinite(loss_total) else 'gradient norm'} "
                    f"({loss_total if not math.isfinite(loss_total) else grad_norm}) under "
                    f"{self.precision.describe()}; the weights were not updated. Lower the learning rate, check "
                    "the data, or train in fp32"
                )
            self.optimizer.step()
            skipped = False
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss_total, tokens=total_tokens, grad_norm=grad_norm, skipped=skipped,
                          stats=objective.summary(stats, counts))


def _check_number(key: str, value, name: str | None = None, allow_none: bool = False) -> None:
    """TrainConfig's range for `key` (config.OPTIMIZER_RANGES), except that lr may be 0 here: a step that computes
    gradients without moving the weights is a use of TrainStep (a training run needs lr > 0)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:  # torch optimizers accept a tensor lr
        value = float(value)
    low, high, low_ok, high_ok, hint = OPTIMIZER_RANGES[key]
    check_number(name or key, value, low, high, low_ok=low_ok or key == "lr", high_ok=high_ok, hint=hint,
                 allow_none=allow_none)


def check_format(examples, objective: str) -> None:
    """SFT trains on examples, preference tuning on pairs, GRPO on prompts (`objective`: the config's OBJECTIVE):
    data of another kind is refused before the model loads, naming the command that reads it."""
    label = examples.label
    if objective == "grpo":
        if examples.format != "prompt":
            raise DataError(f"{label}: the data reads as {examples.format} data, and GRPO needs prompts: each row a "
                            "prompt (text, or a list of messages ending in a user turn) and the fields its rewards "
                            "read; map another column with --field prompt=COLUMN")
        return
    if examples.format == "prompt":
        raise DataError(f"{label}: the rows hold prompts without answers; train on them with `qlorakit grpo` "
                        "(qlorakit.train_grpo) and a reward, or give "
                        + ("preference pairs (prompt, chosen, rejected)" if objective == "preference" else
                           "SFT data (messages, prompt + completion, instruction + output, or text)"))
    if objective == "preference" and examples.format != "preference":
        raise DataError(f"{label}: the data reads as {examples.format} data, and preference training needs pairs: "
                        "each row a prompt, a chosen and a rejected answer (fields prompt, chosen, rejected; or "
                        "chosen and rejected conversations). Fine-tune on it with `qlorakit train`, or map your "
                        "columns with --field chosen=COLUMN --field rejected=COLUMN")
    if objective != "preference" and examples.format == "preference":
        raise DataError(f"{label}: the data holds preference pairs (chosen and rejected answers); tune on them with "
                        "`qlorakit dpo` (qlorakit.train_preference), or give SFT data (messages, prompt + "
                        "completion, instruction + output, or text)")


def non_finite_parameter(model) -> str | None:
    """The name of the first trainable parameter holding NaN or inf, or None when all are finite."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            return name
    return None


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    output: Path
    steps: int
    final_loss: float | None
    eval: dict | None
    data_report: str
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    metrics: list[dict] = field(default_factory=list, repr=False)


def train(config: TrainConfig | str | Path | None = None, *, loaded: tuple | None = None, overwrite: bool = False,
          log=print, progress: bool = True, **overrides) -> RunResult:
    """Fine-tune a model with QLoRA and write the adapter (PEFT format), config, metrics and loss curve.

    `config` is a TrainConfig, a YAML path, or None (defaults); `overrides` are TrainConfig fields
    (`train(model="...", data="train.jsonl")`). `loaded` = (model, tokenizer) from qlorakit.load, without adapters,
    skips loading. `overwrite` replaces an earlier run in the output directory, once this one has its first
    checkpoint (or its adapter).
    """
    return run(config, LanguageModeling, loaded=loaded, overwrite=overwrite, log=log, progress=progress, **overrides)


def run(config, objective_type, *, loaded: tuple | None = None, overwrite: bool = False, log=print,
        progress: bool = True, **overrides) -> RunResult:
    """A training run of `objective_type` (LanguageModeling: `train`; preference.PreferenceObjective:
    `train_preference`; grpo.GRPOObjective: `train_grpo`), whose config class (`objective_type.config_class`)
    `config` is, or is built as (a YAML path, None), with `overrides`."""
    claims = []  # the output's claim, taken by _train once the config is known; released however the run ends
    trackers = []  # the run's Trackers, opened by _train; closed before the claim is released (which may remove
    # the run's files), a run that raised marked failed
    groups = []  # the process group _train set up on several processes, taken down however the run ends
    try:
        try:
            result = _train(config, objective_type, loaded=loaded, overwrite=overwrite, log=log, progress=progress,
                            claims=claims, trackers=trackers, groups=groups, **overrides)
        except BaseException as e:
            for tracker in trackers:
                tracker.close(error=e)
            raise
        for tracker in trackers:
            tracker.close()
        return result
    except OSError as e:
        if not (claims and is_disk_full(e)):
            raise
        out = claims[0].path
        restored = claims.pop().release()  # an earlier run this one was replacing is back in place
        kept = list_checkpoints(out / "checkpoints")
        raise TrainingError(
            f"{out}: the disk is full (no space left on device) while writing the run's files; " + (
                "this run had no checkpoint yet and the earlier run there is back as it was: free some space and "
                "run again" if restored else
                f"the last checkpoint {kept[-1]} is intact: free some space and continue with --resume" if kept
                else "free some space and run again")) from None
    finally:
        for claim in claims:
            claim.release()
        for processes in groups:
            processes.close()


def _train(config, objective_type, *, loaded, overwrite, log, progress, claims: list, trackers: list,
           groups: list, **overrides) -> RunResult:
    """The run, top to bottom; its output's claim goes into `claims`, which run() releases, its trackers into
    `trackers`, which run() closes, and a process group it set up into `groups`."""
    config_class = objective_type.config_class
    if config is not None and not isinstance(config, (TrainConfig, str, Path)):
        raise ConfigError(f"config={show(config)}: pass a {config_class.__name__}, the path of a YAML config file, or "
                          "None (the defaults), with settings as keywords")
    if isinstance(config, TrainConfig) and type(config) is not config_class:
        raise ConfigError(f"a {type(config).__name__} is the settings of `qlorakit {type(config).COMMAND}`; pass a "
                          f"{config_class.__name__}")
    if not isinstance(config, TrainConfig):
        config = config_class.build(config, **overrides)
    elif overrides:
        config = config_class.from_dict(config.to_dict() | {k: v for k, v in overrides.items() if v is not None})
    else:
        config.validate()  # a config made or changed in Python has not been checked yet
    cfg = config
    objective = objective_type.of(cfg)
    out = Path(cfg.output)
    # The run's processes: one, or those torchrun started (each runs all of this; rank 0 alone writes and speaks).
    processes = join_run(cfg.device)
    groups.append(processes)
    if cfg.fsdp:
        check_shardable(processes, cfg.quant)
    main = processes.is_main
    if not main:
        log, progress = (lambda *args, **kwargs: None), False

    # 0. Checks before minutes of model loading: the output (claimed: locked, an earlier run refused without
    # --overwrite), what a resume must keep, the data files, the adapter to continue.
    def claim_output():  # rank 0's; a resume's checkpoint, read there, reaches every rank
        output = claim_run_directory(out, overwrite=overwrite, resume=cfg.resume)
        claims.append(output)
        saved, resume_from, resume_contents = {}, None, None
        if cfg.resume:
            saved = check_resumable(out, cfg, processes.world)
            objective.check_resumable(out)  # what it computed at the start (preference: the reference) is there
            resume_from, resume_contents = newest_intact_checkpoint(out / "checkpoints", log)
        check_trackers(cfg.trackers(), out, cfg.resume)  # --report-to: the libraries, the tracker runs to continue
        return saved, resume_from, resume_contents

    saved, resume_from, resume_contents = processes.on_main(claim_output)
    output = claims[0] if main else None
    if cfg.data is None:
        raise ConfigError("no training data: pass --data FILE (or data: in the YAML config)")
    if cfg.streaming and not cfg.max_steps:
        raise ConfigError(
            "--streaming reads the data as training needs it, so the number of examples (and the steps in an epoch) "
            "is known only once an epoch has been read: give the run's length with --max-steps N (epochs are "
            "counted as the data ends and starts again)"
        )
    if cfg.adapter is not None:
        read_adapter_info(cfg.adapter)  # missing, broken, or files of two saves
    device = resolve_device(device_of(processes, cfg.device)) if loaded is None else next(loaded[0].parameters()).device
    if cfg.offload_activations and device.type != "cuda":
        raise ConfigError(
            f"offload_activations=true moves activations from a CUDA device to CPU memory; this run is on "
            f"{device.type}, where they are in CPU memory already: leave it off (gradient_checkpointing alone "
            f"saves the memory)"
        )
    # The data, read before the model: a file's rows, a Hub dataset resolved and downloaded (or, streamed, opened
    # and its first row read), its split, mapped columns and format checked.
    examples = read_data(cfg.data, cfg.format, cfg.skip_bad_rows, cfg.validation, cfg.validation_data, cfg.seed,
                         config=cfg.data_config, split=cfg.split, validation_split=cfg.validation_split,
                         fields=cfg.field_map(), streaming=cfg.streaming)
    check_format(examples, cfg.OBJECTIVE)
    objective.check_examples(examples)  # (GRPO: every row holds the fields its rewards read)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 1. The model, quantized and in its compute dtype: what dtype= asks, or what `auto` resolves to here (once,
    # and recorded in config.json: a resumed run keeps the dtype it started in).
    if loaded is not None:
        model, tokenizer = loaded
        asked = dtype_name(precision_of(model).compute)
    else:
        asked = cfg.dtype
    if cfg.resume:
        asked = resumed_dtype(out, saved, asked, log)
    if loaded is None:
        compute = Precision.resolve(asked, device=device).compute
        source, revision = resumed_source(out, saved, cfg.model, log) if cfg.resume else (cfg.model, None)
        model, tokenizer = load(source, quant=cfg.quant, double_quant=cfg.double_quant, dtype=compute,
                                device=str(device), trust_remote_code=cfg.trust_remote_code, revision=revision)
    pad_id = pad_id_of(tokenizer)

    # 2. The data: examples -> token ids and labels (streamed: as the loop needs them).
    settings = dict(max_length=cfg.max_length, train_on=cfg.train_on, on_long=cfg.on_long,
                    parse_special_tokens=cfg.parse_special_tokens)
    data = load_data(examples, tokenizer, **(settings | objective.data_options(model)))
    log(f"data: {cfg.data} ({data.format}): {data.describe()}"
        + (f"; {len(data.validation)} held out for evaluation" if data.validation else ""))
    for skipped in data.report.skipped_rows[:5]:
        log(f"  skipped: {skipped}")
    fingerprint = data_fingerprint(data.fingerprinted())
    if resume_contents is not None:
        check_same_data(out, resume_from, resume_contents, fingerprint, cfg.data, log)

    # 3. Adapters (the base stays frozen and quantized): fresh ones, or an existing adapter trained further.
    if cfg.adapter is not None:
        model = load_adapter(model, cfg.adapter, trainable=True)
        lora = model.peft_config["default"]
        log(f"adapter: continuing {cfg.adapter} (r={lora.r}, alpha={lora.lora_alpha:g}"
            f"{', rsLoRA' if lora.use_rslora else ''}; its settings replace rank, alpha and targets)")
    else:
        model = add_lora(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                         rslora=cfg.rslora)
    if cfg.gradient_checkpointing or cfg.offload_activations:
        enable_checkpointing(model, offload=cfg.offload_activations)
    precision = precision_of(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {cfg.model} ({quantization_summary(model)}); LoRA r={cfg.rank} alpha={cfg.alpha:g} on "
        f"{cfg.targets}: {trainable / 1e6:.2f}M trainable parameters")
    log(f"precision: {precision.describe()}")
    log(f"fast path: {fast_path_report(model).describe()}")
    # Every rank the same run: its settings (paths aside: another node may mount the files elsewhere), the data's
    # tokens, the model's quantization and adapters.
    processes.agree({key: value for key, value in cfg.to_dict().items()
                     if key not in ("model", "data", "validation_data", "adapter", "output")}
                    | {"data": fingerprint, "model": quantization_summary(model), "trainable parameters": trainable})

    # 4. Optimizer and schedule.
    # A step's micro-batches are all held at once: bound them by the data (streamed data: None here, checked as its
    # first epoch is read; the run's length is then --max-steps).
    # On several processes a micro-batch is global: batch_size examples on each.
    global_batch = cfg.batch_size * processes.world
    micro_per_epoch = data.micro_batches_per_epoch(global_batch)
    if micro_per_epoch is not None and cfg.grad_accum > micro_per_epoch:
        per = f"{cfg.batch_size} on each of {processes.world} processes" if processes.distributed else cfg.batch_size
        raise ConfigError(
            f"grad_accum={cfg.grad_accum} is more micro-batches than the data holds ({len(data.train)} "
            f"{data.report.unit} in batches of {per}: {micro_per_epoch}); one optimizer step would pass over the data "
            f"more than once: use grad_accum of at most {micro_per_epoch}"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(micro_per_epoch / cfg.grad_accum)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.03 * total_steps)
    if warmup > total_steps:
        raise ConfigError(
            f"warmup_steps={warmup} is longer than the run ({total_steps} steps): the learning rate would never "
            "reach lr; use fewer warmup steps"
        )
    # What the objective computes once before training (preference: each pair's reference log-probabilities, with
    # the adapters as they start; read back on a --resume), to be written with the run's first files.
    prepared = objective.prepare(model, tokenizer, data, pad_id, cfg, processes, out, cfg.resume, fingerprint, log)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    step_fn = TrainStep(model, optimizer=optimizer, max_grad_norm=cfg.max_grad_norm, processes=processes,
                        fsdp=cfg.fsdp, objective=objective)
    if processes.rank:  # the adapters start equal everywhere (rank 0's); LoRA dropout draws per rank
        torch.manual_seed(cfg.seed + processes.rank)
    scheduler = make_scheduler(optimizer, cfg.schedule, warmup, total_steps)

    # 5. Resume: weights, optimizer, schedule, scaler, RNG and data position from the newest checkpoint.
    start_step, position, last_checkpoint = 0, {"epoch": 0, "micro": 0}, None
    if cfg.resume:
        last_checkpoint = resume_from
        # (sharded: the whole saved tensors, each rank keeping its part)
        load_optimizer = None if step_fn.fsdp is None else (
            lambda whole: load_full_optimizer_state(step_fn.fsdp, optimizer, whole))
        state = load_checkpoint(last_checkpoint, model, optimizer, scheduler, step_fn.scaler, resume_contents,
                                rank=processes.rank, load_optimizer=load_optimizer)
        resume_contents = None  # its tensors are in the model and optimizer now
        # The optimizer's saved learning rate is the old schedule's for this step; a resume that changes the run's
        # length (max_steps, epochs) must continue on the new schedule, as a run of that length would.
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        start_step, position = state["step"], state["position"]
        log(f"resumed from {last_checkpoint} (step {start_step} of {total_steps})")
    # (dtype as asked, compute_dtype as resolved: what a --resume continues in)
    # (+ the commit of a Hub base: what a --resume loads again, whatever the id's branch says by then)
    # (+ the processes: a resume on another number must keep the global batch)
    hub = getattr(model, "qlorakit_hub", None)
    run_config = cfg.to_dict() | {"objective": cfg.OBJECTIVE, "compute_dtype": dtype_name(precision.compute),
                                  "base_revision": hub.commit if hub is not None else None,
                                  "world_size": processes.world}

    def start_writing():  # rank 0's
        output.replace_previous()  # every check has passed: an earlier run moves aside, the new one starts writing
        atomic_write_json(out / "config.json", run_config)
        if prepared is not None:
            write_reference(out, prepared, fingerprint)
        trackers.append(Trackers(out, log))
        trackers[0].open(cfg.trackers(), run_config, resume_step=start_step if cfg.resume else None)
        return MetricsLog(out / "metrics.jsonl", resume_step=start_step if cfg.resume else None, trackers=trackers[0])

    metrics = processes.on_main(start_writing, send=False)  # None on the other ranks
    stream = data.batches(cfg.batch_size, cfg.seed, pad_id, cfg.packing, position, cfg.grad_accum,
                          processes.rank, processes.world)

    # 6. The loop.
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)
    result, last_eval, started = None, None, time.perf_counter()

    def last_good() -> str:
        return f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"

    def refuse_non_finite(step: int, what: str) -> None:
        # Never write NaN weights: a checkpoint would poison every resume, an adapter every later use.
        broken = non_finite_parameter(model)
        if broken:
            where = last_good()
            raise TrainingError(
                f"step {step}: the trainable parameter {broken} holds NaN or infinite values, so the {what} was not "
                f"written; {where}. Lower the learning rate (lr={cfg.lr:g}) or check the data"
            )

    step = start_step
    try:
        for step in range(start_step + 1, total_steps + 1):
            batches = stream.take(cfg.grad_accum)
            tick = time.perf_counter()
            try:
                # (GRPO: the step's prompts -> rollouts, generated and scored; the others train on the data's
                # batches. A reward's error names its row itself.)
                batches, collected = objective.collect(model, batches, step)
                try:
                    result = step_fn.run(batches)
                except TrainingError as e:
                    raise TrainingError(f"step {step}: {e}; {last_good()}") from None
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                raise TrainingError(
                    f"step {step}: out of memory ({e}); a micro-batch of {cfg.batch_size} {data.report.unit} "
                    f"does not fit here: lower --batch-size (raise --grad-accum to keep the step's size), shorten "
                    f"--max-length{objective.memory_hint} or turn on --gradient-checkpointing; {last_good()}"
                ) from None
            scheduler.step()
            seconds = time.perf_counter() - tick
            if collected:  # (GRPO: the step's time less generating, i.e. rewards, reference, policy, optimizer)
                collected["training_s"] = seconds - collected.get("generation_s", 0.0)
            real_tokens = sum(b.real_tokens for b in batches)
            memory = peak_memory(step_fn.device)
            if processes.distributed:  # one sum: every rank's tokens, and each rank's peak memory in its slot
                (key, mine), = memory.items()
                summed = processes.sum([real_tokens] + [mine if rank == processes.rank else 0.0
                                                        for rank in range(processes.world)], step_fn.device)
                real_tokens, by_rank = int(summed[0]), summed[1:]
                memory = {key: max(by_rank), f"{key}_by_rank": by_rank}  # the run's key holds the largest
            record = {"step": step, "epoch": round(stream.progress, 4),
                      "loss": result.loss, "lr": scheduler.get_last_lr()[0], "grad_norm": result.grad_norm,
                      "trained_tokens": result.tokens, "tokens": real_tokens,
                      "tokens_per_s": real_tokens / seconds, "skipped": result.skipped,
                      "elapsed_s": time.perf_counter() - started} | result.stats | collected
            if step_fn.scaler is not None:  # fp16: the loss scale the next step starts with
                record["scale"] = step_fn.scaler.get_scale()
            record |= memory
            if main and (step % cfg.log_every == 0 or step == total_steps):
                metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{real_tokens / seconds:.0f}")
                bar.update(1)
            if data.validation and cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
                last_eval = objective.evaluate(model, data.validation, pad_id, cfg.batch_size, cfg.packing,
                                               processes)
                if main:
                    metrics.write({"step": step} | objective.eval_record(last_eval))
            if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
                refuse_non_finite(step, "checkpoint")
                rng_states = processes.gather(rng_state())  # every rank's, written by rank 0
                # sharded: the adapter and optimizer state gathered whole (every rank takes part), written by rank 0
                whole = {} if step_fn.fsdp is None else {
                    "adapter_state": full_trainable_state(step_fn.fsdp),
                    "optimizer_state": full_optimizer_state(step_fn.fsdp, optimizer)}

                def save(step=step, record=record):
                    nonlocal last_checkpoint  # (kept here: should sending it to the others fail, it was written)
                    last_checkpoint = save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler,
                                                      step_fn.scaler, stream.position, record, cfg.keep_last,
                                                      fingerprint, rng_states, **whole)
                    output.commit()  # the new run can go on from here: an earlier run it replaces is deleted
                    return last_checkpoint

                last_checkpoint = processes.on_main(save)
    except LostContact as e:  # a collective between the steps (token counts, checkpoints, evaluation)
        raise TrainingError(f"step {step}: {e}; {last_good()}") from None
    if bar is not None:
        bar.close()

    # 7. Outputs: final evaluation, the adapter (PEFT format), metrics, loss curve.
    refuse_non_finite(total_steps, "adapter")
    if data.validation:
        last_eval = objective.evaluate(model, data.validation, pad_id, cfg.batch_size, cfg.packing, processes)
        log(objective.describe_eval(last_eval))

    whole = None if step_fn.fsdp is None else full_trainable_state(step_fn.fsdp)  # sharded: gathered by every rank

    def write_outputs():  # rank 0's; the records reach every rank
        if last_eval is not None and data.validation:
            metrics.write({"step": total_steps} | objective.eval_record(last_eval))
        save_adapter(model, out, cfg, precision, data, state=whole, world_size=processes.world)
        output.commit()
        records = metrics.read()
        plot_loss_curve(records, out / "loss.png", title=f"{Path(str(cfg.model)).name} r={cfg.rank}")
        return records

    records = processes.on_main(write_outputs)
    hint = still_falling(records)
    if hint:
        log(f"note: {hint}")
    final_loss = result.loss if result is not None else None
    return RunResult(out, total_steps, final_loss, last_eval, data.report.describe(), model, tokenizer, records)

