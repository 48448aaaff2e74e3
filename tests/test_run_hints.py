"""After a run whose loss is still falling steeply, qlorakit says so and suggests more steps or a higher lr (a new
user's 20-step run at the default lr taught their task nothing, without a hint)."""

from __future__ import annotations

import json
import math

import qlorakit
from qlorakit.metrics import still_falling


DEMO_CURVE = [2.3572, 1.7459, 0.9369, 0.3131, 0.1636, 0.0548, 0.0431, 0.0611, 0.0282, 0.0161, 0.1206, 0.0132, 0.0152,
              0.0598, 0.0167, 0.0195, 0.0042, 0.0053, 0.0101, 0.0032, 0.0049, 0.004, 0.0057, 0.004, 0.0032, 0.0022,
              0.0029, 0.0063, 0.0028, 0.0023]


def _records(losses):
    return [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]


def test_a_steep_fall_at_the_end_gives_the_hint():
    hint = still_falling(_records([3.0 - 0.1 * i for i in range(20)]))  # linear: 2.0 -> 1.1 over the last 10
    assert hint is not None
    assert "still falling steeply" in hint and "--max-steps" in hint and "--lr" in hint
    assert "about 58% over the last 10 steps, to 1.1000" in hint


def test_a_converged_or_noisy_curve_gives_none():
    assert still_falling(_records([2.0 * math.exp(-i / 3) + 0.5 for i in range(40)])) is None  # flattened out
    assert still_falling(_records([1.0 + 0.05 * (-1) ** i for i in range(40)])) is None  # noise around a level
    assert still_falling(_records([3.0, 2.0, 1.0])) is None  # too short to tell
    # The demo's own curve (learned: 98% held-out exact match): a fast fall, flat at a tiny loss; relative to that
    # tiny loss its noise looks steep, but the curve has flattened.
    assert still_falling(_records(DEMO_CURVE)) is None
    assert still_falling([{"step": 5, "eval_loss": 1.0}]) is None


def test_the_run_logs_the_hint(tmp_path, tiny_model_dir):
    rows = [{"text": " ".join(f"w{4 + (i + j) % 200}" for j in range(12))} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    qlorakit.train(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "run"), quant="none",
                   dtype="fp32", device="cpu", max_steps=12, batch_size=4, lr=2e-3, schedule="constant",
                   warmup_steps=0, log=lines.append, progress=False)
    notes = [line for line in lines if line.startswith("note: the training loss was still falling steeply")]
    assert len(notes) == 1, lines
