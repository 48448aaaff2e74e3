"""GRPO: reinforcement learning with verifiable rewards on prompts.

    run = qlorakit.train_grpo(data="prompts.jsonl", reward=["numeric:answer"], output="grpo")   # qlorakit grpo

The run is train.py's, top to bottom — load, data, adapters, optimizer, resume, loop, outputs, on one process or
several — with this module's objective in place of the language-modelling loss. A step:

1. **Rollouts.** The step's prompts (grad_accum micro-batches of batch_size prompts) are answered together,
   group_size sampled completions each, by qlorakit.Generator on the same quantized model with its adapters active
   (the decoder of the inference path: dense weights, a KV cache, the group batched; an adapter the last step
   updated is picked up). Each completion draws from its own seed, a function of (seed, step, its prompt's row,
   its place in the group): a --resume samples what the uninterrupted run sampled, and N processes what one does.
2. **Rewards and advantages.** The rewards (rewards.py) score each completion; their weighted sum, normalised within
   its prompt's group, is the completion's advantage: (r - mean) / (std + 1e-4) (grpo, dapo), r - mean (dr_grpo).
   A group whose completions all scored the same has advantage 0: it teaches nothing (counted in the metrics), and
   with beta = 0 its completions skip the forward altogether — they are still counted in the loss's normalisers,
   so the loss and its gradient are those of the whole batch.
3. **The policy's log-probabilities** of the completions come from one packed forward over prompt + completion
   sequences (right-padded rows with --no-packing) on the fast path (loss.token_logps from the hidden states,
   logits / temperature as sampled). Per completion token t, with ratio = exp(logp - logp_old) (logp_old the same
   values, detached: one update per rollout) and A the completion's advantage:
       loss_t = -min(ratio·A, clip(ratio, 1 - epsilon, 1 + epsilon_high)·A) + beta·KL_t,
       KL_t = exp(ref - logp) - (ref - logp) - 1      (the k3 estimator; ref: the model as the run starts)
   averaged as --loss says: grpo, each completion's token mean, then the mean over completions; dapo, the mean over
   all completion tokens; dr_grpo, the sum over tokens / (completions x max_new_tokens) — over the step's
   completions on every process together.
4. **Metrics:** reward (mean, std; per reward function), completion length, truncated (completions that reached
   max_new_tokens), clip_fraction (tokens whose ratio was clipped), kl (beta > 0), zero_std_groups, the time split
   between generation and training and the rollout tokens/s: in metrics.jsonl, the trackers and loss.png. Held-out
   prompts (--validation, --validation-data) are answered greedily and their mean reward reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import GRPOConfig
from .data.batches import Batch, collate_sequences, placeholder
from .data.tokenize import IGNORE_INDEX, Tokenized
from .errors import ConfigError
from .precision import LOSS_DTYPE, REDUCE_DTYPE, precision_of

__all__ = ["GRPOObjective", "RolloutBatch", "group_advantages", "token_terms", "train_grpo"]

# Added to a group's std before dividing by it (as TRL): a group whose rewards barely differ gets large advantages,
# never infinite ones.
STD_EPSILON = 1e-4


@dataclass
class RolloutBatch(Batch):
    """A micro-batch of rollouts: prompt + completion sequences in collate's layout (`sequences`: each token's
    completion, -1 for none), the completions' tokens as labels, each completion's advantage, and (beta > 0) the
    reference's log-probability of each completion token (`reference`, in token_logps' order). `completions` and
    `completion_tokens` count what the batch stands for, completions that skipped the forward included."""

    advantages: torch.Tensor | None = None
    completions: int = 0
    completion_tokens: int = 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, whether each group's rewards are all equal) of `rewards` [groups x group_size], in fp32 (computed
    in the reduction dtype): r - the group's mean, divided by (the group's std + STD_EPSILON) when `scale` (std
    unbiased, as torch.std).
    A group of equal rewards has advantages exactly 0 (its mean, rounded, could differ from them by an ulp)."""
    r = rewards.to(REDUCE_DTYPE).view(-1, group_size)  # (a group's sums of rewards near fp32's range stay finite)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (r.std(dim=1, keepdim=True) + STD_EPSILON)
    flat = (r == r[:, :1]).all(dim=1)
    advantages = torch.where(flat[:, None], torch.zeros_like(advantages), advantages)
    return advantages.view(-1).to(LOSS_DTYPE), flat


def token_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                reference: torch.Tensor | None, beta: float, epsilon: float, epsilon_high: float
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per completion token (all [tokens], fp32): (the loss term, KL to the reference or None, whether the ratio was
    clipped). `advantages` is each token's completion's advantage."""
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    kl = None
    if reference is not None:
        log_ratio = reference - logps
        kl = torch.exp(log_ratio) - log_ratio - 1
        loss = loss + beta * kl
    return loss, kl, clipped


class GRPOObjective:
    """GRPO as train.py's step and run use an objective: `collect` turns the step's prompts into rollouts before the
    step, the forward (inside DDP's wrapper) gives the completion tokens' log-probabilities, `loss` the micro-batch's
    share of the step's loss; evaluation is the held-out prompts' mean reward."""

    config_class = GRPOConfig
    memory_hint = ", lower --group-size or --max-new-tokens,"  # (train.py's out-of-memory advice)

    def __init__(self, rewards: list, group_size: int = 8, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, loss: str = "dapo", beta: float = 0.0, epsilon: float = 0.2,
                 epsilon_high: float | None = None, seed: int = 0):
        self.rewards, self.group_size, self.max_new_tokens = rewards, group_size, max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.kind, self.beta, self.seed = loss, beta, seed
        self.epsilon = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.generator = None  # set by prepare, once the model is loaded
        self.packed = True  # rollouts packed into one row (prepare: the config's --packing)
        self.starting_adapter = None  # (prepare: a continued --adapter's starting weights, the KL reference)
        self.max_length = 1024  # a sequence's longest: prompt and completion (the config's, set by `of`)

    @classmethod
    def of(cls, config: GRPOConfig) -> "GRPOObjective":
        """The objective of a run; its user reward functions are imported here, before the model loads."""
        from .rewards import parse_rewards

        if config.reward is None:
            raise ConfigError("no reward: pass --reward SPEC (e.g. --reward exact:answer, --reward numeric:answer, or "
                              "--reward my_rewards:score for your own function), or reward: in the YAML config")
        objective = cls(parse_rewards(config.reward, config.reward_weights), config.group_size,
                        config.max_new_tokens, config.temperature, config.top_p, config.top_k, config.loss,
                        config.beta, config.epsilon, config.epsilon_high, config.seed)
        objective.max_length = config.max_length
        for reward in objective.rewards:  # overlong:N penalises the N tokens before max_new_tokens
            margin = getattr(reward, "margin", None)
            if margin is not None and margin >= config.max_new_tokens:
                raise ConfigError(f"--reward {reward.spec}: the penalty would start {margin} tokens before "
                                  f"--max-new-tokens {config.max_new_tokens}, at or before the first token, so every "
                                  f"completion is penalised; use overlong:N with N below {config.max_new_tokens}")
        return objective

    # ---- before the model loads, and before training

    def check_examples(self, examples) -> None:
        """Every prompt row holds what the rewards read (a built-in's field), before the model loads."""
        from .rewards import check_rows

        for part in (examples.train, examples.validation):
            check_rows(self.rewards, [example.row for example in part], [example.where for example in part])

    def data_options(self, model) -> dict:
        """A prompt must leave room for its completion within max_length, and within the model's context (past it
        generation is refused mid-run): those that do not are dropped (counted) or refused, as --on-long says."""
        from .generation import context_length

        return {"max_new_tokens": self.max_new_tokens, "context": context_length(model)}

    def check_resumable(self, out: Path) -> None:
        pass  # nothing of its own in the run directory: a step's rollouts are sampled again, seeded

    def prepare(self, model, tokenizer, data, pad_id: int, cfg, processes, out: Path, resume: bool,
                fingerprint: dict, log):
        """The generator the rollouts and evaluation use (its decoder is built on first use and kept)."""
        from .generation import Generator

        self.model, self.tokenizer, self.pad_id, self.processes = model, tokenizer, pad_id, processes
        self.packed = cfg.packing
        # The KL reference is the model as the run starts: fresh adapters add nothing (B = 0), so that is the base,
        # computed with the adapters switched off; an adapter continued with --adapter (an SFT run) is its own
        # reference, as TRL's GRPOTrainer makes it: its starting weights are kept for the reference passes (before
        # a --resume loads the checkpoint's).
        self.starting_adapter = None
        if self.beta and cfg.adapter is not None:
            self.starting_adapter = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
        self.device = next(p.device for p in model.parameters())
        slots = max(cfg.batch_size * cfg.grad_accum * self.group_size, cfg.batch_size)
        self.generator = Generator(model, tokenizer, batch_size=slots)
        return None

    # ---- a step: rollouts, then the forward and loss of each micro-batch

    def collect(self, model, batches: list, step: int) -> tuple[list, dict]:
        """The step's micro-batches of prompts -> micro-batches of rollouts, and the rollouts' metrics (summed over
        the processes)."""
        from .generation import Sampling
        from .rewards import score

        groups = [list(getattr(batch, "items", ())) for batch in batches]  # a rank's empty share: no prompts
        prompts = [item for group in groups for item in group]
        g = self.group_size
        each = [item for item in prompts for _ in range(g)]  # each completion's prompt
        wheres = [item.where for item in each]
        started = time.perf_counter()
        answers = []
        if prompts:
            sampling = Sampling(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                                top_k=self.top_k, top_p=self.top_p)
            answers = self.generator.run([item.input_ids for item in each], sampling, names=wheres,
                                         seeds=self.rollout_seeds(step, prompts))
        generation_s = time.perf_counter() - started
        values, total = score(self.rewards, [item.prompt for item in each], [a.text for a in answers],
                              [item.row for item in each], wheres, [len(a.tokens) for a in answers],
                              [a.finish != "length" for a in answers], self.max_new_tokens)
        rewards = torch.tensor(total, dtype=LOSS_DTYPE)
        advantages, flat = group_advantages(rewards, g, scale=self.kind != "dr_grpo") if prompts else (
            rewards, torch.zeros(0, dtype=torch.bool))

        out, first = [], 0
        for group in groups:
            n = len(group) * g
            out.append(self._rollout_batch(group, answers[first:first + n], advantages[first:first + n]))
            first += n
        if self.beta:
            self._reference(out)

        lengths = [len(a.tokens) for a in answers]
        sums = [len(answers), math.fsum(total), math.fsum(r * r for r in total)]  # (Python floats: no overflow)
        for spec in values:
            sums += [math.fsum(values[spec]), math.fsum(r * r for r in values[spec])]
        sums += [sum(lengths), sum(a.finish == "length" for a in answers), len(prompts), int(flat.sum()),
                 sum(lengths) / generation_s if answers else 0.0]
        if self.processes is not None and self.processes.distributed:
            sums = self.processes.sum(sums, self.device)
        return out, self._rollout_metrics(sums, generation_s)

    def rollout_seeds(self, step: int, prompts: list) -> list[int]:
        """Each completion's sampling seed: a function of (seed, step, the prompt's row, its place in the group)
        only — so a --resume samples what the uninterrupted run sampled, and several processes sample what one
        does. (A row met twice in one step, across an epoch's end, draws anew the second time.)"""
        seen: dict[str, int] = {}
        seeds = []
        for item in prompts:
            again = seen[item.where] = seen.get(item.where, -1) + 1
            for k in range(self.group_size):
                digest = hashlib.sha256(f"grpo:{self.seed}:{step}:{item.where}:{again}:{k}".encode()).digest()
                seeds.append(int.from_bytes(digest[:7], "little"))
        return seeds

    def _rollout_batch(self, prompts: list, answers: list, advantages: torch.Tensor) -> RolloutBatch:
        """The micro-batch of `prompts`' completions (`answers`, group by group): each a prompt + completion
        sequence whose completion tokens are trained. With beta = 0 completions of advantage 0 are left out (their
        loss terms and gradients are 0), still counted."""
        g = self.group_size
        completions, tokens = len(answers), sum(len(a.tokens) for a in answers)
        keep = [i for i in range(len(answers)) if self.beta or advantages[i] != 0]
        if not keep:
            empty = placeholder(self.pad_id)
            return RolloutBatch(**{f: getattr(empty, f) for f in ("input_ids", "labels", "position_ids",
                                                                  "attention_mask", "placeholder", "sequences")},
                                advantages=torch.zeros(0, dtype=LOSS_DTYPE), completions=completions,
                                completion_tokens=tokens)
        items = []
        for i in keep:
            prompt, completion = prompts[i // g].input_ids, answers[i].tokens
            items.append(Tokenized(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion,
                                   prompts[i // g].where))
        batch = collate_sequences(items, self.pad_id, self.packed)
        return RolloutBatch(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask,
                            sequences=batch.sequences, advantages=advantages[keep].clone(), completions=completions,
                            completion_tokens=tokens)

    @torch.no_grad()
    def _reference(self, batches: list[RolloutBatch]) -> None:
        """Each batch's reference log-probabilities (beta > 0): the model with its adapters switched off, computed
        through the same layers as the policy (upstream.peft.base_only), no dropout."""
        from .loss import token_logps
        from .upstream.peft import base_only

        model, precision = self.model, precision_of(self.model)
        was_training = model.training
        model.eval()
        try:
            with base_only(model) if self.starting_adapter is None else self._started():
                for batch in batches:
                    if batch.placeholder:
                        continue
                    moved = batch.to(self.device)
                    with precision.autocast():
                        logps, _ = token_logps(model, moved.model_inputs(), moved.labels, self.temperature)
                    batch.reference = logps.detach()
        finally:
            model.train(was_training)

    @contextlib.contextmanager
    def _started(self):
        """The adapters holding their starting weights (the reference of a continued --adapter), put back after."""
        now = [(p, p.detach().clone()) for p, _ in self.starting_adapter]
        with torch.no_grad():
            try:
                for p, start in self.starting_adapter:
                    p.copy_(start)
                yield
            finally:
                for p, value in now:
                    p.copy_(value)

    def counts(self, batch) -> list[float]:
        """What the step's loss is divided by, summed over its micro-batches and processes: completions, and their
        tokens."""
        return [getattr(batch, "completions", 0), getattr(batch, "completion_tokens", 0)]

    def forward(self, model, inputs: dict, labels: torch.Tensor, sequences=None):
        from .loss import token_logps

        return token_logps(model, inputs, labels, self.temperature)

    def loss(self, outputs, batch, counts: list[float]) -> tuple[torch.Tensor, dict]:
        """The micro-batch's share of the step's loss, and its metrics' sums."""
        logps, where = outputs
        completions, tokens = counts
        if batch.placeholder or logps.numel() == 0:  # nothing of this micro-batch trains: zero, with the graph
            return logps.sum() * 0.0, dict.fromkeys(self.stat_names(), 0.0)
        owner = batch.sequences[:, 1:].reshape(-1).to(logps.device)[where]
        advantages = batch.advantages.to(logps.device)
        reference = batch.reference.to(logps.device) if self.beta else None
        terms, kl, clipped = token_terms(logps, logps.detach(), advantages[owner], reference, self.beta,
                                         self.epsilon, self.epsilon_high)
        if self.kind == "grpo":
            n = advantages.numel()
            sums = torch.zeros(n, dtype=LOSS_DTYPE, device=logps.device).index_add(0, owner, terms)
            lengths = torch.zeros(n, dtype=LOSS_DTYPE, device=logps.device).index_add(
                0, owner, torch.ones_like(terms))
            loss = (sums / lengths.clamp(min=1)).sum() / max(completions, 1)
        elif self.kind == "dapo":
            loss = terms.sum() / max(tokens, 1)
        else:  # dr_grpo
            loss = terms.sum() / max(completions * self.max_new_tokens, 1)
        stats = {"clipped": float(clipped.sum()), "kl": float(kl.detach().sum()) if kl is not None else 0.0}
        return loss, stats

    def stat_names(self) -> tuple[str, ...]:
        return ("clipped", "kl")

    def summary(self, stats: dict, counts: list[float]) -> dict:
        """The step's metrics from its summed stats: per completion token."""
        tokens = max(counts[1], 1)
        out = {"clip_fraction": stats["clipped"] / tokens}
        if self.beta:
            out["kl"] = stats["kl"] / tokens
        return out

    def _rollout_metrics(self, sums: list, generation_s: float) -> dict:
        n, reward, reward_sq, *rest = sums
        per_reward, rest = rest[:2 * len(self.rewards)], rest[2 * len(self.rewards):]
        lengths, truncated, groups, flat, rate = rest

        def std(total, squares):  # unbiased, over the step's completions (TRL's reward_std)
            return math.sqrt(max((squares - total * total / n) / (n - 1), 0.0)) if n > 1 else 0.0

        n = max(n, 1)
        out = {"reward": reward / n, "reward_std": std(reward, reward_sq)}
        for k, reward_fn in enumerate(self.rewards):
            total, squares = per_reward[2 * k], per_reward[2 * k + 1]
            out[f"reward/{reward_fn.spec}"] = total / n
            out[f"reward/{reward_fn.spec}_std"] = std(total, squares)
        out |= {"completion_length": lengths / n, "truncated": truncated / n,
                "zero_std_groups": flat / max(groups, 1), "generation_s": generation_s,
                "rollout_tokens_per_s": rate}
        return out

    # ---- evaluation: held-out prompts, greedy

    def evaluate(self, model, prompts: list, pad_id: int, batch_size: int, packed: bool, processes=None) -> dict:
        """The held-out prompts' mean reward (each answered greedily), overall and per reward."""
        from .evaluate import mean_reward

        if self.generator is None or self.generator.model is not model:
            raise ValueError("GRPOObjective.evaluate answers with the objective's generator: set `generator` to a "
                             "qlorakit.Generator of this model first (a run's prepare does)")
        result = mean_reward(self.generator, prompts, self.rewards, self.max_new_tokens, processes)
        return {key: result[key] for key in ("reward", "rewards", "prompts")}

    @staticmethod
    def describe_eval(result: dict) -> str:
        parts = ", ".join(f"{spec} {value:.3f}" for spec, value in result["rewards"].items())
        return f"validation: mean reward {result['reward']:.3f} ({parts}; {result['prompts']} prompts, greedy)"

    @staticmethod
    def eval_record(result: dict) -> dict:
        return {"eval_reward": result["reward"]} | {f"eval_reward/{spec}": value
                                                    for spec, value in result["rewards"].items()}


def train_grpo(config: GRPOConfig | str | Path | None = None, *, loaded: tuple | None = None, overwrite: bool = False,
               log=print, progress: bool = True, **overrides):
    """Reinforcement learning with verifiable rewards (GRPO) on prompts, with LoRA adapters over the quantized
    base; writes the adapter (PEFT format), config, metrics and curves: `qlorakit grpo`. Arguments as for
    qlorakit.train; `config` is a GRPOConfig, a YAML path or None, `overrides` its fields (`reward=["exact:answer"],
    group_size=8`)."""
    from .train import run

    return run(config, GRPOObjective, loaded=loaded, overwrite=overwrite, log=log, progress=progress, **overrides)
