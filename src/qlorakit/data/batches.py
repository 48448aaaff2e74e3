"""Tokenized examples -> batches: a deterministic order per epoch, and either padding-free packed rows (the
default) or right-padded rows.

Packed: the examples of a micro-batch are laid end to end in one row, with position ids restarting at 0 for each
and no attention mask. transformers' masking (sdpa and eager attention) reads the restarts from the position ids and
builds a block-diagonal causal mask, so no token attends across examples; flash-attention kernels use the same
position ids for their variable-length path. With attention implementations that ignore position ids for masking
(none of the Llama-family ones in transformers 5), examples would see their predecessors in the row; `packing=False`
avoids packing altogether. The loss does not cross examples either way: each example's first label is masked.

Preference pairs (data/preference.py's collate_pairs) use the same layouts, each pair's chosen and rejected sequences
side by side, with `sequences` saying which sequence each token belongs to; the stream below takes the collate
function, so pairs share its order, resume positions and ranks' shares.

On several processes (distributed.py) a micro-batch is global: world x batch_size examples, of which each rank
collates its contiguous share; the order, the positions and the epochs are those of one process with that batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError, TrainingError
from .tokenize import IGNORE_INDEX, Tokenized


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, length]
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when packed
    placeholder: bool = False  # a rank's empty share of a global micro-batch (see `placeholder`)
    # Preference pairs (data/preference.py's collate_pairs; SFT batches leave them unset): `sequences`, shaped as
    # input_ids, is each token's sequence (pair i's chosen answer 2i, its rejected one 2i+1; -1 for padding and in a
    # placeholder), and `reference` the [2 * pairs] reference log-probabilities in that order, when known.
    sequences: torch.Tensor | None = None
    pairs: int = 0
    reference: torch.Tensor | None = None

    @property
    def trained_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def real_tokens(self) -> int:
        if self.placeholder:
            return 0
        return self.input_ids.numel() if self.attention_mask is None else int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        """The batch (of its own class: objectives extend it) with every tensor on `device`."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def model_inputs(self) -> dict:
        # use_cache=False: with a cache transformers does not look for packed sequences in the position ids.
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": self.attention_mask, "use_cache": False}


def collate(items: list[Tokenized], pad_id: int, packed: bool = True) -> Batch:
    if packed:
        ids = [t for item in items for t in item.input_ids]
        labels = [t for item in items for t in item.labels]
        positions = [p for item in items for p in range(len(item.input_ids))]
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return Batch(as_row(ids), as_row(labels), as_row(positions), None)
    length = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    positions = torch.arange(length).expand(len(items), -1).clone()
    return Batch(ids, labels, positions, mask)


def collate_sequences(items: list[Tokenized], pad_id: int, packed: bool = True) -> Batch:
    """`collate`'s batch with each token's sequence in `sequences` (item k's tokens k, padding -1): what objectives
    that score each sequence on its own (preference pairs, GRPO's completions) sum per sequence."""
    batch = collate(items, pad_id, packed)
    if packed:
        owner = torch.tensor([[k for k, item in enumerate(items) for _ in item.input_ids]], dtype=torch.long)
    else:
        rows = torch.arange(len(items), dtype=torch.long).unsqueeze(1)
        owner = torch.where(batch.attention_mask.bool(), rows, torch.full_like(batch.attention_mask, -1))
    return dataclasses.replace(batch, sequences=owner)


def placeholder(pad_id: int) -> Batch:
    """What a rank runs when its share of a global micro-batch is empty (the data's last micro-batch, smaller than
    the ranks): two pad tokens, nothing trained, in no sequence (no pair). Its backward gives zero gradients, and
    every rank takes part in each gradient sum, as DDP needs."""
    row = torch.tensor([[pad_id, pad_id]], dtype=torch.long)
    return Batch(row, torch.full_like(row, IGNORE_INDEX), torch.tensor([[0, 1]]), None, placeholder=True,
                 sequences=torch.full_like(row, -1))


def share(items: list, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous share of a global micro-batch: batch_size items each when it is whole, sizes
    differing by at most one when it is not."""
    n = len(items)
    return items[rank * n // world : (rank + 1) * n // world]


def evaluation_batches(n: int, batch_size: int, processes=None) -> Iterator[list[int]]:
    """The indices of `n` items this process evaluates, `batch_size` at a time: all of them on one process; on
    several (`processes`, from distributed.join_run) its contiguous share, in as many batches as every other rank
    runs (an empty list once its share has run out: the caller runs a placeholder), so that a sharded model's
    gathers meet on every rank."""
    distributed = processes is not None and processes.distributed
    rank, world = (processes.rank, processes.world) if distributed else (0, 1)
    mine = share(list(range(n)), rank, world)
    forwards = math.ceil(math.ceil(n / world) / batch_size)
    for start in range(0, forwards * batch_size, batch_size):
        yield mine[start : start + batch_size]


def collate_share(items: list, pad_id: int, packed: bool, rank: int, world: int,
                  collate_fn: Callable[[list, int, bool], Batch] = collate) -> Batch:
    """Rank `rank`'s share of a global micro-batch, collated with `collate_fn` (collate, or collate_pairs for
    preference pairs), or the placeholder when it is empty."""
    mine = share(items, rank, world)
    return collate_fn(mine, pad_id, packed) if mine else placeholder(pad_id)


def epoch_order(n_items: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """The order of the examples in `epoch`: a function of (seed, epoch) only, so a resumed run sees the same."""
    order = list(range(n_items))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def micro_batches(items: list[Tokenized], batch_size: int, epoch: int, seed: int, shuffle: bool = True):
    """The epoch's micro-batches as lists of items (the last one may be smaller)."""
    order = epoch_order(len(items), epoch, seed, shuffle)
    return [[items[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


class MicroBatchStream:
    """The training run's micro-batches in a deterministic order, epoch after epoch, from a saved position
    ({"epoch", "micro"}: what a checkpoint records, so a resumed run takes the same batches). On several processes
    its micro-batches are global (world x batch_size examples) and `take` gives this rank's share. `collate_fn`
    makes a batch of items: `collate` for Tokenized examples, data.preference.collate_pairs for pairs."""

    def __init__(self, items: list, batch_size: int, seed: int, pad_id: int, packed: bool,
                 position: dict, rank: int = 0, world: int = 1,
                 collate_fn: Callable[[list, int, bool], Batch] = collate):
        if "rows" in position:  # a streamed run's: its epochs are in another order
            raise TrainingError("the checkpoint's data position is a streamed run's (--streaming), and this run "
                                "reads the data whole: resume with --streaming, as the run started")
        self.items, self.seed, self.pad_id, self.packed = items, seed, pad_id, packed
        self.batch_size, self.rank, self.world = batch_size * world, rank, world
        self.collate_fn = collate_fn
        self.epoch, self.index = position["epoch"], position["micro"]
        self._epoch_batches = micro_batches(items, self.batch_size, self.epoch, seed)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "micro": self.index}

    @property
    def progress(self) -> float:
        """Epochs done, with the fraction of the current one."""
        return self.epoch + self.index / max(1, len(self._epoch_batches))

    def take(self, n: int) -> list[Batch]:
        out = []
        for _ in range(n):
            if self.index >= len(self._epoch_batches):
                self.epoch, self.index = self.epoch + 1, 0
                self._epoch_batches = micro_batches(self.items, self.batch_size, self.epoch, self.seed)
            out.append(collate_share(self._epoch_batches[self.index], self.pad_id, self.packed, self.rank, self.world,
                                     self.collate_fn))
            self.index += 1
        return out


class StreamedBatches:
    """MicroBatchStream's interface (take, position, epoch, index, progress) over data read as it is needed
    (--streaming). `items(epoch, skip)` yields (rows read, item) for each tokenized item of the epoch's order,
    after passing over `skip` rows; rows read counts every row up to and including the item's (bad rows skipped and
    examples dropped as too long included). A micro-batch is the next `batch_size` items of the epoch, the last one
    of an epoch the rest; an epoch ends where the data does, and the next starts from the beginning in its own order
    — the batches MicroBatchStream makes of the same items in the same order. The position adds the rows read in
    the epoch ({"epoch", "micro", "rows"}), so a resumed run passes over exactly those rows and takes the same
    batches after them."""

    def __init__(self, items: Callable[[int, int], Iterator[tuple[int, Tokenized]]], batch_size: int, pad_id: int,
                 packed: bool, position: dict, grad_accum: int = 1, num_rows: int | None = None, rank: int = 0,
                 world: int = 1):
        if "rows" not in position and (position["epoch"], position["micro"]) != (0, 0):
            raise TrainingError("the checkpoint's data position is that of a run that read the data whole, and "
                                "this run streams it (--streaming): resume without --streaming, as the run started")
        self.items, self.pad_id, self.packed = items, pad_id, packed
        self.batch_size, self.rank, self.world = batch_size * world, rank, world  # every rank reads the stream whole
        self.grad_accum, self.num_rows = grad_accum, num_rows
        self.epoch, self.index, self.rows = position["epoch"], position["micro"], position.get("rows", 0)
        self._whole_epoch = self.rows == 0  # read from its start: its micro-batches are all counted here
        self._items = items(self.epoch, self.rows)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "micro": self.index, "rows": self.rows}

    @property
    def progress(self) -> float:
        """Epochs done, with the fraction of the current one where the number of rows is known."""
        return self.epoch + (self.rows / self.num_rows if self.num_rows else 0.0)

    def take(self, n: int) -> list[Batch]:
        out = []
        while len(out) < n:
            batch = list(itertools.islice(self._items, self.batch_size))
            if batch:
                self.rows = batch[-1][0]
                self.index += 1
                out.append(collate_share([item for _, item in batch], self.pad_id, self.packed, self.rank,
                                         self.world))
            else:  # the epoch's data has ended
                self._next_epoch()
        return out

    def _next_epoch(self) -> None:
        if self._whole_epoch and self.index < self.grad_accum:  # as the in-memory run refuses before its start
            raise ConfigError(
                f"grad_accum={self.grad_accum} is more micro-batches than the data holds (one epoch of the stream "
                f"gave {self.index}); one optimizer step would pass over the data more than once: use grad_accum "
                f"of at most {self.index}"
            )
        self.epoch, self.index, self.rows, self._whole_epoch = self.epoch + 1, 0, 0, True
        self._items = self.items(self.epoch, 0)


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the items held out (at least one when fraction > 0)."""
    if fraction <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(f"split:{seed}").shuffle(order)
    n_val = max(1, round(len(items) * fraction))
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
