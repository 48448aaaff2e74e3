"""Which base should `qlorakit merge` add the adapter to? Held-out exact match of the demo task, side by side.

    python bench/merge_base.py                      # trains the demo adapter first (a few minutes on a CPU)
    python bench/merge_base.py --run /tmp/demo-run  # an existing demo run (`qlorakit train --output /tmp/demo-run`)

Evaluated on the demo's 60 held-out chats, greedy, 24 new tokens, the same prompt token ids for every model:
  (a) the trained model: qlorakit.load as recorded in the run's qlorakit.json (NF4) + the adapter, evaluated the
      way the demo and `qlorakit eval` evaluate it (qlorakit.generation.generate);
  (b) the adapter merged into the quantized base it was trained against (`--base quantized`);
  (c) the adapter merged into the original unquantized weights (`--base original`);
both merged in bf16 (the default merge dtype) and in fp32, each loaded with plain transformers in bf16 and fp32 and
generated with `model.generate` (no qlorakit, no autocast). Reported: exact match, and how many answers are the
trained model's answer word for word (with the answers that differ), and the distance of the logits from the trained
model's (relative L2 over every prompt token, the mean over the 60 prompts; the trained model computes in its
compute dtype, so bf16 rounding bounds how close any merge can come).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

MAX_NEW_TOKENS = 24
BATCH = 16


def _plain_model(model_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval(), AutoTokenizer.from_pretrained(model_dir)


def _plain_answers(model, tokenizer, encoded: list[list[int]]) -> list[str]:
    """Greedy answers of a merged model loaded with plain transformers: left-padded batches, as qlorakit batches."""
    from qlorakit.data import pad_id_of
    from qlorakit.generation import stop_ids

    pad = pad_id_of(tokenizer)
    answers = []
    with torch.no_grad():
        for start in range(0, len(encoded), BATCH):
            chunk = encoded[start:start + BATCH]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=pad, eos_token_id=stop_ids(tokenizer))
            answers += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, width:]]
    return answers


def _logits(model, encoded: list[list[int]], autocast=None) -> list[torch.Tensor]:
    """fp32 logits over every prompt token, one prompt at a time (no padding)."""
    import contextlib

    with torch.no_grad(), (autocast or contextlib.nullcontext()):
        return [model(input_ids=torch.tensor([ids])).logits.float() for ids in encoded]


def _distance(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Mean over prompts of the relative L2 distance of the logits."""
    return sum(float((a - b).norm() / b.norm()) for a, b in zip(logits, reference)) / len(reference)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="an existing demo run directory (default: train one in a temporary directory)")
    parser.add_argument("--work", help="where to write the merged models (default: a temporary directory)")
    args = parser.parse_args(argv)

    import qlorakit
    from qlorakit.adapters import load_adapter
    from qlorakit.data import read_examples
    from qlorakit.demo import demo_rows, run_demo
    from qlorakit.evaluate import prompt_and_reference
    from qlorakit.generation import encode_prompts, generate
    from qlorakit.precision import precision_of

    work = Path(args.work or tempfile.mkdtemp(prefix="merge-base-"))
    started = time.perf_counter()
    if args.run:
        run = Path(args.run)
    else:
        run = work / "demo-run"
        run_demo(output=str(run), progress=False, log=lambda line: print(f"  demo: {line}", flush=True))
    saved = json.loads((run / "qlorakit.json").read_text())
    seed = json.loads((run / "config.json").read_text()).get("seed", 0) if (run / "config.json").is_file() else 0
    _, heldout_rows = demo_rows(n_heldout=60, seed=seed)
    examples, _ = read_examples(heldout_rows, name="held-out")
    prompts, references = zip(*(prompt_and_reference(e) for e in examples))
    print(f"run {run}: base {saved['base_model']}, {saved['quant']}{'+dq' if saved['double_quant'] else ''}, "
          f"compute {saved['dtype']}; {len(prompts)} held-out chats", flush=True)

    model, tokenizer = qlorakit.load(saved["base_model"], quant=saved["quant"], double_quant=saved["double_quant"],
                                     dtype=saved["dtype"], device="cpu")
    model = load_adapter(model, run)
    trained = generate(model, tokenizer, list(prompts), max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH)
    encoded = encode_prompts(tokenizer, list(prompts))
    reference = _logits(model.eval(), encoded, precision_of(model).autocast())  # as it computes in training, eval
    del model

    rows = [("(a) trained: NF4 + adapter (qlorakit)", trained, 0.0)]
    for base in ("quantized", "original"):
        for merge_dtype in ("bf16", "fp32"):
            merged = qlorakit.merge(run, work / f"{base}-{merge_dtype}", dtype=merge_dtype, base=base,
                                    overwrite=True, log=lambda _: None)
            from transformers import AutoTokenizer

            assert encode_prompts(AutoTokenizer.from_pretrained(merged), list(prompts)) == encoded  # same prompts
            for load_dtype in ((torch.bfloat16, torch.float32) if merge_dtype == "bf16" else (torch.float32,)):
                label = (f"({'b' if base == 'quantized' else 'c'}) --base {base}, merged {merge_dtype}, loaded "
                         f"{str(load_dtype).replace('torch.', '')}")
                plain, plain_tokenizer = _plain_model(merged, load_dtype)
                rows.append((label, _plain_answers(plain, plain_tokenizer, encoded),
                             _distance(_logits(plain, encoded), reference)))
                print(f"  done: {label}", flush=True)

    print(f"\n{'model':<58} {'exact match':>12} {'same answer as (a)':>19} {'logits vs (a)':>14}")
    for label, answers, distance in rows:
        hits = sum(a.strip() == r.strip() for a, r in zip(answers, references))
        same = sum(a.strip() == t.strip() for a, t in zip(answers, trained))
        print(f"{label:<58} {hits:>5}/{len(references)} {hits / len(references):>5.0%} {same:>12}/{len(trained)} "
              f"{distance:>14.2e}")
    for label, answers, _ in rows[1:]:
        for i, (a, t) in enumerate(zip(answers, trained)):
            if a.strip() != t.strip():
                print(f"  {label}: held-out {i}: {a!r}, trained {t!r}, reference {references[i]!r}")

    print(f"\n({time.perf_counter() - started:.0f} s; merged models in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
