"""Everything qlorakit writes goes through here: claiming an output, its lock, atomic writes, stale temporaries.

The rules (DESIGN.md: never change a file outside the output the user named; one run per output at a time):

- An output directory is written only when it is new or empty, or when qlorakit wrote it: a marker file,
  `.qlorakit-output` (JSON: the kind of output, the files qlorakit put there, the process that holds it), says so.
  `overwrite` replaces an earlier output of the same kind; it never replaces a file qlorakit did not write.
  An output that is one file has no marker: a GGUF file is recognised as ours by the `qlorakit.version` key
  qlorakit writes into its metadata, a file of eval answers (JSON lines) by the fields of its first line.
- A run holds an exclusive lock (fcntl.flock) on its output for as long as it writes it: on the marker of a run
  directory, on its staging temporary for a merged, quantized, GGUF or eval answers output. The OS releases a lock
  when its process dies, so there are no stale locks; a second run finds the holder and refuses, naming its process
  id.
- Every file and directory is first written under a temporary name beside its target,
  `.NAME.qlorakit-PID-TOKEN[.tmp]`, locked while it is written, then renamed into place. A temporary whose lock
  nobody holds belongs to a dead process: the next claim of that output removes it.
- Files and directories are created with the mode the user's umask gives (not mkstemp's 0600 / mkdtemp's 0700).
- An earlier output is moved aside (`.old`) in the instant between its replacement's two renames; a kill there
  leaves no output, and the next run on it puts the earlier one back.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import time
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, TrainingError

MARKER = ".qlorakit-output"
GGUF_KEY = "qlorakit.version"
# What a training run writes into its directory: the adapter and its model card (README.md), the run's records,
# checkpoints, what --report-to trackers keep there (trackers.json holds their run ids for a --resume), and a
# preference run's reference log-probabilities (preference.REFERENCE_FILE).
TRAIN_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "qlorakit.json", "config.json",
               "metrics.jsonl", "loss.png", "checkpoints", "trackers.json", "tensorboard", "wandb", "mlflow",
               "reference_logps.safetensors")
DESCRIBE = {"train": "training run", "merge": "merged model", "quantize": "quantized model", "gguf": "GGUF file",
            "eval": "file of eval answers"}
# The longest first line of a file of eval answers read to recognise it (a line is one example's prompt and answers).
_MAX_ANSWER_LINE = 16 << 20
_TEMP = re.compile(r"^\.(?P<name>.+)\.qlorakit-(?P<pid>\d+)-(?P<token>[0-9a-f]+)(?P<suffix>\.[a-z]+)?$")
# An earlier run moved aside by a run that replaces it (see RunClaim); the three names are the three states.
_ASIDE = ("replacing-run", "replaced-run", "restoring-run")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def version() -> str:
    from . import __version__

    return __version__


def _temp_name(name: str, suffix: str = "") -> str:
    return f".{name}.qlorakit-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def is_temporary(name: str) -> bool:
    return _TEMP.match(name) is not None


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _NO_SPACE


# ------------------------------------------------------------------------------------------------- locks


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _give_umask_modes(path: Path) -> None:
    """The modes a plain open() or mkdir() would have given, on `path` and everything under it: some writers
    (safetensors: 0600) choose their own."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _still_there(path: Path, fd: int) -> bool:
    """After locking: the path still names the locked file (a sweeper may have removed it just before)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _new_temp_file(target: Path) -> tuple[Path, int]:
    """A new, locked, empty temporary file beside `target` (mode from the umask)."""
    while True:
        tmp = target.parent / _temp_name(target.name, ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        if _try_lock(fd) and _still_there(tmp, fd):
            return tmp, fd
        os.close(fd)  # a sweeper took it between the create and the lock: take another name


def _new_temp_dir(target: Path) -> tuple[Path, int]:
    """A new temporary directory beside `target`, locked through the marker file inside it."""
    while True:
        tmp = target.parent / _temp_name(target.name)
        os.mkdir(tmp, 0o777)
        try:
            fd = os.open(tmp / MARKER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            continue  # removed by a sweeper before we locked it
        if _try_lock(fd) and _still_there(tmp / MARKER, fd):
            return tmp, fd
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_if_stale(entry: Path) -> int | None:
    """Remove a temporary whose lock nobody holds; return the process id of its live holder, else None."""
    is_dir = entry.is_dir() and not entry.is_symlink()
    lock = entry / MARKER if is_dir else entry
    try:  # a directory caught before its creator made the lock file gets one, so the creator sees it taken
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if is_dir else 0), 0o666)
    except OSError:
        return None  # gone already, or not ours to open
    try:
        if not _try_lock(fd):
            match = _TEMP.match(entry.name)
            return int(match["pid"]) if match else -1
        _remove(entry)
        return None
    finally:
        os.close(fd)


def _sweep_beside(target: Path, keep: Path | None = None) -> list[int]:
    """Remove the stale temporaries named after `target` beside it; return the process ids of live ones."""
    return _sweep(target.parent, target.name, keep)


def _sweep(directory: Path, name: str | None = None, keep: Path | None = None) -> list[int]:
    """Remove the stale temporaries in `directory` (only those named after `name`, when given); return the process
    ids of live ones. An earlier output a killed run had moved aside (`.old`, see _replace) goes back in place when
    nothing took its place; it is left alone while a run on that name is live (it may be between its renames)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:  # not there (yet), or not a directory: nothing to sweep
        return []
    holders, live, aside = [], set(), []
    for entry in entries:
        match = _TEMP.match(entry.name)
        if not match or entry == keep or name not in (None, match["name"]):
            continue
        if match["suffix"] == ".old":
            aside.append((entry, match["name"]))
            continue
        pid = _remove_if_stale(entry)
        if pid is not None:
            holders.append(pid)
            live.add(match["name"])
    for entry, original in aside:
        if original in live:
            continue
        if not os.path.lexists(directory / original):
            try:
                os.rename(entry, directory / original)
                continue
            except OSError:
                pass  # another sweeper put one back first
        _remove(entry)
    return holders


def _read_marker(directory: Path) -> dict | None:
    path = directory / MARKER
    for _ in range(5):  # its holder rewrites it in place; a read in that instant sees it half-written
        try:  # (non-blocking, and only a regular file: a FIFO named like the marker would block the read forever)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                value = json.loads(f.read(1 << 20).decode("utf-8"))
            return value if isinstance(value, dict) else None
        except (OSError, ValueError):
            time.sleep(0.02)
        finally:
            os.close(fd)
    return None


def _write_marker(fd: int, kind: str, files) -> None:
    """Rewrite the marker through its locked descriptor (replacing the file would drop the lock)."""
    data = json.dumps({"written_by": f"qlorakit {version()}", "kind": kind, "files": sorted(files),
                       "pid": os.getpid()}, indent=1).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _directory_holder(directory: Path) -> int | None:
    """The process id holding a qlorakit output directory's lock, or None when nobody does."""
    try:
        fd = os.open(directory / MARKER, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            return None
        return int((_read_marker(directory) or {}).get("pid") or -1)
    finally:
        os.close(fd)


def _in_use(path: Path, pid: int, what: str):
    holder = f"process {pid}" if pid > 0 else "another process"
    return ConfigError(f"{path}: in use by another qlorakit run ({holder} holds its lock); wait for it to finish "
                       f"or choose another {what}")


# ------------------------------------------------------------------------------------------------- checks


def _gguf_is_ours(path: Path) -> bool:
    """Whether qlorakit wrote this (regular) file: its header's metadata keys, walked with every length bounded by
    the file's size (never a reader over a possibly huge or hostile file)."""
    from .errors import SourceError
    from .load import check_gguf_file

    try:
        return GGUF_KEY in check_gguf_file(path)
    except (SourceError, OSError, ValueError):  # damaged, unreadable or not a GGUF file: not one qlorakit wrote
        return False


def _answers_are_ours(path: Path) -> bool:
    """Whether `qlorakit eval --output` wrote this (regular) file: its first line, read up to a bounded length, is
    a JSON object of exactly the fields it writes (evaluate.ANSWER_FIELDS; on prompt data REWARD_ANSWER_FIELDS)."""
    from .evaluate import ANSWER_FIELDS, REWARD_ANSWER_FIELDS

    try:
        with open(path, "rb") as f:
            value = json.loads(f.readline(_MAX_ANSWER_LINE).decode("utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON, or a first line past the bound
        return False
    return isinstance(value, dict) and set(value) in (set(ANSWER_FIELDS), set(REWARD_ANSWER_FIELDS))


# The outputs that are one file, not a directory: kind -> (what --output names, how a file qlorakit did not write
# shows, whether qlorakit wrote the file at a path).
_FILE_OUTPUTS = {
    "gguf": (".gguf file", f"its metadata has no {GGUF_KEY} key", _gguf_is_ours),
    "eval": (".jsonl file", "its first line is not an eval answer: where, prompt, expected, got, correct",
             _answers_are_ours),
}


def check_output(path: str | Path, kind: str, overwrite: bool = False, resume: bool = False,
                 what: str = "--output", earlier: str | None = None) -> Path:
    """Refuse an output qlorakit must not write, before any work: a foreign file or directory, an earlier output
    without `overwrite`, one of another kind, or one a live run holds. Changes nothing; returns the path.

    `kind` is train (a run directory), merge or quantize (directories written whole), gguf or eval (a file);
    `resume` lets a training run continue in its directory; `earlier` is the advice given when an earlier output is
    there and `overwrite` is off."""
    path = _inspect(Path(path).expanduser(), kind, overwrite, resume, what, earlier)
    if kind not in _FILE_OUTPUTS and path.is_dir():
        holder = _directory_holder(path)
        if holder is not None:
            raise _in_use(path, holder, what)
    return path


def _inspect(path: Path, kind: str, overwrite: bool, resume: bool, what: str, earlier: str | None) -> Path:
    """check_output without the lock: what the path holds."""
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{path}: a broken symbolic link; choose another {what}")
    if not path.exists():
        return path
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # before anything opens it: a FIFO's read never returns
        names = _FILE_OUTPUTS[kind][0] if kind in _FILE_OUTPUTS else "directory"
        raise ConfigError(f"{path}: is not a regular file or directory (a FIFO, socket or device); {what} names the "
                          f"{names} to write: choose another path")
    if kind in _FILE_OUTPUTS:
        names, not_ours, is_ours = _FILE_OUTPUTS[kind]
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory; {what} names the {names} to write")
        if not is_ours(path):
            raise ConfigError(
                f"{path}: already exists and was not written by qlorakit ({not_ours}); "
                f"qlorakit replaces only its own files, even with --overwrite: choose another {what}")
        if not overwrite:
            raise ConfigError(f"{path}: already exists (a {DESCRIBE[kind]} qlorakit wrote); choose another {what} or "
                              "pass --overwrite to replace it")
        return path
    if not path.is_dir():
        raise ConfigError(f"{path}: is a file, not a directory; {what} names the directory to write the "
                          f"{DESCRIBE[kind]} to: choose another path")
    entries = sorted(e.name for e in path.iterdir() if e.name != MARKER and not is_temporary(e.name))
    if not entries:
        return path
    marker = _read_marker(path)
    owner = marker.get("kind") if marker else None
    known = set(marker.get("files", [])) if marker else set()
    if owner is None and kind == "train" and set(entries) <= set(TRAIN_FILES) and (
            {"metrics.jsonl", "checkpoints"} & set(entries)):
        owner = "train"  # a run written before qlorakit marked its outputs
    if owner == "train":
        known |= set(TRAIN_FILES)
    foreign = [name for name in entries if owner not in DESCRIBE or name not in known]
    if foreign:
        raise ConfigError(
            f"{path}: already exists and is not empty: it holds {foreign[0]}, which qlorakit did not write. "
            f"qlorakit writes only into a new or empty directory or one it wrote"
            f"{' (--overwrite replaces only its own files)' if overwrite else ''}: choose another {what}")
    if owner != kind:
        raise ConfigError(f"{path}: holds a qlorakit {DESCRIBE[owner]}, not a {DESCRIBE[kind]}; choose another "
                          f"{what}")
    if overwrite or (resume and kind == "train"):
        return path
    if kind == "train":
        raise TrainingError(f"{path}: holds an earlier run (checkpoints or metrics.jsonl); " + (
            earlier or "continue it with --resume, choose another --output, or replace it with --overwrite"))
    raise ConfigError(f"{path}: already exists and is not empty (a {DESCRIBE[kind]} qlorakit wrote); "
                      + (earlier or f"choose another {what} or pass --overwrite to replace it"))


# ------------------------------------------------------------------------------------------------- a run directory


class RunClaim:
    """A training run's hold on its directory: the lock (for the run's lifetime) and the replacement of an earlier
    run, which is moved aside when the new run first writes and deleted once the new run has a checkpoint or its
    adapter (`commit`). Should the new run end before that, its files go and the earlier run comes back: at once
    when it fails in this process (`release`), at the next claim when it was killed."""

    def __init__(self, path: Path, fd: int, resume: bool = False):
        self.path, self._fd, self._aside, self.resume = path, fd, None, resume
        self.made: list[Path] = []  # the marker and directory the claim created, if it did
        self.writing = False  # the run has started writing its files (replace_previous)

    def replace_previous(self) -> None:
        """Move an earlier run's files aside (a resumed run continues its own instead)."""
        self.writing = True
        present = [name for name in TRAIN_FILES if (self.path / name).exists()]
        if self.resume or not present:
            return
        aside = self.path / _temp_name(_ASIDE[0])
        os.mkdir(aside, 0o777)
        for name in present:
            os.replace(self.path / name, aside / name)
        self._aside = self.path / _temp_name(_ASIDE[1])
        os.replace(aside, self._aside)  # every file of the earlier run is aside now; the new run may write

    def commit(self) -> None:
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None

    def release(self) -> bool:
        """Unlock; True when an earlier run had to be put back (this one ended before replacing it). A run that
        ended before it wrote anything (refused, or failed while loading) leaves no directory it made behind."""
        if self._fd is None:
            return False
        for made in self.made if not self.writing else ():
            with contextlib.suppress(OSError):  # (rmdir: only when empty, never what another run put there)
                made.unlink() if made.name == MARKER else made.rmdir()
        try:
            if self._aside is None:
                return False
            _restore(self.path, self._aside, finished=False)
            self._aside = None
            return True
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _restore(directory: Path, aside: Path, finished: bool) -> None:
    """Bring an earlier run back from `aside` (or, when the new run `finished` its first checkpoint or adapter, let
    it go). The states are renames, so a kill at any point leaves a state the next claim can finish."""
    state = _TEMP.match(aside.name)["name"]
    if state == _ASIDE[1]:
        if finished:
            shutil.rmtree(aside, ignore_errors=True)
            return
        for name in TRAIN_FILES:  # the new run's files, none of which replaced the earlier run's yet
            _remove(directory / name)
        restoring = directory / _temp_name(_ASIDE[2])
        os.replace(aside, restoring)
        aside = restoring
    for entry in aside.iterdir():  # replacing-run (moving aside was cut short) or restoring-run: move back
        os.replace(entry, directory / entry.name)
    aside.rmdir()


def _new_run_finished(directory: Path) -> bool:
    from .checkpoint import list_checkpoints

    return bool(list_checkpoints(directory / "checkpoints")) or all(
        (directory / name).is_file() for name in ("adapter_config.json", "adapter_model.safetensors"))


def claim_run_directory(path: str | Path, overwrite: bool = False, resume: bool = False) -> RunClaim:
    """Check and lock a training run's directory (creating it); stale temporaries of dead runs in it are removed
    and an earlier run that a killed run was replacing is put back. Release it with `release()`."""
    # Foreign or other files are refused before the marker is made; an earlier run only under the lock, once a run
    # killed while replacing it has been undone.
    path = Path(path).expanduser()
    _sweep_beside(path)  # first: a merge killed while replacing an output of this name put back, then refused
    path = _inspect(path, "train", overwrite, True, "--output", None)
    if path.is_dir() and (holder := _directory_holder(path)) is not None:
        raise _in_use(path, holder, "--output")
    made = [p for p in (path / MARKER, path) if not p.exists()]  # (removed again should the run be refused)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / MARKER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the run directory ({e.strerror}); choose another --output") from e
    if not _try_lock(fd):
        os.close(fd)
        raise _in_use(path, int((_read_marker(path) or {}).get("pid") or -1), "--output")
    claim = RunClaim(path, fd, resume)
    claim.made = made
    try:
        holders = _sweep_beside(path)  # a merge or quantize staging into the same name
        if holders:
            raise _in_use(path, holders[0], "--output")
        for entry in sorted(path.iterdir()):
            match = _TEMP.match(entry.name)
            if match and match["name"] in _ASIDE:
                _restore(path, entry, finished=_new_run_finished(path))
        for directory in (path, path / "checkpoints"):
            _sweep(directory)
        _inspect(path, "train", overwrite, resume, "--output", None)  # again: it may have changed before the lock
        _write_marker(fd, "train", TRAIN_FILES)
    except BaseException:
        claim.release()
        raise
    return claim


# ------------------------------------------------------------------------------------------------- whole outputs


def _disk_full(target: Path, kind: str):
    intact = (f"the earlier {DESCRIBE[kind]} there is unchanged" if target.exists() else "nothing was written there")
    return ConfigError(f"{target}: the disk is full (no space left on device); {intact} and the partial new one was "
                       "removed. Free some space (or choose another --output) and run again")


def _fsync_files(path: Path) -> None:
    """On disk before the rename that publishes them (else a power cut can leave a complete-looking empty file)."""
    for f in [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]:
        with open(f, "rb") as handle:  # (by name: a writer may have replaced the file we made)
            os.fsync(handle.fileno())


def _replace(staging: Path, target: Path) -> None:
    """Move a finished staging directory or file into place; an earlier output is removed only once the new one
    is in place (a directory cannot be renamed over a non-empty one: the old one is renamed aside first; a kill
    between the renames leaves it aside, and the next sweep puts it back)."""
    if target.is_dir() and not target.is_symlink():
        old = target.parent / _temp_name(target.name, ".old")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _keep_existing(staging: Path, target: Path) -> None:
    """Move a finished staging directory into place unless another process put an equal one there first."""
    try:
        os.rename(staging, target)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise


@contextmanager
def _publishing(target: Path, is_dir: bool, place=_replace) -> Iterator[tuple[Path, int]]:
    """The steps every write shares: the parent directory; a locked temporary beside `target` (a directory or a
    file) for the caller's block to write; then its files go to disk, get the umask's modes, and `place(temporary,
    target)` publishes them. The temporary goes whatever happens. Yields (temporary, the descriptor holding its
    lock)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = (_new_temp_dir if is_dir else _new_temp_file)(target)
    try:
        yield tmp, fd
        _fsync_files(tmp)
        _give_umask_modes(tmp)
        place(tmp, target)
    finally:
        _remove(tmp)  # gone already when it was put in place
        os.close(fd)


@contextmanager
def staged_output(path: str | Path, kind: str, overwrite: bool = False, what: str = "--output") -> Iterator[Path]:
    """Write a whole output (merge, quantize: a directory; gguf, eval: a file) into a locked staging temporary
    beside it, and put it in place when the block ends without an error. Checks as check_output, removes stale
    temporaries of dead runs on this output, refuses while another run holds it. A full disk becomes an error naming
    the path."""
    path = check_output(path, kind, overwrite, what=what)
    started = False
    try:
        with _publishing(path, kind not in _FILE_OUTPUTS) as (staging, fd):
            started = True
            holders = _sweep_beside(path, keep=staging)
            if holders:
                raise _in_use(path, holders[0], what)
            # Again, holder included, now that this run holds its lock: a training run claims its directory, then
            # sweeps beside it, so one of the two always sees the other.
            check_output(path, kind, overwrite, what=what)
            yield staging
            if kind not in _FILE_OUTPUTS:
                _write_marker(fd, kind, [e.name for e in staging.iterdir() if e.name != MARKER])
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full(path, kind) from None
        if started:
            raise
        why = ("a part of its path is a file, not a directory" if e.errno in (errno.EEXIST, errno.ENOTDIR)
               else e.strerror)  # (mkdir's "File exists" would not say which)
        raise ConfigError(f"{path}: cannot write here ({why}); choose another {what}") from e


# ------------------------------------------------------------------------------------------------- atomic files


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; it replaces `path` when the block ends without an error."""
    with _publishing(Path(path), is_dir=False) as (tmp, _):
        yield tmp


@contextmanager
def atomic_directory(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; it replaces `path` when the block ends without an error (with
    `replace` off, a directory another process put there first stays, and this one goes). Temporaries dead runs
    left beside it are removed."""
    path = Path(path)
    with _publishing(path, True, _replace if replace else _keep_existing) as (tmp, _):
        _sweep_beside(path, keep=tmp)
        yield tmp
        (tmp / MARKER).unlink()  # an internal directory (a checkpoint, a cache), not an output of its own


@contextmanager
def staged_files(directory: str | Path, order: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary directory beside the files to write into `directory`; when the block ends without an error each
    file in it replaces its namesake in `directory` (one rename each: every file is whole, the old or the new),
    those named in `order` first and in that order (a set of files that must be read together orders its renames
    so that every state between them is recognisable: adapters.save_adapter)."""
    directory = Path(directory)
    rank = {name: i for i, name in enumerate(order)}

    def place(tmp: Path, _target: Path) -> None:
        files = [f for f in tmp.iterdir() if f.name != MARKER]
        for f in sorted(files, key=lambda f: (rank.get(f.name, len(order)), f.name)):
            os.replace(f, directory / f.name)

    with _publishing(directory / "files", True, place) as (tmp, _):
        yield tmp


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path: str | Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Add one line to a log file (metrics.jsonl) in a single write at its end: a kill cuts at most the last line,
    which its reader drops (rewriting the whole log atomically at every step would cost a copy per step)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
