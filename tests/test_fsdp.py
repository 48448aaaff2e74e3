"""`--fsdp`: the frozen quantized base sharded across the ranks (FSDP2, one unit per decoder layer, LossOf as the
root). Two ranks of batch 4 train as one process of batch 8 (the parity of tests/test_distributed.py); the adapter
and the checkpoints hold whole tensors in a one-process run's format, so a resume works with or without --fsdp;
qlorakit's 4-bit checks and fused kernels see through the sharded and gathered weights; fp16's skipped steps agree
across ranks."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import qlorakit
from qlorakit.distributed import LossOf, Processes, shard
from qlorakit.errors import ConfigError, TrainingError
from test_distributed import ENV, LAUNCH_TIMEOUT_S, _adapter, _data, _flags, _launch, _steps, assert_same_adapter, \
    assert_same_metrics

COMMON = dict(dtype="fp32", device="cpu", rank=4, alpha=8, lr=5e-3, seed=0)


def _one_process(tiny_model_dir, data, out, **settings):
    return qlorakit.train(progress=False, log=lambda _: None, model=str(tiny_model_dir), data=str(data),
                          output=str(out), **(COMMON | settings))


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of one in this process: FSDP shards over it (DTensor weights between forwards, gathered
    plain ones inside), which is what qlorakit's checks and kernels must see through."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_sharded_4bit_layers_keep_the_policy_checks_and_the_fused_kernels(tiny_model_dir, one_rank_group,
                                                                          tiny_batch, monkeypatch):
    from qlorakit import kernels
    from qlorakit.fast_path import fast_path_report
    from qlorakit.loss import batch_loss
    from qlorakit.precision import precision_of
    from qlorakit.upstream import bitsandbytes as bnb

    model, _ = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4)
    inputs = {"input_ids": tiny_batch, "position_ids": torch.arange(tiny_batch.shape[1]).expand_as(tiny_batch)}
    with torch.no_grad():
        reference = batch_loss(model, inputs, tiny_batch)[0]
    layers_before = len(list(bnb.quantized_layers(model, "4bit")))
    calls = collections.Counter()
    for name in ("LoRAGatedMLP", "LoRASharedInput"):
        function = getattr(kernels, name)
        original = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, _o=original, _n=name, **k: calls.update([_n]) or _o(*a, **k))
    dense = bnb.FrozenLinear.dense
    monkeypatch.setattr(bnb.FrozenLinear, "dense", lambda self, c: calls.update(["dense"]) or dense(self, c))

    root = shard(model, Processes(rank=0, world=2))  # (a group of one, standing in for two ranks)
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q.weight).__name__ == "DTensor" and q.weight.dtype == torch.uint8
    assert len(list(bnb.quantized_layers(model, "4bit"))) == layers_before
    precision_of(model).check(model)  # rule 1 read through the layer's QuantState; rule 3 on the sharded codes
    assert fast_path_report(model).fully_fused
    with pytest.raises(TrainingError, match="sharded across the run's processes"):
        bnb.dequantize(q)  # a part of the codes only: never dequantized as if whole
    loss, _ = root(inputs, tiny_batch)
    loss.backward()
    assert calls["LoRAGatedMLP"] == calls["LoRASharedInput"] == 2  # each decoder layer's blocks, fused
    assert calls["dense"] >= 2 * 2 * 7  # every projection dequantized in forward and again in backward
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in trainable)
    assert sum(float(p.grad.full_tensor().abs().sum()) for p in trainable) > 0


def test_what_cannot_be_sharded_is_refused(tiny_model_dir):
    model, _ = qlorakit.load(str(tiny_model_dir), quant="int8", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4)
    with pytest.raises(ConfigError, match="LLM.int8 weights cannot be sharded.*use DDP"):
        shard(model, Processes(rank=0, world=2))
    with pytest.raises(ConfigError, match="this run has one.*--nproc-per-node"):
        shard(model, Processes())


def test_fsdp_on_one_process_is_refused_before_the_model_loads(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "w5", "completion": "w6"}\n')
    with pytest.raises(ConfigError, match="this run has one.*--nproc-per-node"):  # (the model does not exist)
        qlorakit.train(model=str(tmp_path / "no-model"), data=str(data), output=str(tmp_path / "out"), fsdp=True,
                       device="cpu", progress=False, log=lambda _: None)


def test_fsdp_trains_as_one_process_of_the_global_batch(tiny_model_dir, tmp_path):
    """Two ranks of 4 with --fsdp against one process of 8: gradient accumulation (reduced on the last micro-batch
    only), gradient checkpointing, and an evaluation every step through the sharded model, of one held-out example
    (rank 0's share is empty: it runs a placeholder forward, as the sharded model's gathers need). The adapter: the same
    files, keys, dtypes and config as the one-process run's, within the parity tolerance; it loads back with
    qlorakit.load + load_adapter and gives the one-process adapter's logits."""
    data = _data(tmp_path / "train.jsonl", 22)
    settings = dict(max_steps=2, grad_accum=2, validation=0.04, eval_every=1)
    _one_process(tiny_model_dir, data, tmp_path / "one", batch_size=8, **settings)
    _launch(2, *_flags(tiny_model_dir, data, tmp_path / "two", batch_size=4, fsdp=True, gradient_checkpointing=True,
                       **settings))
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert {k: (v.dtype, v.shape) for k, v in one.items()} == {k: (v.dtype, v.shape) for k, v in two.items()}
    assert_same_adapter(one, two)
    assert_same_metrics(_steps(tmp_path / "one"), _steps(tmp_path / "two"))
    assert sum("eval_loss" in r for r in _steps(tmp_path / "two")) == 2
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    configs = [json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("one", "two")]
    for config in configs:  # (PEFT writes the set of targets in the process's hash order)
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["fsdp"] is True and saved["world_size"] == 2

    x = torch.arange(10, 42).unsqueeze(0)
    logits = {}
    for name in ("one", "two"):
        model, _ = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
        model = qlorakit.load_adapter(model, str(tmp_path / name))
        with torch.no_grad():
            logits[name] = model(input_ids=x).logits
    base, _ = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
    with torch.no_grad():
        untrained = base(input_ids=x).logits
    assert float((logits["one"] - logits["two"]).norm() / logits["one"].norm()) <= 1e-5
    assert float((logits["one"] - untrained).norm() / untrained.norm()) > 1e-3  # the adapter changes them


def test_a_sharded_run_resumes_with_or_without_fsdp(tiny_model_dir, tmp_path):
    """Checkpoints hold whole tensors in a one-process run's format: an --fsdp run resumes with --fsdp to its
    uninterrupted adapter bit for bit, and on one process of the same global batch within the parity tolerance;
    a one-process run's checkpoint resumes with --fsdp."""
    data = _data(tmp_path / "train.jsonl", 22)
    settings = dict(max_steps=4, save_every=2)
    sharded = tmp_path / "sharded"
    _launch(2, *_flags(tiny_model_dir, data, sharded, batch_size=4, fsdp=True, **settings))
    finished = _adapter(sharded)
    sharded_checkpoint = _checkpoint(sharded)

    def forget_the_adapter(run):  # as if the job had died after step 2's checkpoint
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (run / name).unlink()

    forget_the_adapter(sharded)
    _launch(2, *_flags(tiny_model_dir, data, sharded, batch_size=4, fsdp=True, resume=True, **settings))
    resumed = _adapter(sharded)
    for name in finished:
        assert torch.equal(finished[name], resumed[name]), name
    assert [r["step"] for r in _steps(sharded) if "loss" in r] == [1, 2, 3, 4]

    forget_the_adapter(sharded)
    _one_process(tiny_model_dir, data, sharded, batch_size=8, resume=True, **settings)
    assert_same_adapter(finished, _adapter(sharded))

    single = tmp_path / "single"
    _one_process(tiny_model_dir, data, single, batch_size=8, **settings)
    assert_same_adapter(_adapter(single), finished)
    single_checkpoint = _checkpoint(single)
    # the one-process format: the optimizer's state numbered (not named by parameter), the same tensors, whole
    assert sharded_checkpoint["optimizer"] == single_checkpoint["optimizer"]
    for part in ("adapter", "tensors"):
        assert ({k: v.shape for k, v in sharded_checkpoint[part].items() if not k.startswith("rank1.")}
                == {k: v.shape for k, v in single_checkpoint[part].items()})
    forget_the_adapter(single)
    _launch(2, *_flags(tiny_model_dir, data, single, batch_size=4, fsdp=True, resume=True, **settings))
    assert_same_adapter(finished, _adapter(single))


def _checkpoint(run) -> dict:
    path = run / "checkpoints" / "step-000002"
    return {"optimizer": json.loads((path / "state.json").read_text())["optimizer"],
            "adapter": load_file(path / "adapter.safetensors"), "tensors": load_file(path / "state.safetensors")}


FP16_SKIP = r'''
import json, sys, torch
import qlorakit
from qlorakit.distributed import join_run
from qlorakit.train import TrainStep

processes = join_run("cpu")
model, _ = qlorakit.load(sys.argv[1], dtype="fp16", device="cpu")
model = qlorakit.add_lora(model, rank=4)
step = TrainStep(model, lr=1e-2, processes=processes, fsdp=True)
unscale = step.scaler.unscale_

def overflow_on_rank_1(optimizer):  # an inf in rank 1's part of one gradient, after the reduce-scatter
    if processes.rank == 1:
        step.params[3].grad.to_local().view(-1)[0] = float("inf")
    return unscale(optimizer)

step.scaler.unscale_ = overflow_on_rank_1
before = [p.full_tensor().clone() for p in step.params]
result = step(torch.arange(4, 36).repeat(2, 1).chunk(2)[processes.rank])
unchanged = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, step.params))
with open(f"{sys.argv[2]}/rank{processes.rank}.json", "w") as f:
    json.dump([type(step.scaler).__name__, result.skipped, step.scaler.get_scale(), unchanged], f)
processes.close()
'''


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tiny_model_dir, tmp_path):
    script = tmp_path / "fp16_skip.py"
    script.write_text(FP16_SKIP)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tiny_model_dir), str(tmp_path)], env=ENV, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):  # skipped, the scale halved from 2^10, no weight moved: on both ranks
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == ["ShardedGradScaler", True, 512.0, True]


def test_the_root_is_the_loss_computation(tiny_model_dir, one_rank_group):
    model, _ = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    root = shard(model, Processes(rank=0, world=2), optimizer)
    assert isinstance(root, LossOf) and root.model is model
    sharded = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == sharded  # it follows them
