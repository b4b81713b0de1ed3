"""Memory of the data path at ImageNet shape: does anything grow with the number of images?

    python -m benchmarks.scale --quick                 # N = 5,000 and 20,000 (a few minutes)
    python -m benchmarks.scale                         # N = 20,000, 80,000 and 320,000
    python -m benchmarks.scale --images 20000 --candidates-per-class 300

For each N it generates (once, under `--root`) an ImageNet-shaped dataset on local disk: 1000 classes,
RGB 32x32 PNG, N training images in shards of 1000 with the classes interleaved across shards as in
real ImageNet shards. Then, through a local Ray instance of 2 CPUs, it runs the statistics + candidates
stage (2 tasks, two torchvision observers with random weights, every BN/Conv input hooked) and one
synthesis unit (10 classes x IPC 10, a few iterations) on a `SynthesisWorker` actor, and records:
- driver_peak_mib: the peak RSS of this process (the driver) during both;
- task_peak_mib: the highest peak RSS of a statistics task (each task samples its own RSS);
- merge_growth_mib: the most a merge task's process grew while merging (merges reuse processes);
- actor_peak_mib: the actor's peak RSS while synthesising the unit;
- actor_pull_mib: what the actor pulled from the object store (the observers' weights);
- task_held_mib: the encoded candidate bytes a task held at its end.
The last line of output is one JSON object of lists aligned with `images`.

A statistics task holds the exact per-class sums (fixed by classes and layers), one batch, and at most
about classes x (k + 8 sqrt(k) + 8) / tasks candidate images' bytes (k = `--candidates-per-class`),
never more than the images it read; so once every class has more than that many images, nothing left
grows with N. The default k of 10 reaches that bound already at N = 20,000.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import ray

from edc_ray.config import load_config
from edc_ray.pipeline.common import DatasetMeta, ObserverSet, PeakMemory, build_model, observer_payload
from edc_ray.pipeline.statistics import statistics_stage
from edc_ray.pipeline.synthesis import SynthesisWorker
from edc_ray.storage import fsio
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.dataset_info import DatasetInfo, SplitInfo, read_info, write_info
from edc_ray.storage.images import encode_png
from edc_ray.storage.shards import write_shard

CLASSES, SIZE, SHARD = 1000, 32, 1000
ARCHS = ("torchvision:resnet18", "torchvision:mobilenet_v2")


def class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 32, 32, 3) images: a smooth per-class colour gradient plus noise (compresses like photos do)."""
    grid = np.linspace(0, 1, SIZE)
    base = np.stack(np.meshgrid(grid, grid), -1)  # (32, 32, 2)
    colours = np.random.default_rng(0).random((CLASSES, 3, 3))  # per class: offset and two gradients
    c = colours[labels]  # (n, 3, 3)
    images = c[:, None, None, 0] + base[None, :, :, :1] * c[:, None, None, 1] + base[None, :, :, 1:] * c[:, None, None, 2]
    images = 0.6 * images / images.max(axis=(1, 2, 3), keepdims=True) + 0.25 * rng.random(images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8)


def generate(root: str, images: int, seed: int = 0) -> DatasetInfo:
    """The ImageNet-shaped dataset of `images` training images at `root` (reused when already there)."""
    if fsio.exists(fsio.join(root, "_info.json")):
        return read_info(root)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", images), ("val", 2 * CLASSES)):
        labels = rng.permutation(np.arange(count) % CLASSES)  # classes interleaved across shards
        shards, shard_counts = [], []
        for start in range(0, count, SHARD):
            batch = labels[start:start + SHARD]
            pixels = class_images(batch, rng)
            name = f"{split}/shard-{len(shards):06d}.tar"
            shard_counts.append(write_shard(fsio.join(root, name), (
                {"__key__": f"{split}-{start + i:08d}", "png": encode_png(pixels[i]), "cls": int(y)}
                for i, y in enumerate(batch))))
            shards.append(name)
        splits[split] = SplitInfo(split, count, shards, shard_counts, np.bincount(labels, minlength=CLASSES).tolist())
    info = DatasetInfo("imagenet-shaped", [f"n{c:08d}" for c in range(CLASSES)], SIZE, 3, [0.5] * 3, [0.25] * 3,
                       splits, {"generator": "benchmarks.scale", "images": images, "seed": seed})
    write_info(root, info)
    return info


def measure(root: str, run_dir: str, candidates: int) -> dict:
    """Statistics + candidates and one synthesis unit on the dataset at `root`; the memory figures."""
    cfg = load_config(None, [
        f"data.root={root}", "data.val_split=val", f"observers.models={[{'arch': a} for a in ARCHS]}",
        "statistics.batch_size=256", "statistics.loader_workers=1", f"init.candidates_per_class={candidates}",
        "synthesis.ipc=10", "synthesis.classes_per_unit=10", "synthesis.iterations=4", "ray.stats_tasks=2",
        "ray.stats_cpus=1", "ray.actor_cpus=1", f"output.run_dir={run_dir}", "device=cpu"])
    info = read_info(root)
    meta = DatasetMeta.from_info(info)
    run = RunFolder(run_dir)
    names = tuple(f"{k}-{a.replace(':', '_')}" for k, a in enumerate(ARCHS))
    with PeakMemory() as driver:
        observers = ObserverSet(names, ARCHS, tuple(ray.put(observer_payload(a, build_model(a, meta).eval()))
                                                    for a in ARCHS))
        start = time.perf_counter()
        result = statistics_stage(cfg, run, info, meta, observers)
        stats_s = time.perf_counter() - start
        actor = SynthesisWorker.options(num_cpus=1).remote("scale", cfg, meta, run, observers.names, "distilled")
        start = time.perf_counter()
        unit = ray.get(actor.run_unit.remote(0, list(range(10)), observers))
        unit_s = time.perf_counter() - start
        ray.kill(actor)
    return {"driver_peak_mib": driver.peak_mib, "task_peak_mib": max(result.task_peak_mib),
            "merge_growth_mib": max(result.merge_growth_mib), "actor_peak_mib": unit["peak_mib"],
            "actor_pull_mib": unit["pulled_mib"], "task_held_mib": max(result.task_held_mib),
            "statistics_s": stats_s, "unit_s": unit_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 5,000 and 20,000")
    parser.add_argument("--images", type=int, nargs="+", help="the N's (default 20,000 80,000 320,000)")
    parser.add_argument("--candidates-per-class", type=int, default=10)
    parser.add_argument("--root", default="/tmp/edc-scale", help="where the generated datasets are kept")
    args = parser.parse_args(argv)
    counts = args.images or ([5_000, 20_000] if args.quick else [20_000, 80_000, 320_000])
    rows = []
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        for n in counts:
            root = os.path.join(args.root, f"data-{n}")
            start = time.perf_counter()
            generate(root, n)
            print(f"[scale] dataset of {n} images ready in {time.perf_counter() - start:.0f} s", flush=True)
            run_dir = os.path.join(args.root, f"run-{n}-k{args.candidates_per_class}-{time.time_ns()}")
            row = measure(root, run_dir, args.candidates_per_class)
            fsio.remove_tree(run_dir)
            print(f"[scale] N={n}: " + " ".join(f"{k}={v:.1f}" for k, v in row.items()), flush=True)
            rows.append(row)
    finally:
        ray.shutdown()
    result = {"images": counts, "candidates_per_class": args.candidates_per_class,
              **{k: [round(r[k], 1) for r in rows] for k in rows[0]}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
