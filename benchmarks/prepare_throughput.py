"""Prepare and read throughput for an ImageFolder of ImageNet-sized JPEGs: the old path (decode, centre
crop, PNG re-encode: ``--image-size 224``) against the new one (original bytes kept), 1 task against
N Ray tasks; then read + decode + fit to 224 px of the kept JPEG shards against the 224 px PNG shards.

    python -m benchmarks.prepare_throughput --images 400 --tasks 2

The images are generated (a smooth per-class pattern plus noise, JPEG quality 90, sides 300-500 px),
so bytes per image depend on that content; the ratios between paths are what carries over.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.timm_layout import jpeg, photo
from edc_ray.storage import ImageFit, prepare_dataset
from edc_ray.storage.dataset_info import read_info
from edc_ray.storage.shards import SampleSpec, iter_samples


def imagefolder(root: Path, images: int, classes: int = 10, seed: int = 0) -> int:
    """Write ``images`` JPEGs under ``root/train/<class>/``; returns their total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(images):
        label = i % classes
        height, width = (int(v) for v in rng.integers(300, 501, 2))
        folder = root / "train" / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = jpeg(photo(label, height, width, rng))
        (folder / f"{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def shard_bytes(root: Path) -> int:
    """Bytes of every shard under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*.tar"))


def timed_prepare(src: Path, out: Path, images: int, **kwargs) -> dict:
    """Prepare ``src`` into ``out``; images/s and bytes per stored image."""
    start = time.perf_counter()
    prepare_dataset("imagefolder", str(src), str(out), shard_size=100, **kwargs)
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "kib_per_image": shard_bytes(out) / images / 1024, "seconds": seconds}


def read_rate(root: Path, fit: ImageFit | None) -> float:
    """Images/s of reading + decoding (+ fitting) the train split of ``root``."""
    info = read_info(str(root))
    shards = info.shard_list(str(root), "train")
    spec = SampleSpec.of(info, fit)
    start = time.perf_counter()
    count = sum(1 for _ in iter_samples(list(shards.urls), expected_counts=shards.expected_counts(), spec=spec))
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Run the measurements and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--tasks", type=int, default=2)
    args = parser.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        source_bytes = imagefolder(tmp_path / "src", args.images)
        print(f"source: {args.images} JPEGs, {source_bytes / args.images / 1024:.1f} KiB each", flush=True)
        png = timed_prepare(tmp_path / "src", tmp_path / "png", args.images, image_size=224)
        print(f"prepare, PNG 224 px (old path), 1 task: {png['images_per_s']:.1f} img/s, "
              f"{png['kib_per_image']:.1f} KiB/img", flush=True)
        kept = timed_prepare(tmp_path / "src", tmp_path / "kept", args.images)
        print(f"prepare, original bytes, 1 task: {kept['images_per_s']:.1f} img/s, "
              f"{kept['kib_per_image']:.1f} KiB/img", flush=True)
        ray.init(address="local", num_cpus=args.tasks, include_dashboard=False)
        try:
            parallel = timed_prepare(tmp_path / "src", tmp_path / "kept-n", args.images, tasks=args.tasks)
        finally:
            ray.shutdown()
        print(f"prepare, original bytes, {args.tasks} Ray tasks: {parallel['images_per_s']:.1f} img/s "
              f"(includes starting the tasks' workers)", flush=True)
        fit = ImageFit(224, 3, "center")
        for label, root, view in (("in-place JPEG shards, fitted to 224", tmp_path / "kept", fit),
                                  ("PNG 224 px shards", tmp_path / "png", None)):
            rates = [read_rate(root, view) for _ in range(3)]
            print(f"read + decode, {label}: {np.median(rates):.1f} img/s (median of 3)", flush=True)


if __name__ == "__main__":
    main()
