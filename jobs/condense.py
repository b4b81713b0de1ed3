"""Condense a dataset: the product's main job, locally or on a Ray cluster.

    python jobs/condense.py                                   # the embedded demo (configs/demo.yaml)
    python jobs/condense.py --config configs/fashion-mnist/edc_ipc10.yaml --set synthesis.iterations=200
    ray job submit --working-dir . -- python jobs/condense.py --config configs/cifar10/edc_ipc10.yaml

Writes the run folder named by `output.run_dir` (report.json, report.md, preview.png, distilled/...).
"""
from __future__ import annotations

import argparse
import sys

from edc_ray.cli import add_config_arguments, config_from_arguments, run_job
from edc_ray.pipeline.run import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Condense a labelled image dataset (EDC on Ray).")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_arguments(args)
    if cfg is None:
        return 2
    report = run_job(lambda: run_pipeline(cfg, args.break_lease))  # e.g. a run folder finished under another config
    if report is None:
        return 2
    print(f"\nrun folder: {report['run_dir']}")
    for row in report["evaluation"]:
        print(f"  {row['student']:>12} on {row['set']:>9} ({row['images']} images): "
              f"final top-1 {row['final_top1']:.2f}% +- {row['final_top1_std']:.2f} "
              f"over {len(row['per_seed'])} seed(s), best {row['best_top1']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
