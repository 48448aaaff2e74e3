"""Outputs other tools load: merged transformers models, GGUF files, bitsandbytes-quantized checkpoints.
(Adapters are saved in PEFT's format by the training run itself.)"""

from .gguf_file import export_gguf
from .merge import merge
from .quantized import quantize, save_quantized

__all__ = ["export_gguf", "merge", "quantize", "save_quantized"]
