"""Streaming the real shards inside Ray Train workers: split by rank (node) and by dataloader worker.

Validation streams each rank's share of the shards and sums (correct, total) across ranks, so the
result equals a single-process pass. Training streams too, with a step count per epoch that every
rank can reach (computed from the shard counts in `_info.json`), so DDP never waits on a rank that
ran out of data.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from edc_ray.config import DataConfig
from edc_ray.storage.dataset_info import ShardList, read_info
from edc_ray.storage.shards import SampleSpec, iter_samples


class RankSplitter:
    """A webdataset node splitter: shard i goes to rank i mod world (picklable for dataloader workers)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for i, shard in enumerate(shards):
            if i % self.world == self.rank:
                yield shard


class ShardStream(IterableDataset):
    """(image, label) pairs of this rank's shards, split again across dataloader workers.

    With `shuffle` > 0 the shard order is permuted by `seed` (the same on every rank, so the split
    stays a partition) and samples pass through a shuffle buffer of that size. With `repeat` the
    rank's shards are read again (in a new order) when they run out: a training epoch of a fixed step
    count then never runs short where shard lengths were only estimated.
    """

    def __init__(self, shards: ShardList, spec: SampleSpec, rank: int, world: int,
                 shuffle: int = 0, seed: int = 0, repeat: bool = False):
        self.shards, self.spec, self.rank, self.world = shards, spec, rank, world
        self.shuffle, self.seed, self.repeat = shuffle, seed, repeat

    def _pass(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, int]]:
        urls = list(self.shards.urls)
        if self.shuffle:
            urls = [urls[i] for i in torch.randperm(len(urls), generator=generator).tolist()]
        for _, image, label in iter_samples(urls, expected_counts=self.shards.expected_counts(), spec=self.spec,
                                            nodesplitter=RankSplitter(self.rank, self.world),
                                            workersplitter=wds.split_by_worker):
            yield image, label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        generator = torch.Generator().manual_seed(self.seed)
        samples = self._pass(generator)
        if self.repeat:
            samples = _repeated(lambda: self._pass(generator))
        yield from shuffled(samples, self.shuffle, generator) if self.shuffle else samples


def _repeated(make: Callable[[], Iterator]) -> Iterator:
    """The items of `make()`, then of `make()` again, and so on; ends after a pass that yields nothing
    (a rank without shards), instead of looping forever."""
    while True:
        empty = True
        for item in make():
            empty = False
            yield item
        if empty:
            return


def shuffled(items: Iterable, buffer_size: int, generator: torch.Generator) -> Iterator:
    """Yield `items` through a shuffle buffer: each output is a random pick among the buffered ones."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield buffer.pop(int(torch.randint(len(buffer), (), generator=generator)))
    while buffer:
        yield buffer.pop(int(torch.randint(len(buffer), (), generator=generator)))


def split_shards(data: DataConfig, split: str) -> ShardList:
    """The shards of `split` (a name or a pattern) of the dataset `data` configures."""
    return read_info(data.root, data.classes).shard_list(data.root, split)


def split_stream(shards: ShardList, spec: SampleSpec, rank: int, world: int, batch_size: int, workers: int = 0,
                 shuffle: int = 0, seed: int = 0, repeat: bool = False) -> DataLoader:
    """Batches of (uint8 images, labels) from this rank's share of a split's shards, as `spec` reads them."""
    return DataLoader(ShardStream(shards, spec, rank, world, shuffle, seed, repeat),
                      batch_size=batch_size, num_workers=workers)


def rank_sample_counts(shard_counts: Sequence[int], world: int) -> list[int]:
    """Samples each rank reads when shard i goes to rank i mod world."""
    return [sum(shard_counts[r::world]) for r in range(world)]


def steps_every_rank_can_take(shard_counts: Sequence[int], world: int, batch_size: int) -> int:
    """Full batches per epoch that the rank with the fewest samples can still fill (at least 1)."""
    return max(1, min(rank_sample_counts(shard_counts, world)) // batch_size)
