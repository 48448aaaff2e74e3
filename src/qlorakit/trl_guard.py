"""Keep TRL's trainers inside the precision policy.

TRL >= 0.26 casts every trainable parameter of a 4/8-bit model to bf16 in its trainers' __init__ (SFT, DPO, KTO,
Reward, RLOO, GRPO), whatever the user asked; under fp16 that breaks the GradScaler (it cannot unscale bf16
gradients), and the cast rounds the adapters' values to bf16's 8 bits of mantissa. And on a CPU, accelerate runs
fp16 mixed precision with no GradScaler at all. The guard re-applies the policy through TRL's public extension
points only: subclasses (qlorakit.SFTTrainer, DPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer, GRPOTrainer, all
built by one factory) that give the adapters back their own tensors and re-apply the policy after __init__, and a
callback that re-checks it when training begins. TRL's source is never edited.

What the forward pass autocasts to is accelerate's mixed-precision mode, which transformers takes from the fp16/bf16
flags and, when both are off, from the environment: `accelerate launch --mixed_precision bf16` (or an `accelerate
config` default) would autocast an fp32 model to bf16 with every check above passing. The subclasses set the mode
from the policy; the guard refuses a trainer whose accelerator runs another.
"""

from __future__ import annotations

import copy

from transformers import TrainerCallback

from .errors import PrecisionError
from .precision import Precision, dtype_name, precision_of
from .upstream import accelerate, require


def _check_args(args, precision: Precision) -> None:
    wanted = precision.trainer_flags()
    for flag, value in wanted.items():
        if bool(require("transformers", args, flag, "TrainingArguments")) != value:
            raise PrecisionError(
                f"TrainingArguments.{flag}={getattr(args, flag, None)} but the model's compute dtype is "
                f"{dtype_name(precision.compute)}; set fp16={wanted['fp16']}, bf16={wanted['bf16']} "
                "(qlorakit's TRL trainers, qlorakit.SFTTrainer, DPOTrainer, GRPOTrainer, ..., set them from the "
                "model, except under DeepSpeed)"
            )


def _check_generation_casts(args, precision: Precision) -> None:
    # GRPO's and RLOO's paged generation casts the whole model, adapters included, to the dtype of the fp16/bf16 flag
    # before generating, and does not cast it back.
    if getattr(args, "use_transformers_paged", False) and precision.adapter != precision.compute:
        raise PrecisionError(
            f"use_transformers_paged=True: TRL's paged generation casts the whole model, the trainable "
            f"{dtype_name(precision.adapter)} adapters included, to {dtype_name(precision.compute)} before "
            "generating" + (", which breaks the GradScaler (rule 2: under fp16 every trainable parameter is fp32)"
                            if precision.uses_grad_scaler else "")
            + ". Set use_transformers_paged=False (TRL's default)"
        )


def _mixed_precision(precision: Precision) -> str:
    """accelerate's name for the policy's autocast: 'fp16', 'bf16', or 'no' under fp32."""
    return dtype_name(precision.compute) if precision.uses_autocast else "no"


def _check_accelerator(accelerator, precision: Precision) -> None:
    mode, wanted = accelerate.mixed_precision(accelerator), _mixed_precision(precision)
    if mode != wanted:
        raise PrecisionError(
            f"the trainer's accelerator runs mixed_precision={mode!r} but the model's compute dtype is "
            f"{dtype_name(precision.compute)} (it would autocast to {mode}); with fp16 and bf16 off, transformers "
            "takes the mode from `accelerate launch --mixed_precision`, ACCELERATE_MIXED_PRECISION or your "
            f"`accelerate config`. Launch with --mixed_precision {wanted}, or use qlorakit's TRL trainers "
            "(qlorakit.SFTTrainer, DPOTrainer, GRPOTrainer, ...), which set it from the model"
        )


class PrecisionCallback(TrainerCallback):
    """Re-applies and re-checks the policy when training begins (after the optimizer exists)."""

    def __init__(self, precision: Precision, accelerator):
        self.precision = precision
        self.accelerator = accelerator

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.precision.apply(model)
        self.precision.check(model, accelerate.grad_scaler(self.accelerator))


def guard(trainer):
    """Bring an already built transformers/TRL trainer back into the policy of its qlorakit model and keep it
    there. Returns the trainer."""
    precision = precision_of(trainer.model)
    _check_args(trainer.args, precision)
    _check_generation_casts(trainer.args, precision)
    accelerator = trainer.accelerator
    _check_accelerator(accelerator, precision)
    precision.apply(trainer.model)
    if precision.uses_grad_scaler and accelerate.grad_scaler(accelerator) is None:
        accelerate.give_grad_scaler(accelerator, precision.grad_scaler())
    if not any(isinstance(cb, PrecisionCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(PrecisionCallback(precision, accelerator))
    precision.check(trainer.model, accelerate.grad_scaler(accelerator))
    return trainer


# qlorakit's guarded trainers: each is TRL's trainer of the same name, and this is its config class.
TRAINERS = {
    "SFTTrainer": "SFTConfig", "DPOTrainer": "DPOConfig", "KTOTrainer": "KTOConfig",
    "RewardTrainer": "RewardConfig", "RLOOTrainer": "RLOOConfig", "GRPOTrainer": "GRPOConfig",
}


def _trl_class(name: str):
    """trl.<name>, or the UpstreamError naming TRL's release: a class gone, or one whose module fails to import (TRL
    0.26's DPO, RLOO and GRPO trainers under transformers 5: `import weave`)."""
    import trl

    from .upstream import changed

    try:
        return getattr(trl, name)
    except AttributeError:
        raise changed("trl", f"trl.{name}", "it is gone") from None
    except (ImportError, RuntimeError) as e:  # TRL's lazy module reports a failed import as a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cause = f" {e.__cause__}" if e.__cause__ is not None else ""
        raise changed("trl", f"trl.{name}", f"import failed: {first}{cause}") from None


def _policy_args(args, precision: Precision, config_class, output_dir: str):
    """The trainer's config with the fp16/bf16 flags and accelerate's mixed-precision mode of the model's policy.

    The model's dtype was decided at load time; TRL's own default, bf16=True, would be wrong for fp16 and fp32 models,
    and so would a launcher's --mixed_precision (which __post_init__ reads when both flags are off). The user's config
    is left alone: a corrected one is a copy with the three fields set as __post_init__ derives them. (Re-running
    __post_init__ through dataclasses.replace is not an option: GRPO's and RLOO's fill in fields, such as
    generation_batch_size, that they then refuse to be given together with the one they were derived from.)
    """
    flags, mode = precision.trainer_flags(), _mixed_precision(precision)
    if args is None:
        args = config_class(output_dir=output_dir, **flags)
    current = {flag: bool(require("transformers", args, flag, "TrainingArguments")) for flag in flags}
    if current == flags and require("transformers", args, "mixed_precision", "TrainingArguments") == mode:
        return args
    if getattr(args, "deepspeed", None):
        # DeepSpeed's config was filled in from the flags when this one was built, and would not follow a change:
        # the guard refuses flags that disagree with the model, naming the ones to set.
        return args
    args = copy.copy(args)
    args.fp16, args.bf16, args.mixed_precision = flags["fp16"], flags["bf16"], mode
    return args


def _trainable_tensors(model) -> list:
    """(parameter, the tensor it holds) for each trainable parameter: what TRL's cast replaces."""
    return [(param, param.data) for param in model.parameters() if param.requires_grad]


def _undo_casts(saved: list) -> None:
    """Give back each parameter whose dtype TRL changed the very tensor it held before. TRL's cast (`param.data =
    param.data.to(bf16)`) replaces the tensor and leaves the old one as it was, so this restores the user's values
    bit for bit (an adapter being continued, LoRA A's random init), where casting back would keep bf16's rounding."""
    for param, tensor in saved:
        if param.dtype != tensor.dtype:
            param.data = tensor.to(param.device)


def _guarded_class(name: str):
    """qlorakit.<name>: TRL's trainer of that name, kept in the precision policy of a model from qlorakit.load +
    add_lora (TRAINERS lists them). Its config's fp16/bf16 flags, and accelerate's mixed-precision mode, come from the
    model's policy (_policy_args); the trainable parameters TRL casts to bf16 get their own tensors back
    (_undo_casts); then `guard` re-applies the policy, gives fp16 on a CPU its GradScaler and adds the
    PrecisionCallback that re-checks it when training begins."""
    import inspect

    import trl

    base = _trl_class(name)
    config_class = require("trl", trl, TRAINERS[name], "trl")
    # Where `args` and `model` sit among the positional arguments differs by trainer (DPO: model, ref_model, args;
    # GRPO: model, reward_funcs, args; ...) and by TRL release: the trainer's own signature says. (Some releases put a
    # deprecation shim, __init__(*args, **kwargs), over a trainer being moved: the signature is that of the first
    # class in line that names its parameters.)
    signature = next((sig for sig in (inspect.signature(klass.__init__) for klass in base.__mro__)
                      if {"model", "args"} <= sig.parameters.keys()), None)
    if signature is None:
        from .upstream import changed

        raise changed("trl", f"{name}.__init__'s parameters", "none of its classes takes `model` and `args`")
    output_dir = f"qlorakit-{name.removesuffix('Trainer').lower()}"

    def __init__(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        model, saved = bound.arguments.get("model"), []
        if model is not None and not isinstance(model, str):
            precision = precision_of(model)
            bound.arguments["args"] = _policy_args(bound.arguments.get("args"), precision, config_class, output_dir)
            saved = _trainable_tensors(model)
        base.__init__(*bound.args, **bound.kwargs)
        _undo_casts(saved)
        guard(self)

    __init__.__signature__ = signature  # help() shows TRL's parameters
    doc = (f"TRL's {name} for a model from qlorakit.load + add_lora, kept in the precision policy: the config's "
           "fp16/bf16 flags and accelerate's mixed-precision mode come from the model, the adapters keep their own "
           "dtype and values through TRL's bf16 cast, and the policy is re-checked when training begins.")
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": name})


def __getattr__(name):
    # `qlorakit.trl_guard.SFTTrainer` (and the others) are built on first use so that importing qlorakit does not
    # import TRL.
    if name in TRAINERS:
        cls = _guarded_class(name)
        globals()[name] = cls
        return cls
    raise AttributeError(name)
