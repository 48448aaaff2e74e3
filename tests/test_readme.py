"""The README matches what a newcomer sees: every `qlorakit.NAME` it shows exists, and every shell command it shows
runs the venv's `qlorakit` (the setup installs into .venv and activates nothing)."""

from __future__ import annotations

import re
from pathlib import Path

import qlorakit

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_python_name_the_readme_uses_exists():
    code = "\n".join(re.findall(r"```python\n(.*?)```", README, re.S))
    names = set(re.findall(r"\bqlorakit\.([A-Za-z_]\w*)", code))  # everything the Python examples use
    names |= set(re.findall(r"\bqlorakit\.([A-Za-z_]\w*)\(", README))  # and every call shown in the text
    missing = sorted(n for n in names if not hasattr(qlorakit, n))
    assert not missing, missing
    assert "load_adapter" in names  # the README's `qlorakit.load_adapter(model, path)`


def test_every_shell_command_uses_the_venv_entry_point():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    bare = [line for line in lines if re.match(r"\s*qlorakit\s", line)]
    assert lines and not bare, bare


def test_default_outputs_are_ignored_by_git():
    """Running the README's commands in a clone leaves `git status` clean: the default outputs are ignored."""
    from qlorakit.config import GRPOConfig, PreferenceConfig, TrainConfig
    from qlorakit.demo import DEMO_SETTINGS, GRPO_SETTINGS, PREFERENCE_SETTINGS

    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    for output in (DEMO_SETTINGS["output"], TrainConfig().output, PREFERENCE_SETTINGS["output"],
                   PreferenceConfig().output, GRPO_SETTINGS["output"], GRPOConfig().output):
        assert f"/{output}/" in ignored, output
