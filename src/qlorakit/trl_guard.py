"""Keep TRL's trainers inside the precision policy.

TRL >= 0.26 casts every trainable parameter of a 4/8-bit model to bf16 in its trainers' __init__, whatever the
user asked; under fp16 that breaks the GradScaler (it cannot unscale bf16 gradients). And on a CPU, accelerate runs
fp16 mixed precision with no GradScaler at all. The guard re-applies the policy through TRL's public extension
points only: a subclass that re-applies it after __init__, and a callback that re-checks it when training begins.
TRL's source is never edited.

What the forward pass autocasts to is accelerate's mixed-precision mode, which transformers takes from the fp16/bf16
flags and, when both are off, from the environment: `accelerate launch --mixed_precision bf16` (or an `accelerate
config` default) would autocast an fp32 model to bf16 with every check above passing. The subclass sets the mode from
the policy; the guard refuses a trainer whose accelerator runs another.
"""

from __future__ import annotations

import copy
import dataclasses

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
                "(qlorakit.SFTTrainer sets them for you when you leave them unset)"
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
            f"`accelerate config`. Launch with --mixed_precision {wanted}, or use qlorakit.SFTTrainer, which sets it "
            "from the model"
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
    accelerator = trainer.accelerator
    _check_accelerator(accelerator, precision)
    precision.apply(trainer.model)
    if precision.uses_grad_scaler and accelerate.grad_scaler(accelerator) is None:
        accelerate.give_grad_scaler(accelerator, precision.grad_scaler())
    if not any(isinstance(cb, PrecisionCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(PrecisionCallback(precision, accelerator))
    precision.check(trainer.model, accelerate.grad_scaler(accelerator))
    return trainer


def _sft_trainer_class():
    from trl import SFTConfig
    from trl import SFTTrainer as _TRLSFTTrainer

    class SFTTrainer(_TRLSFTTrainer):
        """TRL's SFTTrainer for a model from qlorakit.load + add_lora, kept in the precision policy.

        The config's fp16/bf16 flags, and accelerate's mixed-precision mode, are derived from the model's policy
        (the model's dtype was decided at load time; TRL's own default, bf16=True, would be wrong for fp16 and fp32
        models, and so would a launcher's --mixed_precision).
        """

        def __init__(self, model=None, args=None, *pos, **kw):
            if model is not None and not isinstance(model, str):
                precision = precision_of(model)
                flags = precision.trainer_flags()
                if args is None:
                    args = SFTConfig(output_dir="qlorakit-sft", **flags)
                elif (bool(args.fp16), bool(args.bf16)) != (flags["fp16"], flags["bf16"]):
                    args = dataclasses.replace(args, **flags)  # re-runs __post_init__ with the right flags
                mode = _mixed_precision(precision)
                if require("transformers", args, "mixed_precision", "TrainingArguments") != mode:
                    # fp32 with both flags off: __post_init__ took the mode from the launcher's environment, and
                    # would again on a replace; a copy of the config with the policy's mode leaves the user's alone.
                    args = copy.copy(args)
                    args.mixed_precision = mode
            super().__init__(model, args, *pos, **kw)
            guard(self)

    return SFTTrainer


def __getattr__(name):
    # `qlorakit.trl_guard.SFTTrainer` is built on first use so that importing qlorakit does not import TRL.
    if name == "SFTTrainer":
        cls = _sft_trainer_class()
        globals()["SFTTrainer"] = cls
        return cls
    raise AttributeError(name)
