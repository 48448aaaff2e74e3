"""The run's metrics: metrics.jsonl (one JSON object per logged step or evaluation) and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .outputs import atomic_file, atomic_write_text


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:  # a killed run may have logged steps after its last checkpoint; the resumed run logs them again
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill
        return records


def plot_loss_curve(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Training loss per step (and evaluation loss where logged) as a PNG; None when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def still_falling(records: list[dict], threshold: float = 0.1) -> str | None:
    """A hint when the training loss was still falling steeply at the end of the run, else None.

    A least-squares line through the loss of the second half of the steps (at least 4; per-step losses are noisy)
    says how much lower another stretch that long would end; when that is more than `threshold` of the current
    loss, the run stopped while it was still learning fast — too few steps or too low a learning rate (a short run
    at the default lr can teach a narrow task nothing and say nothing)."""
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("skipped") is not True]
    n = max(4, len(losses) // 2)
    if len(losses) < 8:
        return None
    steps, values = zip(*losses[-n:])
    mean_step, mean_loss = sum(steps) / n, sum(values) / n
    slope = sum((s - mean_step) * (v - mean_loss) for s, v in zip(steps, values)) / sum(
        (s - mean_step) ** 2 for s in steps)
    span = steps[-1] - steps[0]
    drop = -slope * span / mean_loss if mean_loss > 0 else 0.0
    if not drop > threshold:
        return None
    return (f"the training loss was still falling steeply at the end (about {drop:.0%} over the last {n} steps, "
            f"to {values[-1]:.4f}): this run may be too short to have learned the task. Train longer (--max-steps "
            f"or --epochs) or with a higher learning rate (--lr), and compare the held-out results")
