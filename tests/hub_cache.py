"""The Hugging Face Hub cache layout, built from local files, for tests that fetch by Hub id offline.

huggingface_hub keeps one folder per repository in HF_HUB_CACHE:

    models--org--name/                 (datasets--org--name/ for a dataset)
        blobs/<hash>                   each file's bytes once: SHA-256 for LFS files (weights), git's blob SHA-1 else
        refs/main                      the commit hash a branch or tag points at (no newline)
        snapshots/<commit>/<path>      the repository's files at that commit, symlinks into blobs/

`add_repo` writes exactly that, so huggingface_hub (snapshot_download, hf_hub_download) and the libraries built on it
read it as a real download, with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at the cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".arrow", ".gguf")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def blob_name(path: str, data: bytes) -> str:
    """The name huggingface_hub gives a file's blob: the Hub's ETag of it, the SHA-256 for an LFS file (weights,
    data), git's blob id otherwise."""
    return hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_blob_id(data)


def read_files(files: dict[str, bytes] | Path) -> dict[str, bytes]:
    """{path: bytes}: `files` itself, or every file under a directory."""
    if isinstance(files, dict):
        return files
    root = Path(files)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def commit_of(files: dict[str, bytes]) -> str:
    """A commit hash derived from the files: the same files give the same commit."""
    listing = "".join(f"{path}:{blob_name(path, data)}\n" for path, data in sorted(files.items()))
    return hashlib.sha1(listing.encode()).hexdigest()


def repo_folder(cache: Path, repo_id: str, repo_type: str = "model") -> Path:
    return Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def add_repo(cache: Path, repo_id: str, files: dict[str, bytes] | Path, *, repo_type: str = "model",
             ref: str | None = "main", commit: str | None = None) -> str:
    """Put a commit of `repo_id` holding `files` ({path: bytes}, or every file under a directory) into the Hub
    cache `cache`, and point `ref` at it (None: no ref, the commit is reachable by its hash only). Returns the
    commit hash: `commit`, else derived from the files (the same files give the same commit). A download keeps
    only some of a commit's files: `commit` names the whole commit then."""
    files = read_files(files)
    commit = commit or commit_of(files)
    folder = repo_folder(cache, repo_id, repo_type)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = folder / "snapshots" / commit
    for path, data in files.items():
        blob = folder / "blobs" / blob_name(path, data)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return commit
