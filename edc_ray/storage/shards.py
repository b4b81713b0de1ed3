"""WebDataset shards of labelled images: PNG coding, shard writing, ``_info.json`` and readers.

A prepared dataset root holds ``<root>/<split>/shard-NNNNNN.tar`` with samples ``{__key__, png, cls}`` and
``<root>/_info.json`` (a :class:`DatasetInfo`), written last as the commit marker.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from edc_ray.storage import fsio

INFO_NAME = "_info.json"
PREPARE_COMMAND = "python jobs/prepare.py --source <source> --src <folder> --out {root}"

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


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 image, ``HxW`` (grayscale) or ``HxWxC`` with C in 1 or 3."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"expected a uint8 HxW or HxWx{{1,3}} image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def decode_image(data: bytes) -> torch.Tensor:
    """A uint8 ``CxHxW`` tensor from encoded image bytes (PNG, JPEG or WebP; C=1 for grayscale, 3 for RGB)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB"):
            raise ValueError(f"image mode {image.mode!r} is not supported: expected 'L' (grayscale) or 'RGB'")
        array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


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


@dataclass
class SplitInfo:
    """One split of a prepared dataset; ``shards`` are file names relative to ``<root>/<split>/``."""

    count: int
    counts_per_class: list[int]
    shards: list[str]
    shard_counts: list[int]


@dataclass
class DatasetInfo:
    """What ``_info.json`` records about a prepared dataset (labels index ``classes``; stats on train in [0,1])."""

    name: str
    classes: list[str]
    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    splits: dict[str, SplitInfo]
    prepared_with: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetInfo:
        """The inverse of :meth:`to_dict`; raises ``TypeError``/``KeyError`` on missing or unknown fields."""
        fields = dict(data)
        fields["splits"] = {name: SplitInfo(**split) for name, split in data["splits"].items()}
        return cls(**fields)


def info_url(root: str) -> str:
    """Where the ``_info.json`` of the dataset at ``root`` lives."""
    return fsio.join(root, INFO_NAME)


def write_info(root: str, info: DatasetInfo) -> None:
    """Write ``<root>/_info.json`` atomically."""
    fsio.atomic_write_json(info_url(root), info.to_dict())


def read_info(root: str) -> DatasetInfo:
    """Read ``<root>/_info.json``; a missing or invalid file raises an error naming it and saying how to prepare."""
    url = info_url(root)
    if not fsio.exists(url):
        command = PREPARE_COMMAND.format(root=root)
        raise FileNotFoundError(f"{url} not found: the dataset is not prepared yet; run `{command}` first")
    try:
        return DatasetInfo.from_dict(fsio.read_json(url))
    except (ValueError, TypeError, KeyError, AttributeError) as exn:
        command = PREPARE_COMMAND.format(root=root)
        problem = f"{url} is not a valid dataset info file ({exn!r})"
        raise ValueError(f"{problem}; re-create it: `{command} --overwrite`") from exn


def _split_info(info: DatasetInfo, split: str) -> SplitInfo:
    """``info.splits[split]``, or an error naming the split and the ones that exist."""
    if split not in info.splits:
        raise ValueError(f"dataset {info.name!r} has no split {split!r}; it has {sorted(info.splits)}")
    return info.splits[split]


def shard_urls(root: str, info: DatasetInfo, split: str) -> list[str]:
    """URLs of the shards of ``split``, in order."""
    return [fsio.join(root, split, name) for name in _split_info(info, split).shards]


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
    """What every sample of a dataset must be: its image's channels and size, and a label below `num_classes`."""

    channels: int
    image_size: int
    num_classes: int

    @classmethod
    def of(cls, info: "DatasetInfo") -> "SampleSpec":
        """The spec a prepared dataset's `_info.json` promises."""
        return cls(info.channels, info.image_size, len(info.classes))


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
        image = decode_image(sample.fields[sample.image_field])
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
    nodesplitter: Splitter | None = None,
    workersplitter: Splitter | None = None,
) -> Iterator[tuple[str, torch.Tensor, int]]:
    """:func:`iter_samples` over one split of the prepared dataset at ``root``, checking every shard's count
    and every sample against `_info.json`."""
    info = read_info(root)
    urls = shard_urls(root, info, split)
    counts = dict(zip(urls, info.splits[split].shard_counts, strict=True))
    yield from iter_samples(urls, classes, expected_counts=counts, spec=SampleSpec.of(info),
                            nodesplitter=nodesplitter, workersplitter=workersplitter)


def load_split(
    root: str, split: str, classes: Collection[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All of ``split`` (or its ``classes``) in memory, in shard order: uint8 ``NxCxHxW`` images, int64 labels, keys.

    For small datasets (MNIST-sized); stream large ones with :func:`iter_split`.
    """
    info = read_info(root)
    keys, images, labels = [], [], []
    for key, image, label in iter_split(root, split, classes):
        keys.append(key)
        images.append(image)
        labels.append(label)
    if not images:
        empty = torch.empty((0, info.channels, info.image_size, info.image_size), dtype=torch.uint8)
        return empty, torch.empty(0, dtype=torch.int64), keys
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys
