"""How the next token is chosen: greedy, or sampled with transformers' knobs (temperature, top-k, top-p, min-p,
repetition penalty), seeded per prompt; when an answer ends (end-of-turn tokens, a token budget, stop strings); and
the answer's text as it grows (for streaming).

The knobs mean what they mean in transformers' `generate` and are applied in its order — repetition penalty, the
end-of-turn ban before `min_new_tokens`, temperature, top-k, top-p, min-p — with transformers' own logits warpers.
Differences, on purpose: `top_k` defaults to 0 (off; transformers' default of 50 surprises users who set only a
temperature), and each prompt draws from its own generator seeded from `seed` and its position, so an answer does
not depend on which other prompts were generated beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, check_number, show
from ..precision import LOGITS_DTYPE


@dataclass(frozen=True)
class Sampling:
    """The generation settings of one call. `do_sample=False` is greedy (the sampling knobs must then stay at
    their defaults: a temperature without sampling is a mistake worth saying)."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={show(self.max_new_tokens)}: generate at least 1 token")
        _integer("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"min_new_tokens={self.min_new_tokens} is more than max_new_tokens="
                              f"{self.max_new_tokens}; lower it or raise max_new_tokens")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample={show(self.do_sample)}: use True or False")
        check_number("temperature", self.temperature, 0, hint="typical: 0.6 to 1.0")
        _integer("top_k", self.top_k, 0, "0 turns it off")
        check_number("top_p", self.top_p, 0, 1, hint="1.0 turns it off; typical: 0.9 to 0.95")
        check_number("min_p", self.min_p, 0, 1, low_ok=True, high_ok=False, hint="0 turns it off; typical: 0.05 to 0.1")
        check_number("repetition_penalty", self.repetition_penalty, 0, hint="1.0 turns it off; typical: 1.1")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop={show(self.stop)}: give a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.seed is not None:
            _integer("seed", self.seed, 0)
        if not self.do_sample:
            changed = [n for n, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))
                       if getattr(self, n) != default]
            if changed:
                raise ConfigError(f"{', '.join(changed)} set without do_sample=True: greedy decoding ignores "
                                  f"{'them' if len(changed) > 1 else 'it'}; pass do_sample=True to sample")

    def warpers(self):
        """transformers' logits warpers for these settings, in generate's order."""
        from transformers.generation.logits_process import (
            MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

        found = []
        if self.temperature != 1.0:
            found.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            found.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            found.append(TopPLogitsWarper(self.top_p))
        if self.min_p > 0.0:
            found.append(MinPLogitsWarper(self.min_p))
        return found


def _integer(name, value, low, note=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={show(value)}: use a whole number >= {low}" + (f" ({note})" if note else ""))


class TokenChooser:
    """Next tokens for rows of logits, each row one prompt's answer: repetition penalty over the prompt and the
    answer so far, end-of-turn tokens banned before min_new_tokens, then greedy or the warpers and a draw from the
    prompt's own generator."""

    def __init__(self, sampling: Sampling, vocab: int, end_ids: list[int], device, seeds: list[int] | None = None):
        self.sampling, self.end_ids, self.device = sampling, torch.tensor(end_ids, device=device), device
        self.seeds = seeds  # each prompt's own seed, when the caller gives them (rollouts: whatever the batch)
        self.warpers = sampling.warpers() if sampling.do_sample else []
        self.vocab = vocab
        base = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._base_seed = base

    def generator(self, index: int) -> torch.Generator:
        """Prompt `index`'s own random stream: its answer does not depend on the prompts generated beside it."""
        if self.seeds is not None:
            return torch.Generator(device=self.device).manual_seed(self.seeds[index] % 2**63)
        return torch.Generator(device=self.device).manual_seed((self._base_seed + 1_000_003 * index) % 2**63)

    def seen(self, prompt: list[int]) -> torch.Tensor:
        """A [vocab] mask of the tokens the repetition penalty applies to (the prompt's, then the answer's)."""
        mask = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        if prompt:
            mask[torch.tensor(prompt, device=self.device).clamp(max=self.vocab - 1)] = True
        return mask

    def scores(self, logits: torch.Tensor, seen: torch.Tensor | None, produced: list[int]) -> torch.Tensor:
        """The scores a token is chosen from, per row of `logits` [rows, vocab]: `seen` [rows, vocab] marks the
        tokens the repetition penalty applies to (None without one), `produced` is each row's answer length."""
        scores = logits.to(LOGITS_DTYPE)
        penalty = self.sampling.repetition_penalty
        if penalty != 1.0:
            # transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit divided by the penalty when
            # positive, multiplied by it when negative.
            scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        early = [i for i, n in enumerate(produced) if n < self.sampling.min_new_tokens]
        if early and self.end_ids.numel():
            rows = torch.tensor(early, device=scores.device)
            scores[rows[:, None], self.end_ids[None]] = -math.inf
        for warper in self.warpers:
            scores = warper(None, scores)
        return scores

    def choose(self, logits: torch.Tensor, seen: torch.Tensor | None, produced: list[int],
               generators: list[torch.Generator]) -> torch.Tensor:
        """The next token of each row: the best score, or a draw from softmax(scores) with the row's generator."""
        scores = self.scores(logits, seen, produced)
        if not self.sampling.do_sample:
            return scores.argmax(-1)
        probabilities = torch.softmax(scores, dim=-1)
        return torch.cat([torch.multinomial(probabilities[i], 1, generator=g) for i, g in enumerate(generators)])


class AnswerText:
    """An answer's text as its tokens arrive, for streaming and stop strings: `add` returns the text that became
    final. Text is held back while it could still be the start of a stop string, or ends in a character split
    across tokens; a stop string ends the answer before it (it is not part of the answer)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.shown = 0
        self.end: int | None = None  # where a stop string begins

    @property
    def stopped(self) -> bool:
        return self.end is not None

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        end = len(text)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.end = end = min(hits)
        else:
            for s in self.stop:  # the longest tail of the text that begins s
                held = next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
                end = min(end, len(text) - held)
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        if end <= self.shown:
            return ""
        piece, self.shown = text[self.shown:end], end
        return piece

    def final(self) -> str:
        """The answer, up to a stop string."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return text if self.end is None else text[:self.end]

    def flush(self) -> str:
        """The rest of the answer not yet returned by `add` (once it has ended)."""
        text = self.final()
        piece, self.shown = text[self.shown:], max(self.shown, len(text))
        return piece
