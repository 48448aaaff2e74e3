"""The fast path: fused LoRA layers (single, gated MLP, q/k/v) swapped into PEFT models, a lean RMSNorm,
per-example attention over packed rows, and a chunked cross-entropy (pure torch, CPU and CUDA)."""

from .attention import install_packed_attention, packed_attention_forward
from .cross_entropy import chunked_causal_lm_loss
from .lora import dequantize_weight, install_fused_lora, lora_linear
from .mlp import install_fused_mlp
from .qkv import install_fused_qkv
from .rmsnorm import install_rms_norm, rms_norm


def install_fast_path(model, compute) -> None:
    """Swap qlorakit's fast path into a PEFT LoRA model whose compute dtype is `compute`."""
    install_fused_lora(model, compute)
    install_fused_mlp(model)
    install_fused_qkv(model)
    install_packed_attention(model)
    install_rms_norm(model)


__all__ = ["install_fast_path", "chunked_causal_lm_loss", "dequantize_weight", "install_fused_lora", "install_fused_mlp", "install_fused_qkv", "install_packed_attention",
           "install_rms_norm", "lora_linear", "packed_attention_forward", "rms_norm"]
