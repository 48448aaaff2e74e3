"""The command line: help everywhere, YAML config with flags on top, train/eval/chat on a tiny model."""

from __future__ import annotations

import json

import pytest

from qlorakit.cli import build_parser, main


@pytest.mark.parametrize("command,expected", [
    ("train", ["--data", "--format", "--quant", "--dtype", "--rank", "--alpha", "--targets", "--max-length",
               "--batch-size", "--grad-accum", "--lr", "--epochs", "--max-steps", "--packing", "--no-packing",
               "--output", "--resume", "--save-every", "--eval-every", "--schedule", "--optimizer",
               "--gradient-checkpointing", "--skip-bad-rows", "--validation", "--train-on", "--on-long"]),
    ("chat", ["--adapter", "--model", "--prompt", "--system", "--max-new-tokens"]),
    ("eval", ["--adapter", "--data", "--limit", "--no-exact-match", "--json"]),
    ("precision", ["--dtype", "--device"]),
])
def test_help(capsys, command, expected):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in expected:
        assert flag in text, flag


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subparsers(sub):
                    yield f"{name} {inner}", subsub


def test_every_command_and_flag_has_help_text():
    """`qlorakit X --help` explains every command and every flag (precision and parts of eval had none)."""
    missing = []
    for name, sub in _subparsers(build_parser()):
        if not sub.description:
            missing.append(f"{name}: no description")
        missing += [f"{name} {a.option_strings[0]}" for a in sub._actions
                    if a.option_strings and a.help in (None, "") and a.option_strings[0] != "-h"]
    assert not missing, missing


def test_flags_override_yaml_and_the_effective_config_is_saved(tmp_path, tiny_model_dir, capsys, monkeypatch):
    rows = [{"instruction": f"w{10 + i % 30} w{50 + i % 7}", "output": "w100 w101"} for i in range(24)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\ndtype: fp32\ndevice: cpu\nrank: 4\nalpha: 8\n"
                      f"lr: 1e-2\nmax_steps: 9\nbatch_size: 4\noutput: {tmp_path / 'out'}\n")
    assert main(["train", str(config), "--max-steps", "3", "--lr", "5e-3", "--quiet"]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["max_steps"] == 3 and saved["lr"] == 5e-3  # flags win
    assert saved["rank"] == 4 and saved["batch_size"] == 4 and saved["data"] == str(data)  # from the YAML
    assert "adapter (PEFT format) written to" in capsys.readouterr().out

    # eval and chat use the run's adapter and find the base model in it
    assert main(["eval", "--adapter", str(tmp_path / "out"), "--data", str(data), "--dtype", "fp32",
                 "--max-new-tokens", "4", "--limit", "4", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["examples"] == 24 and result["loss"] > 0 and 0 <= result["exact_match"] <= 1
    assert "perplexity" in out and "exact match" in out
    assert main(["chat", "--adapter", str(tmp_path / "out"), "--dtype", "fp32", "--prompt", "w10 w50",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""

    answers = iter(["w10 w50", "/reset", "w11 w51", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", "--adapter", str(tmp_path / "out"), "--dtype", "fp32", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_errors_exit_2_with_the_message(capsys, tmp_path):
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "qlorakit: error: " in capsys.readouterr().err


def test_parser_defaults_leave_config_alone():
    args = build_parser().parse_args(["train"])
    assert all(getattr(args, k) is None for k in ("lr", "rank", "packing", "max_steps", "data"))


def _train_parser():
    return dict(_subparsers(build_parser()))["train"]


def test_every_trainconfig_field_is_one_train_flag_with_its_help_choices_and_heading():
    """`qlorakit train`'s flags are TrainConfig's fields: one each, named after the field, with the field's help,
    choices and heading, and no default of their own (a flag not given leaves the YAML's value alone)."""
    from dataclasses import fields

    from qlorakit.config import TrainConfig

    train = _train_parser()
    launch_only = ("help", "overwrite", "quiet", "nproc_per_node")  # how the run starts, not what it is
    actions = [a for a in train._actions if a.option_strings and a.dest not in launch_only]
    assert sorted(a.dest for a in actions) == sorted(f.name for f in fields(TrainConfig))  # exactly one each
    by_name = {a.dest: a for a in actions}
    heading_of = {a.dest: g.title for g in train._action_groups for a in g._group_actions}
    heading = None
    for f in fields(TrainConfig):
        action = by_name[f.name]
        flag = "--" + f.name.replace("_", "-")
        assert action.option_strings[0] == flag, f.name
        assert action.default is None, f.name
        assert action.help.replace("%%", "%").startswith(f.metadata["help"]), f.name
        if f.default is not None:
            assert "(default " in action.help, f.name  # the default is shown, from the field
        assert action.choices == f.metadata["choices"], f.name
        if isinstance(f.default, bool):
            assert action.option_strings == [flag, "--no-" + flag[2:]], f.name
        heading = f.metadata["heading"] or heading
        assert heading_of[f.name] == heading, f.name
    assert [g.title for g in train._action_groups][2:] == ["model", "data", "adapters", "optimisation", "run"]


def _other_value(f):
    """A valid value for TrainConfig field `f` that is not its default, and the command line that gives it."""
    flag = "--" + f.name.replace("_", "-")
    choices = f.metadata["choices"]
    if choices:
        value = next(c for c in reversed(choices) if c != f.default)
    elif isinstance(f.default, bool):
        return not f.default, [flag if not f.default else "--no-" + flag[2:]]
    elif f.metadata["repeatable"]:  # --field a=b --field c=d
        return ["messages=conversations", "prompt=question"], [flag, "messages=conversations", flag, "prompt=question"]
    elif f.name == "report_to":  # names from choices.TRACKERS, comma-separated
        value = "tensorboard,mlflow"
    elif "int" in str(f.type):
        value = (f.default or 0) + 3
    elif "float" in str(f.type):
        value = (f.default or 0.0) + 0.25
    else:
        value = f"{f.name}-value"
    return value, [flag, str(value)]


def test_every_train_flag_round_trips_to_its_config_value():
    from dataclasses import fields

    from qlorakit.config import TrainConfig

    parser = build_parser()
    for f in fields(TrainConfig):
        value, argv = _other_value(f)
        args = parser.parse_args(["train", *argv])
        config = TrainConfig.build(None, **{g.name: getattr(args, g.name) for g in fields(TrainConfig)})
        assert getattr(config, f.name) == value and type(getattr(config, f.name)) is type(value), (f.name, value)
        others = [g.name for g in fields(TrainConfig) if g.name != f.name and getattr(config, g.name) != g.default]
        assert not others, (argv, others)


def test_every_choice_setting_is_checked_against_its_flags_choices():
    """validate() refuses a value outside a field's choices with the same list the flag offers; dtype also takes
    the long names (bfloat16) that the precision module reads."""
    from dataclasses import fields

    from qlorakit.config import TrainConfig
    from qlorakit.errors import ConfigError
    from qlorakit.precision import COMPUTE_CHOICES

    for f in fields(TrainConfig):
        if f.metadata["choices"]:
            with pytest.raises(ConfigError, match=rf"^config: {f.name}='nonsense' is not .*; use one of "
                                                  rf"{', '.join(f.metadata['choices'])}$"):
                TrainConfig.build(None, **{f.name: "nonsense"})
    assert _train_parser()._option_string_actions["--dtype"].choices == COMPUTE_CHOICES
    assert TrainConfig.build(None, dtype="bfloat16").dtype == "bfloat16"
