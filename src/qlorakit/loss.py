"""The causal language-modelling loss, always in fp32 (DESIGN.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.tokenize import IGNORE_INDEX
from .errors import PrecisionError
from .precision import LOSS_DTYPE, dtype_name


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over unmasked labels, computed in fp32, and how many tokens it covers.

    Returning the sum and the count (not the mean) lets callers normalise by the tokens of a whole accumulated
    batch instead of averaging per-micro-batch means.
    """
    shift_logits = logits[..., :-1, :].to(LOSS_DTYPE)
    shift_labels = labels[..., 1:].to(shift_logits.device)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def batch_loss(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(fp32 loss sum, trained tokens) of a model on one batch: from the hidden states through the chunked
    cross-entropy where the model's logits are a plain lm_head product, from its full logits otherwise. The
    lm_head product runs in the policy's compute dtype (the head's weight is frozen in it), whatever dtype the
    hidden states arrive in."""
    from .kernels import chunked_causal_lm_loss
    from .precision import precision_of
    from .upstream.transformers import plain_output_head

    parts = plain_output_head(model)
    if isinstance(parts, str):
        return causal_lm_loss(model(**inputs).logits, labels)
    decoder, head = parts
    compute = precision_of(model).compute
    if head.weight.dtype != compute:
        raise PrecisionError(
            f"lm_head.weight is {dtype_name(head.weight.dtype)} but the compute dtype is {dtype_name(compute)} "
            "(frozen non-quantized weights stay in the compute dtype); call qlorakit.precision_of(model).apply(model)"
        )
    hidden = decoder(**inputs).last_hidden_state
    return chunked_causal_lm_loss(hidden, head.weight, labels)
