"""How the processes of a run start and end: the launcher's environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK),
the shortcut `qlorakit train --nproc-per-node N` (torchrun on this machine), and ranks tied to their launcher's
life. Imports no torch at module level: `qlorakit`'s main ties a rank to its launcher before anything heavy loads.
The process group the ranks then form is distributed.py's."""

from __future__ import annotations

import logging
import os
import signal
import sys

from .errors import ConfigError


def env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name}={text!r}: the launcher's environment for several processes (torchrun sets RANK, "
                          "WORLD_SIZE, LOCAL_RANK) holds a number from 0 up here; unset it, or start the run with "
                          "torchrun")
    return value


def launched() -> bool:
    """True in a process that torchrun (or accelerate launch) started as one of several."""
    return env_int("WORLD_SIZE", 1) > 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without one)."""
    return env_int("RANK", 0) if launched() else 0


LAUNCHER_PID = "QLORAKIT_LAUNCHER_PID"  # set by `launch` for its ranks: the pid of the launcher whose death ends them


def die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a launcher killed outright (kill -9, a scheduler's
    kill) would leave its ranks training on as orphans — and writing the outputs. On Linux a rank asks the kernel
    to kill it when its parent dies (PR_SET_PDEATHSIG), first thing in `qlorakit`'s main; a launcher gone before
    then (its pid, from `launch`, or the parent the rank started with) ends the rank at once. Only in a process a
    launcher started; calling it again does nothing more."""
    if not launched() or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = int(os.environ.get(LAUNCHER_PID, "0") or 0) or os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl here: the ranks outlive a killed launcher, as torchrun's do
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def launch(argv: list[str], nproc: int, command: str = "train") -> int:
    """`qlorakit train --nproc-per-node N ...` (or `dpo`: `command`): torchrun, on this machine, starting N
    processes of `qlorakit train ...` (argv without the flag). If one fails, torchrun stops the others; the one that failed first is named
    (torchrun's own log lines are left out: this says what they would). Its log directory is a temporary one."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ConfigError(f"--nproc-per-node {nproc}: the number of processes must be at least 1")
    logs = tempfile.TemporaryDirectory(prefix="qlorakit-torchrun-")
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--log-dir", logs.name,
                                         "--module", "qlorakit"])
    args.training_script_args = [command, *argv]  # (not through torchrun's parser, which reads flags it shares)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    for name in ("torch.distributed.elastic", "torch.distributed.run"):  # (its OMP_NUM_THREADS=1 notice included:
        logging.getLogger(name).setLevel(logging.CRITICAL)               # the README says it)
    try:
        run(args)
    except SignalException as e:  # Ctrl-C (SIGINT) or SIGTERM to the launcher: torchrun has stopped the ranks
        name = signal.Signals(e.sigval).name
        print(f"qlorakit: interrupted ({name}): torchrun stopped the ranks; continue from the last checkpoint with "
              "--resume", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # The first rank to fail is the cause; torchrun then stopped the others (SIGTERM), listed as failures too.
        rank, failure = e.get_first_failure()
        if failure.exitcode != 2:  # 2: qlorakit's own error, which the rank has said
            print(f"qlorakit: error: rank {rank} of {nproc} {_how_it_ended(failure.exitcode)}; torchrun stopped the "
                  "other ranks", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    finally:
        logs.cleanup()
    return 0


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"
