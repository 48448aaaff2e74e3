"""Continuous batching: prompts flow through a fixed number of KV-cache slots. A slot whose answer ended takes the
next waiting prompt at the next step (a prefill of the newcomers, then everyone decodes together), so a long answer
never holds up the prompts behind it; when no prompt waits and half the slots are idle, the cache is compacted so a
step computes only the answers still running."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .sampling import AnswerText, Sampling, TokenChooser


@dataclass
class Answer:
    """One prompt's answer: its text (up to a stop string, special tokens left out), its token ids (the end-of-turn
    token included when it ended one), and why it ended: 'end' (an end-of-turn token), 'stop' (a stop string),
    'length' (max_new_tokens)."""

    text: str
    tokens: list[int]
    finish: str


class _Running:
    __slots__ = ("index", "tokens", "position", "generator", "text")

    def __init__(self, index, position, generator, text):
        self.index, self.tokens, self.position, self.generator, self.text = index, [], position, generator, text


def run(decoder, prompts: list[list[int]], sampling: Sampling, end_ids: list[int], slots: int, tokenizer,
        on_text=None, seeds: list[int] | None = None) -> list[Answer]:
    """Answers to `prompts` (token ids) from `decoder`, `slots` at a time; `on_text(index, piece)` receives each
    answer's text as it becomes final; `seeds`, each prompt's sampling seed (default: from sampling.seed and its
    position)."""
    vocab = decoder.vocab
    chooser = TokenChooser(sampling, vocab, end_ids, decoder.device, seeds)
    ends = set(end_ids)
    needs_text = bool(on_text) or bool(sampling.stop)
    penalty = sampling.repetition_penalty != 1.0
    width = min(slots, len(prompts))
    length = max(len(p) for p in prompts) + sampling.max_new_tokens
    cache = decoder.new_cache(width, length)
    running: list[_Running | None] = [None] * width
    tokens = torch.zeros(width, dtype=torch.long, device=decoder.device)
    positions = torch.zeros(width, dtype=torch.long, device=decoder.device)
    seen = torch.zeros(width, vocab, dtype=torch.bool, device=decoder.device) if penalty else None
    answers: list[Answer | None] = [None] * len(prompts)
    waiting = deque(range(len(prompts)))

    def accept(slot: int, token: int) -> None:
        state = running[slot]
        state.tokens.append(token)
        finish = "end" if token in ends else None
        if finish is None and state.text is not None:
            piece = state.text.add(token)
            if piece and on_text:
                on_text(state.index, piece)
            if state.text.stopped:
                finish = "stop"
        if finish is None and len(state.tokens) >= sampling.max_new_tokens:
            finish = "length"
        if finish is None:  # the token is the next step's input, written at the slot's next position
            tokens[slot], positions[slot] = token, state.position
            state.position += 1
            if seen is not None:
                seen[slot, token] = True
            return
        if state.text is not None:
            text, rest = state.text.final(), state.text.flush()
            if rest and on_text:
                on_text(state.index, rest)
        else:
            text = tokenizer.decode(state.tokens, skip_special_tokens=True)
        answers[state.index] = Answer(text, state.tokens, finish)
        running[slot] = None
        tokens[slot], positions[slot] = 0, 0

    while waiting or any(running):
        free = [s for s, state in enumerate(running) if state is None]
        if waiting and free:
            group = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
            into = free[:len(group)]
            logits = decoder.prefill(cache, into, [prompts[i] for i in group])
            for slot, index in zip(into, group):
                running[slot] = _Running(index, len(prompts[index]), chooser.generator(index),
                                         AnswerText(tokenizer, sampling.stop) if needs_text else None)
                if seen is not None:
                    seen[slot] = chooser.seen(prompts[index])
            chosen = chooser.choose(logits, None if seen is None else seen[into], [0] * len(into),
                                    [running[s].generator for s in into])
            for slot, token in zip(into, chosen.tolist()):
                accept(slot, token)
        active = [s for s, state in enumerate(running) if state is not None]
        if not active:
            continue
        if not waiting and len(active) <= len(running) // 2:
            keep = torch.tensor(active, device=decoder.device)
            cache.keep(keep)
            running = [running[s] for s in active]
            tokens, positions = tokens[keep], positions[keep]
            seen = None if seen is None else seen[keep]
            active = list(range(len(active)))
        logits = decoder.decode(cache, tokens, positions)
        rows = torch.tensor(active, device=decoder.device)
        chosen = chooser.choose(logits[rows], None if seen is None else seen[rows],
                                [len(running[s].tokens) for s in active], [running[s].generator for s in active])
        for slot, token in zip(active, chosen.tolist()):
            accept(slot, token)
    return answers
