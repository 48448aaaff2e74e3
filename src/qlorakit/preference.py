"""Preference tuning: DPO (sigmoid), IPO, hinge, ORPO and SimPO on pairs of a prompt, a chosen and a rejected answer.

    run = qlorakit.train_preference(data="prefs.jsonl", loss="sigmoid", beta=0.1, output="dpo")   # qlorakit dpo

The run is train.py's, top to bottom — load, data, adapters, optimizer, resume, loop, outputs, on one process or
several — with this module's objective in place of the language-modelling loss:

- **One forward per micro-batch.** Each pair's chosen and rejected sequences (prompt + answer) are packed into the
  micro-batch's row (data/preference.py's collate_pairs), and the log-probability of every answer token comes from
  the hidden states through the chunked kernel (loss.token_logps); they are summed per sequence.
- **The reference is the model as the run starts, computed once.** Each pair's reference log-probabilities are
  computed before the first step with the adapters as they start — fresh adapters add nothing (B = 0), so that is
  the base model with its adapters disabled; an adapter continued with --adapter (an SFT run) is its own reference,
  as DPO asks. No second copy of the base, no second forward per step. They are written to the run directory
  (reference_logps.safetensors), so a --resume continues against the same reference. ORPO and SimPO need none.
- **The losses** (per pair; log-probabilities are sums over the answer's tokens, `delta` the chosen answer's
  log-ratio to the reference minus the rejected one's):
    sigmoid  -log σ(β·delta)                                   (DPO)
    hinge    max(0, 1 - β·delta)                               (SLiC)
    ipo      (delta per token - 1/(2β))², each log-ratio divided by its answer's length (as TRL and IPO's authors)
    simpo    -log σ(β·(mean logp chosen - mean logp rejected) - γ)   (γ = simpo_gamma; no reference)
    orpo     NLL of the chosen answers - β·log σ(log odds(chosen) - log odds(rejected)), odds of the mean token
             probability (no reference)
  averaged over the step's pairs (ORPO's NLL over the step's chosen tokens), on every rank together.
- **Metrics:** loss, reward margin and accuracy (the implicit rewards β·log-ratio; for ORPO and SimPO β·mean
  log-probability), each side's rewards and log-probabilities: in metrics.jsonl, the trackers and loss.png.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .choices import REFERENCE_FREE_LOSSES
from .config import PreferenceConfig
from .data.batches import evaluation_batches, placeholder
from .errors import TrainingError
from .data.tokenize import IGNORE_INDEX
from .precision import LOSS_DTYPE, precision_of

__all__ = ["PreferenceObjective", "REFERENCE_FILE", "train_preference"]

REFERENCE_FILE = "reference_logps.safetensors"
# What a step's stats sum, per pair (then divided by the step's pairs): metrics.jsonl's names.
_PAIR_STATS = ("reward_margin", "reward_accuracy", "rewards_chosen", "rewards_rejected", "logps_chosen",
               "logps_rejected")


def sequence_logps(model, inputs: dict, labels: torch.Tensor, sequences: torch.Tensor, count: int,
                   whole_chosen: bool = False) -> tuple[torch.Tensor, ...]:
    """(sum of the answer tokens' log-probabilities, number of answer tokens) of each of `count` sequences of a
    packed or padded batch (`sequences`: each token's sequence, -1 for none; `labels`: the answers' tokens), in
    fp32. `whole_chosen` adds ORPO's NLL term: the log-probability sum of every token of the chosen sequences (prompt
    and answer) but each one's first, from the same forward."""
    from .loss import token_logps

    answers = labels[:, 1:].reshape(-1) != IGNORE_INDEX
    if whole_chosen:
        labels = torch.where(labels != IGNORE_INDEX, labels,
                             torch.where(scored_chosen(sequences), inputs["input_ids"], IGNORE_INDEX))
    logps, where = token_logps(model, inputs, labels)
    owner = sequences[:, 1:].reshape(-1).to(logps.device)[where]  # a target token's sequence
    answer = answers.to(logps.device)[where]
    sums = torch.zeros(count, dtype=LOSS_DTYPE, device=logps.device).index_add(0, owner[answer], logps[answer])
    lengths = torch.zeros(count, dtype=LOSS_DTYPE, device=logps.device).index_add(
        0, owner[answer], torch.ones_like(logps[answer]))
    if not whole_chosen:
        return sums, lengths
    return sums, lengths, logps[owner % 2 == 0].sum()


def scored_chosen(sequences: torch.Tensor) -> torch.Tensor:
    """Which tokens of a batch ORPO's NLL predicts: every token of a chosen sequence (even index) but its first."""
    before = torch.cat([torch.full_like(sequences[:, :1], -1), sequences[:, :-1]], dim=1)
    return (sequences >= 0) & (sequences % 2 == 0) & (sequences == before)


class PreferenceObjective:
    """A preference loss as train.py's step and run use an objective: the counts a step is normalised by, the
    forward (inside DDP/FSDP's wrapper), the loss and metrics of a micro-batch, and evaluation."""

    config_class = PreferenceConfig
    memory_hint = ""  # what else train.py's out-of-memory advice names

    def __init__(self, loss: str = "sigmoid", beta: float = 0.1, simpo_gamma: float = 0.5):
        self.kind, self.beta, self.gamma = loss, beta, simpo_gamma

    @classmethod
    def of(cls, config: PreferenceConfig) -> "PreferenceObjective":
        return cls(config.loss, config.beta, config.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE_LOSSES

    # ---- a step

    def counts(self, batch) -> list[float]:
        """What the step's losses are divided by, summed over its micro-batches and ranks: pairs, and (ORPO's NLL)
        the tokens of the chosen sequences it predicts."""
        orpo = self.kind == "orpo" and batch.pairs
        return [batch.pairs, int(scored_chosen(batch.sequences).sum()) if orpo else 0]

    def forward(self, model, inputs: dict, labels: torch.Tensor, sequences: torch.Tensor):
        count = int(sequences.max()) + 1 if sequences.numel() else 0
        return sequence_logps(model, inputs, labels, sequences, max(count, 0), whole_chosen=self.kind == "orpo")

    def loss(self, outputs, batch, counts: list[float]) -> tuple[torch.Tensor, dict]:
        """The micro-batch's share of the step's loss (its pairs' losses over the step's pairs), and its metrics'
        sums."""
        sums, lengths = outputs[:2]
        nll = -outputs[2] if len(outputs) > 2 else None  # ORPO: the chosen sequences' NLL, summed
        pairs, tokens = counts
        if batch.pairs == 0:  # a rank's empty share: zero, with the graph DDP needs
            return (sums.sum() if nll is None else nll) * 0.0, dict.fromkeys(self.stat_names(), 0.0)
        losses, chosen_rewards, rejected_rewards = self.pair_losses(sums, lengths, batch.reference)
        loss = losses.sum() / max(pairs, 1)
        if nll is not None:
            loss = loss + nll / max(tokens, 1)
        with torch.no_grad():
            stats = {
                "reward_margin": float((chosen_rewards - rejected_rewards).sum()),
                "reward_accuracy": float((chosen_rewards > rejected_rewards).sum()),
                "rewards_chosen": float(chosen_rewards.sum()), "rewards_rejected": float(rejected_rewards.sum()),
                "logps_chosen": float(sums[0::2].sum()), "logps_rejected": float(sums[1::2].sum()),
            }
            if nll is not None:
                stats["nll"] = float(nll)
        return loss, stats

    def stat_names(self) -> tuple[str, ...]:
        return _PAIR_STATS + (("nll",) if self.kind == "orpo" else ())

    def summary(self, stats: dict, counts: list[float]) -> dict:
        """The step's metrics from its summed stats: per pair (ORPO's NLL per chosen token)."""
        pairs, tokens = counts
        out = {name: stats[name] / max(pairs, 1) for name in _PAIR_STATS}
        if "nll" in stats:
            out["nll"] = stats["nll"] / max(tokens, 1)
        return out

    def pair_losses(self, sums: torch.Tensor, lengths: torch.Tensor, reference: torch.Tensor | None):
        """(per-pair losses, chosen rewards, rejected rewards) from each sequence's log-probability sum and length
        (chosen at even, rejected at odd positions). ORPO's NLL term is the forward's (sequence_logps)."""
        beta, kind = self.beta, self.kind
        chosen, rejected = sums[0::2], sums[1::2]
        chosen_len, rejected_len = lengths[0::2].clamp(min=1), lengths[1::2].clamp(min=1)
        if kind in REFERENCE_FREE_LOSSES:
            chosen_mean, rejected_mean = chosen / chosen_len, rejected / rejected_len
            rewards = (beta * chosen_mean.detach(), beta * rejected_mean.detach())
            if kind == "simpo":
                losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - self.gamma)
                return losses, *rewards
            # ORPO: log odds of the mean token probability p, log(p / (1 - p)), from log p (< 0)
            log_odds = (chosen_mean - rejected_mean) - (
                torch.log1p(-torch.exp(chosen_mean)) - torch.log1p(-torch.exp(rejected_mean)))
            return -beta * F.logsigmoid(log_odds), *rewards
        if reference is None:
            raise TrainingError(f"the {kind} loss needs the pairs' reference log-probabilities, and this batch has "
                                "none (PreferenceObjective.prepare computes them before training)")
        chosen_ratio, rejected_ratio = chosen - reference[0::2], rejected - reference[1::2]
        rewards = (beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
        if kind == "ipo":
            delta = chosen_ratio / chosen_len - rejected_ratio / rejected_len
            return (delta - 1 / (2 * beta)) ** 2, *rewards
        delta = chosen_ratio - rejected_ratio
        if kind == "hinge":
            return torch.relu(1 - beta * delta), *rewards
        return -F.logsigmoid(beta * delta), *rewards

    # ---- before training, and evaluation

    @torch.no_grad()
    def sequence_logps_of(self, model, pairs: list, pad_id: int, batch_size: int, packed: bool, processes=None
                          ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Every pair's (chosen, rejected) log-probability sums and lengths, [pairs, 2] each, in eval mode (no
        dropout): the reference before training, the policy in evaluation; with ORPO, its NLL term's sum and
        tokens over all the pairs too (else 0, 0). On several processes each rank computes its share in as many
        forwards as the others (a sharded model gathers weights in each) and the shares are summed."""
        from .data.preference import collate_pairs

        precision = precision_of(model)
        device = next(p.device for p in model.parameters())
        sums = torch.zeros(len(pairs), 2, dtype=LOSS_DTYPE)
        lengths = torch.zeros(len(pairs), 2, dtype=LOSS_DTYPE)
        nll, nll_tokens = 0.0, 0.0
        was_training = model.training
        model.eval()
        try:
            for chunk in evaluation_batches(len(pairs), batch_size, processes):
                batch = (collate_pairs([pairs[i] for i in chunk], pad_id, packed) if chunk
                         else placeholder(pad_id)).to(device)
                with precision.autocast():
                    got = self.forward(model, batch.model_inputs(), batch.labels, batch.sequences)
                if chunk:
                    sums[chunk] = got[0].view(-1, 2).cpu()
                    lengths[chunk] = got[1].view(-1, 2).cpu()
                    if len(got) > 2:
                        nll, nll_tokens = nll - float(got[2]), nll_tokens + self.counts(batch)[1]
        finally:
            model.train(was_training)
        if processes is not None and processes.distributed:
            flat = processes.sum(torch.cat([sums.view(-1), lengths.view(-1)]).tolist() + [nll, nll_tokens], device)
            both = torch.tensor(flat[:-2], dtype=LOSS_DTYPE).view(2, len(pairs), 2)
            sums, lengths, nll, nll_tokens = both[0], both[1], flat[-2], flat[-1]
        return sums, lengths, nll, nll_tokens

    def evaluate(self, model, pairs: list, pad_id: int, batch_size: int, packed: bool, processes=None) -> dict:
        """The loss and reward metrics over held-out pairs (whose reference log-probabilities are set)."""
        sums, lengths, nll, nll_tokens = self.sequence_logps_of(model, pairs, pad_id, batch_size, packed, processes)
        reference = None
        if self.needs_reference:
            reference = torch.tensor([side for pair in pairs for side in pair.reference], dtype=LOSS_DTYPE)
        losses, chosen, rejected = self.pair_losses(sums.view(-1), lengths.view(-1), reference)
        loss = float(losses.mean()) + (nll / nll_tokens if nll_tokens else 0.0)
        return {"loss": loss, "reward_accuracy": float((chosen > rejected).sum()) / max(len(pairs), 1),
                "reward_margin": float((chosen - rejected).mean()), "pairs": len(pairs)}

    @staticmethod
    def describe_eval(result: dict) -> str:
        return (f"validation: loss {result['loss']:.4f}, reward accuracy {result['reward_accuracy']:.1%}, "
                f"reward margin {result['reward_margin']:.3f} ({result['pairs']} pairs)")

    @staticmethod
    def eval_record(result: dict) -> dict:
        return {"eval_loss": result["loss"], "eval_reward_accuracy": result["reward_accuracy"],
                "eval_reward_margin": result["reward_margin"]}

    # ---- the reference, once per run

    def check_resumable(self, out: Path) -> None:
        """Before the model loads: a --resume needs the reference file the run's start wrote, readable (whether it
        is for this data is checked once the data is tokenized)."""
        if self.needs_reference:
            read_reference(out, None)

    def check_examples(self, examples) -> None:
        pass  # the format check (check_format) is all

    def data_options(self, model) -> dict:
        return {}  # the config's

    def collect(self, model, batches: list, step: int) -> tuple[list, dict]:
        return batches, {}  # the data's micro-batches of pairs are what the step trains on

    def prepare(self, model, tokenizer, data, pad_id: int, cfg, processes, out: Path, resume: bool,
                fingerprint: dict, log):
        """Set every pair's reference log-probabilities (training and validation): read from the run directory on a
        --resume, else computed now, with the adapters as the run starts. Returns what start_writing must write
        (the tensors), or None."""
        if not self.needs_reference:
            return None
        parts = {"train": data.train, "validation": data.validation}
        if resume:
            saved = processes.on_main(read_reference, out, fingerprint)
            for name, pairs in parts.items():
                for pair, values in zip(pairs, saved[name].tolist()):
                    pair.reference = tuple(values)
            return None
        import time

        started = time.perf_counter()
        tensors = {}
        for name, pairs in parts.items():
            sums = self.sequence_logps_of(model, pairs, pad_id, cfg.batch_size, cfg.packing, processes)[0]
            for pair, values in zip(pairs, sums.tolist()):
                pair.reference = tuple(values)
            tensors[name] = sums
        log(f"reference: log-probabilities of {len(data.train) + len(data.validation)} pairs computed with the "
            f"adapters as the run starts ({time.perf_counter() - started:.0f} s)")
        return tensors


def write_reference(out: Path, tensors: dict, fingerprint: dict) -> None:
    """The run's reference log-probabilities, with the data's fingerprint (a resume reads them only for the same
    data), written atomically."""
    import json

    from safetensors.torch import save_file

    from .outputs import atomic_file

    with atomic_file(Path(out) / REFERENCE_FILE) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp),
                  metadata={"data": json.dumps(fingerprint, sort_keys=True)})


def read_reference(out: Path, fingerprint: dict | None) -> dict:
    """The reference log-probabilities a run wrote (write_reference), for a --resume of that run on the same
    data (`fingerprint`; None: any)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(out) / REFERENCE_FILE
    if not path.is_file():
        raise TrainingError(f"{path} is missing: a resumed preference run continues against the reference "
                            "log-probabilities its start computed, and they are gone; start the run again "
                            "(--overwrite)")
    try:
        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {}).get("data", "null"))
        tensors = load_file(str(path))
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error types
        raise TrainingError(f"{path}: cannot be read ({e}); start the run again (--overwrite)") from None
    if fingerprint is not None and saved != fingerprint:
        raise TrainingError(f"{path} was computed for other data than this resume reads; resume with the run's "
                            "data, or start again (--overwrite)")
    return tensors


def train_preference(config: PreferenceConfig | str | Path | None = None, *, loaded: tuple | None = None,
                     overwrite: bool = False, log=print, progress: bool = True, **overrides):
    """Tune a model on preference pairs (prompt, chosen, rejected) with LoRA adapters and write the adapter (PEFT
    format), config, metrics and curves: `qlorakit dpo`. Arguments as for qlorakit.train; `config` is a
    PreferenceConfig, a YAML path or None, `overrides` its fields (`loss="ipo", beta=0.1`)."""
    from .train import run

    return run(config, PreferenceObjective, loaded=loaded, overwrite=overwrite, log=log, progress=progress,
               **overrides)
