"""Native preference training (qlorakit.train_preference, `qlorakit dpo`): the losses' arithmetic, the reference
(the model as the run starts), one packed forward per micro-batch, accumulation, resume, the precision policy, and
the errors of data and settings that do not fit."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import qlorakit
from conftest import DTYPES
from qlorakit.preference import REFERENCE_FILE, PreferenceObjective

EXPECTED_ADAPTER = {"fp32": torch.float32, "fp16": torch.float32, "bf16": torch.bfloat16}


def _pairs(n=8, seed=0):
    """String pairs over the tiny tokenizer's words: the chosen answer continues the prompt's pattern."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        start = rng.randrange(10, 200)
        prompt = " ".join(f"w{start + k}" for k in range(6))
        chosen = " ".join(f"w{start + 6 + k}" for k in range(3 + i % 3))
        rejected = " ".join(f"w{rng.randrange(10, 250)}" for _ in range(2 + i % 4))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(16)), encoding="utf-8")
    return path


def _run(tiny_model_dir, pairs_file, out, dtype="fp32", quant="nf4", **settings):
    model, tokenizer = qlorakit.load(tiny_model_dir, quant=quant, dtype=dtype, device="cpu")
    config = dict(data=str(pairs_file), output=str(out), rank=4, alpha=8, batch_size=4, lr=2e-2, max_steps=6,
                  schedule="constant", warmup_steps=0, max_length=64, seed=0) | settings
    return qlorakit.train_preference(loaded=(model, tokenizer), log=lambda *a: None, progress=False, **config)


# ---------------------------------------------------------------------------------------------- the losses


def test_each_loss_is_its_formula():
    """Per pair, against the formulas written out (fp32, 1e-6): chosen at even positions, rejected at odd."""
    sums = torch.tensor([-3.0, -5.0, -2.0, -1.5])
    lengths = torch.tensor([3.0, 4.0, 2.0, 3.0])
    reference = torch.tensor([-3.5, -4.0, -2.5, -2.0])
    beta, gamma = 0.2, 0.7
    delta = (sums[0::2] - reference[0::2]) - (sums[1::2] - reference[1::2])
    mean_c, mean_r = sums[0::2] / lengths[0::2], sums[1::2] / lengths[1::2]
    ipo = ((sums[0::2] - reference[0::2]) / lengths[0::2] - (sums[1::2] - reference[1::2]) / lengths[1::2]
           - 1 / (2 * beta)) ** 2
    log_odds = (mean_c - mean_r) - (torch.log1p(-mean_c.exp()) - torch.log1p(-mean_r.exp()))
    expected = {
        "sigmoid": -F.logsigmoid(beta * delta), "hinge": torch.relu(1 - beta * delta), "ipo": ipo,
        "simpo": -F.logsigmoid(beta * (mean_c - mean_r) - gamma), "orpo": -beta * F.logsigmoid(log_odds),
    }
    for kind, want in expected.items():
        losses, chosen, rejected = PreferenceObjective(kind, beta, gamma).pair_losses(sums, lengths, reference)
        torch.testing.assert_close(losses, want, rtol=1e-6, atol=1e-6, msg=kind)
        if kind in ("orpo", "simpo"):
            torch.testing.assert_close(chosen, beta * mean_c)
        else:
            torch.testing.assert_close(chosen - rejected, beta * delta)


def test_orpos_nll_predicts_every_chosen_token_but_each_sequences_first():
    """As TRL's ORPOTrainer: the NLL term covers the chosen sequences' prompts and answers, never the rejected ones,
    and never a sequence's first token (nothing predicts it)."""
    from qlorakit.preference import scored_chosen

    sequences = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, -1, -1]])
    assert scored_chosen(sequences).tolist() == [[False, True, True, False, False, False, True, True, True, False,
                                                  False, False]]


def test_a_reference_loss_without_reference_log_probabilities_is_refused():
    with pytest.raises(qlorakit.TrainingError, match="reference log-probabilities"):
        PreferenceObjective("sigmoid").pair_losses(torch.zeros(2), torch.ones(2), None)


# ---------------------------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory, tiny_model_dir, pairs_file):
    return _run(tiny_model_dir, pairs_file, tmp_path_factory.mktemp("dpo") / "run", max_steps=8, save_every=4)


def test_first_step_loss_is_log_two_and_the_preference_is_learned(sigmoid_run):
    """Fresh adapters add nothing, so the policy is its reference at step 1: every pair's DPO loss is -log σ(0) =
    ln 2 (1e-5). Then the chosen answers' rewards rise above the rejected ones'."""
    steps = [r for r in sigmoid_run.metrics if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert steps[-1]["loss"] < 0.6 * math.log(2)
    assert steps[-1]["reward_accuracy"] >= 0.75 and steps[-1]["reward_margin"] > 0.1
    for key in ("rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected", "tokens_per_s", "lr"):
        assert all(math.isfinite(r[key]) for r in steps), key


def test_the_run_writes_its_files_and_a_card_that_says_dpo(sigmoid_run):
    out = sigmoid_run.output
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "qlorakit.json", "config.json",
                 "metrics.jsonl", "loss.png", REFERENCE_FILE):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "preference" and config["loss"] == "sigmoid" and config["beta"] == 0.1
    card = (out / "README.md").read_text()
    assert "qlorakit dpo" in card and "reward accuracy" in card
    assert "qlorakit train" not in card.split("## Reproduce")[1].split("## Use")[0]
    # the card's command and settings file rebuild the run's config (settings the run resolved aside)
    import yaml
    from test_model_card import _block, _parsed_command

    settings = {k: v for k, v in config.items() if k not in ("compute_dtype", "base_revision", "world_size",
                                                             "objective")}
    settings["dtype"] = config["compute_dtype"]  # `auto` pinned to what it resolved to
    assert _parsed_command(card, command="dpo", config_class=qlorakit.PreferenceConfig).to_dict() == settings
    assert qlorakit.PreferenceConfig.from_dict(yaml.safe_load(_block(card, "yaml"))).to_dict() == settings
    assert "- dpo" in card.split("---")[1]  # the Hub tag of the method
    from safetensors.torch import load_file

    reference = load_file(str(out / REFERENCE_FILE))
    assert reference["train"].shape == (16, 2) and bool((reference["train"] < 0).all())


def test_resume_continues_the_same_run(tmp_path, tiny_model_dir, pairs_file, sigmoid_run):
    """A run stopped after its step-4 checkpoint and resumed gives the uninterrupted run's losses (fp32, 1e-5):
    the same reference (read back), batches, optimizer state."""
    out = tmp_path / "run"
    _run(tiny_model_dir, pairs_file, out, max_steps=4, save_every=2)
    resumed = _run(tiny_model_dir, pairs_file, out, max_steps=8, save_every=4, resume=True)
    whole = {r["step"]: r["loss"] for r in sigmoid_run.metrics if "loss" in r}
    again = {r["step"]: r["loss"] for r in resumed.metrics if "loss" in r}
    assert sorted(again) == list(range(1, 9))
    for step in range(5, 9):
        assert again[step] == pytest.approx(whole[step], rel=1e-5), step


def test_accumulation_equals_one_big_batch(tmp_path, tiny_model_dir, pairs_file):
    """4 pairs x 2 micro-batches = 8 pairs at once: the same losses and reward metrics (fp32, 1e-5)."""
    one = _run(tiny_model_dir, pairs_file, tmp_path / "a", batch_size=8, max_steps=3)
    two = _run(tiny_model_dir, pairs_file, tmp_path / "b", batch_size=4, grad_accum=2, max_steps=3)
    for a, b in zip((r for r in one.metrics if "loss" in r), (r for r in two.metrics if "loss" in r)):
        for key in ("loss", "reward_margin", "reward_accuracy", "logps_chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("loss", ["ipo", "hinge", "orpo", "simpo"])
def test_every_loss_trains(tmp_path, tiny_model_dir, pairs_file, loss):
    run = _run(tiny_model_dir, pairs_file, tmp_path / loss, loss=loss, validation_data=str(pairs_file))
    steps = [r for r in run.metrics if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert (run.output / REFERENCE_FILE).exists() == (loss in ("ipo", "hinge"))
    assert run.eval["pairs"] == 16 and 0.0 <= run.eval["reward_accuracy"] <= 1.0
    if loss == "orpo":
        assert all(r["nll"] > 0 for r in steps)


def test_an_sft_adapter_is_its_own_reference(tmp_path, tiny_model_dir, pairs_file):
    """--adapter DIR continues an SFT adapter, and the reference is that adapter (not the bare base): the first
    step's loss is ln 2 again (1e-5), though the adapter changes the model's log-probabilities."""
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                                for r in _pairs(16)), encoding="utf-8")
    model, tokenizer = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    qlorakit.train(loaded=(model, tokenizer), data=str(sft_data), output=str(tmp_path / "sft"), rank=4, alpha=8,
                   max_steps=4, lr=1e-2, batch_size=8, log=lambda *a: None, progress=False)
    run = _run(tiny_model_dir, pairs_file, tmp_path / "dpo", adapter=str(tmp_path / "sft"), max_steps=2)
    first = next(r for r in run.metrics if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    base = _run(tiny_model_dir, pairs_file, tmp_path / "dpo-base", max_steps=1)
    assert abs(first["logps_chosen"] - next(r for r in base.metrics if "loss" in r)["logps_chosen"]) > 0.1


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_precision_matrix(tmp_path, tiny_model_dir, pairs_file, dtype, quant):
    """Every compute dtype and quantization: the adapters' dtype per the policy table, the GradScaler's loss
    scale logged exactly under fp16, finite losses."""
    run = _run(tiny_model_dir, pairs_file, tmp_path / "run", dtype=dtype, quant=quant, max_steps=2)
    assert {p.dtype for p in run.model.parameters() if p.requires_grad} == {EXPECTED_ADAPTER[dtype]}
    steps = [r for r in run.metrics if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert all(("scale" in r) == (dtype == "fp16") for r in steps)


# ---------------------------------------------------------------------------------------------- refusals


def test_sft_data_and_preference_data_are_each_refused_by_the_other_command(tmp_path, tiny_model_dir,
                                                                             pairs_file):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "w10 w11", "completion": "w12"}) + "\n", encoding="utf-8")
    with pytest.raises(qlorakit.DataError, match="needs pairs.*qlorakit train"):
        qlorakit.train_preference(data=str(sft), output=str(tmp_path / "a"), log=lambda *a: None)
    with pytest.raises(qlorakit.DataError, match="preference pairs.*qlorakit dpo"):
        qlorakit.train(data=str(pairs_file), output=str(tmp_path / "b"), log=lambda *a: None)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


@pytest.mark.parametrize("settings, message", [
    ({"train_on": "all"}, "train_on='all' does not apply to preference training"),
    ({"streaming": True}, "streaming=True does not apply"),
    ({"format": "chat"}, "format='chat': preference training reads pairs"),
    ({"beta": 0.0}, "beta=0.0 must be a positive finite number"),
    ({"beta": float("nan")}, "beta=nan"),
    ({"loss": "kto"}, "loss='kto' is not a preference loss"),
    ({"simpo_gamma": -1.0}, "simpo_gamma=-1.0"),
    ({"simpo_gamma": 1.0}, "simpo_gamma=1.0 is SimPO's margin, and loss='sigmoid' has none"),
])
def test_settings_that_do_not_fit_are_refused(settings, message):
    with pytest.raises(qlorakit.ConfigError, match=message.replace("(", "\\(")):
        qlorakit.PreferenceConfig.build(None, **settings)


def test_a_dpo_run_is_not_resumed_by_train_and_the_reverse(tmp_path, sigmoid_run, pairs_file):
    with pytest.raises(qlorakit.TrainingError, match="preference training run \\(qlorakit dpo\\).*qlorakit dpo --resume"):
        qlorakit.train(data=str(pairs_file), output=str(sigmoid_run.output), resume=True, log=lambda *a: None)


def test_a_train_config_is_refused_by_train_preference():
    with pytest.raises(qlorakit.ConfigError, match="TrainConfig is the settings of `qlorakit train`"):
        qlorakit.train_preference(qlorakit.TrainConfig(data="x.jsonl"), log=lambda *a: None)


# ---------------------------------------------------------------------------------------------- the command


def test_dpo_command_trains_and_eval_measures_the_preference(tmp_path, tiny_model_dir, pairs_file, capsys):
    """`qlorakit dpo` writes a run; `qlorakit eval` on pairs reports how often the model prefers the chosen answer:
    the same share the run's own scoring gives (preference_accuracy), higher after tuning than before."""
    from qlorakit.cli import main
    from qlorakit.data import load_data, pad_id_of
    from qlorakit.evaluate import preference_accuracy

    out = tmp_path / "run"
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output", str(out),
                 "--rank", "4", "--alpha", "8", "--batch-size", "4", "--lr", "2e-2", "--max-steps", "8",
                 "--schedule", "constant", "--warmup-steps", "0", "--max-length", "64", "--dtype", "fp32",
                 "--quiet"]) == 0
    assert "reference_logps.safetensors beside it" in capsys.readouterr().out
    assert main(["eval", "--adapter", str(out), "--data", str(pairs_file), "--device", "cpu", "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    model, tokenizer = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    pairs = load_data(str(pairs_file), tokenizer, max_length=1024).train
    before = preference_accuracy(model, pairs, pad_id_of(tokenizer))
    after = preference_accuracy(qlorakit.load_adapter(model, out), pairs, pad_id_of(tokenizer))
    assert result["pairs"] == 16 and result["preference_accuracy"] == pytest.approx(after["accuracy"])
    assert after["accuracy"] > before["accuracy"] and after["logp_margin"] > before["logp_margin"]
    with pytest.raises(SystemExit):
        main(["dpo", "--train-on", "all"])  # not a flag of dpo
    assert main(["eval", "--adapter", str(out), "--data", str(pairs_file), "--device", "cpu", "--output",
                 str(tmp_path / "answers.jsonl")]) == 2
    assert "preference pairs, which have no answers" in capsys.readouterr().err
    assert not (tmp_path / "answers.jsonl").exists()


def test_a_resume_without_its_reference_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, pairs_file,
                                                                          monkeypatch):
    out = tmp_path / "run"
    _run(tiny_model_dir, pairs_file, out, max_steps=2, save_every=1)
    (out / REFERENCE_FILE).unlink()
    import sys

    monkeypatch.setattr(sys.modules["qlorakit.train"], "load", lambda *a, **k: pytest.fail("the model was loaded"))
    settings = json.loads((out / "config.json").read_text())
    settings = {k: v for k, v in settings.items() if k in qlorakit.PreferenceConfig().to_dict()} | {
        "resume": True, "max_steps": 4}
    with pytest.raises(qlorakit.TrainingError, match="reference_logps.safetensors is missing"):
        qlorakit.train_preference(log=lambda *a: None, progress=False, **settings)
    (out / REFERENCE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(qlorakit.TrainingError, match="reference_logps.safetensors: cannot be read"):
        qlorakit.train_preference(log=lambda *a: None, progress=False, **settings)


@pytest.mark.parametrize("config", [123, {"loss": "ipo"}])
def test_a_config_of_another_type_is_a_clear_error(config):
    with pytest.raises(qlorakit.ConfigError, match="pass a PreferenceConfig, the path of a YAML config file, or None"):
        qlorakit.train_preference(config, log=lambda *a: None)


def test_the_demo_refuses_data_settings_before_loading(monkeypatch):
    from qlorakit.cli import main

    import sys

    monkeypatch.setattr(sys.modules["qlorakit.load"], "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["dpo", "--validation", "0.1"]) == 2
    assert main(["train", "--validation-data", "x.jsonl"]) == 2


def test_eval_limit_scores_the_first_pairs(tmp_path, tiny_model_dir, pairs_file, capsys):
    from qlorakit.cli import main

    out = tmp_path / "run"
    _run(tiny_model_dir, pairs_file, out, max_steps=1)
    assert main(["eval", "--adapter", str(out), "--model", str(tiny_model_dir), "--data", str(pairs_file),
                 "--device", "cpu", "--limit", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 3
    assert main(["eval", "--adapter", str(out), "--data", str(pairs_file), "--limit", "0"]) == 2
    assert "--limit 0" in capsys.readouterr().err
