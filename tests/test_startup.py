"""Start-up: `import qlorakit` and every `qlorakit ... --help` import none of the heavy libraries (torch,
transformers, PEFT, bitsandbytes, TRL, datasets, accelerate), so they answer at once; each public name is imported
when it is first used. The budget is the modules imported, not seconds (timings: bench/startup.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate")
# What the `qlorakit` console script runs ([project.scripts] qlorakit = "qlorakit.cli:main").
ENTRY_POINT = "import sys; from qlorakit.cli import main; sys.exit(main())"
COMMANDS = ["", "train", "chat", "eval", "precision", "merge", "export", "export gguf", "quantize"]


def imported(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """The top-level packages a fresh `python -X importtime ARGS` imports (importtime lists every module on
    stderr, whether or not another module already imported it in that process)."""
    run = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    names = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    return {name.split(".")[0] for name in names}, run


def test_import_qlorakit_imports_no_heavy_library():
    packages, run = imported("-c", "import qlorakit")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "qlorakit" in packages  # (the listing is read right)
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "qlorakit")
def test_help_imports_no_heavy_library(command):
    packages, run = imported("-c", ENTRY_POINT, *command.split(), "--help")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"usage: qlorakit {command}".rstrip())
    assert "qlorakit" in packages
    assert packages.isdisjoint(HEAVY), sorted(packages & set(HEAVY))


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    import qlorakit
    from qlorakit.adapters import save_adapter
    from qlorakit.config import TrainConfig

    model, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=2, alpha=4)
    return save_adapter(model, tmp_path_factory.mktemp("adapter"), TrainConfig(model=str(tiny_model_dir)),
                        qlorakit.precision_of(model))


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_chat_and_eval_import_no_trl_or_datasets(command, tiny_adapter, tmp_path):
    """A chat or an eval on a JSON lines file loads the model and adapter (torch, transformers, PEFT) but needs
    neither TRL (only the trainer guard does) nor datasets (only parquet files and saved datasets do)."""
    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "w10 w50", "completion": " w100 w101"}\n')
    flags = ["--prompt", "w10 w50"] if command == "chat" else ["--data", str(data)]
    packages, run = imported("-c", ENTRY_POINT, command, "--adapter", str(tiny_adapter), "--dtype", "fp32",
                             "--device", "cpu", "--max-new-tokens", "2", *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {"torch", "transformers", "peft"} <= packages  # (the command really ran)
    assert packages.isdisjoint({"trl", "datasets"}), sorted(packages & {"trl", "datasets"})


def test_public_names_resolve_on_first_use():
    """In a fresh process: nothing heavy at `import qlorakit`; a name resolves to its module's object; qlorakit.load
    and qlorakit.train stay the functions after their submodules are imported (which sets the package's attribute
    of that name); a submodule is an attribute as before; an unknown name is the usual AttributeError."""
    code = """
import sys
import qlorakit
assert "torch" not in sys.modules
assert set(qlorakit.__all__) <= set(dir(qlorakit))
import qlorakit.generation
assert qlorakit.generate is qlorakit.generation.generate
import qlorakit.load, qlorakit.train  # the submodules of the same names as the functions
from qlorakit import train
assert qlorakit.train is train is sys.modules["qlorakit.train"].train and callable(train)
assert qlorakit.load is sys.modules["qlorakit.load"].load
assert qlorakit.adapters is sys.modules["qlorakit.adapters"]  # a submodule, as before
try:
    qlorakit.no_such_name
except AttributeError as e:
    assert str(e) == "module 'qlorakit' has no attribute 'no_such_name'", e
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_every_public_name_has_its_home():
    """__all__ and the table of where each name lives are the same names, and each comes from its module."""
    import importlib

    import qlorakit

    assert set(qlorakit._HOMES) == set(qlorakit.__all__)
    for name, home in qlorakit._HOMES.items():
        assert getattr(qlorakit, name) is getattr(importlib.import_module(f"qlorakit.{home}"), name), name


def test_the_choices_have_one_home():
    """The torch-free constants the parser is built from are the very objects the modules that use them hold."""
    import importlib

    from qlorakit import choices, config, precision
    from qlorakit.data import formats, tokenize
    from qlorakit.export import gguf_file, source

    load = importlib.import_module("qlorakit.load")  # (qlorakit.load is the function)

    for module, names in [(load, ["DEFAULT_MODEL", "QUANT_KINDS"]),
                          (precision, ["DTYPE_NAMES", "COMPUTE_CHOICES", "DEFAULT_SAVED_DTYPE", "is_dtype_name"]),
                          (formats, ["FORMATS"]), (tokenize, ["TRAIN_ON", "ON_LONG"]),
                          (gguf_file, ["GGUF_TYPES"]), (source, ["BASES"])]:
        for name in names:
            assert getattr(module, name) is getattr(choices, name), (module.__name__, name)
    assert config.choices_of("quant") is choices.QUANT_KINDS
    assert all(precision.parse_dtype(spelling) for spelling in choices.DTYPE_SPELLINGS)
