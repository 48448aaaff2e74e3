"""The fused gated MLP: output and every gradient against fp64 and against the per-layer path."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from conftest import DTYPES, randomize_lora_b
from qlorakit.upstream.bitsandbytes import FrozenLinear, dequantize
from qlorakit.fast_path import fast_path_report

# Relative error vs fp64 on the same dequantized weights and rounded inputs; the per-layer path is the bar.
TOL_VS_FP64 = {"fp32": 1e-6, "fp16": 3e-3, "bf16": 2.5e-2}


def _mlp_model(model_dir, quant, dtype):
    torch.manual_seed(0)
    model, _ = qlorakit.load(model_dir, quant=quant, dtype=dtype, device="cpu")
    model = randomize_lora_b(qlorakit.add_lora(model, rank=8, alpha=16))
    return model, model.base_model.model.model.layers[0].mlp


def _params(mlp):
    return [getattr(mlp, n).lora_A["default"].weight for n in ("gate_proj", "up_proj", "down_proj")] + [
        getattr(mlp, n).lora_B["default"].weight for n in ("gate_proj", "up_proj", "down_proj")]


def _run(mlp, forward, x, grad_out, precision):
    for p in _params(mlp):
        p.grad = None
    x = x.clone().requires_grad_()
    with precision.autocast():
        y = forward(x)
    y.backward(grad_out.to(y.dtype))
    return [y.detach().double(), x.grad.double()] + [p.grad.double() for p in _params(mlp)]


def _reference(mlp, x, grad_out):
    x = x.double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in _params(mlp)]
    ag, au, ad, bg, bu, bd = params

    def proj(name, t, a, b):
        layer = getattr(mlp, name)
        return t @ dequantize(layer.get_base_layer()).to(torch.float64).t() + layer.scaling["default"] * (
            t @ a.t()) @ b.t()

    h = torch.nn.functional.silu(proj("gate_proj", x, ag, bg)) * proj("up_proj", x, au, bu)
    y = proj("down_proj", h, ad, bd)
    y.backward(grad_out.double())
    return [y.detach(), x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("quant", ("nf4", "int8", "none"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_mlp_matches_fp64_and_the_per_layer_path(tiny_model_dir, quant, dtype):
    model, mlp = _mlp_model(tiny_model_dir, quant, dtype)
    assert getattr(mlp, "qlorakit_fused_mlp", False)
    precision = qlorakit.precision_of(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 64, generator=g).to(precision.compute)
    grad_out = torch.randn(48, 64, generator=g).to(precision.compute)
    fused = _run(mlp, mlp.forward, x, grad_out, precision)
    per_layer = _run(mlp, lambda t: type(mlp).forward(mlp, t), x, grad_out, precision)
    reference = _reference(mlp, x, grad_out)
    names = ["output", "input grad", "A gate", "A up", "A down", "B gate", "B up", "B down"]
    for name, f, p, r in zip(names, fused, per_layer, reference):
        err, bar = float((f - r).norm() / r.norm()), float((p - r).norm() / r.norm())
        assert err < TOL_VS_FP64[dtype], (name, err)
        assert err <= 1.5 * bar + 1e-7, (name, err, bar)


def test_fused_mlp_keeps_half_the_intermediate_activations(tiny_model_dir):
    model, mlp = _mlp_model(tiny_model_dir, "nf4", "bf16")
    x = torch.randn(256, 64).to(torch.bfloat16).requires_grad_()
    sizes = []
    for forward in (mlp.forward, lambda t: type(mlp).forward(mlp, t)):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            forward(x)
        sizes.append(sum(v for v in seen.values() if v >= 256 * 128 * 2))  # the [tokens x intermediate] ones
    fused, per_layer = sizes
    assert fused <= 0.5 * per_layer + 1, sizes  # measured: 2 of the 4 tensors of 256 x 128


def test_install_counts_and_dropout_falls_back(tiny_model_dir):
    """With LoRA dropout the MLP block runs its layers one by one (each fused) in training, and as one block in eval
    mode, where dropout is off: the report says so, and both give the per-layer result."""
    torch.manual_seed(0)
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4, alpha=8, dropout=0.1)
    mlp = model.base_model.model.model.layers[0].mlp
    model.train()
    report = fast_path_report(model)
    assert (report.fused["gated MLP"], report.total["gated MLP"]) == (0, 2)
    assert list(report.fallbacks["gated MLP"]) == ["LoRA dropout in training (the layers run fused one by one)"]
    assert report.fused["LoRA linear"] == report.total["LoRA linear"] == 14
    x = torch.randn(4, 64)
    model.eval()
    assert fast_path_report(model).fused["gated MLP"] == 2
    with torch.no_grad():  # eval: no dropout, the fused path; same as the per-layer path
        torch.testing.assert_close(mlp(x), type(mlp).forward(mlp, x), rtol=1e-5, atol=1e-6)
