"""Model cards (README.md) of an adapter directory, a merged model and a quantized base: metadata huggingface_hub
parses as the Hub does, the run's numbers as metrics.jsonl holds them, the precision policy, and a command that
rebuilds the run's config. Hub bases come from an offline Hub cache (tests/hub_cache.py)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import qlorakit
from conftest import save_tiny_bpe_model, save_tiny_model
from hub_cache import add_repo
from qlorakit.adapters import ADAPTER_FILES, load_adapter, read_adapter_info, save_adapter
from qlorakit.cli import build_parser
from qlorakit.config import TrainConfig
from qlorakit.demo import run_demo
from qlorakit.model_card import train_command
from qlorakit.precision import precision_of

ROWS = [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 3 + j) % 200 + 10}" for j in range(6))},
                      {"role": "assistant", "content": "w100 w150 w200"}]} for i in range(48)]
IDS = torch.tensor([[5, 20, 30, 40, 50]])
TAGS = ["qlorakit", "lora", "qlora", "nf4", "sft"]


def _licensed(path, license="apache-2.0"):
    base = save_tiny_model(path)
    (base / "README.md").write_text(f"---\nlicense: {license}\nlanguage: en\n---\n\n# A tiny model\n")
    return base


@pytest.fixture(scope="module")
def licensed_base(tmp_path_factory):
    return _licensed(tmp_path_factory.mktemp("licensed"))


@pytest.fixture(scope="module")
def run(licensed_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return qlorakit.train(progress=False, log=lambda _: None, model=str(licensed_base), data=str(data),
                          output=str(root / "out"), dtype="fp32", device="cpu", rank=4, alpha=8, lr=5e-3,
                          batch_size=4, max_steps=4, validation=0.25, seed=0)


def _card(directory) -> ModelCard:
    return ModelCard.load(directory / "README.md")  # a local file: read as the Hub reads it, no network


def _metrics(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _block(text: str, language: str) -> str:
    return _blocks(text, language)[0]


def _parsed_command(text: str, env=None, command: str = "train", config_class=TrainConfig) -> TrainConfig:
    """The card's `qlorakit train ...` (or `dpo`) line, expanded by bash as a user's shell would, through
    qlorakit's parser."""
    line = next(line for line in _block(text, "bash").splitlines() if line.startswith(f"qlorakit {command}"))
    words = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, check=True,
                           env=env).stdout.decode().split("\0")[:-1]
    args = build_parser().parse_args(words[1:])
    return config_class.build(None, **{name: getattr(args, name, None) for name in config_class().to_dict()})


# ---------------------------------------------------------------------------------------------- the adapter


def test_the_adapter_card_parses_and_reports_the_run(run, licensed_base):
    out = run.output
    card = _card(out)
    assert card.data.to_dict() == {"library_name": "peft", "license": "apache-2.0",
                                   "pipeline_tag": "text-generation", "tags": TAGS}  # a local base: no base_model
    records = _metrics(out)
    loss = [r for r in records if "loss" in r][-1]
    evaluation = [r for r in records if "eval_loss" in r][-1]
    assert loss["loss"] == pytest.approx(run.final_loss) and evaluation["eval_loss"] == pytest.approx(run.eval["loss"])
    assert f"| final training loss (step 4) | {loss['loss']:.4f} |" in card.text
    assert (f"| validation loss (step 4) | {evaluation['eval_loss']:.4f} (perplexity "
            f"{evaluation['eval_perplexity']:.2f}) |") in card.text
    for line in ("- Compute dtype: fp32 (autocast off); the loss in fp32", "- LoRA A/B dtype: fp32",
                 "- GradScaler: off", "- Base weights: nf4 (4-bit, blocksize 64, double-quantized), dequantized to "
                 "fp32, frozen", f"- Base model: the local model `{licensed_base}` (not a Hub id, so not in the "
                 "metadata)", "- License: `apache-2.0`, from the base model's README.md",
                 f"- Data: the local file `{out.parent / 'train.jsonl'}` (not on the Hub, so not in the metadata)",
                 "- Validation data: 25% of the examples, held out"):
        assert line in card.text, line
    assert f"trained with qlorakit {qlorakit.__version__}" in card.text


def test_the_card_does_not_change_what_loads(run, licensed_base):
    """README.md is no file of the adapter's record: the adapter reads and loads, giving the trained logits."""
    assert "README.md" not in ADAPTER_FILES
    info = read_adapter_info(run.output)
    assert sorted(info["qlorakit"]["files"]) == sorted(ADAPTER_FILES)
    model, _ = qlorakit.load(str(licensed_base), dtype="fp32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(model, run.output)(input_ids=IDS).logits,
                                   run.model(input_ids=IDS).logits)


def test_the_cards_snippets_load_the_adapter(run):
    """The card's qlorakit and PEFT snippets, run as written, load this adapter on its nf4 base."""
    qlorakit_block, peft_block = _blocks(_card(run.output).text, "python")
    for code in (qlorakit_block, peft_block):
        scope = {}
        exec(code, scope)
        assert scope["model"].peft_config["default"].r == 4
        with torch.no_grad():
            assert torch.isfinite(scope["model"](input_ids=IDS).logits).all()


def test_the_cards_command_and_settings_rebuild_the_runs_config(run):
    text = _card(run.output).text
    config = json.loads((run.output / "config.json").read_text())
    config.pop("compute_dtype"), config.pop("base_revision"), config.pop("world_size")  # what the run resolved
    # and ran on, not settings; and what it minimised, which the command names
    assert config.pop("objective") == "sft"
    assert _parsed_command(text).to_dict() == config
    assert TrainConfig.from_dict(yaml.safe_load(_block(text, "yaml"))).to_dict() == config


def test_the_command_pins_what_the_run_resolved_and_writes_home_as_a_tilde(tmp_path, monkeypatch):
    """Flags of every kind (a bool turned off, a list, a repeatable one) survive the trip through bash and the
    parser; `dtype auto` and a Hub base at a commit are pinned; paths under the home directory read ~/ and expand
    back to themselves."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    output = home / "my runs" / "first"
    config = TrainConfig(model="org/base", data=str(home / "data.jsonl"), dtype="auto", packing=False, rank=8,
                         targets=["q_proj", "v_proj"], field=["messages=conversations", "prompt=question"], lr=1e-4,
                         output=str(output), resume=True).to_dict()
    command = train_command(config, {"base_model": "org/base", "base_revision": "a" * 40, "dtype": "bf16"})
    assert str(home) not in command and "~/'my runs/first'" in command
    rebuilt = _parsed_command(f"```bash\n{command}\n```", env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    expected = config | {"model": "org/base@" + "a" * 40, "dtype": "bf16", "resume": False,
                         "targets": "q_proj,v_proj"}  # (the flag's form of the list)
    assert rebuilt.to_dict() == expected


def test_a_base_without_a_license_gives_none_and_hub_data_is_named(tiny_model_dir, tmp_path, monkeypatch):
    """No README.md in the base: no license in the metadata, and the body says so. A Hub dataset id is listed
    (its revision and configuration in the body); a local path of the same form is not."""
    model = qlorakit.add_lora(qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")[0], rank=2)
    out = save_adapter(model, tmp_path / "hub-data", TrainConfig(model=str(tiny_model_dir), quant="none",
                                                                 data="org/dataset@v2", data_config="sub"),
                       precision_of(model))
    card = _card(out)
    assert card.data.to_dict() == {"datasets": ["org/dataset"], "library_name": "peft",
                                   "pipeline_tag": "text-generation", "tags": ["qlorakit", "lora", "sft"]}
    assert "- License: none given here" in card.text
    assert ("- Data: the Hub dataset [org/dataset](https://huggingface.co/datasets/org/dataset) at revision `v2`, "
            "configuration `sub`, split `train`") in card.text
    assert "- Base weights: not quantized (fp32), frozen" in card.text
    assert "No metrics were recorded" in card.text  # saved outside a run: no metrics.jsonl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    out = save_adapter(model, tmp_path / "local-data", TrainConfig(model=str(tiny_model_dir), data="data/train.jsonl"),
                       precision_of(model))
    card = _card(out)
    assert "datasets" not in card.data.to_dict()
    assert "- Data: the local file `data/train.jsonl` (not on the Hub, so not in the metadata)" in card.text


def test_home_paths_are_written_with_a_tilde_and_still_load(tiny_model_dir, tmp_path, monkeypatch):
    """The card is meant to be published: no path names the user's home directory, and its snippets expand ~."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    model = qlorakit.add_lora(qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")[0], rank=2)
    out = home / "adapters" / "first"
    save_adapter(model, out, TrainConfig(model=str(tiny_model_dir), quant="none", output=str(out)),
                 precision_of(model))
    text = (out / "README.md").read_text()
    assert str(home) not in text and "qlorakit chat --adapter ~/adapters/first" in text
    scope = {}
    exec(_block(_card(out).text, "python"), scope)
    assert scope["model"].peft_config["default"].r == 2


@pytest.fixture
def hub_base(tmp_path, monkeypatch):
    """'org/tiny' in an offline Hub cache, its README.md saying license: mit."""
    import huggingface_hub.constants as constants

    commit = add_repo(tmp_path / "hub", "org/tiny", _licensed(tmp_path / "tiny", license="mit"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return commit


def test_a_hub_base_is_named_with_its_commit_in_adapter_and_merged_cards(hub_base, tmp_path):
    model, _ = qlorakit.load("org/tiny", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=2)
    out = save_adapter(model, tmp_path / "adapter", TrainConfig(model="org/tiny", dtype="fp32"), precision_of(model))
    card = _card(out)
    assert card.data.to_dict() == {"base_model": "org/tiny", "library_name": "peft", "license": "mit",
                                   "pipeline_tag": "text-generation", "tags": TAGS,
                                   "base_model_relation": "adapter"}
    assert f"- Base model: [org/tiny](https://huggingface.co/org/tiny) at revision `{hub_base}`" in card.text
    assert f"qlorakit train --model org/tiny@{hub_base} --dtype fp32" in card.text

    merged = qlorakit.merge(out, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    card = _card(merged)
    assert card.data.to_dict() == {"base_model": "org/tiny", "library_name": "transformers", "license": "mit",
                                   "pipeline_tag": "text-generation", "tags": TAGS,
                                   "base_model_relation": "finetune"}
    assert f"at revision `{hub_base}`" in card.text


# ---------------------------------------------------------------------------------------------- exports


def test_the_merged_card_is_for_transformers_and_carries_the_training(run, tmp_path):
    merged = qlorakit.merge(run.output, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    card = _card(merged)
    assert card.data.to_dict() == {"library_name": "transformers", "license": "apache-2.0",
                                   "pipeline_tag": "text-generation", "tags": TAGS}
    loss = [r for r in _metrics(run.output) if "loss" in r][-1]
    assert f"| final training loss (step 4) | {loss['loss']:.4f} |" in card.text
    assert "- GradScaler: off" in card.text and "- Saved in: fp32" in card.text
    assert f"qlorakit merge --adapter {run.output} --output {merged} --dtype fp32" in card.text
    scope = {}
    exec(_block(card.text, "python"), scope)  # the card's snippet: transformers alone
    assert type(scope["model"]).__name__ == "LlamaForCausalLM" and scope["tokenizer"].vocab_size == 256


def test_merging_an_adapter_trained_elsewhere_says_so(licensed_base, tmp_path):
    """A plain PEFT adapter (its README.md PEFT's own card, no qlorakit.json): the merged card names the base PEFT
    recorded and its license, and says the training is not recorded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(licensed_base)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "peft")
    merged = qlorakit.merge(tmp_path / "peft", tmp_path / "merged", base="original", log=lambda _: None)
    card = _card(merged)
    assert card.data.to_dict() == {"library_name": "transformers", "license": "apache-2.0",
                                   "pipeline_tag": "text-generation", "tags": ["qlorakit", "lora", "sft"]}
    assert f"- Base model: the local model `{licensed_base}`" in card.text
    assert "The adapter was trained outside qlorakit: its training is not recorded here." in card.text
    assert "--base original" in card.text


def test_the_quantized_base_gets_a_card(licensed_base, tmp_path):
    model, tokenizer = qlorakit.load(str(licensed_base), quant="nf4", dtype="fp32", device="cpu")
    card = _card(qlorakit.save_quantized(model, tokenizer, tmp_path / "nf4"))
    assert card.data.to_dict() == {"library_name": "transformers", "license": "apache-2.0",
                                   "pipeline_tag": "text-generation",
                                   "tags": ["qlorakit", "bitsandbytes", "nf4", "4-bit"]}
    assert "linear layers nf4+dq" in card.text


# ---------------------------------------------------------------------------------------------- exact match


def test_the_demos_held_out_exact_match_is_in_the_card_and_the_merged_one(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    base = save_tiny_bpe_model(tmp_path / "base")
    result = run_demo(log=lambda _: None, progress=False, n_heldout=4, model=str(base), quant="none", dtype="fp32",
                      device="cpu", max_steps=2, batch_size=4, output=str(tmp_path / "demo"))
    out, after, before = result["output"], result["after"], result["before"]
    assert _metrics(out)[-1] == {"step": 2, "exact_match": after["accuracy"], "exact_match_correct": after["correct"],
                                 "exact_match_total": 4, "exact_match_before": before["accuracy"]}
    row = (f"| held-out exact match (greedy) | {after['accuracy']:.1%} ({after['correct']}/4; "
           f"{before['accuracy']:.1%} before training) |")
    card = _card(out)
    assert row in card.text and card.data.to_dict()["library_name"] == "peft"
    read_adapter_info(out)  # the card rewritten beside the adapter changes none of its files
    merged = qlorakit.merge(out, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    assert row in _card(merged).text
