"""`edc-ray condense`: the product's main job, locally or on a Ray cluster.

    edc-ray condense                                          # the embedded demo (edc_ray/presets/demo.yaml)
    edc-ray condense --config configs/fashion-mnist/edc_ipc10.yaml --set synthesis.iterations=200
    ray job submit --working-dir . -- python jobs/condense.py --config configs/cifar10/edc_ipc10.yaml

Writes the run folder named by `output.run_dir` (report.json, report.md, preview.png, distilled/...).
"""
from __future__ import annotations

from edc_ray.cli import add_config_arguments, command_parser, config_from_arguments, run_job
from edc_ray.pipeline.run import run_pipeline


def main(argv: list[str] | None = None) -> int:
    """Condense the dataset `--config` names; prints the evaluation and returns the exit status."""
    parser = command_parser("edc-ray condense", "Condense a labelled image dataset (EDC on Ray).")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_arguments(args)
    if cfg is None:
        return 2
    report = run_job(lambda: run_pipeline(cfg, args.break_lease, args.verbose))  # e.g. a run folder finished under another config
    if report is None:
        return 2
    print(f"\nrun folder: {report['run_dir']}")
    for row in report["evaluation"]:
        print(f"  {row['student']:>12} on {row['set']:>9} ({row['images']} images): "
              f"final top-1 {row['final_top1']:.2f}% +- {row['final_top1_std']:.2f} "
              f"over {len(row['per_seed'])} seed(s), best {row['best_top1']:.2f}%")
    return 0

