"""Real candidates for the initialisation (METHOD.md 1.3): a uniform random sample of each class, kept
while streaming, and scored by the observer ensemble.

The sample is bottom-k by a key's deterministic priority (`sample_priority`), so it does not depend on
the order or the grouping in which images arrive: a `CandidateReservoir` per statistics task keeps at
most k entries per class, and reservoirs merge exactly (`bottom_k` of their union). An entry's payload
is its encoded image (or, in memory, its uint8 tensor); entries whose priority makes them unlikely to
survive the merge keep only a `source` (where to read the bytes again), which bounds a task's memory
by about classes x k / tasks images instead of classes x k.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


def sample_priority(key: str, seed: int) -> float:
    """A deterministic pseudo-random number in [0, 1) for a sample key.

    Keeping, per class, the k samples of smallest priority is a uniform random sample without
    replacement that merges across shards (bottom-k sampling).
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass
class Candidates:
    """Scored candidate images: keys, labels, sampling priorities, ensemble losses and payloads.

    `payloads[i]` is encoded image bytes, a uint8 (C, H, W) tensor, or None when only `sources[i]`
    (opaque here: the storage layer's address of the bytes) is kept. `decode` turns bytes into a uint8
    tensor. A NaN loss means "not scored yet".
    """

    keys: list[str]
    labels: torch.Tensor  # (n,) int64
    priorities: torch.Tensor  # (n,) float64
    losses: torch.Tensor  # (n,) float32
    payloads: list[Any]
    sources: list[Any] = field(default_factory=list)
    decode: Callable[[bytes], torch.Tensor] | None = None

    def __post_init__(self):
        if not self.sources:
            self.sources = [None] * len(self.keys)
        sizes = {len(self.keys), len(self.labels), len(self.priorities), len(self.losses), len(self.payloads),
                 len(self.sources)}
        if len(sizes) != 1:
            raise ValueError(f"candidate fields have different lengths: {sorted(sizes)}")

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls, decode: Callable[[bytes], torch.Tensor] | None = None) -> "Candidates":
        """No candidates."""
        return cls([], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                   torch.zeros(0), [], [], decode)

    @classmethod
    def concat(cls, parts: Sequence["Candidates"]) -> "Candidates":
        """All entries of `parts`, in order."""
        parts = [p for p in parts if len(p)] or list(parts[:1])
        if not parts:
            return cls.empty()
        return cls([k for p in parts for k in p.keys], torch.cat([p.labels for p in parts]),
                   torch.cat([p.priorities for p in parts]), torch.cat([p.losses for p in parts]),
                   [x for p in parts for x in p.payloads], [s for p in parts for s in p.sources],
                   next((p.decode for p in parts if p.decode is not None), None))

    def take(self, index: torch.Tensor | Sequence[int]) -> "Candidates":
        """The entries at `index`, in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.tolist()
        return Candidates([self.keys[i] for i in rows], self.labels[index], self.priorities[index],
                          self.losses[index], [self.payloads[i] for i in rows], [self.sources[i] for i in rows],
                          self.decode)

    def of_class(self, label: int) -> "Candidates":
        """The entries of one class."""
        return self.take(torch.nonzero(self.labels == label).flatten())

    def images(self, index: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """uint8 (n, C, H, W) images of the entries at `index` (all when None), decoded as needed."""
        rows = range(len(self)) if index is None else torch.as_tensor(index, dtype=torch.long).tolist()
        out = []
        for i in rows:
            payload = self.payloads[i]
            if payload is None:
                raise ValueError(f"candidate {self.keys[i]!r} has no image bytes (only its source)")
            if not isinstance(payload, torch.Tensor):
                if self.decode is None:
                    raise ValueError("candidates hold encoded bytes but no decode function")
                payload = self.decode(payload)
            out.append(payload)
        if not out:
            raise ValueError("no candidate images selected")
        return torch.stack(out)


def _group_order(c: Candidates) -> torch.Tensor:
    """Entry order by (label, priority, key): a canonical order that does not depend on arrival."""
    order = torch.tensor(sorted(range(len(c)), key=c.keys.__getitem__), dtype=torch.long)
    order = order[torch.sort(c.priorities[order], stable=True).indices]
    return order[torch.sort(c.labels[order], stable=True).indices]


def rank_in_class(labels: torch.Tensor) -> torch.Tensor:
    """For labels grouped by class (sorted), each entry's position within its class."""
    n = len(labels)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = labels[1:] != labels[:-1]
    start_index = torch.cummax(torch.where(starts, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    return torch.arange(n) - start_index


def bottom_k(c: Candidates, k: int) -> Candidates:
    """The `k` entries of lowest priority per class (a uniform random sample), ordered by (label, priority)."""
    order = _group_order(c)
    keep = order[rank_in_class(c.labels[order]) < k]
    return c.take(keep)


def payload_thresholds(counts_per_class: Sequence[int], k: int, sigmas: float = 8.0) -> torch.Tensor:
    """Per class, a priority above which an entry is almost surely not among the class's final k.

    The k-th smallest of n uniform priorities is Beta(k, n - k + 1): mean about k / n, spread about
    sqrt(k) / n. Entries above (k + sigmas * sqrt(k) + sigmas) / n keep only their source; the merge reads
    the bytes again in the rare case one of them is selected, so the sample stays exact.
    """
    counts = torch.tensor(list(counts_per_class), dtype=torch.float64).clamp(min=1)
    return ((k + sigmas * math.sqrt(k) + sigmas) / counts).clamp(max=1.0)


class CandidateReservoir:
    """Bottom-k by priority per class over a stream of offers: at most k entries per class are held.

    `offer` drops entries that cannot enter any more (priority above the class's current k-th) and the
    payloads of entries above `hold_below[label]` (their sources stay); `result` is exactly
    `bottom_k(all offers, k)`, with payloads where held.
    """

    def __init__(self, num_classes: int, k: int, hold_below: torch.Tensor | None = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.hold_below = hold_below
        self.cutoff = torch.full((num_classes,), math.inf, dtype=torch.float64)
        self.held = Candidates.empty()
        self.pending: list[Candidates] = []
        self.pending_count = 0

    def offer(self, batch: Candidates) -> None:
        """Consider a batch of entries (any order, any classes)."""
        keep = torch.nonzero(batch.priorities < self.cutoff[batch.labels]).flatten()
        if len(keep) == 0:
            return
        batch = batch.take(keep) if len(keep) < len(batch) else batch
        if self.hold_below is not None:
            drop = (batch.priorities > self.hold_below[batch.labels]).tolist()
            batch.payloads = [None if d else p for d, p in zip(drop, batch.payloads)]
        self.pending.append(batch)
        self.pending_count += len(batch)
        if self.pending_count > max(256, len(self.held)):
            self._compact()

    def _compact(self) -> None:
        self.held = bottom_k(Candidates.concat([self.held, *self.pending]), self.k)
        self.pending, self.pending_count = [], 0
        labels = self.held.labels
        counts = torch.bincount(labels, minlength=len(self.cutoff))
        highest = torch.full_like(self.cutoff, -math.inf).scatter_reduce(0, labels, self.held.priorities,
                                                                         "amax")
        self.cutoff = torch.where(counts >= self.k, highest, torch.full_like(self.cutoff, math.inf))

    def result(self) -> Candidates:
        """The held sample, ordered by (label, priority)."""
        self._compact()
        return self.held
