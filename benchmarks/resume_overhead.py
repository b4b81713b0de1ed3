"""Overhead of the resume checks: re-running a job whose run folder is already complete.

    python -m benchmarks.resume_overhead --repeats 3
    python -m benchmarks.resume_overhead --repeats 3 --s3     # dataset and run folder in S3 too

Run from the repository root. A tiny job on scikit-learn's digits (1 ConvNet-D2 observer x 1 epoch,
2 units x 10 iterations at IPC 2, ConvNet-D2 students x 2 epochs on the distilled and the random
subset) runs once to completion in a temporary folder; then it is run again, which must skip every
stage, `--repeats` times, measured two ways:
- "job": `python jobs/condense.py --config <yaml>` end to end (interpreter, imports, Ray start and
  shutdown, checks, report), next to `python -c "import edc_ray.pipeline.run"` (interpreter + imports);
- "split", in this process: Ray start (`start_ray`, a private local instance), `run_pipeline` with
  Ray already up (every stage's check, plus writing config.yaml, putting the observers into the object
  store and the report stage, which are always redone), Ray shutdown; the per-stage seconds come from
  the report's `stage_seconds`.
With `--s3` the same runs with the dataset root and the run folder in a private `weed mini` on
127.0.0.1 (edc_ray/storage/local_s3.py, as in the tests), so every check is an S3 request.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import ray
import yaml

from benchmarks.stream_throughput import REPO
from edc_ray.config import load_config
from edc_ray.pipeline.run import run_pipeline, start_ray
from edc_ray.storage.local_s3 import SeaweedS3, environ

JOB = {
    "data": {"source": "digits", "shard_size": 400},
    "observers": {"models": [{"arch": "convnet_d2"}], "epochs": 1, "batch_size": 64, "crop_padding": 0,
                  "flip": False},
    "statistics": {"patch_size": 4},
    "init": {"candidates_per_class": 20},
    "synthesis": {"ipc": 2, "classes_per_unit": 5, "iterations": 10, "lr": 0.01},
    "evaluation": {"students": ["convnet_d2"], "epochs": 2, "batch_size": 5, "eval_every": 0, "seeds": [0]},
    "ray": {"address": "local", "num_cpus": 2, "dashboard": False, "synthesis_actors": 2, "actor_cpus": 1,
            "train_workers": 1, "train_worker_cpus": 1, "stats_tasks": 2},
}


def job_yaml(folder: str, data_root: str, run_dir: str) -> str:
    """The tiny job's config file."""
    config = {**JOB, "data": {**JOB["data"], "root": data_root}, "output": {"run_dir": run_dir}}
    path = os.path.join(folder, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def command_seconds(*args: str) -> float:
    """Wall time of `python <args>`."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def job_seconds(config: str) -> float:
    """Wall time of `python jobs/condense.py --config <config>`."""
    return command_seconds(str(REPO / "jobs" / "condense.py"), "--config", config)


def split_seconds(config: str) -> dict[str, float]:
    """Ray start, the re-run with Ray up (and its stages), Ray shutdown; checks that nothing was redone."""
    cfg = load_config(config)
    start = time.perf_counter()
    if not start_ray(cfg):
        raise RuntimeError("Ray was already running in this process")
    ray_start = time.perf_counter() - start
    try:
        start = time.perf_counter()
        report = run_pipeline(cfg)
        rerun = time.perf_counter() - start
    finally:
        start = time.perf_counter()
        ray.shutdown()
        ray_stop = time.perf_counter() - start
    if report["synthesis"]["units_run"]:
        raise RuntimeError(f"the re-run redid units {report['synthesis']['units_run']}: the run was not complete")
    stages = report["stage_seconds"]
    return {"ray start": ray_start, "re-run (Ray up)": rerun, **{f"  {k}": v for k, v in stages.items()},
            "  config, puts, report": rerun - sum(stages.values()), "ray shutdown": ray_stop}


@contextlib.contextmanager
def roots(folder: str, s3: bool) -> Iterator[tuple[str, str]]:
    """(dataset root, run folder): local folders, or URLs in a private S3 server."""
    if not s3:
        yield os.path.join(folder, "digits"), os.path.join(folder, "run")
        return
    (Path(folder) / "weed").mkdir()
    server = SeaweedS3(Path(folder) / "weed")
    server.start()
    try:
        with environ(server.environment()):
            yield server.url("digits"), server.url("run")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="dataset root and run folder in a local S3 server")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edc-resume-") as folder, roots(folder, args.s3) as (data, run):
        config = job_yaml(folder, data, run)
        first = job_seconds(config)
        print(f"complete run: {first:.1f} s (run folder {run})", flush=True)
        jobs = [job_seconds(config) for _ in range(args.repeats)]
        imports = [command_seconds("-c", "import edc_ray.pipeline.run") for _ in range(args.repeats)]
        splits = [split_seconds(config) for _ in range(args.repeats)]
    print(f"re-run of a complete run ({'S3' if args.s3 else 'local disk'}), median of {args.repeats}:")
    rows = {"job end to end": jobs, "python + imports": imports,
            **{key: [s[key] for s in splits] for key in splits[0]}}
    for key, values in rows.items():
        print(f"  {key:<22} {statistics.median(values):6.2f} s   (each: {', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
