"""The training step under the precision policy: autocast in the compute dtype, loss in fp32, a GradScaler
exactly under fp16, clipping on unscaled gradients, AdamW on the trainable parameters only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .precision import precision_of

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over unmasked labels, computed in fp32, and how many tokens it covers.

    Returning the sum and the count (not the mean) lets callers normalise by the tokens of a whole accumulated
    batch instead of averaging per-micro-batch means.
    """
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(shift_logits.device)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


@dataclass
class StepResult:
    loss: float  # mean fp32 loss per label token
    tokens: int
    grad_norm: float
    skipped: bool  # the GradScaler found inf/nan gradients and skipped the update


class TrainStep:
    """One optimizer step at a time on a model from qlorakit.load + add_lora.

    The policy is checked here, before the first step: a violation raises PrecisionError naming the parameter.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.model = model
        self.precision = precision_of(model)
        self.scaler = self.precision.grad_scaler()
        self.precision.check(model, self.scaler)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask=None) -> StepResult:
        self.model.train()
        device = next(p.device for p in self.params)
        input_ids = input_ids.to(device)
        if labels is None:
            labels = input_ids.clone()
            if attention_mask is not None:
                labels[attention_mask.to(device) == 0] = IGNORE_INDEX
        labels = labels.to(device)
        with self.precision.autocast():
            logits = self.model(
                input_ids=input_ids,
                attention_mask=None if attention_mask is None else attention_mask.to(device),
            ).logits
        loss_sum, tokens = causal_lm_loss(logits, labels)
        loss = loss_sum / max(tokens, 1)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
        else:
            self.optimizer.step()
            skipped = False
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=float(loss.detach()), tokens=tokens, grad_norm=grad_norm, skipped=skipped)
