"""qlorakit: QLoRA fine-tuning of causal language models, correct in every precision.

    run = qlorakit.train(model="smollm2-135m-instruct", data="train.jsonl", output="out")   # the whole run
    run = qlorakit.train_preference(data="pairs.jsonl", loss="sigmoid", beta=0.1, output="dpo")  # then DPO & co.
    run = qlorakit.train_grpo(data="prompts.jsonl", reward=["numeric:answer"], output="grpo")   # or RL with rewards

    model, tokenizer = qlorakit.load("smollm2-135m-instruct", quant="nf4", dtype="auto")     # or piece by piece
    model = qlorakit.add_lora(model, rank=16, alpha=32)
    step = qlorakit.TrainStep(model, lr=2e-4)

    answers = qlorakit.generate(model, tokenizer, prompts, max_new_tokens=64)  # greedy; or do_sample=True, ...

    qlorakit.merge("out", "merged", dtype="bf16")                      # outputs: a transformers model directory,
    qlorakit.export_gguf("model.gguf", adapter="out", gguf_type="q8_0")  # a GGUF file,
    qlorakit.save_quantized(model, tokenizer, "base-nf4")              # the quantized base itself
"""

import importlib as _importlib
import importlib.util as _importlib_util
import sys as _sys
import types as _types

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "DPOTrainer", "GRPOTrainer", "KTOTrainer", "QUANT_KINDS", "ConfigError", "DataError",
    "FastPathReport", "Generator", "Precision", "PrecisionCallback", "PrecisionError", "QLoraKitError", "RLOOTrainer",
    "RewardTrainer", "RunResult", "SFTTrainer", "Sampling", "SourceError", "StepResult", "TrainConfig", "TrainStep",
    "TrainingError", "UpstreamError", "add_lora", "causal_lm_loss", "eval_loss", "exact_match", "export_gguf",
    "fast_path_report", "generate", "guard",
    "load", "load_adapter", "load_data", "merge", "precision_of", "quantize", "save_quantized", "train",
    "PreferenceConfig", "train_preference", "GRPOConfig", "train_grpo",
]


# Each public name -> the module that defines it, imported when the name is first used: `import qlorakit` imports no
# torch, transformers, PEFT, bitsandbytes, TRL or datasets, so what needs none of them (`qlorakit --help`, a script
# that reads an adapter's files) starts at once.
_HOMES = {
    "DEFAULT_MODEL": "choices", "QUANT_KINDS": "choices",
    "ConfigError": "errors", "DataError": "errors", "PrecisionError": "errors", "QLoraKitError": "errors",
    "SourceError": "errors", "TrainingError": "errors", "UpstreamError": "errors",
    "TrainConfig": "config", "PreferenceConfig": "config", "GRPOConfig": "config",
    "train_preference": "preference", "train_grpo": "grpo",
    "load": "load",
    "load_data": "data",
    "Precision": "precision", "precision_of": "precision",
    "add_lora": "adapters", "load_adapter": "adapters",
    "FastPathReport": "fast_path", "fast_path_report": "fast_path",
    "causal_lm_loss": "loss",
    "RunResult": "train", "StepResult": "train", "TrainStep": "train", "train": "train",
    "eval_loss": "evaluate", "exact_match": "evaluate",
    "Generator": "generation", "Sampling": "generation", "generate": "generation",
    "export_gguf": "export", "merge": "export", "quantize": "export", "save_quantized": "export",
    "PrecisionCallback": "trl_guard", "guard": "trl_guard", "SFTTrainer": "trl_guard", "DPOTrainer": "trl_guard",
    "KTOTrainer": "trl_guard", "RewardTrainer": "trl_guard", "RLOOTrainer": "trl_guard", "GRPOTrainer": "trl_guard",
}


def __getattr__(name):
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(_importlib.import_module(f".{home}", __name__), name)
    elif not name.startswith("_") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        value = _importlib.import_module(f".{name}", __name__)  # a submodule, as `qlorakit.adapters.X` always was
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # found without this function from now on
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """qlorakit's module type, for one rule: `qlorakit.load` and `qlorakit.train` are the functions, though
    qlorakit/load.py and qlorakit/train.py are modules of the same names. Python sets a package's attribute to each
    submodule it imports (here whenever any code imports qlorakit.load), which would hide the function that an
    eager `from .load import load` used to rebind after it."""

    def __setattr__(self, name, value):
        if isinstance(value, _types.ModuleType) and _HOMES.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
