"""Synthesis through 2 single-thread Ray actors vs the same units in one process with 2 threads.

    python -m benchmarks.ray_vs_process --units 4 --classes-per-unit 5 --ipc 10 --iterations 40

Observers are ConvNet-W128 and ConvNet-W64 on 28x28 grayscale with targets from random images (the
cost does not depend on the values), stored in a temporary run folder as the statistics stage would.
Both sides synthesise identical units with `UnitWorker`, reading each unit's classes from that folder;
the Ray side goes through the real `synthesis_stage` (object store, SynthesisWorker pool, shard
writes), the process side writes the same shards itself. Ray start-up is excluded; actor start-up and
observer building are included. Prints both wall times and their ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch

from edc_ray.algo.condense import accumulate_statistics, candidates_in_memory, make_units
from edc_ray.config import Config, ObserverSpec
from edc_ray.pipeline.common import DatasetMeta, ObserverSet, build_model, observer_payload
from edc_ray.pipeline.statistics import save_statistics
from edc_ray.pipeline.synthesis import UnitWorker, synthesis_stage
from edc_ray.storage.run_folder import RunFolder

NAMES = ("0-convnet_w128", "1-convnet_w64")


def setup(args: argparse.Namespace, folder: str) -> tuple[Config, DatasetMeta, list]:
    """Config, geometry and observers; statistics and candidates of random images stored in `folder`."""
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
    cands = candidates_in_memory([m for _, m in models], images, labels, [str(i) for i in range(len(images))],
                                 cfg.init.candidates_per_class, cfg.seed, meta.mean, meta.std)
    save_statistics(RunFolder(folder), NAMES, num_classes, sums, cands, len(images), cfg.init.candidates_per_class)
    return cfg, meta, models


def run_in_process(cfg: Config, meta: DatasetMeta, models: list, folder: str) -> float:
    """All units one after another in this process (torch uses 2 threads)."""
    torch.set_num_threads(2)
    start = time.perf_counter()
    worker = UnitWorker("process", cfg, meta, RunFolder(folder), NAMES,
                        lambda indices: ([models[k][1] for k in indices], 0), torch.device("cpu"))
    for unit, classes in enumerate(make_units(meta.num_classes, cfg.synthesis.classes_per_unit)):
        worker.run_unit(unit, classes, "distilled")
    return time.perf_counter() - start


def run_on_ray(cfg: Config, meta: DatasetMeta, models: list, folder: str) -> float:
    """The real synthesis stage: 2 actors with 1 CPU (1 torch thread) each."""
    start = time.perf_counter()
    observers = ObserverSet(NAMES, tuple(a for a, _ in models),
                            tuple(ray.put(observer_payload(arch, m)) for arch, m in models))
    synthesis_stage(cfg, RunFolder(folder), meta, observers)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--classes-per-unit", type=int, default=5)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        cfg, meta, models = setup(args, a)
        setup(args, b)
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            t_ray = run_on_ray(cfg, meta, models, a)
        finally:
            ray.shutdown()
        t_process = run_in_process(cfg, meta, models, b)
        identical = all(open(RunFolder(a).unit_shard(u), "rb").read()
                        == open(RunFolder(b).unit_shard(u), "rb").read() for u in range(args.units))
    result = {"ray_s": t_ray, "process_s": t_process, "ratio": t_ray / t_process,
              "identical_shards": identical}
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
