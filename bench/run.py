"""qlorakit against the HF stack (TRL SFTTrainer + PEFT + bitsandbytes), side by side, each in its own process.

    python bench/run.py                       # the default workload, CPU
    python bench/run.py --steps 4 --warmup 1  # shorter

Default workload: SmolLM2-135M-Instruct (the default model), NF4 + double quantization, LoRA r=16 alpha=32 on all
linear layers, batch 8, max length 512, chats of mixed lengths, every token trained (TRL's default for chat data),
learning rate 2e-4 with a linear schedule, the same compute dtype on both sides; 2 warm-up steps, then 8 timed ones.
Reported: real (non-pad) tokens per second over the timed steps, peak RSS of the process (CPU) or max allocated
(CUDA), and the loss on 16 held-out chats after the run, computed the same way for both. The HF stack runs with
TRL's defaults (gradient checkpointing on) and again with TRL's packing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_HELDOUT = 16


def _peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _worker_hf(args, chats, heldout, dtype) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from workload import hf_stack_base

    model, tokenizer = hf_stack_base(args.model, dtype, args.device)
    timings: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            timings.append([time.perf_counter() - self.start, 0])

    class CountingTrainer(SFTTrainer):
        tokens_this_step = 0

        def training_step(self, model, inputs, *rest, **kw):
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            real = int(mask.sum()) if mask is not None else int((ids != tokenizer.pad_token_id).sum())
            CountingTrainer.tokens_this_step += real
            return super().training_step(model, inputs, *rest, **kw)

    class TokenCallback(TrainerCallback):
        def on_step_end(self, *a, **k):
            timings[-1][1] = CountingTrainer.tokens_this_step
            CountingTrainer.tokens_this_step = 0

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="linear", logging_steps=1,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=args.device == "cpu",
        report_to="none", save_strategy="no", packing=args.worker == "hf-packing", seed=0,
        dataloader_num_workers=0,
    )
    trainer = CountingTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(chats), processing_class=tokenizer,
        peft_config=LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Clock(), TokenCallback()],
    )
    trainer.train()
    timed = timings[args.warmup :]
    return {
        "tokens_per_s": sum(t for _, t in timed) / sum(s for s, _ in timed),
        "peak_mb": _peak_memory_mb(args.device),
        "heldout_loss": _heldout(trainer.model, tokenizer, heldout, dtype),
        "steps": len(timings),
    }


def _worker_qlorakit(args, chats, heldout, dtype) -> dict:
    import qlorakit

    work = Path(tempfile.mkdtemp())
    (work / "train.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    run = qlorakit.train(
        model=args.model, quant="nf4", double_quant=True, dtype=args.dtype, device=args.device, rank=args.rank,
        alpha=args.alpha, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr, schedule="linear",
        warmup_steps=0, max_steps=args.warmup + args.steps, train_on="all", seed=0,
        output=str(work / "run"), data=str(work / "train.jsonl"), progress=False, log=lambda _: None,
    )
    steps = [r for r in run.metrics if "loss" in r][args.warmup :]
    return {
        "tokens_per_s": sum(r["tokens"] for r in steps) / sum(r["tokens"] / r["tokens_per_s"] for r in steps),
        "peak_mb": _peak_memory_mb(args.device),
        "heldout_loss": _heldout(run.model, run.tokenizer, heldout, dtype),
        "steps": len(steps) + args.warmup,
    }


def _heldout(model, tokenizer, heldout, dtype):
    from workload import heldout_loss

    return heldout_loss(model, tokenizer, heldout, dtype)


WORKERS = {"qlorakit": _worker_qlorakit, "hf": _worker_hf, "hf-packing": _worker_hf}
LABELS = {"qlorakit": "qlorakit", "hf": "HF stack (TRL defaults)", "hf-packing": "HF stack + TRL packing"}


def _parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto", help="compute dtype for both sides (auto: what qlorakit picks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--only", nargs="*", choices=list(WORKERS), help="run only these sides")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    return p


def main() -> int:
    args = _parser().parse_args()
    sys.path.insert(0, str(HERE))
    if args.worker:
        import torch

        from qlorakit.precision import Precision, dtype_name
        from workload import mixed_length_chats

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        dtype = Precision.resolve(args.dtype, device=args.device).compute
        chats = mixed_length_chats(args.batch_size * (args.warmup + args.steps), seed=0)
        heldout = mixed_length_chats(N_HELDOUT, seed=1)
        result = WORKERS[args.worker](args, chats, heldout, dtype) | {"dtype": dtype_name(dtype)}
        print("RESULT " + json.dumps(result))
        return 0

    results = {}
    for worker in args.only or list(WORKERS):
        cmd = [sys.executable, __file__, "--worker", worker] + [
            a for a in sys.argv[1:] if a not in ("--only",) and a not in (args.only or [])]
        print(f"running {LABELS[worker]} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{worker} failed (exit {proc.returncode})")
        results[worker] = json.loads(lines[-1][7:]) | {"wall_s": time.perf_counter() - started}

    ours = results.get("qlorakit")
    print(f"\nworkload: {args.model}, NF4 + double quant, r={args.rank} alpha={args.alpha:g} all-linear, batch "
          f"{args.batch_size}, max length {args.max_length}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.device}, {next(iter(results.values()))['dtype']}\n")
    print(f"| {'':26} | tokens/s | peak {'RSS' if args.device == 'cpu' else 'alloc'} MB | held-out loss | "
          "qlorakit speed-up | qlorakit memory |")
    print("|" + "---|" * 6)
    for worker, r in results.items():
        speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if ours else ""
        memory = f"{ours['peak_mb'] / r['peak_mb']:.2f}x" if ours else ""
        print(f"| {LABELS[worker]:26} | {r['tokens_per_s']:8.1f} | {r['peak_mb']:12.0f} | {r['heldout_loss']:13.4f} | "
              f"{speed:>17} | {memory:>15} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
