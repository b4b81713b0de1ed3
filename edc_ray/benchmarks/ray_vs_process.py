"""Synthesis through 2 single-thread Ray actors vs the same units in one process with 2 threads.

    python -m edc_ray.benchmarks.ray_vs_process --units 4 --classes-per-unit 5 --ipc 10 --iterations 40

Observers are ConvNet-W128 and ConvNet-W64 on 28x28 grayscale with targets from random images (the
cost does not depend on the values). Both sides run `synthesize_class_unit` on identical units; the Ray
side goes through the real `synthesis_stage` (object store, SynthesisWorker pool, shard writes) into a
temporary run folder, the process side writes the same shards. Ray start-up is excluded; actor
start-up and observer building are included. Prints both wall times and their ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch

from edc_ray.algo.condense import (CandidatePool, accumulate_statistics, build_observers, make_units,
                                   synthesize_class_unit)
from edc_ray.config import Config, ObserverSpec
from edc_ray.pipeline.common import DatasetMeta, build_model, observer_payload
from edc_ray.pipeline.statistics import pool_to_dict
from edc_ray.pipeline.synthesis import synthesis_stage, unit_samples
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import write_shard


def setup(args: argparse.Namespace) -> tuple[Config, DatasetMeta, list, list, CandidatePool]:
    """Config, geometry, observers with statistic sums, and a random candidate pool."""
    num_classes = args.units * args.classes_per_unit
    meta = DatasetMeta(num_classes, 1, 28, (0.2860,), (0.3530,))
    cfg = Config()
    cfg.synthesis.ipc, cfg.synthesis.iterations = args.ipc, args.iterations
    cfg.synthesis.classes_per_unit = args.classes_per_unit
    cfg.observers.models = [ObserverSpec("convnet_w128"), ObserverSpec("convnet_w64")]
    cfg.ray.synthesis_actors, cfg.ray.actor_cpus = 2, 1.0
    torch.manual_seed(0)
    images = (torch.rand(num_classes * args.ipc * 2, 1, 28, 28) * 255).to(torch.uint8)
    labels = torch.arange(len(images)) % num_classes
    models = [(spec.arch, build_model(spec.arch, meta).eval()) for spec in cfg.observers.models]
    batches = [(images[s:s + 256], labels[s:s + 256]) for s in range(0, len(images), 256)]
    sums = [accumulate_statistics(m, batches, num_classes, cfg.statistics, meta.mean, meta.std)
            for _, m in models]
    pool = CandidatePool([str(i) for i in range(len(images))], labels,
                         torch.rand(len(images), dtype=torch.float64), torch.rand(len(images)), images)
    return cfg, meta, models, sums, pool


def run_in_process(cfg: Config, meta: DatasetMeta, models: list, sums: list, pool: CandidatePool,
                   folder: str) -> float:
    """All units one after another in this process (torch uses 2 threads)."""
    torch.set_num_threads(2)
    start = time.perf_counter()
    observers = build_observers([m for _, m in models], sums, cfg.statistics, "cpu", cfg.synthesis.match,
                                cfg.synthesis.observers)
    run = RunFolder(folder)
    for unit, classes in enumerate(make_units(meta.num_classes, cfg.synthesis.classes_per_unit)):
        images, labels, _ = synthesize_class_unit(unit, classes, observers, pool, cfg, meta.mean, meta.std)
        write_shard(run.unit_shard(unit), unit_samples(unit, images, labels))
    return time.perf_counter() - start


def run_on_ray(cfg: Config, meta: DatasetMeta, models: list, sums: list, pool: CandidatePool,
               folder: str) -> float:
    """The real synthesis stage: 2 actors with 1 CPU (1 torch thread) each."""
    start = time.perf_counter()
    shared = [ray.put(observer_payload(arch, m)) for arch, m in models]
    shared += [ray.put([s.state_dict() for s in sums]), ray.put(pool_to_dict(pool))]
    synthesis_stage(cfg, RunFolder(folder), meta, shared)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--classes-per-unit", type=int, default=5)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args(argv)
    cfg, meta, models, sums, pool = setup(args)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            t_ray = run_on_ray(cfg, meta, models, sums, pool, a)
            t_process = run_in_process(cfg, meta, models, sums, pool, b)
            identical = all(open(RunFolder(a).unit_shard(u), "rb").read()
                            == open(RunFolder(b).unit_shard(u), "rb").read() for u in range(args.units))
    finally:
        ray.shutdown()
    result = {"ray_s": t_ray, "process_s": t_process, "ratio": t_ray / t_process,
              "identical_shards": identical}
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
