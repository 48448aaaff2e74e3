"""The precision policy: the only place in qlorakit that decides dtypes.

DESIGN.md's table is normative; in short:

    compute  | 4-bit dequant | LoRA A/B (auto)         | other trainables | GradScaler | autocast
    fp32     | fp32          | fp32                    | fp32             | off        | off
    bf16     | bf16          | bf16 (fp32 on request)  | as LoRA          | off        | bf16
    fp16     | fp16          | fp32 (always)           | fp32             | on         | fp16

`Precision.resolve` turns the user's request into a policy, `apply` puts a model into it, `check` proves a
model (and its scaler) obeys it before the first optimizer step.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, replace

import torch

# The dtype names (declared in choices.py, torch-free, for the command line's parser) are re-exported here.
from .choices import COMPUTE_CHOICES, DEFAULT_SAVED_DTYPE, DTYPE_NAMES, DTYPE_SPELLINGS, is_dtype_name  # noqa: F401
from .errors import PrecisionError
from .upstream import bitsandbytes as bnb

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # DTYPE_NAMES -> torch
_SHORT = {dtype: name for name, dtype in _DTYPES.items()}
_NAMES = {spelling: _DTYPES[name] for spelling, name in DTYPE_SPELLINGS.items()}  # every spelling -> torch


def torch_config_name(dtype: torch.dtype) -> str:
    """The name transformers writes in config.json for `dtype` ('bfloat16', 'float16', 'float32')."""
    return str(dtype).replace("torch.", "")


def parse_dtype(value: str | torch.dtype, parameter: str = "dtype") -> torch.dtype:
    """'fp16' / 'float16' / torch.float16 -> torch.float16, or a ConfigError naming `parameter`."""
    if isinstance(value, torch.dtype):
        if value in _SHORT:
            return value
    elif isinstance(value, str) and value.lower() in _NAMES:
        return _NAMES[value.lower()]
    raise PrecisionError(
        f"{parameter}={value!r} is not a floating dtype qlorakit trains in; use one of fp32, bf16, fp16"
        + (" or auto" if parameter == "dtype" else "")
    )


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


# -- the quantized base: what qlorakit.load does, and merge's QuantizedBase rebuilds one tensor at a time ---------


def frozen_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype a frozen floating weight (norm, embedding, unquantized layer) is held in: the compute dtype."""
    return compute


def quantized_from(quant: str, compute: torch.dtype) -> torch.dtype:
    """The dtype a weight is in when bitsandbytes quantizes it at load: the frozen dtype for 4-bit (transformers
    loads in the compute dtype, then Params4bit quantizes); fp16 for LLM.int8, whose Int8Params casts to fp16
    before computing its row scales whatever the load dtype."""
    return torch.float16 if quant == "int8" else frozen_dtype(compute)


def dequantized_to(quant: str, compute: torch.dtype) -> torch.dtype:
    """The dtype a quantized weight dequantizes to in training: the compute dtype (rule 1 for 4-bit layers, whose
    stored quant_state.dtype is rewritten to it; int8 layers' dequantized rows enter the compute-dtype matmul)."""
    return compute


# -- fp32 by rule, outside the training step ------------------------------------------------------------------

# The loss (log-softmax over the vocabulary) is always computed in fp32 (DESIGN.md).
LOSS_DTYPE = torch.float32
# So is every softmax over the vocabulary that chooses a token (sampling, its warpers, greedy's argmax).
LOGITS_DTYPE = LOSS_DTYPE
# Sums across the processes of a run (token counts, loss sums, memory): float64, exact for counts up to 2**53.
REDUCE_DTYPE = torch.float64
# Exports work in fp32: a merge adds the LoRA delta s·B·A to the dequantized base in fp32 and rounds once to the
# saved dtype, and a GGUF file is encoded from fp32 tensors, so no intermediate rounding precedes the one the user
# asked for. A GGUF source is converted to fp32 safetensors for the same reason: qlorakit then quantizes it its way.
EXPORT_DTYPE = torch.float32


# ---------------------------------------------------------------------------------------------- hardware


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product or matrix units (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@functools.lru_cache(maxsize=None)
def _cpu_has_amx_tiles() -> bool:
    return "amx_tile" in _cpu_flags()


def attention_kernel_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype torch's CPU flash-attention kernel runs in for the packed attention (kernels/attention.py): the
    compute dtype on CPUs with AMX tiles; fp32 elsewhere, where the kernel's half-precision path converts blocks to
    fp32 anyway and its backward is slower (a mixed-length batch of SmolLM2's shapes, forward plus backward: 98 ms
    in bf16, 88 ms in fp32 per layer), and fp32 puts the key/value gradients 3-5x closer to fp64 (they sum over the
    query heads that share them). Its inputs and outputs stay in the compute dtype."""
    return compute if _cpu_has_amx_tiles() else torch.float32


def kv_cache_dtype(compute: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype generation keeps keys and values in (generation/decoder.py). On a CPU, the attention kernel's
    (above): a decode step's attention over the cache then runs in fp32 without converting the cache each step, as
    torch's flash kernel computes half-precision attention in fp32 internally; the cache holds the compute-dtype
    keys and values exactly. On a GPU, the compute dtype: memory is what limits the batch there."""
    return attention_kernel_dtype(compute) if device_type == "cpu" else compute


def packs_generation_weights(compute: torch.dtype) -> bool:
    """Whether generation's CPU products use oneDNN's packed weights (upstream/torch_private.packed_linear): in bf16
    only, where they are 1.7-2.8x faster than torch.mm for a few rows and give the same values. fp32 products run in
    MKL either way and packing would change their summation order; oneDNN's fp16 packing needs AVX-NE-CONVERT or
    AVX512-FP16."""
    return compute == torch.bfloat16


def _matmul_seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    # A LoRA-training-shaped product: tokens x hidden times hidden x intermediate (SmolLM2-sized).
    a = torch.randn(512, 576, dtype=dtype)
    b = torch.randn(1536, 576, dtype=dtype)
    a @ b.T  # warm-up (oneDNN picks its kernel on first use)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def cpu_auto_dtype() -> torch.dtype:
    """The compute dtype `auto` means on this CPU.

    The rule: bf16 only where the CPU has native bf16 units (AVX512-BF16 / AMX) *and* a measured bf16 matmul is
    faster than fp32 on it; fp32 everywhere else. Without native units bf16 is emulated and slower (about 1.7x on
    AVX2-only CPUs), and fp16 on a CPU is always emulated, so it is never chosen automatically.
    """
    if not cpu_has_native_bf16():
        return torch.float32
    return torch.bfloat16 if _matmul_seconds(torch.bfloat16) < _matmul_seconds(torch.float32) else torch.float32


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PrecisionError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PrecisionError(f"device={device!r} was asked for but this torch build sees no CUDA GPU; use device='cpu'")
    if resolved.type not in ("cpu", "cuda"):
        raise PrecisionError(f"device={device!r}: qlorakit runs on cpu and cuda only")
    return resolved


# ---------------------------------------------------------------------------------------------- the policy


# Names PEFT gives to what it trains: LoRA matrices (and DoRA magnitudes), and full copies in modules_to_save.
_TRAINABLE_TAGS = ("lora_", "modules_to_save")


@dataclass(frozen=True)
class Precision:
    """A resolved precision policy: the compute dtype and the dtype of everything trainable."""

    compute: torch.dtype
    adapter: torch.dtype
    device_type: str = "cpu"

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def resolve(
        cls, dtype: str | torch.dtype = "auto", adapter_dtype: str | torch.dtype = "auto", device="auto"
    ) -> "Precision":
        """Turn a request into a policy. `auto`: on CUDA bf16 where supported, else fp16; on a CPU see
        `cpu_auto_dtype`. adapter_dtype `auto` follows the table; an explicit one is validated against it."""
        dev = resolve_device(device)
        if isinstance(dtype, str) and dtype.lower() == "auto":
            if dev.type == "cuda":
                compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                compute = cpu_auto_dtype()
        else:
            compute = parse_dtype(dtype, "dtype")
        return cls(compute, torch.float32, dev.type).with_adapter_dtype(adapter_dtype)

    def with_adapter_dtype(self, adapter_dtype: str | torch.dtype = "auto") -> "Precision":
        """This policy with the trainable dtype set by the user's request, or a PrecisionError naming the rule."""
        if isinstance(adapter_dtype, str) and adapter_dtype.lower() == "auto":
            # QLoRA trains bf16 adapters under bf16; GradScaler needs fp32 ones under fp16.
            return replace(self, adapter=torch.bfloat16 if self.compute == torch.bfloat16 else torch.float32)
        adapter = parse_dtype(adapter_dtype, "adapter_dtype")
        if self.compute == torch.float16 and adapter != torch.float32:
            raise PrecisionError(
                f"adapter_dtype={dtype_name(adapter)} with dtype=fp16 breaks the GradScaler rule: fp16 training "
                "needs a GradScaler, and a GradScaler cannot unscale half-precision gradients, so every trainable "
                "parameter must be fp32. Use adapter_dtype='auto' (fp32), or train with dtype='bf16' to get "
                "bf16 adapters."
            )
        if self.compute == torch.float32 and adapter != torch.float32:
            raise PrecisionError(
                f"adapter_dtype={dtype_name(adapter)} with dtype=fp32: under fp32 compute every trainable parameter "
                "is fp32. Use adapter_dtype='auto', or dtype='bf16' for bf16 adapters."
            )
        if self.compute == torch.bfloat16 and adapter == torch.float16:
            raise PrecisionError(
                "adapter_dtype=fp16 with dtype=bf16 is not in the policy: bf16 compute trains bf16 adapters, or "
                "fp32 ones on request. Use adapter_dtype='auto' (bf16) or 'fp32'."
            )
        return replace(self, adapter=adapter)

    # -- what the policy implies -----------------------------------------------------------------------------

    @property
    def uses_grad_scaler(self) -> bool:
        return self.compute == torch.float16

    @property
    def uses_autocast(self) -> bool:
        return self.compute != torch.float32

    def autocast(self):
        """The autocast context for forward passes (a no-op under fp32)."""
        if not self.uses_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def grad_scaler(self, init_scale: float = 2.0**10, sharded: bool = False) -> torch.amp.GradScaler | None:
        """A GradScaler exactly when the compute dtype is fp16, else None.

        It starts at 2^10, not torch's 2^16: at 2^16 the scaled gradients of a LoRA fine-tune overflow fp16 in the
        first steps, which the scaler then skips (measured on SmolLM2-135M: the first 2 of 15 steps lost), so an
        fp16 run trails its bf16 and fp32 twins. The scaler still grows the scale when it can.

        `sharded` (FSDP: each rank holds a part of every gradient): torch's ShardedGradScaler, which sums its
        found-inf over the ranks, so that all of them skip a step, or none.
        """
        if not self.uses_grad_scaler:
            return None
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device_type, init_scale=init_scale)
        return torch.amp.GradScaler(self.device_type, init_scale=init_scale)

    def trainer_flags(self) -> dict[str, bool]:
        """The fp16/bf16 flags of transformers' TrainingArguments (and TRL's configs) that match this policy."""
        return {"fp16": self.compute == torch.float16, "bf16": self.compute == torch.bfloat16}

    def describe(self) -> str:
        return (
            f"compute {dtype_name(self.compute)} on {self.device_type}, trainable {dtype_name(self.adapter)}, "
            f"GradScaler {'on' if self.uses_grad_scaler else 'off'}, "
            f"autocast {dtype_name(self.compute) if self.uses_autocast else 'off'}"
        )

    # -- apply ----------------------------------------------------------------------------------------------

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put `model` into this policy in place and return it.

        - every 4-bit layer dequantizes to the compute dtype (upstream/bitsandbytes.pin_4bit_compute: its stored
          quant_state.dtype, bf16 in many pre-quantized checkpoints, is rewritten; its compute dtype pinned; its
          bf16 CPU inference kernel turned off);
        - frozen floating weights (norms, embeddings, lm_head, biases) are stored in the compute dtype;
        - trainable parameters are stored in the trainable dtype;
        - fused LoRA layers (qlorakit.kernels) compute in the compute dtype.
        Quantized storage and buffers (rotary frequencies stay fp32) are left alone.
        """
        for _, module, _ in bnb.quantized_layers(model, "4bit"):
            bnb.pin_4bit_compute(module, dequantized_to(bnb.describe_4bit(module)[0], self.compute), self.compute)
        for module in model.modules():
            if getattr(module, "qlorakit_fused", False):
                module.qlorakit_compute_dtype = self.compute
        for _, param in model.named_parameters():
            if bnb.is_quantized_tensor(param):
                continue
            target = self.adapter if param.requires_grad else frozen_dtype(self.compute)
            if param.dtype != target:
                param.data = param.data.to(target)
        return model

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply this policy to `model` and remember it there for add_lora, the training step and the TRL guard
        (and, for a model that did not come from qlorakit.load, the quantization its config declares, which
        `check` holds it to)."""
        self.apply(model)
        model.qlorakit_precision = self
        if getattr(model, "qlorakit_quant", None) is None:
            from .upstream.transformers import declared_quantization

            model.qlorakit_quant = declared_quantization(model)
        return model

    # -- check ----------------------------------------------------------------------------------------------

    def check(self, model: torch.nn.Module, scaler: torch.amp.GradScaler | None = None) -> None:
        """Raise PrecisionError naming the first parameter (or the scaler) that breaks an invariant."""
        quantized = 0
        for name, module, kind in bnb.quantized_layers(model):
            quantized += 1
            if kind != "4bit":
                continue
            if bnb.repacked_for_cpu(module):
                raise PrecisionError(
                    f"{name}: bitsandbytes repacked this 4-bit layer for its bf16 CPU inference kernel, which "
                    "rounded its block scales to bf16 (rule 1: every 4-bit layer dequantizes to the compute dtype). "
                    "Reload the model through qlorakit.load, which keeps 4-bit layers out of that kernel."
                )
            state_dtype, layer_compute = bnb.pinned_compute(module)
            if state_dtype != self.compute or layer_compute != self.compute:
                raise PrecisionError(
                    f"{name}: 4-bit layer dequantizes to {dtype_name(state_dtype)} (compute dtype "
                    f"{dtype_name(layer_compute)}) but the compute dtype is {dtype_name(self.compute)} "
                    "(rule 1: every 4-bit layer dequantizes to the compute dtype). Call Precision.apply(model) "
                    "after loading, or load through qlorakit.load."
                )
        loaded_as = getattr(model, "qlorakit_quant", "none")
        if loaded_as != "none" and quantized == 0:
            # A check over zero layers would pass without checking anything: bitsandbytes stores its layers
            # differently now, or the quantization was undone.
            from .upstream import changed

            raise changed("bitsandbytes", "how it stores quantized layers",
                          f"the model was loaded as {loaded_as}, but no bitsandbytes 4-bit or 8-bit layer was found "
                          "in it; if you dequantized it yourself, load it again with quant='none'")
        for name, module in model.named_modules():
            if getattr(module, "qlorakit_fused", False) and module.qlorakit_compute_dtype != self.compute:
                raise PrecisionError(
                    f"{name}: fused LoRA layer computes in {dtype_name(module.qlorakit_compute_dtype)} but the "
                    f"compute dtype is {dtype_name(self.compute)}. Call Precision.apply(model)."
                )
        scaler_on = scaler is not None and scaler.is_enabled()
        if scaler_on != self.uses_grad_scaler:
            raise PrecisionError(
                f"GradScaler is {'on' if scaler_on else 'off'} under {dtype_name(self.compute)} compute (rule 2: a "
                "GradScaler is on exactly when the compute dtype is fp16). "
                + ("Create one with Precision.grad_scaler()." if self.uses_grad_scaler else "Do not pass a scaler.")
            )
        trainable = 0
        for name, param in model.named_parameters():
            if bnb.is_quantized_tensor(param):
                if param.requires_grad:
                    raise PrecisionError(
                        f"{name}: quantized base weight is trainable (rule 3: base weights stay quantized and "
                        "frozen). Set requires_grad=False; train it through LoRA adapters instead."
                    )
                continue
            if param.requires_grad:
                trainable += 1
                if not any(tag in name for tag in _TRAINABLE_TAGS):
                    raise PrecisionError(
                        f"{name}: base weight is trainable (rule 3: base weights stay frozen; only adapters "
                        "train). Set requires_grad=False, or list the module in add_lora's targets."
                    )
                if param.dtype != self.adapter:
                    rule = (
                        "rule 2: under fp16 every trainable parameter is fp32, because the GradScaler cannot "
                        "unscale half-precision gradients"
                        if self.uses_grad_scaler
                        else f"the policy trains {dtype_name(self.adapter)} parameters under {dtype_name(self.compute)}"
                    )
                    raise PrecisionError(
                        f"{name}: trainable parameter is {dtype_name(param.dtype)} ({rule}). Something cast it after "
                        "qlorakit set it up; call Precision.apply(model), or use qlorakit's TRL trainers "
                        "(qlorakit.SFTTrainer, DPOTrainer, GRPOTrainer, ...)."
                    )
            elif param.dtype != self.compute:
                raise PrecisionError(
                    f"{name}: frozen weight is {dtype_name(param.dtype)} but the compute dtype is "
                    f"{dtype_name(self.compute)} (frozen non-quantized weights stay in the compute dtype). "
                    "Call Precision.apply(model)."
                )
        if trainable == 0:
            raise PrecisionError("the model has no trainable parameters; add adapters with qlorakit.add_lora(model)")


def precision_of(model: torch.nn.Module) -> Precision:
    """The policy qlorakit.load attached to `model` (PEFT wrappers forward the attribute)."""
    precision = getattr(model, "qlorakit_precision", None)
    if not isinstance(precision, Precision):
        raise PrecisionError(
            "this model has no qlorakit precision policy; load it with qlorakit.load(...), or attach one with "
            "Precision.resolve(...).attach(model)"
        )
    return precision

