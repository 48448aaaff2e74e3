"""Private torch internals: the CPU flash-attention ops the packed attention calls directly (their public wrapper,
scaled_dot_product_attention, does not return the log-sum-exp the backward needs), the global module-hook
registries a fused block consults before computing several modules' outputs without calling them, and a tensor's
version counter (the packed attention's mask cache), and oneDNN's prepacked linear (generation's CPU matmuls); and
how an allocation that failed reads (is_out_of_memory)."""

from __future__ import annotations

import functools

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


_MODULE_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")


def runs_hooks(module: torch.nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones: PEFT's per-row adapter_names, a user's
    probe) — a fused block that computes the module's output without calling it must then call it instead."""
    return bool(any(getattr(module, name) for name in _MODULE_HOOKS) or any(_hook_registries()))


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
    probe = torch.nn.Identity()
    for name in _MODULE_HOOKS:
        if not isinstance(getattr(probe, name, None), dict):
            raise changed(PACKAGE, f"Module.{name}", "modules no longer keep their hooks there")
    if "_compiled_call_impl" not in vars(torch.nn.Module):
        raise changed(PACKAGE, "Module._compiled_call_impl", "model.compile() no longer sets it")


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module` was compiled with torch.compile: wrapped (torch.compile(model) returns an OptimizedModule)
    or in place (model.compile() sets the module's compiled call)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:
        raise changed(PACKAGE, "torch._dynamo.eval_frame.OptimizedModule", "the class is gone") from None
    if "_compiled_call_impl" not in vars(torch.nn.Module):
        raise changed(PACKAGE, "Module._compiled_call_impl", "model.compile() no longer sets it")
    return isinstance(module, OptimizedModule) or module.__dict__.get("_compiled_call_impl") is not None


_PACKED_LINEAR = ("_reorder_linear_weight", "_linear_pointwise")


def packed_linear(weight: torch.Tensor, rows: int):
    """`x -> x @ weight.t()` through oneDNN with `weight` (on a CPU) reordered once into its blocked layout (for
    about `rows` rows of x), or — as a string — why not. A bf16 product with a few rows (a decode step) is 1.7-2.8x
    faster this way than torch.mm, which reorders the weight on every call. What the ops compute is checked once
    per dtype, on a probe."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return "oneDNN's packed linear is for a CPU with oneDNN"
    reorder, linear = _packed_linear_ops(weight.dtype)
    try:
        packed = reorder(weight, rows)
    except RuntimeError as e:  # the CPU lacks what oneDNN needs for this dtype
        return f"oneDNN cannot pack this weight here ({str(e).splitlines()[0]})"

    def product(x: torch.Tensor) -> torch.Tensor:
        return linear(x, packed, None, "none", [], "")

    return product


@functools.lru_cache(maxsize=None)
def _packed_linear_ops(dtype: torch.dtype):
    try:
        reorder, linear = (getattr(torch.ops.mkldnn, name) for name in _PACKED_LINEAR)
    except (AttributeError, RuntimeError):
        raise changed(PACKAGE, "torch.ops.mkldnn." + " / ".join(_PACKED_LINEAR), "the ops are gone") from None
    generator = torch.Generator().manual_seed(0)
    weight, probe = (torch.randn(shape, generator=generator).to(dtype) for shape in ((24, 40), (3, 40)))
    try:
        same = torch.allclose(linear(probe, reorder(weight, 3), None, "none", [], ""), probe @ weight.t(),
                              rtol=1e-2, atol=1e-2)
    except RuntimeError:
        return reorder, linear  # oneDNN cannot pack this dtype on this CPU: packed_linear says so per weight
    except TypeError as e:
        raise changed(PACKAGE, "torch.ops.mkldnn._linear_pointwise's arguments", str(e).splitlines()[0]) from None
    if not same:
        raise changed(PACKAGE, "torch.ops.mkldnn._linear_pointwise", "it no longer computes x @ weight.t()")
    return reorder, linear


# What torch's CPU allocator says when an allocation fails (a RuntimeError; CUDA raises torch.OutOfMemoryError).
_CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch failing to allocate memory, on a GPU or a CPU."""
    out_of_memory = getattr(torch, "OutOfMemoryError", None)
    if out_of_memory is not None and isinstance(error, out_of_memory):
        return True
    return isinstance(error, RuntimeError) and _CPU_OUT_OF_MEMORY in str(error)
