"""Causal-LM cross-entropy straight from the last hidden states, a chunk of tokens at a time.

The usual path materialises [tokens x vocab] logits in the compute dtype, an fp32 copy for the loss and an fp32
gradient of the same size: for 8 x 512 tokens and SmolLM2's 49,152-token vocabulary that is 0.4 + 0.8 + 0.8 GB.
Here the lm_head product, log-sum-exp and gradient are computed per chunk of tokens, in the same dtypes as the usual
path: the product in the head weight's dtype (the compute dtype: the policy stores frozen weights in it), softmax in
fp32. As the loss is the last node of the graph, the gradient with
respect to the hidden states is computed in the same pass and kept ([tokens x hidden], in place of the hidden
states); the backward only scales it. Values and gradients are those of `F.cross_entropy` on the full logits.
"""

from __future__ import annotations

import torch

from ..data.tokenize import IGNORE_INDEX

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk


def _chunk_tokens(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of the rows of hidden·weightᵀ against `labels`, all of which are trained (the caller
    drops the others)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The loss ends the graph, so its gradient is known now up to the scalar the backward brings: computing it
        # here saves the backward a third lm_head product and a second softmax over [tokens x vocab].
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
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
                target = labels[start : start + chunk]
                n = target.shape[0]
                logits = torch.mm(hidden[start : start + chunk], weight.t(), out=logits_buffer[:n])
                exps = fp32_buffer[:n].copy_(logits)
                rows = torch.arange(n, device=target.device)
                picked = exps[rows, target]
                # log-sum-exp and softmax from one exp pass
                top = exps.amax(dim=1, keepdim=True)
                sums = exps.sub_(top).exp_().sum(dim=1, keepdim=True)
                total += ((top + sums.log()).squeeze(1) - picked).sum()
                if grad_hidden is not None:
                    # softmax - one_hot(target), in fp32, rounded once to the compute dtype
                    probs = exps.div_(sums)
                    probs[rows, target] -= 1.0
                    grad = logits.copy_(probs)
                    torch.mm(grad, weight, out=grad_hidden[start : start + chunk])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_total).to(grad_hidden.dtype), None, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(fp32 sum of next-token losses, number of trained tokens) from hidden states [batch, length, hidden] and the
    frozen output-head weight [vocab, hidden]; labels as for `qlorakit.causal_lm_loss` (unshifted). The product runs
    in the weight's dtype, whatever dtype the hidden states arrive in (under autocast they may be fp32)."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):  # untrained positions cost nothing (and the function expects none)
        hidden, targets = hidden[keep], targets[keep]
    total = _ChunkedCrossEntropy.apply(hidden.to(weight.dtype), weight, targets, chunk or _chunk_tokens(weight.shape[0]))
    return total, int(targets.shape[0])
