"""qlorakit: QLoRA fine-tuning of causal language models, correct in every precision.

    model, tokenizer = qlorakit.load("smollm2-135m-instruct", quant="nf4", dtype="auto")
    model = qlorakit.add_lora(model, rank=16, alpha=32)
    step = qlorakit.TrainStep(model, lr=2e-4)
"""

from .adapters import add_lora
from .errors import ConfigError, PrecisionError, QLoraKitError, SourceError
from .load import DEFAULT_MODEL, QUANT_KINDS, load
from .precision import Precision, precision_of
from .train import StepResult, TrainStep, causal_lm_loss
from .trl_guard import PrecisionCallback, guard

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "QUANT_KINDS", "ConfigError", "Precision", "PrecisionCallback", "PrecisionError",
    "QLoraKitError", "SFTTrainer", "SourceError", "StepResult", "TrainStep", "add_lora", "causal_lm_loss", "guard",
    "load", "precision_of",
]


def __getattr__(name):
    if name == "SFTTrainer":  # imports TRL on first use only
        from . import trl_guard

        return trl_guard.SFTTrainer
    raise AttributeError(f"module 'qlorakit' has no attribute {name!r}")
