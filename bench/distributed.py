"""qlorakit on N processes against itself on one, side by side: the same workload and the same global batch.

    python bench/distributed.py                    # 2 processes vs 1, on the CPU (gloo)
    python bench/distributed.py --device cuda      # one process per GPU (nccl), on a machine with 2+ GPUs
    python bench/distributed.py --fsdp             # the N processes shard the base (FSDP2) instead of DDP

The workload is bench/run.py's: SmolLM2-135M-Instruct, NF4 + double quantization, LoRA r=16 alpha=32 on all linear
layers, chats of mixed lengths, max length 512, every token trained, lr 2e-4 linear; a global batch of 8 (8 on one
process, 8/N on each of N); 2 warm-up steps, then the timed ones. Each side runs `qlorakit train` in its own
processes (N of them through `--nproc-per-node`, torchrun). Reported from the run's metrics.jsonl: tokens per second
over the timed steps (every rank's tokens over rank 0's clock), the peak memory of each rank, and the final loss, which
must agree (the N-process run trains as the one-process run does).

On a CPU the processes share its cores: torchrun gives each process 1 thread, the one process keeps them all, so
expect no gain there — the point is that the result is the same. Speed-ups need a device per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(args, nproc: int, work: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from workload import mixed_length_chats

    data = work / "train.jsonl"
    if not data.exists():
        chats = mixed_length_chats(args.batch_size * (args.warmup + args.steps), seed=0)
        data.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    out = work / f"run-{nproc}"
    command = [sys.executable, "-m", "qlorakit", "train", "--model", args.model, "--data", str(data), "--output",
               str(out), "--quant", "nf4", "--double-quant", "--dtype", args.dtype, "--device", args.device,
               "--rank", str(args.rank), "--alpha", str(args.alpha), "--batch-size", str(args.batch_size // nproc),
               "--max-length", str(args.max_length), "--lr", str(args.lr), "--schedule", "linear",
               "--warmup-steps", "0", "--max-steps", str(args.warmup + args.steps), "--train-on", "all",
               "--seed", "0", "--quiet"]
    if nproc > 1:
        command += ["--nproc-per-node", str(nproc)] + (["--fsdp"] if args.fsdp else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"the {nproc}-process run failed (exit {done.returncode})")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    timed = steps[args.warmup:]
    key = "peak_rss_mib" if "peak_rss_mib" in steps[-1] else "peak_cuda_allocated_mib"
    config = json.loads((out / "config.json").read_text())
    return {
        "processes": nproc,
        "dtype": config["compute_dtype"],
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["tokens"] / r["tokens_per_s"] for r in timed),
        "peak_mib_by_rank": steps[-1].get(f"{key}_by_rank", [steps[-1][key]]),
        "memory": "RSS" if key == "peak_rss_mib" else "CUDA allocated",
        "final_loss": steps[-1]["loss"],
        "wall_s": time.perf_counter() - started,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed side (default 2)")
    p.add_argument("--fsdp", action="store_true", help="the distributed side shards the base (FSDP2)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8, help="the global batch (divided among the processes)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.batch_size % args.nproc:
        p.error(f"--batch-size {args.batch_size} cannot be shared by {args.nproc} processes")

    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for nproc in (1, args.nproc):
            print(f"running {nproc} process(es) ...", file=sys.stderr, flush=True)
            results.append(_run(args, nproc, Path(tmp)))
    one, many = results
    side = "FSDP2" if args.fsdp else "DDP"
    print(f"\nworkload: {args.model}, NF4 + double quant, r={args.rank} alpha={args.alpha:g} all-linear, global batch "
          f"{args.batch_size}, max length {args.max_length}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.device}, {one['dtype']}\n")
    print(f"| | tokens/s | peak {one['memory']} MiB per rank | final loss | vs 1 process |")
    print("|---|---|---|---|---|")
    for r in results:
        label = "1 process" if r["processes"] == 1 else f"{r['processes']} processes ({side})"
        peaks = ", ".join(f"{m:.0f}" for m in r["peak_mib_by_rank"])
        print(f"| {label} | {r['tokens_per_s']:.1f} | {peaks} | {r['final_loss']:.5f} | "
              f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x |")
    print(f"\nfinal losses differ by {abs(many['final_loss'] - one['final_loss']) / one['final_loss']:.1e} (relative)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
