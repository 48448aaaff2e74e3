"""Online RL: `qlorakit grpo` against TRL's GRPOTrainer — as qlorakit guards it (qlorakit.GRPOTrainer) and as the HF
stack runs it (TRL + PEFT + bitsandbytes) —, side by side, each in its own process.

    python bench/grpo.py                                   # the default workload, CPU, every side
    python bench/grpo.py --steps 2 --warmup 1 --group-size 4 --max-new-tokens 16   # shorter
    python bench/grpo.py --only hf                         # one side only
    python bench/grpo.py --only qlorakit qlorakit-trl      # some (qlorakit, qlorakit-trl, hf, hf-no-checkpointing)

Default workload: SmolLM2-135M-Instruct (the default model), NF4 + double quantization, LoRA r=16 alpha=32 on all
linear layers, the same compute dtype on every side (`auto`: what qlorakit resolves to here, see `qlorakit
precision`). The prompts are the built-in task's (qlorakit.demo: "Extract the person as name|age|job|city." and a
sentence), each a one-turn chat; the reward is this file's `record_reward`, per-field partial credit against the
row's `record` ("name|age|job|city": 1 for a field in its place, 1/2 for its value elsewhere in the answer), the
same function on every side (qlorakit reads it as the reward spec `bench.grpo:record_reward`; qlorakit's TRL side
gets that same spec's Reward through qlorakit.rewards.as_trl; the HF stack calls `trl_record_reward`, which only
adapts TRL's calling convention). Per step: 4 prompts x 8 sampled completions (group size) of at most 32 new tokens,
temperature 1, TRL's defaults for the objective (loss dapo, beta 0: no reference pass, epsilon 0.2, rewards scaled
by each group's std), learning rate 1e-4 with a linear schedule and no warmup; 1 warm-up step, then 4 timed ones.

Sides (the names --only takes):
- qlorakit: qlorakit.train_grpo (the Python API of `qlorakit grpo`), on a model from qlorakit.load.
- qlorakit-trl: TRL's GRPOTrainer as qlorakit guards it, `qlorakit.GRPOTrainer(model, reward_funcs,
  args=GRPOConfig(...), train_dataset=..., processing_class=tokenizer)` (README: "TRL's trainers, kept in the
  policy"), on a model from qlorakit.load + qlorakit.add_lora (no peft_config: adapters TRL creates would be rounded
  to bf16 before the guard could restore them), the reward as qlorakit.rewards.as_trl gives it (each row's line for
  its error messages in the WHERE_COLUMN column), hf's GRPOConfig.
- hf: TRL's GRPOTrainer as its documentation runs QLoRA — the model loaded by transformers with a
  BitsAndBytesConfig, a LoraConfig given to the trainer (which wraps the model with PEFT and casts the adapters to
  bf16).
- hf-no-checkpointing: hf with gradient checkpointing off, as qlorakit runs by default.
The TRL sides run TRL's defaults (gradient checkpointing on but in hf-no-checkpointing, transformers' generate) but
for the prompts' order, which is qlorakit's (one epoch, read in sequence), so that every side's step k samples
answers to the same prompts.

Reported per side: generation tokens per second (completion tokens sampled / seconds generating), training tokens
per second (tokens of the sequences trained on, prompt + completion, no padding / seconds of the rest of the step:
rewards, reference and policy passes, optimizer), seconds per step end to end — all over the timed steps —, the peak
RSS of the side's process (ru_maxrss, read the same way for every side: os.wait4 on the child), its wall time, the
mean training reward over the last steps, and the mean reward of greedy answers to the same held-out prompts, scored
the same way, before and after training (all computed by this file with transformers' generate on the side's model;
"before" is the base, before any adapter). Then the ratios of qlorakit grpo to each other side (step speed-up:
the side's seconds per step / qlorakit's; memory: qlorakit's peak / the side's).
qlorakit's numbers come from its metrics.jsonl (generation_s, rollout_tokens_per_s, tokens, tokens_per_s: the step's
seconds, reward); the TRL sides' are measured around TRL's generation call and its steps. The sequences trained on:
TRL's are every completion's; qlorakit's leave out those of groups whose rewards were all equal (advantage 0) when
beta is 0, so its training tokens/s counts fewer tokens than it was given, and seconds per step is the like-for-like
figure. The JSON (--json) also holds each step's reward, loss, gradient norm and mean completion length.

Sampling differs between the sides (each draws from its own random stream), so per-step rewards do not compare one
to one; the held-out reward after training and the training reward's trend do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
N_HELDOUT = 16
LAST = 3  # training reward: the mean over this many last steps
REWARD_SPEC = "bench.grpo:record_reward"  # qlorakit imports it from the repository root (the workers' cwd)


# ---------------------------------------------------------------------------------------------- task and reward


def record_reward(prompts, completions, rows) -> list[float]:
    """Per-field partial credit for the built-in task, against the row's `record` ("name|age|job|city"): a field
    in its place of the completion's |-separated fields scores 1, a field's value anywhere else in the completion (a
    whole word, any case) 1/2; the sum is divided by the larger of 4 and the completion's field count (so extra fields
    cost). A perfect record scores 1, the sentence repeated 1/2 — the base model's usual answer, so that a group's
    samples differ and the advantage is not zero. qlorakit's convention: fn(prompts, completions, rows), completions
    as strings, rows as dicts of the row's other fields."""
    scores = []
    for completion, row in zip(completions, rows, strict=True):
        expected = str(row["record"]).strip().split("|")
        got = [field.strip() for field in completion.strip().split("|")]
        credit = 0.0
        for i, field in enumerate(expected):
            if i < len(got) and got[i] == field:
                credit += 1.0
            elif re.search(rf"(?<!\w){re.escape(field)}(?!\w)", completion, re.IGNORECASE):
                credit += 0.5
        scores.append(credit / max(len(expected), len(got)))
    return scores


def trl_record_reward(prompts, completions, record, **kwargs) -> list[float]:
    """record_reward under TRL's convention: keyword arguments, the dataset's other columns as parallel lists, and a
    chat prompt's completions as [{"role": "assistant", "content": text}]."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return record_reward(prompts, texts, [{"record": r} for r in record])


def task_rows(n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """The built-in task as prompt rows: the user turn as a one-message chat prompt, the expected record as `record`.
    The held-out rows are the same whatever `n_train` (qlorakit.demo.demo_rows under seed 1), the training rows
    (seed 0) leave out their sentences."""
    from qlorakit.demo import demo_rows

    def row(example):
        user, answer = example["messages"]
        return {"prompt": [user], "record": answer["content"]}

    heldout = [row(e) for e in demo_rows(n_train=0, n_heldout=n_heldout, seed=1)[1]]
    held = {r["prompt"][0]["content"] for r in heldout}
    train = [row(e) for e in demo_rows(n_train=n_train + n_heldout, n_heldout=0, seed=0)[0]]
    return [r for r in train if r["prompt"][0]["content"] not in held][:n_train], heldout


def heldout_reward(model, tokenizer, rows: list[dict], max_new_tokens: int, dtype, batch_size: int = 16) -> dict:
    """Mean record_reward of greedy answers to `rows`' prompts (chat template with the generation prompt, left
    padding, transformers' generate under the compute dtype's autocast), and the share scored 1.0. The same code for
    both sides.

    The model answers in training mode (it has no dropout, so the answers are eval mode's): bitsandbytes (0.50 on a
    CPU with AVX512-BF16) repacks a Linear4bit's weight for its CPU kernel the first time the layer runs in eval mode
    without gradients, for good, and the backward through a repacked layer is wrong (bitsandbytes::gemv_4bit has no
    autograd kernel; the gradient norm of one batch fell from 2.87 to 0.79) — measuring the HF stack's base model
    before training would break its training. (qlorakit turns that kernel off.)"""
    import torch

    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        raise SystemExit("heldout_reward: the model has dropout, so training mode would change its greedy answers")
    was_training = model.training
    model.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = sorted({tokenizer.eos_token_id, *_ids(model.generation_config.eos_token_id)} - {None})
    answers = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = [_ids(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]) for r in chunk]
            width = max(map(len, ids))
            device = next(model.parameters()).device
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=ends)
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    scores = record_reward([r["prompt"] for r in rows], answers, rows)
    return {"reward": sum(scores) / len(scores), "exact": sum(s == 1.0 for s in scores) / len(scores),
            "sample": answers[:2]}


def _ids(x) -> list:
    """A token-id list from what tokenizers return for one sequence (a list, a nested list, or one id)."""
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    x = list(x.tolist() if hasattr(x, "tolist") else x)
    return list(x[0]) if x and isinstance(x[0], (list, tuple)) else x


# ---------------------------------------------------------------------------------------------- the sides


def _threads():
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))


def _side_qlorakit(args, data: Path, heldout: list[dict]) -> dict:
    """qlorakit.train_grpo, in this process (the child `--worker qlorakit` runs it)."""
    import qlorakit
    from qlorakit.precision import precision_of

    _threads()
    model, tokenizer = qlorakit.load(args.model, quant="nf4", double_quant=True, dtype=args.dtype,
                                     device=args.device)
    dtype = precision_of(model).compute
    before = heldout_reward(model, tokenizer, heldout, args.max_new_tokens, dtype)
    options = dict(
        model=args.model, quant="nf4", double_quant=True, dtype=args.dtype, device=args.device,  # as loaded
        data=str(data), reward=[args.reward_spec], group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, beta=args.beta, loss=args.loss, epsilon=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        batch_size=args.batch_size, max_steps=args.warmup + args.steps, lr=args.lr, schedule="linear",
        warmup_steps=0, rank=args.rank, alpha=args.alpha, seed=0, output=str(Path(tempfile.mkdtemp()) / "run"),
    )
    if args.gradient_checkpointing:
        options["gradient_checkpointing"] = True
    run = qlorakit.train_grpo(loaded=(model, tokenizer), overwrite=True, log=lambda _: None, progress=False,
                              **options)
    records = getattr(run, "metrics", None) or _metrics_file(Path(options["output"]))
    records = [r for r in records if "reward" in r and "generation_s" in r]
    steps = []
    for r in records:
        # the whole step (rollouts, rewards, reference, training, optimizer): train.py's tokens_per_s is the step's
        # real tokens over its seconds; a step that trained on nothing (every group's rewards equal, beta 0) has none
        seconds = r["tokens"] / r["tokens_per_s"] if r["tokens"] else r["generation_s"] + r["training_s"]
        steps.append({"generated": r["rollout_tokens_per_s"] * r["generation_s"], "generation_s": r["generation_s"],
                      "trained": r["tokens"], "training_s": seconds - r["generation_s"], "seconds": seconds,
                      "reward": r["reward"], "completion_length": r.get("completion_length"),
                      "loss": r.get("loss"), "grad_norm": r.get("grad_norm")})
    after = heldout_reward(run.model, run.tokenizer, heldout, args.max_new_tokens, dtype)
    return _summary(args, steps, before, after, dtype)


def _metrics_file(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _side_hf(args, data: Path, heldout: list[dict]) -> dict:
    """TRL's GRPOTrainer, in this process (the children `--worker hf` and `--worker hf-no-checkpointing` run it):
    transformers + bitsandbytes load the base, PEFT adds the adapters TRL is given as a LoraConfig."""
    from peft import LoraConfig
    from trl import GRPOTrainer
    from workload import hf_stack_base

    from qlorakit.precision import Precision

    _threads()
    dtype = Precision.resolve(args.dtype, device=args.device).compute  # what qlorakit's --dtype resolves to
    model, tokenizer = hf_stack_base(args.model, dtype, args.device)
    before = heldout_reward(model, tokenizer, heldout, args.max_new_tokens, dtype)
    return _trl_side(
        args, data, heldout, GRPOTrainer, model, tokenizer, dtype, before, reward_funcs=trl_record_reward,
        peft_config=LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM"),
        gradient_checkpointing=args.worker != "hf-no-checkpointing",
    )


def _side_qlorakit_trl(args, data: Path, heldout: list[dict]) -> dict:
    """TRL's GRPOTrainer as qlorakit guards it (qlorakit.GRPOTrainer), in this process (the child `--worker
    qlorakit-trl` runs it): the model from qlorakit.load + add_lora (no peft_config: adapters TRL creates would be
    rounded to bf16 before the guard could restore them), the reward through qlorakit.rewards.as_trl — the very
    Reward the native side builds from the same spec."""
    import qlorakit
    from qlorakit.precision import precision_of
    from qlorakit.rewards import as_trl, parse_rewards

    _threads()
    rewards = parse_rewards([args.reward_spec])  # imported before the model loads, as `qlorakit grpo` does
    model, tokenizer = qlorakit.load(args.model, quant="nf4", double_quant=True, dtype=args.dtype,
                                     device=args.device)
    dtype = precision_of(model).compute
    before = heldout_reward(model, tokenizer, heldout, args.max_new_tokens, dtype)  # the base, as the native side
    model = qlorakit.add_lora(model, rank=args.rank, alpha=args.alpha)
    # TRL's own rule for a completion that ended (its clipped_ratio): the last id is an EOS (the tokenizer's or the
    # generation config's) or the pad id
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id, *_ids(model.generation_config.eos_token_id)} - {None}
    return _trl_side(
        args, data, heldout, qlorakit.GRPOTrainer, model, tokenizer, dtype, before,
        reward_funcs=as_trl(rewards, args.max_new_tokens, eos_token_ids=ends),
        reward_weights=[r.weight for r in rewards], gradient_checkpointing=True,
    )


def _trl_side(args, data: Path, heldout: list[dict], trainer_class, model, tokenizer, dtype, before: dict, *,
              reward_funcs, gradient_checkpointing: bool, peft_config=None, reward_weights=None) -> dict:
    """Train with `trainer_class` (trl.GRPOTrainer or qlorakit.GRPOTrainer) under the same GRPOConfig — TRL's
    defaults but for the workload's settings and the prompts' order —, timing its generation calls and its steps."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from qlorakit.data.batches import epoch_order
    from qlorakit.rewards import WHERE_COLUMN

    steps: list[dict] = []  # per optimizer step

    class Counting(trainer_class):
        def _generate_single_turn(self, *a, **k):
            started = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **k)
            steps[-1]["generation_s"] += time.perf_counter() - started
            steps[-1]["generated"] += sum(len(ids) for ids in completion_ids)  # the end-of-turn token included
            return completion_ids, logprobs

        def compute_loss(self, model, inputs, *rest, **kw):
            steps[-1]["trained"] += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            return super().compute_loss(model, inputs, *rest, **kw)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.append({"generated": 0, "generation_s": 0.0, "trained": 0, "start": time.perf_counter()})

        def on_step_end(self, *a, **k):
            steps[-1]["seconds"] = time.perf_counter() - steps[-1].pop("start")
            steps[-1]["training_s"] = steps[-1]["seconds"] - steps[-1]["generation_s"]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size * args.group_size,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        top_p=1.0, top_k=0, beta=args.beta, loss_type=args.loss, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
        # qlorakit's dr_grpo leaves the rewards unscaled (Dr. GRPO); TRL's dr_grpo loss alone still scales them
        scale_rewards="none" if args.loss == "dr_grpo" else "group", reward_weights=reward_weights,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=1, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=args.device == "cpu",
        report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
        shuffle_dataset=False, gradient_checkpointing=gradient_checkpointing,
    )
    # The prompts in the order qlorakit's run takes them (the bench's data are one epoch), read in sequence, so that
    # every side's step k samples answers to the same prompts. Each row keeps its line as qlorakit's reward errors
    # name it (as_trl reads WHERE_COLUMN; trl_record_reward takes it in **kwargs and ignores it).
    rows = [json.loads(line) | {WHERE_COLUMN: f"{data} line {number}"}
            for number, line in enumerate(data.read_text().splitlines(), 1)]
    rows = [rows[i] for i in epoch_order(len(rows), 0, seed=0)]
    trainer = Counting(model=model, reward_funcs=reward_funcs, args=config, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer, callbacks=[Clock()], peft_config=peft_config)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "reward" in r]
    for step, record in zip(steps, logged, strict=True):
        step["reward"] = record["reward"]
        step["completion_length"] = record.get("completions/mean_length")
        step["loss"], step["grad_norm"] = record.get("loss"), record.get("grad_norm")
    after = heldout_reward(trainer.model, tokenizer, heldout, args.max_new_tokens, dtype)
    return _summary(args, steps, before, after, dtype)


def _summary(args, steps: list[dict], before: dict, after: dict, dtype) -> dict:
    from qlorakit.precision import dtype_name

    timed = steps[args.warmup:]
    last = [s["reward"] for s in steps[-LAST:]]
    return {
        "generation_tokens_per_s": sum(s["generated"] for s in timed) / sum(s["generation_s"] for s in timed),
        "training_tokens_per_s": sum(s["trained"] for s in timed) / sum(s["training_s"] for s in timed),
        "seconds_per_step": sum(s["seconds"] for s in timed) / len(timed),
        "generation_s_per_step": sum(s["generation_s"] for s in timed) / len(timed),
        "training_s_per_step": sum(s["training_s"] for s in timed) / len(timed),
        "generated_per_step": sum(s["generated"] for s in steps) / len(steps),
        "trained_per_step": sum(s["trained"] for s in steps) / len(steps),
        "rewards": [s["reward"] for s in steps], "last_reward": sum(last) / len(last),
        "losses": [s["loss"] for s in steps], "grad_norms": [s["grad_norm"] for s in steps],
        "completion_lengths": [s["completion_length"] for s in steps],
        "heldout_before": before, "heldout_after": after, "steps": len(steps), "dtype": dtype_name(dtype),
    }


# ---------------------------------------------------------------------------------------------- the driver

WORKERS = {"qlorakit": _side_qlorakit, "qlorakit-trl": _side_qlorakit_trl, "hf": _side_hf,
           "hf-no-checkpointing": _side_hf}
LABELS = {"qlorakit": "qlorakit grpo", "qlorakit-trl": "qlorakit.GRPOTrainer (TRL)",
          "hf": "HF stack (TRL defaults)", "hf-no-checkpointing": "HF stack, no grad checkpointing"}


def _parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto", help="compute dtype for both sides (auto: what qlorakit picks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="sampled completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit (and held-out answers')")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss", default="dapo", choices=("grpo", "dr_grpo", "dapo"),
                   help="a loss both sides compute (TRL's GRPOConfig loss_type; its default)")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL's default 0: no reference pass)")
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=None, help="default: --epsilon")
    p.add_argument("--reward-spec", default=REWARD_SPEC, help="the reward qlorakit imports (module:function)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="qlorakit with gradient checkpointing, as TRL's default runs (off: qlorakit's default)")
    p.add_argument("--only", nargs="*", choices=list(WORKERS), help="run only these sides")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    return p


def _run_child(command: list[str], label: str) -> tuple[str, float, float]:
    """Run one side's process: (its stdout, its peak RSS in MiB, wall seconds). The peak is the child's ru_maxrss
    from os.wait4, read the same way for every side."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # the reward spec's module, bench.grpo
        if "BENCH_THREADS" in env:
            env["OMP_NUM_THREADS"] = env["BENCH_THREADS"]
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
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
    n_train = args.batch_size * (args.warmup + args.steps)  # one epoch: every prompt answered once
    if args.worker:
        _, heldout = task_rows(n_train, N_HELDOUT)
        print("RESULT " + json.dumps(WORKERS[args.worker](args, Path(args.data_file), heldout)))
        return 0

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"  # both sides read this file
        train, _ = task_rows(n_train, N_HELDOUT)
        data.write_text("".join(json.dumps(row) + "\n" for row in train))
        for worker in args.only or list(WORKERS):
            print(f"running {LABELS[worker]} ...", file=sys.stderr, flush=True)
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--data-file", str(data)]
            command += [a for a in sys.argv[1:] if a != "--only" and a not in WORKERS]
            stdout, peak, wall = _run_child(command, LABELS[worker])
            result = json.loads([line for line in stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
            results[worker] = result | {"peak_rss_mib": peak, "wall_s": wall}

    ours = results.get("qlorakit")
    first = next(iter(results.values()))
    print(f"\nworkload: {args.model}, NF4 + double quant, r={args.rank} alpha={args.alpha:g} all-linear, "
          f"{args.batch_size} prompts x {args.group_size} completions of <= {args.max_new_tokens} tokens a step, "
          f"temperature {args.temperature:g}, loss {args.loss} beta {args.beta:g} epsilon {args.epsilon:g}, "
          f"lr {args.lr:g} linear, {args.warmup} warm-up + {args.steps} timed steps, {args.device}, {first['dtype']}\n")
    print(f"| {'':32} | gen tok/s | train tok/s | s/step | peak RSS MiB | wall s | last reward | held-out before "
          "-> after | qlorakit step speed-up | qlorakit memory |")
    print("|" + "---|" * 10)
    for worker, r in results.items():
        speed = f"{r['seconds_per_step'] / ours['seconds_per_step']:.2f}x" if ours else ""
        memory = f"{ours['peak_rss_mib'] / r['peak_rss_mib']:.2f}x" if ours else ""
        heldout = f"{r['heldout_before']['reward']:.3f} -> {r['heldout_after']['reward']:.3f}"
        print(f"| {LABELS[worker]:32} | {r['generation_tokens_per_s']:9.1f} | {r['training_tokens_per_s']:11.1f} | "
              f"{r['seconds_per_step']:6.1f} | {r['peak_rss_mib']:12.0f} | {r['wall_s']:6.0f} | "
              f"{r['last_reward']:11.3f} | {heldout:>23} | {speed:>22} | {memory:>15} |")
    if ours:
        print("\nqlorakit / peer:")
        for worker, r in results.items():
            if worker != "qlorakit":
                generation = ours["generation_tokens_per_s"] / r["generation_tokens_per_s"]
                print(f"  vs {LABELS[worker]:32} generation {generation:.2f}x, "
                      f"training {ours['training_tokens_per_s'] / r['training_tokens_per_s']:.2f}x, "
                      f"step {r['seconds_per_step'] / ours['seconds_per_step']:.2f}x, "
                      f"memory {ours['peak_rss_mib'] / r['peak_rss_mib']:.2f}x")
    print("\nreward per step (sampled, training):")
    for worker, r in results.items():
        print(f"  {LABELS[worker]:32} " + " ".join(f"{x:.3f}" for x in r["rewards"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
