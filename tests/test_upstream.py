"""Each upstream internal qlorakit relies on, broken on purpose (removed or renamed as a new release might), gives the
named UpstreamError where qlorakit first relies on it — never a silent fallback or a check over nothing. And the
fast path reports what took its kernels and why the rest did not."""

from __future__ import annotations

import logging
import re

import pytest
import torch

import qlorakit
from qlorakit.errors import UpstreamError
from qlorakit.fast_path import ATTENTION, fast_path_report, install_fast_path
from qlorakit.upstream import bitsandbytes as upstream_bnb
from qlorakit.upstream import peft as upstream_peft
from qlorakit.upstream import supported_range


@pytest.fixture(autouse=True)
def _fresh_lookups():
    """The upstream classes are looked up once per process; a test that renames one must be seen."""
    upstream_bnb._classes.cache_clear()
    upstream_peft.lora_layer_class.cache_clear()
    yield
    upstream_bnb._classes.cache_clear()
    upstream_peft.lora_layer_class.cache_clear()


def _plain_lora(tiny_model_dir, quant="nf4"):
    model, _ = qlorakit.load(tiny_model_dir, quant=quant, dtype="fp32", device="cpu")
    return qlorakit.add_lora(model, rank=4, alpha=8, fused=False)


def _named(package: str, what: str):
    """The message of `changed`: the library, its version, the internal, and the supported range."""
    return re.escape(f"{package} ") + r"\S+" + re.escape(f" changed {what}") + r".*" + re.escape(
        f"supports {supported_range(package)}")


def test_supported_ranges_come_from_the_installed_metadata():
    for package in ("peft", "bitsandbytes", "transformers", "accelerate", "torch"):
        assert supported_range(package).startswith(package) and re.search(r"[<>=]", supported_range(package))


# ---------------------------------------------------------------------------------------------- peft


@pytest.mark.parametrize("attribute", upstream_peft.LAYER_ATTRIBUTES)
def test_a_peft_layer_attribute_gone_is_named_at_install(tiny_model_dir, monkeypatch, attribute):
    model = _plain_lora(tiny_model_dir)
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    if attribute in vars(layer):  # set in __init__ (lora_A, lora_variant, fan_in_fan_out, ...)
        monkeypatch.delitem(vars(layer), attribute) if attribute not in layer._modules else monkeypatch.delitem(
            layer._modules, attribute)
    elif attribute in layer._modules:
        monkeypatch.delitem(layer._modules, attribute)
    else:  # a property or method of PEFT's tuner layer classes
        owner = next(c for c in type(layer).__mro__ if attribute in vars(c))
        monkeypatch.delattr(owner, attribute)
    with pytest.raises(UpstreamError, match=_named("peft", f"LoraLayer.{attribute}")):
        install_fast_path(model, torch.float32)


def test_peft_lora_layer_class_gone_is_named(tiny_model_dir, monkeypatch):
    import peft.tuners.lora

    model = _plain_lora(tiny_model_dir)
    monkeypatch.delattr(peft.tuners.lora, "LoraLayer")
    with pytest.raises(UpstreamError, match=_named("peft", "peft.tuners.lora.LoraLayer")):
        install_fast_path(model, torch.float32)


# ---------------------------------------------------------------------------------------------- bitsandbytes


def test_bitsandbytes_class_renamed_makes_the_policy_check_refuse(tiny_model_dir, monkeypatch):
    """Had bitsandbytes renamed Params4bit, recognition by class would find no 4-bit layer, and a check over zero
    layers would pass: a model loaded as nf4 with no quantized layer found is refused instead."""
    import bitsandbytes

    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    qlorakit.precision_of(model).check(qlorakit.add_lora(model, rank=4, fused=False))  # passes as it is
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4, fused=False)

    class Params4bitRenamed(torch.nn.Parameter):
        pass

    monkeypatch.setattr(bitsandbytes.nn, "Params4bit", Params4bitRenamed)
    upstream_bnb._classes.cache_clear()  # (a new release is looked up afresh)
    with pytest.raises(UpstreamError, match=_named("bitsandbytes", "how it stores quantized layers")) as error:
        qlorakit.precision_of(model).check(model)
    assert "the model was loaded as nf4, but no bitsandbytes 4-bit or 8-bit layer was found" in str(error.value)


@pytest.mark.parametrize("name", ["Params4bit", "Int8Params", "Linear4bit", "Linear8bitLt"])
def test_bitsandbytes_class_gone_is_named(tiny_model_dir, monkeypatch, name):
    import bitsandbytes

    model = _plain_lora(tiny_model_dir)
    monkeypatch.delattr(bitsandbytes.nn, name)
    upstream_bnb._classes.cache_clear()
    with pytest.raises(UpstreamError, match=_named("bitsandbytes", f"bitsandbytes.nn.{name}")):
        install_fast_path(model, torch.float32)


@pytest.mark.parametrize("flag", ["compute_dtype", "compute_type_is_set", "support_avx512bf16_for_cpu"])
def test_a_linear4bit_flag_the_policy_pins_gone_is_named(tiny_model_dir, monkeypatch, flag):
    """Writing a flag bitsandbytes no longer reads would pin nothing; Precision.apply refuses instead."""
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    layer = model.model.layers[0].mlp.gate_proj
    monkeypatch.delitem(vars(layer), flag)
    with pytest.raises(UpstreamError, match=_named("bitsandbytes", f"Linear4bit.{flag}")):
        qlorakit.precision_of(model).apply(model)


@pytest.mark.parametrize("name", ["dequantize_4bit", "quantize_4bit", "int8_vectorwise_dequant", "int8_vectorwise_quant",
                                  "QuantState"])
def test_a_bitsandbytes_function_gone_is_named(tiny_model_dir, monkeypatch, name):
    import bitsandbytes.functional

    model = _plain_lora(tiny_model_dir)
    monkeypatch.delattr(bitsandbytes.functional, name)
    upstream_bnb._classes.cache_clear()
    with pytest.raises(UpstreamError, match=_named("bitsandbytes", f"bitsandbytes.functional.{name}")):
        install_fast_path(model, torch.float32)


@pytest.mark.parametrize("attribute", ["dtype", "quant_type", "nested", "shape"])
def test_a_quant_state_attribute_gone_is_named(tiny_model_dir, monkeypatch, attribute):
    """What the policy rewrites (dtype) and what qlorakit reads of a 4-bit layer's quantization state."""
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    state = model.model.layers[0].mlp.gate_proj.weight.quant_state
    monkeypatch.delattr(state, attribute)
    with pytest.raises(UpstreamError, match=_named("bitsandbytes", f"QuantState.{attribute}")):
        qlorakit.precision_of(model).apply(model)


# ---------------------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("module_name, owner_name, attribute, what", [
    ("transformers", "AttentionInterface", "register", "AttentionInterface.register"),
    ("transformers.masking_utils", None, "ALL_MASK_ATTENTION_FUNCTIONS", "the attention registry"),
    ("transformers.integrations.sdpa_attention", None, "sdpa_attention_forward",
     "transformers.integrations.sdpa_attention.sdpa_attention_forward"),
    ("transformers", "PreTrainedModel", "set_attn_implementation", "LlamaForCausalLM.set_attn_implementation"),
])
def test_the_attention_registry_changed_is_named(tiny_model_dir, monkeypatch, module_name, owner_name, attribute,
                                                 what):
    import importlib

    model = _plain_lora(tiny_model_dir)
    owner = importlib.import_module(module_name)
    if owner_name is not None:  # a class attribute, perhaps inherited: removed where it is defined
        owner = next(c for c in getattr(owner, owner_name).__mro__ if attribute in vars(c))
    monkeypatch.delattr(owner, attribute)
    with pytest.raises(UpstreamError, match=_named("transformers", what)):
        install_fast_path(model, torch.float32)


def test_an_mlp_formula_changed_upstream_falls_back_and_says_so(tiny_model_dir, monkeypatch, caplog):
    """The fused MLP computes down(act(gate(x)) · up(x)); an MLP class whose forward computes anything else (as a
    release could change LlamaMLP) keeps its own forward, and the report and the log name it."""
    from transformers.models.llama import modeling_llama

    from qlorakit.upstream import transformers as upstream_transformers

    monkeypatch.setattr(upstream_transformers, "_FORMULA_CHECKS", {})
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward",
                        lambda self, x: self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x)))
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    with caplog.at_level(logging.WARNING, logger="qlorakit"):
        model = qlorakit.add_lora(model, rank=4)
    report = fast_path_report(model)
    assert (report.fused["gated MLP"], report.total["gated MLP"]) == (0, 2)
    assert list(report.fallbacks["gated MLP"]) == [
        "LlamaMLP.forward computes something other than down(act(gate(x)) * up(x))"]
    assert report.fused["LoRA linear"] == report.total["LoRA linear"] == 14  # its layers are still fused
    assert "gated MLP not fused (2): LlamaMLP.forward computes something other" in caplog.text


def test_an_mlp_with_more_than_the_formula_is_not_fused(tiny_model_dir):
    """The formula is checked in eval mode; a module with another submodule (a dropout its forward applies in
    training, which the check cannot see) keeps its own forward."""
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    model.model.layers[1].mlp.extra_dropout = torch.nn.Dropout(0.5)
    report = fast_path_report(qlorakit.add_lora(model, rank=4))
    assert report.fallbacks["gated MLP"] == {
        "LlamaMLP has other submodules (extra_dropout) the fused MLP would not run": ["base_model.model.model.layers.1.mlp"]}
    assert report.fused["gated MLP"] == 1


def test_a_model_from_elsewhere_is_held_to_the_quantization_its_config_declares(tiny_model_dir):
    """Precision.attach on a model that did not come from qlorakit.load reads what its config declares, so the
    no-quantized-layer refusal covers it too."""
    from qlorakit.upstream.transformers import declared_quantization

    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    assert declared_quantization(model) == "nf4"
    del model.qlorakit_quant
    qlorakit.Precision.resolve("fp32", device="cpu").attach(model)
    assert model.qlorakit_quant == "nf4"
    plain, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
    assert declared_quantization(plain) == "none"


def test_an_rms_norm_formula_changed_upstream_falls_back_and_says_so(tiny_model_dir, monkeypatch):
    from transformers.models.llama import modeling_llama

    from qlorakit.upstream import transformers as upstream_transformers

    monkeypatch.setattr(upstream_transformers, "_FORMULA_CHECKS", {})
    original = modeling_llama.LlamaRMSNorm.forward
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", lambda self, x: original(self, x) * 2)
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    report = fast_path_report(qlorakit.add_lora(model, rank=4))
    assert report.fused["RMSNorm"] == 0 and report.total["RMSNorm"] == 5
    assert list(report.fallbacks["RMSNorm"]) == ["LlamaRMSNorm.forward computes something other than the Llama RMSNorm"]


def test_activation_checkpointing_arguments_changed_is_named(tiny_model_dir, monkeypatch):
    from transformers import PreTrainedModel

    from qlorakit.upstream.transformers import enable_checkpointing

    model = _plain_lora(tiny_model_dir)
    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", lambda self, kwargs=None: None)
    with pytest.raises(UpstreamError, match=_named("transformers", "activation_checkpointing_enable's arguments")):
        enable_checkpointing(model)


def test_a_gguf_conversion_saved_as_quantized_is_named(tiny_model_dir, tmp_path, monkeypatch):
    """A model converted from GGUF must be saved as a plain model; if transformers kept writing its quantization
    marker, the cache would hold a directory transformers reads as GGUF again."""
    import json

    from transformers import PreTrainedModel

    from qlorakit.upstream.transformers import save_dequantized

    model, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
    save_dequantized(model, tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    original = PreTrainedModel.save_pretrained

    def keeps_marker(self, directory, **kwargs):
        original(self, directory, **kwargs)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gguf"}}))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", keeps_marker)
    with pytest.raises(UpstreamError, match=_named("transformers", "how a model converted from a GGUF file is saved")):
        save_dequantized(model, tmp_path / "marked")


# ---------------------------------------------------------------------------------------------- accelerate, torch


@pytest.mark.parametrize("attribute", ["scaler", "native_amp"])
def test_an_accelerator_without_its_scaler_attributes_is_named(attribute):
    from accelerate import Accelerator

    from qlorakit.upstream import accelerate as upstream_accelerate

    accelerator = Accelerator(cpu=True)
    delattr(accelerator, attribute)
    with pytest.raises(UpstreamError, match=_named("accelerate", f"Accelerator.{attribute}")):
        upstream_accelerate.give_grad_scaler(accelerator, None)


def test_the_private_flash_attention_ops_renamed_are_named(tiny_model_dir, monkeypatch):
    from qlorakit.upstream import torch_private

    model = _plain_lora(tiny_model_dir)
    monkeypatch.setattr(torch_private, "_FLASH_CPU", ("_scaled_dot_product_flash_attention_for_cpu_v2",
                                                      "_scaled_dot_product_flash_attention_for_cpu_backward"))
    with pytest.raises(UpstreamError, match=_named("torch", "torch.ops.aten._scaled_dot_product_flash_attention")):
        install_fast_path(model, torch.float32)


def test_the_global_hook_registries_gone_are_named(tiny_model_dir, monkeypatch):
    from qlorakit.upstream import torch_private

    model = _plain_lora(tiny_model_dir)
    monkeypatch.setattr(torch_private, "_GLOBAL_HOOKS", ("_global_forward_pre_hooks", "_global_hooks_renamed"))
    with pytest.raises(UpstreamError, match=_named("torch", "torch.nn.modules.module's global hook registries")):
        install_fast_path(model, torch.float32)


def test_the_tensor_version_counter_and_compiled_module_class_gone_are_named(monkeypatch):
    import torch._dynamo.eval_frame

    from qlorakit.upstream import torch_private

    class NoVersion:
        pass

    with pytest.raises(UpstreamError, match=_named("torch", "Tensor._version")):
        torch_private.version_counter(NoVersion())
    monkeypatch.delattr(torch._dynamo.eval_frame, "OptimizedModule")
    with pytest.raises(UpstreamError, match=_named("torch", "torch._dynamo.eval_frame.OptimizedModule")):
        torch_private.is_compiled(torch.nn.Linear(2, 2))


def test_onednn_packed_linear_renamed_or_changed_is_named(monkeypatch):
    """Generation's packed CPU products: the ops renamed, or computing something else than x @ weightᵀ."""
    from qlorakit.upstream import torch_private

    weight = torch.randn(8, 16).bfloat16()
    monkeypatch.setattr(torch_private, "_PACKED_LINEAR", ("_reorder_linear_weight", "_linear_pointwise_v2"))
    torch_private._packed_linear_ops.cache_clear()
    with pytest.raises(UpstreamError, match=_named("torch", "torch.ops.mkldnn._reorder_linear_weight")):
        torch_private.packed_linear(weight, 4)
    monkeypatch.undo()
    torch_private._packed_linear_ops.cache_clear()
    real = torch.ops.mkldnn._linear_pointwise

    class Changed:  # the op, returning twice the product
        _reorder_linear_weight = torch.ops.mkldnn._reorder_linear_weight

        @staticmethod
        def _linear_pointwise(*args):
            return 2 * real(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", Changed)
    with pytest.raises(UpstreamError, match=_named("torch", "torch.ops.mkldnn._linear_pointwise")):
        torch_private.packed_linear(weight, 4)
    monkeypatch.undo()
    torch_private._packed_linear_ops.cache_clear()
    x = torch.randn(3, 16).bfloat16()
    assert torch.allclose(torch_private.packed_linear(weight, 4)(x), x @ weight.t())


# ---------------------------------------------------------------------------------------------- the report


def test_the_report_counts_every_kind_and_names_each_fallback(tiny_model_dir, caplog):
    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        model = qlorakit.add_lora(model, rank=4)
    report = fast_path_report(model)
    assert report.fully_fused
    assert report.fused == report.total == {"LoRA linear": 14, "gated MLP": 2, "q/k/v": 2, "RMSNorm": 5,
                                            "attention": 1, "loss": 1}
    assert "LoRA linear 14/14, gated MLP 2/2, q/k/v 2/2, RMSNorm 5/5, attention 1/1, loss 1/1" in caplog.text
    # Disabled adapters and a second active adapter: PEFT's forward, named per layer.
    with model.disable_adapter():
        disabled = fast_path_report(model)
    assert disabled.fused["LoRA linear"] == 0
    assert disabled.fallbacks["LoRA linear"] == {"adapters disabled": [n for n, _ in
                                                                        upstream_peft.lora_linear_layers(model)]}
    assert fast_path_report(model).fully_fused  # back once the context ends


def test_without_the_fast_path_the_report_says_so(tiny_model_dir):
    report = fast_path_report(_plain_lora(tiny_model_dir))
    assert report.fused == dict.fromkeys(report.fused, 0) | {"loss": 1}  # the chunked loss is not an install
    assert set(report.fallbacks["LoRA linear"]) == {"fast path not installed (fused=False)"}
    assert report.fallbacks["attention"] == {"fast path not installed (fused=False)": ["(model)"]}


def test_qlorakit_exports_the_report():
    assert qlorakit.fast_path_report is fast_path_report
    assert ATTENTION == "qlorakit_packed"
