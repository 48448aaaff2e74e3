"""The run's metrics: metrics.jsonl (one JSON object per logged step or evaluation), the same records to the
trackers asked for (trackers.py), and a loss-curve PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .outputs import append_line, atomic_file, atomic_write_text


class MetricsLog:
    """metrics.jsonl; each record written also goes to `trackers` (a trackers.Trackers), so the two always agree."""

    def __init__(self, path: Path, resume_step: int | None = None, trackers=None):
        self.path = Path(path)
        self.trackers = trackers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:  # a killed run may have logged steps after its last checkpoint; the resumed run logs them again
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps(record))
        if self.trackers is not None:
            self.trackers.log(record)

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path) -> list[dict]:
    """A metrics.jsonl's records ([] when there is none); a line cut short by a kill ends them."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill
    return records


def peak_memory(device) -> dict:
    """The process's peak memory so far in MiB, under a key that says what was measured: on a CUDA device
    `peak_cuda_allocated_mib`, the peak of its tensors there (torch.cuda.max_memory_allocated; the caching
    allocator's unused reserve not counted); elsewhere `peak_rss_mib`, the process's peak resident set size
    (getrusage: everything it held in RAM, Python and libraries included). Both since the process started."""
    if device.type == "cuda":
        import torch

        return {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_mib": peak / (2**20 if sys.platform == "darwin" else 2**10)}


def plot_loss_curve(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Training loss per step (and evaluation loss where logged) as a PNG; None when there is nothing to plot. A
    preference run's records (reward_accuracy) add a second panel: reward accuracy and margin, training and held out.
    A GRPO run's (generation_s) show its rewards first (_plot_rewards)."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any("generation_s" in r for r in records):
        return _plot_rewards(records, path, title)
    preference = any("reward_accuracy" in r for r in records)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), dpi=100,
                             squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("preference loss per pair" if preference else "loss per trained token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        right = axes[0][1]
        for key, style, label in (("reward_accuracy", "-", "reward accuracy"),
                                  ("eval_reward_accuracy", "o-", "held-out reward accuracy")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                right.plot(*zip(*points), style, label=label, linewidth=1.2)
        right.set_ylim(-0.02, 1.02)
        right.set_xlabel("optimizer step")
        right.set_ylabel("share of pairs whose chosen answer earns the higher reward")
        margin = right.twinx()
        points = [(r["step"], r["reward_margin"]) for r in records if "reward_margin" in r]
        if points:
            margin.plot(*zip(*points), ":", color="gray", label="reward margin", linewidth=1.0)
        margin.set_ylabel("reward margin (chosen - rejected)")
        right.grid(alpha=0.3)
        _legend(right, margin, "lower right")
    return _save(fig, path)


def _plot_rewards(records: list[dict], path: Path, title: str) -> Path:
    """A GRPO run's curves: the mean reward per step (its std as a band) and held out; the loss and the completions'
    mean length beside it."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=100, squeeze=False)
    left, right = axes[0]
    steps = [r for r in records if "reward" in r]
    if steps:
        x = [r["step"] for r in steps]
        mean = [r["reward"] for r in steps]
        std = [r.get("reward_std", 0.0) for r in steps]
        left.plot(x, mean, label="reward (rollouts)", linewidth=1.2)
        left.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    held = [(r["step"], r["eval_reward"]) for r in records if "eval_reward" in r]
    if held:
        left.plot(*zip(*held), "o-", label="held-out reward (greedy)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("mean reward")
    left.set_title(title)
    left.grid(alpha=0.3)
    left.legend()
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    right.plot(*zip(*losses), label="loss", linewidth=1.2)
    right.set_xlabel("optimizer step")
    right.set_ylabel("GRPO loss")
    length = right.twinx()
    points = [(r["step"], r["completion_length"]) for r in records if "completion_length" in r]
    if points:
        length.plot(*zip(*points), ":", color="gray", label="completion length", linewidth=1.0)
    length.set_ylabel("mean completion length (tokens)")
    right.grid(alpha=0.3)
    _legend(right, length, "upper right")
    return _save(fig, path)


def _legend(ax, twin, loc: str) -> None:
    """One legend for a panel and its twin axis (a second scale on the right)."""
    handles, extra = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc=loc)


def _save(fig, path: Path) -> Path:
    """The figure written to `path` as a PNG, atomically, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _slope(points: list[tuple[int, float]]) -> float:
    """The least-squares slope of loss over step."""
    n = len(points)
    mean_step, mean_loss = sum(s for s, _ in points) / n, sum(v for _, v in points) / n
    return sum((s - mean_step) * (v - mean_loss) for s, v in points) / sum((s - mean_step) ** 2 for s, _ in points)


def still_falling(records: list[dict], threshold: float = 0.1) -> str | None:
    """A hint when the training loss was still falling steeply at the end of the run, else None.

    Two least-squares lines (per-step losses are noisy): one through the second half of the steps, one through all
    of them. The run stopped while still learning fast when the end's line is at least half as steep as the whole
    run's (the curve has not flattened) and another stretch as long would lower the loss by more than `threshold`
    of its value — too few steps or too low a learning rate (a short run at the default lr can teach a narrow task
    nothing and say nothing). A curve that fell fast and flattened out, even at a tiny loss, gives None."""
    if any("generation_s" in r for r in records):  # GRPO: its loss hovers near 0 whatever it learns
        return None
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("skipped") is not True]
    if len(losses) < 8:
        return None
    end = losses[-max(4, len(losses) // 2):]
    end_slope, run_slope = _slope(end), _slope(losses)
    mean_loss = sum(v for _, v in end) / len(end)
    drop = -end_slope * (end[-1][0] - end[0][0]) / mean_loss if mean_loss > 0 else 0.0
    if not (run_slope < 0 and end_slope <= 0.5 * run_slope and drop > threshold):
        return None
    return (f"the training loss was still falling steeply at the end (about {drop:.0%} over the last {len(end)} "
            f"steps, to {end[-1][1]:.4f}): this run may be too short to have learned the task. Train longer "
            f"(--max-steps or --epochs) or with a higher learning rate (--lr), and compare the held-out results")
