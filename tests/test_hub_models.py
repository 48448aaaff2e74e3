"""Models by Hugging Face Hub id ("org/name[@revision]"), never touching the network.

The tests build the Hub cache layout from a tiny model (tests/hub_cache.py) and load, train, chat, eval and merge by
id with HF_HUB_OFFLINE=1; the Hub's refusals (gated, unknown id, unknown revision, a refused token, the Hub failing)
come from a stand-in Hub on 127.0.0.1 answering as huggingface.co does, through huggingface_hub's own client; no
network is sockets refused. huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into its constants at import, so
in this process the constants are set, and subprocesses get the variables. Every error case is in docs/errors.md."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
import torch

import qlorakit
from conftest import save_tiny_model
from hub_cache import LFS_SUFFIXES, add_repo, blob_name, commit_of, git_blob_id, read_files, repo_folder
from qlorakit import ConfigError, QLoraKitError, SourceError
from qlorakit.adapters import adapter_base, read_adapter_info, save_adapter
from qlorakit.cli import main
from qlorakit.config import TrainConfig
from qlorakit.hub import parse_hub_id

REPO = "tiny-org/tiny-llama"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
CPU = dict(quant="none", dtype="fp32", device="cpu")


def _use_cache(monkeypatch, cache: Path, offline: bool = True) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    """A Hub cache holding the tiny model as REPO (refs/main -> its commit) and a repository whose only weights are
    a pickle."""
    cache = tmp_path_factory.mktemp("hf-hub-cache")
    commit = add_repo(cache, REPO, tiny_model_dir)
    add_repo(cache, "pickle-org/only-bin", {"config.json": (tiny_model_dir / "config.json").read_bytes(),
                                            "pytorch_model.bin": b"\x80\x04pickled"})
    return SimpleNamespace(cache=cache, commit=commit)


@pytest.fixture
def offline(hub, monkeypatch):
    _use_cache(monkeypatch, hub.cache)
    return hub


@pytest.fixture
def no_network(hub, monkeypatch):
    """Online mode with every host lookup and connection refused at once: a machine without network."""
    from huggingface_hub import close_session

    def refuse(*args, **kwargs):
        raise OSError("tests reach no network")

    _use_cache(monkeypatch, hub.cache, offline=False)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    close_session()
    yield hub
    close_session()


# How the stand-in Hub answers GET /api/models/<repo>/revision/<revision> (huggingface.co's status and headers).
HUB_ANSWERS = {
    "gated-org/model": (401, {"X-Error-Code": "GatedRepo",
                              "X-Error-Message": "Access to model gated-org/model is restricted."}),
    "nobody/nothing": (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
    f"{REPO}@no-such-branch": (404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}),
    "token-org/model": (401, {"X-Error-Message": "Invalid credentials in Authorization header"}),
    "down-org/model": (503, {"X-Error-Message": "Hub under maintenance"}),
}


class StandInHub(http.server.BaseHTTPRequestHandler):
    """huggingface.co's answers to what snapshot_download asks: a repository's commit (api/models/<id>/revision/
    <rev>), its file listing (api/models/<id>/tree/<commit>), each file (<id>/resolve/<commit>/<path>, with the
    commit and ETag headers), and HUB_ANSWERS' refusals. `repos`: {repo id: {path: bytes}}; `asked`: the files
    downloaded."""

    repos: dict[str, dict[str, bytes]] = {}
    asked: list[str] = []

    def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        path = unquote(self.path.split("?")[0])
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/(.+?)/?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([0-9a-f]{40})/(.+)", path)
        repo = (api or resolve) and (api or resolve)[1]
        if api and api[2] == "revision" and f"{repo}@{api[3]}" in HUB_ANSWERS:
            repo = f"{repo}@{api[3]}"
        if repo in HUB_ANSWERS:
            status, headers = HUB_ANSWERS[repo]
            return self._send(status, headers, json.dumps({"error": headers.get("X-Error-Message", "")}).encode())
        files = self.repos.get(repo)
        if files is None:
            return self._send(404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}')
        commit = commit_of(files)
        if api and api[2] == "revision":
            if api[3] not in ("main", commit):
                return self._send(404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}')
            info = {"id": repo, "sha": commit, "siblings": [{"rfilename": name} for name in sorted(files)]}
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode())
        if api:  # the tree listing, LFS files with their SHA-256
            tree = [{"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                    | ({"lfs": {"oid": blob_name(name, data), "size": len(data), "pointerSize": 134}}
                       if name.endswith(LFS_SUFFIXES) else {})
                    for name, data in sorted(files.items())]
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(tree).encode())
        data = files.get(resolve[3])
        if data is None or resolve[2] != commit:
            return self._send(404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "Entry not found"}')
        if self.command == "GET":
            self.asked.append(resolve[3])
        self._send(200, {"X-Repo-Commit": commit, "ETag": f'"{blob_name(resolve[3], data)}"'}, data)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_hub(tmp_path, monkeypatch):
    """A Hub on 127.0.0.1 (StandInHub), with an empty cache at tmp_path/"cache": huggingface_hub's client, requests
    and error handling run as against huggingface.co."""
    from huggingface_hub import close_session, constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _use_cache(monkeypatch, tmp_path / "cache", offline=False)
    endpoint = f"http://127.0.0.1:{server.server_port}"
    # what HF_ENDPOINT sets when huggingface_hub is imported: the API's address, and the files'
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    lookup = socket.getaddrinfo

    def local_only(host, *args, **kwargs):  # a request that missed the stand-in fails here, never leaves the machine
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"tests reach no network (asked for {host})")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setattr(StandInHub, "repos", {})
    monkeypatch.setattr(StandInHub, "asked", [])
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    close_session()  # a client made before would keep its settings
    yield StandInHub
    close_session()
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------- ids


@pytest.mark.parametrize("text, parsed", [
    ("org/name", ("org/name", None)),
    ("Qwen/Qwen2.5-0.5B-Instruct", ("Qwen/Qwen2.5-0.5B-Instruct", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("gpt2", None),  # a bare word is never an id: the namespace is required
    ("org/name@", None), ("a/b/c", None), ("/abs/path", None), ("./dir/x", None), ("org/na me", None),
    ("org/name@a b", None), ("org/x--y", None),
])
def test_parse_hub_id(text, parsed):
    assert parse_hub_id(text) == parsed


# ---------------------------------------------------------------------------------------------- loading


def _same_weights(model, reference) -> bool:
    expected = reference.state_dict()
    got = model.state_dict()
    return got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_load_by_hub_id_reads_the_cached_snapshot(offline, tiny_model_dir):
    local, _ = qlorakit.load(tiny_model_dir, **CPU)
    assert local.qlorakit_hub is None
    snapshot = repo_folder(offline.cache, REPO) / "snapshots" / offline.commit
    for source, revision in [(REPO, None), (f"{REPO}@{offline.commit}", None), (REPO, offline.commit),
                             (f"{REPO}@main", "main")]:
        model, tokenizer = qlorakit.load(source, revision=revision, **CPU)
        hub = model.qlorakit_hub
        assert (hub.repo_id, hub.commit, hub.directory) == (REPO, offline.commit, snapshot), source
        assert _same_weights(model, local), source
        assert tokenizer("w5 w6")["input_ids"] == [5, 6]


def test_a_local_path_wins_over_a_hub_id(offline, tmp_path, monkeypatch, tiny_model_dir):
    save_tiny_model(tmp_path / REPO, seed=1)  # ./tiny-org/tiny-llama, other weights than the cached REPO
    monkeypatch.chdir(tmp_path)
    model, _ = qlorakit.load(REPO, **CPU)
    assert model.qlorakit_hub is None
    assert _same_weights(model, qlorakit.load(tmp_path / REPO, **CPU)[0])
    assert not _same_weights(model, qlorakit.load(tiny_model_dir, **CPU)[0])


def _layout(cache: Path) -> dict[str, str]:
    """A cache's repository folders: {relative path: what a symlink points at, or the file's text for refs}."""
    return {p.relative_to(cache).as_posix(): os.readlink(p) if p.is_symlink() else p.read_text()
            for p in cache.rglob("*") if p.is_symlink() or (p.is_file() and "/refs/" in p.as_posix())}


def test_a_hub_model_downloads_into_the_hugging_face_cache_without_pickles(stand_in_hub, tmp_path, monkeypatch,
                                                                          tiny_model_dir):
    model_files = read_files(tiny_model_dir)  # config, generation config, safetensors, tokenizer files
    others = {"pytorch_model.bin": b"\x80\x04pickle", "training_args.bin": b"\x80\x04", "flax_model.msgpack": b"x",
              "model.onnx": b"x", "onnx/model.safetensors": b"x", "original/consolidated.00.pth": b"x",
              "README.md": b"---\nlicense: apache-2.0\n---\n# tiny", ".gitattributes": b"*.bin filter=lfs\n"}
    stand_in_hub.repos[REPO] = model_files | others
    commit = commit_of(model_files | others)

    model, _ = qlorakit.load(REPO, **CPU)
    assert model.qlorakit_hub.commit == commit
    assert sorted(stand_in_hub.asked) == sorted([*model_files, "README.md"])  # never a pickle, subfolder or ONNX
    # huggingface_hub wrote the layout tests/hub_cache.py builds, which the offline tests stand on
    built = tmp_path / "built"
    add_repo(built, REPO, {name: (model_files | others)[name] for name in stand_in_hub.asked}, commit=commit)
    downloaded = _layout(tmp_path / "cache")
    assert {k: v for k, v in downloaded.items() if "/snapshots/" in k or "/refs/" in k} == _layout(built)

    qlorakit.load(REPO, **CPU)  # online again: the cached files are not downloaded again
    assert len(stand_in_hub.asked) == len(model_files) + 1
    _use_cache(monkeypatch, tmp_path / "cache")  # and offline, the download is what loads
    assert qlorakit.load(REPO, **CPU)[0].qlorakit_hub.commit == commit


def test_a_cached_model_loads_without_network_and_without_offline_mode(no_network):
    model, _ = qlorakit.load(REPO, **CPU)
    assert model.qlorakit_hub.commit == no_network.commit


# ---------------------------------------------------------------------------------------------- adapters


def _hub_adapter(out: Path, source: str = REPO) -> Path:
    model, _ = qlorakit.load(source, **CPU)
    model = qlorakit.add_lora(model, rank=2, alpha=4)
    return save_adapter(model, out, TrainConfig(model=source, quant="none", dtype="fp32"),
                        qlorakit.precision_of(model))


def test_an_adapter_records_the_id_and_commit_and_merge_finds_the_base_again(offline, tmp_path):
    adapter = _hub_adapter(tmp_path / "adapter", source=f"{REPO}@main")
    record = json.loads((adapter / "qlorakit.json").read_text())
    peft = json.loads((adapter / "adapter_config.json").read_text())
    assert (record["base_model"], record["base_revision"]) == (REPO, offline.commit)  # the id, without "@main"
    assert (peft["base_model_name_or_path"], peft["revision"]) == (REPO, offline.commit)  # PEFT's readers too
    assert adapter_base(read_adapter_info(adapter), adapter) == f"{REPO}@{offline.commit}"
    merged = qlorakit.merge(adapter, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))


def test_an_adapter_on_a_local_base_records_no_revision(tmp_path, tiny_model_dir):
    model = qlorakit.add_lora(qlorakit.load(tiny_model_dir, **CPU)[0], rank=2, alpha=4)
    adapter = save_adapter(model, tmp_path / "adapter", TrainConfig(model=str(tiny_model_dir)),
                           qlorakit.precision_of(model))
    record = json.loads((adapter / "qlorakit.json").read_text())
    assert (record["base_model"], record["base_revision"]) == (str(tiny_model_dir), None)
    assert adapter_base(read_adapter_info(adapter), adapter) == str(tiny_model_dir)


def test_a_local_base_named_relatively_is_recorded_absolutely(offline, tmp_path, tiny_model_dir, monkeypatch):
    """A local base given as a relative path that reads like a Hub id ("tiny-org/tiny-llama" under the working
    directory) is recorded as its absolute path: from another directory chat/eval/merge must find that directory,
    not the Hub model of the same spelling."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / REPO)
    monkeypatch.chdir(tmp_path)
    model = qlorakit.add_lora(qlorakit.load(REPO, **CPU)[0], rank=2, alpha=4)
    assert getattr(model, "qlorakit_hub", None) is None  # the local directory won
    adapter = save_adapter(model, tmp_path / "adapter", TrainConfig(model=REPO), qlorakit.precision_of(model))
    monkeypatch.chdir(tmp_path / "adapter")
    assert adapter_base(read_adapter_info(adapter), adapter) == str((tmp_path / REPO).resolve())


def test_a_peft_adapter_naming_a_hub_base_finds_it(offline, tmp_path, capsys):
    """An adapter trained elsewhere (no qlorakit.json) whose base_model_name_or_path is a Hub id: chat loads that
    base from the cache (before, it was refused as 'not a local path')."""
    model = qlorakit.add_lora(qlorakit.load(REPO, **CPU)[0], rank=2, alpha=4)
    model.peft_config["default"].base_model_name_or_path = REPO
    model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    info = read_adapter_info(tmp_path / "peft")
    assert adapter_base(info, tmp_path / "peft") == REPO
    assert adapter_base(info | {"peft": info["peft"] | {"revision": offline.commit}}, "x") == f"{REPO}@{offline.commit}"
    assert main(["chat", "--adapter", str(tmp_path / "peft"), "--quant", "none", "--dtype", "fp32", "--device",
                 "cpu", "--prompt", "w5 w6", "--max-new-tokens", "2"]) == 0, capsys.readouterr().err


def test_train_then_chat_and_eval_by_hub_id_offline(tmp_path, tiny_model_dir, monkeypatch):
    """`qlorakit train --model org/name` with HF_HUB_OFFLINE=1 records the id and commit; after the branch moves
    to a commit whose model has other shapes, chat and eval still load the commit the adapter was trained on."""
    cache = tmp_path / "cache"
    commit = add_repo(cache, REPO, tiny_model_dir)
    _use_cache(monkeypatch, cache)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"w{10 + i} w{50 + i % 5}", "output": "w100 w101"}) + "\n"
                            for i in range(8)))
    env = os.environ | {"HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "qlorakit.cli", "train", "--model", REPO, "--data", str(data), "--max-steps", "2",
         "--dtype", "fp32", "--device", "cpu", "--rank", "2", "--alpha", "4", "--batch-size", "4", "--output",
         str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    record = json.loads((out / "qlorakit.json").read_text())
    assert (record["base_model"], record["base_revision"]) == (REPO, commit)

    moved = add_repo(cache, REPO, save_tiny_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64))
    assert moved != commit and (repo_folder(cache, REPO) / "refs" / "main").read_text() == moved
    # (the adapter does not fit the model main points at now: only the commit it recorded loads it)
    script = "import json, sys\nfrom qlorakit.cli import main\nsys.exit(max(main(a) for a in json.loads(sys.argv[1])))"
    commands = [["eval", "--adapter", str(out), "--data", str(data), "--dtype", "fp32", "--device", "cpu",
                 "--max-new-tokens", "2", "--json"],
                ["chat", "--adapter", str(out), "--dtype", "fp32", "--device", "cpu", "--prompt", "w10 w50",
                 "--max-new-tokens", "2"]]
    run = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    assert result["examples"] == 8 and result["loss"] > 0


def test_a_resumed_run_keeps_the_commit_it_started_from(tmp_path, tiny_model_dir, monkeypatch):
    """--resume of a run on a Hub base loads the commit the run started from (config.json's base_revision), not
    the one the branch points at by then: the checkpoint's adapter belongs on the weights it was trained on."""
    cache = tmp_path / "cache"
    commit = add_repo(cache, REPO, tiny_model_dir)
    _use_cache(monkeypatch, cache)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"w{10 + i} w{50 + i % 5}", "output": "w100 w101"}) + "\n"
                            for i in range(8)))
    run = dict(model=REPO, data=str(data), output=str(tmp_path / "run"), rank=2, alpha=4, batch_size=4,
               save_every=1, progress=False, log=lambda _: None, **CPU)
    qlorakit.train(max_steps=2, **run)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["base_revision"] == commit
    add_repo(cache, REPO, save_tiny_model(tmp_path / "narrow", hidden_size=32, intermediate_size=64))
    result = qlorakit.train(max_steps=3, resume=True, **run)
    assert result.steps == 3
    record = json.loads((tmp_path / "run" / "qlorakit.json").read_text())
    assert (record["base_model"], record["base_revision"]) == (REPO, commit)


def test_a_resume_refuses_a_recorded_base_revision_that_is_not_a_commit(tmp_path):
    from qlorakit.checkpoint import resumed_source
    from qlorakit.errors import TrainingError

    assert resumed_source(tmp_path, {"base_revision": None}, REPO) == (REPO, None)
    assert resumed_source(tmp_path, {"base_revision": "abc"}, REPO, log=lambda _: None) == (REPO, "abc")
    with pytest.raises(TrainingError, match=r"config\.json: 'base_revision' is 7, not the commit of the Hub model "
                                            r"'tiny-org/tiny-llama'; restore the file, or start a new run"):
        resumed_source(tmp_path, {"base_revision": 7}, REPO)


def test_a_partly_cached_or_copied_model_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    """A shard the index names, or the tokenizer, missing from a Hub snapshot or a local copy: an error naming the
    file and what to do, not a traceback from transformers."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            (sharded / name).write_bytes((tiny_model_dir / name).read_bytes())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    no_tokenizer = {p.name: p.read_bytes() for p in sharded.iterdir() if not p.name.startswith("tokenizer")
                    and p.name != "special_tokens_map.json"}
    missing_shard = {p.name: p.read_bytes() for p in sharded.iterdir() if p != shards[-1]}
    cache = tmp_path / "cache"
    add_repo(cache, "part-org/no-shard", missing_shard)
    add_repo(cache, "part-org/no-tokenizer", no_tokenizer)
    _use_cache(monkeypatch, cache)
    with pytest.raises(SourceError, match=rf"{shards[-1].name} is missing, which the model's files name; the Hugging "
                                          r"Face cache holds only part of model 'part-org/no-shard'; fetch it again "
                                          r"with network access \(`hf download part-org/no-shard`"):
        qlorakit.load("part-org/no-shard", **CPU)
    with pytest.raises(SourceError, match=r"cannot load the tokenizer \(.+\); the Hugging Face cache holds only part "
                                          r"of model 'part-org/no-tokenizer'"):
        qlorakit.load("part-org/no-tokenizer", **CPU)
    shards[-1].unlink()
    with pytest.raises(SourceError, match=rf"sharded: {shards[-1].name} is missing, which the model's files name; "
                                          r"the model directory is incomplete: copy or save .*sharded again"):
        qlorakit.load(str(sharded), **CPU)


# ---------------------------------------------------------------------------------------------- errors

# case (as docs/errors.md names it), where it happens (a fixture), what provokes it, the message
CASES = [
    ("Hub model not in the cache, offline", "offline", lambda: qlorakit.load("tiny-org/not-cached", **CPU),
     r"model 'tiny-org/not-cached' is not \(or only partly\) in the Hugging Face cache \(.+\), and HF_HUB_OFFLINE=1 "
     r"\(offline mode\) forbids downloading it: fetch it once with network access .*`hf download "
     r"tiny-org/not-cached`"),
    ("Hub revision not in the cache, offline", "offline", lambda: qlorakit.load(f"{REPO}@v9", **CPU),
     rf"model '{REPO}' at revision 'v9' is not \(or only partly\) in the Hugging Face cache .*HF_HUB_OFFLINE=1"),
    ("Hub model with pickled weights only", "offline", lambda: qlorakit.load("pickle-org/only-bin", **CPU),
     r"model 'pickle-org/only-bin' \(commit [0-9a-f]{40}\) has its weights only as pytorch_model\.bin: qlorakit "
     r"loads safetensors only"),
    ("neither a path nor a Hub id", "offline", lambda: qlorakit.load("no-such-model", **CPU),
     r"model source 'no-such-model' does not exist\. Give a local Hugging Face model directory, a \.gguf file, a "
     r"Hugging Face Hub id such as Qwen/Qwen2\.5-0\.5B-Instruct \(org/name, or org/name@revision\)"),
    ("missing .gguf file that reads like an id", "offline", lambda: qlorakit.load("models/mine.gguf", **CPU),
     r"model source 'models/mine\.gguf' does not exist\. Give a local Hugging Face model directory, a \.gguf file"),
    ("revision given twice", "offline", lambda: qlorakit.load(f"{REPO}@main", revision="v2", **CPU),
     rf"model '{REPO}@main' names revision 'main' and revision='v2' another: give the revision once"),
    ("revision of a local source", "offline", lambda: qlorakit.load(qlorakit.DEFAULT_MODEL, revision="v2", **CPU),
     r"revision='v2' applies to Hub ids \(org/name\); 'smollm2-135m-instruct' is a local source"),
    ("gated Hub model", "stand_in_hub", lambda: qlorakit.load("gated-org/model", **CPU),
     r"model 'gated-org/model' is gated: its authors grant access on its page\. Open http://127\.0\.0\.1:\d+/"
     r"gated-org/model, accept its terms there .*set HF_TOKEN .* or run `hf auth login`"),
    ("unknown Hub id, or a private one", "stand_in_hub", lambda: qlorakit.load("nobody/nothing", **CPU),
     r"no model 'nobody/nothing' on the Hugging Face Hub that you can see, and no local path of that name: check "
     r"the id at http://127\.0\.0\.1:\d+/nobody/nothing; if it is private, set HF_TOKEN"),
    ("unknown Hub revision", "stand_in_hub", lambda: qlorakit.load(f"{REPO}@no-such-branch", **CPU),
     rf"model '{REPO}' has no revision 'no-such-branch' \(a branch, tag or commit hash\)"),
    ("access token refused", "stand_in_hub", lambda: qlorakit.load("token-org/model", **CPU),
     r"the Hugging Face Hub refused your access token for model 'token-org/model' \(HTTP 401\): the token in "
     r"HF_TOKEN or from `hf auth login` is invalid or expired"),
    ("the Hub failing", "stand_in_hub", lambda: qlorakit.load("down-org/model", **CPU),
     r"the Hugging Face Hub failed to give model 'down-org/model' \(HTTP 503: 'Hub under maintenance'\); try "
     r"again later"),
    ("no network", "no_network", lambda: qlorakit.load("tiny-org/not-cached", **CPU),
     r"cannot reach the Hugging Face Hub at https://huggingface\.co to fetch model 'tiny-org/not-cached' "
     r"\(ConnectError: .*\), and it is not complete in the local cache: check the network connection"),
    ("adapter base neither a path nor a Hub id", "offline",
     lambda: adapter_base({"peft": {"base_model_name_or_path": "mystery"}, "qlorakit": {}}, "adapter"),
     r"adapter: the adapter names its base model as 'mystery', which is neither a local path nor a Hugging Face "
     r"Hub id \(org/name\); pass the base model with --model"),
    ("adapter base_revision that is not a commit", "offline",
     lambda: adapter_base({"peft": {}, "qlorakit": {"base_model": REPO, "base_revision": 7}}, "adapter"),
     r"adapter/qlorakit\.json: 'base_revision' is 7, not the commit of a Hub base model"),
]


# the cases that are ConfigError (a setting or a file of the user's); the others are SourceError
SETTINGS = ("revision given twice", "revision of a local source", "adapter base neither a path nor a Hub id",
            "adapter base_revision that is not a commit")


@pytest.mark.parametrize("case, where, provoke, message", CASES, ids=[c[0] for c in CASES])
def test_hub_errors_are_clear(case, where, provoke, message, request):
    request.getfixturevalue(where)
    with pytest.raises(QLoraKitError) as e:
        provoke()
    assert re.search(message, str(e.value)), str(e.value)
    assert type(e.value) is (ConfigError if case in SETTINGS else SourceError)


def test_every_case_is_documented():
    docs = DOCS.read_text().split("## Hub models", 1)
    assert len(docs) == 2, "docs/errors.md has no '## Hub models' section"
    missing = [case for case, *_ in CASES if f"| {case} |" not in docs[1]]
    assert not missing, missing
