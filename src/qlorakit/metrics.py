"""The run's metrics: metrics.jsonl (one JSON object per logged step or evaluation) and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .outputs import append_line, atomic_file, atomic_write_text


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
        append_line(self.path, json.dumps(record))

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
