"""The Hugging Face Hub: ids ("org/name[@revision]") and model snapshots, through huggingface_hub and its cache.

The network is touched only here (and by `datasets` for Hub datasets), only for what the user names by id. Files go
to the standard Hugging Face cache (HF_HUB_CACHE / HF_HOME), so every other tool shares them; HF_TOKEN or
`hf auth login` authenticates, HF_HUB_OFFLINE=1 reads the cache only. `hub_error` is the one place that turns what
huggingface_hub raises into qlorakit's messages, for models and datasets alike.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, SourceError, show


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) for "org/name" or "org/name@revision"; None when `text` is not of that form.

    The namespace is required: a bare word ("gpt2") is never taken for an id. Callers check first whether `text`
    names an existing local path, which always wins.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(text, str):
        return None
    repo_id, at, revision = text.partition("@")
    if at and (not revision or revision != revision.strip() or any(c.isspace() for c in revision)):
        return None
    if repo_id.count("/") != 1:
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, (revision if at else None)


# ---------------------------------------------------------------------------------------------- model snapshots

# What a model snapshot downloads: the top-level files transformers reads to build a model and its tokenizer, and
# the model card (README.md: the license and metadata an adapter's own card carries on).
MODEL_FILES = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "chat_template.jinja", "chat_template.json",
    "README.md",
)
# Weights qlorakit never loads (pickles run code when loaded; the others are other frameworks' formats), and every
# subfolder (ONNX exports, original checkpoints, variants): never downloaded, whatever MODEL_FILES matches.
NOT_LOADED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data")
_SUBFOLDERS = "*/*"


@dataclass(frozen=True)
class HubSnapshot:
    """A model snapshot in the Hugging Face cache: the id it was asked for, the commit it resolved to, and the
    directory (…/models--org--name/snapshots/<commit>) transformers loads."""

    repo_id: str
    commit: str
    directory: Path


def model_snapshot(repo_id: str, revision: str | None = None, *, trust_remote_code: bool = False) -> HubSnapshot:
    """Download (or find in the cache) the snapshot of the Hub model `repo_id` at `revision` (default: its default
    branch): safetensors weights, configs, tokenizer files, chat template and model card only (MODEL_FILES), plus
    the model's own Python files when `trust_remote_code` asks to run them. huggingface_hub does the work: its cache, its
    progress bar, HF_TOKEN or the `hf auth login` token, HF_HUB_OFFLINE. Raises SourceError (hub_error) when the
    model cannot be had, or when it has no safetensors weights."""
    from huggingface_hub import constants, snapshot_download

    from . import __version__

    try:
        directory = Path(snapshot_download(
            repo_id, revision=revision, library_name="qlorakit", library_version=__version__,
            allow_patterns=list(MODEL_FILES) + (["*.py"] if trust_remote_code else []),
            ignore_patterns=[*NOT_LOADED, _SUBFOLDERS],
            # (said outright: huggingface_hub before 2.0 asks the Hub, offline mode or not, for a commit hash's
            # file listing, and fails where the cache holds the snapshot)
            local_files_only=constants.HF_HUB_OFFLINE,
        ))
    except hub_exceptions() as e:
        raise hub_error(e, repo_id, "model", revision) from e
    snapshot = HubSnapshot(repo_id, directory.name, directory)
    if not any(directory.glob("*.safetensors")):
        raise _no_safetensors(snapshot)
    return snapshot


def _no_safetensors(snapshot: HubSnapshot) -> SourceError:
    """The refusal of a Hub model without safetensors weights, naming the weight files it has instead: those the
    Hub lists, or (offline) those in the cached snapshot."""
    from huggingface_hub import HfApi

    try:  # (one request, no retries: list_repo_files would retry for half a minute without a network)
        files = [s.rfilename for s in HfApi().model_info(snapshot.repo_id, revision=snapshot.commit).siblings or ()]
    except hub_exceptions():  # offline, or the Hub out of reach: what the cache holds names the files as well
        files = [p.name for p in snapshot.directory.iterdir()]
    refused = sorted(f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in NOT_LOADED))
    where = f"model '{snapshot.repo_id}' (commit {snapshot.commit})"
    if not refused:
        return SourceError(f"{where} has no *.safetensors weights at the top of the repository, so there is nothing "
                           "qlorakit can load; check the id, or pick a revision that has them")
    shown = ", ".join(refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
    return SourceError(
        f"{where} has its weights only as {shown}: qlorakit loads safetensors only (pickled weights run code when "
        "they are loaded). Use a copy or revision of the model with *.safetensors weights (the Hub's converter, "
        f"https://huggingface.co/spaces/safetensors/convert, opens a pull request adding them: then load "
        f"{snapshot.repo_id}@refs/pr/N)"
    )


# ---------------------------------------------------------------------------------------------- errors


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network failures of the HTTP client huggingface_hub uses (httpx2, or httpx in older releases): no
    connection, a timeout, a proxy refusing. Both are looked for: which one is huggingface_hub's choice."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(found)


def hub_exceptions() -> tuple[type[BaseException], ...]:
    """What a call into huggingface_hub raises when the Hub or the cache cannot give what was asked: the except
    clause around such a call, whose errors hub_error translates."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    return (HfHubHTTPError, EntryNotFoundError, *_transport_errors())


def _page(repo_id: str, kind: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"


def _causes(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def hub_error(e: BaseException, repo_id: str, kind: str = "model", revision: str | None = None) -> Exception:
    """The qlorakit error (SourceError for a model, DataError for a dataset) for what huggingface_hub raised while
    fetching `repo_id`: gated, unknown or private, unknown revision, offline and not cached, no network, the token
    refused, the Hub failing. Says what to do in each case; the caller raises it `from e`."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        DisabledRepoError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    error = SourceError if kind == "model" else DataError
    page = _page(repo_id, kind)
    what = f"{kind} '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    login = "set HF_TOKEN to an access token of your account (https://huggingface.co/settings/tokens) or run " \
            "`hf auth login`"
    download = f"hf download {'--repo-type dataset ' if kind == 'dataset' else ''}{repo_id}" + \
               (f" --revision {revision}" if revision else "")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    chain = list(_causes(e))

    if isinstance(e, GatedRepoError):  # (a RepositoryNotFoundError too: asked first)
        return error(f"{what} is gated: its authors grant access on its page. Open {page}, accept its terms there "
                     f"(some need the authors' approval first), then {login} with the account that accepted them")
    if isinstance(e, RevisionNotFoundError):
        return error(f"{kind} '{repo_id}' has no revision {show(revision or 'main')} (a branch, tag or commit "
                     f"hash); see its branches and commits at {page}/commits/main")
    if isinstance(e, DisabledRepoError):
        return error(f"{kind} '{repo_id}' is disabled by its authors on the Hub ({page}); use another {kind}")
    if isinstance(e, RepositoryNotFoundError):
        return error(f"no {kind} '{repo_id}' on the Hugging Face Hub that you can see, and no local path of that "
                     f"name: check the id at {page}; if it is private, {login}")
    if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code == 401:
        return error(f"the Hugging Face Hub refused your access token for {what} (HTTP 401): the token in HF_TOKEN "
                     "or from `hf auth login` is invalid or expired; create a new one at "
                     "https://huggingface.co/settings/tokens and set HF_TOKEN or run `hf auth login` again")
    offline = constants.HF_HUB_OFFLINE or any(isinstance(c, OfflineModeIsEnabled) for c in chain)
    if offline and isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        cache = f" ({constants.HF_HUB_CACHE})" if kind == "model" else ""
        return error(f"{what} is not (or only partly) in the Hugging Face cache{cache}, and HF_HUB_OFFLINE=1 "
                     f"(offline mode) forbids downloading it: fetch it once with network access (run again without "
                     f"HF_HUB_OFFLINE, or `{download}`), or point HF_HUB_CACHE / HF_HOME at a cache that holds it. "
                     "No local path of that name exists either")
    # (snapshot_download reports a Hub error or a lost connection as LocalEntryNotFoundError when the cache cannot
    # stand in: the cause says which)
    failed = next((c for c in chain if isinstance(c, HfHubHTTPError) and c.response is not None), None)
    if failed is not None:
        said = f": {show(failed.server_message)}" if failed.server_message else ""
        return error(f"the Hugging Face Hub failed to give {what} (HTTP {failed.response.status_code}{said}); try "
                     "again later (https://status.huggingface.co says whether the Hub is down)")
    network = next((c for c in chain if isinstance(c, _transport_errors())), None)
    if isinstance(e, LocalEntryNotFoundError) or network is not None:
        reason = f"{type(network).__name__}: {show(str(network))}" if network is not None else show(first_line)
        return error(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to fetch {what} ({reason}), and "
                     "it is not complete in the local cache: check the network connection (and HF_ENDPOINT, "
                     "HTTPS_PROXY if you use them) and run again; on a machine without network, fetch it elsewhere "
                     f"with `{download}` and copy the cache (HF_HUB_CACHE), then set HF_HUB_OFFLINE=1")
    return error(f"fetching {what} from the Hugging Face Hub failed ({type(e).__name__}: {show(first_line)})")
