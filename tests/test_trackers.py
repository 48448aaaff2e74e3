"""--report-to: each tracker's values, read back with the tool's own reader, equal metrics.jsonl's; the config once;
files only inside the output; resume; a failed run marked failed; a missing extra named before the model loads.

Every tracker stores these values in float64 (TensorBoard's double-precision scalars, W&B's JSON history, MLflow's
SQL double column), so the comparisons are exact. Nothing reaches the network: W&B runs offline (WANDB_MODE), MLflow
writes its SQLite store inside the output, and the Python side's host lookups are refused."""

from __future__ import annotations

import json
import socket
import struct
import sys
import zlib
from pathlib import Path

import pytest

import qlorakit
from conftest import save_tiny_model
from qlorakit.errors import ConfigError, TrainingError
from qlorakit.trackers import check_trackers, mlflow_name

STEPS = 6


def _rows(n=48):
    return [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 3 + j) % 200 + 10}" for j in range(6))},
                          {"role": "assistant", "content": "w100 w150 w200"}]} for i in range(n)]


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory (the cwd, empty) and the data, in a directory that only the run's output may join."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    monkeypatch.chdir(tmp_path / "cwd")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    # W&B offline; its own cache and settings (wandb-core's debug logs) where this test says, as a user may
    wandb_home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(wandb_home / sub))
    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    before = {p.name for p in tmp_path.iterdir()}
    yield tmp_path
    assert lookups == []
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing written in the working directory
    assert {p.name for p in tmp_path.iterdir()} - before <= {"out", "wandb-home"}  # nor beside the output
    if "wandb" in sys.modules:  # the next test's W&B service starts with that test's settings
        sys.modules["wandb"].teardown()


def _train(model_dir, place, out="out", **kw):
    settings = dict(model=str(model_dir), data=str(place / "train.jsonl"), output=str(place / out), dtype="fp32",
                    device="cpu", rank=4, alpha=8, lr=5e-3, batch_size=4, max_steps=STEPS, validation=0.25,
                    eval_every=2, seed=0)
    return qlorakit.train(progress=False, log=lambda _: None, **(settings | kw))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _numbers(record: dict) -> dict:
    return {k: int(v) if isinstance(v, bool) else v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))}


def _series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {key: [(step, value), ...]} in file order."""
    series = {}
    for r in records:
        for key, value in _numbers(r).items():
            series.setdefault(key, []).append((r["step"], value))
    return series


# ---------------------------------------------------------------------------------------------- the readers


def _tensorboard(directory: Path):
    """TensorBoard's own reader of a log directory, as its server uses it (purging what a restart replaced)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})  # 0: keep every event
    events.Reload()
    return events


def _tensorboard_series(events) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.util.tensor_util import make_ndarray

    return {tag: [(e.step, make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
            for tag in events.PluginTagToContent("scalars")}


def _tensorboard_hparams(events):
    """The hparams plugin's session start (the config) and the session end's status."""
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.api_pb2 import Status

    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    return start.hparams, Status.Name(end.status)


def _wandb_log(path: Path) -> list:
    """The records of a W&B run's transaction log (run-ID.wandb), decoded with wandb's own protobuf schema
    (wandb.proto.wandb_internal_pb2.Record). The file is W&B's 7-byte header (":W&B", magic 0xBEE1, version 0), then
    LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte header (CRC-32 of type and data, length, type
    FULL/FIRST/MIDDLE/LAST) and its data; a record is one FULL chunk or FIRST, MIDDLE..., LAST."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, parts, at, block = [], b"", 7, 32768
    while at < len(data):
        if block - at % block < 7:  # the block's tail is padding
            at += block - at % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[at:at + 7])
        chunk = data[at + 7:at + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: chunk at byte {at} is damaged"
        at += 7 + length
        parts += chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def _wandb_runs(out: Path) -> list[dict]:
    """Each offline run directory under OUTPUT/wandb, oldest first: its run record, config, history rows, exit."""
    import wandb

    wandb.teardown()  # wandb-core writes the log's end after finish() returns; teardown waits for the service
    runs = []
    for log in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"rows": [], "config": {}}
        for record in _wandb_log(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["run"] = record.run
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            else:
                updates = []
            run["config"] |= {u.key: json.loads(u.value_json) for u in updates if u.key != "_wandb"}
            if kind == "history":
                row = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.history.item}
                run["rows"].append({k: v for k, v in row.items() if not k.startswith("_")})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


def _mlflow(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    return client, client.get_run(run_id)


def _mlflow_series(client, run, keys) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in keys}


# ---------------------------------------------------------------------------------------------- each tracker


def test_tensorboard_holds_metrics_jsonl_values_scale_and_config(tiny_model_dir, place):
    """fp16, so the GradScaler's scale is logged too."""
    _train(tiny_model_dir, place, dtype="fp16", report_to="tensorboard")
    out = place / "out"
    records = _records(out)
    expected = _series(records)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "scale", "peak_rss_mib", "eval_loss",
            "eval_perplexity"} <= set(expected)
    assert [s for s, _ in expected["eval_loss"]] == [2, 4, 6] and len(expected["loss"]) == STEPS
    events = _tensorboard(out / "tensorboard")
    assert _tensorboard_series(events) == expected  # exact: float64 scalars
    config = json.loads((out / "config.json").read_text())
    from tensorboard.util.tensor_util import make_ndarray

    [text] = events.Tensors("config/text_summary")
    assert json.loads(make_ndarray(text.tensor_proto).item().decode()) == config
    hparams, status = _tensorboard_hparams(events)
    assert hparams["lr"].number_value == 5e-3 and hparams["targets"].string_value == config["targets"]
    assert config["adapter"] is None and hparams["adapter"].string_value == "null"  # others as JSON text
    assert status == "STATUS_SUCCESS"
    assert "trackers.json" not in {p.name for p in out.iterdir()}  # nothing to record: the directory is the run


def test_wandb_offline_run_holds_metrics_jsonl_rows_and_config(tiny_model_dir, place):
    _train(tiny_model_dir, place, report_to="wandb")
    out = place / "out"
    [run] = _wandb_runs(out)
    assert run["rows"] == [{"step": r["step"]} | _numbers(r) for r in _records(out)]  # exact: JSON
    assert run["config"] == json.loads((out / "config.json").read_text())
    assert (run["run"].project, run["run"].display_name) == ("qlorakit", "out")
    assert json.loads((out / "trackers.json").read_text())["wandb"] == {"id": run["run"].run_id, "project": "qlorakit"}
    assert run["exit_code"] == 0


def test_mlflow_local_store_holds_metrics_jsonl_values_and_params(tiny_model_dir, place):
    _train(tiny_model_dir, place, report_to="mlflow")
    out = place / "out"
    client, run = _mlflow(out)
    expected = _series(_records(out))
    assert _mlflow_series(client, run, expected) == expected  # exact: SQL double
    assert set(run.data.metrics) == set(expected)
    config = json.loads((out / "config.json").read_text())
    assert run.data.params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    assert client.get_experiment(run.info.experiment_id).name == "qlorakit"
    assert json.loads((out / "trackers.json").read_text())["mlflow"]["tracking_uri"] is None  # the output's store


def test_mlflow_experiment_and_store_from_the_environment(tiny_model_dir, place, monkeypatch):
    """A store the user names (here a SQLite file of their own) and MLFLOW_EXPERIMENT_NAME are used as given; the
    output gets no store of its own."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{place / 'mine.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-experiment")
    _train(tiny_model_dir, place, report_to="mlflow", max_steps=2, validation=None, eval_every=None)
    out = place / "out"
    assert not (out / "mlflow").exists()
    recorded = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert recorded["tracking_uri"] == uri
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(recorded["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "my-experiment"
    assert _mlflow_series(client, run, ["loss"])["loss"] == _series(_records(out))["loss"]
    (place / "mine.db").unlink()  # the user's file, not the output's: the fixture checks nothing else is there


# ---------------------------------------------------------------------------------------------- metric names

# GRPO's keys: reward/<spec> for every --reward SPEC, whatever characters the spec holds.
GRPO_KEYS = ["reward", "reward/regex:\\d+", "reward/regex:\\d+_std", "reward/../rw.py:w7", "reward/./rw.py:fn",
             "reward/regex:a?", "reward/regex:a_", "reward/regex:a*", "reward/sub//rw.py:fn", "reward/x/",
             "../up.py:fn", "reward/regex:\u00e9\u00df \\w{2,}", "reward/regex:" + "x" * 300]


@pytest.mark.parametrize("key, name", [
    ("loss", "loss"), ("reward/exact:answer", "reward/exact:answer"), ("reward/a b.c-d_e", "reward/a b.c-d_e"),
    ("reward/regex:\\d+", "reward/regex:_d_"), ("reward/regex:\\d+_std", "reward/regex:_d__std"),
    ("reward/../rw.py:w7", "reward/__/rw.py:w7"), ("reward/./x", "reward/_/x"), ("reward//x", "reward/x"),
    ("/lead", "lead"), ("reward/x/", "reward/x"), ("../up.py:fn", "__/up.py:fn"), ("..x", "__x"), ("", "_"),
    ("reward/regex:(a|b)?\n", "reward/regex:_a_b___"), ("reward/\u00e9", "reward/\u00e9"),
])
def test_mlflow_names_are_what_mlflow_takes(key, name):
    """Names MLflow refuses (its own validation, mlflow.utils.validation, which the SQL store and a server apply)
    become names it takes; names it takes stay."""
    from mlflow.utils.validation import _validate_metric_name

    assert mlflow_name(key) == name
    _validate_metric_name(name)


def test_mlflow_names_past_mlflows_length_limit_keep_their_key_apart():
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

    long_a, long_b = "reward/regex:" + "x" * 300 + "a", "reward/regex:" + "x" * 300 + "b"
    names = {mlflow_name(long_a), mlflow_name(long_b)}
    assert len(names) == 2 and all(len(n) == MAX_ENTITY_KEY_LENGTH and n.startswith("reward/regex:xxx")
                                   for n in names)
    assert mlflow_name(long_a) == mlflow_name(long_a)  # the same in every run: the key's CRC-32


def test_grpo_reward_keys_reach_every_tracker(place):
    """GRPO's reward/<spec> keys: TensorBoard and W&B take them as they are; MLflow refused some (an
    MlflowException from log_batch ended the run), now gets them under names it takes, each key its own name, and
    the log says which. Values exact (float64)."""
    from qlorakit.trackers import Trackers

    out = place / "out"
    out.mkdir()
    notes = []
    trackers = Trackers(out, notes.append)
    trackers.open(("tensorboard", "wandb", "mlflow"), {"reward": ["regex:\\d+"]}, resume_step=None)
    records = [{"step": step} | {key: step + i / 7 for i, key in enumerate(GRPO_KEYS)} for step in (1, 2)]
    for record in records:
        trackers.log(record)
    trackers.close()
    expected = _series(records)

    assert _tensorboard_series(_tensorboard(out / "tensorboard")) == expected
    [run] = _wandb_runs(out)
    assert run["rows"] == records

    client, run = _mlflow(out)
    names = {key: mlflow_name(key) for key in GRPO_KEYS}
    crc = {key: f"{zlib.crc32(key.encode()):08x}" for key in GRPO_KEYS}
    # reward/regex:a_ is its own name already: the keys renamed to it are told apart by their CRC
    names["reward/regex:a?"] = f"reward/regex:a_-{crc['reward/regex:a?']}"
    names["reward/regex:a*"] = f"reward/regex:a_-{crc['reward/regex:a*']}"
    assert names["reward/regex:\\d+"] == "reward/regex:_d_" and names["reward/../rw.py:w7"] == "reward/__/rw.py:w7"
    assert len(set(names.values())) == len(GRPO_KEYS)
    assert set(run.data.metrics) == set(names.values())
    assert _mlflow_series(client, run, names.values()) == {names[k]: v for k, v in expected.items()}
    renamed = [key for key in GRPO_KEYS if names[key] != key]
    assert [n for n in notes if "is logged as" in n] == [
        f"mlflow: the metric {key!r} is logged as {names[key]!r} (MLflow's names hold only letters, digits, _ - . : "
        "/ and spaces, and no '.', '..' or empty path segments)" for key in sorted(renamed, key=GRPO_KEYS.index)]


# ---------------------------------------------------------------------------------------------- resume and failure


def test_resume_continues_each_trackers_run(tiny_model_dir, place):
    """A run with a checkpoint at step 3 runs again from there (as after a kill): TensorBoard drops what the first
    run logged from step 4 on, as metrics.jsonl does; W&B writes a second offline directory of the same run id;
    MLflow continues the same run and keeps both runs' values at steps 4-6."""
    trackers = "tensorboard,wandb,mlflow"
    _train(tiny_model_dir, place, report_to=trackers, save_every=3)
    out = place / "out"
    first = _records(out)
    ids = json.loads((out / "trackers.json").read_text())
    _train(tiny_model_dir, place, report_to=trackers, save_every=3, resume=True, lr=4e-3)  # lr: other values
    records = _records(out)
    assert [r["step"] for r in records] == [r["step"] for r in first]
    assert records[:4] == first[:4] and records[4:] != first[4:]  # steps 1-3 kept, 4-6 trained again
    assert json.loads((out / "trackers.json").read_text()) == ids

    assert _tensorboard_series(_tensorboard(out / "tensorboard")) == _series(records)

    runs = _wandb_runs(out)
    assert [r["run"].run_id for r in runs] == [ids["wandb"]["id"]] * 2
    assert runs[0]["rows"] == [{"step": r["step"]} | _numbers(r) for r in first]
    assert runs[1]["rows"] == [{"step": r["step"]} | _numbers(r) for r in records[4:]]
    assert runs[1]["config"]["lr"] == 4e-3 and runs[1]["config"]["resume"] is True

    client, run = _mlflow(out)
    both = _series(first + records[4:])
    got = _mlflow_series(client, run, both)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in both.items()}
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.005"  # params are write-once


def test_a_failed_run_is_marked_failed_in_each_tracker(tiny_model_dir, place):
    """A NaN loss at step 5 stops the run (TrainingError, as without trackers); each tracker has the steps before
    it and the run's failure."""
    loaded = qlorakit.load(str(tiny_model_dir), dtype="fp32", device="cpu")
    calls = {"n": 0}

    def nan_at_step_5(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    loaded[0].model.norm.register_forward_hook(nan_at_step_5)
    with pytest.raises(TrainingError, match="step 5: non-finite loss"):
        _train(tiny_model_dir, place, report_to="tensorboard,wandb,mlflow", validation=None, eval_every=None,
               save_every=2, loaded=loaded)
    out = place / "out"
    expected = _series(_records(out))
    assert [s for s, _ in expected["loss"]] == [1, 2, 3, 4]

    events = _tensorboard(out / "tensorboard")
    assert _tensorboard_series(events) == expected
    assert _tensorboard_hparams(events)[1] == "STATUS_FAILURE"
    [run] = _wandb_runs(out)
    assert len(run["rows"]) == 4 and run["exit_code"] == 1
    client, run = _mlflow(out)
    assert _mlflow_series(client, run, expected) == expected
    assert run.info.status == "FAILED"


# ---------------------------------------------------------------------------------------------- missing extras


def _uninstall(monkeypatch, *names):
    """Make the top-level packages `names` look uninstalled for the test: a None entry in sys.modules, which
    Python's import system reads as "no such module" (import raises ModuleNotFoundError, importlib.util.find_spec
    returns None); their modules imported already, and torch's TensorBoard writer, are dropped to be imported again."""
    for name in list(sys.modules):
        if name.split(".")[0] in names or name == "torch.utils.tensorboard" and "tensorboard" in names:
            monkeypatch.delitem(sys.modules, name)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


class _Broken:
    """A meta path hook that makes importing the top-level package `name` raise `error`, as a damaged install
    (a dependency of the wrong version) does."""

    def __init__(self, monkeypatch, name, error: ImportError):
        self.name, self.error = name, error
        for module in list(sys.modules):
            if module.split(".")[0] == name:
                monkeypatch.delitem(sys.modules, module)
        monkeypatch.setattr(sys, "meta_path", [self, *sys.meta_path])

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == self.name:
            raise self.error
        return None


@pytest.mark.parametrize("tracker, missing", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                              ("mlflow", "mlflow"), ("mlflow", "sqlalchemy")])
def test_a_missing_extra_is_named_before_the_model_loads(tmp_path, monkeypatch, tracker, missing):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(_rows(1)[0]) + "\n")
    _uninstall(monkeypatch, missing)
    # the model does not exist: an error about it would mean the check came after loading
    with pytest.raises(ConfigError) as e:
        qlorakit.train(model=str(tmp_path / "no-model"), data=str(data), output=str(tmp_path / "out"),
                       report_to=f"tensorboard,{tracker}" if tracker != "tensorboard" else tracker, progress=False,
                       log=lambda _: None)
    assert str(e.value).startswith(f"report_to={tracker}: the {missing} package is not installed")
    assert str(e.value).endswith(f"install the extra: pip install 'qlorakit[{tracker}]'")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_a_broken_tracker_library_is_named(monkeypatch):
    _Broken(monkeypatch, "wandb", ImportError("cannot import name 'builder' from 'google.protobuf'"))
    with pytest.raises(ConfigError) as e:
        check_trackers(("wandb",))
    assert str(e.value) == ("report_to=wandb: the wandb package cannot be imported (ImportError: \"cannot import name "
                            "'builder' from 'google.protobuf'\"); install the extra: pip install 'qlorakit[wandb]'")


def test_mlflow_with_a_tracking_uri_needs_no_local_store_packages(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    _uninstall(monkeypatch, "sqlalchemy", "alembic")
    check_trackers(("mlflow",))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match=r"sqlalchemy package is not installed \(without MLFLOW_TRACKING_URI the "
                                          r"runs go to a SQLite store in the output\)"):
        check_trackers(("mlflow",))


# ---------------------------------------------------------------------------------------------- the record, closing


def test_a_damaged_trackers_record_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = save_tiny_model(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    settings = dict(model=str(model), data=str(tmp_path / "train.jsonl"), output=str(tmp_path / "out"),
                    dtype="fp32", device="cpu", rank=4, alpha=8, max_steps=2, save_every=1, report_to="tensorboard",
                    progress=False, log=lambda _: None)
    qlorakit.train(**settings)
    (tmp_path / "out" / "trackers.json").write_text("{not json")
    (model / "model.safetensors").unlink()  # loading the model now fails: the error must come first
    with pytest.raises(TrainingError, match=r"out/trackers\.json: not the tracker run ids qlorakit writes "
                                            r"\(JSONDecodeError.*\), so --resume cannot continue the same tracker "
                                            r"runs; delete the file to start new ones"):
        qlorakit.train(**settings, resume=True)


@pytest.mark.parametrize("failed", [False, True])
def test_a_tracker_that_cannot_finish(tmp_path, monkeypatch, failed):
    """After a success it is an error (the tool's own named); after a run's error, which goes on, a note."""
    from qlorakit.trackers import Trackers

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notes = []
    trackers = Trackers(tmp_path, notes.append)
    trackers.open(("mlflow",), {"lr": 0.1}, resume_step=None)
    trackers.log({"step": 1, "loss": 2.5})
    (tmp_path / "mlflow" / "mlflow.db").write_bytes(b"not a database" * 100)  # the store broke
    if failed:
        trackers.close(error=TrainingError("step 2: non-finite loss"))
        assert notes[-1].startswith("note: closing the tracker failed too: mlflow: MlflowException: ")
    else:
        with pytest.raises(TrainingError, match=r"the run finished \(its adapter and metrics.jsonl are written\), but "
                                                r"closing its tracker failed — mlflow: MlflowException: .*file is not "
                                                r"a.*; the tracker's record of the run may lack its end"):
            trackers.close()
    trackers.close()  # closed once only: nothing left to close


def test_docs_list_the_messages(monkeypatch):
    """docs/errors.md's trackers section quotes the messages as they are."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    section = docs[docs.index("\n## trackers\n"):]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    messages = []
    with monkeypatch.context() as m:
        _uninstall(m, "wandb", "sqlalchemy")
        for name in ("wandb", "mlflow"):
            with pytest.raises(ConfigError) as e:
                check_trackers((name,))
            messages.append(str(e.value))
    _Broken(monkeypatch, "wandb", ImportError("cannot import name 'builder' from 'google.protobuf'"))
    with pytest.raises(ConfigError) as e:
        check_trackers(("wandb",))
    messages.append(str(e.value))
    for message in messages:
        assert f"`{message}`" in section, message


def test_a_tracker_that_cannot_start_is_a_clear_error(tiny_model_dir, place, monkeypatch):
    """The tool's own start-up failing (here an MLflow store of an unknown kind) names the tracker, the tool's error
    and what to check, instead of a traceback from inside the tool."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nowhere-scheme://store")
    with pytest.raises(ConfigError, match=r"^report_to=mlflow: mlflow could not start its run \(\w+: .+\); check "
                                          r"MLFLOW_TRACKING_URI \(unset: a SQLite store in the output\) and that its "
                                          r"server answers; then run again with --overwrite$"):
        _train(tiny_model_dir, place, report_to="mlflow")


def test_an_output_path_that_mlflows_url_cannot_hold_is_refused_before_the_model_loads(place):
    """A '?', '#' or '%' in the output's path would end or change the URL of MLflow's SQLite store in the output,
    and MLflow would write beside the output: refused, before anything loads or is written."""
    with pytest.raises(ConfigError, match=r"^report_to=mlflow: the output path '.*run\?x' holds '\?', which the "
                                          r"URL of MLflow's SQLite store in the output cannot hold"):
        _train("no-such-model-is-loaded", place, out="run?x", report_to="mlflow")
