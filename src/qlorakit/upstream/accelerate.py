"""accelerate: the grad scaler and mixed-precision mode of the Accelerator inside a transformers/TRL trainer.

accelerate gives fp16 mixed precision a GradScaler on accelerators only; on a CPU it would train fp16 unscaled.
The guard gives it one through the two attributes accelerate's own fp16 path sets (`scaler`, and `native_amp`,
which makes it autocast to fp16 and unscale before clipping). It reads the mode (`mixed_precision`: 'no', 'fp16',
'bf16') because that, not the trainer's fp16/bf16 flags, decides what the forward pass autocasts to."""

from __future__ import annotations

from . import changed, require

PACKAGE = "accelerate"
_ATTRIBUTES = ("scaler", "native_amp")


def _check(accelerator) -> None:
    for attribute in _ATTRIBUTES:
        if not hasattr(accelerator, attribute):
            raise changed(PACKAGE, f"Accelerator.{attribute}", "it is gone")


def grad_scaler(accelerator):
    """The accelerator's GradScaler, or None."""
    _check(accelerator)
    return accelerator.scaler


def give_grad_scaler(accelerator, scaler) -> None:
    """Make the accelerator scale losses with `scaler` and autocast, as its own fp16 path does on a GPU."""
    _check(accelerator)
    accelerator.scaler = scaler
    accelerator.native_amp = True


def mixed_precision(accelerator) -> str:
    """The accelerator's mixed-precision mode: 'no', 'fp16', 'bf16' (or 'fp8')."""
    return str(require(PACKAGE, accelerator, "mixed_precision", "Accelerator"))
