"""Outputs other tools load, on tiny random models: the adapter in plain PEFT, PEFT adapters trained elsewhere
continued, merged models in plain transformers, GGUF files read back by gguf and transformers, quantized
checkpoints reloaded without re-quantizing, and bad adapters refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlorakit
from conftest import save_tiny_bpe_model, save_tiny_model
from qlorakit.adapters import load_adapter
from qlorakit.errors import ConfigError

ROWS = [{"messages": [{"role": "user", "content": f"export number {i} as a gguf file"},
                      {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}]}
        for i in range(16)]
PROMPT = "merge the low rank update into the base weights"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_tiny_bpe_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


def _train_adapter(base, output, quant="nf4", **kw):
    data = Path(output).parent / f"{Path(output).name}-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    settings = dict(model=str(base), data=str(data), output=str(output), quant=quant, dtype="fp32", device="cpu",
                    rank=4, alpha=8, lr=3e-2, batch_size=4, max_steps=3, seed=0)
    qlorakit.train(progress=False, log=lambda _: None, **(settings | kw))
    return Path(output)


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {arch: _train_adapter(base, root / arch) for arch, base in bases.items()}


def _ids(model_dir):
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]])


def _qlorakit_logits(base, adapter, ids, quant="none"):
    model, _ = qlorakit.load(base, quant=quant, dtype="fp32", device="cpu")
    model = load_adapter(model, adapter)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("quant", ("none", "nf4"))
def test_saved_adapter_loads_in_plain_peft_with_qlorakit_logits(bases, adapters, quant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base, adapter = bases["llama"], adapters["llama"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(base)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32) if quant == "nf4" else None
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb)
    for module in plain.modules():  # bitsandbytes' bf16 CPU inference kernel rounds the 4-bit scales to bf16
        if hasattr(module, "support_avx512bf16_for_cpu"):  # (qlorakit keeps layers out of it; see precision.py)
            module.support_avx512bf16_for_cpu = False
    plain = PeftModel.from_pretrained(plain, str(adapter))
    ids = _ids(base)
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    ours = _qlorakit_logits(base, adapter, ids, quant)
    assert _rel(ours, expected) < 1e-5  # measured ~1e-7: same weights, same fp32 arithmetic up to summation order
    with torch.no_grad(), plain.disable_adapter():
        assert _rel(plain(input_ids=ids).logits, expected) > 1e-3  # the adapter matters, so the check means something


def _foreign_rslora_adapter(base, path):
    """A LoRA adapter made by PEFT alone: rsLoRA, q and v only, non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = _ids(base)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(path)
    return Path(path), logits


def test_peft_rslora_adapter_from_elsewhere_loads_and_continues_training(bases, tmp_path):
    base = bases["llama"]
    adapter, peft_logits = _foreign_rslora_adapter(base, tmp_path / "foreign")
    # rsLoRA's alpha/sqrt(r) = 5.66, not alpha/r = 2: a wrong scale would be far off
    assert _rel(_qlorakit_logits(base, adapter, _ids(base)), peft_logits) < 1e-5
    initial = load_file(adapter / "adapter_model.safetensors")

    frozen_lr = _train_adapter(base, tmp_path / "tiny-lr", adapter=str(adapter), lr=1e-12)
    moved = _train_adapter(base, tmp_path / "trained", adapter=str(adapter), lr=1e-2)
    for out in (frozen_lr, moved):
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["use_rslora"] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    kept, trained = load_file(frozen_lr / "adapter_model.safetensors"), load_file(moved / "adapter_model.safetensors")
    assert kept.keys() == initial.keys() == trained.keys()
    for name in initial:  # it started from the adapter's weights (fresh ones would have B = 0) and trained them
        torch.testing.assert_close(kept[name], initial[name], rtol=0, atol=1e-6)
    assert all(not torch.allclose(trained[n], initial[n]) for n in initial)


# ---------------------------------------------------------------------------------------------- merge


def test_merged_model_loads_in_plain_transformers_without_qlorakit(bases, adapters, tmp_path):
    base, adapter = bases["llama"], adapters["llama"]
    merged = qlorakit.merge(adapter, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    ids = _ids(base)
    script = (
        "import sys, torch; sys.modules['qlorakit'] = None\n"  # importing qlorakit would now fail
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(merged)!r})\n"
        "assert tokenizer.chat_template and model.dtype == torch.float32\n"
        f"ids = torch.tensor([tokenizer({PROMPT!r})['input_ids']])\n"
        f"torch.save(model(input_ids=ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    logits = torch.load(tmp_path / "logits.pt")
    # merged into the nf4 base the adapter was trained against (merge's default base)
    assert _rel(logits, _qlorakit_logits(base, adapter, ids, quant="nf4")) < 1e-5  # measured ~2e-6


@pytest.mark.parametrize("dtype", ("bf16", "fp16"))
def test_merged_16_bit_model_is_the_fp32_one_rounded(bases, adapters, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    fp32 = qlorakit.merge(adapters["llama"], tmp_path / "fp32", dtype="fp32", log=lambda _: None)
    half = qlorakit.merge(adapters["llama"], tmp_path / dtype, dtype=dtype, log=lambda _: None)
    a, b = load_file(fp32 / "model.safetensors"), load_file(half / "model.safetensors")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for name in a:  # rounded once, from the fp32 sum
        assert b[name].dtype == torch_dtype
        torch.testing.assert_close(b[name], a[name].to(torch_dtype), rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(half)
    assert model.dtype == torch_dtype


def test_merge_writes_shards_with_an_index(bases, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    one = qlorakit.merge(adapters["llama"], tmp_path / "one", dtype="fp32", log=lambda _: None)
    many = qlorakit.merge(adapters["llama"], tmp_path / "many", dtype="fp32", max_shard_size="100KB",
                          log=lambda _: None)
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    ids = _ids(bases["llama"])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(d)(input_ids=ids).logits for d in (one, many)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_merge_holds_one_tensor_at_a_time(adapters, tmp_path, monkeypatch):
    """Layer by layer: when the merge reads a tensor, at most the one before it is still alive, so memory never
    holds a second copy of the model."""
    import gc
    import weakref

    from qlorakit.export.source import ModelTensors

    alive, most = [], []
    read = ModelTensors.get

    def tracked(self, name):
        gc.collect()
        most.append(sum(ref() is not None for ref in alive))
        tensor = read(self, name)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(ModelTensors, "get", tracked)
    qlorakit.merge(adapters["llama"], tmp_path / "merged", dtype="fp32", log=lambda _: None)
    assert len(most) == 21 and max(most) <= 1


def test_merge_from_a_quantized_checkpoint_dequantizes_it(bases, adapters, tmp_path):
    """A base saved quantized (its only copy, say) is dequantized for the merge; the merged model computes what the
    quantized base plus adapter computes."""
    base, adapter = bases["llama"], adapters["llama"]
    quantized = qlorakit.quantize(str(base), tmp_path / "nf4", quant="nf4", device="cpu", log=lambda _: None)
    merged = qlorakit.merge(adapter, tmp_path / "merged", dtype="fp32", model=str(quantized), log=lambda _: None)
    from transformers import AutoModelForCausalLM

    ids = _ids(base)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    assert _rel(logits, _qlorakit_logits(base, adapter, ids, quant="nf4")) < 1e-5
    assert _rel(logits, _qlorakit_logits(base, adapter, ids, quant="none")) > 1e-3  # it is the nf4 base


# ---------------------------------------------------------------------------------------------- bad adapters


def test_bad_adapters_are_refused_with_the_reason(bases, adapters, tmp_path):
    import shutil

    adapter = adapters["llama"]
    missing = tmp_path / "missing"
    shutil.copytree(adapter, missing)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="adapter_model.safetensors is missing"):
        qlorakit.merge(missing, tmp_path / "out1", log=lambda _: None)

    damaged = tmp_path / "damaged"
    shutil.copytree(adapter, damaged)
    _unrecorded(damaged)  # (edited by hand below: past the check that its files are one save's)
    (damaged / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="damaged/adapter_model.safetensors: cannot read the adapter weights"):
        qlorakit.merge(damaged, tmp_path / "out2", log=lambda _: None)

    narrow = save_tiny_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    with pytest.raises(ConfigError, match=r"adapter's model\.layers\.0\..+ is \d+x\d+ \(lora_B .* has \d+x\d+: not this adapter's base "
                       r"model; the adapter was trained on '.*llama'"):
        qlorakit.merge(adapter, tmp_path / "out3", model=str(narrow), log=lambda _: None)
    with pytest.raises(ConfigError, match="does not fit this base model"):
        load_adapter(qlorakit.load(narrow, quant="none", dtype="fp32", device="cpu")[0], adapter)

    shallow = save_tiny_model(tmp_path / "shallow", num_hidden_layers=1)
    with pytest.raises(ConfigError, match=r"modifies model.layers.1.* which .*shallow does not have"):
        qlorakit.merge(adapter, tmp_path / "out4", model=str(shallow), log=lambda _: None)

    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    _unrecorded(dora)  # (edited by hand below: past the check that its files are one save's)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora=true"):
        qlorakit.merge(dora, tmp_path / "out5", log=lambda _: None)

    half = tmp_path / "half"
    shutil.copytree(adapter, half)
    _unrecorded(half)  # (edited by hand below: past the check that its files are one save's)
    weights = load_file(half / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "lora_B" not in k or "layers.0.mlp.up_proj" not in k},
              str(half / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="up_proj has lora_A but not its partner"):
        qlorakit.merge(half, tmp_path / "out6", log=lambda _: None)
    assert not any((tmp_path / f"out{i}").exists() and any((tmp_path / f"out{i}").iterdir()) for i in range(1, 7))


def _unrecorded(adapter):
    """Drop qlorakit.json's record of the adapter's files, as its owner does after editing one on purpose."""
    saved = json.loads((adapter / "qlorakit.json").read_text())
    (adapter / "qlorakit.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "files"}))


def test_merge_refuses_to_overwrite_without_asking(adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        qlorakit.merge(adapters["llama"], out, log=lambda _: None)
    assert (out / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- GGUF

# Relative error of GGUF logits (read back by transformers) against the merged fp32 model's. Measured on these tiny
# random models, whose weights are 15x larger than trained ones: f16 1.6e-3, bf16 1.7e-2, q8_0 3-5e-2.
GGUF_TOL = {"f16": 5e-3, "bf16": 4e-2, "q8_0": 1e-1}


def _expected_tensor_names(arch, layers=2):
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(layers):
        names |= {f"blk.{i}.{n}.weight" for n in per_layer}
        if arch == "qwen2":
            names |= {f"blk.{i}.attn_{n}.bias" for n in "qkv"}
    return names


@pytest.mark.parametrize("gguf_type", ("f16", "bf16", "q8_0"))
@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_gguf_reads_back_in_gguf_and_transformers(bases, adapters, tmp_path, arch, gguf_type):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = bases[arch], adapters[arch]
    path = qlorakit.export_gguf(tmp_path / "model.gguf", adapter=adapter, gguf_type=gguf_type, log=lambda _: None)
    merged = qlorakit.merge(adapter, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(merged)

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
              or k.endswith(("model", "pre", "_id", "add_bos_token"))}
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.embedding_length"] == 64 and fields[f"{arch}.attention.head_count_kv"] == 2
    # transformers gives a qwen2 model Qwen's digit-splitting pre-tokenizer, whatever tokenizer.json says
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == {"llama": "gpt-2", "qwen2": "qwen2"}[arch]
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == len(tokenizer) == 330
    types = reader.fields["tokenizer.ggml.token_type"]
    assert [int(types.parts[i][0]) for i in types.data[:3]] == [gguf.TokenType.CONTROL] * 3  # the specials
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == _expected_tensor_names(arch)
    big = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[gguf_type]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == big
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(merged)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    ids = _ids(merged)
    assert gguf_tokenizer(PROMPT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert _rel(loaded(input_ids=ids).logits, reference(input_ids=ids).logits) < GGUF_TOL[gguf_type]
    if gguf_type == "f16":  # greedy generations agree
        settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert loaded.generate(ids, **settings).tolist() == reference.generate(ids, **settings).tolist()


def test_llama_q_k_layout_is_what_the_gguf_loaders_undo():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from qlorakit.export.gguf_file import _permute_for_ggml

    weight = torch.randn(48, 16)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    q = _permute_for_ggml(weight, 6)
    k = _permute_for_ggml(weight[:16], 2)
    assert not torch.equal(q, weight)
    assert torch.equal(torch.from_numpy(undo.process(q.numpy(), "blk.0.attn_q.weight").weights), weight)
    assert torch.equal(torch.from_numpy(undo.process(k.numpy(), "blk.0.attn_k.weight").weights), weight[:16])


def test_llama3_rope_factors_match_transformers_rope():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qlorakit.export.gguf_file import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    factors = torch.from_numpy(llama3_rope_factors(config)).double()
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends and a blend between
    torch.testing.assert_close(plain / factors, scaled.double(), rtol=1e-5, atol=0)


def test_gguf_export_refuses_what_it_cannot_write(adapters, tmp_path):
    with pytest.raises(ConfigError, match=r"name the output file \*\.gguf"):
        qlorakit.export_gguf(tmp_path / "model.bin", adapter=adapters["llama"], log=lambda _: None)
    with pytest.raises(ConfigError, match="needs --adapter DIR .* or --model DIR"):
        qlorakit.export_gguf(tmp_path / "model.gguf", log=lambda _: None)
    with pytest.raises(ConfigError, match="type='q4_k'"):
        qlorakit.export_gguf(tmp_path / "model.gguf", adapter=adapters["llama"], gguf_type="q4_k",
                             log=lambda _: None)
    assert not (tmp_path / "model.gguf").exists()


# ---------------------------------------------------------------------------------------------- quantized


@pytest.mark.parametrize("quant", ("nf4", "int8"))
def test_quantized_checkpoint_reloads_without_requantizing_in_every_dtype(bases, tmp_path, quant, monkeypatch):
    import bitsandbytes as bnb

    base = bases["llama"]
    saved = qlorakit.quantize(str(base), tmp_path / quant, quant=quant, device="cpu", log=lambda _: None)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    fresh, _ = qlorakit.load(base, quant=quant, dtype="fp32", device="cpu")
    layer = "model.layers.0.self_attn.q_proj"

    def stored(model):
        """The layer's quantized bytes and scales (4-bit: packed codes, absmax; int8: codes, row scales)."""
        weight = model.get_submodule(layer).weight
        if quant == "int8":
            return [weight.data, weight.SCB if weight.SCB is not None else model.get_submodule(layer).state.SCB]
        state = weight.quant_state
        return [weight.data, state.absmax, state.state2.absmax if state.nested else state.absmax]

    def no_quantizing(*args, **kwargs):
        raise AssertionError("the saved checkpoint was quantized again")

    ids = _ids(base)
    reference = {}
    for dtype in ("fp32", "bf16", "fp16"):  # quantized afresh (from fp32, as `quantize` does), run in each dtype
        model = qlorakit.Precision.resolve(dtype, device="cpu").apply(
            qlorakit.load(base, quant=quant, dtype="fp32", device="cpu")[0])
        with torch.no_grad():
            reference[dtype] = model(input_ids=ids).logits
    monkeypatch.setattr(bnb.nn.Params4bit, "_quantize", no_quantizing)
    monkeypatch.setattr(bnb.nn.Int8Params, "_quantize", no_quantizing)
    for dtype in ("fp32", "bf16", "fp16"):
        model, tokenizer = qlorakit.load(saved, quant=quant, dtype=dtype, device="cpu")
        assert tokenizer.chat_template
        assert qlorakit.precision_of(model).describe().startswith(f"compute {dtype}")
        for got, want in zip(stored(model), stored(fresh)):  # the same quantized weights, whatever the dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, reference[dtype], rtol=0, atol=0)


def test_save_quantized_refuses_adapters_and_unquantized_models(bases, tmp_path):
    model, tokenizer = qlorakit.load(bases["llama"], quant="none", dtype="fp32", device="cpu")
    with pytest.raises(ConfigError, match="not quantized"):
        qlorakit.save_quantized(model, tokenizer, tmp_path / "a")
    model, tokenizer = qlorakit.load(bases["llama"], quant="nf4", dtype="fp32", device="cpu")
    with pytest.raises(ConfigError, match="carries LoRA adapters"):
        qlorakit.save_quantized(qlorakit.add_lora(model), tokenizer, tmp_path / "b")


# ---------------------------------------------------------------------------------------------- command line


def test_command_line_merge_export_quantize(bases, adapters, tmp_path, capsys):
    from qlorakit.cli import main

    adapter = str(adapters["qwen2"])
    assert main(["merge", "--adapter", adapter, "--output", str(tmp_path / "merged"), "--dtype", "fp16"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert main(["export", "gguf", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "m.gguf"),
                 "--type", "q8_0"]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert main(["quantize", "--model", str(bases["qwen2"]), "--output", str(tmp_path / "q"), "--quant", "nf4",
                 "--device", "cpu"]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2
    assert "nowhere: not an adapter directory" in capsys.readouterr().err
