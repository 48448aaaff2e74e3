"""Experiment trackers (`--report-to tensorboard,wandb,mlflow`): each through its own library, an optional extra
imported only when asked for (`pip install qlorakit[NAME]`). They get what metrics.jsonl gets — every number of each
of its records, at that record's step, under the same key — and the run's config (config.json) once. The console
bar, metrics.jsonl and loss.png stay, whatever is reported.

Where the files go: nowhere outside the run's --output unless the user configured the tool to.
- tensorboard: OUTPUT/tensorboard (`tensorboard --logdir OUTPUT/tensorboard`). Scalars are written in float64
  (TensorBoard's double-precision scalar), so they read back exactly; the config as text and as hparams.
- wandb: its directory is OUTPUT (it writes OUTPUT/wandb; WANDB_DIR, when set, wins); the project is WANDB_PROJECT,
  else "qlorakit"; the run's name is the output directory's name; the config is the run's config. Every record is
  a row with its `step` as the x-axis (define_metric), so a resumed run's repeated steps are rows too.
  WANDB_MODE=offline keeps the run on disk for `wandb sync`.
- mlflow: the tracking server or store MLFLOW_TRACKING_URI names, else a SQLite store inside the output,
  OUTPUT/mlflow/mlflow.db (`mlflow ui --backend-store-uri sqlite:///OUTPUT/mlflow/mlflow.db`), which needs
  sqlalchemy and alembic (the extra brings them; MLflow's file store is deprecated); the experiment is
  MLFLOW_EXPERIMENT_NAME, else "qlorakit"; the run's name is the output directory's name; the config is the run's
  params.

A run that fails is marked so where the tool has a status (wandb: exit code 1; mlflow: FAILED, KILLED for an
interrupt; tensorboard: the hparams session's status). A --resume continues where each tool allows, through the ids
recorded in OUTPUT/trackers.json: tensorboard the same directory, dropping what the interrupted run logged after its
checkpoint (purge_step), as metrics.jsonl does; wandb the same run id (resume="allow"; offline, a new run directory
under OUTPUT/wandb with that id, which `wandb sync` adds to the same run); mlflow the same run, set running again.
MLflow keeps every value logged at a step, so steps logged after the checkpoint by the interrupted run stay in its
history beside the resumed run's; its params are write-once, so a resume adds only settings the run lacks.

Values: all three keep float64, so they equal metrics.jsonl's; but MLflow's SQL store keeps an infinite value (the
gradient norm of a step fp16's GradScaler skipped) as +-1.8e308, its largest float.

Names: TensorBoard and W&B take every metrics.jsonl key as it is. MLflow refuses names with characters other than
letters, digits, _ - . : / and space, and names that would resolve to another as a file path (a '.' or '..'
segment, '//', a leading or trailing '/'), longer than 250 characters too; GRPO's reward/<spec> keys hold such
specs (`reward/regex:\\d+`, `reward/../rw.py:fn`). mlflow_name gives the name MLflow gets: each character it
refuses replaced by '_', each '.' or '..' segment by '_' or '__', empty segments dropped (`reward/regex:_d_`,
`reward/__/rw.py:fn`). A key whose name another key has taken already (keys that need no change keep theirs) gets
'-' and the CRC-32 of its exact key appended, the same in every run. Each renamed key is said once in the log;
metrics.jsonl keeps the exact keys.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
import zlib
from pathlib import Path

from .errors import ConfigError, TrainingError, show
from .outputs import atomic_write_json

# What to check when a tracker cannot start a run.
_START_HINTS = {
    "tensorboard": "check that the output directory is writable",
    "wandb": "log in with `wandb login` (or set WANDB_API_KEY), or log without a network with WANDB_MODE=offline",
    "mlflow": "check MLFLOW_TRACKING_URI (unset: a SQLite store in the output) and that its server answers",
}
# Characters a path cannot hold inside MLflow's sqlite:/// URL: they end it or are decoded.
_URL_CUTS = "?#%"
RECORD = "trackers.json"  # in the output: each tracker's run id, what a --resume continues
_RECORD_KEYS = {"wandb": {"id", "project"}, "mlflow": {"run_id", "tracking_uri"}}
# The modules each tracker imports; mlflow's local store (no MLFLOW_TRACKING_URI) also needs SQLAlchemy's.
_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
_MLFLOW_LOCAL_STORE = ("sqlalchemy", "alembic")
# What MLflow's metric names may hold (mlflow.utils.validation: letters, digits and _ - . : / space, no ':' on
# Windows), and how long they may be.
_MLFLOW_REFUSED = re.compile(r"[^\w.\- /]" if os.name == "nt" else r"[^\w.\- :/]")
MLFLOW_NAME_LIMIT = 250


def check_trackers(names: tuple[str, ...], out: Path | None = None, resume: bool = False) -> None:
    """Before minutes of model loading: import what each tracker in `names` needs (a missing or broken library is
    a ConfigError naming the extra that installs it) and, for a run that resumes in `out`, read the tracker runs it
    continues (trackers.json)."""
    if "mlflow" in names:
        # MLflow reports usage to its makers by default (a network call and an id file in the home directory);
        # qlorakit touches the network only for what the user names. Set before mlflow is imported; a user's own
        # MLFLOW_DISABLE_TELEMETRY=false stays.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in names:
        needed = _MODULES[name]
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            needed += _MLFLOW_LOCAL_STORE
        for module in needed:
            try:
                importlib.import_module(module)
            except ImportError as e:
                why = ("is not installed" if isinstance(e, ModuleNotFoundError) and e.name == module
                       else f"cannot be imported ({type(e).__name__}: {show(str(e))})")
                store = (" (without MLFLOW_TRACKING_URI the runs go to a SQLite store in the output)"
                         if module in _MLFLOW_LOCAL_STORE else "")
                raise ConfigError(f"report_to={name}: the {module} package {why}{store}; install the extra: "
                                  f"pip install 'qlorakit[{name}]'") from None
    if "mlflow" in names and out is not None and not os.environ.get("MLFLOW_TRACKING_URI"):
        cut = sorted(set(_URL_CUTS) & set(str(Path(out).resolve())))
        if cut:
            raise ConfigError(f"report_to=mlflow: the output path {str(out)!r} holds {', '.join(map(repr, cut))}, "
                              "which the URL of MLflow's SQLite store in the output cannot hold (MLflow would write "
                              "beside the output); choose an output path without them, or name a store with "
                              "MLFLOW_TRACKING_URI")
    if names and resume:
        read_record(Path(out))


def read_record(out: Path) -> dict:
    """trackers.json of the run in `out`: {tracker: its run's ids}, {} when there is none."""
    path = Path(out) / RECORD
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        saved = e
    if not (isinstance(saved, dict) and set(saved) <= set(_RECORD_KEYS)
            and all(isinstance(v, dict) and set(v) == _RECORD_KEYS[k] for k, v in saved.items())):
        raise TrainingError(f"{path}: not the tracker run ids qlorakit writes ({show(saved)}), so --resume cannot "
                            f"continue the same tracker runs; delete the file to start new ones")
    return saved


def _numbers(record: dict) -> dict:
    """The values a tracker logs from a metrics.jsonl record: every number but the step (a bool as 0 or 1)."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))}


def _tagged(name: str, key: str) -> str:
    """`name` with '-' and the CRC-32 of `key` (8 hex digits) at its end, within MLflow's length limit."""
    tag = f"-{zlib.crc32(key.encode('utf-8', 'surrogatepass')):08x}"
    return name[:MLFLOW_NAME_LIMIT - len(tag)] + tag


def mlflow_name(key: str) -> str:
    """The metric name MLflow gets for the metrics.jsonl key `key`: `key` itself when MLflow takes it; else each
    character MLflow refuses replaced by '_', each '.' or '..' path segment by '_' or '__', the dots a name starts
    with when it starts with '..' too, and empty segments (a '//', a leading or trailing '/') dropped, so that the
    name is no file path resolving to another; a name past MLflow's 250 characters cut, with the CRC-32 of `key`
    at its end."""
    segments = _MLFLOW_REFUSED.sub("_", key).split("/")
    name = "/".join("_" * len(s) if s in (".", "..") else s for s in segments if s) or "_"
    if name.startswith(".."):  # MLflow refuses any name that starts so ("..x" too), as a path leaving its folder
        dots = len(name) - len(name.lstrip("."))
        name = "_" * dots + name[dots:]
    return name if len(name) <= MLFLOW_NAME_LIMIT else _tagged(name, key)


def _text(value) -> str:
    """A config value as a tracker's string parameter: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class Trackers:
    """The run's open trackers. `open` starts them, `log` sends a metrics.jsonl record to each, `close` ends them —
    as failed when the run ended with an error — and is called however the run ends (train() does)."""

    def __init__(self, out: Path, log=print):
        self.out, self.say = Path(out), log
        self.runs: list = []
        self.record: dict = {}  # trackers.json

    def open(self, names: tuple[str, ...], config: dict, resume_step: int | None) -> None:
        """Start a run in each tracker of `names` (or continue the run trackers.json names, for a resumed run
        continuing after `resume_step`) and give it the run's `config`."""
        saved = read_record(self.out) if resume_step is not None else {}
        self.record = dict(saved)  # trackers of the interrupted run that this one does not open stay recorded
        kinds = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}
        for name in names:
            try:
                run = kinds[name](self.out, config, resume_step, saved.get(name), self.say)
            except Exception as e:  # the tool's own start-up: no login, a store or server that does not answer
                raise ConfigError(f"report_to={name}: {name} could not start its run ({type(e).__name__}: "
                                  f"{show(str(e).strip().splitlines()[0] if str(e).strip() else '')}); "
                                  f"{_START_HINTS[name]}; then run again with --overwrite") from None
            self.runs.append(run)
            if run.record is not None:
                self.record[name] = run.record
                atomic_write_json(self.out / RECORD, self.record)

    def log(self, record: dict) -> None:
        values = _numbers(record)
        if self.runs and values:
            for run in self.runs:
                run.log(record["step"], values)

    def close(self, error: BaseException | None = None) -> None:
        """End every run (idempotent). After a success a tracker that cannot finish is a TrainingError; after an
        error (which goes on) it is a note, the tool's own error named."""
        problems = []
        for run in reversed(self.runs):
            try:
                run.close(error)
            except Exception as e:
                problems.append(f"{run.name}: {type(e).__name__}: {show(str(e))}")
        self.runs = []
        if problems and error is None:
            raise TrainingError(f"{self.out}: the run finished (its adapter and metrics.jsonl are written), but "
                                f"closing its tracker failed — {'; '.join(problems)}; the tracker's record of the "
                                f"run may lack its end")
        for problem in problems:
            self.say(f"note: closing the tracker failed too: {problem}")


# ---------------------------------------------------------------------------------------------- the trackers


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, out: Path, config: dict, resume_step: int | None, saved: dict | None, log):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = out / "tensorboard"
        # purge_step: a session-start event at that step. TensorBoard takes the first as the run's start and each
        # later one as a restart, dropping what was logged from its step on: a resume drops what the interrupted
        # run logged after its checkpoint, as metrics.jsonl does.
        self.writer = SummaryWriter(str(self.dir), purge_step=0 if resume_step is None else resume_step + 1)
        self.record = None  # the directory is all a resume needs
        step = resume_step or 0
        self.writer.add_text("config", "    " + json.dumps(config, indent=2, sort_keys=True).replace("\n", "\n    "),
                             global_step=step)  # (indented: Markdown shows it as code)
        values = {k: v if isinstance(v, (bool, int, float, str)) else _text(v) for k, v in config.items()}
        experiment, session_start, _ = hparams(values, dict.fromkeys(("loss", "eval_loss"), 0.0))
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary, step)
        self.writer.flush()
        log(f"tensorboard: logging to {self.dir} (view: tensorboard --logdir {self.dir})")

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
        self.writer.flush()  # on disk at every record, as metrics.jsonl: a killed run loses nothing it logged

    def close(self, error: BaseException | None) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import metadata
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

        status = "STATUS_SUCCESS" if error is None else "STATUS_FAILURE"
        content = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, session_end_info=SessionEndInfo(
            status=Status.Value(status), end_time_secs=time.time()))
        plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(
            tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))]))
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, out: Path, config: dict, resume_step: int | None, saved: dict | None, log):
        import wandb

        project = saved["project"] if saved else os.environ.get("WANDB_PROJECT") or "qlorakit"
        self.run = wandb.init(
            project=project, name=out.resolve().name, dir=None if os.environ.get("WANDB_DIR") else str(out),
            id=saved["id"] if saved else None, resume="allow" if saved else None)
        self.run.config.update(config, allow_val_change=True)  # a resume may change settings (max_steps...)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.record = {"id": self.run.id, "project": project}
        log(f"wandb: {'continuing' if saved else 'logging to'} run {self.run.id} of project {project} "
            f"({self.run.dir})")

    def log(self, step: int, values: dict) -> None:
        self.run.log({"step": step} | values)

    def close(self, error: BaseException | None) -> None:
        self.run.finish(exit_code=0 if error is None else 1)


class _MLflow:
    name = "mlflow"

    def __init__(self, out: Path, config: dict, resume_step: int | None, saved: dict | None, log):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # The store: the one the run started in (a resume), else MLFLOW_TRACKING_URI, else SQLite in the output
        # (recorded as None: the output's own store, wherever the output is moved).
        uri = saved["tracking_uri"] if saved else os.environ.get("MLFLOW_TRACKING_URI") or None
        store = out.resolve() / "mlflow"
        if uri is None:
            store.mkdir(exist_ok=True)
        local = f"sqlite:///{store / 'mlflow.db'}"  # (check_trackers refused paths a URL would cut or change)
        self.client = MlflowClient(tracking_uri=uri or local)
        if saved:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "qlorakit"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                name, artifact_location=(store / "artifacts").as_uri() if uri is None else None)
            self.run_id = self.client.create_run(experiment_id, run_name=out.resolve().name).info.run_id
            logged = {}
        # params are write-once: a resume adds the settings the run lacks, its config.json has the rest
        self.client.log_batch(self.run_id, params=[Param(k, _text(v)) for k, v in config.items() if k not in logged])
        self.record = {"run_id": self.run_id, "tracking_uri": uri}
        self.say = log
        self.names: dict[str, str] = {}  # metrics.jsonl key -> its MLflow name
        self.keys: dict[str, str] = {}  # MLflow name -> the key it holds
        where = uri or f"{local} (view: mlflow ui --backend-store-uri {local}, with the full mlflow package)"
        log(f"mlflow: {'continuing' if saved else 'logging to'} run {self.run_id} in {where}")

    def _name(self, key: str) -> str:
        if key not in self.names:
            name = mlflow_name(key)
            if name in self.keys:  # another key's name already: this one is told apart by its own CRC
                name = _tagged(name, key)
                while name in self.keys:  # (a CRC collision as well: practically never)
                    name = _tagged(name, name)
            self.names[key], self.keys[name] = name, key
            if name != key:
                self.say(f"mlflow: the metric {key!r} is logged as {name!r} (MLflow's names hold only letters, "
                         "digits, _ - . : / and spaces, and no '.', '..' or empty path segments)")
        return self.names[key]

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        # Keys MLflow takes as they are claim their names first: a renamed key cannot take a name from one of them
        # logged at the same step (GRPO logs each reward's keys at every step).
        for key in sorted(values, key=lambda k: mlflow_name(k) != k):
            self._name(key)
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self._name(k), float(v), now, step)
                                                    for k, v in values.items()])

    def close(self, error: BaseException | None) -> None:
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.client.set_terminated(self.run_id, status)
