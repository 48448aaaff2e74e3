"""A saved adapter is one unit: qlorakit.json records the size and SHA-256 of adapter_config.json and
adapter_model.safetensors, and an adapter whose files are not those it records (a save killed between its renames,
weights copied in from another save) is refused, naming the file; a plain PEFT adapter (no qlorakit.json) loads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time

import pytest
import torch

import qlorakit
from conftest import randomize_lora_b
from qlorakit.adapters import read_adapter_info, save_adapter
from qlorakit.config import TrainConfig
from qlorakit.errors import ConfigError
from qlorakit.precision import precision_of

IDS = torch.tensor([[5, 20, 30, 40, 50]])
FRESH = "different saves (a save cut short, or a file copied in from another adapter)"


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, as nothing after a kill would."""


def _lora(tiny_model_dir, seed):
    model, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
    return randomize_lora_b(qlorakit.add_lora(model, rank=2, alpha=4), std=0.2, seed=seed)


def _save(model, out, tiny_model_dir):
    return save_adapter(model, out, TrainConfig(model=str(tiny_model_dir)), precision_of(model))


def _logits(tiny_model_dir, adapter):
    model, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
    with torch.no_grad():
        return qlorakit.load_adapter(model, adapter)(input_ids=IDS).logits


def _killed_after(monkeypatch, renames: int):
    """os.replace raises Killed once `renames` files have been renamed into the adapter directory."""
    done, replace = [], os.replace

    def replacing(src, dst, *args, **kwargs):
        if len(done) == renames:
            raise Killed
        done.append(os.path.basename(dst))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replacing)
    return done


@pytest.fixture(scope="module")
def saves(tiny_model_dir, tmp_path_factory):
    """Two saves of adapters with the same settings and different weights, and each model's logits."""
    root = tmp_path_factory.mktemp("saves")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = _lora(tiny_model_dir, seed)
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        out[name] = (_save(model, root / name, tiny_model_dir), model, logits)
    return out


def test_the_record_holds_each_file_size_and_sha256_and_the_adapter_loads(saves, tiny_model_dir):
    adapter, _, logits = saves["a"]
    record = json.loads((adapter / "qlorakit.json").read_text())["files"]
    assert sorted(record) == ["adapter_config.json", "adapter_model.safetensors"]
    for name, entry in record.items():
        data = (adapter / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    torch.testing.assert_close(_logits(tiny_model_dir, adapter), logits, rtol=0, atol=0)


@pytest.mark.parametrize("renames", [1, 2, 3])
def test_a_save_killed_between_its_renames_is_refused_naming_the_file(saves, tiny_model_dir, tmp_path, monkeypatch,
                                                                      renames):
    """Save b over a copy of a, killed after 1 (qlorakit.json), 2 (README.md) or 3 (adapter_config.json) of its 4
    renames: b's record beside a's weights (the config is the same bytes in both) is refused, by read_adapter_info,
    load_adapter and merge alike."""
    adapter = tmp_path / "adapter"
    shutil.copytree(saves["a"][0], adapter)
    done = _killed_after(monkeypatch, renames)
    with pytest.raises(Killed):
        _save(saves["b"][1], adapter, tiny_model_dir)
    monkeypatch.undo()
    assert done == ["qlorakit.json", "README.md", "adapter_config.json"][:renames]
    message = (rf"adapter/adapter_model\.safetensors: does not match .*adapter/qlorakit\.json \(other contents "
               rf"\(SHA-256\) than it records\); the adapter's files are from {re.escape(FRESH)}: save it again, or "
               r"continue its run from the last checkpoint \(qlorakit train --resume\)")
    for read in (read_adapter_info, lambda a: _logits(tiny_model_dir, a),
                 lambda a: qlorakit.merge(a, tmp_path / "merged", dtype="fp32", log=lambda _: None)):
        with pytest.raises(ConfigError, match=message):
            read(adapter)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("renames, loads", [(0, "a"), (4, "b")])
def test_a_save_killed_before_its_first_or_after_its_last_rename_leaves_one_whole_adapter(
        saves, tiny_model_dir, tmp_path, monkeypatch, renames, loads):
    adapter = tmp_path / "adapter"
    shutil.copytree(saves["a"][0], adapter)
    _killed_after(monkeypatch, renames)
    if renames < 4:
        with pytest.raises(Killed):
            _save(saves["b"][1], adapter, tiny_model_dir)
    else:
        _save(saves["b"][1], adapter, tiny_model_dir)
    monkeypatch.undo()
    torch.testing.assert_close(_logits(tiny_model_dir, adapter), saves[loads][2], rtol=0, atol=0)


def test_a_first_save_killed_after_its_record_is_refused(saves, tiny_model_dir, tmp_path, monkeypatch):
    _killed_after(monkeypatch, 1)
    with pytest.raises(Killed):
        _save(saves["b"][1], tmp_path / "adapter", tiny_model_dir)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"adapter: adapter_config\.json is missing, though qlorakit\.json records it "
                                          r"\(a save cut short, or the file was removed\); save the adapter again"):
        read_adapter_info(tmp_path / "adapter")


def test_weights_copied_in_from_another_save_are_refused(saves, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(saves["a"][0], adapter)
    shutil.copyfile(saves["b"][0] / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"adapter_model\.safetensors: does not match .*qlorakit\.json \(other "
                                          r"contents \(SHA-256\) than it records\)"):
        read_adapter_info(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 4}))  # a file of another size
    with pytest.raises(ConfigError, match=r"adapter_config\.json: does not match .*qlorakit\.json \([\d,]+ bytes, where "
                                          r"it records [\d,]+\).*A file you edited on purpose: delete the 'files' entry"):
        read_adapter_info(adapter)


def test_a_damaged_record_is_refused(saves, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(saves["a"][0], adapter)
    saved = json.loads((adapter / "qlorakit.json").read_text())
    (adapter / "qlorakit.json").write_text(json.dumps(saved | {"files": {"adapter_config.json": "abc"}}))
    with pytest.raises(ConfigError, match=r"qlorakit\.json: 'files' is \{'adapter_config\.json': 'abc'\}, not the "
                                          r"record of the adapter's files .*; save the adapter again"):
        read_adapter_info(adapter)


def test_adapters_without_the_record_still_load(saves, tiny_model_dir, tmp_path):
    """A plain PEFT adapter (no qlorakit.json), and one from a qlorakit that wrote no record."""
    adapter, model, logits = saves["a"]
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    assert not (plain / "qlorakit.json").exists()
    torch.testing.assert_close(_logits(tiny_model_dir, plain), logits, rtol=0, atol=0)
    older = tmp_path / "older"
    shutil.copytree(adapter, older)
    saved = json.loads((older / "qlorakit.json").read_text())
    (older / "qlorakit.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "files"}))
    assert read_adapter_info(older)["qlorakit"]["quant"] == "nf4"


def test_checking_a_demo_size_adapter_costs_little(tmp_path):
    """The default model's demo adapter (SmolLM2-135M, r=16 on every linear layer: 4.9M bf16 parameters, 9.8 MB):
    its record is checked in well under a second (measured: 15 ms; 0.2 ms again), and once per file identity."""
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    save_file({"w": torch.zeros(4_884_480, dtype=torch.bfloat16)}, adapter / "adapter_model.safetensors")
    record = {name: {"bytes": (adapter / name).stat().st_size,
                     "sha256": hashlib.sha256((adapter / name).read_bytes()).hexdigest()}
              for name in ("adapter_config.json", "adapter_model.safetensors")}
    (adapter / "qlorakit.json").write_text(json.dumps({"files": record}))
    start = time.perf_counter()
    read_adapter_info(adapter)
    first = time.perf_counter() - start
    start = time.perf_counter()
    read_adapter_info(adapter)
    again = time.perf_counter() - start
    print(f"record check: {first * 1e3:.1f} ms, again {again * 1e3:.2f} ms")
    assert first < 1.0 and again < first
