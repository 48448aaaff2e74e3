"""transformers' `generate` on the model itself: the path a model takes when qlorakit's decoder declines it (and
says why), and the reference the decoder is tested against. Prompts are batched with left padding; the same
Sampling settings map onto generate's arguments, and the answers are cut at stop strings and streamed the same
way (after each batch: transformers streams one sequence at a time only)."""

from __future__ import annotations

import torch

from ..data import pad_id_of
from ..precision import precision_of
from .batching import Answer
from .sampling import AnswerText, Sampling


@torch.no_grad()
def generate_with_transformers(model, tokenizer, prompts: list[list[int]], sampling: Sampling, end_ids: list[int],
                               batch_size: int, on_text=None, seeds: list[int] | None = None) -> list[Answer]:
    precision = precision_of(model)
    device = next(p.device for p in model.parameters())
    pad_id = pad_id_of(tokenizer)
    options = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens or None,
                   do_sample=sampling.do_sample, pad_token_id=pad_id, eos_token_id=end_ids,
                   repetition_penalty=sampling.repetition_penalty)
    if sampling.do_sample:
        options |= dict(temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p,
                        min_p=sampling.min_p or None)
    if sampling.stop:  # transformers' own stop_strings needs tokenizer internals some tokenizers lack
        options["stopping_criteria"] = _stop_strings(tokenizer, sampling.stop)
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        if sampling.stop:
            options["stopping_criteria"][0].prompt_width = width
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        if sampling.do_sample and seeds is not None:  # transformers draws for the batch from one stream
            torch.manual_seed(seeds[start] % 2**63)
        elif sampling.do_sample and sampling.seed is not None:
            torch.manual_seed(sampling.seed + start)
        with precision.autocast():
            out = model.generate(input_ids=input_ids, attention_mask=mask, **options)
        for offset, row in enumerate(out[:, width:].tolist()):
            tokens, text = [], AnswerText(tokenizer, sampling.stop)
            for token in row:  # after its end, a row of the batch is padded
                tokens.append(token)
                if token in end_ids:
                    break
                text.add(token)
                if text.stopped:
                    break
            finish = ("end" if tokens and tokens[-1] in end_ids else "stop" if text.stopped else "length")
            if on_text:
                piece = text.final()
                if piece:
                    on_text(start + offset, piece)
            answers.append(Answer(text.final(), tokens, finish))
    return answers


def _stop_strings(tokenizer, stop: tuple[str, ...]):
    """A stopping criterion: a row is done when its answer's text (past the prompt width) contains a stop string."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        prompt_width = 0

        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
            return torch.tensor([any(s in text for s in stop) for text in texts], device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])
