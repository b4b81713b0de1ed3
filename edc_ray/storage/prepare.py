"""The prepare job: convert a source into ``<root>/<split>/shard-NNNNNN.tar`` + ``<root>/_info.json``.

Output is deterministic (same input -> byte-identical shards) and ``_info.json`` is written last, as the
commit marker: a finished root is reused as it is, a half-written one is redone from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from edc_ray.storage import fsio
from edc_ray.storage.shards import DatasetInfo, SplitInfo, encode_png, info_url, read_info, write_info, write_shard
from edc_ray.storage.sources import Source, open_source

PROGRESS_MIN = 10_000  # sources with fewer images finish too fast for a progress bar to help


class _SplitWriter:
    """Buffers one split's encoded samples and writes them out ``shard_size`` at a time."""

    def __init__(self, root: str, split: str, shard_size: int, num_classes: int) -> None:
        self.root, self.split, self.shard_size = root, split, shard_size
        self.pending: list[dict[str, Any]] = []
        self.count = 0
        self.counts_per_class = [0] * num_classes
        self.shards: list[str] = []
        self.shard_counts: list[int] = []

    def add(self, image: np.ndarray, label: int) -> None:
        """Queue one image; full shards are written as soon as they are complete."""
        self.pending.append({"__key__": f"{self.split}-{self.count:08d}", "png": encode_png(image), "cls": label})
        self.count += 1
        self.counts_per_class[label] += 1
        if len(self.pending) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self.shard_counts.append(write_shard(fsio.join(self.root, self.split, name), self.pending))
        self.shards.append(name)
        self.pending = []

    def close(self) -> SplitInfo:
        """Write the last, partial shard and describe the split."""
        if self.pending:
            self._flush()
        return SplitInfo(self.count, self.counts_per_class, self.shards, self.shard_counts)


class _PixelStats:
    """Per-channel pixel sums, kept as exact integers so the result does not depend on summation order."""

    def __init__(self) -> None:
        self.pixels = 0
        self.sums: np.ndarray | None = None
        self.squares: np.ndarray | None = None

    def add(self, image: np.ndarray) -> None:
        """Add one ``HxWxC`` uint8 image."""
        flat = image.reshape(-1, image.shape[2]).astype(np.int64)
        sums, squares = flat.sum(0), (flat * flat).sum(0)
        self.sums = sums if self.sums is None else self.sums + sums
        self.squares = squares if self.squares is None else self.squares + squares
        self.pixels += flat.shape[0]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) standard deviation of the pixels scaled to [0, 1]."""
        mean = self.sums / self.pixels
        var = np.maximum(self.squares / self.pixels - mean**2, 0.0)
        return (mean / 255).tolist(), (np.sqrt(var) / 255).tolist()


def _fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and center-crop to ``size x size``; as is when it fits."""
    height, width = image.shape[:2]
    if height == width == size:
        return image
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def _as_hwc(image: np.ndarray) -> np.ndarray:
    """``HxW`` -> ``HxWx1``; ``HxWxC`` as is."""
    return image[:, :, None] if image.ndim == 2 else image


def _check_geometry(image: np.ndarray, expected: tuple[int, ...] | None, where: str) -> tuple[int, ...]:
    """The ``HxWxC`` shape of ``image``, which must be square and equal ``expected`` (the first image's)."""
    height, width, _ = image.shape
    if height != width or (expected is not None and image.shape != expected):
        wanted = "square" if expected is None else "x".join(map(str, expected))
        raise ValueError(
            f"{where} is {'x'.join(map(str, image.shape))} (HxWxC), expected {wanted}: "
            "all images must be square with one size; pass --image-size N to resize and center-crop to NxN"
        )
    return image.shape


def _convert(opened: Source, out_root: str, shard_size: int, image_size: int | None, name: str) -> DatasetInfo:
    """Write every split's shards; return the info (not yet written). Stats come from train (else the first split)."""
    writers = {split: _SplitWriter(out_root, split, shard_size, len(opened.classes)) for split in opened.split_sizes}
    stats_split = "train" if "train" in writers else next(iter(writers))
    stats = _PixelStats()
    shape = None
    total = sum(opened.split_sizes.values())
    for split, image, label in tqdm(
        opened.samples(), total=total, desc=f"prepare {name}", unit="img", disable=total < PROGRESS_MIN
    ):
        image = _as_hwc(image if image_size is None else _fit_square(image, image_size))
        shape = _check_geometry(image, shape, f"{split} image {writers[split].count}")
        writers[split].add(image, label)
        if split == stats_split:
            stats.add(image)
    if shape is None:
        raise ValueError(f"source {opened.name!r} holds no images")
    mean, std = stats.mean_std()
    splits = {split: writer.close() for split, writer in writers.items()}
    return DatasetInfo(name, opened.classes, shape[0], shape[2], mean, std, splits)


def _finished(out_root: str, request: dict[str, Any]) -> DatasetInfo | None:
    """The info of a finished earlier run with the same ``request``; None when there is none."""
    if not fsio.exists(info_url(out_root)):
        return None
    info = read_info(out_root)
    if info.prepared_with != request:
        raise ValueError(
            f"{out_root} already holds a dataset prepared with {info.prepared_with}, not {request}: "
            "pass --overwrite to replace it, or choose another --out"
        )
    return info


def _remove_outputs(out_root: str) -> None:
    """Delete the commit marker first, then every shard (and leftover temp file) of an earlier run."""
    fsio.remove(info_url(out_root))
    for split in fsio.list_dirs(out_root):
        for url in fsio.list_files(fsio.join(out_root, split), "shard-*.tar*"):
            fsio.remove(url)


def prepare_dataset(
    source: str,
    src: str | None,
    out_root: str,
    *,
    shard_size: int = 5000,
    image_size: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
    source_options: Mapping[str, Any] | None = None,
) -> DatasetInfo:
    """Convert ``source`` (read from ``src``) into shards under ``out_root`` (a path or URL); return its info.

    A finished ``out_root`` prepared with the same arguments is returned untouched; one prepared with other
    arguments is an error unless ``overwrite``. ``source_options`` go to the source (``names=`` for idx,
    ``channels=`` for imagefolder, ``dataset=`` for torchvision). ``image_size`` resizes (shorter side) and
    center-crops every image to a square.
    """
    if shard_size < 1 or (image_size is not None and image_size < 1):
        raise ValueError(f"shard_size ({shard_size}) and image_size ({image_size}) must be positive")
    options = dict(source_options or {})
    request = dict(source=source, src=src, shard_size=shard_size, image_size=image_size, name=name, options=options)
    if not overwrite and (finished := _finished(out_root, request)) is not None:
        return finished
    opened = open_source(source, src, **options)  # fails on a bad source before anything is deleted
    _remove_outputs(out_root)
    info = _convert(opened, out_root, shard_size, image_size, name or opened.name)
    info.prepared_with = request
    write_info(out_root, info)  # last: the commit marker
    return info


def ensure_prepared(source: str, src: str | None, out_root: str, **kwargs: Any) -> DatasetInfo:
    """The info of the dataset at ``out_root``, preparing it first when it is not there yet (never overwrites).

    ``kwargs`` are those of :func:`prepare_dataset` except ``overwrite``.
    """
    return prepare_dataset(source, src, out_root, overwrite=False, **kwargs)
