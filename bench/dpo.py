"""Preference training: `qlorakit dpo` against the HF stack (TRL DPOTrainer + PEFT + bitsandbytes), side by side,
each in its own process.

    python bench/dpo.py                        # the default workload, CPU
    python bench/dpo.py --steps 2 --warmup 1   # shorter
    python bench/dpo.py --only qlorakit hf     # leave out TRL with precomputed reference log-probabilities

Default workload: SmolLM2-135M-Instruct (the default model), NF4 + double quantization, LoRA r=16 alpha=32 on all
linear layers, batch 8 pairs, max length 512, DPO's sigmoid loss with beta 0.1, learning rate 5e-5 with a linear
schedule and no warmup, the same compute dtype on both sides (`auto`: what qlorakit resolves to here, see
`qlorakit precision`); 2 warm-up steps, then 6 timed ones. The pairs are multi-turn chats of the built-in task
(qlorakit.demo's preference pairs, each after 1 to 8 earlier exchanges of bench/workload.py's chats: 121 to 495
tokens a sequence, 316 on average, with SmolLM2's template), the chosen and the rejected answer each a last
assistant turn.

Sides: `qlorakit dpo` (the command, reading a JSONL file); TRL's DPOTrainer as its documentation runs QLoRA — the
model loaded by transformers with a BitsAndBytesConfig, a LoraConfig given to the trainer (which wraps the model
with PEFT and casts the adapters to bf16), TRL's defaults otherwise (gradient checkpointing on, the reference's
log-probabilities computed in every step with the adapters disabled) but for the order of the pairs, which is
qlorakit's (below); and the same with precompute_ref_log_probs=True, TRL's way to compute them once before training,
as qlorakit does.

Reported: real tokens per second over the timed steps (every token of both sequences of every pair, prompts
included: qlorakit's metrics.jsonl `tokens`, TRL's attention mask), the peak RSS of each side's process (ru_maxrss,
read the same way for both: os.wait4 on the child), its wall time (load, reference pass, steps, saving), and each
step's loss, with the largest relative difference between the curves. Both sides start from the same adapters
(PEFT's LoRA A under seed 0 either way; checked) and take the same pairs in each step (TRL reads them in the order
qlorakit's run draws them), so in fp32 the curves agree closely (0.02% over 3 steps of 2 pairs, `--dtype fp32`);
in bf16 they differ by bf16's rounding, which packed and padded batches and the two sides' kernels spend differently
(1.8% at step 2 in the same trial). tests/test_preference_parity.py is the exact comparison.
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
CONTEXT_TURNS = 8  # earlier exchanges before a pair's question: every sequence under 512 tokens, none cut


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` chat preference pairs: the built-in task's pairs (qlorakit.demo.preference_rows), each prompt preceded by
    1 to CONTEXT_TURNS earlier exchanges (bench/workload.py's chats), so the lengths vary as real chat data's do."""
    from qlorakit.demo import preference_rows
    from workload import mixed_length_chats

    pairs, _ = preference_rows(n_train=n, n_heldout=0, seed=seed)
    contexts = mixed_length_chats(n, seed=seed + 1, max_turns=CONTEXT_TURNS)  # other people than the pairs'
    return [pair | {"prompt": context["messages"] + pair["prompt"]} for pair, context in zip(pairs, contexts)]


def _side_hf(args, data: Path) -> dict:
    """TRL's DPOTrainer, in this process (the child `--worker hf` runs it)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from workload import hf_stack_base

    from qlorakit.data.batches import epoch_order
    from qlorakit.precision import Precision, dtype_name

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    dtype = Precision.resolve(args.dtype, device=args.device).compute  # what `qlorakit dpo --dtype` resolves to
    model, tokenizer = hf_stack_base(args.model, dtype, args.device)
    steps: list[dict] = []  # per optimizer step: real tokens, seconds

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            steps[-1]["tokens"] += int(inputs["attention_mask"].sum())  # chosen and rejected rows, prompts included
            return super().training_step(model, inputs, *rest, **kw)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.append({"tokens": 0, "start": time.perf_counter()})

        def on_step_end(self, *a, **k):
            steps[-1]["seconds"] = time.perf_counter() - steps[-1].pop("start")

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
        loss_type=[args.loss], beta=args.beta, logging_steps=1, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, use_cpu=args.device == "cpu", report_to="none", save_strategy="no", seed=0,
        dataloader_num_workers=0, precompute_ref_log_probs=args.worker == "hf-precompute", disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    # The pairs in the order qlorakit's run takes them (the bench's data are one epoch), read in sequence, so that both
    # sides' step k sees the same pairs and the loss curves compare
    pairs = [json.loads(line) for line in data.read_text().splitlines()]
    pairs = [pairs[i] for i in epoch_order(len(pairs), 0, seed=0)]
    trainer = Counting(
        model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
        peft_config=LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Clock()],
    )
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    return _summary(args, steps, losses) | {"dtype": dtype_name(dtype)}


def _command_qlorakit(args, data: Path, work: Path) -> list[str]:
    """`qlorakit dpo`, the command as users run it."""
    return [sys.executable, "-m", "qlorakit", "dpo", "--model", args.model, "--data", str(data), "--output",
            str(work / "qlorakit-run"), "--quant", "nf4", "--double-quant", "--dtype", args.dtype, "--device",
            args.device, "--rank", str(args.rank), "--alpha", str(args.alpha), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--schedule", "linear", "--warmup-steps",
            "0", "--max-steps", str(args.warmup + args.steps), "--loss", args.loss, "--beta", str(args.beta),
            "--seed", "0", "--quiet"] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def _result_qlorakit(args, work: Path) -> dict:
    """The run's metrics.jsonl and config.json, read after the command ended."""
    out = work / "qlorakit-run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    steps = [{"tokens": r["tokens"], "seconds": r["tokens"] / r["tokens_per_s"]} for r in records]
    dtype = json.loads((out / "config.json").read_text())["compute_dtype"]
    return _summary(args, steps, [r["loss"] for r in records]) | {"dtype": dtype}


def _command_hf(data: Path, worker: str) -> list[str]:
    """This script again, as the worker that runs TRL and prints its RESULT line."""
    return [sys.executable, __file__, "--worker", worker, "--data-file", str(data)] + [
        a for a in sys.argv[1:] if a != "--only" and a not in WORKERS]


def _summary(args, steps: list[dict], losses: list[float]) -> dict:
    timed = steps[args.warmup:]
    return {"tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
            "tokens_per_step": sum(s["tokens"] for s in steps) / len(steps), "losses": losses, "steps": len(steps)}


WORKERS = ("qlorakit", "hf", "hf-precompute")
LABELS = {"qlorakit": "qlorakit dpo", "hf": "HF stack (TRL defaults)",
          "hf-precompute": "HF stack, reference precomputed"}


def _parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto", help="compute dtype for both sides (auto: what qlorakit picks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo", "hinge"),
                   help="a loss both sides compute (TRL's DPOTrainer loss_type)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="qlorakit with --gradient-checkpointing, as TRL's default runs (off: qlorakit's default)")
    p.add_argument("--only", nargs="*", choices=WORKERS, help="run only these sides")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    return p


def _run_child(command: list[str], label: str) -> tuple[str, float, float]:
    """Run one side's process: (its stdout, its peak RSS in MiB, wall seconds). The peak is the child's ru_maxrss
    from os.wait4, read the same way for both sides."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        if "BENCH_THREADS" in env:  # torch's threads in `qlorakit dpo` too (the TRL worker sets them itself)
            env["OMP_NUM_THREADS"] = env["BENCH_THREADS"]
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        print(stdout[-3000:], stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    return stdout, usage.ru_maxrss / 1024, time.perf_counter() - started  # ru_maxrss: kB on Linux


def main() -> int:
    args = _parser().parse_args()
    sys.path.insert(0, str(HERE))
    if args.worker:
        print("RESULT " + json.dumps(_side_hf(args, Path(args.data_file))))
        return 0

    if args.gradient_checkpointing:
        LABELS["qlorakit"] = "qlorakit dpo --gradient-checkpointing"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "pairs.jsonl"  # both sides read this file
        pairs = preference_pairs(args.batch_size * (args.warmup + args.steps), seed=0)
        data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        for worker in args.only or WORKERS:
            print(f"running {LABELS[worker]} ...", file=sys.stderr, flush=True)
            if worker == "qlorakit":
                _, peak, wall = _run_child(_command_qlorakit(args, data, work), LABELS[worker])
                result = _result_qlorakit(args, work)
            else:
                stdout, peak, wall = _run_child(_command_hf(data, worker), LABELS[worker])
                result = json.loads([line for line in stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
            results[worker] = result | {"peak_rss_mib": peak, "wall_s": wall}

    ours = results.get("qlorakit")
    print(f"\nworkload: {args.model}, NF4 + double quant, r={args.rank} alpha={args.alpha:g} all-linear, batch "
          f"{args.batch_size} pairs, max length {args.max_length}, loss {args.loss} beta {args.beta:g}, lr {args.lr:g} "
          f"linear, {args.warmup} warm-up + {args.steps} timed steps, {args.device}, "
          f"{next(iter(results.values()))['dtype']}\n")
    print(f"| {'':32} | tokens/s | tokens/step | peak RSS MiB | wall s | qlorakit speed-up | qlorakit memory |")
    print("|" + "---|" * 7)
    for worker, r in results.items():
        speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if ours else ""
        memory = f"{ours['peak_rss_mib'] / r['peak_rss_mib']:.2f}x" if ours else ""
        print(f"| {LABELS[worker]:32} | {r['tokens_per_s']:8.1f} | {r['tokens_per_step']:11.0f} | "
              f"{r['peak_rss_mib']:12.0f} | {r['wall_s']:6.0f} | {speed:>17} | {memory:>15} |")
    print("\nloss per step:")
    for worker, r in results.items():
        print(f"  {LABELS[worker]:32} " + " ".join(f"{x:.4f}" for x in r["losses"]))
    if ours:
        for worker, r in results.items():
            if worker != "qlorakit":
                worst = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], r["losses"]))
                print(f"  largest relative difference, qlorakit vs {LABELS[worker]}: {worst:.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
