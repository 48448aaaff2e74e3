"""qlorakit's kernels: pure autograd functions (torch only; no knowledge of PEFT or transformers classes) — the fused
LoRA linear, gated MLP and q/k/v products, a lean RMSNorm, per-example attention over packed rows, and a chunked
cross-entropy (a sum for SFT, per-token log-probabilities for preference losses). qlorakit/fast_path.py installs
them into a model."""

from .attention import PackedCausalAttention, block_diagonal_segments, packed_causal_attention
from .cross_entropy import chunked_causal_lm_loss, chunked_token_logps
from .lora import frozen_weight, lora_linear, lora_product
from .mlp import LoRAGatedMLP
from .qkv import LoRASharedInput
from .rmsnorm import normalize, rms_norm

__all__ = ["LoRAGatedMLP", "LoRASharedInput", "PackedCausalAttention", "block_diagonal_segments",
           "chunked_causal_lm_loss", "chunked_token_logps", "frozen_weight", "lora_linear", "lora_product",
           "normalize", "packed_causal_attention", "rms_norm"]
