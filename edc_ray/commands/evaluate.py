"""`edc-ray evaluate`: a distilled set made by any tool (an ImageFolder of images), with our protocol.

    edc-ray evaluate --images runs/demo/export/images                        # against the demo
    edc-ray evaluate --images other/fmnist_ipc10 --config configs/fashion-mnist/edc_ipc10.yaml \
        --set evaluation.seeds=[0,1,2] --set output.run_dir=runs/fmnist-imported

`--images` holds one folder per class; sorted folder names are the labels, so the export folders
`<index>-<name>` of `edc-ray condense` come back in order. The config gives the dataset (validation
split, image size), the observers that label online (trained, or reused from `output.run_dir`) and the
evaluation protocol; results go to `<run_dir>/imported/<label>.json` and `eval/`.
"""
from __future__ import annotations

from edc_ray.cli import add_config_arguments, command_parser, config_from_arguments, run_job
from edc_ray.pipeline.run import evaluate_imagefolder


def main(argv: list[str] | None = None) -> int:
    """Evaluate `--images`; prints each student's result and returns the exit status."""
    parser = command_parser("edc-ray evaluate", "Evaluate an ImageFolder distilled set with edc-ray's protocol.")
    parser.add_argument("--images", required=True, help="ImageFolder: <images>/<class>/<image>.png")
    parser.add_argument("--label", default="imported", help="name of the evaluated set in the run folder")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_arguments(args)
    if cfg is None:
        return 2
    results = run_job(lambda: evaluate_imagefolder(cfg, args.images, args.label, args.break_lease,
                                                      args.verbose))
    if results is None:
        return 2
    for row in results:
        print(f"  {row['student']:>12} on {args.images} ({row['images']} images): final top-1 "
              f"{row['final_top1']:.2f}% +- {row['final_top1_std']:.2f} over {len(row['per_seed'])} seed(s)")
    return 0

