"""The `qlorakit` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys

from .errors import QLoraKitError
from .load import DEFAULT_MODEL, QUANT_KINDS

DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]


def _train(args) -> int:
    from .demo import run_demo

    results = run_demo(
        source=args.model, quant=args.quant, dtype=args.dtype, device=args.device, steps=args.max_steps,
        batch_size=args.batch_size, rank=args.rank, alpha=args.alpha, lr=args.lr, seed=args.seed,
    )
    print(f"loss {results[0].loss:.4f} -> {results[-1].loss:.4f} over {len(results)} steps")
    return 0


def _precision(args) -> int:
    from .precision import Precision, cpu_has_native_bf16

    p = Precision.resolve(args.dtype, device=args.device)
    print(p.describe())
    if p.device_type == "cpu":
        print(f"cpu native bf16 units: {'yes' if cpu_has_native_bf16() else 'no'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlorakit", description="QLoRA fine-tuning of causal language models, correct in every precision."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="fine-tune a model with QLoRA (no arguments: the default model on the built-in task)",
        description="Fine-tune MODEL with LoRA adapters over frozen quantized weights, on the built-in synthetic "
        "extraction task.",
    )
    train.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"HF model directory, .gguf file, or '{DEFAULT_MODEL}' (default)")
    train.add_argument("--quant", default="nf4", choices=QUANT_KINDS, help="base weight quantization (default nf4)")
    train.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="compute dtype (default auto: see `qlorakit precision`)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    train.add_argument("--max-steps", type=int, default=15, help="optimizer steps (default 15)")
    train.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    train.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    train.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default 32)")
    train.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.set_defaults(func=_train)

    precision = sub.add_parser("precision", help="show the precision policy `--dtype` resolves to on this machine")
    precision.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    precision.add_argument("--device", default="auto")
    precision.set_defaults(func=_precision)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QLoraKitError as e:
        print(f"qlorakit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
