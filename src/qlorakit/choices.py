"""The values qlorakit's settings take, each declared once. The modules that act on them (load, precision, data,
export) import them from here, and so do TrainConfig and the command line's parser, which must be built without
importing torch, transformers or any other heavy library: `qlorakit --help` answers at once. Standard library only.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------- the model (load.py)

DEFAULT_MODEL = "smollm2-135m-instruct"
QUANT_KINDS = ("nf4", "fp4", "int8", "none")

# ---------------------------------------------------------------------------------------------- dtypes (precision.py)

# The dtype names qlorakit accepts and writes: the one table (config, CLI, merge and qlorakit.json all use it).
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # what qlorakit computes in, stores and saves
COMPUTE_CHOICES = ("auto", *DTYPE_NAMES)  # a compute-dtype request
# Every spelling a dtype may be given in (lower case) -> its name in DTYPE_NAMES.
DTYPE_SPELLINGS = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}
# A merged model is saved in bf16 unless asked otherwise: half the bytes of fp32 with fp32's range (fp16's would
# overflow on some models' activations when the merged model is run in fp16).
DEFAULT_SAVED_DTYPE = "bf16"


def is_dtype_name(value, allow_auto: bool = False) -> bool:
    """Whether `value` is a dtype name precision.parse_dtype takes (fp32 / float32 / ...), or 'auto' when allowed."""
    if not isinstance(value, str):
        return False
    return value.lower() in DTYPE_SPELLINGS or (allow_auto and value.lower() == "auto")


# ---------------------------------------------------------------------------------------------- data (data/)

# "preference": pairs of answers to one prompt (data/preference.py), for preference training only; "prompt" last:
# prompts alone, with the fields their rewards read (data/prompts.py), for GRPO only.
FORMATS = ("chat", "instruction", "prompt-completion", "text", "preference", "prompt")

TRAIN_ON = ("assistant", "all")
# Preference training's losses (preference.py): DPO's sigmoid, IPO, hinge (with a reference model), ORPO and SimPO
# (without one).
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
# GRPO's losses (grpo.py): how the per-token policy-gradient terms are averaged.
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")
ON_LONG = ("truncate", "drop", "error")

# ---------------------------------------------------------------------------------------------- exports (export/)

# The tensor types a GGUF export writes: name -> the gguf package's GGMLQuantizationType and LlamaFileType members.
GGUF_TYPES = {"f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# What merge and GGUF export add an adapter's delta to (export.source.merge_base).
BASES = ("quantized", "original")

# ---------------------------------------------------------------------------------------------- trackers (trackers.py)

# Where `--report-to` sends the metrics besides metrics.jsonl; each is an optional extra (pip install qlorakit[NAME]).
TRACKERS = ("tensorboard", "wandb", "mlflow")
