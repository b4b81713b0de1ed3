"""A Ray-free probe of one grid cell: synthesise and evaluate in this process, against the observers
and statistics a benchmark grid already computed for the dataset, with extra overrides on top.

    python -m benchmarks.probe --grid configs/benchmark/small.yaml --dataset mnist --ipc 1 \
        --seeds 0 1 --set synthesis.flip=false

It answers "what would this change do to that cell" in minutes, one core, without a cluster: the
same algorithm core (`synthesize_class_unit`, `train_student`) as the pipeline, but the student's
random draws differ from a Ray Train run, so compare probes with probes. One JSON line per probe is
printed and appended to `--out`. Needs the grid's shared observers and statistics (run the grid's
cells of that dataset first).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from edc_ray.algo.condense import make_units, selected
from edc_ray.algo.student import train_student
from edc_ray.pipeline.grid import Cell, cell_config, load_grid, shared_folders
from edc_ray.config import ConfigError
from edc_ray.pipeline.common import DatasetMeta, build_model
from edc_ray.pipeline.evaluation import load_images
from edc_ray.pipeline.observers import load_observers, observer_names
from edc_ray.pipeline.statistics import needs_sums, stored_statistics
from edc_ray.pipeline.synthesis import UnitWorker
from edc_ray.storage import fsio
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.dataset_info import read_info


def main(argv: list[str] | None = None) -> dict:
    """Run one probe; returns the JSON line it printed (top-1 per seed, their mean, times)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--method", default="edc")
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--student", default="convnet")
    parser.add_argument("--set", nargs="*", default=[], help="overrides on top of the cell's config")
    parser.add_argument("--out", default="runs/probes.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = load_grid(args.grid)
    if args.dataset not in grid.datasets:
        raise SystemExit(f"--dataset {args.dataset!r} is not in {args.grid}; choose one of "
                         f"{', '.join(grid.datasets)}")
    grid.variants = {"probe": args.set}  # a variant's overrides come last, over the IPC budget
    try:
        cfg = cell_config(grid, Cell(args.dataset, args.method, args.ipc, "probe"))
    except ConfigError as err:  # a bad --method, --ipc or --set value, named by the config
        raise SystemExit(f"config error: {err}") from None
    folders = shared_folders(grid, cfg, args.dataset)
    statistics = RunFolder(folders["statistics"])
    if stored_statistics(statistics, needs_sums(cfg)) is None:
        raise SystemExit(f"no shared observers and statistics for {args.dataset} under {grid.output}: run a "
                         f"cell first, e.g. python jobs/benchmark.py --grid {args.grid} --datasets "
                         f"{args.dataset} --methods edc --ipc {args.ipc}")
    info = read_info(cfg.data.root, cfg.data.classes)
    meta = DatasetMeta.from_info(info, cfg.data)
    models = [model for _, model in load_observers(cfg, RunFolder(folders["observers"]), meta)]
    start = time.perf_counter()
    worker = UnitWorker("probe", cfg, meta, statistics, observer_names(cfg),
                        lambda indices: (selected(models, indices), 0), torch.device("cpu"))
    units = [worker.synthesize(u, classes)
             for u, classes in enumerate(make_units(meta.num_classes, cfg.synthesis.classes_per_unit))]
    images, labels = torch.cat([u[0] for u in units]), torch.cat([u[1] for u in units])
    synthesis_s = time.perf_counter() - start
    val = load_images(list(info.shard_list(cfg.data.root, cfg.data.val_split).urls), meta.spec("val"))
    teachers = models if cfg.evaluation.teachers is None else [models[i] for i in cfg.evaluation.teachers]
    accuracies = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        result = train_student(build_model(args.student, meta), teachers, images, labels, cfg.evaluation,
                               meta.mean, meta.std, val, seed)
        accuracies.append(result["final_top1"])
    line = {"dataset": args.dataset, "method": args.method, "ipc": args.ipc, "set": args.set,
            "student": args.student, "seeds": args.seeds, "top1": accuracies,
            "mean": round(sum(accuracies) / len(accuracies), 2), "synthesis_s": round(synthesis_s, 1),
            "total_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(line), flush=True)
    earlier = fsio.read_bytes(args.out) if fsio.exists(args.out) else b""
    fsio.atomic_write_bytes(args.out, earlier + (json.dumps(line) + "\n").encode())
    return line


if __name__ == "__main__":
    main()
