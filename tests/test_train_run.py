"""The training run: accumulation, schedules, outputs, checkpoints, resume after SIGKILL, non-finite losses."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlorakit
from conftest import randomize_lora_b
from qlorakit.errors import ConfigError, TrainingError
from qlorakit.optim import make_scheduler


def _rows(n=48):
    # varied prompts, one fixed answer: learnable in a few steps, so losses fall on held-out rows too
    return [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 3 + j) % 200 + 10}" for j in range(6))},
                          {"role": "assistant", "content": "w100 w150 w200"}]} for i in range(n)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return path


def _train(model_dir, data_file, output, log=lambda _: None, **kw):
    settings = dict(model=str(model_dir), data=str(data_file), output=str(output), dtype="fp32", device="cpu",
                    rank=4, alpha=8, lr=5e-3, batch_size=4, max_steps=6, seed=0)
    return qlorakit.train(progress=False, log=log, **(settings | kw))


def _adapter(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def test_run_writes_peft_adapter_config_metrics_and_curve(tiny_model_dir, data_file, tmp_path):
    run = _train(tiny_model_dir, data_file, tmp_path / "out", validation=0.25, eval_every=2)
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "metrics.jsonl", "loss.png",
                 "qlorakit.json"):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 5e-3 and config["max_steps"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert steps[-1]["loss"] < steps[0]["loss"] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(r["trained_tokens"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    assert run.eval["loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the adapter loads back onto the base and gives the trained model's logits
    model, tokenizer = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
    reloaded = qlorakit.adapters.load_adapter(model, out)
    ids = torch.tensor([[5, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, run.model(input_ids=ids).logits)


def test_gradient_accumulation_equals_one_large_batch(tiny_model_dir, data_file, tmp_path):
    """4 examples in one micro-batch, or 2 x 2 accumulated: the same step, because both divide by the trained
    tokens of the whole step (not by per-micro-batch means)."""
    one = _train(tiny_model_dir, data_file, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=3)
    two = _train(tiny_model_dir, data_file, tmp_path / "b", batch_size=2, grad_accum=2, max_steps=3)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    # Measured: at most 1.5e-6 apart after 3 steps (summation order). Averaging per micro-batch instead moves
    # weights by a good part of the learning rate (5e-3).
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-5, msg=name)
    assert one.final_loss == pytest.approx(two.final_loss, rel=1e-5)


def test_schedules():
    def lrs(schedule):
        o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        s = make_scheduler(o, schedule, warmup_steps=2, total_steps=10)
        values = []
        for _ in range(10):
            values.append(o.param_groups[0]["lr"])
            o.step()
            s.step()
        return values

    cosine, linear, constant = lrs("cosine"), lrs("linear"), lrs("constant")
    assert cosine[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and linear[:3] == cosine[:3]
    assert cosine[2] > cosine[5] > cosine[9] > 0
    assert linear[2:] == pytest.approx([1 - k / 8 for k in range(8)])
    assert cosine[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert constant[2:] == [1.0] * 8


def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir, data_file, tmp_path):
    _train(tiny_model_dir, data_file, tmp_path / "a", max_steps=2)
    _train(tiny_model_dir, data_file, tmp_path / "b", max_steps=2, gradient_checkpointing=True)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_offloaded_checkpointing_moves_each_layer_input_and_keeps_the_gradients(tiny_model_dir, tiny_batch,
                                                                                monkeypatch):
    """With offload, what checkpointing keeps per layer (its input) goes through torch's save_on_cpu, and nothing
    else does; loss and LoRA gradients are those of a run without checkpointing. (On a CUDA device the copies go
    to pinned CPU memory; here the mechanism runs CPU to CPU.)"""
    import transformers.modeling_utils as modeling_utils
    from torch.autograd.graph import save_on_cpu

    from qlorakit.upstream.transformers import enable_checkpointing

    offloaded = []

    class CountingSaveOnCpu(save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory=False, device_type=device_type)  # no pinned memory without an accelerator
            pack = self.pack_hook
            self.pack_hook = lambda t: offloaded.append(tuple(t.shape)) or pack(t)

    monkeypatch.setattr(modeling_utils, "save_on_cpu", CountingSaveOnCpu)
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
        model = randomize_lora_b(qlorakit.add_lora(model, rank=4, alpha=8), std=0.05)
        if offload:
            enable_checkpointing(model, offload=True)
        model.train()
        loss_sum, tokens = qlorakit.causal_lm_loss(model(input_ids=tiny_batch, use_cache=False).logits, tiny_batch)
        (loss_sum / tokens).backward()
        results.append((float(loss_sum.detach() / tokens),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert offloaded == [(*tiny_batch.shape, hidden)] * layers
    (plain_loss, plain_grads), (offload_loss, offload_grads) = results
    assert offload_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == offload_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(offload_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_offload_activations_is_refused_off_cuda(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match="offload_activations=true .* this run is on cpu"):
        _train(tiny_model_dir, data_file, tmp_path / "out", offload_activations=True)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_checkpoints_are_pruned_to_keep_last(tiny_model_dir, data_file, tmp_path):
    _train(tiny_model_dir, data_file, tmp_path / "out", max_steps=7, save_every=2, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["step"] == 6 and state["position"] == {"epoch": 0, "micro": 6}


def test_resume_in_process_matches_uninterrupted(tiny_model_dir, data_file, tmp_path):
    _train(tiny_model_dir, data_file, tmp_path / "full", max_steps=8, dropout=0.1)
    _train(tiny_model_dir, data_file, tmp_path / "cut", max_steps=8, dropout=0.1, save_every=3)
    # forget everything after step 6, as if the process had died there
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (tmp_path / "cut" / name).unlink()
    _train(tiny_model_dir, data_file, tmp_path / "cut", max_steps=8, dropout=0.1, save_every=3, resume=True)
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    for name in full:  # dropout included: the RNG state is part of the checkpoint
        assert torch.equal(full[name], resumed[name]), name


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tiny_model_dir, data_file, tmp_path):
    """Kill -9 the training process after its first checkpoint, resume, and compare with a run never killed."""
    args = [sys.executable, "-m", "qlorakit.cli", "train", "--model", str(tiny_model_dir), "--data", str(data_file),
            "--dtype", "fp32", "--device", "cpu", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--batch-size",
            "2", "--epochs", "6", "--save-every", "4", "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--output", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    proc = subprocess.Popen(args + ["--output", str(tmp_path / "cut")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "cut" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()

    subprocess.run(args + ["--output", str(tmp_path / "cut"), "--resume"], check=True, env=env, capture_output=True)
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 145))  # 48 examples / 2 a step x 6 epochs, each step logged once


def _nan_at_step(model, bad_step):
    """Make the final hidden states NaN in the forward of optimizer step `bad_step` (one micro-batch per step)."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == bad_step else output

    model.model.norm.register_forward_hook(hook)


def test_non_finite_loss_stops_before_the_update_with_the_checkpoint_named(tiny_model_dir, data_file, tmp_path):
    loaded = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
    _nan_at_step(loaded[0], 5)
    with pytest.raises(TrainingError) as e:
        _train(tiny_model_dir, data_file, tmp_path / "out", max_steps=8, save_every=2, loaded=loaded)
    message = str(e.value)
    assert "step 5: non-finite loss" in message and "weights were not updated" in message
    assert str(tmp_path / "out" / "checkpoints" / "step-000004") in message
    saved = load_file(tmp_path / "out" / "checkpoints" / "step-000004" / "adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_non_finite_loss_under_fp16_is_a_skipped_step(tiny_model_dir, data_file, tmp_path):
    loaded = qlorakit.load(str(tiny_model_dir), dtype="fp16", device="cpu")
    _nan_at_step(loaded[0], 3)
    run = _train(tiny_model_dir, data_file, tmp_path / "out", dtype="fp16", max_steps=5, loaded=loaded)
    skipped = [r["skipped"] for r in run.metrics if "loss" in r]
    assert skipped == [False, False, True, False, False]
    assert all(torch.isfinite(v).all() for v in _adapter(tmp_path / "out").values())


def test_running_out_of_memory_in_a_step_is_said_with_what_to_lower(tiny_model_dir, data_file, tmp_path,
                                                                     monkeypatch):
    """torch's CPU allocator failing (a RuntimeError) in step 2's passes: a TrainingError naming the step, the
    micro-batch, what to lower and the last checkpoint — not a traceback. Any other RuntimeError stays itself."""
    from qlorakit.train import TrainStep

    real = TrainStep.run
    calls = []

    def failing(self, batches):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 359106555025 bytes.")
        return real(self, batches)

    monkeypatch.setattr(TrainStep, "run", failing)
    with pytest.raises(qlorakit.TrainingError, match=r"^step 2: out of memory \(.*can't allocate memory.*\); a "
                       r"micro-batch of 4 examples does not fit here: lower --batch-size \(raise --grad-accum to "
                       r"keep the step's size\), shorten --max-length or turn on --gradient-checkpointing; the last "
                       r"good checkpoint is .*step-000001$"):
        _train(tiny_model_dir, data_file, tmp_path / "oom", max_steps=3, save_every=1, batch_size=4)
    calls.clear()
    monkeypatch.setattr(TrainStep, "run", lambda self, batches: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="^other$"):
        _train(tiny_model_dir, data_file, tmp_path / "other", max_steps=1)


def test_bitsandbytes_optimizers_need_cuda(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match="optimizer='adamw8bit' is bitsandbytes' 8-bit AdamW, which runs on CUDA"):
        _train(tiny_model_dir, data_file, tmp_path / "out", optimizer="adamw8bit")


def test_saving_an_adapter_asks_no_server(tiny_model_dir, tmp_path, monkeypatch):
    """The adapter of a model named by id (the default model's is a name, not a path) is saved without a network
    lookup: PEFT's save_embedding_layers="auto" asked the Hub for that name's config.json on every save."""
    import socket

    from qlorakit.config import TrainConfig
    from qlorakit.precision import precision_of
    from qlorakit.adapters import save_adapter

    model = qlorakit.add_lora(qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")[0], rank=2)
    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    out = save_adapter(model, tmp_path / "adapter", TrainConfig(model="some-org/some-model"), precision_of(model))
    assert lookups == []
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "some-org/some-model"


def test_resume_keeps_the_compute_dtype_auto_resolved_to(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """config.json records what `auto` resolved to; a resume in `auto` trains on in it even where `auto` now
    resolves otherwise (on a CPU it is measured, and can come out the other way), and an explicit other dtype is
    refused naming both."""
    import qlorakit.precision as precision

    monkeypatch.setattr(precision, "cpu_auto_dtype", lambda: torch.bfloat16)
    _train(tiny_model_dir, data_file, tmp_path / "out", dtype="auto", quant="none", max_steps=2, save_every=1)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "auto" and config["compute_dtype"] == "bf16"

    monkeypatch.setattr(precision, "cpu_auto_dtype", lambda: torch.float32)
    with pytest.raises(TrainingError, match=r"out: --resume with dtype=fp32, but the run was started in bf16 "
                                            r"\(.*out/config\.json: compute_dtype\); a resumed run keeps its compute "
                                            r"dtype: resume with dtype=bf16 \(or auto\)"):
        _train(tiny_model_dir, data_file, tmp_path / "out", dtype="fp32", quant="none", max_steps=3, save_every=1,
               resume=True)
    lines = []
    run = _train(tiny_model_dir, data_file, tmp_path / "out", dtype="auto", quant="none", max_steps=3, save_every=1,
                 resume=True, log=lines.append)
    assert any(re.fullmatch(r"dtype: auto, resumed in bf16 \(the compute dtype the run started in, as .*out/config"
                            r"\.json records\)", line) for line in lines), lines
    assert qlorakit.precision_of(run.model).compute == torch.bfloat16
    assert {v.dtype for v in _adapter(tmp_path / "out").values()} == {torch.bfloat16}  # bf16 adapters, not fp32
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["compute_dtype"] == "bf16"
    (tmp_path / "out" / "config.json").write_text(json.dumps(saved | {"compute_dtype": "fp8"}))
    with pytest.raises(TrainingError, match=r"out/config\.json: 'compute_dtype' is 'fp8', not a dtype name \(fp32, "
                                            r"bf16, fp16\); restore the file, or start a new run \(--overwrite\)"):
        _train(tiny_model_dir, data_file, tmp_path / "out", dtype="auto", quant="none", max_steps=4, resume=True)
