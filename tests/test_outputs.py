"""Outputs: no lost or mixed user data. qlorakit writes only into a new or empty output or one it wrote, replaces
an earlier run only once the new one can stand in for it, holds a lock on an output while it writes it, cleans up
the temporaries of killed runs, gives its files the user's umask, and says so when the disk is full."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import qlorakit
from conftest import save_tiny_bpe_model
from qlorakit.errors import ConfigError, QLoraKitError, SourceError, TrainingError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROWS = [{"messages": [{"role": "user", "content": f"export number {i} as a gguf file"},
                      {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}]}
        for i in range(16)]
QUIET = dict(progress=False, log=lambda _: None)


def _data(directory: Path) -> Path:
    path = directory / "train.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _settings(base, output, **kw):
    return dict(model=str(base), data=str(_data(Path(output).parent)), output=str(output), quant="nf4",
                dtype="fp32", device="cpu", rank=4, alpha=8, lr=3e-2, batch_size=4, max_steps=3, seed=0) | kw


def _train(base, output, **kw) -> Path:
    return qlorakit.train(**QUIET, **_settings(base, output, **kw)).output


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_bpe_model(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return _train(base, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def old_run(base, tmp_path_factory):
    """A finished run with two checkpoints, copied by each test that replaces it."""
    out = tmp_path_factory.mktemp("old") / "run"
    _train(base, out, max_steps=5, save_every=2, seed=1)
    return out


def _copy_run(old_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(old_run, out)
    return out


def _files(directory: Path) -> dict[str, bytes]:
    """Every file qlorakit's users see (the marker and temporaries are hidden) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)}


def _hidden_leftovers(*directories: Path) -> list[str]:
    return [str(p) for d in directories if d.is_dir() for p in d.rglob(".*") if ".qlorakit-" in p.name
            and p.name != ".qlorakit-output"]


def _beside(path: Path) -> list[str]:
    """Hidden entries beside an output named after it: the temporaries of a merge or export."""
    return [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------------------------- bad outputs


def _foreign_dir(t: Path, name="out") -> Path:
    out = t / name
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / "config.json").write_text("{}\n")
    return out


def _earlier_run(t: Path, name="run") -> Path:
    out = t / name
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    (out / ".qlorakit-output").write_text(json.dumps({"kind": "train", "files": ["metrics.jsonl"]}))
    return out


def _in_use(t: Path):
    from qlorakit.outputs import claim_run_directory

    with claim_run_directory(t / "run"):
        qlorakit.train(output=str(t / "run"), data=str(_data(t)))


# (case, how to provoke it, what the message must say)
CASES = [
    ("output directory holding files qlorakit did not write",
     lambda t: qlorakit.train(output=str(_foreign_dir(t)), data=str(_data(t)), overwrite=True),
     r"out: already exists and is not empty: it holds README\.md, which qlorakit did not write\. qlorakit writes "
     r"only into a new or empty directory or one it wrote \(--overwrite replaces only its own files\)"),
    ("merge over a directory holding files qlorakit did not write",
     lambda t: qlorakit.merge(t / "adapter", _foreign_dir(t), overwrite=True),
     r"out: already exists and is not empty: it holds README\.md, which qlorakit did not write"),
    ("quantize over a directory holding files qlorakit did not write",
     lambda t: qlorakit.quantize(str(t / "base"), _foreign_dir(t), overwrite=True),
     r"out: already exists and is not empty: it holds README\.md, which qlorakit did not write"),
    ("run output that is an existing file",
     lambda t: qlorakit.train(output=str(_write(t / "run.txt", "x")), data=str(_data(t))),
     r"run\.txt: is a file, not a directory; --output names the directory to write the training run to"),
    ("merge output that is an existing file", lambda t: qlorakit.merge(t / "adapter", _write(t / "m.txt", "x")),
     r"m\.txt: is a file, not a directory; --output names the directory to write the merged model to"),
    ("quantize output that is an existing file",
     lambda t: qlorakit.quantize(str(t / "base"), _write(t / "q.txt", "x"), overwrite=True),
     r"q\.txt: is a file, not a directory; --output names the directory to write the quantized model to"),
    ("GGUF output that qlorakit did not write",
     lambda t: qlorakit.export_gguf(_write(t / "model.gguf", "not mine"), model=str(t), overwrite=True),
     r"model\.gguf: already exists and was not written by qlorakit \(its metadata has no qlorakit\.version key\); "
     r"qlorakit replaces only its own files, even with --overwrite"),
    ("GGUF output that is a directory",
     lambda t: qlorakit.export_gguf(_mkdir(t / "out.gguf"), model=str(t), overwrite=True),
     r"out\.gguf: is a directory; --output names the \.gguf file to write"),
    ("output of another kind", lambda t: qlorakit.merge(t / "adapter", _earlier_run(t), overwrite=True),
     r"run: holds a qlorakit training run, not a merged model; choose another --output"),
    ("output in use by another run", _in_use,
     rf"run: in use by another qlorakit run \(process {os.getpid()} holds its lock\); wait for it to finish"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case,provoke,message", CASES, ids=[c[0] for c in CASES])
def test_bad_output_is_a_clear_error_and_changes_nothing(tmp_path, case, provoke, message):
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(QLoraKitError) as e:
        provoke(tmp_path)
    assert re.search(message, str(e.value)), str(e.value)
    assert {p: Path(p).read_bytes() for p in before} == before  # every file there before is as it was


# Errors tested below, outside CASES; every one is in docs/errors.md too.
OTHER_CASES = ["earlier demo run without --overwrite", "earlier merged model without --overwrite",
               "disk full while writing a checkpoint", "disk full while writing the run's files",
               "disk full while merging", "disk full while exporting GGUF", "output that is a FIFO, socket or device",
               "disk full while converting a GGUF source into the cache"]


def test_every_case_is_documented():
    docs = DOCS.read_text()
    for case in [c[0] for c in CASES] + OTHER_CASES:
        assert f"| {case} |" in docs, case


# ---------------------------------------------------------------------------------------------- item 9: our own


def test_merge_gguf_quantize_replace_only_their_own_outputs(base, adapter, tmp_path):
    merged = qlorakit.merge(adapter, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    marker = json.loads((merged / ".qlorakit-output").read_text())
    assert marker["kind"] == "merge" and "model.safetensors" in marker["files"] and "config.json" in marker["files"]
    with pytest.raises(ConfigError, match=r"merged: already exists and is not empty \(a merged model qlorakit "
                                          r"wrote\); choose another --output or pass --overwrite"):
        qlorakit.merge(adapter, merged, log=lambda _: None)
    weights = (merged / "model.safetensors").read_bytes()
    assert qlorakit.merge(adapter, merged, dtype="bf16", overwrite=True, log=lambda _: None) == merged
    assert len((merged / "model.safetensors").read_bytes()) < len(weights)  # replaced: bf16 now
    (merged / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"it holds notes\.txt, which qlorakit did not write"):
        qlorakit.merge(adapter, merged, overwrite=True, log=lambda _: None)
    assert (merged / "notes.txt").read_text() == "mine"

    gguf_path = qlorakit.export_gguf(tmp_path / "m.gguf", model=str(merged), log=lambda _: None)
    import gguf

    assert gguf.GGUFReader(gguf_path).fields["qlorakit.version"].contents() == qlorakit.__version__
    with pytest.raises(ConfigError, match=r"m\.gguf: already exists \(a GGUF file qlorakit wrote\)"):
        qlorakit.export_gguf(gguf_path, model=str(merged), log=lambda _: None)
    qlorakit.export_gguf(gguf_path, model=str(merged), gguf_type="q8_0", overwrite=True, log=lambda _: None)
    assert gguf.GGUFReader(gguf_path).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0

    quantized = qlorakit.quantize(str(base), tmp_path / "q", device="cpu", log=lambda _: None)
    qlorakit.quantize(str(base), quantized, quant="int8", device="cpu", overwrite=True, log=lambda _: None)
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert not _beside(merged) and not _beside(gguf_path) and not _beside(quantized)


# ---------------------------------------------------------------------------------------------- item 10: replacing


def test_overwrite_changes_nothing_before_every_check_has_passed(base, old_run, tmp_path):
    out = _copy_run(old_run, tmp_path)
    before = _files(out)
    with pytest.raises(QLoraKitError, match="missing.jsonl: data file not found"):
        qlorakit.train(**QUIET, **_settings(base, out, data=str(tmp_path / "missing.jsonl")), overwrite=True)
    with pytest.raises(QLoraKitError, match="nowhere"):
        qlorakit.train(**QUIET, **_settings(base, out, adapter=str(tmp_path / "nowhere")), overwrite=True)
    assert _files(out) == before and "checkpoints/step-000004/state.json" in before


def test_a_failed_overwrite_run_leaves_the_earlier_run_as_it_was(base, old_run, tmp_path, monkeypatch):
    from qlorakit.train import TrainStep

    out = _copy_run(old_run, tmp_path)
    before = _files(out)
    step, calls = TrainStep.run, []

    def failing(self, batches):
        calls.append(1)
        if len(calls) == 3:
            raise TrainingError("a step that fails")
        return step(self, batches)

    monkeypatch.setattr(TrainStep, "run", failing)
    with pytest.raises(TrainingError, match="a step that fails"):
        _train(base, out, max_steps=4, save_every=4, overwrite=True)
    assert _files(out) == before
    assert not _hidden_leftovers(out)


def test_a_killed_overwrite_run_gives_back_the_earlier_run(base, old_run, tmp_path):
    """SIGKILL the replacing run before its first checkpoint: the next run on the output finds the earlier run
    whole (and refuses to mix into it); a replacing run that finishes leaves only its own files."""
    out = _copy_run(old_run, tmp_path)
    before = _files(out)
    script = (
        "import json, os, signal, sys\n"
        "import qlorakit\n"
        "from qlorakit.train import TrainStep\n"
        "step, calls = TrainStep.run, []\n"
        "def dying(self, batches):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self, batches)\n"
        "TrainStep.run = dying\n"
        "qlorakit.train(progress=False, log=lambda _: None, overwrite=True, **json.loads(sys.argv[1]))\n"
    )
    settings = _settings(base, out, max_steps=4, save_every=2)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(settings)], env=os.environ | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with pytest.raises(TrainingError, match="holds an earlier run"):
        _train(base, out, max_steps=4, save_every=2)
    assert _files(out) == before and not _hidden_leftovers(out)

    _train(base, out, max_steps=4, save_every=2, overwrite=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # step 4 of the old run: gone
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and not _hidden_leftovers(out)
    assert json.loads((out / "config.json").read_text())["seed"] == 0  # the old run's was 1


# ---------------------------------------------------------------------------------------------- item 11: one run


@contextlib.contextmanager
def _first_run_paused(monkeypatch, owner, name, run_first):
    """Start `run_first` in a thread, pause it in its first call of owner.name and hold it there for the block; the
    first run must then finish without an error."""
    started, go, errors = threading.Event(), threading.Event(), []
    real = getattr(owner, name)

    def waiting(*args, **kwargs):
        if threading.current_thread().name == "first" and not started.is_set():
            started.set()
            assert go.wait(120)
        return real(*args, **kwargs)

    def first():
        try:
            run_first()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    monkeypatch.setattr(owner, name, waiting)
    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert started.wait(120)
        yield
    finally:
        go.set()
        thread.join(120)
    assert not errors, errors


def test_a_second_run_on_an_output_is_refused_while_the_first_runs(base, tmp_path, monkeypatch):
    from qlorakit.train import TrainStep

    out = tmp_path / "run"
    with _first_run_paused(monkeypatch, TrainStep, "run", lambda: _train(base, out, max_steps=4, save_every=2)):
        with pytest.raises(ConfigError, match=rf"run: in use by another qlorakit run \(process {os.getpid()}"):
            _train(base, out, max_steps=4, overwrite=True)
        with pytest.raises(ConfigError, match=rf"in use by another qlorakit run \(process {os.getpid()}"):
            _train(base, out, max_steps=4, resume=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_second_merge_into_an_output_is_refused_while_the_first_writes(base, adapter, tmp_path, monkeypatch):
    merge_module = sys.modules["qlorakit.export.merge"]  # (qlorakit.export.merge is also the function)

    def first():
        qlorakit.merge(adapter, tmp_path / "merged", dtype="fp32", log=lambda _: None)

    with _first_run_paused(monkeypatch, merge_module, "_write_config", first):
        with pytest.raises(ConfigError, match=rf"merged: in use by another qlorakit run \(process {os.getpid()}"):
            qlorakit.merge(adapter, tmp_path / "merged", dtype="bf16", overwrite=True, log=lambda _: None)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"
    assert not _beside(tmp_path / "merged")


@contextlib.contextmanager
def _claimed_by_another_process(path: Path):
    """A real second process holding a training run's claim on `path` for the block; yields its process id."""
    script = ("import sys\nfrom qlorakit.outputs import claim_run_directory\n"
              "claim = claim_run_directory(sys.argv[1])\nprint('claimed', flush=True)\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline() == "claimed\n", proc.stderr.read()[-2000:]
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(60)


def test_an_output_another_process_holds_is_refused_naming_that_process(tmp_path):
    out = tmp_path / "run"
    with _claimed_by_another_process(out) as pid:
        assert pid != os.getpid()
        held = rf"run: in use by another qlorakit run \(process {pid} holds its lock\); wait for it to finish"
        with pytest.raises(ConfigError, match=held):
            qlorakit.train(output=str(out), data=str(_data(tmp_path)), overwrite=True)
        with pytest.raises(ConfigError, match=held):
            qlorakit.merge(tmp_path / "adapter", out, overwrite=True)
    assert not _beside(out)


@pytest.mark.parametrize("kind", ("merge", "quantize"))
def test_a_run_claiming_the_directory_while_a_merge_stages_into_it_wins(tmp_path, monkeypatch, kind):
    """A training run (another process) claims the directory after a merge's first check, before the merge has its
    staging lock: the merge must see the claim under its lock and refuse, never move the claimed run aside."""
    import qlorakit.outputs as outputs

    out = tmp_path / "run"
    new_temp_dir, holder = outputs._new_temp_dir, []
    with contextlib.ExitStack() as stack:
        def claimed_meanwhile(target):
            if not holder:
                holder.append(stack.enter_context(_claimed_by_another_process(out)))
            return new_temp_dir(target)

        monkeypatch.setattr(outputs, "_new_temp_dir", claimed_meanwhile)
        with pytest.raises(ConfigError, match=r"run: in use by another qlorakit run \(process (\d+) holds") as e:
            with outputs.staged_output(out, kind) as staging:
                (staging / "model.safetensors").write_bytes(b"new")
        assert f"process {holder[0]} holds" in str(e.value)
        assert json.loads((out / ".qlorakit-output").read_text())["pid"] == holder[0]  # the run's directory, intact
        assert not (out / "model.safetensors").exists() and not _beside(out)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _within(seconds: float, call, unblock):
    """call() in a thread that must end within `seconds` (a hang fails the test instead of stalling it)."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        thread.join(10)
        pytest.fail(f"still running after {seconds} s: it hangs")
    return result


FIFO_OUTPUTS = {
    "gguf": (lambda t, o, overwrite: qlorakit.export_gguf(o, model=str(t), overwrite=overwrite), ".gguf file"),
    "train": (lambda t, o, overwrite: qlorakit.train(output=str(o), data=str(_data(t)), overwrite=overwrite),
              "directory"),
    "merge": (lambda t, o, overwrite: qlorakit.merge(t / "adapter", o, overwrite=overwrite), "directory"),
    "quantize": (lambda t, o, overwrite: qlorakit.quantize(str(t / "base"), o, overwrite=overwrite), "directory"),
}


@pytest.mark.parametrize("overwrite", (False, True), ids=("plain", "overwrite"))
@pytest.mark.parametrize("kind", FIFO_OUTPUTS)
def test_an_output_that_is_a_fifo_is_refused_without_reading_it(tmp_path, kind, overwrite):
    call, names = FIFO_OUTPUTS[kind]
    fifo = _fifo(tmp_path / ("out.gguf" if kind == "gguf" else "out"))

    def unblock():  # a reader blocked on the FIFO returns once a writer opens it
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    result = _within(20, lambda: call(tmp_path, fifo, overwrite), unblock)
    assert isinstance(result.get("error"), ConfigError), result
    assert re.search(rf"out(\.gguf)?: is not a regular file or directory \(a FIFO, socket or device\); --output "
                     rf"names the {re.escape(names)} to write: choose another path", str(result["error"]))
    assert stat.S_ISFIFO(fifo.stat().st_mode) and not _beside(fifo)


def test_a_damaged_or_huge_header_gguf_output_is_foreign_and_read_no_further(tmp_path):
    """Ownership of a GGUF output is decided from its header alone; a damaged file is not ours."""
    import struct

    from qlorakit.outputs import check_output

    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + bytes(64))  # tensors no 88 bytes can hold
    with pytest.raises(ConfigError, match=r"damaged\.gguf: already exists and was not written by qlorakit"):
        check_output(damaged, "gguf", overwrite=True)


# ---------------------------------------------------------------------------------------------- item 12: temporaries


KILL_DURING = {
    "merge": ("qlorakit.export.merge", "_write_config", "qlorakit.merge(sys.argv[1], sys.argv[2], log=print)"),
    "gguf": ("qlorakit.export.gguf_file", "_encode",
             "qlorakit.export_gguf(sys.argv[2], adapter=sys.argv[1], log=print)"),
}


@pytest.mark.parametrize("what", KILL_DURING)
def test_temporaries_of_a_killed_export_are_removed_by_the_next_run(base, adapter, tmp_path, what):
    module, function, call = KILL_DURING[what]
    output = tmp_path / ("merged" if what == "merge" else "model.gguf")
    script = (
        "import importlib, os, signal, sys\n"
        "import qlorakit\n"
        f"module = importlib.import_module({module!r})\n"
        f"real, calls = module.{function}, []\n"
        "def dying(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3 or module.__name__.endswith('merge'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*args, **kwargs)\n"
        f"module.{function} = dying\n"
        f"{call}\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(adapter), str(output)], capture_output=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    left = _beside(output)
    assert left and not output.exists()  # a partial output under a hidden name, nothing that looks complete
    assert sum(f.stat().st_size for name in left for f in [tmp_path / name, *(tmp_path / name).rglob("*")]
               if f.is_file()) > 1000
    if what == "merge":
        qlorakit.merge(adapter, output, log=lambda _: None)
        assert (output / "model.safetensors").is_file()
    else:
        qlorakit.export_gguf(output, adapter=adapter, log=lambda _: None)
        assert output.stat().st_size > 10_000
    assert not _beside(output)


def _killed_while_replacing(out: Path) -> None:
    """The state a kill between the two renames that replace `out` leaves: the earlier output aside (`.old`), the
    new one finished in its staging, nothing at `out`."""
    aside = out.parent / f".{out.name}.qlorakit-99999-0badcafe.old"
    os.rename(out, aside)
    finished = out.parent / f".{out.name}.qlorakit-99999-0badcaff"
    shutil.copytree(aside, finished)
    (finished / "model.safetensors").write_bytes(b"new")


def test_an_earlier_output_a_kill_left_aside_comes_back(tmp_path):
    """The next run on that name puts the earlier output back (and removes the staging), then checks it as ever."""
    from qlorakit.outputs import staged_output

    out = tmp_path / "merged"
    with staged_output(out, "merge") as staging:
        (staging / "model.safetensors").write_bytes(b"earlier")
    _killed_while_replacing(out)
    with pytest.raises(ConfigError, match=r"merged: already exists and is not empty \(a merged model qlorakit"):
        with staged_output(out, "merge"):
            pass
    assert (out / "model.safetensors").read_bytes() == b"earlier" and not _beside(out)
    _killed_while_replacing(out)  # a training run given the same name
    with pytest.raises(ConfigError, match=r"merged: holds a qlorakit merged model, not a training run"):
        qlorakit.train(output=str(out), data=str(_data(tmp_path)))
    assert (out / "model.safetensors").read_bytes() == b"earlier" and not _beside(out)
    with staged_output(out, "merge", overwrite=True) as staging:  # and replacing it works as before
        (staging / "model.safetensors").write_bytes(b"newer")
    assert (out / "model.safetensors").read_bytes() == b"newer" and not _beside(out)


def test_a_gguf_conversion_is_staged_beside_its_cache_entry(adapter, tmp_path, monkeypatch):
    """The cache conversion of a GGUF source: the umask's modes, a killed conversion's staging removed by the next,
    a conversion another process finished first kept, a full disk an error naming the file."""
    import transformers

    load = sys.modules["qlorakit.load"]  # (qlorakit.load is also the function)
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    source = qlorakit.export_gguf(tmp_path / "m.gguf", adapter=adapter, log=lambda _: None)
    previous = os.umask(0o022)
    try:
        target = load.gguf_to_hf_dir(source)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and (target / "config.json").is_file()
    assert {stat.S_IMODE(f.stat().st_mode) for f in target.iterdir()} == {0o644}
    shutil.move(target, tmp_path / "complete")
    stale = target.parent / f".{target.name}.qlorakit-99999-0badcafe"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(bytes(1000))

    write_origin = load._write_gguf_origin

    def finished_first_elsewhere(gguf_path, directory):
        write_origin(gguf_path, directory)
        if not target.exists():
            shutil.copytree(tmp_path / "complete", target)
            (target / "theirs").write_text("")

    monkeypatch.setattr(load, "_write_gguf_origin", finished_first_elsewhere)
    assert load.gguf_to_hf_dir(source) == target
    assert (target / "theirs").exists() and not _beside(target)  # theirs kept; ours and the stale one gone

    shutil.rmtree(target)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", _disk_full)
    with pytest.raises(SourceError, match=r"m\.gguf: the disk is full \(no space left on device\) "
                                                          r"while converting it into the cache at .*; the partial "
                                                          r"conversion was removed\. Free some space"):
        load.gguf_to_hf_dir(source)
    assert not target.exists() and not _beside(target)


def test_the_adapter_files_are_on_disk_before_they_are_renamed_into_place(base, tmp_path, monkeypatch):
    synced, unsynced = set(), []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        return fsync(fd)

    def checking_replace(src, dst, *args, **kwargs):
        if Path(dst).name.startswith("adapter_") and os.stat(src).st_ino not in synced:
            unsynced.append(Path(dst).name)
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", checking_replace)
    out = _train(base, tmp_path / "run", max_steps=1)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not unsynced and not _hidden_leftovers(out)


def test_a_refused_resume_leaves_no_directory_or_marker_behind(base, tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("new", "empty"):
        with pytest.raises(TrainingError, match=rf"{name}: no checkpoint to resume from"):
            _train(base, tmp_path / name, resume=True)
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("bad", ("fifo", "missing", "model"))
def test_a_run_refused_after_its_claim_leaves_no_directory_or_marker_behind(base, tmp_path, bad):
    """A run that ends before it writes anything — bad data found after the claim, a model that cannot load —
    leaves no trace in the directory it created (a refused `train --data /dev/null` left qlorakit-run/ behind)."""
    data = tmp_path / "d.jsonl"
    if bad == "fifo":
        os.mkfifo(data)
    kw = {"model": str(tmp_path / "no-model")} if bad == "model" else {}
    if bad == "model":
        data = _data(tmp_path)
    with pytest.raises(QLoraKitError):
        qlorakit.train(**QUIET, **(_settings(base, tmp_path / "run", data=str(data)) | kw))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- item 12: modes


@pytest.mark.parametrize("umask", (0o022, 0o077), ids=("umask022", "umask077"))
def test_every_output_gets_the_users_umask(base, tmp_path, umask):
    previous = os.umask(umask)
    try:
        run = _train(base, tmp_path / "run", max_steps=3, save_every=2, validation=0.25)
        merged = qlorakit.merge(run, tmp_path / "merged", log=lambda _: None)
        gguf_path = qlorakit.export_gguf(tmp_path / "m.gguf", model=str(merged), log=lambda _: None)
        quantized = qlorakit.quantize(str(base), tmp_path / "q", device="cpu", log=lambda _: None)
    finally:
        os.umask(previous)
    assert (run / "checkpoints" / "step-000002").is_dir() and (run / "loss.png").is_file()
    wrong = []
    for path in [run, merged, gguf_path, quantized, *run.rglob("*"), *merged.rglob("*"), *quantized.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        if mode != want:
            wrong.append(f"{path.relative_to(tmp_path)}: {oct(mode)}, not {oct(want)}")
    assert not wrong, wrong


# ---------------------------------------------------------------------------------------------- disk full


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(base, tmp_path, monkeypatch):
    import qlorakit.checkpoint as checkpoint

    out = tmp_path / "run"
    save_file, calls = checkpoint.save_file, []

    def filling(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the first checkpoint (two files) fits, the second does not
            Path(args[1]).write_bytes(b"\0" * 100)
            _disk_full()
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", filling)
    with pytest.raises(TrainingError, match=r"checkpoints/step-000004: the disk is full \(no space left on device\) "
                                            r"while writing this checkpoint; the previous checkpoint "
                                            r".*checkpoints/step-000002 is intact: free some space and continue "
                                            r"with --resume"):
        _train(base, out, max_steps=5, save_every=2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    _train(base, out, max_steps=5, save_every=2, resume=True)  # and the run goes on from it
    assert (out / "adapter_model.safetensors").is_file()


def test_disk_full_while_writing_the_run_files_is_an_error_naming_the_run(base, old_run, tmp_path, monkeypatch):
    train_module = sys.modules["qlorakit.train"]

    out = _copy_run(old_run, tmp_path)
    monkeypatch.setattr(train_module, "save_adapter", _disk_full)
    with pytest.raises(TrainingError, match=r"run: the disk is full \(no space left on device\) while writing the "
                                            r"run's files; the last checkpoint .*step-000002 is intact"):
        _train(base, out, max_steps=3, save_every=2, overwrite=True)
    # the new run's checkpoint (it had replaced the earlier run, whose last checkpoint was step 4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not (out / "adapter_model.safetensors").exists() and not _hidden_leftovers(out)


def test_disk_full_during_merge_or_export_leaves_the_previous_output(base, adapter, tmp_path, monkeypatch):
    import gguf

    merge_module = sys.modules["qlorakit.export.merge"]  # (qlorakit.export.merge is also the function)

    merged = qlorakit.merge(adapter, tmp_path / "merged", log=lambda _: None)
    gguf_path = qlorakit.export_gguf(tmp_path / "m.gguf", model=str(merged), log=lambda _: None)
    before, gguf_before = _files(merged), gguf_path.read_bytes()

    write_shard = merge_module._write_shard

    def filling(path, *args):
        Path(path).write_bytes(b"\0" * 1000)
        _disk_full()

    monkeypatch.setattr(merge_module, "_write_shard", filling)
    with pytest.raises(ConfigError, match=r"merged: the disk is full \(no space left on device\); the earlier merged "
                                          r"model there is unchanged and the partial new one was removed\. Free"):
        qlorakit.merge(adapter, merged, overwrite=True, log=lambda _: None)
    monkeypatch.setattr(merge_module, "_write_shard", write_shard)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", _disk_full)
    with pytest.raises(ConfigError, match=r"m\.gguf: the disk is full \(no space left on device\); the earlier GGUF "
                                          r"file there is unchanged"):
        qlorakit.export_gguf(gguf_path, model=str(merged), overwrite=True, log=lambda _: None)
    assert _files(merged) == before and gguf_path.read_bytes() == gguf_before
    assert not _beside(merged) and not _beside(gguf_path)


# ---------------------------------------------------------------------------------------------- the demo


def test_the_demo_replaces_its_earlier_run_only_with_overwrite(tmp_path, monkeypatch):
    import qlorakit.demo as demo
    from qlorakit.cli import main

    earlier = _earlier_run(tmp_path, "qlorakit-demo")
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        raise SystemExit(7)  # stands in for the minutes of loading the default model

    monkeypatch.setattr(sys.modules["qlorakit.load"], "load", load)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet"]) == 2
    assert loads == []  # refused before the model is loaded
    with pytest.raises(TrainingError, match=r"qlorakit-demo: holds an earlier run \(checkpoints or metrics\.jsonl\); "
                                            r"replace it with `qlorakit train --overwrite`, or choose another"):
        demo.run_demo(progress=False, log=lambda _: None)
    assert (earlier / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):
        main(["train", "--quiet", "--overwrite"])
    assert len(loads) == 1  # past the check, on to loading the model
