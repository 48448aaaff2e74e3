"""The fast path: fused LoRA layers swapped into PEFT models, and per-example attention over packed rows
(pure torch, CPU and CUDA)."""

from .attention import install_packed_attention, packed_attention_forward
from .lora import dequantize_weight, install_fused_lora, lora_linear

__all__ = ["dequantize_weight", "install_fused_lora", "install_packed_attention", "lora_linear",
           "packed_attention_forward"]
