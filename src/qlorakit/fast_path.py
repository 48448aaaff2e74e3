"""The fast path: qlorakit's kernels installed into a PEFT LoRA model, and a report of what took them.

What is routed, each recognised by what it computes rather than by class name:
- every PEFT LoRA linear layer over a frozen 4-bit, LLM.int8 or plain base -> kernels.lora_linear;
- every gated MLP whose three projections are such layers and whose forward is down(act(gate(x)) · up(x)) (checked
  on the module) -> kernels.LoRAGatedMLP;
- every attention module whose q, k and v projections are such layers -> kernels.LoRASharedInput, computed before
  the module's own forward and handed to each projection, which returns it when called on that same input (an
  architecture that transforms the input before projecting simply recomputes, so the result is always right);
- every RMSNorm that computes the Llama formula (checked on the module) -> kernels.rms_norm;
- sdpa attention -> per-example attention on packed rows (kernels.packed_causal_attention), sdpa for the rest;
- and, at loss time (loss.py), a plain lm_head -> kernels.chunked_causal_lm_loss.

Whether a layer can take its kernel is decided at each call (upstream/peft.lora_parts): adapters can be switched,
merged, disabled or made trainable after installation, and PEFT's own forward then runs. `fast_path_report(model)`
says, for the model as it is now, how many modules of each kind take their kernel and why the others do not;
add_lora and load_adapter log it.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch

from . import kernels
from .precision import attention_kernel_dtype, dtype_name
from .upstream import peft as upstream_peft
from .upstream import torch_private
from .upstream import transformers as upstream_transformers
from .upstream.bitsandbytes import supported_base

logger = logging.getLogger("qlorakit")

ATTENTION = "qlorakit_packed"  # the attention implementation's name in transformers' registry
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
KINDS = ("LoRA linear", "gated MLP", "q/k/v", "RMSNorm", "attention", "loss")


# ---------------------------------------------------------------------------------------------- forwards


def _take_precomputed(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The output the fused q/k/v function computed for `layer` on exactly this input, handed over once."""
    ready = layer.__dict__.get("qlorakit_precomputed")
    if ready is None or ready[0] is not x:
        return None
    layer.qlorakit_precomputed = None
    return ready[1]


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a PEFT LoRA linear layer through kernels.lora_linear, or PEFT's own (see lora_parts)."""
    if not args and not kwargs:
        ready = _take_precomputed(self, x)
        if ready is not None:
            return ready
        parts = upstream_peft.lora_parts(self)
        if not isinstance(parts, str):
            return kernels.lora_linear(x, parts.base, parts.a, parts.b, parts.scale, self.qlorakit_compute_dtype,
                                       parts.dropout_p, self.training, parts.b_bias)
    return type(self).forward(self, x, *args, **kwargs)


def _block_parts(module, names: tuple[str, ...]) -> list | str:
    """The LoRAParts of a fused block's projections, or why the block must run layer by layer. Dropout is drawn per
    layer (as PEFT does), which the block functions do not do: with dropout in training the block runs its
    layers one by one, each still fused. A projection with hooks is called by the module's own forward (PEFT's
    per-row adapter_names, a user's probe)."""
    projections = [getattr(module, n) for n in names]
    parts = []
    for name, projection in zip(names, projections):
        found = upstream_peft.lora_parts(projection) if getattr(projection, "qlorakit_fused", False) else (
            f"{name} is not a fused LoRA layer")
        if isinstance(found, str):
            return f"{name}: {found}"
        if found.dropout_p > 0 and projection.training:
            return "LoRA dropout in training (the layers run fused one by one)"
        if torch_private.runs_hooks(projection):
            return f"{name} has hooks"
        parts.append(found)
    return parts


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    parts = _block_parts(self, MLP_PROJECTIONS)
    if isinstance(parts, str):
        return type(self).forward(self, x)
    g, u, d = parts
    return kernels.LoRAGatedMLP.apply(x, g.a, g.b, u.a, u.b, d.a, d.b, (g.base, u.base, d.base),
                                      (g.scale, u.scale, d.scale), self.act_fn, self.gate_proj.qlorakit_compute_dtype,
                                      g.b_bias, u.b_bias, d.b_bias)


def _attention_module_forward(self, *args, **kwargs):
    """The attention module's own forward, with q, k and v computed beforehand by kernels.LoRASharedInput."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    parts = _block_parts(self, QKV_PROJECTIONS)
    if not isinstance(x, torch.Tensor) or isinstance(parts, str):
        return type(self).forward(self, *args, **kwargs)
    projections = [getattr(self, name) for name in QKV_PROJECTIONS]
    lora = [t for p in parts for t in (p.a, p.b, p.b_bias)]
    outs = kernels.LoRASharedInput.apply(x, tuple(p.base for p in parts), tuple(p.scale for p in parts),
                                         projections[0].qlorakit_compute_dtype, *lora)
    for projection, out in zip(projections, outs):
        projection.qlorakit_precomputed = (x, out)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        for projection in projections:
            projection.qlorakit_precomputed = None


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers attention-interface function: per-example causal attention for packed rows, sdpa otherwise."""
    segments = upstream_transformers.packed_causal_segments(module, query, key, attention_mask, kwargs,
                                                            kernels.block_diagonal_segments)
    if segments is None:
        return upstream_transformers.sdpa_attention()(module, query, key, value, attention_mask, dropout=dropout,
                                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return kernels.packed_causal_attention(query, key, value, segments, scale, attention_kernel_dtype(query.dtype),
                                           dropout), None


# ---------------------------------------------------------------------------------------------- install


def _route(module, forward, marker: str) -> None:
    if not getattr(module, marker, False):
        module.forward = types.MethodType(forward, module)
        setattr(module, marker, True)


def _fused_projections(module, names) -> bool:
    return all(getattr(getattr(module, n, None), "qlorakit_fused", False) for n in names)


def install_fast_path(model: torch.nn.Module, compute: torch.dtype) -> "FastPathReport":
    """Route `model`'s modules (a PEFT LoRA model whose compute dtype is `compute`) through qlorakit's kernels;
    returns the report of what took them. Every upstream internal the routes rely on is checked first."""
    torch_private.check()
    upstream_transformers.check()
    for name, layer in upstream_peft.lora_linear_layers(model):
        if supported_base(layer.get_base_layer()) is None:
            layer.qlorakit_compute_dtype = compute
            layer.qlorakit_name = f"{name}.base_layer"  # for messages about its frozen weight
            _route(layer, _lora_forward, "qlorakit_fused")
    for module in model.modules():
        if _fused_projections(module, MLP_PROJECTIONS) and upstream_transformers.gated_mlp_mismatch(module,
                                                                                                   compute) is None:
            _route(module, _mlp_forward, "qlorakit_fused_mlp")
        if _fused_projections(module, QKV_PROJECTIONS):
            _route(module, _attention_module_forward, "qlorakit_fused_qkv")
        if upstream_transformers.is_rms_norm(module) and upstream_transformers.rms_norm_mismatch(
                module, kernels.normalize) is None:
            _route(module, _norm_forward, "qlorakit_fused_norm")
    if upstream_transformers.attention_implementation(model) in ("sdpa", ATTENTION):
        upstream_transformers.register_attention(ATTENTION, packed_attention_forward)
        upstream_transformers.set_attention_implementation(model, ATTENTION)
    report = fast_path_report(model)
    model.qlorakit_fast_path_installed = True
    (logger.info if report.fully_fused else logger.warning)("fast path: %s", report.describe())
    return report


# ---------------------------------------------------------------------------------------------- report


@dataclass
class FastPathReport:
    """How many modules of each kind take qlorakit's kernels, and why each other one does not (reason -> module
    names). Kinds: LoRA linear layers, gated MLP blocks, q/k/v blocks, RMSNorms, attention, loss. A routed RMSNorm
    runs its own forward where no gradient is recorded (the same values; the kernel exists to keep less for the
    backward), and the packed attention hands every call that is not a packed row to sdpa: both count as fused."""

    compute: torch.dtype
    fused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    fallbacks: dict[str, dict[str, list[str]]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def add(self, kind: str, name: str, why_not: str | None) -> None:
        self.total[kind] += 1
        if why_not is None:
            self.fused[kind] += 1
        else:
            self.fallbacks[kind].setdefault(why_not, []).append(name or "(model)")

    @property
    def fully_fused(self) -> bool:
        return all(self.fused[k] == self.total[k] for k in KINDS)

    def describe(self) -> str:
        counts = ", ".join(f"{k} {self.fused[k]}/{self.total[k]}" for k in KINDS if self.total[k])
        lines = [f"{counts} on qlorakit's kernels (compute {dtype_name(self.compute)})"]
        for kind in KINDS:
            for why, names in self.fallbacks[kind].items():
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                lines.append(f"  {kind} not fused ({len(names)}): {why} — {shown}")
        return "\n".join(lines)


def fast_path_report(model: torch.nn.Module) -> FastPathReport:
    """What takes qlorakit's kernels in `model` as it is now (its mode, active adapters, attention
    implementation), per kind, with the reason for each module that does not."""
    from .precision import precision_of

    report = FastPathReport(precision_of(model).compute)
    for name, layer in upstream_peft.lora_linear_layers(model):
        if getattr(layer, "qlorakit_fused", False):
            found = upstream_peft.lora_parts(layer)
            why_not = found if isinstance(found, str) else None
        else:
            why_not = supported_base(layer.get_base_layer()) or "fast path not installed (fused=False)"
        report.add("LoRA linear", name, why_not)
    for name, module in model.named_modules():
        if all(hasattr(module, n) for n in MLP_PROJECTIONS):
            report.add("gated MLP", name, _block_why_not(module, MLP_PROJECTIONS, "qlorakit_fused_mlp", lambda: (
                upstream_transformers.gated_mlp_mismatch(module, report.compute))))
        if all(hasattr(module, n) for n in QKV_PROJECTIONS):
            report.add("q/k/v", name, _block_why_not(module, QKV_PROJECTIONS, "qlorakit_fused_qkv", lambda: None))
        if upstream_transformers.is_rms_norm(module):
            why_not = None if getattr(module, "qlorakit_fused_norm", False) else (
                upstream_transformers.rms_norm_mismatch(module, kernels.normalize)
                or "fast path not installed (fused=False)")
            report.add("RMSNorm", name, why_not)
    implementation = upstream_transformers.attention_implementation(model)
    report.add("attention", "", None if implementation == ATTENTION else (
        f"the model uses {implementation!r} attention (the packed kernel replaces sdpa only)"
        if getattr(model, "qlorakit_fast_path_installed", False) else "fast path not installed (fused=False)"))
    head = upstream_transformers.plain_output_head(model)
    report.add("loss", "lm_head", head if isinstance(head, str) else None)
    return report


def _block_why_not(module, names, marker: str, formula) -> str | None:
    if not getattr(module, marker, False):
        if not _fused_projections(module, names):
            return "its projections are not all fused LoRA layers"
        return formula() or "fast path not installed (fused=False)"
    parts = _block_parts(module, names)
    return parts if isinstance(parts, str) else None
