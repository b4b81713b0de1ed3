"""Image-classification sources that ``prepare`` turns into shards.

``open_source(name, src, **options)`` returns a :class:`Source`: its class names (index = label) and,
per split in output order, its items in the source's own order: :class:`ArrayItems` (uint8 pixels,
from idx / CIFAR / digits) or :class:`FileItems` (image files, whose bytes prepare keeps as they are).
Items slice into small picklable chunks, one per shard, so prepare can hand each to a Ray task.
Source files are read through fsspec, so ``src`` may be a URL.
"""

from __future__ import annotations

import inspect
import io
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edc_ray.errors import DataError
from edc_ray.storage import fsio
from edc_ray.storage.images import CHANNEL_MODES

DIGIT_NAMES = [str(d) for d in range(10)]
FASHION_MNIST_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IDX_NAMES = {"mnist": DIGIT_NAMES, "fashion-mnist": FASHION_MNIST_NAMES}
IDX_PREFIXES = {"train": "train", "test": "t10k"}  # split -> file name prefix
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # ubyte data with 3 / 1 dimensions
IDX_NDIM = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FOLDER_SPLITS = ("train", "val", "test")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}

DIGITS_TEST_FRACTION, DIGITS_SEED = 0.2, 0
TORCHVISION_CACHE = Path.home() / ".cache" / "edc_ray" / "torchvision"
TORCHVISION_OFFLINE = {  # dataset -> the offline source that reads the same files
    "MNIST": "--source idx --src ../shared/data/mnist",
    "FashionMNIST": "--source idx --src ../shared/data/fashion-mnist",
    "CIFAR10": "--source cifar10 --src <folder holding cifar-10-batches-py/>",
    "CIFAR100": "--source cifar100 --src <folder holding cifar-100-python/>",
}


@dataclass(frozen=True)
class ArrayItems:
    """Images as uint8 arrays (``N x H x W`` or ``N x H x W x C``) and their labels."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def chunk(self, start: int, stop: int) -> "ArrayItems":
        """Items ``start:stop`` as their own arrays (a slice would pickle the whole base array)."""
        return ArrayItems(np.ascontiguousarray(self.images[start:stop]), np.array(self.labels[start:stop]))

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for image, label in zip(self.images, self.labels, strict=True):
            yield int(label), image


@dataclass(frozen=True)
class FileItems:
    """Image files (URLs) and their labels; ``channels`` is what every image becomes (1 or 3)."""

    urls: list[str]
    labels: list[int]
    channels: int

    def __len__(self) -> int:
        return len(self.labels)

    def chunk(self, start: int, stop: int) -> "FileItems":
        """Items ``start:stop``."""
        return FileItems(self.urls[start:stop], self.labels[start:stop], self.channels)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        yield from zip(self.labels, self.urls, strict=True)


Items = ArrayItems | FileItems


@dataclass(frozen=True)
class Source:
    """An opened source: class names and each split's items, in output order."""

    name: str
    classes: list[str]
    splits: dict[str, Items]


def _require_path(source: str, src: str | None) -> str:
    """``src`` itself, or an error naming the missing or absent path."""
    if src is None:
        raise ValueError(f"source {source!r} needs --src (the folder holding its files)")
    if not fsio.exists(src):
        raise FileNotFoundError(f"source {source!r}: path {src!r} does not exist")
    return src


def _array_source(name: str, classes: list[str], arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Source:
    """A :class:`Source` over in-memory ``split -> (uint8 images NxHxW[xC], labels N)``, checked for consistency."""
    for split, (images, labels) in arrays.items():
        if len(images) != len(labels):
            raise ValueError(f"{name} split {split!r}: {len(images)} images but {len(labels)} labels")
        bad = labels[(labels < 0) | (labels >= len(classes))]
        if bad.size:
            raise ValueError(f"{name} split {split!r}: label {int(bad[0])} outside 0..{len(classes) - 1}")

    return Source(name, classes, {split: ArrayItems(images, labels) for split, (images, labels) in arrays.items()})


def open_digits(src: str | None = None) -> Source:
    """scikit-learn's bundled 8x8 digits, scaled 0..16 -> 0..255, split 80/20 stratified (seed 0), in file order."""
    if src is not None:
        raise ValueError(f"source 'digits' ships with scikit-learn and takes no --src (got {src!r})")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SEED
    )
    arrays = {split: (images[np.sort(idx)], labels[np.sort(idx)]) for split, idx in (("train", train), ("test", test))}
    return _array_source("digits", DIGIT_NAMES, arrays)


def read_idx(url: str, magic: int, limit: int | None = None) -> np.ndarray:
    """The uint8 array of an idx file (``.gz`` decompressed on the fly), checking its magic number and size.

    ``magic`` is 2051 for an images file (N x rows x cols) and 2049 for a labels file (N); ``limit`` reads
    only the first items.
    """
    with fsio.open_file(url, compression="gzip" if url.endswith(".gz") else None) as f:
        found = int.from_bytes(f.read(4), "big")
        if found != magic:
            raise ValueError(f"{url}: idx magic number {found}, expected {magic} (2051: images, 2049: labels)")
        header = f.read(4 * IDX_NDIM[magic])
        if len(header) != 4 * IDX_NDIM[magic]:
            raise ValueError(f"{url}: truncated idx file: the header ends after {4 + len(header)} bytes")
        dims = [int.from_bytes(header[i : i + 4], "big") for i in range(0, len(header), 4)]
        count = dims[0] if limit is None else min(limit, dims[0])
        size = count * prod(dims[1:])
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{url}: truncated idx file: its header promises {dims} but the data ends early")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *dims[1:])


def open_idx(src: str | None, names: str | None = None) -> Source:
    """MNIST-format idx ``.gz`` files in ``src`` (train-* and t10k-* -> splits train and test).

    ``names`` picks the class names: "mnist" (digits) or "fashion-mnist"; by default "fashion-mnist" when
    the folder name contains "fashion".
    """
    src = _require_path("idx", src)
    names = names or ("fashion-mnist" if "fashion" in fsio.basename(src).lower() else "mnist")
    if names not in IDX_NAMES:
        raise ValueError(f"idx class names {names!r} unknown; allowed: {sorted(IDX_NAMES)}")
    arrays = {
        split: (
            read_idx(fsio.join(src, f"{prefix}-images-idx3-ubyte.gz"), IDX_IMAGES_MAGIC),
            read_idx(fsio.join(src, f"{prefix}-labels-idx1-ubyte.gz"), IDX_LABELS_MAGIC).astype(np.int64),
        )
        for split, prefix in IDX_PREFIXES.items()
    }
    return _array_source(fsio.basename(src), IDX_NAMES[names], arrays)


@dataclass(frozen=True)
class CifarLayout:
    """Where the CIFAR python pickles keep things."""

    name: str
    folder: str
    splits: dict[str, tuple[str, ...]]
    meta: str
    labels_key: str
    names_key: str


CIFAR10 = CifarLayout(
    "cifar10", "cifar-10-batches-py", {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "batches.meta", "labels", "label_names",
)  # fmt: skip
CIFAR100 = CifarLayout(
    "cifar100", "cifar-100-python", {"train": ("train",), "test": ("test",)}, "meta", "fine_labels", "fine_label_names"
)


# What a CIFAR batch pickle may refer to: numpy arrays (rebuilt by `_reconstruct` + ndarray state, by
# `_frombuffer` under pickle protocol 5, with `_codecs.encode` for bytes written by Python 3). Anything
# else could run code when loaded.
_CIFAR_GLOBALS = {(f"numpy.{core}.{module}", name) for core in ("core", "_core")
                  for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))} | {
    ("numpy", "ndarray"), ("_codecs", "encode")}
_CIFAR_DTYPES = {"u1", "i1", "i2", "i4", "i8", "u2", "u4", "u8"}  # images are u1; labels may be stored as ints


def _cifar_dtype(name: Any, *args: Any) -> np.dtype:
    """`numpy.dtype` for a CIFAR pickle: integer types only (an object dtype would unpickle objects)."""
    key = name.decode() if isinstance(name, bytes) else str(name)
    if key.lstrip("<>|=") not in _CIFAR_DTYPES:
        raise pickle.UnpicklingError(f"numpy dtype {key!r} is not one a CIFAR batch holds")
    return np.dtype(key, *args)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only builtin containers, bytes, str, numbers and integer numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "dtype"):
            return _cifar_dtype
        if (module, name) in _CIFAR_GLOBALS:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds")


def _unpickle(url: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys, read with a restricted unpickler.

    The CIFAR python format is a pickle, and a pickle can run code when loaded, so only what a CIFAR batch
    holds is admitted (builtin containers, bytes, str, numbers, integer numpy arrays); anything else is
    refused with a `DataError` naming the file, before any of it runs. The originals were written by
    Python 2, so ``encoding="bytes"`` is needed and gives ``bytes`` keys; files written by Python 3 have
    ``str`` keys. Both are accepted.
    """
    try:
        data = _CifarUnpickler(io.BytesIO(fsio.read_bytes(url)), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(f"{url}: not a CIFAR python pickle, refused ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{url}: not a CIFAR python pickle (it holds a {type(data).__name__}, not a dict)")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in data.items()}


def _entry(batch: dict[str, Any], key: str, url: str) -> Any:
    """``batch[key]``, or an error saying which CIFAR file lacks it."""
    if key not in batch:
        raise ValueError(f"{url} has no {key!r} entry (it has {sorted(batch)}): not a CIFAR python pickle")
    return batch[key]


def _cifar_split(root: str, files: tuple[str, ...], labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (rows of 3072 bytes, planar CHW -> NxHxWxC) and labels of one split's batch files."""
    images, labels = [], []
    for url in (fsio.join(root, name) for name in files):
        batch = _unpickle(url)
        images.append(np.asarray(_entry(batch, "data", url), dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(_entry(batch, labels_key, url), dtype=np.int64))
    return np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)


def _open_cifar(layout: CifarLayout, src: str | None) -> Source:
    """A CIFAR python folder: ``src`` is the folder itself or the one holding it."""
    src = _require_path(layout.name, src)
    root = src if fsio.exists(fsio.join(src, layout.meta)) else fsio.join(src, layout.folder)
    meta_url = fsio.join(root, layout.meta)
    if not fsio.exists(meta_url):
        raise FileNotFoundError(f"{layout.name}: neither {src!r} nor {root!r} holds {layout.meta!r}")
    names = _entry(_unpickle(meta_url), layout.names_key, meta_url)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    arrays = {split: _cifar_split(root, files, layout.labels_key) for split, files in layout.splits.items()}
    return _array_source(layout.name, classes, arrays)


def open_cifar10(src: str | None) -> Source:
    """CIFAR-10 python batches (``cifar-10-batches-py/``): 50,000 train / 10,000 test 32x32 RGB images."""
    return _open_cifar(CIFAR10, src)


def open_cifar100(src: str | None) -> Source:
    """CIFAR-100 python files (``cifar-100-python/``) with the 100 fine labels."""
    return _open_cifar(CIFAR100, src)


def with_image(url: str, read: Callable[[Image.Image], Any], data: bytes | None = None) -> Any:
    """`read(image)` of the image file at ``url`` (or of its bytes ``data``, already read); a file that is
    not an image (or is a decompression bomb, or, from ``data``, is truncated) raises `DataError` naming it."""
    errors = (Image.UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError)
    try:
        with (io.BytesIO(data) if data is not None else fsio.open_file(url)) as f, Image.open(f) as image:
            return read(image)
    except errors + ((OSError,) if data is not None else ()) as err:
        raise DataError(f"{url}: not a readable image ({type(err).__name__}: {err})") from None


def read_image(url: str, mode: str) -> np.ndarray:
    """An image file as a uint8 array in PIL ``mode`` ("L" -> HxW, "RGB" -> HxWx3)."""
    return with_image(url, lambda image: np.asarray(image.convert(mode), dtype=np.uint8))


def _is_gray(url: str) -> bool:
    """Whether the image file at ``url`` is grayscale (reads the header only)."""
    return with_image(url, lambda image: image.mode in GRAY_MODES)


def class_files(root: str, classes: list[str]) -> list[tuple[str, int]]:
    """(url, label) of the image files in ``<root>/<class>/``, the label being the class's index."""
    return [(url, label) for label, name in enumerate(classes)
            for url in fsio.list_files(fsio.join(root, name)) if url.lower().endswith(IMAGE_EXTENSIONS)]


def open_imagefolder(src: str | None, channels: int | None = None) -> Source:
    """``<src>/<split>/<class>/*.{png,jpg,jpeg,bmp,webp}`` for the splits among train/val/test that exist.

    Classes are the sorted class folder names over all splits (for ImageNet: the sorted wnids,
    torchvision's class order). ``channels`` 1 or 3 is what every image becomes (grayscale or RGB); by
    default RGB unless every image is grayscale. Sizes are left as they are.
    """
    src = _require_path("imagefolder", src)
    splits = [split for split in FOLDER_SPLITS if split in fsio.list_dirs(src)]
    if not splits:
        raise ValueError(f"imagefolder {src!r} has none of the split folders {list(FOLDER_SPLITS)}")
    classes = sorted({name for split in splits for name in fsio.list_dirs(fsio.join(src, split))})
    files = {split: class_files(fsio.join(src, split), classes) for split in splits}
    if channels is None:
        channels = 1 if all(_is_gray(url) for items in files.values() for url, _ in items) else 3
    if channels not in CHANNEL_MODES:
        raise ValueError(f"imagefolder channels {channels!r} not supported; allowed: {sorted(CHANNEL_MODES)}")
    splits = {split: FileItems([url for url, _ in items], [label for _, label in items], channels)
              for split, items in files.items()}
    return Source(fsio.basename(src), classes, splits)


def open_torchvision(src: str | None = None, dataset: str = "CIFAR10") -> Source:
    """A torchvision dataset downloaded into ``src`` (default ``~/.cache/edc_ray/torchvision``).

    Without network access (and no cached copy) this raises a ``RuntimeError`` that names the offline source
    reading the same files.
    """
    if dataset not in TORCHVISION_OFFLINE:
        raise ValueError(f"torchvision dataset {dataset!r} not supported; allowed: {sorted(TORCHVISION_OFFLINE)}")
    import torchvision.datasets

    factory = getattr(torchvision.datasets, dataset)
    root = src or str(TORCHVISION_CACHE)
    try:
        loaded = {split: factory(root, train=split == "train", download=True) for split in ("train", "test")}
    except (OSError, RuntimeError) as exn:  # URLError is an OSError; torchvision wraps mirror failures as RuntimeError
        raise RuntimeError(
            f"could not download torchvision {dataset} into {root!r}: the network looks unreachable ({exn}). "
            f"Use the offline source instead: python jobs/prepare.py {TORCHVISION_OFFLINE[dataset]} --out <root>"
        ) from exn
    arrays = {split: (np.asarray(d.data), np.asarray(d.targets, dtype=np.int64)) for split, d in loaded.items()}
    return _array_source(dataset.lower(), list(loaded["train"].classes), arrays)


SOURCES: dict[str, Callable[..., Source]] = {
    "digits": open_digits,
    "idx": open_idx,
    "cifar10": open_cifar10,
    "cifar100": open_cifar100,
    "imagefolder": open_imagefolder,
    "torchvision": open_torchvision,
}


def open_source(source: str, src: str | None, **options: Any) -> Source:
    """Open the source called ``source`` on ``src`` with its own ``options`` (e.g. ``names=``, ``channels=``)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; allowed: {sorted(SOURCES)}")
    opener = SOURCES[source]
    try:
        inspect.signature(opener).bind(src, **options)
    except TypeError as exn:
        allowed = [p for p in inspect.signature(opener).parameters if p != "src"]
        raise ValueError(f"source {source!r} does not take options {sorted(options)}; it takes {allowed}") from exn
    return opener(src, **options)
