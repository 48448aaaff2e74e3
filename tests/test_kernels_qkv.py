"""The fused q/k/v projections: outputs and every gradient against fp64 and against the per-layer path, the hand-over
to the attention code, biases (Qwen2), and the whole model against PEFT's layers."""

from __future__ import annotations

import pytest
import torch

import qlorakit
from conftest import DTYPES, randomize_lora_b, tiny_tokenizer
from qlorakit.upstream.bitsandbytes import FrozenLinear, dequantize
from qlorakit.fast_path import QKV_PROJECTIONS as NAMES
from qlorakit.kernels.qkv import LoRASharedInput

# Relative (Frobenius) error vs fp64 on the same dequantized weights and rounded inputs. Measured at most:
# fp32 2.4e-7, fp16 3e-4, bf16 2.4e-3; the per-layer path is the other bar.
TOL_VS_FP64 = {"fp32": 1e-6, "fp16": 1.2e-3, "bf16": 1e-2}


def _attention(model_dir, quant, dtype, fused=True):
    torch.manual_seed(0)
    model, _ = qlorakit.load(model_dir, quant=quant, dtype=dtype, device="cpu")
    model = randomize_lora_b(qlorakit.add_lora(model, rank=8, alpha=16, fused=fused))
    return model, model.base_model.model.model.layers[0].self_attn


def _params(attn):
    return [getattr(getattr(attn, n), f"lora_{ab}")["default"].weight for n in NAMES for ab in "AB"]


def _run(attn, project, x, grads, precision):
    """Outputs of q, k, v and the gradients of the input and the six LoRA weights for sum(out·grad)."""
    for p in _params(attn):
        p.grad = None
    x = x.clone().requires_grad_()
    with precision.autocast():
        outs = project(x)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach().double() for o in outs] + [x.grad.double()] + [p.grad.double() for p in _params(attn)]


def _fused(attn):
    def project(x):
        layers = [getattr(attn, n) for n in NAMES]
        lora = [t for layer in layers for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, None)]
        return LoRASharedInput.apply(x, tuple(FrozenLinear(layer.get_base_layer()) for layer in layers),
                                      tuple(float(layer.scaling["default"]) for layer in layers),
                                      layers[0].qlorakit_compute_dtype, *lora)
    return project


def _per_layer(attn):
    return lambda x: [getattr(attn, n)(x) for n in NAMES]


def _reference(attn, x, grads):
    x = x.double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in _params(attn)]
    outs = []
    for i, name in enumerate(NAMES):
        layer = getattr(attn, name)
        base = layer.get_base_layer()
        a, b = params[2 * i], params[2 * i + 1]
        y = x @ dequantize(base).to(torch.float64).t() + layer.scaling["default"] * (x @ a.t()) @ b.t()
        outs.append(y + base.bias.double() if base.bias is not None else y)
    torch.autograd.backward(outs, [g.double() for g in grads])
    return [o.detach() for o in outs] + [x.grad] + [p.grad for p in params]


def _compare(attn, precision, dtype, tokens=48):
    g = torch.Generator().manual_seed(2)
    hidden = attn.q_proj.in_features
    x = torch.randn(tokens, hidden, generator=g).to(precision.compute)
    grads = [torch.randn(tokens, getattr(attn, n).out_features, generator=g).to(precision.compute) for n in NAMES]
    fused = _run(attn, _fused(attn), x, grads, precision)
    per_layer = _run(attn, _per_layer(attn), x, grads, precision)
    reference = _reference(attn, x, grads)
    names = ["q", "k", "v", "input grad"] + [f"{ab} {n}" for n in NAMES for ab in "AB"]
    for name, f, p, r in zip(names, fused, per_layer, reference):
        err, bar = float((f - r).norm() / r.norm()), float((p - r).norm() / r.norm())
        assert err < TOL_VS_FP64[dtype], (name, err)
        assert err <= 1.25 * bar + 1e-7, (name, err, bar)
        if name == "input grad" and dtype != "fp32":  # one rounding instead of three products and two sums
            assert err < 0.9 * bar, (err, bar)  # measured: 0.6-0.75 of the per-layer error
    adapter = precision.adapter
    assert all(p.grad.dtype == adapter for p in _params(attn))


@pytest.mark.parametrize("quant", ("nf4", "fp4", "int8", "none"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_matches_fp64_and_the_per_layer_path(tiny_model_dir, quant, dtype):
    model, attn = _attention(tiny_model_dir, quant, dtype)
    assert attn.qlorakit_fused_qkv
    _compare(attn, qlorakit.precision_of(model), dtype)


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, initializer_range=0.3,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # Qwen2 keeps biases on q, k and v; make them count
        for layer in model.model.layers:
            for name in NAMES:
                getattr(layer.self_attn, name).bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_frozen_qkv_biases_are_kept(tiny_qwen2_dir, dtype):
    model, attn = _attention(tiny_qwen2_dir, "nf4", dtype)
    assert attn.qlorakit_fused_qkv and attn.q_proj.get_base_layer().bias is not None
    _compare(attn, qlorakit.precision_of(model), dtype)


def test_attention_takes_the_fused_outputs_and_the_model_matches_peft(tiny_qwen2_dir, tiny_batch, monkeypatch):
    """The whole model (Qwen2: q/k/v biases) through the fused function — q, k and v computed once, never by the
    single-layer function — gives PEFT's loss and LoRA gradients in fp32."""
    import qlorakit.kernels.lora as lora_module

    calls = {"shared": 0, "single": 0}
    shared_apply, single_apply = LoRASharedInput.apply, lora_module._LoRALinear.apply

    def count(kind, apply):
        def counted(*args):
            calls[kind] += 1
            return apply(*args)
        return counted

    monkeypatch.setattr(LoRASharedInput, "apply", count("shared", shared_apply))
    monkeypatch.setattr(lora_module._LoRALinear, "apply", count("single", single_apply))
    results = []
    for fused in (True, False):
        model, _ = _attention(tiny_qwen2_dir, "nf4", "fp32", fused=fused)
        loss_sum, tokens = qlorakit.causal_lm_loss(model(input_ids=tiny_batch).logits, tiny_batch)
        (loss_sum / tokens).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss_sum / tokens), grads))
        if fused:
            assert calls == {"shared": 2, "single": 2}, calls  # per layer: q/k/v together, o_proj on its own
    (fused_loss, fused_grads), (peft_loss, peft_grads) = results
    assert fused_loss == pytest.approx(peft_loss, rel=1e-6)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) == 2 * 7 * 2
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_dropout_in_training_takes_the_per_layer_path(tiny_model_dir, monkeypatch):
    torch.manual_seed(0)
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4, alpha=8, dropout=0.1)
    attn = model.base_model.model.model.layers[0].self_attn
    called = []
    original = LoRASharedInput.apply
    monkeypatch.setattr(LoRASharedInput, "apply", lambda *a: called.append(1) or original(*a))
    assert attn.qlorakit_fused_qkv
    model.train()
    model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert not called
    model.eval()  # no dropout: the fused function
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert len(called) == 2
