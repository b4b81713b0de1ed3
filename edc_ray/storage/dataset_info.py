"""What a dataset root's ``_info.json`` says, in timm's WebDataset form, and how a split names its shards.

The file is the one timm's ``wds/`` reader (and the shared ``imagenet-1k-wds`` copies) use, so roots that
edc-ray prepares can be read by timm and those copies can be read here in place::

    {"name": ..., "splits": {"train": {"name": "train", "num_samples": N,
                                        "filenames": ["train/shard-000000.tar", ...],   # relative to the root
                                        "shard_lengths": [5000, ...]}, ...},
     # optional, written by edc-ray's prepare:
     "classes": [...], "image_size": 28 or null, "channels": 1, "mean": [...], "std": [...],
     "prepared_with": {...}}

``image_size`` null (or absent) means the images have any size and are resized when read
(:class:`edc_ray.storage.images.ImageFit`). A split may also be named by a brace pattern of shard files,
``imagenet1k-train-{0000..1023}.tar``, optionally with its sample count after ``|`` (timm's form).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edc_ray.errors import DataError
from edc_ray.storage import fsio

INFO_NAME = "_info.json"
PREPARE_COMMAND = "python jobs/prepare.py --source <source> --src <folder> --out {root}"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_CLASSES = "imagenet-1k"  # data.classes: the sorted wnids, without a file


@dataclass(frozen=True)
class ShardList:
    """The shard URLs of one split and, when known, the samples each holds (None: not recorded)."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...] | None
    num_samples: int

    def expected_counts(self) -> dict[str, int] | None:
        """URL -> sample count, for the readers' truncation check (None when lengths are unknown)."""
        return None if self.lengths is None else dict(zip(self.urls, self.lengths, strict=True))

    def estimated_lengths(self) -> tuple[int, ...]:
        """The recorded lengths, or the sample count spread evenly (rounded down) over the shards."""
        if self.lengths is not None:
            return self.lengths
        return (self.num_samples // max(1, len(self.urls)),) * len(self.urls)


@dataclass
class SplitInfo:
    """One split: its shard files (relative to the dataset root) and their sample counts.

    ``shard_lengths`` may be empty when a split was named by a pattern without recorded lengths;
    ``counts_per_class`` is recorded by edc-ray's prepare only.
    """

    name: str
    num_samples: int
    filenames: list[str]
    shard_lengths: list[int]
    counts_per_class: list[int] | None = None

    def shard_list(self, root: str) -> ShardList:
        """The split's shards as URLs under ``root``."""
        lengths = tuple(self.shard_lengths) if len(self.shard_lengths) == len(self.filenames) else None
        return ShardList(tuple(fsio.join(root, name) for name in self.filenames), lengths, self.num_samples)

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> SplitInfo:
        """timm's split entry (``num_samples``, ``filenames``, ``shard_lengths``) or edc-ray's first form
        (``count``, ``shards`` under ``<split>/``, ``shard_counts``)."""
        if "shards" in data:  # written by edc-ray before it adopted timm's form
            return cls(name, int(data["count"]), [f"{name}/{s}" for s in data["shards"]],
                       [int(n) for n in data["shard_counts"]], data.get("counts_per_class"))
        lengths = [int(n) for n in data.get("shard_lengths", [])]
        total = int(data["num_samples"]) if "num_samples" in data else sum(lengths)
        return cls(str(data.get("name", name)), total, [str(f) for f in data["filenames"]], lengths,
                   data.get("counts_per_class"))


@dataclass
class DatasetInfo:
    """A dataset root's description (labels index ``classes``; ``mean``/``std`` over train pixels in [0,1]).

    ``image_size`` None: the images have any size. ``mean``/``std`` None: not measured (readers use
    ImageNet's).
    """

    name: str
    classes: list[str]
    image_size: int | None
    channels: int
    mean: list[float] | None
    std: list[float] | None
    splits: dict[str, SplitInfo]
    prepared_with: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in timm's form (plus edc-ray's fields)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], classes: list[str] | None = None) -> DatasetInfo:
        """Parse an ``_info.json``; ``classes`` (from ``data.classes``) names the labels when it does not."""
        names = classes or data.get("classes") or _feature_names(data)
        if not names and "num_classes" in data:
            names = [str(c) for c in range(int(data["num_classes"]))]
        if not names:
            raise KeyError("classes (the file names no classes: set data.classes to a file of class names, "
                           "one per line in label order)")
        splits = {name: SplitInfo.from_dict(name, split) for name, split in data["splits"].items()}
        return cls(str(data.get("name", "dataset")), [str(n) for n in names], data.get("image_size"),
                   int(data.get("channels", 3)), data.get("mean"), data.get("std"), splits,
                   dict(data.get("prepared_with", {})))

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std): the measured ones, else ImageNet's (grayscale: their averages)."""
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        if self.channels == 1:
            return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        return IMAGENET_MEAN, IMAGENET_STD

    def split(self, split: str) -> SplitInfo:
        """The split named ``split``, or one named by a brace pattern of shard files (``|count`` optional)."""
        if split in self.splits:
            return self.splits[split]
        if not is_pattern(split):
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)} "
                             "(or name shards with a pattern such as 'train-{0000..0099}.tar|12800')")
        return _pattern_split(split, self.splits.values())

    def shard_list(self, root: str, split: str) -> ShardList:
        """:meth:`split`'s shards as URLs under ``root``."""
        return self.split(split).shard_list(root)


def _feature_names(data: Mapping[str, Any]) -> list[str] | None:
    """Class names in a Hugging Face ``features`` entry (``{"cls": {"names": [...]}}``), if any."""
    for feature in (data.get("features") or {}).values():
        if isinstance(feature, Mapping) and isinstance(feature.get("names"), list):
            return feature["names"]
    return None


def is_pattern(split: str) -> bool:
    """Whether a split name is a shard pattern (timm: it contains ``.tar`` or a ``..`` range)."""
    return ".tar" in split or ".." in split


def _pattern_split(split: str, known: Any) -> SplitInfo:
    """The shards a brace pattern names, with their lengths where a known split records them."""
    from webdataset.shardlists import expand_urls

    pattern, _, count = split.partition("|")
    filenames = list(expand_urls(pattern))
    recorded = {f: n for s in known for f, n in zip(s.filenames, s.shard_lengths)}
    if all(f in recorded for f in filenames):
        lengths = [recorded[f] for f in filenames]
        return SplitInfo(split, int(count) if count else sum(lengths), filenames, lengths)
    if not count:
        raise ValueError(f"split pattern {split!r}: its shards' sample counts are not in _info.json; "
                         f"add the split's sample count after '|', e.g. '{pattern}|12800'")
    return SplitInfo(split, int(count), filenames, [])


def info_url(root: str) -> str:
    """Where the ``_info.json`` of the dataset at ``root`` lives."""
    return fsio.join(root, INFO_NAME)


def write_info(root: str, info: DatasetInfo) -> None:
    """Write ``<root>/_info.json`` atomically."""
    fsio.atomic_write_json(info_url(root), info.to_dict())


def imagenet_classes() -> list[str]:
    """ImageNet-1k's 1000 WordNet ids, sorted: torchvision's and timm's class order (shipped with timm)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def read_class_names(url: str) -> list[str]:
    """Class names from a text file, one per line in label order (blank lines ignored); ``imagenet-1k``:
    :func:`imagenet_classes`."""
    if url == IMAGENET_CLASSES:
        return imagenet_classes()
    if not fsio.exists(url):
        raise DataError(f"data.classes: {url} not found (a text file with one class name per line, or "
                        f"{IMAGENET_CLASSES!r} for ImageNet-1k's sorted wnids)")
    return [line.strip() for line in fsio.read_bytes(url).decode().splitlines() if line.strip()]


def read_info(root: str, classes: str | None = None) -> DatasetInfo:
    """Read ``<root>/_info.json`` (``classes``: a file of class names for infos that name none).

    With ``classes`` and no ``_info.json``, the dataset has no named splits: name them by patterns
    with counts (``train-{0000..0099}.tar|12800``).

    A missing or invalid file raises an error naming it and saying how to prepare the dataset.
    """
    url = info_url(root)
    names = read_class_names(classes) if classes else None
    if not fsio.exists(url) and names:  # shards named by patterns in the config, with their counts
        return DatasetInfo(fsio.basename(root), names, None, 3, None, None, {})
    if not fsio.exists(url):
        command = PREPARE_COMMAND.format(root=root)
        raise FileNotFoundError(f"{url} not found: the dataset is not prepared yet; run `{command}` first "
                                "(WebDataset shards of your own need a timm-style _info.json beside them)")
    try:
        return DatasetInfo.from_dict(fsio.read_json(url), names)
    except (ValueError, TypeError, KeyError, AttributeError) as exn:
        command = PREPARE_COMMAND.format(root=root)
        problem = f"{url} is not a valid dataset info file ({exn!r})"
        raise ValueError(f"{problem}; re-create it: `{command} --overwrite`") from exn
