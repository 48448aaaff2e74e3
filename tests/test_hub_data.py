"""Datasets by Hub id and dataset directories, through datasets.load_dataset, offline.

A dataset directory in a Hub repository's layout (README.md whose YAML header lists configs, data/*.parquet) loads
through load_dataset. A Hub id is read offline (HF_HUB_OFFLINE=1) from what datasets reads then: its own cache of
prepared datasets (HF_DATASETS_CACHE/<org>___<name>/<config>/<version>/<hash>/, built here by a real load_dataset of
the same files, as datasets writes it for a Hub load), or the repository's snapshot in the hub cache (built by
tests/hub_cache.py). Columns map to format fields (--field); splits and configurations are picked, and unknown ones
named with those there are. Streaming reads rows as they are needed: the batches equal the in-memory stream's of the
same items in the same order, epoch by epoch, and a resumed stream continues exactly where it stopped. Every error
case is in docs/errors.md "## Hub datasets". No test reaches the network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlorakit
from conftest import tiny_tokenizer
from hub_cache import add_repo
from qlorakit import ConfigError, DataError, QLoraKitError
from qlorakit.data import collate, load_data, micro_batches, read_data

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
PAD = 0
ROWS = [{"question": f"w{10 + i} w{40 + i}", "answer": f" w{100 + i} w{150 + i % 3}"} for i in range(10)]
HELD = [{"question": f"w{70 + i}", "answer": f" w{200 + i}"} for i in range(3)]
CONFIGS = """configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
"""


def card(configs: str = CONFIGS, sizes: dict[str, int] | None = None) -> str:
    """A dataset card: its YAML header lists the configurations, and `sizes` ({split: rows}) as the Hub's
    dataset_info does (what tells a stream its length)."""
    info = "".join(f"  - name: {split}\n    num_bytes: 0\n    num_examples: {n}\n"
                   for split, n in (sizes or {}).items())
    return "---\n" + configs + (f"dataset_info:\n  splits:\n{info}" if info else "") + "---\n# a dataset\n"


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def repo_dir(path: Path, train=ROWS, validation=HELD, readme: str | None = "") -> Path:
    """A dataset directory in the Hub repository layout: the card (`readme`; "": the default configuration with
    the splits' sizes, None: no card) and data/<split>-00000-of-00001.parquet."""
    _parquet(path / "data" / "train-00000-of-00001.parquet", train)
    if validation is not None:
        _parquet(path / "data" / "validation-00000-of-00001.parquet", validation)
    if readme == "":
        readme = card(sizes={"train": len(train), "validation": len(validation or [])})
    if readme is not None:
        (path / "README.md").write_text(readme)
    return path


def prepared_cache(cache: Path, repo_id: str, repo: Path, config: str | None = None) -> Path:
    """datasets' cache of `repo_id` as a load_dataset of the Hub dataset leaves it: load_dataset prepares the
    repository's files (here the directory `repo`, named as the id's dataset) into <cache>/<name>/<config>/<version>/
    <hash>/ with <name>-<split>.arrow files; a Hub load puts the same under <org>___<name>/ (the builder's repo_id
    namespace), which is the one step done by hand."""
    import datasets

    namespace, name = repo_id.split("/")
    assert repo.name == name
    scratch = cache.parent / f"{cache.name}-preparing"
    datasets.load_dataset(str(repo), config, cache_dir=str(scratch))
    target = cache / f"{namespace}___{name}"
    for prepared in (scratch / name).iterdir():  # the configuration directories
        shutil.copytree(prepared, target / prepared.name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.lock"))
    shutil.rmtree(scratch)
    return target


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache in tmp_path (datasets reads HF_DATASETS_CACHE into its config at import), online."""
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    # (datasets 5 waits 5 s as each Parquet stream closes, for its reader threads: tests open many short ones;
    # older releases have no such wait)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def offline(datasets_cache, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return datasets_cache


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pc(rows):
    """The rows as the prompt-completion format names its fields."""
    return [{"prompt": r["question"], "completion": r["answer"]} for r in rows]


QA = {"prompt": "question", "completion": "answer"}


def _ids(items):
    return [(item.input_ids, item.labels) for item in items]


def _reference(tmp_path, rows):
    return load_data(_jsonl(tmp_path / "reference.jsonl", _pc(rows)), tiny_tokenizer(), max_length=64)


# ---------------------------------------------------------------------------------------------- directories and ids


def test_a_dataset_repository_directory_loads_through_load_dataset(tmp_path):
    repo = repo_dir(tmp_path / "qa")
    data = load_data(str(repo), tiny_tokenizer(), max_length=64, fields=QA, validation_split="validation")
    assert data.format == "prompt-completion"
    assert _ids(data.train) == _ids(_reference(tmp_path, ROWS).train)
    assert _ids(data.validation) == _ids(_reference(tmp_path, HELD).train)
    assert data.train[3].where == "qa (train) row 3"
    # the same directory, another split trained on
    held = load_data(str(repo), tiny_tokenizer(), max_length=64, fields=QA, split="validation")
    assert _ids(held.train) == _ids(data.validation)


def test_a_directory_of_data_files_without_a_card_loads_too(tmp_path):
    repo = repo_dir(tmp_path / "plain", readme=None)  # datasets infers the splits from the file names
    data = load_data(str(repo), tiny_tokenizer(), max_length=64, fields=QA, validation_split="validation")
    assert (len(data.train), len(data.validation)) == (len(ROWS), len(HELD))


def test_a_saved_dataset_dict_picks_its_split(tmp_path):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(_pc(ROWS)), "test": Dataset.from_list(_pc(HELD))}).save_to_disk(saved)
    data = load_data(str(saved), tiny_tokenizer(), max_length=64, validation_split="test")
    assert _ids(data.train) == _ids(_reference(tmp_path, ROWS).train)
    assert _ids(data.validation) == _ids(_reference(tmp_path, HELD).train)


def test_a_cached_hub_dataset_loads_offline(tmp_path, offline):
    prepared_cache(offline, "qa-org/qa", repo_dir(tmp_path / "qa"))
    data = load_data("qa-org/qa", tiny_tokenizer(), max_length=64, fields=QA, validation_split="validation")
    assert _ids(data.train) == _ids(_reference(tmp_path, ROWS).train)
    assert _ids(data.validation) == _ids(_reference(tmp_path, HELD).train)
    assert data.train[0].where == "qa-org/qa (train) row 0"


def test_a_hub_cache_snapshot_loads_offline_at_its_revision(tmp_path, offline):
    from huggingface_hub import constants

    first = add_repo(Path(constants.HF_HUB_CACHE), "qa-org/snap", repo_dir(tmp_path / "v1"), repo_type="dataset")
    add_repo(Path(constants.HF_HUB_CACHE), "qa-org/snap", repo_dir(tmp_path / "v2", train=ROWS[:4]),
             repo_type="dataset")  # main moves on
    latest = load_data("qa-org/snap", tiny_tokenizer(), max_length=64, fields=QA)
    pinned = load_data(f"qa-org/snap@{first}", tiny_tokenizer(), max_length=64, fields=QA)
    assert _ids(latest.train) == _ids(_reference(tmp_path, ROWS[:4]).train)
    assert _ids(pinned.train) == _ids(_reference(tmp_path, ROWS).train)
    assert pinned.origin == f"offline, from the hub cache's snapshot {first[:12]}"


def test_configurations_are_picked_by_name(tmp_path):
    short = "- config_name: short\n  data_files:\n  - split: train\n    path: short/train-*\n"
    repo = repo_dir(tmp_path / "two", readme=card(CONFIGS + short))
    _parquet(repo / "short" / "train-00000-of-00001.parquet", ROWS[:2])
    data = load_data(str(repo), tiny_tokenizer(), max_length=64, fields=QA, config="short")
    assert _ids(data.train) == _ids(_reference(tmp_path, ROWS[:2]).train)


def test_columns_map_to_format_fields_in_local_files_too(tmp_path):
    turns = [{"conversations": [{"role": "user", "content": f"w{10 + i}"},
                                {"role": "assistant", "content": f"w{20 + i}"}], "id": i} for i in range(3)]
    mapped = load_data(_jsonl(tmp_path / "c.jsonl", turns), tiny_tokenizer(), max_length=64,
                       fields={"messages": "conversations"})
    plain = load_data([{"messages": t["conversations"]} for t in turns], tiny_tokenizer(), max_length=64)
    assert mapped.format == "chat" and _ids(mapped.train) == _ids(plain.train)
    # (without the mapping, 'conversations' is ShareGPT's field, whose turns are from/value)
    with pytest.raises(DataError, match=r"conversations\[0\]: missing field 'from'"):
        load_data(_jsonl(tmp_path / "c.jsonl", turns), tiny_tokenizer(), max_length=64)


# ---------------------------------------------------------------------------------------------- streaming


def _stream_data(repo: Path, **kw):
    return load_data(str(repo), tiny_tokenizer(), **({"max_length": 64, "fields": QA, "streaming": True, "seed": 5}
                                                     | kw))


def _batches_equal(got, expected) -> bool:
    return len(got) == len(expected) and all(
        torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        and torch.equal(a.position_ids, b.position_ids) for a, b in zip(got, expected))


def test_a_stream_packs_each_epoch_like_the_in_memory_stream(tmp_path):
    """Epoch by epoch, the streamed micro-batches are the in-memory stream's of the same items in the same order:
    every example once per epoch, batches of 3 with the epoch's last one the rest (10 = 3+3+3+1), the next epoch
    from the start in another seeded order."""
    data = _stream_data(repo_dir(tmp_path / "qa"))
    assert data.streamed and data.micro_batches_per_epoch(3) is None
    reference = _reference(tmp_path, ROWS).train
    orders = [[item for _, item in data.train.items(epoch)] for epoch in range(3)]
    for order in orders:
        assert sorted(_ids(order)) == sorted(_ids(reference))  # each example exactly once
    assert _ids(orders[0]) != _ids(orders[1])  # shuffled per epoch ...
    assert _ids(orders[1]) == _ids([item for _, item in data.train.items(1)])  # ... as a function of (seed, epoch)
    expected = [collate(batch, PAD, packed=True) for order in orders
                for batch in micro_batches(order, 3, epoch=0, seed=0, shuffle=False)]
    stream = data.batches(3, seed=5, pad_id=PAD, packed=True, position={"epoch": 0, "micro": 0})
    got = stream.take(5) + stream.take(7)
    assert _batches_equal(got, expected)
    assert [b.input_ids.shape[1] for b in got[:4]] == [sum(len(i.input_ids) for i in orders[0][k:k + 3])
                                                       for k in (0, 3, 6, 9)]
    assert stream.position == {"epoch": 2, "micro": 4, "rows": 10} and stream.progress == 3.0


def test_a_resumed_stream_continues_exactly_where_it_stopped(tmp_path):
    """With rows skipped as bad and examples dropped as too long, the position (rows read in the epoch) brings a
    new stream to the very next batch, mid-epoch and at an epoch's end."""
    rows = [dict(r) for r in ROWS]
    rows[2]["answer"] = None  # bad: skipped
    rows[6]["question"] = " ".join(["w11"] * 80)  # longer than max_length: dropped
    data = _stream_data(repo_dir(tmp_path / "qa", train=rows), skip_bad_rows=True, on_long="drop")
    whole = data.batches(3, 5, PAD, True, {"epoch": 0, "micro": 0})
    taken = whole.take(2)
    assert len(taken) == 2
    for _ in range(4):
        position = dict(whole.position)
        resumed = data.batches(3, 5, PAD, True, position)
        assert _batches_equal(resumed.take(3), whole.take(3)), position
    assert data.report.skipped_rows and data.report.dropped_long


def test_streamed_training_trains_every_example_once_per_epoch_and_resumes_exactly(tmp_path, tiny_model_dir):
    """One epoch of a streamed run trains on the tokens an in-memory epoch does; a run stopped at its checkpoint
    and resumed ends with the losses and weights of the run that went through."""
    repo = repo_dir(tmp_path / "qa")
    settings = dict(model=str(tiny_model_dir), data=str(repo), field=["prompt=question", "completion=answer"],
                    quant="none", dtype="fp32", device="cpu", rank=2, alpha=4, batch_size=2, max_length=64,
                    schedule="constant", warmup_steps=0, lr=1e-2, seed=3)
    run = lambda out, **kw: qlorakit.train(**(settings | {"output": str(tmp_path / out)} | kw),  # noqa: E731
                                           progress=False, log=lambda _: None)
    memory = run("memory", max_steps=5)  # 10 examples in batches of 2: one epoch
    streamed = run("streamed", max_steps=5, streaming=True, save_every=2)
    assert sum(r["trained_tokens"] for r in memory.metrics if "loss" in r) == \
        sum(r["trained_tokens"] for r in streamed.metrics if "loss" in r)
    assert [r["epoch"] for r in streamed.metrics if "loss" in r] == [0.2, 0.4, 0.6, 0.8, 1.0]

    run("stopped", max_steps=3, streaming=True, save_every=2)  # its checkpoint: step 2
    resumed = run("stopped", max_steps=5, streaming=True, save_every=2, resume=True)
    losses = lambda result: [r["loss"] for r in result.metrics if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(streamed)
    for name, p in streamed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name


def test_train_by_hub_ids_end_to_end_offline(tmp_path, tiny_model_dir):
    """`qlorakit train --model org/name --data org/ds` with HF_HUB_OFFLINE=1 and both caches in tmp: the model from
    the hub cache, the dataset from datasets' cache; streamed too."""
    hub, datasets_dir = tmp_path / "hub", tmp_path / "datasets"
    add_repo(hub, "tiny-org/tiny-llama", tiny_model_dir)
    prepared_cache(datasets_dir, "qa-org/qa", repo_dir(tmp_path / "qa"))
    env = os.environ | {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(datasets_dir), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for extra in ([], ["--streaming"]):
        out = tmp_path / f"run{len(extra)}"
        done = subprocess.run(
            [sys.executable, "-m", "qlorakit.cli", "train", "--model", "tiny-org/tiny-llama", "--data", "qa-org/qa",
             "--field", "prompt=question", "--field", "completion=answer", "--validation-split", "validation",
             "--max-steps", "2", "--dtype", "fp32", "--device", "cpu", "--rank", "2", "--alpha", "4",
             "--batch-size", "2", "--output", str(out), *extra], env=env, capture_output=True, text=True,
            timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "adapter_model.safetensors").is_file()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2]
        assert any("eval_loss" in r for r in records)
        assert "data: qa-org/qa (prompt-completion)" in done.stdout + done.stderr
    # eval reads a Hub dataset's split with the same column mapping
    done = subprocess.run(
        [sys.executable, "-m", "qlorakit.cli", "eval", "--adapter", str(out), "--data", "qa-org/qa", "--split",
         "validation", "--field", "prompt=question", "--field", "completion=answer", "--dtype", "fp32", "--device",
         "cpu", "--max-new-tokens", "2", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert result["examples"] == len(HELD) and result["loss"] > 0


# ---------------------------------------------------------------------------------------------- errors


def _two_configs(t: Path) -> Path:
    short = "configs:\n- config_name: short\n  data_files:\n  - split: train\n    path: data/train-*\n"
    return repo_dir(t / "two", readme=card(CONFIGS.replace("configs:\n", short).replace("default", "long")))


def _read(source, **kw):
    return read_data(source, **({"fields": QA} | kw))


def _offline(request):
    request.getfixturevalue("offline")


def _cached(t: Path, request) -> str:
    _offline(request)
    import datasets

    prepared_cache(Path(datasets.config.HF_DATASETS_CACHE), "qa-org/qa", repo_dir(t / "qa"))
    return "qa-org/qa"


# (case, as docs/errors.md names it; how to provoke it (tmp_path, request); what the message must say)
CASES = [
    ("mapped field the format does not read",
     lambda t, r: read_data(str(_jsonl(t / "mixed.jsonl", [{"messages": [{"role": "user", "content": "w1"},
                                                                        {"role": "assistant", "content": "w2"}]}
                                                          | row for row in ROWS])), fields=QA),
     r"mixed\.jsonl: --field prompt=question maps a field the chat format does not read \(it reads messages, "
     r"conversations\); name the format you mean with --format, or drop the mapping"),
    ("unknown split", lambda t, r: _read(str(repo_dir(t / "qa")), split="tain"),
     r"qa: no split 'tain' \(--split tain\); its splits are train, validation"),
    ("unknown validation split", lambda t, r: _read(str(repo_dir(t / "qa", validation=None, readme=None)),
                                                    validation_split="validation"),
     r"qa: no split 'validation' \(--validation-split validation\); its splits are train$"),
    ("unknown split of a cached Hub dataset, offline", lambda t, r: _read(_cached(t, r), split="test"),
     r"^qa-org/qa: no split 'test' \(--split test\); its splits are train, validation"),
    ("unknown configuration", lambda t, r: _read(str(_two_configs(t)), config="medium"),
     r"two: no configuration 'medium' \(--data-config medium\); its configurations are short, long"),
    ("several configurations and none named", lambda t, r: _read(str(_two_configs(t))),
     r"two has 2 configurations: short, long; choose one with --data-config NAME"),
    ("unknown configuration of a cached Hub dataset, offline",
     lambda t, r: _read(_cached(t, r), config="medium"),
     r"^qa-org/qa: no configuration 'medium' \(--data-config medium\); its configurations are default$"),
    ("mapped column the dataset lacks", lambda t, r: _read(str(repo_dir(t / "qa")), fields={"prompt": "query"}),
     r"qa \(train\): no column 'query' for --field prompt=query; the columns are 'answer', 'question'"),
    ("mapped column a row lacks", lambda t, r: _read(str(_jsonl(t / "d.jsonl", [{"q": "w1"}])),
                                                     fields={"text": "body"}),
     r"d\.jsonl line 1: no column 'body' for --field text=body; the columns are 'q'"),
    ("--field naming no format's field", lambda t, r: _read(str(repo_dir(t / "qa")), fields={"answer": "answer"}),
     r"--field answer=answer: 'answer' is not a field of any data format; TARGET is one of messages, "
     r"conversations, instruction, input, output, prompt, completion, text"),
    ("Hub dataset not in the cache, offline", lambda t, r: (_offline(r), _read("qa-org/missing")),
     r"^qa-org/missing: not in the datasets cache \(.+\) nor in the hub cache \(.+\), and HF_HUB_OFFLINE=1 "
     r"\(offline mode\) forbids downloading it: fetch it once with network access \(run again without "
     r"HF_HUB_OFFLINE, or `hf download --repo-type dataset qa-org/missing`\), or point HF_DATASETS_CACHE / "
     r"HF_HUB_CACHE / HF_HOME at a cache that holds it. No local path of that name exists either"),
    ("Hub dataset revision not in the hub cache, offline", lambda t, r: _read(_cached(t, r) + "@v2"),
     r"^qa-org/qa@v2: offline \(HF_HUB_OFFLINE=1\) a revision is read from the hub cache's snapshot of it \(.+\), "
     r"which holds none — datasets' own cache does not record revisions: fetch it once .*`hf download "
     r"--repo-type dataset qa-org/qa --revision v2`.* or drop @v2 to read the copy datasets has cached"),
    ("directory without data files", lambda t, r: (t / "empty").mkdir() or _read(str(t / "empty")),
     r"empty: no data files that datasets reads .* and not a dataset saved with save_to_disk"),
    ("--split of a single file", lambda t, r: _read(str(_jsonl(t / "d.jsonl", _pc(ROWS))), fields={},
                                                    split="test"),
     r"--split test: .*d\.jsonl is a single file, which has no splits or configurations; --split picks a split "
     r"of a dataset directory or Hub dataset: leave it out"),
    ("--validation-split of a single file",
     lambda t, r: _read(str(_jsonl(t / "d.jsonl", _pc(ROWS))), fields={}, validation_split="test"),
     r"--validation-split test: .*d\.jsonl is not a dataset with splits; name validation data with "
     r"--validation-data FILE, or hold out a fraction with --validation"),
    ("--streaming of a single file", lambda t, r: _read(str(_jsonl(t / "d.jsonl", _pc(ROWS))), fields={},
                                                        streaming=True),
     r"--streaming: .*d\.jsonl is a single file, which qlorakit reads whole .*; to stream it, put it in a "
     r"directory of its own and pass the directory"),
    ("--streaming with a validation fraction",
     lambda t, r: _read(str(repo_dir(t / "qa")), streaming=True, validation=0.2),
     r"validation=0\.2 holds out a random fraction of the examples, which needs all of them read first; with "
     r"--streaming name the validation data instead: --validation-split NAME"),
    ("--streaming without --max-steps",
     lambda t, r: qlorakit.train(data=str(repo_dir(t / "qa")), streaming=True, output=str(t / "run")),
     r"--streaming reads the data as training needs it, so the number of examples .* is known only once an epoch "
     r"has been read: give the run's length with --max-steps N"),
    ("--streaming with grad_accum beyond the data",
     lambda t, r: _stream_data(repo_dir(t / "qa")).batches(4, 5, PAD, True, {"epoch": 0, "micro": 0},
                                                          grad_accum=4).take(4),
     r"grad_accum=4 is more micro-batches than the data holds \(one epoch of the stream gave 3\)"),
    ("streamed split without anything to train on",
     lambda t, r: _stream_data(repo_dir(t / "qa"), max_length=2).batches(
         2, 5, PAD, True, {"epoch": 0, "micro": 0}).take(1),
     r"qa \(train\): nothing to train on — all 10 examples were longer than max_length"),
    ("resume of a streamed run without --streaming",
     lambda t, r: load_data(_pc(ROWS), tiny_tokenizer(), max_length=64).batches(
         2, 0, PAD, True, {"epoch": 0, "micro": 3, "rows": 6}),
     r"the checkpoint's data position is a streamed run's \(--streaming\), and this run reads the data whole: "
     r"resume with --streaming"),
]


@pytest.mark.parametrize("case,provoke,message", CASES, ids=[c[0] for c in CASES])
def test_bad_hub_data_is_a_clear_error(tmp_path, request, case, provoke, message):
    with pytest.raises(QLoraKitError) as e:
        provoke(tmp_path, request)
    assert re.search(message, str(e.value)), str(e.value)


def test_data_errors_come_before_the_model_loads(tmp_path):
    """A missing column of a Hub dataset is refused with a model that does not exist: the data was read first."""
    with pytest.raises(DataError, match="no column 'query'"):
        qlorakit.train(model=str(tmp_path / "no-such-model"), data=str(repo_dir(tmp_path / "qa")),
                       field=["prompt=query"], output=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="single file"):
        qlorakit.train(model=str(tmp_path / "no-such-model"), data=str(_jsonl(tmp_path / "d.jsonl", _pc(ROWS))),
                       split="test", output=str(tmp_path / "run2"))


def test_every_case_is_documented():
    docs = DOCS.read_text()
    section = docs[docs.index("## Hub datasets"):]
    for case, _, _ in CASES:
        assert f"| {case} |" in section, case


def test_a_resume_compares_the_column_mapping_not_how_it_was_written(tmp_path):
    from qlorakit.checkpoint import check_resumable
    from qlorakit.config import TrainConfig
    from qlorakit.errors import TrainingError

    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    started = TrainConfig(data="qa-org/qa", field=["prompt=question", "completion=answer"])
    (run / "config.json").write_text(json.dumps(started.to_dict()))
    for same in ({"completion": "answer", "prompt": "question"}, ["completion=answer", "prompt = question"]):
        check_resumable(run, TrainConfig(data="qa-org/qa", field=same))
    with pytest.raises(TrainingError, match=r"--resume with field=\['prompt=query'\], but the run was started with "
                                            r"field=\['prompt=question', 'completion=answer'\]"):
        check_resumable(run, TrainConfig(data="qa-org/qa", field=["prompt=query"]))
