"""Data order that survives a restart: a resumable DistributedSampler and the batch stream.

:class:`BatchStream` hands out training batches epoch after epoch and knows its position
(epoch, batches consumed in the epoch). Before opening each epoch's iterator it captures the
RNG states, because opening one draws from them (DataLoader's base seed, a RandomSampler's
permutation). Resuming replays exactly that: restore the epoch-start RNG, open the epoch's
iterator, skip the consumed batches, and let the trainer restore the current RNG after. So
even a plain ``DataLoader(shuffle=True)`` resumes in the same order; a sampler with
``skip_next`` (ours) skips without loading the skipped batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import distributed as D
from .checkpoint import capture_rng, restore_rng

__all__ = ["BatchStream", "ResumableDistributedSampler", "ShardSampler", "make_loader"]


class ResumableDistributedSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` (seeded per epoch, one shard per rank)
    that can start its next iteration ``n`` samples into the epoch. Works without a process
    group too (one replica)."""

    def __init__(
        self, dataset: Dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=D.world_size(),
            rank=D.rank(),
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._skip = 0

    def skip_next(self, n: int) -> None:
        """The next ``__iter__`` starts at this replica's ``n``-th sample of the epoch."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample exactly once across ranks
    (no padding, unlike DistributedSampler), for evaluation."""

    def __init__(self, dataset: Dataset) -> None:
        self.n = len(dataset)
        self.rank, self.world = D.rank(), D.world_size()

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def make_loader(
    dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """A DataLoader for training (shuffled per epoch, sharded over ranks, full batches) or
    evaluation (in order, each sample once across ranks)."""
    if train:
        sampler = ResumableDistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = ShardSampler(dataset)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=train, num_workers=num_workers
    )


class BatchStream:
    """Endless batches from ``loader`` (a DataLoader or any re-iterable of batches), epoch
    after epoch, with a checkpointable position."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.epoch = 0
        self.position = 0  # batches consumed in this epoch
        self.epoch_rng: dict[str, Any] | None = None
        self._iterator: Iterator | None = None

    def _open_epoch(self, skip: int = 0) -> None:
        self.epoch_rng = capture_rng()
        sampler = getattr(self.loader, "sampler", None)
        batch_size = getattr(self.loader, "batch_size", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if skip and hasattr(sampler, "skip_next") and batch_size is not None:
            sampler.skip_next(skip * batch_size)
            skip = 0
        self._iterator = iter(self.loader)
        for _ in range(skip):
            next(self._iterator)

    def next(self) -> Any:
        if self._iterator is None:
            self._open_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._open_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("the training loader yields no batches") from None
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any], epoch_rng: dict[str, Any] | None) -> None:
        """Reopens the saved epoch where it was. Changes the RNG states: restore the current
        ones afterwards."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if epoch_rng is None:  # saved before the first batch was drawn
            self._iterator = None
            return
        restore_rng(epoch_rng)
        self._open_epoch(skip=self.position)


def sample_count(targets: Any) -> int:
    """The number of samples in a batch's targets (first dimension)."""
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    return len(targets)
