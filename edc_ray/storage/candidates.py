"""Candidates as WebDataset shards: the original encoded image, its class, priority, loss and source.

    <key>.<ext>   the image's bytes as the dataset stores them (absent when only the source is kept)
    <key>.cls     the label
    <key>.json    {"priority": p, "loss": l or null, "source": [shard url, offset, size, ext]}

`source` says where the bytes lie in the dataset's own shard, so an entry whose bytes a statistics task
did not keep can be read again with one ranged read (`fetch_payloads`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from edc_ray.algo.candidates import Candidates
from edc_ray.storage.images import decode_image, encode_png
from edc_ray.storage.shards import RawSample, iter_raw_samples, read_span, write_shard


def raw_source(sample: RawSample) -> tuple[str, int, int, str]:
    """Where a raw sample's image lies: (shard url, offset, size, extension)."""
    field = sample.image_field
    offset, size = sample.spans[field]
    return sample.url, offset, size, field


def _sample(cands: Candidates, i: int) -> dict[str, Any]:
    loss = float(cands.losses[i])
    source = list(cands.sources[i]) if cands.sources[i] is not None else None
    meta = {"priority": float(cands.priorities[i]), "loss": None if math.isnan(loss) else loss, "source": source}
    sample = {"__key__": cands.keys[i], "cls": int(cands.labels[i]), "json": json.dumps(meta).encode()}
    payload = cands.payloads[i]
    if isinstance(payload, torch.Tensor):  # an in-memory image: stored losslessly
        payload = encode_png(payload.permute(1, 2, 0).numpy())
    if payload is not None:
        sample[source[3] if source else "png"] = payload
    return sample


def write_candidates(url: str, cands: Candidates) -> int:
    """Write the candidates as one shard at `url`, atomically; returns the count. Tensor payloads are
    encoded as PNG."""
    return write_shard(url, (_sample(cands, i) for i in range(len(cands))))


def read_candidates(urls: Iterable[str], decode: Callable[[bytes], torch.Tensor] = decode_image) -> Candidates:
    """The candidates stored in the shards at `urls` (payloads are the encoded bytes, or None); `decode`
    turns a payload into the uint8 image the stages use (for images of any size: fitted to the size)."""
    keys, labels, priorities, losses, payloads, sources = [], [], [], [], [], []
    for sample in iter_raw_samples(list(urls)):
        meta = json.loads(sample.fields["json"])
        keys.append(sample.key)
        labels.append(sample.label)
        priorities.append(meta["priority"])
        losses.append(math.nan if meta["loss"] is None else meta["loss"])
        source = meta["source"]
        sources.append(tuple(source) if source is not None else None)
        field = source[3] if source else "png"
        payloads.append(sample.fields.get(field))
    return Candidates(keys, torch.tensor(labels, dtype=torch.long), torch.tensor(priorities, dtype=torch.float64),
                      torch.tensor(losses, dtype=torch.float32), payloads, sources, decode)


def fetch_payloads(cands: Candidates) -> int:
    """Read the bytes of every entry that has only its source (one ranged read each); returns how many."""
    missing = [i for i, payload in enumerate(cands.payloads) if payload is None]
    for i in missing:
        url, offset, size, _ = cands.sources[i]
        cands.payloads[i] = read_span(url, (offset, size))
    return len(missing)
