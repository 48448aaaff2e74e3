"""The fast path: fused LoRA layers swapped into PEFT models (pure torch, CPU and CUDA)."""

from .lora import dequantize_weight, install_fused_lora, lora_linear

__all__ = ["dequantize_weight", "install_fused_lora", "lora_linear"]
