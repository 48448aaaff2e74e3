"""Private torch internals: the CPU flash-attention ops the packed attention calls directly (their public wrapper,
scaled_dot_product_attention, does not return the log-sum-exp the backward needs), the global module-hook
registries a fused block consults before computing several modules' outputs without calling them, and a tensor's
version counter (the packed attention's mask cache)."""

from __future__ import annotations

import torch

from . import changed

PACKAGE = "torch"

_FLASH_CPU = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def flash_attention_cpu():
    """(forward, backward) of torch's CPU flash attention: forward(q, k, v, dropout, is_causal, scale=) -> (out,
    logsumexp); backward(grad_out, q, k, v, out, logsumexp, dropout, is_causal, scale=) -> (dq, dk, dv)."""
    try:
        return tuple(getattr(torch.ops.aten, name) for name in _FLASH_CPU)
    except (AttributeError, RuntimeError):
        raise changed(PACKAGE, "torch.ops.aten." + " / ".join(_FLASH_CPU), "the ops are gone") from None


def _hook_registries() -> tuple[dict, ...]:
    from torch.nn.modules import module as nn_module

    try:
        return tuple(getattr(nn_module, name) for name in _GLOBAL_HOOKS)
    except AttributeError:
        raise changed(PACKAGE, "torch.nn.modules.module's global hook registries", "they are gone") from None


def runs_hooks(module: torch.nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones: PEFT's per-row adapter_names, a user's
    probe) — a fused block that computes the module's output without calling it must then call it instead."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks or any(_hook_registries()))


def version_counter(tensor: torch.Tensor) -> int:
    """The tensor's in-place modification counter (autograd's `_version`): a cache keyed on a tensor must not serve
    it again after an in-place edit."""
    try:
        return tensor._version
    except AttributeError:
        raise changed(PACKAGE, "Tensor._version", "tensors no longer count their in-place edits") from None


def check() -> None:
    """Every private torch internal qlorakit uses exists."""
    flash_attention_cpu()
    _hook_registries()
    version_counter(torch.zeros(1))


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module` was compiled with torch.compile: wrapped (torch.compile(model) returns an OptimizedModule)
    or in place (model.compile() sets the module's compiled call)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:
        raise changed(PACKAGE, "torch._dynamo.eval_frame.OptimizedModule", "the class is gone") from None
    return isinstance(module, OptimizedModule) or module.__dict__.get("_compiled_call_impl") is not None
