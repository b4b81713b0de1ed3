"""`edc-ray prepare`: convert an image-classification source into WebDataset shards + _info.json (local
folder or s3://).

    edc-ray prepare --source idx --src ../shared/data/fashion-mnist --out data/fashion-mnist
    edc-ray prepare --source idx --src ../shared/data/mnist --out data/mnist
    edc-ray prepare --source digits --out data/digits
    edc-ray prepare --source cifar10 --src ~/datasets/cifar-10-batches-py --out s3://bucket/cifar10
    edc-ray prepare --source imagefolder --src ~/imagenet --out s3://bucket/imagenet --tasks 16
    edc-ray prepare --source imagefolder --src ~/pictures --image-size 64 --channels 3 --out data/pics
    edc-ray prepare --source torchvision --dataset CIFAR100 --out data/cifar100   # needs network
Options: --shard-size N (samples per shard, default 5000), --image-size N (resize + center-crop to NxN
PNGs; without it image files keep their own bytes), --tasks N (shards written by N concurrent Ray tasks;
default: this machine's CPUs; --address joins a cluster, whose tasks need --src and --out on S3 or under
a folder every node mounts, named with --shared-paths), --name NAME, --overwrite (replace an existing,
differently prepared output). An interrupted prepare resumes: a re-run with the same arguments writes
only the shards it lacks. The output's _info.json is timm's, so `timm.data.create_dataset("wds/...")`
reads it too.
"""

from __future__ import annotations

import argparse
import os

from edc_ray.cli import run_job
from edc_ray.errors import ClusterError
from edc_ray.storage import SOURCES, prepare_dataset

SOURCE_OPTIONS = ("names", "channels", "dataset")  # passed to the source only when given


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, prepare the dataset and print a one-line summary per split."""
    parser = argparse.ArgumentParser(prog="edc-ray prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--src", help="folder (or URL) holding the source files; not for digits")
    parser.add_argument("--out", required=True, help="output root: a folder or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--name")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--tasks", type=int, default=os.cpu_count() or 1, help="concurrent Ray tasks (1: no Ray)")
    parser.add_argument("--address", default="local", help="Ray address: local (a private instance) or a cluster")
    parser.add_argument("--shared-paths", nargs="*", default=[],
                        help="with --address: folders every node mounts at the same path (NFS, EFS)")
    parser.add_argument("--names", choices=["mnist", "fashion-mnist"], help="idx: class names")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="imagefolder: 1 grayscale, 3 RGB")
    parser.add_argument("--dataset", help="torchvision: dataset class, e.g. CIFAR10, MNIST, FashionMNIST")
    args = parser.parse_args(argv)
    options = {key: getattr(args, key) for key in SOURCE_OPTIONS if getattr(args, key) is not None}
    info = run_job(lambda: prepare(args, options))
    if info is None:
        return 2
    for split, split_info in info.splits.items():
        print(f"{info.name} {split}: {split_info.num_samples} images in {len(split_info.filenames)} shards under "
              f"{args.out}")
    return 0


def prepare(args: argparse.Namespace, options: dict):
    """Run the prepare with Ray started (and stopped) here when more than one task is asked for."""
    if args.tasks > 1 and args.address != "local":
        check_shared(args)
    started = args.tasks > 1 and not ray_running()
    if started:
        import ray

        ray.init(address=args.address, **({"num_cpus": args.tasks} if args.address == "local" else {}))
    try:
        return prepare_dataset(args.source, args.src, args.out, shard_size=args.shard_size, image_size=args.image_size,
                               name=args.name, overwrite=args.overwrite, source_options=options, tasks=args.tasks)
    finally:
        if started:
            import ray

            ray.shutdown()


def check_shared(args: argparse.Namespace) -> None:
    """Refuse, before any work, a --src or --out on this machine's disk when tasks run on a cluster: each
    node would read and write its own disk."""
    from edc_ray.pipeline.cluster import node_local

    local = [f"{flag} {path}" for flag, path in (("--src", args.src), ("--out", args.out))
             if path and node_local(path, args.shared_paths)]
    if local:
        raise ClusterError(f"{', '.join(local)}: on this machine's disk, but the tasks run on the cluster at "
                           f"{args.address}, whose other nodes cannot see it. Use s3:// URLs, or name a folder "
                           "every node mounts at the same path with --shared-paths")


def ray_running() -> bool:
    """Whether this process already has Ray initialised."""
    import ray

    return ray.is_initialized()

