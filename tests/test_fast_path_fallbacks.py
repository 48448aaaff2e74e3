"""The fast path never gives another answer than PEFT and transformers' sdpa would: PEFT adapters with lora_bias run
through the fused functions with B's bias; every other PEFT layer feature the fused functions do not compute (DoRA,
several adapters, per-row adapter_names, trainable base biases, hooks) takes PEFT's forward; packed attention runs
only on masks that are block-diagonal causal, so padding at any batch size gives sdpa's result, in training,
evaluation and generation."""

from __future__ import annotations

import warnings

import pytest
import torch

import qlorakit
from conftest import save_tiny_bpe_model, tiny_tokenizer
from qlorakit.adapters import load_adapter
from qlorakit.data import Tokenized, collate
from qlorakit.evaluate import eval_loss
from qlorakit.generation import generate
from qlorakit.fast_path import ATTENTION
from qlorakit.kernels import attention as attention_module
from qlorakit.kernels import lora as lora_module
from qlorakit.kernels.lora import lora_linear
from qlorakit.kernels.mlp import LoRAGatedMLP
from qlorakit.kernels.qkv import LoRASharedInput
from qlorakit.upstream.bitsandbytes import FrozenLinear, dequantize

pytestmark = pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")

# Relative (Frobenius) error vs fp64 on the same dequantized weight and rounded inputs, as in test_kernels_lora.py.
TOL_VS_FP64 = {"fp32": 1e-6, "fp16": 1.2e-3, "bf16": 1e-2}


def _rel(value, reference):
    return float((value.double() - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tiny Qwen2: frozen q/k/v biases, bias-free o_proj and MLP — every fused function, with and without a base
    bias."""
    return save_tiny_bpe_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


def _save_peft_adapter(model_dir, out, seed=1, **config):
    """An adapter saved by PEFT itself on `model_dir`, with trained-looking (non-zero) B weights and B biases."""
    from peft import LoraConfig, get_peft_model

    model, _ = qlorakit.load(model_dir, quant="none", dtype="fp32", device="cpu")
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") | config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias on a layer without a base bias: "merging won't be possible"
        peft_model = get_peft_model(model, LoraConfig(**settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(torch.randn(param.shape, generator=g) * (0.3 if name.endswith("bias") else 0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT takes lora_B's 1-D bias for an unsharded ZeRO-3 tensor
        peft_model.save_pretrained(out)
    return out


def _logits_and_grads(model, ids, **inputs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False, **inputs).logits
    loss_sum, n = qlorakit.causal_lm_loss(logits, ids)
    (loss_sum / n).backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same(fused, peft, rtol=1e-5):
    (logits, grads), (peft_logits, peft_grads) = fused, peft
    assert _rel(logits, peft_logits.double()) < rtol
    assert grads.keys() == peft_grads.keys()
    for name in grads:
        assert _rel(grads[name], peft_grads[name].double()) < 100 * rtol, name


def _spy(monkeypatch):
    """Counts calls of the three fused functions."""
    calls = {"single": 0, "qkv": 0, "mlp": 0}
    for key, holder in (("single", lora_module._LoRALinear), ("qkv", LoRASharedInput), ("mlp", LoRAGatedMLP)):
        original = holder.apply

        def apply(*args, _key=key, _original=original):
            calls[_key] += 1
            return _original(*args)

        monkeypatch.setattr(holder, "apply", apply)
    return calls


# ------------------------------------------------------------------------------------------------ lora_bias


@pytest.mark.parametrize("quant", ("none", "nf4"))
def test_peft_lora_bias_adapter_matches_peft_through_every_fused_function(qwen2_dir, tmp_path, tiny_batch, quant,
                                                                            monkeypatch):
    """An adapter saved by PEFT with lora_bias=True (q/k/v with a base bias, o_proj and MLP without): logits and
    every LoRA gradient (B biases included) equal PEFT's layers in fp32, relative 1e-5 (logits; 1e-3 gradients), and
    the fused functions are the ones that ran. Before the fix the fused path dropped B's bias: logits off by ~9."""
    adapter = _save_peft_adapter(qwen2_dir, tmp_path / "adapter", lora_bias=True)
    ids = tiny_batch % 300
    results, calls = [], []
    for fused in (True, False):
        model, _ = qlorakit.load(qwen2_dir, quant=quant, dtype="fp32", device="cpu")
        model = load_adapter(model, adapter, trainable=True, fused=fused)
        calls.append(_spy(monkeypatch))  # (after the install, whose formula check runs an MLP once)
        results.append(_logits_and_grads(model, ids))
        monkeypatch.undo()
    _assert_same(*results)
    assert calls[0] == {"single": 2, "qkv": 2, "mlp": 2}, calls  # o_proj, q/k/v, MLP of both layers: all fused
    assert sum("lora_B" in n and n.endswith("bias") for n in results[0][1]) == 2 * 7


@pytest.mark.parametrize("dtype", ("fp32", "bf16", "fp16"))
def test_lora_linear_adds_the_scaled_b_bias_before_its_one_rounding(tiny_model_dir, dtype):
    """lora_linear with a B bias against fp64 (x·W0ᵀ + s·((x·Aᵀ)·Bᵀ + b)): output and the gradients of the input,
    A, B and b within the single-layer tolerances; the bias gradient is s·Σ grad."""
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype=dtype, device="cpu")
    precision = qlorakit.precision_of(model)
    compute = precision.compute
    base = model.model.layers[0].mlp.gate_proj
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 64, generator=g).to(compute).requires_grad_()
    a = (torch.randn(8, 64, generator=g) * 0.1).to(precision.adapter).requires_grad_()
    b = (torch.randn(128, 8, generator=g) * 0.05).to(precision.adapter).requires_grad_()
    bias = (torch.randn(128, generator=g) * 0.3).to(precision.adapter).requires_grad_()
    grad_out = torch.randn(48, 128, generator=g).to(compute)
    scale = 2.0
    y = lora_linear(x, FrozenLinear(base), a, b, scale, compute, lora_b_bias=bias)
    y.backward(grad_out)

    w = dequantize(base).to(torch.float64)
    ref = [t.detach().double().requires_grad_() for t in (x, a, b, bias)]
    y_ref = ref[0] @ w.t() + scale * ((ref[0] @ ref[1].t()) @ ref[2].t() + ref[3])
    y_ref.backward(grad_out.double())
    assert y.dtype == compute and bias.grad.dtype == bias.dtype
    for what, value, reference in zip(("output", "x", "A", "B", "bias"), (y, x.grad, a.grad, b.grad, bias.grad),
                                      (y_ref, *(t.grad for t in ref))):
        assert _rel(value.detach(), reference.detach()) < TOL_VS_FP64[dtype], (what, _rel(value, reference))


# ----------------------------------------------------------------- PEFT features the fused functions leave to PEFT


@pytest.mark.parametrize("feature", ("dora", "alora", "trainable_base_bias"))
def test_peft_features_the_fused_functions_do_not_compute_take_peft_forward(qwen2_dir, tmp_path, tiny_batch, feature):
    """DoRA and aLoRA (variants), and base biases trained along with the adapter (PEFT's bias='all', on a 4-bit base
    whose bias the fused functions would give no gradient): the same logits and gradients as PEFT's layers."""
    config = {"dora": dict(use_dora=True), "alora": dict(alora_invocation_tokens=[30, 31]),
              "trainable_base_bias": dict(bias="all")}[feature]
    quant = "nf4" if feature == "trainable_base_bias" else "none"
    adapter = _save_peft_adapter(qwen2_dir, tmp_path / "adapter", **config)
    ids = tiny_batch % 300
    ids[:, 8:10] = torch.tensor([30, 31])  # aLoRA's invocation: the adapter applies from there on
    results = []
    for fused in (True, False):
        model, _ = qlorakit.load(qwen2_dir, quant=quant, dtype="fp32", device="cpu")
        model = load_adapter(model, adapter, trainable=True, fused=fused)
        results.append(_logits_and_grads(model, ids))
    if feature == "trainable_base_bias":
        assert sum("base_layer.bias" in n for n in results[1][1]) == 2 * 3  # q, k, v of two layers
    _assert_same(*results)


def test_several_adapters_and_per_row_adapter_names_take_peft_forward(qwen2_dir, tmp_path, tiny_batch):
    """Two adapters on one model: both active at once, and PEFT's mixed batch (adapter_names, one per row, passed
    to the layers by forward hooks that a fused block must not skip) — the same logits as PEFT's layers."""
    first = _save_peft_adapter(qwen2_dir, tmp_path / "first", seed=1)
    second = _save_peft_adapter(qwen2_dir, tmp_path / "second", seed=2)
    ids = tiny_batch % 300
    outputs = []
    for fused in (True, False):
        model, _ = qlorakit.load(qwen2_dir, quant="none", dtype="fp32", device="cpu")
        model = load_adapter(model, first, fused=fused)
        model.load_adapter(str(second), adapter_name="second")
        model.eval()
        with torch.no_grad():
            mixed = model(input_ids=ids, adapter_names=["default", "second", "__base__", "second"]).logits
            model.base_model.set_adapter(["default", "second"])
            both = model(input_ids=ids).logits
        outputs.append((mixed, both))
    for ours, peft in zip(*outputs):
        assert _rel(ours, peft.double()) < 1e-5


def test_a_hook_on_a_projection_is_called(tiny_model_dir):
    """A forward hook on an MLP or q/k/v projection runs (the fused block calls the projections instead)."""
    model, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4, alpha=8)
    layer = model.base_model.model.model.layers[0]
    seen = []
    for projection in (layer.mlp.up_proj, layer.self_attn.k_proj):
        projection.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert sorted(seen) == [(1, 3, 32), (1, 3, 128)]


# ------------------------------------------------------------------------------------------- packed attention


def _attention_pair(model_dir):
    """The same model and adapter twice: qlorakit's fast path (packed attention), and PEFT's layers with sdpa."""
    from conftest import randomize_lora_b

    out = []
    for fused in (True, False):
        torch.manual_seed(0)  # the same LoRA A initialisation
        model, _ = qlorakit.load(model_dir, quant="none", dtype="fp32", device="cpu")
        model = randomize_lora_b(qlorakit.add_lora(model, rank=4, alpha=8, fused=fused), std=0.05)
        assert model.get_base_model().config._attn_implementation == (ATTENTION if fused else "sdpa")
        out.append(model)
    return out


ROWS = [[1, 20, 21, 22, 23, 24, 25], [1, 30, 31], [1, 40, 41, 42, 43]]


def _padded(rows, side, length=None):
    length = length or max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        where = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, where], mask[i, where] = torch.tensor(row), 1
    return ids, mask


@pytest.mark.parametrize("side", ("left", "right"))
@pytest.mark.parametrize("rows", ([ROWS[1]], ROWS), ids=("batch1", "batch3"))
def test_padded_rows_train_like_sdpa(tiny_model_dir, rows, side):
    """A padded batch (a single row too, with position ids 0, 1, ... as qlorakit's training step gives them):
    logits at the real tokens and every LoRA gradient equal sdpa's with PEFT's layers, relative 1e-5. Before the fix
    a single left-padded row attended to its pads (logits off by up to ~8)."""
    ids, mask = _padded(rows, side, length=7 if len(rows) == 1 else None)  # a single row gets 4 pads
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in _attention_pair(tiny_model_dir):
        model.train()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        loss_sum, n = qlorakit.causal_lm_loss(logits, labels)
        (loss_sum / n).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((logits.detach()[mask.bool()], grads))
    (ours, our_grads), (sdpa, sdpa_grads) = results
    assert _rel(ours, sdpa.double()) < 1e-5
    assert _rel(our_grads, sdpa_grads.double()) < 1e-5


def test_packed_rows_read_their_blocks_once_per_forward(tiny_model_dir, monkeypatch):
    """A packed row still takes the per-example path, with its blocks read from the mask once per forward (not per
    layer: one device sync), also when gradient checkpointing recomputes the layers in the backward."""
    ours, sdpa = _attention_pair(tiny_model_dir)
    reads, segments = [], []
    original_read, original_apply = attention_module._read_blocks, attention_module.PackedCausalAttention.apply
    monkeypatch.setattr(attention_module, "_read_blocks", lambda m: reads.append(1) or original_read(m))
    monkeypatch.setattr(attention_module.PackedCausalAttention, "apply",
                        lambda q, k, v, s, *rest: segments.append(s) or original_apply(q, k, v, s, *rest))
    items = [Tokenized(row, [-100] + row[1:], "test") for row in ROWS]
    batch = collate(items, pad_id=0, packed=True)
    for model in (ours, sdpa):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    results = []
    for model in (ours, sdpa):
        logits = model(**batch.model_inputs()).logits
        loss_sum, n = qlorakit.causal_lm_loss(logits, batch.labels)
        (loss_sum / n).backward()
        results.append(logits.detach())
    assert len(reads) == 1
    assert segments and all(s == [(0, 7), (7, 10), (10, 15)] for s in segments)
    assert _rel(results[0], results[1].double()) < 1e-5


def test_eval_loss_unpacked_matches_sdpa_and_packed(tiny_model_dir):
    """eval_loss with packed=False (right-padded batches of 1 and of 3 rows) equals sdpa's with PEFT's layers, and
    the packed evaluation of the same rows, relative 1e-5."""
    ours, sdpa = _attention_pair(tiny_model_dir)
    items = [Tokenized(row, [-100] + row[1:], "test") for row in ROWS]
    losses = {}
    for name, model in (("ours", ours), ("sdpa", sdpa)):
        for batch_size in (1, 3):
            losses[name, batch_size] = eval_loss(model, items, pad_id=0, batch_size=batch_size, packed=False)["loss"]
    packed = eval_loss(ours, items, pad_id=0, packed=True)["loss"]
    for value in losses.values():
        assert value == pytest.approx(losses["sdpa", 1], rel=1e-5)
    assert packed == pytest.approx(losses["sdpa", 1], rel=1e-5)


def test_left_padded_generation_matches_each_prompt_alone_and_sdpa(tiny_model_dir):
    """Greedy answers to prompts of different lengths, batched with left padding, equal each prompt's answer alone
    and the answers of PEFT's layers with sdpa; and a single row's logits with left padding equal sdpa's."""
    tokenizer = tiny_tokenizer()
    prompts = ["w20 w21 w22 w23 w24 w25 w26", "w30 w31", "w40 w41 w42 w43"]
    ours, sdpa = _attention_pair(tiny_model_dir)
    batched = generate(ours, tokenizer, prompts, max_new_tokens=8)
    alone = [generate(ours, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone == generate(sdpa, tokenizer, prompts, max_new_tokens=8)
    assert all(batched), batched
    ids, mask = _padded([[1, 30, 31], [1, 20, 21, 22, 23, 24, 25]], "left")
    with torch.no_grad():
        single = [m(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1] for m in (ours, sdpa)]
    assert _rel(single[0], single[1].double()) < 1e-5


# ------------------------------------------------------------------------------------------------ consistency


@pytest.mark.parametrize("quant", ("none", "nf4"))
def test_an_mlp_with_base_biases_takes_the_fused_block_like_qkv(tmp_path, tiny_batch, quant, monkeypatch):
    """Every block treats a frozen base bias the same way: it is a column of the one-rounding product, so a gated
    MLP with biased projections (mlp_bias, as q/k/v biases in Qwen2) takes the fused block and gives PEFT's logits
    and gradients (fp32: relative 1e-5 / 1e-3). Before, the MLP alone fell back on a base bias."""
    from conftest import randomize_lora_b, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "biased", mlp_bias=True)
    results, calls, reports = [], [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model, _ = qlorakit.load(model_dir, quant=quant, dtype="fp32", device="cpu")
        model = randomize_lora_b(qlorakit.add_lora(model, rank=4, alpha=8, fused=fused), std=0.05)
        calls.append(_spy(monkeypatch))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.up_proj.base_layer.bias"):
                    param.add_(0.5)
        reports.append(qlorakit.fast_path_report(model))
        results.append(_logits_and_grads(model, tiny_batch))
        monkeypatch.undo()
    _assert_same(*results)
    assert calls[0]["mlp"] == 2 and reports[0].fully_fused
