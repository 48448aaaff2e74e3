"""Causal-LM cross-entropy and token log-probabilities straight from the last hidden states, a chunk of tokens at a
time.

The usual path materialises [tokens x vocab] logits in the compute dtype, an fp32 copy for the loss and an fp32
gradient of the same size: for 8 x 512 tokens and SmolLM2's 49,152-token vocabulary that is 0.4 + 0.8 + 0.8 GB.
Here the lm_head product, log-sum-exp and gradient are computed per chunk of tokens, in the same dtypes as the usual
path: the product in the head weight's dtype (the compute dtype: the policy stores frozen weights in it), softmax in
fp32. As the loss is the last node of the graph, the gradient with
respect to the hidden states is computed in the same pass and kept ([tokens x hidden], in place of the hidden
states); the backward only scales it. Values and gradients are those of `F.cross_entropy` on the full logits.

Preference losses need each token's log-probability rather than their sum (`chunked_token_logps`): the same pass, the
per-row values kept, and the backward scales each row of the kept gradient by its own incoming gradient. Its values
and gradients are those of `log_softmax(...).gather(...)` on the full logits, optionally divided by a sampling
temperature first (GRPO scores completions under the distribution they were sampled from, as TRL does).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..data.tokenize import IGNORE_INDEX

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk


def _chunk_tokens(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


def _lm_head_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                  each_chunk: Callable[[int, torch.Tensor], None], grad_hidden: torch.Tensor | None,
                  temperature: float = 1.0) -> None:
    """The chunk loop both autograd functions run: per chunk of rows, logits = hidden·weightᵀ in the compute dtype
    and the softmax of logits / temperature in fp32. `each_chunk(start, nll)` receives the chunk's -log p(target)
    per row (fp32); `grad_hidden`, when given, is filled with each row's gradient of its -log p times temperature,
    (softmax - one_hot(target))·weight, rounded once to the compute dtype: the caller applies the 1 / temperature
    with the backward's scale, on [rows x hidden] values rather than [rows x vocab]."""
    # One pair of [chunk x vocab] buffers serves every chunk (fresh ones would be faulted in page by page each
    # time): the logits, then the gradient, in the compute dtype; the logits, then their exponentials, in fp32
    # (in fp32 compute the two are one buffer and the copies between them no-ops).
    # Each op reads and writes one dtype: torch's mixed-dtype elementwise loops are ~10x slower on the CPU.
    rows_max = min(chunk, hidden.shape[0])
    logits_buffer = hidden.new_empty(rows_max, weight.shape[0])
    fp32_buffer = (logits_buffer if hidden.dtype == torch.float32
                   else hidden.new_empty(rows_max, weight.shape[0], dtype=torch.float32))
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk):
            target = targets[start : start + chunk]
            n = target.shape[0]
            logits = torch.mm(hidden[start : start + chunk], weight.t(), out=logits_buffer[:n])
            exps = fp32_buffer[:n].copy_(logits)
            if temperature != 1.0:  # the fp32 logits, as log_softmax(logits.float() / T) divides them
                exps.div_(temperature)
            rows = torch.arange(n, device=target.device)
            picked = exps[rows, target]
            # log-sum-exp and softmax from one exp pass
            top = exps.amax(dim=1, keepdim=True)
            sums = exps.sub_(top).exp_().sum(dim=1, keepdim=True)
            each_chunk(start, (top + sums.log()).squeeze(1) - picked)
            if grad_hidden is not None:
                # softmax - one_hot(target), in fp32, rounded once to the compute dtype
                probs = exps.div_(sums)
                probs[rows, target] -= 1.0
                grad = logits.copy_(probs)
                torch.mm(grad, weight, out=grad_hidden[start : start + chunk])


def _scaled(grad_hidden: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor | None:
    """The kept gradient times the backward's incoming one, multiplied in fp32 and rounded once."""
    return None if grad_hidden is None else (grad_hidden.float() * scale).to(grad_hidden.dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of the rows of hidden·weightᵀ against `labels`, all of which are trained (the caller
    drops the others)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The loss ends the graph, so its gradient is known now up to the scalar the backward brings: computing it
        # here saves the backward a third lm_head product and a second softmax over [tokens x vocab].
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None

        def add(start, nll):
            total.add_(nll.sum())

        _lm_head_pass(hidden, weight, labels, chunk, add, grad_hidden)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return _scaled(grad_hidden, grad_total), None, None, None


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(target) of each row of hidden·weightᵀ / temperature (all targets valid)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, temperature):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # As in _ChunkedCrossEntropy, each row's gradient is known in the forward up to the scalar its row of the
        # backward's incoming gradient brings; kept as the gradient of -log p (the same pass), negated there.
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None

        def put(start, nll):
            torch.neg(nll, out=logps[start : start + nll.shape[0]])

        _lm_head_pass(hidden, weight, targets, chunk, put, grad_hidden, temperature)
        ctx.save_for_backward(grad_hidden)
        ctx.temperature = temperature
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        (grad_hidden,) = ctx.saved_tensors
        scale = grad_logps.neg().unsqueeze(1)
        if ctx.temperature != 1.0:  # d(z / T)/dz, folded into the per-row scale
            scale = scale / ctx.temperature
        return _scaled(grad_hidden, scale), None, None, None, None


def _check_chunk(chunk: int | None) -> None:
    if chunk is not None and chunk < 1:  # a step of 0 or less would leave every row uncomputed
        raise ValueError(f"chunk={chunk!r}: pass a positive number of tokens per chunk, or None for the default")


def _checked_temperature(temperature) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):  # 0 divides by zero; below it the distribution turns over
        raise ValueError(f"temperature={temperature!r}: pass a positive finite number (1.0 leaves the logits as "
                         "they are)")
    return value


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(fp32 sum of next-token losses, number of trained tokens) from hidden states [batch, length, hidden] and the
    frozen output-head weight [vocab, hidden]; labels as for `qlorakit.causal_lm_loss` (unshifted). The product runs
    in the weight's dtype, whatever dtype the hidden states arrive in (under autocast they may be fp32)."""
    _check_chunk(chunk)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):  # untrained positions cost nothing (and the function expects none)
        hidden, targets = hidden[keep], targets[keep]
    total = _ChunkedCrossEntropy.apply(hidden.to(weight.dtype), weight, targets, chunk or _chunk_tokens(weight.shape[0]))
    return total, int(targets.shape[0])


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                        *, chunk: int | None = None) -> torch.Tensor:
    """fp32 [n]: log_softmax(hidden·weightᵀ / temperature)[i, targets[i]] for hidden states [n, hidden] and the
    frozen output-head weight [vocab, hidden], without the [n x vocab] logits. `targets` [n] are token ids, all of
    them valid (drop IGNORE_INDEX positions first; `qlorakit.loss.token_logps` does, shifting labels as the loss
    does). The product runs in the weight's dtype, whatever dtype the hidden states arrive in; the temperature
    divides its fp32 copy (1.0, the default, costs nothing). The gradient reaches `hidden` only."""
    _check_chunk(chunk)
    temperature = _checked_temperature(temperature)
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)}: pass hidden states "
                         "[n, hidden] and one target id per row, [n]")
    if weight.requires_grad:
        raise ValueError("weight requires grad, and this kernel computes no gradient for it: pass the frozen "
                         "output-head weight (or its .detach())")
    targets = targets.to(hidden.device)
    if targets.numel() and int(targets.min()) < 0:
        raise ValueError(f"targets hold {int(targets.min())}: drop untrained positions (IGNORE_INDEX = "
                         f"{IGNORE_INDEX}) before calling, so every target is a token id")
    return _ChunkedTokenLogps.apply(hidden.to(weight.dtype), weight, targets, chunk or _chunk_tokens(weight.shape[0]),
                                    temperature)
