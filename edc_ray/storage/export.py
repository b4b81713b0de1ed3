"""Exports of a distilled set for other tools, and imports of sets made elsewhere.

    <run>/export/images/<class name>/<key>.png   the distilled images, lossless, one folder per class
    <run>/export/teachers.json                   the soft-label teacher spec (observers, normalisation,
                                                 evaluation protocol)

An ImageFolder made by any tool (e.g. for DD-Ranking) converts back into one WebDataset shard with
`imagefolder_shard`, so `jobs/evaluate.py` evaluates it with our protocol.
"""
from __future__ import annotations

import re

import numpy as np

from edc_ray.storage import fsio
from edc_ray.storage.shards import encode_png, iter_raw_samples, write_shard
from edc_ray.storage.sources import CHANNEL_MODES, class_files, read_image


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


def read_imagefolder(src: str, channels: int, image_size: int) -> list[tuple[np.ndarray, int]]:
    """(HxWxC uint8 image, label) of an ImageFolder whose sorted class folders are the labels.

    Raises ValueError naming the file when an image does not have the dataset's size.
    """
    classes = fsio.list_dirs(src)
    if not classes:
        raise ValueError(f"{src!r} has no class folders; expected <src>/<class>/<image>.png")
    samples = []
    for url, label in class_files(src, classes):
        array = read_image(url, CHANNEL_MODES[channels])
        if array.shape[:2] != (image_size, image_size):
            raise ValueError(f"{url}: image is {array.shape[1]}x{array.shape[0]}, the dataset's are "
                             f"{image_size}x{image_size}")
        samples.append((array.reshape(image_size, image_size, channels), label))
    return samples


def imagefolder_shard(src: str, dest_url: str, channels: int, image_size: int, num_classes: int) -> int:
    """Convert the ImageFolder at `src` into one WebDataset shard at `dest_url`; returns the count."""
    samples = read_imagefolder(src, channels, image_size)
    labels = {label for _, label in samples}
    if len(labels) != num_classes:
        raise ValueError(f"{src!r} has {len(labels)} class folders with images; the dataset has "
                         f"{num_classes} classes")
    return write_shard(dest_url, [{"__key__": f"img-{i:06d}", "png": encode_png(image), "cls": label}
                                  for i, (image, label) in enumerate(samples)])
