"""Evaluation: loss and perplexity on tokenized data, greedy answers to chat prompts, exact-match accuracy, and
on preference pairs how often the model prefers the chosen answer."""

from __future__ import annotations

import math

import torch

from .data import Example, Tokenized, collate
from .data.batches import evaluation_batches, placeholder
from .errors import DataError
from .generation import generate
from .precision import precision_of
from .loss import batch_loss


@torch.no_grad()
def eval_loss(model, items: list[Tokenized], pad_id: int, batch_size: int = 8, packed: bool = True,
              processes=None) -> dict:
    """Mean loss per trained token over `items`, and its perplexity. On several processes (`processes`, from
    distributed.join_run) each rank evaluates its share and the sums are added up; every rank runs as many forwards
    (a sharded model gathers its weights in each, with every rank), a short share padded with placeholders."""
    precision = precision_of(model)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for indices in evaluation_batches(len(items), batch_size, processes):
            chunk = [items[i] for i in indices]
            batch = (collate(chunk, pad_id, packed) if chunk else placeholder(pad_id)).to(device)
            with precision.autocast():
                loss_sum, n = batch_loss(model, batch.model_inputs(), batch.labels)
            total += float(loss_sum)
            tokens += n
    finally:
        model.train(was_training)
    if processes is not None and processes.distributed:
        total, tokens = processes.sum([total, tokens], device)
        tokens = int(tokens)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def preference_accuracy(model, pairs: list, pad_id: int, batch_size: int = 8, packed: bool = True) -> dict:
    """How often the model gives a pair's chosen answer a higher log-probability (summed over its tokens) than the
    rejected one — the preference it holds, whatever its reference — and the mean margin between the two."""
    from .preference import PreferenceObjective

    if not pairs:
        raise DataError("no preference pairs to evaluate")
    sums = PreferenceObjective().sequence_logps_of(model, pairs, pad_id, batch_size, packed)[0]
    correct = int((sums[:, 0] > sums[:, 1]).sum())
    return {"accuracy": correct / len(pairs), "correct": correct, "total": len(pairs),
            "logp_margin": float((sums[:, 0] - sums[:, 1]).mean())}


@torch.no_grad()
def mean_reward(generator, prompts: list, rewards: list, max_new_tokens: int, processes=None) -> dict:
    """The mean reward of `generator`'s greedy answers to `prompts` (data.prompts.TokenizedPrompt), overall and per
    reward (rewards.parse_rewards), with each prompt's answer and rewards in `samples`. On several processes each
    answers its share and the sums are taken over all of them (the samples are this process's)."""
    from .generation import Sampling
    from .rewards import score

    mine = [i for chunk in evaluation_batches(len(prompts), len(prompts) or 1, processes) for i in chunk]
    items = [prompts[i] for i in mine]
    sums, samples = [0.0] * (1 + len(rewards)), []
    if items:
        answers = generator.run([item.input_ids for item in items], Sampling(max_new_tokens),
                                names=[item.where for item in items])
        values, total = score(rewards, [item.prompt for item in items], [a.text for a in answers],
                              [item.row for item in items], [item.where for item in items],
                              [len(a.tokens) for a in answers], [a.finish != "length" for a in answers],
                              max_new_tokens)
        sums = [sum(total)] + [sum(values[r.spec]) for r in rewards]
        samples = [{"where": item.where, "answer": answer.text, "reward": value}
                   | {r.spec: values[r.spec][k] for r in rewards}
                   for k, (item, answer, value) in enumerate(zip(items, answers, total))]
    if processes is not None and processes.distributed:
        sums = processes.sum(sums, next(p.device for p in generator.model.parameters()))
    n = max(len(prompts), 1)
    return {"reward": sums[0] / n, "rewards": {r.spec: s / n for r, s in zip(rewards, sums[1:])},
            "prompts": len(prompts), "samples": samples}


def prompt_and_reference(example: Example) -> tuple[list[dict] | str, str]:
    """What the model is asked (the turns before the last assistant turn, or the plain prompt) and the answer."""
    if example.messages is not None:
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        if last == 0:
            raise DataError(
                f"{example.where}: the conversation's only answer is its first turn, so there is no prompt to "
                "generate it from; exact match needs a turn before the answer (--no-exact-match: loss only)"
            )
        return example.messages[:last], example.messages[last]["content"]
    return example.prompt, example.completion


# What exact_match says about each example (a line of `qlorakit eval --output`): where it is (file and line), what
# the model was asked (the messages before the answer, or the plain prompt), the reference answer, the model's
# answer, and whether they match.
ANSWER_FIELDS = ("where", "prompt", "expected", "got", "correct")
# ... and of `qlorakit eval --reward` on prompt data: each answer's total reward and each reward's value
REWARD_ANSWER_FIELDS = ("where", "prompt", "row", "answer", "reward", "rewards")


def exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int = 64,
                parse_special_tokens: bool = False) -> dict:
    """The share of examples whose greedy answer equals the reference answer (whitespace-trimmed), and every
    example's outcome in `samples`, in the order of `examples` (ANSWER_FIELDS: where, prompt, expected, got,
    correct)."""
    prompts, references = zip(*(prompt_and_reference(e) for e in examples))
    answers = generate(model, tokenizer, list(prompts), max_new_tokens, parse_special_tokens=parse_special_tokens,
                       names=[e.where for e in examples])
    samples = [dict(zip(ANSWER_FIELDS, (e.where, p, r, a, a.strip() == r.strip())))
               for e, p, r, a in zip(examples, prompts, references, answers)]
    correct = sum(s["correct"] for s in samples)
    return {"accuracy": correct / len(samples), "correct": correct, "total": len(samples), "samples": samples}
