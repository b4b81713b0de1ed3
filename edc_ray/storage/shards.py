"""WebDataset shards of labelled images: shard writing and the readers.

A dataset root holds WebDataset tars of samples ``{__key__, png|jpg|jpeg|webp, cls[, json]}`` and an
``_info.json`` (:mod:`edc_ray.storage.dataset_info`, timm's form) listing each split's shards. edc-ray's
prepare writes ``<root>/<split>/shard-NNNNNN.tar`` and the info last, as the commit marker; shards
prepared elsewhere (timm's / Hugging Face's ``imagenet-1k-wds``) are read in place.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from edc_ray.storage import fsio
from edc_ray.storage.dataset_info import DatasetInfo, read_info
from edc_ray.storage.images import ImageFit, decode_image

Splitter = Callable[[Iterable[dict]], Iterable[dict]]


class ShardReadError(RuntimeError):
    """A shard that cannot be opened, read or decoded, or that holds fewer samples than listed."""

    def __init__(self, url: str | None, detail: str) -> None:
        super().__init__(url, detail)
        self.url = url
        self.detail = detail

    def __str__(self) -> str:
        # webdataset appends its own context (open streams) to ``args`` while the error travels up; the
        # message and pickling (Ray ships errors between processes) use only the url and detail
        return f"cannot read shard {self.url}: {self.detail}"

    def __reduce__(self) -> tuple[type, tuple[str | None, str]]:
        return type(self), (self.url, self.detail)


def write_shard(url: str, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``samples`` (``{"__key__": str, "png": bytes, "cls": int, ...}``) as one WebDataset tar at ``url``.

    The tar is built in memory and written atomically. Member mtimes are fixed (TarWriter would stamp the
    current time), so the same samples always give byte-identical shards. Returns the number of samples.
    """
    buffer = io.BytesIO()
    count = 0
    with wds.TarWriter(buffer, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
    fsio.atomic_write_bytes(url, buffer.getvalue())
    return count


def keep_all_shards(shards: Iterable[dict]) -> Iterable[dict]:
    """A node/worker splitter for a single-process reader: every shard goes to this reader."""
    return shards


IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")  # the sample fields that may hold the encoded image


@dataclass
class RawSample:
    """One undecoded sample of a shard: its fields' bytes and where each lies inside the tar.

    ``spans[field]`` is ``(offset, size)`` of that member's data, so one field can be read again later
    with a ranged read (:func:`read_span`) instead of re-reading the whole shard.
    """

    key: str
    url: str
    fields: dict[str, bytes]
    spans: dict[str, tuple[int, int]]

    @property
    def label(self) -> int:
        """The ``cls`` field as an int."""
        return int(self.fields["cls"])

    @property
    def image_field(self) -> str:
        """The name of the field holding the encoded image (png, jpg, jpeg or webp)."""
        for name in IMAGE_FIELDS:
            if name in self.fields:
                return name
        raise KeyError(f"no image field ({', '.join(IMAGE_FIELDS)}); fields: {sorted(self.fields)}")


def _split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext`` -> ``(dir/key, ext)``: the key ends at the first dot of the file name (WebDataset's rule)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _shard_samples(url: str) -> Iterator[RawSample]:
    """The raw samples of one shard, read as a stream (consecutive members with one key form a sample)."""
    current: RawSample | None = None
    try:
        with fsio.open_file(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member_name(member.name)
                data = tar.extractfile(member).read()
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key, url, {}, {})
                current.fields[ext] = data
                current.spans[ext] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError, EOFError) as exn:
        raise ShardReadError(url, f"{type(exn).__name__}: {exn}") from exn
    if current is not None:
        yield current


def read_span(url: str, span: tuple[int, int]) -> bytes:
    """The bytes of one member of the shard at ``url``, by its ``(offset, size)`` from :class:`RawSample`."""
    start, size = span
    try:
        data = fsio.read_range(url, start, start + size)
    except OSError as exn:
        raise ShardReadError(url, f"{type(exn).__name__}: {exn}") from exn
    if len(data) != size:
        raise ShardReadError(url, f"member at offset {start} holds {len(data)} of {size} bytes: truncated?")
    return data


def _check_shard_count(url: str | None, seen: int, expected_counts: Mapping[str, int] | None) -> None:
    """Raise when a shard ended with fewer or more samples than ``_info.json`` lists (truncation at a tar
    header boundary ends the tar stream silently, so this is the only way to notice it)."""
    expected = None if url is None or expected_counts is None else expected_counts.get(url)
    if expected is not None and seen != expected:
        raise ShardReadError(url, f"holds {seen} samples but {expected} were written: truncated?")


def iter_raw_samples(
    urls: list[str],
    *,
    expected_counts: Mapping[str, int] | None = None,
    nodesplitter: Splitter | None = None,
    workersplitter: Splitter | None = None,
) -> Iterator[RawSample]:
    """Yield the undecoded samples of the shards at ``urls``, in shard order.

    ``expected_counts`` (URL -> sample count, as :func:`iter_split` passes) turns a silently truncated shard
    into an error. Ray Train workers pass ``webdataset.split_by_node`` / ``split_by_worker`` (any callable
    from an iterable of ``{"url": ...}`` dicts to the ones this reader takes); the default reads every
    shard. Any unreadable or corrupt shard raises :class:`ShardReadError` naming it.
    """
    shards: Iterable[dict] = [{"url": url} for url in urls]
    for splitter in (nodesplitter or keep_all_shards, workersplitter or keep_all_shards):
        shards = splitter(shards)
    for shard in shards:
        url, seen = shard["url"], 0
        for sample in _shard_samples(url):
            seen += 1
            yield sample
        _check_shard_count(url, seen, expected_counts)


def count_samples(url: str) -> int:
    """The number of samples in one shard, without decoding any image."""
    return sum(1 for _ in _shard_samples(url))


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of a dataset must be: its image's channels and size, and a label below `num_classes`.

    With `fit`, images of any size are fitted to `image_size` as they are decoded; without, each must
    already be `channels x image_size x image_size`.
    """

    channels: int
    image_size: int
    num_classes: int
    fit: ImageFit | None = None

    @classmethod
    def of(cls, info: DatasetInfo, fit: ImageFit | None = None) -> "SampleSpec":
        """The spec of a dataset's samples (`fit` is required when its images have any size)."""
        if info.image_size is None and fit is None:
            raise ValueError(f"dataset {info.name!r} has images of any size: a SampleSpec needs an ImageFit")
        size = fit.size if fit is not None else info.image_size
        return cls(info.channels, size, len(info.classes), fit)

    def decode(self, data: bytes, key: str = "") -> torch.Tensor:
        """The image of encoded `data` as this spec's samples have it (fitted when `fit` is set)."""
        return self.fit(data, key) if self.fit is not None else decode_image(data)


def check_label(sample: RawSample, spec: SampleSpec | None) -> int:
    """The sample's label; a missing, malformed or out-of-range one raises :class:`ShardReadError` naming it."""
    try:
        label = sample.label
    except (KeyError, ValueError) as exn:
        raise ShardReadError(sample.url, f"sample {sample.key!r}: label {exn!r}") from exn
    if spec is not None and not 0 <= label < spec.num_classes:
        raise ShardReadError(sample.url, f"sample {sample.key!r}: label {label} is outside 0..{spec.num_classes - 1}")
    return label


def decode_sample(sample: RawSample, spec: SampleSpec | None = None) -> tuple[str, torch.Tensor, int]:
    """``(key, uint8 CxHxW image, label)`` of a raw sample, checked against ``spec`` when given; a bad sample
    (undecodable, a decompression bomb, another size or channel count, a bad label) raises
    :class:`ShardReadError` naming the shard and the sample."""
    label = check_label(sample, spec)
    try:
        data = sample.fields[sample.image_field]
        image = spec.decode(data, sample.key) if spec is not None else decode_image(data)
    except (KeyError, ValueError, OSError, Image.DecompressionBombError) as exn:
        raise ShardReadError(sample.url, f"sample {sample.key!r}: {exn!r}") from exn
    if spec is not None and tuple(image.shape) != (spec.channels, spec.image_size, spec.image_size):
        raise ShardReadError(sample.url, f"sample {sample.key!r}: image is {tuple(image.shape)} (CxHxW), the "
                                         f"dataset's are {(spec.channels, spec.image_size, spec.image_size)}")
    return sample.key, image, label


def iter_samples(
    urls: list[str],
    classes: Collection[int] | None = None,
    *,
    expected_counts: Mapping[str, int] | None = None,
    spec: SampleSpec | None = None,
    nodesplitter: Splitter | None = None,
    workersplitter: Splitter | None = None,
) -> Iterator[tuple[str, torch.Tensor, int]]:
    """Yield ``(key, uint8 CxHxW image, label)`` from the shards at ``urls``, in shard order.

    :func:`iter_raw_samples` with the images decoded (and checked against ``spec``); ``classes`` keeps
    only those labels (skipped samples are not decoded).
    """
    wanted = None if classes is None else {int(c) for c in classes}
    for sample in iter_raw_samples(urls, expected_counts=expected_counts, nodesplitter=nodesplitter,
                                   workersplitter=workersplitter):
        if wanted is not None and check_label(sample, spec) not in wanted:
            continue
        yield decode_sample(sample, spec)


def iter_split(
    root: str,
    split: str,
    classes: Collection[int] | None = None,
    *,
    fit: ImageFit | None = None,
    nodesplitter: Splitter | None = None,
    workersplitter: Splitter | None = None,
) -> Iterator[tuple[str, torch.Tensor, int]]:
    """:func:`iter_samples` over one split of the dataset at ``root``, checking every shard's count (where
    recorded) and every sample against `_info.json` (``fit``: for datasets of images of any size)."""
    info = read_info(root)
    shards = info.shard_list(root, split)
    yield from iter_samples(list(shards.urls), classes, expected_counts=shards.expected_counts(),
                            spec=SampleSpec.of(info, fit), nodesplitter=nodesplitter, workersplitter=workersplitter)


def load_split(
    root: str, split: str, classes: Collection[int] | None = None, *, fit: ImageFit | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All of ``split`` (or its ``classes``) in memory, in shard order: uint8 ``NxCxHxW`` images, int64 labels, keys.

    For small datasets (MNIST-sized); stream large ones with :func:`iter_split`.
    """
    spec = SampleSpec.of(read_info(root), fit)
    keys, images, labels = [], [], []
    for key, image, label in iter_split(root, split, classes, fit=fit):
        keys.append(key)
        images.append(image)
        labels.append(label)
    if not images:
        empty = torch.empty((0, spec.channels, spec.image_size, spec.image_size), dtype=torch.uint8)
        return empty, torch.empty(0, dtype=torch.int64), keys
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys
