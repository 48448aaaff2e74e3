"""The training run's optimizer and learning-rate schedule (TrainConfig's `optimizer`, `schedule`, `warmup_steps`)."""

from __future__ import annotations

import math

import torch

from .errors import ConfigError


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's AdamW, or one of bitsandbytes' (8-bit, paged), which run on CUDA only."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = params[0].device.type
    if device != "cuda":
        raise ConfigError(
            f"optimizer={name!r} is bitsandbytes' {'paged ' if 'paged' in name else ''}"
            f"{'8-bit ' if '8bit' in name else ''}AdamW, which runs on CUDA GPUs; on the {device} use "
            "optimizer=adamw"
        )
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """Linear warmup to the base learning rate, then cosine or linear decay to zero, or constant."""

    def factor(step: int) -> float:  # `step` optimizer steps have been taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(progress, 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
