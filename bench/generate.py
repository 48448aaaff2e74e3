"""Generation speed, side by side: qlorakit.generate against plain transformers and llama.cpp, each in its own process.

    python bench/generate.py                                  # the default workload, CPU
    python bench/generate.py --new-tokens 8 --repeats 1       # shorter
    python bench/generate.py --adapter qlorakit-demo          # a trained adapter instead of a random one
    python bench/generate.py --llama-python /tmp/llama-venv/bin/python   # llama.cpp from another environment

Workload: SmolLM2-135M-Instruct (the default model) with a LoRA adapter, r=16 alpha=32 on all linear layers, whose
B is seeded random (not zero, so the adapter is not a no-op), or the adapter given with --adapter; 8 fixed chat
prompts (4 of the built-in demo task, 4 general questions of different lengths); greedy decoding, exactly
--new-tokens (32) new tokens per prompt (end-of-turn suppressed until then: min_new_tokens = max_new_tokens), at
batch 1 (each prompt alone) and batch 8 (all 8 at once, left-padded). Every side gets the same prompt token ids
(qlorakit.generation.encode_prompts) and the same number of threads (--threads, default: the cores this process may
use). Generators:
  qlorakit      qlorakit.generate on the NF4 + double-quantized base with the adapter, compute dtype --dtype: once
                as a plain call, which builds its decoder (the base dequantized once, packed) every time, and once
                with a Generator kept between calls, as chat and rollouts use it (built in the warm-up call);
  transformers  AutoModelForCausalLM.generate on the same base unquantized, in the same compute dtype, no adapter;
  llama.cpp     llama-cpp-python on qlorakit's own GGUF export of the base with the adapter merged (f16 and q8_0),
                greedy (argmax) decoding with one sequence per prompt; batch 8 decodes the 8 sequences together.
Reported: new tokens per second (new tokens / wall time of the generate calls, after one warm-up call), the median of
--repeats runs and each run; peak RSS of each side's process; how many of the 8 batch-1 answers have the same token
ids as qlorakit's (informational: NF4 + adapter against the plain base is not expected to agree; the merged GGUF
should mostly agree), and how many batch-8 answers are their batch-1 answers.

Tokens are counted from each answer's token ids (qlorakit's seen through a hook on the Generator that generate
builds, or on model.generate for a generate without one), so an answer that ends early, say at end-of-turn where
min_new_tokens is not honoured, counts what it produced; the report says how many did.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GENERAL_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France, and what is it best known for?"}],
    [{"role": "user", "content": "Write a short Python function that checks whether a number is prime."}],
    [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
     {"role": "user", "content": "Give me three tips for sleeping better."}],
    [{"role": "user", "content": (
        "Summarise this paragraph in one sentence:\n"
        "The city council met on Tuesday to discuss the new bicycle lanes planned for the old town. Shop owners "
        "worried that fewer parking spaces would keep customers away, while cyclists pointed to the accidents of "
        "the past year. After three hours the council agreed to a six-month trial on two streets, with a review "
        "of traffic and sales figures before any permanent change.")}],
]
LLAMA_TYPES = ("f16", "q8_0")
GENERATORS = ("qlorakit", "transformers", "llama.cpp")
LABELS = {"qlorakit": "qlorakit (NF4 + adapter), decoder built per call",
          "qlorakit-kept": "qlorakit (NF4 + adapter), decoder kept (Generator)",
          "transformers": "transformers (unquantized base)",
          **{f"llama.cpp-{t}": f"llama.cpp {t} (merged GGUF)" for t in LLAMA_TYPES}}
# llama-cpp-python is an sdist: pip builds llama.cpp (gcc, g++, cmake); about 16 minutes on 2 busy cores.
LLAMA_INSTALL = ("python -m venv /tmp/llama-venv && CMAKE_ARGS='-DGGML_NATIVE=ON -DGGML_BLAS=OFF' "
                 "/tmp/llama-venv/bin/pip install llama-cpp-python")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def _until_stop(row, stop: set[int], limit: int) -> list[int]:
    """A generated row's new tokens up to and including its first stop token (what follows is padding)."""
    row = [int(t) for t in row[:limit]]
    ends = [i for i, token in enumerate(row) if token in stop]
    return row[:ends[0] + 1] if ends else row


def _measure(generate_all, batch: int, repeats: int, new_tokens: int) -> dict:
    """Time `generate_all(batch)` -> (each answer's token ids, texts) `repeats` times after one untimed warm-up;
    tokens per second count the new tokens each answer has."""
    generate_all(batch, warmup=True)
    runs, counts = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        tokens, texts = generate_all(batch)
        seconds = time.perf_counter() - started
        counts.append(sum(map(len, tokens)))
        runs.append(counts[-1] / seconds)
    return {"tokens_per_s": statistics.median(runs), "runs": runs, "new_tokens": counts, "tokens": tokens,
            "texts": texts, "short": sum(len(t) < new_tokens for t in tokens)}


# ------------------------------------------------------------------------------------------------ workers


def _worker_prepare(args, work: Path) -> dict:
    """The workload every side shares: the adapter (saved), the prompts' token ids, the stop and pad ids, and for
    llama.cpp the GGUF exports. Runs in its own process so that no side's peak RSS includes it."""
    import torch
    from transformers import AutoTokenizer

    import qlorakit
    from qlorakit.adapters import adapter_base, read_adapter_info, save_adapter
    from qlorakit.config import TrainConfig
    from qlorakit.data import pad_id_of
    from qlorakit.demo import make_examples
    from qlorakit.generation import encode_prompts, stop_ids
    from qlorakit.load import resolve_source
    from qlorakit.precision import precision_of

    if args.adapter:
        adapter = Path(args.adapter)
        base = adapter_base(read_adapter_info(adapter), adapter)
    else:
        base, adapter = args.model, work / "adapter"
        torch.manual_seed(args.seed)  # PEFT's initialisation of A
        model, _ = qlorakit.load(base, quant="nf4", double_quant=True, dtype=args.dtype, device="cpu")
        model = qlorakit.add_lora(model, rank=args.rank, alpha=args.alpha)
        seeded = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:  # zero by default, which would make the adapter a no-op
                    param.copy_(torch.randn(param.shape, generator=seeded) * args.b_std)
        cfg = TrainConfig.build(None, model=base, quant="nf4", double_quant=True, dtype=args.dtype,
                                rank=args.rank, alpha=args.alpha)
        save_adapter(model, adapter, cfg, precision_of(model))
        del model
    source = resolve_source(base)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as qlorakit.load does
    prompts = [ex["messages"][:1] for ex in make_examples(4, seed=args.seed)] + GENERAL_PROMPTS
    ggufs = {}
    for gguf_type in args.gguf_types:
        ggufs[gguf_type] = str(qlorakit.export_gguf(work / f"merged-{gguf_type}.gguf", adapter=adapter,
                                                    gguf_type=gguf_type, log=lambda _: None))
    return {"base": str(base), "source": str(source), "adapter": str(adapter), "prompts": prompts,
            "ids": encode_prompts(tokenizer, prompts), "stop": stop_ids(tokenizer), "pad": pad_id_of(tokenizer),
            "gguf": ggufs}


def _worker_qlorakit(args, workload: dict) -> dict:
    import inspect

    import qlorakit
    from qlorakit.adapters import load_adapter
    from qlorakit.generation import encode_prompts
    from qlorakit.precision import dtype_name, precision_of

    model, tokenizer = qlorakit.load(workload["base"], quant="nf4", double_quant=True, dtype=args.dtype,
                                     device="cpu")
    model = load_adapter(model, workload["adapter"])
    prompts, n, stop = workload["prompts"], args.new_tokens, set(workload["stop"])
    if encode_prompts(tokenizer, prompts) != workload["ids"]:
        raise SystemExit("qlorakit: its prompt token ids differ from the workload's; the sides would not compare")
    accepts = inspect.signature(qlorakit.generate).parameters
    extra = {"min_new_tokens": n} if "min_new_tokens" in accepts else {}
    captured: list[list[int]] = []  # each answer's token ids in the current call, seen through a hook
    engines: set[str] = set()  # what generated them (Generator.describe), when generate says

    if "generator" in accepts:  # qlorakit's decoder: its Answers carry their token ids
        from qlorakit.generation import Generator

        class CountingGenerator(Generator):  # a subclass, not a patched method: no cycle keeps a call's decoder
            def run(self, *a, **kw):
                answers = super().run(*a, **kw)
                captured.extend(list(answer.tokens) for answer in answers)
                engines.add(self.describe())
                return answers

        kept: dict[int, Generator] = {}

        def hook(batch):  # a new one per call, as generate builds itself when given none; or one kept per batch size
            if not args.kept:
                return {"generator": CountingGenerator(model, tokenizer, batch)}
            return {"generator": kept.setdefault(batch, CountingGenerator(model, tokenizer, batch))}
    else:  # the generate of transformers' model.generate: capture its output rows
        inner = model.generate

        def counting_generate(*a, **kw):
            out = inner(*a, **kw)
            captured.extend(_until_stop(row, stop, n) for row in out[:, kw["input_ids"].shape[1]:])
            return out

        model.generate = counting_generate

        def hook(batch):
            return {}

    def generate_all(batch, warmup=False):
        chunk = prompts[:batch] if warmup else prompts
        captured.clear()
        texts = qlorakit.generate(model, tokenizer, chunk, max_new_tokens=n, batch_size=batch, **extra,
                                  **hook(batch))
        if len(captured) != len(chunk):
            raise SystemExit(f"qlorakit: the benchmark's hook saw {len(captured)} answers for {len(chunk)} prompts; "
                             "it no longer sees how qlorakit.generate produces its tokens, so it cannot count them")
        return list(captured), texts

    results = {str(b): _measure(generate_all, b, args.repeats, n) for b in args.batches}
    for r in results.values():  # generate's texts should be its tokens decoded (special tokens left out)
        r["texts_not_tokens"] = sum(text != tokenizer.decode(ids, skip_special_tokens=True)
                                    for text, ids in zip(r["texts"], r["tokens"]))
    return {"batches": results, "peak_mb": _peak_rss_mb(), "dtype": dtype_name(precision_of(model).compute),
            "counted": "min_new_tokens" if extra else "as produced (generate takes no min_new_tokens)",
            "version": f"qlorakit {qlorakit.__version__}" + "".join(f"; {e}" for e in sorted(engines))}


def _worker_transformers(args, workload: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorakit.precision import Precision, dtype_name

    dtype = Precision.resolve(args.dtype, device="cpu").compute
    model = AutoModelForCausalLM.from_pretrained(workload["source"], dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(workload["source"])
    ids, pad, n, stop = workload["ids"], workload["pad"], args.new_tokens, workload["stop"]

    @torch.no_grad()
    def generate_all(batch, warmup=False):
        tokens = []
        for start in range(0, batch if warmup else len(ids), batch):
            chunk = ids[start:start + batch]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=pad, eos_token_id=stop)
            tokens += [_until_stop(row, set(stop), n) for row in out[:, width:]]
        return tokens, [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    results = {str(b): _measure(generate_all, b, args.repeats, n) for b in args.batches}
    return {"batches": results, "peak_mb": _peak_rss_mb(), "dtype": dtype_name(dtype), "counted": "min_new_tokens",
            "version": f"transformers {transformers.__version__}, torch {torch.__version__}"}


def _worker_llama(args, workload: dict, gguf_type: str) -> dict:
    """Greedy decoding through llama.cpp's C API (llama-cpp-python's bindings): every prompt its own sequence, all
    prompts of a batch decoded together, the next token the argmax of the logits with the stop tokens masked (so
    exactly --new-tokens each). Imports nothing of qlorakit: it may run in another Python (--llama-python)."""
    import ctypes

    import llama_cpp
    import numpy as np

    ids, n, stop, most = workload["ids"], args.new_tokens, workload["stop"], max(args.batches)
    per_sequence = max(map(len, ids)) + n
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(workload["gguf"][gguf_type].encode(),
                                                 llama_cpp.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp: cannot load {workload['gguf'][gguf_type]}")
    params = llama_cpp.llama_context_default_params()
    params.n_seq_max, params.n_ctx = most, most * per_sequence  # n_ctx is shared out among the sequences
    params.n_batch = params.n_ubatch = most * per_sequence  # a whole batch of prompts in one llama_decode
    params.n_threads = params.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch_api = llama_cpp.llama_batch_init(params.n_batch, 0, most)

    def decode(entries):
        """entries: (token, position, sequence, wants logits) -> {sequence: its logits' row in the batch}"""
        rows = {}
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch_api.token[i], batch_api.pos[i] = token, pos
            batch_api.n_seq_id[i], batch_api.seq_id[i][0] = 1, seq
            batch_api.logits[i] = logits
            if logits:
                rows[seq] = i
        batch_api.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, batch_api) != 0:
            raise SystemExit(f"llama.cpp: llama_decode failed on a batch of {len(entries)} tokens")
        return rows

    def greedy(rows):
        picks = {}
        for seq, i in rows.items():
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
            logits[stop] = -np.inf
            picks[seq] = int(logits.argmax())
        return picks

    def generate_chunk(chunk):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)  # every call starts from scratch
        rows = decode([(t, p, s, p == len(x) - 1) for s, x in enumerate(chunk) for p, t in enumerate(x)])
        outputs = [[] for _ in chunk]
        for step in range(n):
            picks = greedy(rows)
            for seq, token in picks.items():
                outputs[seq].append(token)
            if step + 1 < n:
                rows = decode([(picks[s], len(x) + step, s, True) for s, x in enumerate(chunk)])
        return outputs

    def text(tokens):  # as the other sides decode: special tokens left out
        buffer = ctypes.create_string_buffer(64 * len(tokens) + 64)
        size = llama_cpp.llama_detokenize(vocab, (llama_cpp.llama_token * len(tokens))(*tokens), len(tokens),
                                          buffer, len(buffer), True, False)
        return buffer.raw[:size].decode("utf-8", errors="replace")

    def generate_all(batch, warmup=False):
        tokens = []
        for start in range(0, batch if warmup else len(ids), batch):
            tokens += generate_chunk(ids[start:start + batch])
        return tokens, [text(t) for t in tokens]

    try:
        results = {str(b): _measure(generate_all, b, args.repeats, n) for b in args.batches}
    finally:
        llama_cpp.llama_batch_free(batch_api)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return {"batches": results, "peak_mb": _peak_rss_mb(), "dtype": gguf_type,
            "counted": "stop tokens masked",
            "version": f"llama-cpp-python {llama_cpp.__version__}"}


# ------------------------------------------------------------------------------------------------ the driver


def _parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="the base when no --adapter is given")
    p.add_argument("--adapter", help="a saved LoRA adapter (e.g. a demo run's qlorakit-demo/); default: a random "
                   "one on --model")
    p.add_argument("--dtype", default="auto", help="compute dtype of qlorakit and transformers (auto: what qlorakit "
                   "picks)")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt, exactly")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of every measurement (the median is reported)")
    p.add_argument("--threads", type=int, default=_threads(), help="threads of every side (default: this machine's "
                   "cores)")
    p.add_argument("--only", nargs="+", choices=GENERATORS, help="run only these generators")
    p.add_argument("--llama-python", help="a Python that can import llama_cpp (llama-cpp-python), for the llama.cpp "
                   "rows; default: this one, if it can")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--rank", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--alpha", type=float, default=32, help=argparse.SUPPRESS)
    p.add_argument("--b-std", type=float, default=0.02, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--gguf-types", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--kept", action="store_true", help=argparse.SUPPRESS)
    return p


BATCHES = (1, 8)


def _run_worker(python: str, worker: str, args, work: Path, extra: list[str] = ()) -> dict:
    cmd = [python, __file__, "--worker", worker, "--work", str(work), "--dtype", args.dtype, "--model", args.model,
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--seed", str(args.seed), "--rank", str(args.rank), "--alpha", str(args.alpha),
           "--b-std", str(args.b_std), *(["--adapter", args.adapter] if args.adapter else []), *extra]
    print(f"running {LABELS.get(worker, worker)} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{worker} failed (exit {proc.returncode})")
    return json.loads(lines[-1][7:])


def _llama_python(args) -> str | None:
    """The Python that runs the llama.cpp rows, or None (with a line saying how to install it) when the user did not
    ask for llama.cpp by name and this Python cannot import llama_cpp."""
    python = args.llama_python or sys.executable
    try:
        probe = subprocess.run([python, "-c", "import llama_cpp, numpy"], capture_output=True, text=True)
        why = None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["it exits"])[-1]
    except OSError as e:  # not there, not executable
        why = e.strerror
    if why is None:
        return python
    which = f"--llama-python {python}" if args.llama_python else f"this Python ({python})"
    if args.llama_python or (args.only and "llama.cpp" in args.only):
        raise SystemExit(f"{which} cannot import llama_cpp ({why}); install llama-cpp-python into a Python of its "
                         f"own and pass it with --llama-python:\n  {LLAMA_INSTALL}")
    print(f"llama.cpp rows left out: {which} cannot import llama_cpp ({why}). To measure llama.cpp:\n  "
          f"{LLAMA_INSTALL}\n  then pass --llama-python /tmp/llama-venv/bin/python", file=sys.stderr)
    return None


def _fmt_speedup(ours: dict | None, theirs: dict | None) -> str:
    if not ours or not theirs:
        return "—"
    return f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"


def _report(args, workload: dict, results: dict) -> None:
    print(f"\nworkload: {workload['base']} + adapter {'(random B)' if not args.adapter else workload['adapter']}, "
          f"{len(workload['ids'])} chat prompts ({min(map(len, workload['ids']))}-{max(map(len, workload['ids']))} "
          f"tokens), greedy, {args.new_tokens} new tokens each, {args.threads} threads, CPU; median of "
          f"{args.repeats} run(s) after 1 warm-up\n")
    ours = results.get("qlorakit", {}).get("batches", {})
    kept = results.get("qlorakit-kept", {}).get("batches", {})
    print("| generator | dtype | batch 1 tok/s | batch 8 tok/s | peak RSS MB | qlorakit speed-up, batch 1 (per call "
          "/ kept) | qlorakit speed-up, batch 8 (per call / kept) |")
    print("|" + "---|" * 7)
    for name, r in results.items():
        b = r["batches"]
        cells = [f"{b[str(k)]['tokens_per_s']:.1f}" if str(k) in b else "—" for k in BATCHES]
        speed = ["" if name.startswith("qlorakit") else
                 f"{_fmt_speedup(ours.get(str(k)), b.get(str(k)))} / {_fmt_speedup(kept.get(str(k)), b.get(str(k)))}"
                 for k in BATCHES]
        print(f"| {LABELS[name]} | {r['dtype']} | {cells[0]} | {cells[1]} | {r['peak_mb']:.0f} | {speed[0]} | "
              f"{speed[1]} |")
    print()
    n_prompts = len(workload["ids"])
    reference = ours.get("1", {}).get("tokens")
    for name, r in results.items():
        b = r["batches"]
        runs = "; ".join(f"batch {k}: " + ", ".join(f"{x:.1f}" for x in m["runs"]) for k, m in b.items())
        notes = [r["version"], f"tok/s per run: {runs}", f"tokens counted {r['counted']}"]
        notes += [f"batch {k}: noisy, the fastest run is {max(m['runs']) / min(m['runs']):.1f}x the slowest (a busy "
                  "machine?); rerun, or raise --repeats" for k, m in b.items() if max(m["runs"]) > 1.5 * min(m["runs"])]
        notes += [f"batch {k}: {m['short']} answers ended before {args.new_tokens} tokens (counted as produced)"
                  for k, m in b.items() if m["short"]]
        if reference and name != "qlorakit" and "1" in b:
            same = sum(a == q for a, q in zip(b["1"]["tokens"], reference))
            notes.append(f"{same}/{n_prompts} batch-1 answers the same token ids as qlorakit's")
        if "1" in b and "8" in b:
            same = sum(a == q for a, q in zip(b["8"]["tokens"], b["1"]["tokens"]))
            notes.append(f"{same}/{n_prompts} batch-8 answers the same token ids as its batch-1 answers")
        notes += [f"batch {k}: {m['texts_not_tokens']}/{n_prompts} returned texts are not their tokens decoded"
                  for k, m in b.items() if m.get("texts_not_tokens")]
        print(f"{LABELS[name]}:\n  " + "\n  ".join(notes))


def main() -> int:
    args = _parser().parse_args()
    if args.new_tokens < 1 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("--new-tokens, --repeats and --threads must be at least 1")
    args.batches = BATCHES
    if args.worker:
        work = Path(args.work)
        if args.worker == "prepare":
            result = _worker_prepare(args, work)
        else:
            workload = json.loads((work / "workload.json").read_text())
            if args.worker.startswith("llama.cpp-"):
                result = _worker_llama(args, workload, args.worker.removeprefix("llama.cpp-"))
            else:
                import torch

                torch.set_num_threads(args.threads)
                args.kept = args.worker == "qlorakit-kept"
                result = {"qlorakit": _worker_qlorakit, "qlorakit-kept": _worker_qlorakit,
                          "transformers": _worker_transformers}[args.worker](args, workload)
        print("RESULT " + json.dumps(result))
        return 0

    wanted = args.only or list(GENERATORS)
    llama_python = _llama_python(args) if "llama.cpp" in wanted else None
    gguf_types = list(LLAMA_TYPES) if llama_python else []
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        started = time.perf_counter()
        workload = _run_worker(sys.executable, "prepare", args, work, ["--gguf-types", *gguf_types])
        (work / "workload.json").write_text(json.dumps(workload))
        print(f"  prepared in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        results = {}
        for name in wanted:
            if name == "llama.cpp":
                for gguf_type in gguf_types:
                    results[f"llama.cpp-{gguf_type}"] = _run_worker(llama_python, f"llama.cpp-{gguf_type}", args,
                                                                    work)
            else:
                results[name] = _run_worker(sys.executable, name, args, work)
                if name == "qlorakit":
                    results["qlorakit-kept"] = _run_worker(sys.executable, "qlorakit-kept", args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(args, workload, results)
    if args.json:
        from qlorakit.outputs import atomic_write_json

        atomic_write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "work")},
                                      "workload": {k: v for k, v in workload.items() if k != "gguf"},
                                      "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
