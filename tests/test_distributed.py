"""Training on several processes (torch.distributed, gloo on the CPU): N ranks x batch B train as one process with
batch N·B, a killed job resumes exactly, another world size only where it stays exact, a dead rank is named, two
"nodes" meet through the c10d rendezvous, and the pieces (shares, placeholders, DDP's buckets) in-process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlorakit
from qlorakit.checkpoint import check_world
from qlorakit.data.batches import MicroBatchStream, share
from qlorakit.data.tokenize import Tokenized
from qlorakit.distributed import Processes, join_run, wrap
from qlorakit.errors import ConfigError, TrainingError

# fp32 sums in another order (two ranks' gradients, two rows of 4 examples instead of one of 8), through 3 Adam steps.
# The whole adapter (the Frobenius norm of the difference over the adapter's): measured 1.5e-7 (packed) and 4.4e-7
# (padded). One tensor
# alone can differ more: Adam scales each element by 1/sqrt(v), so an element whose gradient is near zero turns a
# rounding difference into a visible one (measured up to 1.2e-5 for one 512-element tensor, from a single element).
# A real difference is far larger (measured, whole adapter: one rank given the data in another order 4.9e-3; a global
# batch of 8 where it should be 16, 5.2e-3).
PARITY_RTOL = 1e-5
PER_TENSOR_RTOL = 5e-5
LAUNCH_TIMEOUT_S = 300  # a hang fails the test instead of holding CI
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "QLORAKIT_DIST_TIMEOUT": "60"}


def _rows(n: int) -> list[dict]:
    # prompts of varied lengths: packed rows of 4 and of 8 differ, so the parity is not one of identical tensors
    return [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 3 + j) % 200 + 10}" for j in range(4 + i % 7))},
                          {"role": "assistant", "content": f"w100 w{150 + i % 3} w200"}]} for i in range(n)]


def _data(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(n)))
    return path


def _flags(model_dir, data, output, **settings) -> list[str]:
    settings = {"model": model_dir, "data": data, "output": output, "dtype": "fp32", "device": "cpu", "rank": 4,
                "alpha": 8, "lr": 5e-3, "seed": 0} | settings
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags + ["--quiet"]


def _launch(nproc: int, *flags, check=True, command="train", **kw) -> subprocess.CompletedProcess:
    """`qlorakit train --nproc-per-node N ...` (or `dpo`), the shortcut that starts torchrun."""
    done = subprocess.run([sys.executable, "-m", "qlorakit", command, "--nproc-per-node", str(nproc), *flags],
                          env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def _adapter(path) -> dict:
    return load_file(Path(path) / "adapter_model.safetensors")


def _steps(path) -> list[dict]:
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def assert_same_adapter(a: dict, b: dict):
    assert a.keys() == b.keys()
    whole = _relative(torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a]))
    assert whole <= PARITY_RTOL, whole
    worst = max((_relative(a[k], b[k]), k) for k in a)
    assert worst[0] <= PER_TENSOR_RTOL, worst
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # trained, not the zero init


def assert_same_metrics(one: list[dict], many: list[dict]):
    # the distributed run adds each rank's peak memory
    assert [sorted(r) for r in one] == [sorted(set(r) - {"peak_rss_mib_by_rank"}) for r in many]
    for a, b in zip(one, many):
        if "peak_rss_mib" in b:
            assert len(b["peak_rss_mib_by_rank"]) == 2 and b["peak_rss_mib"] == max(b["peak_rss_mib_by_rank"])
        for key in ("step", "trained_tokens", "tokens", "lr", "skipped"):
            if key in a:
                assert a[key] == b[key], (key, a, b)
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=PARITY_RTOL), (key, a, b)


@pytest.fixture(scope="module")
def one_process_runs(tiny_model_dir, tmp_path_factory):
    """The references: one process with the global batch (8), in this process."""
    root = tmp_path_factory.mktemp("one")
    runs = {}
    for name, rows, settings in (("packed", 22, dict(max_steps=3)),
                                 ("padded", 11, dict(max_steps=2, packing=False, grad_accum=2, validation=0.2))):
        data = _data(root / f"{name}.jsonl", rows)
        out = root / name
        qlorakit.train(progress=False, log=lambda _: None, model=str(tiny_model_dir), data=str(data), output=str(out),
                       dtype="fp32", device="cpu", rank=4, alpha=8, lr=5e-3, seed=0, batch_size=8, **settings)
        runs[name] = (data, out, settings)
    return runs


@pytest.fixture(scope="module")
def two_process_runs(one_process_runs, tiny_model_dir, tmp_path_factory):
    """The same runs on 2 processes of batch 4, through `qlorakit train --nproc-per-node 2`."""
    root = tmp_path_factory.mktemp("two")
    for name, (data, _, settings) in one_process_runs.items():
        _launch(2, *_flags(tiny_model_dir, data, root / name, batch_size=4, **settings))
    return {name: root / name for name in one_process_runs}


@pytest.mark.parametrize("case", ["packed", "padded"])
def test_two_ranks_of_4_train_as_one_process_of_8(case, one_process_runs, two_process_runs):
    """packed: 22 examples, 3 steps (the third's global micro-batch holds 6: 3 a rank). padded: 9 training
    examples, grad_accum 2: a step's second micro-batch holds one example, so rank 1 runs a placeholder; validation
    loss summed over both ranks' shares."""
    _, reference, _ = one_process_runs[case]
    two = two_process_runs[case]
    assert_same_adapter(_adapter(reference), _adapter(two))
    assert_same_metrics(_steps(reference), _steps(two))
    saved = json.loads((two / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["batch_size"] == 4
    # rank 0 alone wrote: one metrics line per step, no file of another rank's
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_preference_tuning_on_two_ranks_of_4_is_one_process_of_8(tiny_model_dir, tmp_path):
    """`qlorakit dpo --nproc-per-node 2`: 11 pairs, grad_accum 2 (a step's second global micro-batch holds 3 pairs:
    2 on rank 0, 1 on rank 1; the last step's, 0 and a placeholder), held-out pairs: the adapter, losses and reward
    metrics of one process with the global batch (tolerances as above). The reference log-probabilities are each
    rank's share, summed."""
    pairs = [{"prompt": " ".join(f"w{(i * 7 + j) % 200 + 10}" for j in range(3 + i % 5)),
              "chosen": f"w100 w{150 + i % 3}", "rejected": " ".join(f"w{40 + (i + j) % 9}" for j in range(1 + i % 3))}
             for i in range(14)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    settings = dict(max_steps=2, grad_accum=2, validation=0.2, lr=2e-2)
    one = tmp_path / "one"
    qlorakit.train_preference(progress=False, log=lambda _: None, model=str(tiny_model_dir), data=str(data),
                              output=str(one), dtype="fp32", device="cpu", rank=4, alpha=8, seed=0, batch_size=8,
                              **settings)
    two = tmp_path / "two"
    _launch(2, *_flags(tiny_model_dir, data, two, batch_size=4, **settings), command="dpo")
    assert_same_adapter(_adapter(one), _adapter(two))
    a_steps, b_steps = _steps(one), _steps(two)
    assert len(a_steps) == len(b_steps) == 3  # two steps and the held-out evaluation
    for a, b in zip(a_steps, b_steps):
        for key in ("loss", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected", "eval_loss",
                    "eval_reward_accuracy", "eval_reward_margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=PARITY_RTOL, abs=1e-6), (key, a, b)
    assert load_file(one / "reference_logps.safetensors")["train"].allclose(
        load_file(two / "reference_logps.safetensors")["train"], rtol=1e-5)


EVEN_WORDS = """
def even_words(prompts, completions, rows):
    # the share of a completion's words w<N> whose N is even
    return [sum(int(w[1:]) % 2 == 0 for w in c.split()) / max(len(c.split()), 1) for c in completions]
"""


def test_grpo_on_two_ranks_of_4_is_one_process_of_8(tiny_model_dir, tmp_path):
    """`qlorakit grpo --nproc-per-node 2`: each completion draws from its own seed (seed, step, row, place in the
    group), so two ranks sample what one process samples; advantages are per group (a group is on one rank), the
    loss's normalisers are summed over the ranks, the KL reference (beta > 0) is each rank's. 14 prompts, 20% held out
    (11 train: a step's second global micro-batch holds 3 prompts), grad_accum 2: the adapter, losses, rewards and
    held-out reward of one process with the global batch (tolerances as above)."""
    rows = [{"prompt": " ".join(f"w{(i * 7 + j) % 200 + 10}" for j in range(3 + i % 5)), "id": i} for i in range(14)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = tmp_path / "even.py"
    reward.write_text(EVEN_WORDS)
    settings = dict(max_steps=2, grad_accum=2, validation=0.2, lr=2e-2, reward=f"{reward}:even_words", group_size=4,
                    max_new_tokens=6, max_length=64, beta=0.05, loss="grpo")
    one = tmp_path / "one"
    qlorakit.train_grpo(progress=False, log=lambda _: None, model=str(tiny_model_dir), data=str(data),
                        output=str(one), dtype="fp32", device="cpu", rank=4, alpha=8, seed=0, batch_size=8, **settings)
    two = tmp_path / "two"
    _launch(2, *_flags(tiny_model_dir, data, two, batch_size=4, **settings), command="grpo")
    assert_same_adapter(_adapter(one), _adapter(two))
    a_steps, b_steps = _steps(one), _steps(two)
    assert len(a_steps) == len(b_steps) == 3  # two steps and the held-out evaluation
    assert a_steps[0]["reward_std"] > 0 and a_steps[0]["kl"] >= 0 and "eval_reward" in a_steps[-1]
    for a, b in zip(a_steps, b_steps):
        for key in ("completion_length", "truncated", "zero_std_groups", "trained_tokens"):
            if key in a:
                assert b[key] == a[key], (key, a, b)
        for key in ("loss", "grad_norm", "reward", "reward_std", "kl", "eval_reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=PARITY_RTOL, abs=1e-6), (key, a, b)


def test_a_distributed_run_merges_as_one_process_does(one_process_runs, two_process_runs, tmp_path):
    """The adapter files are a one-process run's (GGUF export reads them as merge does: through the same merge)."""
    _, reference, _ = one_process_runs["packed"]
    two = two_process_runs["packed"]
    configs = [json.loads((run / "adapter_config.json").read_text()) for run in (reference, two)]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])  # (PEFT writes a set, in any order)
    assert configs[0] == configs[1]
    card = (two / "README.md").read_text()  # its command says how it ran: the processes, or the global batch
    assert "qlorakit train --nproc-per-node 2 " in card and "--batch-size 4" in card
    assert "on one process with --batch-size 8, the same global batch" in card
    merged = [load_file(qlorakit.merge(run, tmp_path / name, dtype="fp32", log=lambda _: None) / "model.safetensors")
              for name, run in (("one", reference), ("two", two))]
    assert merged[0].keys() == merged[1].keys()
    for name in merged[0]:
        assert _relative(merged[0][name], merged[1][name]) <= PARITY_RTOL, name


def test_a_streamed_dataset_on_two_ranks_trains_as_on_one_process(tiny_model_dir, tmp_path):
    """--streaming: every rank reads the stream and keeps its share of each global micro-batch; the epoch ends
    where the data does (10 rows, global batch 4: micro-batches of 4, 4, 2), on one process and on two alike."""
    from test_hub_data import repo_dir

    repo = repo_dir(tmp_path / "qa")
    settings = dict(field="prompt=question", max_steps=4, streaming=True, max_length=64)
    qlorakit.train(progress=False, log=lambda _: None, model=str(tiny_model_dir), data=str(repo),
                   output=str(tmp_path / "one"), dtype="fp32", device="cpu", rank=4, alpha=8, lr=5e-3, seed=0,
                   batch_size=4, **(settings | {"field": ["prompt=question", "completion=answer"]}))
    _launch(2, *_flags(tiny_model_dir, repo, tmp_path / "two", batch_size=2, **settings),
            "--field", "completion=answer")
    assert_same_adapter(_adapter(tmp_path / "one"), _adapter(tmp_path / "two"))
    assert_same_metrics(_steps(tmp_path / "one"), _steps(tmp_path / "two"))
    assert [r["trained_tokens"] > 0 for r in _steps(tmp_path / "two")] == [True] * 4


def test_two_nodes_meet_through_the_c10d_rendezvous(one_process_runs, tiny_model_dir, tmp_path, free_port):
    """Two torchrun agents of one process each ("nodes") on localhost, joined by the c10d rendezvous, as on two
    machines: the same training as one process with their batch."""
    data, reference, settings = one_process_runs["packed"]
    node = _node(free_port, *_flags(tiny_model_dir, data, tmp_path / "two", batch_size=4, **settings))
    agents = [subprocess.Popen(node, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=LAUNCH_TIMEOUT_S) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    assert_same_adapter(_adapter(reference), _adapter(tmp_path / "two"))
    assert_same_metrics(_steps(reference), _steps(tmp_path / "two"))


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(port: int, *flags) -> list[str]:
    """One torchrun agent ("node") of one process, joining the others through the c10d rendezvous."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "qlorakit-test",
            "--module", "qlorakit", "train", *flags]


def test_ranks_started_with_other_settings_are_refused(tiny_model_dir, tmp_path, free_port):
    """Two "nodes" given different learning rates would each train their own way and DDP would average two runs
    into no one's adapter: refused, naming the setting, before the first step."""
    data = _data(tmp_path / "train.jsonl", 16)
    agents = [subprocess.Popen(_node(free_port, *_flags(tiny_model_dir, data, tmp_path / "out", batch_size=2,
                                                        max_steps=2, lr=lr)),
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for lr in (0.005, 0.001)]
    outputs = [agent.communicate(timeout=LAUNCH_TIMEOUT_S) for agent in agents]
    assert all(agent.returncode != 0 for agent in agents)
    errors = "".join(err for _, err in outputs)
    assert re.search(r"qlorakit: error \(rank 0 of 2\): rank 1 of 2 runs with lr=0\.00[15], rank 0 with "
                     r"lr=0\.00[15]: every process of a run needs the same settings and data", errors), errors[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before the first step


@LINUX_PROC
def test_a_node_whose_rank_dies_stops_the_other_node(tiny_model_dir, tmp_path, free_port):
    """Across nodes no launcher sees every rank: the surviving rank stops at its next collective, saying it lost
    contact (and naming the last good checkpoint); the dead rank's own torchrun names it. Nothing waits for the
    collective timeout."""
    data = _data(tmp_path / "train.jsonl", 48)
    out = tmp_path / "out"
    agents = [subprocess.Popen(_node(free_port, *_flags(tiny_model_dir, data, out, batch_size=2, epochs=200,
                                                        save_every=2)),
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        _kill_after_first_checkpoint(agents[0], out, victim=lambda _: next(
            pid for agent in agents for pid in [_rank_pid_or_none(agent.pid, 1)] if pid))
        killed = time.monotonic()
        outputs = [agent.communicate(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert time.monotonic() - killed < 60
    assert all(agent.returncode != 0 for agent in agents)
    errors = "".join(err for _, err in outputs)
    assert "qlorakit: error (rank 0 of 2): step" in errors and "lost contact with the run's other processes" in errors
    assert "the last good checkpoint is" in errors
    assert "rank      : 1" in errors and "SIGKILL" in errors  # the dead rank's torchrun, naming it


def _kill_after_first_checkpoint(proc: subprocess.Popen, output: Path, victim=None, sig=signal.SIGKILL) -> None:
    checkpoints = output / "checkpoints"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
        assert proc.poll() is None, "the run ended before its first checkpoint: " + proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    if victim is None:
        # The launcher, killed outright: its ranks (each in a session of its own) die with it, not train on.
        ranks = [_rank_pid(proc.pid, rank) for rank in range(2)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        while any(_running(pid) for pid in ranks):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _wait_for_the_lock(output)
    else:
        os.kill(victim(proc.pid), sig)


def _wait_for_the_lock(output: Path, seconds: float = 60) -> None:
    """Until nothing holds the run's lock (the kernel releases a killed process's lock as it tears it down); a
    holder still there after `seconds` fails the test, naming it."""
    from qlorakit.outputs import _directory_holder

    deadline = time.monotonic() + seconds
    while (holder := _directory_holder(output)) is not None:
        if time.monotonic() > deadline:
            status = Path(f"/proc/{holder}/status").read_text() if Path(f"/proc/{holder}").exists() else "gone"
            raise AssertionError(f"the run's lock is still held (marker pid {holder}: {status[:300]})")
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie holds no lock
    except OSError:
        return False


@LINUX_PROC
def test_sigkill_of_the_whole_job_then_resume_gives_the_uninterrupted_adapter(tiny_model_dir, tmp_path):
    """Two ranks with LoRA dropout (each rank's random stream matters), the launcher killed -9 after a checkpoint
    (its ranks die with it), resumed: the adapter of a run never killed, bit for bit. A resume on one process is
    refused (dropout streams)."""
    data = _data(tmp_path / "train.jsonl", 48)
    flags = dict(batch_size=2, epochs=6, save_every=4, dropout=0.1)
    _launch(2, *_flags(tiny_model_dir, data, tmp_path / "full", **flags))
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "qlorakit", "train", "--nproc-per-node", "2",
                             *_flags(tiny_model_dir, data, cut, **flags)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_after_first_checkpoint(proc, cut)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (cut / "adapter_model.safetensors").exists()

    refused = qlorakit.train
    with pytest.raises(TrainingError, match=r"started on 2 processes x batch_size 2.*1 process x batch_size 4.*"
                                            r"LoRA dropout"):
        refused(progress=False, log=lambda _: None, model=str(tiny_model_dir), data=str(data), output=str(cut),
                dtype="fp32", device="cpu", rank=4, alpha=8, lr=5e-3, seed=0, resume=True,
                **(flags | {"batch_size": 4}))

    _launch(2, *_flags(tiny_model_dir, data, cut, resume=True, **flags))
    full, resumed = _adapter(tmp_path / "full"), _adapter(cut)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    steps = [r["step"] for r in _steps(cut) if "loss" in r]
    assert steps == list(range(1, 73))  # 48 examples / 4 a step x 6 epochs, each step logged once
    state = json.loads(next((cut / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 1  # rank 1's random states beside rank 0's


def test_resume_on_another_world_size_only_with_the_same_global_batch(one_process_runs, tiny_model_dir, tmp_path):
    data, _, _ = one_process_runs["packed"]
    out = tmp_path / "run"
    _launch(2, *_flags(tiny_model_dir, data, out, batch_size=4, max_steps=4, save_every=2))
    finished = _adapter(out)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()  # as if the job had died after step 2's checkpoint

    def resume(**settings):
        return qlorakit.train(progress=False, log=lambda _: None, model=str(tiny_model_dir), data=str(data),
                              output=str(out), dtype="fp32", device="cpu", rank=4, alpha=8, lr=5e-3, seed=0,
                              max_steps=4, save_every=2, resume=True, **settings)

    with pytest.raises(TrainingError) as e:
        resume(batch_size=4)
    assert ("started on 2 processes x batch_size 4 (8 examples a micro-batch); this resume has 1 process x "
            "batch_size 4 (4)") in str(e.value)
    assert "--batch-size 4 on 2 processes or --batch-size 8 on 1 process" in str(e.value)
    resume(batch_size=8)  # the same 8 examples a micro-batch: exact
    assert_same_adapter(finished, _adapter(out))


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker torchrun started as `rank` (read from /proc: its environment says RANK)."""
    pid = _rank_pid_or_none(torchrun_pid, rank)
    if pid is None:
        raise AssertionError(f"no worker of rank {rank} under pid {torchrun_pid}")
    return pid


def _rank_pid_or_none(torchrun_pid: int, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if f"RANK={rank}".encode() in environ and _descends(ppid, torchrun_pid):
            return int(entry.name)
    return None


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return False


@LINUX_PROC
def test_a_dead_rank_stops_the_job_and_is_named(tiny_model_dir, tmp_path):
    data = _data(tmp_path / "train.jsonl", 48)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "qlorakit", "train", "--nproc-per-node", "2",
                             *_flags(tiny_model_dir, data, out, batch_size=2, epochs=200, save_every=2)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _kill_after_first_checkpoint(proc, out, victim=lambda pid: _rank_pid(pid, 1))
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - killed < 60  # the other rank stopped; nothing waited for the collective timeout
    assert proc.returncode != 0
    assert "qlorakit: error: rank 1 of 2 was killed by SIGKILL; torchrun stopped the other ranks" in stderr
    assert not (out / "adapter_model.safetensors").exists()  # no output that looks complete


def test_ctrl_c_to_the_launcher_stops_every_rank_with_exit_130(tiny_model_dir, tmp_path):
    data = _data(tmp_path / "train.jsonl", 48)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "qlorakit", "train", "--nproc-per-node", "2",
                             *_flags(tiny_model_dir, data, out, batch_size=2, epochs=200, save_every=2)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_after_first_checkpoint(proc, out, victim=lambda pid: pid, sig=signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "qlorakit: interrupted (SIGINT): torchrun stopped the ranks; continue from the last checkpoint with " \
           "--resume" in stderr
    assert "Traceback" not in stderr
    assert not (out / "adapter_model.safetensors").exists() and list((out / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------- in-process pieces


def _items(n: int) -> list[Tokenized]:
    return [Tokenized([i + 4, i + 5], [-100, i + 5], f"row {i + 1}") for i in range(n)]


@pytest.mark.parametrize("n", [8, 7, 3, 1])
def test_shares_of_a_global_micro_batch_cover_it_once_in_order(n):
    items = list(range(n))
    shares = [share(items, rank, 2) for rank in range(2)]
    assert shares[0] + shares[1] == items and abs(len(shares[0]) - len(shares[1])) <= 1
    assert share(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_each_rank_takes_its_share_of_the_one_process_batches():
    """Over two epochs of 9 items, ranks 0 and 1 with batch 2 take exactly the examples one process with batch 4
    takes, micro-batch by micro-batch; rank 1's share of the lone last example is a placeholder."""
    items = _items(9)
    one = MicroBatchStream(items, 4, 0, 0, True, {"epoch": 0, "micro": 0})
    ranks = [MicroBatchStream(items, 2, 0, 0, True, {"epoch": 0, "micro": 0}, rank, 2) for rank in range(2)]
    for _ in range(6):
        whole = one.take(1)[0]
        parts = [r.take(1)[0] for r in ranks]
        real = [p for p in parts if not p.placeholder]
        assert torch.equal(torch.cat([p.input_ids for p in real], dim=1), whole.input_ids)
        assert sum(p.trained_tokens for p in parts) == whole.trained_tokens
        assert sum(p.real_tokens for p in parts) == whole.real_tokens
        assert [r.position for r in ranks] == [one.position] * 2
    assert one.epoch == 1  # the second epoch's order was taken too


def test_a_placeholder_trains_nothing_but_reaches_every_adapter(tiny_model_dir):
    from qlorakit.data.batches import placeholder
    from qlorakit.loss import batch_loss

    model, _ = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4)
    batch = placeholder(0)
    assert batch.trained_tokens == 0 and batch.real_tokens == 0
    loss, tokens = batch_loss(model, batch.model_inputs(), batch.labels)
    loss.backward()
    assert float(loss.detach()) == 0.0 and tokens == 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and float(g.abs().max()) == 0.0 for g in grads)  # every rank takes part in DDP's sum


def test_only_the_adapters_enter_ddp_buckets(tiny_model_dir, tmp_path):
    """The frozen 4-bit (and norm, embedding, head) weights are not registered with DDP's reducer: its buckets
    hold exactly the trainable parameters' bytes."""
    model, _ = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4)
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = wrap(model, Processes(rank=0, world=2))  # a group of one, standing in for two ranks
        logged = ddp._get_ddp_logging_data()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert logged["num_parameter_tensors"] == len(trainable)
        assert logged["total_parameter_size_bytes"] == sum(p.numel() * p.element_size() for p in trainable)
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        assert frozen > 4 * logged["total_parameter_size_bytes"]  # (a tiny model: the base is small here)
    finally:
        torch.distributed.destroy_process_group()


def test_check_world_allows_only_the_same_global_batch():
    class Cfg:
        batch_size, dropout = 8, 0.0

    saved = {"batch_size": 4, "world_size": 2}
    check_world(Path("out"), saved, Cfg, 1)  # 2 x 4 = 1 x 8
    Cfg.batch_size = 2
    check_world(Path("out"), saved, Cfg, 4)  # 4 x 2
    with pytest.raises(TrainingError, match=r"--batch-size 4 on 2 processes or --batch-size 2 on 4 processes"):
        Cfg.batch_size = 4
        check_world(Path("out"), saved, Cfg, 4)
    with pytest.raises(TrainingError, match="--batch-size 4 on 2 processes$"):
        check_world(Path("out"), saved, Cfg, 3)  # 8 examples cannot be shared by 3
    check_world(Path("out"), {"batch_size": 8}, type("C", (), {"batch_size": 8, "dropout": 0.1}), 1)  # old run
    with pytest.raises(TrainingError, match="LoRA dropout"):
        check_world(Path("out"), saved, type("C", (), {"batch_size": 8, "dropout": 0.1}), 1)
    with pytest.raises(TrainingError, match=r"LoRA dropout \(0.1\)"):  # the run's, left out of the resume
        check_world(Path("out"), saved | {"dropout": 0.1}, type("C", (), {"batch_size": 8, "dropout": 0.0}), 1)


def test_launcher_flags_are_checked_before_anything_starts(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from qlorakit.cli import _without_nproc, main

    assert _without_nproc(["train", "--nproc-per-node", "2", "--data", "x", "--nproc-per-node=3", "--rank", "4"]) \
        == ["--data", "x", "--rank", "4"]
    assert main(["train", "--nproc-per-node", "2"]) == 2
    assert "the built-in demo (no --data) runs on one" in capsys.readouterr().err
    data = _data(tmp_path / "d.jsonl", 4)
    assert main(["train", "--nproc-per-node", "0", "--data", str(data), "--model", str(tiny_model_dir)]) == 2
    assert "--nproc-per-node 0: the number of processes must be at least 1" in capsys.readouterr().err
    assert main(["train", "--nproc-per-node", "2", "--data", str(data), "--lr", "-1"]) == 2
    assert "lr" in capsys.readouterr().err
    # refused once, before torchrun starts the ranks (each would say it)
    assert main(["train", "--nproc-per-node", "2", "--data", str(data), "--fsdp", "--quant", "int8"]) == 2
    assert "--fsdp with quant=int8: LLM.int8 weights cannot be sharded" in capsys.readouterr().err
    assert main(["train", "--nproc-per-node", "2", "--data", str(data), "--device", "cuda:1"]) == 2
    assert "--device cuda:1 on several processes" in capsys.readouterr().err
    monkeypatch.setenv("QLORAKIT_DIST_TIMEOUT", "0.5")
    assert main(["train", "--nproc-per-node", "2", "--data", str(data)]) == 2
    assert "QLORAKIT_DIST_TIMEOUT='0.5': how long a rank waits" in capsys.readouterr().err
    monkeypatch.delenv("QLORAKIT_DIST_TIMEOUT")
    with pytest.raises(SystemExit) as exit_status:  # no abbreviations: the ranks get the arguments as written
        main(["train", "--nproc", "2", "--data", str(data)])
    assert exit_status.value.code == 2 and "unrecognized arguments: --nproc" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--nproc-per-node", "2", "--data", str(data)]) == 2
    assert "leave --nproc-per-node to the launcher" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="each process takes the GPU of its local rank"):
        join_run("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["train", "--data", str(data)]) == 2
    assert "WORLD_SIZE='two': the launcher's environment" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 with WORLD_SIZE=2: a rank is below the world size"):
        join_run("cpu")
    monkeypatch.setenv("RANK", "1")
    for bad in ("abc", "0", "0.5", "-5", "nan", "inf"):
        monkeypatch.setenv("QLORAKIT_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"QLORAKIT_DIST_TIMEOUT='{bad}': how long a rank waits"):
            join_run("cpu")
