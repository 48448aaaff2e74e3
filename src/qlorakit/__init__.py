"""qlorakit: QLoRA fine-tuning of causal language models, correct in every precision.

    run = qlorakit.train(model="smollm2-135m-instruct", data="train.jsonl", output="out")   # the whole run

    model, tokenizer = qlorakit.load("smollm2-135m-instruct", quant="nf4", dtype="auto")     # or piece by piece
    model = qlorakit.add_lora(model, rank=16, alpha=32)
    step = qlorakit.TrainStep(model, lr=2e-4)

    qlorakit.merge("out", "merged", dtype="bf16")                      # outputs: a transformers model directory,
    qlorakit.export_gguf("model.gguf", adapter="out", gguf_type="q8_0")  # a GGUF file,
    qlorakit.save_quantized(model, tokenizer, "base-nf4")              # the quantized base itself
"""

from .adapters import add_lora, load_adapter
from .config import TrainConfig
from .data import load_data
from .errors import (ConfigError, DataError, PrecisionError, QLoraKitError, SourceError, TrainingError,
                     UpstreamError)
from .evaluate import eval_loss, exact_match
from .generation import generate
from .export import export_gguf, merge, quantize, save_quantized
from .fast_path import FastPathReport, fast_path_report
from .load import DEFAULT_MODEL, QUANT_KINDS, load
from .loss import causal_lm_loss
from .precision import Precision, precision_of
from .train import RunResult, StepResult, TrainStep, train
from .trl_guard import PrecisionCallback, guard

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "QUANT_KINDS", "ConfigError", "DataError", "FastPathReport", "Precision", "PrecisionCallback", "PrecisionError",
    "QLoraKitError", "RunResult", "SFTTrainer", "SourceError", "StepResult", "TrainConfig", "TrainStep",
    "TrainingError", "UpstreamError", "add_lora", "causal_lm_loss", "eval_loss", "exact_match", "export_gguf",
    "fast_path_report", "generate", "guard",
    "load", "load_adapter", "load_data", "merge", "precision_of", "quantize", "save_quantized", "train",
]


def __getattr__(name):
    if name == "SFTTrainer":  # imports TRL on first use only
        from . import trl_guard

        return trl_guard.SFTTrainer
    raise AttributeError(f"module 'qlorakit' has no attribute {name!r}")
