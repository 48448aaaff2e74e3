"""The causal language-modelling loss and the per-token log-probabilities preference losses sum, always in fp32
(DESIGN.md)."""

from __future__ import annotations

import math
import numbers

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

    states, head = _last_states(model, inputs)
    if head is None:
        return causal_lm_loss(states, labels)
    return chunked_causal_lm_loss(states, head, labels)


def token_logps(model, inputs: dict, labels: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [k] log-probabilities of a batch's k trained next tokens, bool [rows * (length - 1)] which positions
    of labels[:, 1:].reshape(-1) they are): what preference losses sum per sequence, e.g.
    `torch.zeros(count).index_add(0, sequences[:, 1:].reshape(-1)[trained], logps)`. Labels are unshifted, as for
    `batch_loss` (position t is predicted from positions up to t - 1), IGNORE_INDEX for untrained positions; the
    same two paths: the chunked kernel from the hidden states where the head is plain, log_softmax of the full
    logits in fp32 otherwise. `temperature` divides the fp32 logits first (GRPO scores completions under the
    distribution it sampled them from); 1.0 leaves them as they are."""
    from .kernels import chunked_token_logps

    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: pass a positive finite number (1.0 leaves the logits as "
                         "they are)")
    temperature = float(temperature)

    states, head = _last_states(model, inputs)
    states = states[:, :-1].reshape(-1, states.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(states.device)
    trained = targets != IGNORE_INDEX
    if not bool(trained.all()):  # untrained positions cost nothing
        states, targets = states[trained], targets[trained]
    if head is None:
        logits = states.to(LOSS_DTYPE)
        if temperature != 1.0:
            logits = logits / temperature
        logps = F.log_softmax(logits, dim=-1)
        return logps.gather(1, targets.unsqueeze(1)).squeeze(1), trained
    return chunked_token_logps(states, head, targets, temperature), trained


def _last_states(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's last states on `inputs` and what turns them into logits: (hidden states [rows, length,
    hidden], lm_head weight [vocab, hidden]) where the logits are a plain lm_head product, so a chunked kernel
    may compute from them without the full logits; (logits, None) otherwise."""
    from .precision import precision_of
    from .upstream.transformers import plain_output_head

    parts = plain_output_head(model)
    if isinstance(parts, str):
        return model(**inputs).logits, None
    decoder, head = parts
    compute = precision_of(model).compute
    if head.weight.dtype != compute:
        raise PrecisionError(
            f"lm_head.weight is {dtype_name(head.weight.dtype)} but the compute dtype is {dtype_name(compute)} "
            "(frozen non-quantized weights stay in the compute dtype); call qlorakit.precision_of(model).apply(model)"
        )
    return decoder(**inputs).last_hidden_state, head.weight
