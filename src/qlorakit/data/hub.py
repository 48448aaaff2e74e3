"""Datasets read through the `datasets` library: Hub ids ("org/name", "org/name@revision") and dataset directories.

A Hub id, and a directory of data files (the layout of a Hub dataset repository: a README.md whose YAML header lists
`configs`, data/train-00000-of-00001.parquet and the like; or just data files), load through
`datasets.load_dataset` — the library's own path: its cache (HF_DATASETS_CACHE), its progress bars, HF_TOKEN or
`hf auth login` for private and gated datasets. A directory written by save_to_disk loads through `load_from_disk`.

Offline (HF_HUB_OFFLINE=1) a Hub id reads what `datasets` prepared in its cache when it was loaded with network
access; failing that, the repository's snapshot in the Hugging Face hub cache (HF_HUB_CACHE: what
`hf download --repo-type dataset` fetches), loaded as a directory. datasets' own cache does not record which
revision it holds, so an id with @revision is read offline from the hub cache's snapshot of that revision only.

Every failure is a DataError naming the dataset and what to do: an unknown id or no access, an unknown
configuration or split (listing those there are), offline and not cached.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, show
from .files import FILE_KINDS, Row

# Rows the shuffle of a streamed dataset draws from (datasets' IterableDataset.shuffle buffer): the memory a stream
# holds besides its micro-batch, and how far a row can move from its place in the dataset's files.
SHUFFLE_BUFFER = 1000


def is_saved_dataset(path: Path) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk (what load_from_disk reads)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def hub_dataset_id(text) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `text` names a Hub dataset ("org/name" or "org/name@revision"): never an existing
    local path, and never a data file's name (data/train.jsonl is a missing file, not a dataset called so)."""
    from ..hub import parse_hub_id

    if not isinstance(text, str) or Path(text).expanduser().exists():
        return None
    parsed = parse_hub_id(text)
    if parsed is None or Path(parsed[0]).suffix.lower() in FILE_KINDS:
        return None
    return parsed


def is_dataset(source) -> bool:
    """Whether `source` (what --data names) is read here: a directory, or a Hub id."""
    if not isinstance(source, (str, Path)):
        return False
    return Path(source).expanduser().is_dir() or hub_dataset_id(str(source)) is not None


@dataclass
class OpenedDataset:
    """A dataset's splits, opened whole (Arrow tables, memory-mapped) or as streams (`streaming`)."""

    label: str  # what messages call it: the id as given, or the directory
    row_label: str  # what a row's place starts with: the id, or the directory's name
    splits: dict  # split name -> datasets.Dataset, or datasets.IterableDataset when streaming
    sizes: dict  # split name -> its number of rows, None where datasets does not know it before reading
    streaming: bool
    single: bool = False  # a saved Dataset: one split, called "train", and rows named without it
    hub: tuple[str, str | None] | None = None  # (repo_id, revision) of a Hub dataset
    origin: str = ""  # where an offline Hub dataset was read from, when not datasets' own cache

    def split(self, name: str, option: str = "--split"):
        if name not in self.splits:
            raise DataError(f"{self.label}: no split {name!r} ({option} {name}); its splits are "
                            f"{', '.join(self.splits)}")
        return self.splits[name]

    def columns(self, name: str, option: str = "--split") -> list[str] | None:
        """The split's columns; None for a stream whose columns datasets learns only by reading it."""
        return self.split(name, option).column_names

    def where(self, name: str) -> str:
        return self.row_label if self.single else f"{self.row_label} ({name})"

    def rows(self, name: str, option: str = "--split") -> list[Row]:
        """Every row of the split, in the dataset's order."""
        dataset = self.split(name, option)
        where = self.where(name)
        rows = [Row(dict(record), f"{where} row {i}") for i, record in self._read(enumerate(dataset))]
        if not rows:
            raise DataError(f"{self.label}: split {name!r} holds no rows; a training set needs at least one example")
        return rows

    def stream(self, name: str, seed: int, option: str = "--split") -> "RowStream":
        return RowStream(self, self.split(name, option), name, seed)

    def _read(self, records: Iterator):
        """`records`, with what the Hub or datasets raises while they are read (a stream's files are fetched and
        parsed as it goes) as the DataError naming the dataset."""
        import pyarrow
        from datasets.exceptions import DatasetsError

        from ..hub import hub_error, hub_exceptions

        try:
            yield from records
        except hub_exceptions() as e:
            if self.hub is None:
                raise
            raise hub_error(e, self.hub[0], "dataset", self.hub[1]) from e
        except DatasetsError as e:
            raise DataError(f"{self.label}: datasets cannot read its data files ({_first_line(e)})") from e
        except pyarrow.ArrowException as e:  # a stream reads the files as it goes: pyarrow's word on them
            raise DataError(f"{self.label}: datasets cannot read its data files ({type(e).__name__}: "
                            f"{_first_line(e)})") from e


class RowStream:
    """The rows of one split of a streamed dataset, read as they are needed. `rows()` reads them in the dataset's
    order; `rows(epoch)` in that epoch's shuffled order: datasets' shuffle buffer (SHUFFLE_BUFFER rows; it also
    shuffles the order of the dataset's files), seeded by the run's seed and reseeded per epoch by set_epoch, so an
    epoch's order is a function of (seed, epoch) and a resumed run reads the same rows in the same order. Each call
    reads from the start; `skip` rows are passed over without being returned (a resumed epoch)."""

    def __init__(self, opened: OpenedDataset, dataset, split: str, seed: int):
        self.opened, self.split, self.dataset = opened, split, dataset
        self.label = f"{opened.label} ({split})"
        self.num_rows = opened.sizes.get(split)
        self._shuffled = dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        self._head: list[Row] = []
        self._head_asked = 0

    def head(self, n: int) -> list[Row]:
        """The first `n` rows in the dataset's order (fewer if it has fewer), read once: each pass over a stream
        costs its opening and closing (datasets waits 5 s as a Parquet stream closes)."""
        if n > self._head_asked:
            self._head, self._head_asked = list(itertools.islice(self.rows(), n)), n
        return self._head[:n]

    def rows(self, epoch: int | None = None, skip: int = 0) -> Iterator[Row]:
        where = self.opened.where(self.split)
        if epoch is None:
            records, place = self.dataset, f"{where} row {{}}"
        else:
            self._shuffled.set_epoch(epoch)
            records, place = self._shuffled, f"{where}, row {{}} of epoch {epoch}'s shuffled stream"
        for n, record in self.opened._read(itertools.islice(enumerate(records), skip, None)):
            yield Row(dict(record), place.format(n))


def open_dataset(source: str, config: str | None = None, streaming: bool = False,
                 option: str = "--data") -> OpenedDataset:
    """The splits of the dataset `source` names: a directory (saved by save_to_disk, or of data files) or a Hub id,
    in configuration `config` (--data-config), whole or as streams. Raises DataError naming the dataset."""
    path = Path(source).expanduser()
    if path.is_dir():
        if is_saved_dataset(path):
            if config is not None:
                raise DataError(f"{path}: a dataset saved with save_to_disk has no configurations; drop "
                                f"--data-config {config}")
            return _saved(path, streaming)
        splits = _load(str(path), None, config, streaming, str(path))
        return OpenedDataset(str(path), path.name, splits, _sizes(splits), streaming)
    hub = hub_dataset_id(source)
    if hub is None:
        raise DataError(f"{path}: data file not found; check the path given to {option}")
    splits, origin = _load_hub(*hub, config, streaming, source)
    return OpenedDataset(source, source, splits, _sizes(splits), streaming, hub=hub, origin=origin)


def _saved(path: Path, streaming: bool) -> OpenedDataset:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    single = not isinstance(loaded, DatasetDict)
    splits = {"train": loaded} if single else dict(loaded)
    sizes = {name: len(split) for name, split in splits.items()}
    if streaming:
        splits = {name: split.to_iterable_dataset() for name, split in splits.items()}
    return OpenedDataset(str(path), path.name, splits, sizes, streaming, single=single)


def _sizes(splits: dict) -> dict:
    from datasets import Dataset

    sizes = {}
    for name, split in splits.items():
        if isinstance(split, Dataset):
            sizes[name] = len(split)
        else:  # a stream knows its length only from the dataset's card or a prepared copy
            known = split.info.splits.get(name) if split.info.splits else None
            sizes[name] = known.num_examples if known is not None and known.num_examples else None
    return sizes


NO_DATA_FILES = (
    "no data files that datasets reads (.parquet, .jsonl, .json, .csv, .arrow ...), and not a dataset saved with "
    "save_to_disk (no state.json or dataset_dict.json); pass a data file, a directory of data files (a Hub dataset "
    "repository's layout: README.md with configs, data/train-*.parquet), or a directory written by save_to_disk"
)


def _load(path: str, revision: str | None, config: str | None, streaming: bool, label: str,
          repo_id: str | None = None, no_data_files: str = NO_DATA_FILES) -> dict:
    """datasets.load_dataset(path) as {split: dataset}, its failures as DataErrors naming `label`."""
    import datasets
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetBuildError, DatasetNotFoundError
    from huggingface_hub import constants

    from ..hub import hub_error, hub_exceptions

    try:
        return dict(datasets.load_dataset(path, name=config, revision=revision, streaming=streaming))
    except (DataFilesNotFoundError, EmptyDatasetError):
        raise DataError(f"{label}: {no_data_files}") from None
    except DatasetBuildError as e:  # a data file it cannot parse, files of different columns
        raise DataError(f"{label}: datasets cannot read its data files ({_first_line(e)})") from e
    except DatasetNotFoundError as e:  # the Hub's answer, in datasets' words: unknown, private, gated, no revision
        raise DataError(
            f"{label}: {show(str(e))} Check the id at {constants.ENDPOINT}/datasets/{repo_id or label}; for a "
            "private or gated dataset, accept its terms there and set HF_TOKEN to an access token of that account "
            "(or run `hf auth login`). No local path of that name exists either"
        ) from None
    except ValueError as e:  # an unknown or missing configuration, in the words of datasets' builders
        raise _config_error(e, path, revision, config, label, repo_id) from None
    except hub_exceptions() as e:
        raise hub_error(e, repo_id or label, "dataset", revision) from e


def _config_error(e: ValueError, path: str, revision: str | None, config: str | None, label: str,
                  repo_id: str | None) -> DataError:
    configs = _config_names(path, revision, repo_id)
    if config is not None and configs and config not in configs:
        return DataError(f"{label}: no configuration {config!r} (--data-config {config}); its configurations are "
                         f"{', '.join(configs)}")
    if config is None and len(configs) > 1:
        return DataError(f"{label} has {len(configs)} configurations: {', '.join(configs)}; choose one with "
                         "--data-config NAME")
    return DataError(f"{label}: datasets cannot load it ({_first_line(e)})")


def _first_line(e: BaseException) -> str:
    """An error's first line, and its cause's (datasets wraps what went wrong, e.g. pyarrow's word on a file, in
    "An error occurred while generating the dataset")."""
    text = str(e).strip()
    line = show(text.splitlines()[0]) if text else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and cause is not e and str(cause).strip():
        line += f": {type(cause).__name__}: {show(str(cause).strip().splitlines()[0])}"
    return line


def _config_names(path: str, revision: str | None, repo_id: str | None) -> list[str]:
    """The dataset's configurations, for a message: as datasets lists them, or offline, those in its cache."""
    import datasets

    if repo_id is not None and datasets.config.HF_HUB_OFFLINE:
        return _cached_configs(repo_id)
    try:
        return list(datasets.get_dataset_config_names(path, revision=revision))
    except (OSError, ValueError):  # the Hub out of reach: what the cache holds
        return _cached_configs(repo_id) if repo_id else []


def _cached_configs(repo_id: str) -> list[str]:
    """The configurations of `repo_id` that datasets prepared in its cache. Its layout, as datasets' offline reader
    (packaged_modules/cache) globs it: HF_DATASETS_CACHE/<org>___<name>/<config>/<version>/<hash>/."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    namespace, name = repo_id.split("/")
    root = Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{camelcase_to_snakecase(name)}"
    return sorted({p.parts[-4] for p in root.glob("*/*/*/dataset_info.json")})


def _load_hub(repo_id: str, revision: str | None, config: str | None, streaming: bool,
              label: str) -> tuple[dict, str]:
    """A Hub dataset's splits, and where they came from when that is not datasets' own path (offline: the hub
    cache's snapshot)."""
    import datasets
    from huggingface_hub import constants

    if not datasets.config.HF_HUB_OFFLINE:
        empty = ("the Hub repository holds no data files that datasets reads (.parquet, .jsonl, .json, .csv, .arrow "
                 "...); check the id and --data-config")
        return _load(repo_id, revision, config, streaming, label, repo_id, empty), ""
    if revision is None and _cached_configs(repo_id):
        return _load(repo_id, None, config, streaming, label, repo_id), ""
    snapshot = _hub_snapshot(repo_id, revision)
    if snapshot is not None:
        partial = (f"only part of it is in the hub cache ({snapshot}: no data files), and HF_HUB_OFFLINE=1 forbids "
                   f"downloading the rest: {_fetch_hint(repo_id, revision)}")
        splits = _load(str(snapshot), None, config, streaming, label, no_data_files=partial)
        return splits, f"offline, from the hub cache's snapshot {snapshot.name[:12]}"
    if revision is not None:
        cached = f"; or drop @{revision} to read the copy datasets has cached" if _cached_configs(repo_id) else ""
        raise DataError(
            f"{label}: offline (HF_HUB_OFFLINE=1) a revision is read from the hub cache's snapshot of it "
            f"({constants.HF_HUB_CACHE}), which holds none — datasets' own cache does not record revisions: "
            f"{_fetch_hint(repo_id, revision)}{cached}"
        )
    raise DataError(
        f"{label}: not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) nor in the hub cache "
        f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 (offline mode) forbids downloading it: "
        f"{_fetch_hint(repo_id, revision)}. No local path of that name exists either"
    )


def _fetch_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"fetch it once with network access (run again without HF_HUB_OFFLINE, or `hf download --repo-type "
            f"dataset {repo_id}{rev}`), or point HF_DATASETS_CACHE / HF_HUB_CACHE / HF_HOME at a cache that holds it")


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The dataset repository's snapshot in the hub cache at `revision` (its default branch when None), or None."""
    from huggingface_hub import snapshot_download

    from ..hub import hub_exceptions

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True))
    except (*hub_exceptions(), FileNotFoundError):
        return None
