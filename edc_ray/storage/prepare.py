"""The prepare job: convert a source into ``<root>/<split>/shard-NNNNNN.tar`` + ``<root>/_info.json``.

Each shard is one work unit (:func:`write_source_shard`): ``tasks`` > 1 runs them as Ray tasks, each
handed only its shard's items. Image files that already are JPEG, PNG or WebP in the dataset's mode are
stored with their original bytes (no re-encode, no crop); raw arrays (idx, CIFAR) and other files are
stored as lossless PNG. ``image_size`` instead resizes and centre-crops every image to a square PNG.

Output is deterministic (same input -> byte-identical shards, whatever ``tasks``) and ``_info.json``
(timm's form, so timm's ``wds/`` reader reads the result) is written last, as the commit marker: a
finished root is reused as it is. A half-written one resumes: each finished shard leaves its summary in
``<root>/_prepare/`` (after the shard itself), so a re-run with the same arguments writes only the
shards without one; the folder is removed once the info is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from edc_ray.errors import DataError
from edc_ray.storage import fsio
from edc_ray.storage.dataset_info import DatasetInfo, SplitInfo, info_url, read_info, write_info
from edc_ray.storage.images import CHANNEL_MODES, encode_png
from edc_ray.storage.shards import write_shard
from edc_ray.storage.sources import FileItems, Items, Source, open_source, with_image

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> sample field, stored as is
PROGRESS_MIN = 10_000  # sources with fewer images finish too fast for a progress bar to help
PROGRESS_FOLDER = "_prepare"  # finished shards' summaries while a prepare runs (removed once it is done)


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its split, index, the index of its first sample in the split, and its items."""

    split: str
    index: int
    first: int
    items: Items

    @property
    def name(self) -> str:
        """The shard's file name, relative to the dataset root (timm's ``filenames`` entry)."""
        return f"{self.split}/shard-{self.index:06d}.tar"


@dataclass(frozen=True)
class ShardSummary:
    """What a written shard holds: counts, exact pixel sums (when asked) and the image shapes seen."""

    split: str
    name: str
    count: int
    counts_per_class: list[int]
    pixels: int
    sums: list[int] | None
    squares: list[int] | None
    shapes: frozenset[tuple[int, int, int]]  # (H, W, C) of the stored images

    def to_json(self) -> dict:
        """Plain values (the shapes as a sorted list)."""
        return {**asdict(self), "shapes": sorted(self.shapes)}

    @classmethod
    def from_json(cls, data: dict) -> "ShardSummary":
        """The summary `to_json` wrote."""
        return cls(**{**data, "shapes": frozenset(tuple(shape) for shape in data["shapes"])})


def _summary_url(out_root: str, job: "ShardJob") -> str:
    return fsio.join(out_root, PROGRESS_FOLDER, job.name.replace("/", "-") + ".json")


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


def _file_sample(url: str, channels: int, image_size: int | None) -> tuple[str, bytes, np.ndarray]:
    """(field, bytes to store, HxWxC pixels) of an image file: its own bytes where they can be kept."""
    mode = CHANNEL_MODES[channels]
    data = fsio.read_bytes(url)
    field, pixels = with_image(url, lambda image: (
        KEPT_FORMATS.get(image.format) if image.mode == mode and image_size is None else None,
        np.asarray(image.convert(mode), dtype=np.uint8)), data)
    pixels = _as_hwc(pixels)
    if field is not None:
        return field, data, pixels
    if image_size is not None:
        pixels = _as_hwc(_fit_square(pixels[:, :, 0] if channels == 1 else pixels, image_size))
    return "png", encode_png(pixels), pixels


def _samples(job: ShardJob, image_size: int | None) -> Iterable[tuple[str, bytes, np.ndarray, int]]:
    """(field, bytes, pixels, label) of every item of the job."""
    if isinstance(job.items, FileItems):
        for label, url in job.items:
            yield (*_file_sample(url, job.items.channels, image_size), label)
        return
    for label, image in job.items:
        pixels = _as_hwc(image if image_size is None else _fit_square(image, image_size))
        yield "png", encode_png(pixels), pixels, label


def write_source_shard(out_root: str, job: ShardJob, num_classes: int, image_size: int | None,
                       with_stats: bool) -> ShardSummary:
    """Write one shard of the source (atomically), then its summary (the resume record), and return the
    summary; ``with_stats`` sums its pixels."""
    counts, shapes, pixels_seen = [0] * num_classes, set(), 0
    sums = squares = None
    samples = []
    for offset, (field, data, pixels, label) in enumerate(_samples(job, image_size)):
        samples.append({"__key__": f"{job.split}-{job.first + offset:08d}", field: data, "cls": label})
        counts[label] += 1
        shapes.add(pixels.shape)
        if with_stats:
            flat = pixels.reshape(-1, pixels.shape[2]).astype(np.int64)
            part, part_sq = flat.sum(0), (flat * flat).sum(0)
            sums = part if sums is None else sums + part
            squares = part_sq if squares is None else squares + part_sq
            pixels_seen += flat.shape[0]
    count = write_shard(fsio.join(out_root, job.name), samples)
    summary = ShardSummary(job.split, job.name, count, counts, pixels_seen,
                           None if sums is None else sums.tolist(), None if squares is None else squares.tolist(),
                           frozenset(shapes))
    fsio.atomic_write_json(_summary_url(out_root, job), summary.to_json())
    return summary


def shard_jobs(opened: Source, shard_size: int) -> list[ShardJob]:
    """Every split's items cut into shards of ``shard_size``, in output order."""
    return [ShardJob(split, k, start, items.chunk(start, min(start + shard_size, len(items))))
            for split, items in opened.splits.items()
            for k, start in enumerate(range(0, len(items), shard_size))]


def _run_jobs(out_root: str, jobs: list[ShardJob], num_classes: int, image_size: int | None, stats_split: str,
              tasks: int, desc: str) -> list[ShardSummary]:
    """Write every shard not finished by an earlier run, in this process (``tasks`` 1) or as Ray tasks;
    every shard's summary, in job order."""
    finished = {job.name: ShardSummary.from_json(fsio.read_json(url)) for job in jobs
                if fsio.exists(url := _summary_url(out_root, job))}
    todo = [job for job in jobs if job.name not in finished]
    total = sum(len(job.items) for job in todo)
    with tqdm(total=total, desc=desc, unit="img", disable=total < PROGRESS_MIN) as bar:
        if tasks <= 1:
            for job in todo:
                finished[job.name] = write_source_shard(out_root, job, num_classes, image_size,
                                                        job.split == stats_split)
                bar.update(len(job.items))
            return [finished[job.name] for job in jobs]
        import ray

        remote = ray.remote(num_cpus=1, max_retries=3)(write_source_shard)
        refs, in_flight = [], {}
        for job in todo:  # at most `tasks` shards in flight: only their items are in the object store
            if len(in_flight) >= tasks:
                done, _ = ray.wait(list(in_flight), num_returns=1)
                bar.update(in_flight.pop(done[0]))
            ref = remote.remote(out_root, job, num_classes, image_size, job.split == stats_split)
            refs.append(ref)
            in_flight[ref] = len(job.items)
        finished.update((summary.name, summary) for summary in ray.get(refs))
        bar.update(sum(in_flight.values()))
    return [finished[job.name] for job in jobs]


def _pixel_stats(summaries: list[ShardSummary]) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the summed pixels, scaled to [0, 1] (exact integer sums)."""
    parts = [s for s in summaries if s.sums is not None]
    pixels = sum(s.pixels for s in parts)
    mean = np.sum([s.sums for s in parts], axis=0) / pixels
    var = np.maximum(np.sum([s.squares for s in parts], axis=0) / pixels - mean**2, 0.0)
    return (mean / 255).tolist(), (np.sqrt(var) / 255).tolist()


def _geometry(summaries: list[ShardSummary], image_size: int | None) -> tuple[int | None, int]:
    """(image size, channels) of the stored images: one square size, or None when sizes vary."""
    shapes = set().union(*(s.shapes for s in summaries))
    channels = {c for _, _, c in shapes}
    if len(channels) != 1:
        raise DataError(f"the source's images have {sorted(channels)} channels; pass --channels 1 or 3")
    if image_size is not None:
        return image_size, channels.pop()
    sizes = {(h, w) for h, w, _ in shapes}
    square = len(sizes) == 1 and len({*next(iter(sizes))}) == 1
    return (next(iter(sizes))[0] if square else None), channels.pop()


def _convert(opened: Source, out_root: str, shard_size: int, image_size: int | None, name: str,
             tasks: int) -> DatasetInfo:
    """Write every split's shards; return the info (not yet written). Stats come from train (else the first split)."""
    if not any(len(items) for items in opened.splits.values()):
        raise ValueError(f"source {opened.name!r} holds no images")
    stats_split = "train" if "train" in opened.splits else next(iter(opened.splits))
    jobs = shard_jobs(opened, shard_size)
    summaries = _run_jobs(out_root, jobs, len(opened.classes), image_size, stats_split, tasks, f"prepare {name}")
    size, channels = _geometry(summaries, image_size)
    mean, std = _pixel_stats([s for s in summaries if s.split == stats_split])
    splits = {}
    for split in opened.splits:
        mine = [s for s in summaries if s.split == split]
        splits[split] = SplitInfo(split, sum(s.count for s in mine), [s.name for s in mine], [s.count for s in mine],
                                  np.sum([s.counts_per_class for s in mine], axis=0).astype(int).tolist()
                                  if mine else [0] * len(opened.classes))
    return DatasetInfo(name, opened.classes, size, channels, mean, std, splits)


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
    """Delete the commit marker first, then every shard (and leftover temp file) of an earlier run and
    its resume records."""
    fsio.remove(info_url(out_root))
    fsio.remove_tree(fsio.join(out_root, PROGRESS_FOLDER))
    for split in fsio.list_dirs(out_root):
        for url in fsio.list_files(fsio.join(out_root, split), "shard-*.tar*"):
            fsio.remove(url)


def _resumable(out_root: str, request: dict[str, Any]) -> bool:
    """Whether ``out_root`` holds a half-written prepare of the same ``request`` (it records it first)."""
    url = fsio.join(out_root, PROGRESS_FOLDER, "_request.json")
    return fsio.exists(url) and fsio.read_json(url) == request


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
    tasks: int = 1,
) -> DatasetInfo:
    """Convert ``source`` (read from ``src``) into shards under ``out_root`` (a path or URL); return its info.

    A finished ``out_root`` prepared with the same arguments is returned untouched; one prepared with other
    arguments is an error unless ``overwrite``. ``source_options`` go to the source (``names=`` for idx,
    ``channels=`` for imagefolder, ``dataset=`` for torchvision). ``image_size`` resizes (shorter side) and
    center-crops every image to a square PNG; without it image files keep their bytes. ``tasks`` > 1 writes
    the shards as that many concurrent Ray tasks (Ray must be running, or is started locally).
    """
    if shard_size < 1 or (image_size is not None and image_size < 1) or tasks < 1:
        raise ValueError(f"shard_size ({shard_size}), image_size ({image_size}) and tasks ({tasks}) must be positive")
    options = dict(source_options or {})
    request = dict(source=source, src=src, shard_size=shard_size, image_size=image_size, name=name, options=options)
    if not overwrite and (finished := _finished(out_root, request)) is not None:
        return finished
    opened = open_source(source, src, **options)  # fails on a bad source before anything is deleted
    if overwrite or not _resumable(out_root, request):
        _remove_outputs(out_root)
        fsio.atomic_write_json(fsio.join(out_root, PROGRESS_FOLDER, "_request.json"), request)
    info = _convert(opened, out_root, shard_size, image_size, name or opened.name, tasks)
    info.prepared_with = request
    write_info(out_root, info)  # last: the commit marker
    fsio.remove_tree(fsio.join(out_root, PROGRESS_FOLDER))
    return info


def ensure_prepared(source: str, src: str | None, out_root: str, **kwargs: Any) -> DatasetInfo:
    """The info of the dataset at ``out_root``, preparing it first when it is not there yet (never overwrites).

    ``kwargs`` are those of :func:`prepare_dataset` except ``overwrite``.
    """
    return prepare_dataset(source, src, out_root, overwrite=False, **kwargs)
