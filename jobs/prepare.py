"""Convert an image-classification source into WebDataset shards + _info.json (local folder or s3://).

Usage (from the repository root):
    python jobs/prepare.py --source idx --src ../shared/data/fashion-mnist --out data/fashion-mnist
    python jobs/prepare.py --source idx --src ../shared/data/mnist --out data/mnist
    python jobs/prepare.py --source digits --out data/digits
    python jobs/prepare.py --source cifar10 --src ~/datasets/cifar-10-batches-py --out s3://bucket/cifar10
    python jobs/prepare.py --source imagefolder --src ~/pictures --image-size 64 --channels 3 --out data/pics
    python jobs/prepare.py --source torchvision --dataset CIFAR100 --out data/cifar100   # needs network
Options: --shard-size N (samples per shard, default 5000), --image-size N (resize + center-crop to NxN),
--name NAME, --overwrite (replace an existing, differently prepared output).
"""

from __future__ import annotations

import argparse

from edc_ray.cli import run_job
from edc_ray.storage import SOURCES, prepare_dataset

SOURCE_OPTIONS = ("names", "channels", "dataset")  # passed to the source only when given


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, prepare the dataset and print a one-line summary per split."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--src", help="folder (or URL) holding the source files; not for digits")
    parser.add_argument("--out", required=True, help="output root: a folder or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--name")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--names", choices=["mnist", "fashion-mnist"], help="idx: class names")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="imagefolder: 1 grayscale, 3 RGB")
    parser.add_argument("--dataset", help="torchvision: dataset class, e.g. CIFAR10, MNIST, FashionMNIST")
    args = parser.parse_args(argv)
    options = {key: getattr(args, key) for key in SOURCE_OPTIONS if getattr(args, key) is not None}
    info = run_job(lambda: prepare_dataset(args.source, args.src, args.out, shard_size=args.shard_size,
                                           image_size=args.image_size, name=args.name, overwrite=args.overwrite,
                                           source_options=options))
    if info is None:
        return 2
    for split, split_info in info.splits.items():
        print(f"{info.name} {split}: {split_info.count} images in {len(split_info.shards)} shards under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
