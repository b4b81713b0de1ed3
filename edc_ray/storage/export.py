"""Exports of a distilled set for other tools, and imports of sets made elsewhere.

    <run>/export/images/<class name>/<key>.png   the distilled images, lossless, one folder per class
    <run>/export/teachers.json                   the soft-label teacher spec (observers, normalisation,
                                                 evaluation protocol)

An ImageFolder made by any tool (e.g. for DD-Ranking) converts back into one WebDataset shard with
`imagefolder_shard` (folders named after the dataset's classes), so `jobs/evaluate.py` evaluates it
with our protocol.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

from edc_ray.errors import DataError
from edc_ray.storage import fsio
from edc_ray.storage.images import CHANNEL_MODES, encode_png
from edc_ray.storage.shards import iter_raw_samples, write_shard
from edc_ray.storage.sources import class_files, read_image


def safe_name(name: str) -> str:
    """A class name usable as a folder name on every filesystem and in S3 keys."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def export_imagefolder(urls: list[str], classes: list[str], dest: str) -> int:
    """Write every image of the shards at `urls` as `<dest>/<class>/<key>.<ext>`; returns the count.

    The shards' encoded bytes are copied as they are (distilled sets are lossless PNG). Folders are
    named `<label index>-<class name>` so that their sorted order is the label order.
    """
    width = len(str(len(classes) - 1))
    count = 0
    for sample in iter_raw_samples(urls):
        folder = f"{sample.label:0{width}d}-{safe_name(classes[sample.label])}"
        field = sample.image_field
        fsio.atomic_write_bytes(fsio.join(dest, folder, f"{sample.key}.{field}"), sample.fields[field])
        count += 1
    return count


def folder_labels(folders: list[str], classes: list[str], src: str) -> dict[str, int]:
    """The label of each class folder: its name is a class name, that name made safe (`safe_name`), or
    `<index>-<safe name>` as `export_imagefolder` writes it. An unknown folder is an error, never a guess."""
    names: dict[str, int] = {}
    for index, name in enumerate(classes):
        for form in (name, safe_name(name), f"{index}-{safe_name(name)}",
                     f"{index:0{len(str(len(classes) - 1))}d}-{safe_name(name)}"):
            names.setdefault(form, index)
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(f"{src!r}: class folders {unknown[:10]} are not classes of the dataset; name each folder "
                        f"after its class (e.g. {classes[:3]}), or <index>-<class> as the export does")
    labels = {f: names[f] for f in folders}
    twice = sorted(classes[v] for v, n in Counter(labels.values()).items() if n > 1)
    if twice:
        raise DataError(f"{src!r}: more than one folder names class(es) {twice[:10]}")
    return labels


def read_imagefolder(src: str, channels: int, image_size: int, classes: list[str]) -> list[tuple[np.ndarray, int]]:
    """(HxWxC uint8 image, label) of an ImageFolder whose class folders are named after `classes`
    (see `folder_labels`); every class must have images.

    Raises DataError naming the file when an image does not have the dataset's size, and naming the
    folders when they do not map onto the classes.
    """
    folders = fsio.list_dirs(src)
    if not folders:
        raise DataError(f"{src!r} has no class folders; expected <src>/<class>/<image>.png")
    labels = folder_labels(folders, classes, src)
    samples = []
    for url, folder in class_files(src, folders):
        array = read_image(url, CHANNEL_MODES[channels])
        if array.shape[:2] != (image_size, image_size):
            raise DataError(f"{url}: image is {array.shape[1]}x{array.shape[0]}, the dataset's are "
                            f"{image_size}x{image_size}")
        samples.append((array.reshape(image_size, image_size, channels), labels[folders[folder]]))
    missing = sorted(set(range(len(classes))) - {label for _, label in samples})
    if missing:
        raise DataError(f"{src!r} has no images of {len(missing)} of the dataset's {len(classes)} classes: "
                        f"{[classes[c] for c in missing[:10]]}")
    return samples


def imagefolder_shard(src: str, dest_url: str, channels: int, image_size: int, classes: list[str]) -> int:
    """Convert the ImageFolder at `src` into one WebDataset shard at `dest_url`; returns the count."""
    samples = read_imagefolder(src, channels, image_size, classes)
    return write_shard(dest_url, [{"__key__": f"img-{i:06d}", "png": encode_png(image), "cls": label}
                                  for i, (image, label) in enumerate(samples)])
