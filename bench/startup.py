"""How long the `qlorakit` command takes to answer `--help`, and `import qlorakit`: wall clock of a fresh process,
best of N runs each (the first runs also warm the OS's file cache).

    python bench/startup.py                        # this checkout
    python bench/startup.py --before /tmp/old/src  # and another checkout's src/ beside it, e.g. the last commit:
                                                   #   git worktree add /tmp/old HEAD

Reference rows: the interpreter alone (`python -c pass`), the floor of any command, and `import torch`, which every
command paid before the parser was built from torch-free modules. tests/test_startup.py checks what is imported;
this measures what it costs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [[], ["train"], ["chat"], ["eval"], ["precision"], ["merge"], ["export"], ["export", "gguf"], ["quantize"]]


def best_of(argv: list[str], env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - started)
        if run.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed ({run.returncode}): {run.stderr[-1000:]}")
    return min(times)


def environment(src: str | None) -> dict:
    """The environment that runs a checkout's qlorakit: its src/ first on the path (None: the installed one)."""
    env = dict(os.environ)
    if src is None:
        env.pop("PYTHONPATH", None)
        return env
    env["PYTHONPATH"] = str(Path(src).resolve())
    found = subprocess.run([sys.executable, "-c", "import qlorakit; print(qlorakit.__file__)"], env=env,
                           capture_output=True, text=True).stdout.strip()
    if not found.startswith(env["PYTHONPATH"]):
        sys.exit(f"--before {src}: qlorakit is imported from {found or 'nowhere'}, not from there")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command; the best counts (default 3)")
    parser.add_argument("--before", metavar="SRC", help="another checkout's src/ directory, timed beside this one")
    args = parser.parse_args()

    script = Path(sys.executable).with_name("qlorakit")  # the console script, as users run it
    entry = [str(script)] if script.is_file() else [sys.executable, "-c",
                                                    "import sys; from qlorakit.cli import main; sys.exit(main())"]
    rows = [(f"qlorakit {' '.join(c)} --help".replace("  ", " "), entry + c + ["--help"]) for c in COMMANDS]
    rows += [("python -c 'import qlorakit'", [sys.executable, "-c", "import qlorakit"])]
    references = [("python -c pass", [sys.executable, "-c", "pass"]),
                  ("python -c 'import torch'", [sys.executable, "-c", "import torch"])]
    envs = {"now": environment(None)} | ({"before": environment(args.before)} if args.before else {})

    print(f"wall clock, best of {args.repeats}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    width = max(len(label) for label, _ in rows + references)
    print(f"{'command':<{width}}  " + "  ".join(f"{name:>8}" for name in envs) + ("     ratio" if args.before else ""))
    for label, argv in rows:
        seconds = {name: best_of(argv, env, args.repeats) for name, env in envs.items()}
        ratio = f"  {seconds['before'] / seconds['now']:7.1f}x" if args.before else ""
        print(f"{label:<{width}}  " + "  ".join(f"{s:7.3f}s" for s in seconds.values()) + ratio)
    for label, argv in references:
        print(f"{label:<{width}}  {best_of(argv, envs['now'], args.repeats):7.3f}s  (reference)")


if __name__ == "__main__":
    main()
