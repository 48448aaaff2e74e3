"""The demo runs as a user's run does: its built-in task is written once, as JSONL files named by their contents'
hash, into qlorakit's cache, and trained on through train(data=..., validation_data=...)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import save_tiny_bpe_model
from qlorakit.demo import (
    demo_files, demo_rows, grpo_files, grpo_rows, preference_files, preference_rows, record_reward, run_demo,
    run_grpo_demo, run_preference_demo,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_task_is_written_once_to_the_cache_named_by_its_contents(cache):
    train, heldout = demo_files(n_train=40, n_heldout=10, seed=3)
    assert re.fullmatch(r"[0-9a-f]{16}", train.parent.name) and train.parent.parent == cache / "demo"
    assert (train.name, heldout.name, heldout.parent) == ("train.jsonl", "heldout.jsonl", train.parent)
    rows, held = demo_rows(n_train=40, n_heldout=10, seed=3)
    assert _rows(train) == rows and _rows(heldout) == held
    before = {p: p.stat().st_ino for p in (train, heldout)}
    assert demo_files(n_train=40, n_heldout=10, seed=3) == (train, heldout)  # a rerun reuses them
    assert {p: p.stat().st_ino for p in (train, heldout)} == before
    assert demo_files(n_train=40, n_heldout=10, seed=4)[0].parent != train.parent  # other rows, another name
    train.write_text("edited by hand\n")
    assert demo_files(n_train=40, n_heldout=10, seed=3) == (train, heldout) and _rows(train) == rows  # restored
    assert sorted(p.name for p in (cache / "demo").iterdir()) == sorted({train.parent.name,
                                                                         demo_files(40, 10, 4)[0].parent.name})


def test_the_demo_trains_on_its_files_as_any_run(cache, tmp_path):
    """A whole demo on a tiny model: the run's config.json names the task's files as its data, held-out loss is
    evaluated on the held-out file, and the log names them."""
    base = save_tiny_bpe_model(tmp_path / "base")
    lines = []
    result = run_demo(log=lines.append, progress=False, n_heldout=4, model=str(base), quant="none", dtype="fp32",
                      device="cpu", max_steps=2, batch_size=4, output=str(tmp_path / "demo"))
    train, heldout = demo_files(n_heldout=4)
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert (config["data"], config["validation_data"]) == (str(train), str(heldout))
    evals = [r for r in result["run"].metrics if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2] and result["run"].eval["tokens"] > 0
    assert any(line.startswith(f"built-in task: 'Extract the person as name|age|job|city.' (240 training chats, 4 "
                               f"held out; written to {train.parent})") for line in lines), lines
    assert any(line.startswith(f"data: {train} (chat): 240 examples") for line in lines), lines
    assert result["before"]["total"] == result["after"]["total"] == 4


def test_the_preference_demo_pairs_the_tasks_answers_with_plausible_misses(cache):
    """Each pair: the task's record chosen, a rejection of the kind its turn names (a wrong age or city, or the
    record in another format) — never the chosen answer itself; held-out prompts are not trained on."""
    train, held = preference_rows(n_train=24, n_heldout=6)
    sft, _ = demo_rows(n_train=24, n_heldout=6)
    assert [p["prompt"] for p in train] == [[r["messages"][0]] for r in sft]
    assert {p["prompt"][0]["content"] for p in train}.isdisjoint(p["prompt"][0]["content"] for p in held)
    kinds = [re.fullmatch(r"[A-Z][a-z]+\|\d+\|[a-z]+\|[A-Z][a-z]+", p["rejected"][0]["content"]) is not None
             for p in train]
    assert kinds[:6] == [False, True, False, True, False, False]  # spaces, age, commas, city, labels, order
    for pair in train:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen != rejected and re.fullmatch(r"[A-Z][a-z]+\|\d+\|[a-z]+\|[A-Z][a-z]+", chosen)
    assert [json.loads(line) for line in preference_files(24, 6)[0].read_text().splitlines()] == train


def test_the_preference_demo_runs_as_a_users_dpo_run(cache, tmp_path):
    """On a tiny model: the run trains on the pairs' files with the held-out file as validation, and reports the
    held-out preference before and after, and the run's held-out reward metrics."""
    base = save_tiny_bpe_model(tmp_path / "base")
    lines = []
    result = run_preference_demo(log=lines.append, progress=False, n_train=16, n_heldout=4, model=str(base),
                                 quant="none", dtype="fp32", device="cpu", max_steps=2, batch_size=4,
                                 output=str(tmp_path / "demo"))
    train, heldout = preference_files(16, 4)
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert (config["data"], config["validation_data"], config["objective"]) == (str(train), str(heldout),
                                                                                "preference")
    assert result["before"]["total"] == result["after"]["total"] == 4 and result["eval"]["pairs"] == 4
    assert any(line.startswith("held-out pairs where the model prefers the chosen answer, before tuning") for line in
               lines), lines
    assert any(f"qlorakit eval --adapter {tmp_path / 'demo'} --data {heldout}" in line for line in lines), lines


def test_the_grpo_demo_prompts_hold_the_task_and_its_record(cache):
    """Each prompt: the SFT demo's sentence after the instruction and one worked example, the expected record as the
    row's `record`; held-out sentences are not trained on."""
    train, held = grpo_rows(n_train=24, n_heldout=6)
    sft, sft_held = demo_rows(n_train=24, n_heldout=6)
    assert [row["record"] for row in train + held] == [r["messages"][1]["content"] for r in sft + sft_held]
    for row, chat in zip(train, sft):
        sentence = chat["messages"][0]["content"].split("\n", 1)[1]
        assert row["prompt"] == [{"role": "user", "content": f"Extract the person as name|age|job|city.\n"
                                  f'Example: "Lena, 33, works as a nurse in Riga." -> Lena|33|nurse|Riga\n'
                                  f'Now: "{sentence}" ->'}]
    assert {r["prompt"][0]["content"] for r in train}.isdisjoint(r["prompt"][0]["content"] for r in held)
    assert [json.loads(line) for line in grpo_files(24, 6)[0].read_text().splitlines()] == train


@pytest.mark.parametrize("completion, reward", [
    ("Sven|41|pilot|Oslo", 1.0), (" Sven | 41 | pilot | Oslo ", 1.0), ("Sven|41|pilot|Oslo\nThat is all.", 0.75),
    ("Sven|42|pilot|Oslo", 0.75), ("Sven, 41, pilot, Oslo", 0.0), ("Sven|41", 0.5), ("", 0.0),
    ("Sven|41|Oslo|pilot", 0.5), ("Sven|41|pilot|Oslo|extra", 1.0)])
def test_the_grpo_demo_reward_is_a_quarter_per_field_in_its_place(completion, reward):
    assert record_reward([None], [completion], [{"record": "Sven|41|pilot|Oslo"}]) == [reward]


def test_the_grpo_demo_runs_as_a_users_grpo_run(cache, tmp_path):
    """On a tiny model: the run trains on the prompts' files with the held-out file as validation and its reward as
    a module:function spec, and reports the held-out mean reward before and after (the run's evaluation)."""
    base = save_tiny_bpe_model(tmp_path / "base", context=512)  # the prompts: ~150 tokens of this tokenizer
    lines = []
    result = run_grpo_demo(log=lines.append, progress=False, n_train=16, n_heldout=4, model=str(base), quant="none",
                           dtype="fp32", device="cpu", max_steps=2, batch_size=2, group_size=2, max_new_tokens=4,
                           output=str(tmp_path / "demo"))
    train, heldout = grpo_files(16, 4)
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert (config["data"], config["validation_data"], config["objective"], config["reward"]) == (
        str(train), str(heldout), "grpo", ["qlorakit.demo:record_reward"])
    assert result["before"]["prompts"] == result["after"]["prompts"] == 4
    assert result["after"] == result["run"].eval
    records = result["run"].metrics
    assert [r["step"] for r in records if "generation_s" in r] == [1, 2]
    assert any(line.startswith("held-out mean reward before training: ") for line in lines), lines
    card = (tmp_path / "demo" / "README.md").read_text()
    assert (f"| held-out mean reward, greedy (step 2) | {result['after']['reward']:.3f}; "
            f"{result['before']['reward']:.3f} before training |") in card
    assert any(f"qlorakit eval --adapter {tmp_path / 'demo'} --data {heldout} --reward qlorakit.demo:record_reward"
               in line for line in lines), lines
