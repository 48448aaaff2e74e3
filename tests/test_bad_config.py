"""Bad settings and damaged runs: clear errors before anything trains or loads where possible, never an adapter
of NaNs, never a resume onto other data. Every case is listed, with its message, in docs/errors.md."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import qlorakit
from qlorakit.cli import main
from qlorakit.config import TrainConfig
from qlorakit.errors import ConfigError, QLoraKitError, TrainingError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
NAN, INF = float("nan"), float("inf")
# Half a kilobyte of YAML that stands for 9^9 values ("billion laughs"); each key is a setting, so no unknown-key error
# comes first, and printing any of them whole would take minutes and gigabytes
_KEYS = ["adapter", "device", "dtype", "format", "on_long", "optimizer", "output", "schedule", "model"]
ALIAS_BOMB = f"{_KEYS[0]}: &k0 [{', '.join(['lol'] * 9)}]\n" + "".join(
    f"{key}: &k{i} [{', '.join([f'*k{i - 1}'] * 9)}]\n" for i, key in enumerate(_KEYS) if i)


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _build(**kw):
    return TrainConfig.build(None, **kw)


def _lora_model(model_dir, **kw):
    model, _ = qlorakit.load(str(model_dir), quant="nf4", dtype="fp32", device="cpu")
    return qlorakit.add_lora(model, **({"rank": 2, "alpha": 4} | kw))


def _plain_model(model_dir):
    return qlorakit.load(str(model_dir), quant="nf4", dtype="fp32", device="cpu")[0]


# (case, how to provoke it (tmp_path, tiny model directory), what the message must say)
CASES = [
    ("non-finite learning rate", lambda t, m: _build(lr=NAN),
     r"^config: lr=nan must be a finite number in \(0, 1\] \(typical for LoRA: 1e-4 to 1e-3\)$"),
    ("infinite learning rate", lambda t, m: _build(lr=INF),
     r"^config: lr=inf must be a finite number in \(0, 1\] \(typical for LoRA: 1e-4 to 1e-3\)$"),
    ("learning rate above 1", lambda t, m: _build(lr=5.0),
     r"lr=5\.0 must be a finite number in \(0, 1\] \(typical for LoRA: 1e-4 to 1e-3\)"),
    ("non-finite gradient clipping norm", lambda t, m: _build(max_grad_norm=NAN),
     r"max_grad_norm=nan must be a positive finite number, or None \(None: no clipping; null in a config file\)"),
    ("non-finite LoRA alpha", lambda t, m: _build(alpha=NAN),
     r"alpha=nan must be a positive finite number \(typical: twice the rank\)"),
    ("non-finite epochs", lambda t, m: _build(epochs=INF), r"epochs=inf must be a finite number"),
    ("non-finite weight decay", lambda t, m: _build(weight_decay=NAN), r"weight_decay=nan must be a finite number"),
    ("negative weight decay", lambda t, m: _build(weight_decay=-0.1),
     r"weight_decay=-0\.1 must be a finite number, 0 or more \(typical: 0 to 0\.1\)"),
    ("weight decay that would flip the weights", lambda t, m: _build(lr=0.5, weight_decay=2.0),
     r"weight_decay=2\.0 times lr=0\.5 must be below 1: AdamW multiplies the weights by \(1 - lr \* weight_decay\)"),
    ("non-finite dropout", lambda t, m: _build(dropout=NAN), r"dropout=nan must be a finite number"),
    ("seed out of range", lambda t, m: _build(seed=-1), r"seed=-1 must be a whole number from 0 to 4294967295"),
    ("warmup longer than max_steps", lambda t, m: _build(warmup_steps=10, max_steps=5),
     r"warmup_steps=10 is longer than the run \(max_steps=5\): the learning rate would never reach lr"),
    ("warmup longer than the run's epochs",
     lambda t, m: qlorakit.train(model=str(m), data=str(_rows_file(t)), output=str(t / "run"), device="cpu",
                                 dtype="fp32", batch_size=8, warmup_steps=50, progress=False, log=lambda _: None),
     r"warmup_steps=50 is longer than the run \(6 steps\): the learning rate would never reach lr"),
    ("gradient accumulation over more than the data",
     lambda t, m: qlorakit.train(model=str(m), data=str(_rows_file(t)), output=str(t / "run"), device="cpu",
                                 dtype="fp32", batch_size=8, grad_accum=10, progress=False, log=lambda _: None),
     r"grad_accum=10 is more micro-batches than the data holds \(48 examples in batches of 8: 6\); one optimizer "
     r"step would pass over the data more than once: use grad_accum of at most 6"),
    ("validation fraction and validation file both given",
     lambda t, m: _build(validation=0.1, validation_data="held.jsonl"),
     r"validation=0\.1 and validation_data='held\.jsonl' are both given"),
    ("validation split and validation fraction both given",
     lambda t, m: _build(data="org/ds", validation_split="validation", validation=0.1),
     r"^config: validation_split='validation' and validation=0\.1 are both given; use one source of validation "
     r"data$"),
    ("validation split that is the training split", lambda t, m: _build(data="org/ds", validation_split="train"),
     r"^config: validation_split='train' is the split trained on \(split='train'\): its loss would not measure "
     r"anything held out; name another split$"),
    ("column mapping without a column", lambda t, m: _build(field=["messages"]),
     r"^config: field='messages' must be TARGET=COLUMN, e\.g\. messages=conversations$"),
    ("column mapping with an empty side", lambda t, m: _build(field=["messages= "]),
     r"^config: field 'messages'=' ': TARGET and COLUMN must both be non-empty names"),
    ("field mapped twice", lambda t, m: TrainConfig.build(_yaml(t, "field: [prompt=question, prompt=query]\n")),
     r"run\.yaml: field: 'prompt' is mapped twice \('question' and 'query'\); map each field once$"),
    ("unknown tracker", lambda t, m: _build(report_to="tensorboard,comet"),
     r"^config: report_to='tensorboard,comet': 'comet' is not a tracker qlorakit reports to; use none, or "
     r"comma-separated names of tensorboard, wandb, mlflow$"),
    ("unknown data format in the config", lambda t, m: _build(format="xml"),
     r"format='xml' is not a data format; use one of auto, chat, instruction, prompt-completion, text"),
    ("unknown compute dtype in the config", lambda t, m: _build(dtype="fp8"),
     r"^config: dtype='fp8' is not a compute dtype; use one of auto, fp32, bf16, fp16$"),
    ("unknown merge dtype (Python API)", lambda t, m: qlorakit.merge(t / "adapter", t / "merged", dtype="auto"),
     r"^dtype='auto': a merged model is saved in one of fp32, bf16, fp16$"),
    ("string setting given a number", lambda t, m: TrainConfig.build(_yaml(t, "data: 5\n")),
     r"run\.yaml: data=5 must be a string, or null, not int"),
    ("string setting given a list", lambda t, m: TrainConfig.build(_yaml(t, "data: [a, b]\n")),
     r"run\.yaml: data=\['a', 'b'\] must be a string, or null, not list"),
    ("string setting given a mapping", lambda t, m: TrainConfig.build(_yaml(t, "model: {name: x}\n")),
     r"run\.yaml: model=\{'name': 'x'\} must be a string, not dict"),
    ("true/false setting given a string", lambda t, m: TrainConfig.build(_yaml(t, 'packing: "yes"\n')),
     r"run\.yaml: packing='yes' must be true or false, not str"),
    ("empty string setting", lambda t, m: TrainConfig.build(_yaml(t, 'output: ""\n')),
     r"run\.yaml: output='' must not be empty"),
    ("targets of the wrong type", lambda t, m: TrainConfig.build(_yaml(t, "targets: [q_proj, 7]\n")),
     r"run\.yaml: targets=\['q_proj', 7\]: use 'all-linear' or module names"),
    ("YAML alias bomb", lambda t, m: _within_1gb(lambda: TrainConfig.build(_yaml(t, ALIAS_BOMB))),
     r"run\.yaml: the YAML's aliases expand to 490,329,064 values \(at most 10,000\)"),
    ("YAML alias that contains itself", lambda t, m: TrainConfig.build(_yaml(t, "targets: &a [q_proj, *a]\n")),
     r"run\.yaml: a YAML alias refers to itself"),
    ("YAML nested too deeply", lambda t, m: TrainConfig.build(_yaml(t, "data: " + "[" * 50_000)),
     r"run\.yaml: values nested too deeply; a config is a flat mapping of settings"),
    ("config file too big", lambda t, m: TrainConfig.build(_yaml(t, "# padding\n" * 200_000)),
     r"run\.yaml: 2,000,000 bytes is far too big for a config file \(at most 1,048,576\)"),
    ("config file not UTF-8", lambda t, m: TrainConfig.build(_write_bytes(t / "run.yaml", b"lr: 1e-4\n\xff\xfe")),
     r"run\.yaml: not a UTF-8 text file \(byte 9\)"),
    ("key given twice in the YAML", lambda t, m: TrainConfig.build(_yaml(t, "lr: 1e-4\nrank: 4\nlr: 1e-2\n")),
     r"run\.yaml line 3: key 'lr' is given twice \(first on line 1\); YAML would silently keep only the last"),
    ("LoRA alpha not finite (Python API)", lambda t, m: qlorakit.add_lora(_plain_model(m), alpha=INF),
     r"alpha=inf must be a positive finite number \(typical: twice the rank\)"),
    ("TrainStep learning rate not finite (Python API)", lambda t, m: qlorakit.TrainStep(_lora_model(m), lr=NAN),
     r"^lr=nan must be a finite number in \[0, 1\] \(typical for LoRA: 1e-4 to 1e-3\)$"),
    ("TrainStep clipping norm not finite (Python API)",
     lambda t, m: qlorakit.TrainStep(_lora_model(m), max_grad_norm=NAN),
     r"^max_grad_norm=nan must be a positive finite number, or None \(None: no clipping; null in a config file\)$"),
    ("LoRA rank above every targeted layer's width", lambda t, m: _within_1gb(lambda: _lora_model(m, rank=10**7)),
     r"rank=10000000 is more than the full rank of every targeted layer \(.*at most 64 here\); use a rank of at "
     r"most 64"),
    ("target that matches no layer", lambda t, m: _lora_model(m, targets="q_proj,foo_proj"),
     r"targets: 'foo_proj' matches no layer of this model; its linear layers are named: down_proj, gate_proj, "
     r"k_proj, lm_head, o_proj, q_proj, up_proj, v_proj \(or use 'all-linear'\)"),
    ("target that is not a linear layer", lambda t, m: _lora_model(m, targets="q_proj,self_attn"),
     r"targets: 'self_attn' names LlamaAttention modules \(model\.layers\.0\.self_attn, \.\.\.\), not linear layers"),
    ("target on the embeddings", lambda t, m: _lora_model(m, targets="embed_tokens"),
     r"targets: 'embed_tokens' names Embedding modules \(model\.embed_tokens\), not linear layers; LoRA goes on "
     r"linear layers"),
    ("unreadable run settings on resume", lambda t, m: _resume_with_broken_config(t),
     r"config\.json: the run's saved settings cannot be read \(.*\), so --resume cannot check"),
]
# Cases provoked by whole runs below (named here so the documentation check covers them too)
RUN_CASES = ["resume with changed data", "no intact checkpoint to resume from", "damaged newest checkpoint",
             "non-finite adapter weights", "non-finite adapter weights under fp16"]


def _within_1gb(fn):
    """fn() with at most 1 GiB more address space: a regression (a YAML bomb expanded, adapters of rank ten
    million allocated) fails with MemoryError instead of taking the machine's memory."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        in_use = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = in_use + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        return fn()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _rows(n=48):
    return [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 3 + j) % 200 + 10}" for j in range(6))},
                          {"role": "assistant", "content": "w100 w150 w200"}]} for i in range(n)]


def _rows_file(tmp_path, rows=None):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows or _rows())))
    return path


def _resume_with_broken_config(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    (run / "config.json").write_text('{"model": "x", "da')
    return qlorakit.train(output=str(run), resume=True, data=str(_rows_file(tmp_path)))


@pytest.mark.parametrize("case,provoke,message", CASES, ids=[c[0] for c in CASES])
def test_bad_setting_is_a_clear_error(tmp_path, tiny_model_dir, case, provoke, message):
    started = time.perf_counter()
    with pytest.raises(QLoraKitError) as e:
        provoke(tmp_path, tiny_model_dir)
    assert re.search(message, str(e.value)), str(e.value)
    assert len(str(e.value)) < 600  # values are shortened in messages, however big
    assert time.perf_counter() - started < 30


def test_cli_refuses_non_finite_flags_before_anything_is_written(tmp_path, capsys):
    for flag, value in (("--lr", "inf"), ("--max-grad-norm", "nan"), ("--alpha", "nan"), ("--epochs", "nan"),
                        ("--weight-decay", "nan"), ("--dropout", "nan"), ("--validation", "nan")):
        code = main(["train", "--data", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "out"), flag, value])
        assert code == 2, flag
        key = flag[2:].replace("-", "_")
        assert re.search(rf"qlorakit: error: config: {key}=(nan|inf) must be a (positive )?finite number",
                         capsys.readouterr().err), flag
    assert not (tmp_path / "out").exists()


def test_a_config_object_changed_in_python_is_checked(tmp_path):
    config = TrainConfig(output=str(tmp_path / "out"), data="x.jsonl")
    config.lr = NAN
    with pytest.raises(ConfigError, match=r"lr=nan must be a finite number"):
        qlorakit.train(config)


def test_targets_that_all_match_linear_layers_are_accepted(tiny_model_dir):
    model = _lora_model(tiny_model_dir, targets="q_proj, lm_head")
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"q_proj", "lm_head"}


# ---------------------------------------------------------------------------------------------- whole runs


def _train(model_dir, data, output, **kw):
    settings = dict(model=str(model_dir), data=str(data), output=str(output), dtype="fp32", device="cpu", rank=4,
                    alpha=8, lr=5e-3, batch_size=2, max_steps=3, save_every=1, seed=0)
    return qlorakit.train(progress=False, **({"log": lambda _: None} | settings | kw))


def _adapter(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def test_resume_refuses_changed_data_and_continues_on_the_same(tiny_model_dir, tmp_path):
    data = _rows_file(tmp_path)
    _train(tiny_model_dir, data, tmp_path / "cut", max_steps=2)  # checkpoint at step 1 (step 2 is the last)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-000001" / "state.json").read_text())
    assert state["data"]["train"]["examples"] == 48 and len(state["data"]["train"]["sha256"]) == 64

    rows = _rows()
    rows[5]["messages"][1]["content"] = "w100 w150 w201"  # one answer edited: same counts, other ids
    _rows_file(tmp_path, rows)
    with pytest.raises(TrainingError, match=r"cut: --resume with different data than .*step-000001 was trained on: "
                       r"the 48 training examples have as many tokens as before but different token ids, labels"):
        _train(tiny_model_dir, data, tmp_path / "cut", resume=True)
    _rows_file(tmp_path, rows[:47])  # one row gone
    with pytest.raises(TrainingError, match=r"the training data now gives 47 examples; the run was started on 48\. "
                       r"A resumed run must see the same data: restore .*train\.jsonl, or start a new run"):
        _train(tiny_model_dir, data, tmp_path / "cut", resume=True)

    # The data as it was: the run continues, here lengthened to 3 steps, to what a 3-step run gives (the
    # resumed steps follow the 3-step schedule, not the learning rate the 2-step run's optimizer saved).
    _rows_file(tmp_path)
    logged = []
    _train(tiny_model_dir, data, tmp_path / "cut", resume=True, log=logged.append)
    assert any(re.search(r"resumed from .*step-000001 \(step 1 of 3\)", line) for line in logged), logged
    _train(tiny_model_dir, data, tmp_path / "full")
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_resume_passes_over_a_damaged_newest_checkpoint(tiny_model_dir, tmp_path):
    data = _rows_file(tmp_path)
    _train(tiny_model_dir, data, tmp_path / "cut")  # checkpoints at steps 1 and 2
    checkpoints = tmp_path / "cut" / "checkpoints"
    step1 = load_file(checkpoints / "step-000001" / "adapter.safetensors")
    newest = checkpoints / "step-000002" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short
    logged = []
    run = _train(tiny_model_dir, data, tmp_path / "cut", max_steps=2, save_every=0, resume=True, log=logged.append)
    assert any(re.search(r"warning: .*step-000002: checkpoint cannot be read \(.*\); resuming from an older "
                         r"checkpoint", line) for line in logged), logged
    assert any("resumed from" in line and "step-000001 (step 1 of 2)" in line for line in logged), logged
    assert [r["step"] for r in run.metrics if "loss" in r] == [1, 2]  # step 2 trained again, logged once
    step1 = {name.replace(".default", ""): value for name, value in step1.items()}  # PEFT's saved names
    trained = _adapter(tmp_path / "cut")
    assert step1.keys() == trained.keys() and any(not torch.equal(step1[n], trained[n]) for n in trained)

    for state in checkpoints.glob("step-*/state.json"):
        state.write_text(state.read_text()[:40])  # every checkpoint damaged
    with pytest.raises(TrainingError, match=r"checkpoints: no intact checkpoint to resume from \(2 damaged: .*step-0000"
                       r"02: checkpoint cannot be read .*; start the run again without --resume"):
        _train(tiny_model_dir, data, tmp_path / "cut", resume=True)


def _nan_weights_after_step(bad_step):
    """Make a LoRA B matrix NaN right after optimizer step `bad_step` (the loss of that step was finite)."""
    calls = {"n": 0}

    def hook(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == bad_step:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][1].fill_(NAN)

    return register_optimizer_step_post_hook(hook)


def test_non_finite_weights_are_never_written(tiny_model_dir, tmp_path):
    data = _rows_file(tmp_path)
    handle = _nan_weights_after_step(2)
    try:
        with pytest.raises(TrainingError) as e:
            _train(tiny_model_dir, data, tmp_path / "ckpt", max_steps=4)
        handle.remove()
        assert re.search(r"^step 2: the trainable parameter .*lora_B.* holds NaN or infinite values, so the "
                         r"checkpoint was not written; the last good checkpoint is .*step-000001\. Lower the "
                         r"learning rate \(lr=0\.005\)", str(e.value)), str(e.value)
        assert sorted(p.name for p in (tmp_path / "ckpt" / "checkpoints").iterdir()) == ["step-000001"]

        handle = _nan_weights_after_step(2)
        with pytest.raises(TrainingError, match=r"^step 2: .* so the adapter was not written; no checkpoint was "
                           r"written"):
            _train(tiny_model_dir, data, tmp_path / "final", max_steps=2, save_every=0)
        assert not (tmp_path / "final" / "adapter_model.safetensors").exists()
    finally:
        handle.remove()


def test_non_finite_weights_under_fp16_stop_the_run(tiny_model_dir, tmp_path):
    """fp16's GradScaler skips steps with inf/NaN gradients; NaN weights would make it skip every step to the end
    and write the NaNs, so a skipped step checks the weights."""
    data = _rows_file(tmp_path)
    handle = _nan_weights_after_step(1)
    try:
        with pytest.raises(TrainingError, match=r"^step 2: the trainable parameter .*lora_B.* holds NaN or infinite "
                           r"values under .*fp16.*, so every further step would be skipped.*; no checkpoint was "
                           r"written"):
            _train(tiny_model_dir, data, tmp_path / "out", dtype="fp16", max_steps=4, save_every=0)
    finally:
        handle.remove()
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_every_case_is_documented():
    docs = DOCS.read_text()
    assert "## settings and runs" in docs
    for case in [c[0] for c in CASES] + RUN_CASES:
        assert f"| {case} |" in docs, case
