"""Checks of values against the world outside the config: the local machine's resources, Ray
addresses, run-folder locations."""
from __future__ import annotations

from typing import TYPE_CHECKING

from edc_ray.config.schema import _check

if TYPE_CHECKING:
    from edc_ray.config.schema import Config


def check_local_resources(cfg: Config, cpus: int, gpus: int) -> None:
    """Refuse per-task requests that a local instance of `cpus` CPUs and `gpus` GPUs can never place
    (Ray would wait for them forever); raises `ConfigError`."""
    r = cfg.ray
    where = f"the local Ray instance has {cpus} CPUs (ray.num_cpus, or all cores) and {gpus} GPUs"
    for key, value in (("actor_cpus", r.actor_cpus), ("stats_cpus", r.stats_cpus)):
        _check(value <= cpus, f"ray.{key}", value, f"{where}; a task asking for more never starts")
    for key, value in (("actor_gpus", r.actor_gpus), ("stats_gpus", r.stats_gpus)):
        _check(value <= gpus, f"ray.{key}", value, f"{where}; a task asking for more never starts")
    _check(r.train_workers * r.train_worker_cpus <= cpus, "ray.train_workers x ray.train_worker_cpus",
           (r.train_workers, r.train_worker_cpus), f"{where}; one training run needs all its workers at once")
    _check(not r.train_use_gpu or r.train_workers <= gpus, "ray.train_use_gpu", r.train_use_gpu,
           f"{where}; each of the {r.train_workers} training workers needs a GPU")


def valid_address(address: str) -> bool:
    """Whether `address` is a Ray address: local, auto, host:port or ray://host:port."""
    if address in ("local", "auto"):
        return True
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return bool(host) and "/" not in host and port.isdigit() and 1 <= int(port) <= 65535


def run_dir_problem(run_dir: str, data_root: str) -> str | None:
    """Why `run_dir` cannot be a run folder (a filesystem or bucket root, the home or current folder,
    the dataset), or None."""
    import os

    path = run_dir.strip()
    if path.startswith("s3://"):
        if "/" not in path[len("s3://"):].strip("/"):
            return "it is a bucket root; give a prefix inside it (s3://bucket/runs/name)"
        return None if path.rstrip("/") != data_root.rstrip("/") else "it is the dataset's folder (data.root)"
    if not path:
        return "give a folder"
    resolved = os.path.realpath(os.path.expanduser(path))
    if resolved == os.path.realpath(os.sep):
        return "it is the filesystem root; give a folder of its own (e.g. runs/name)"
    if resolved in (os.path.realpath(os.path.expanduser("~")), os.path.realpath(os.getcwd())):
        return "it is the home or the current folder; give a folder of its own (e.g. runs/name)"
    if not data_root.startswith("s3://") and resolved == os.path.realpath(os.path.expanduser(data_root)):
        return "it is the dataset's folder (data.root)"
    return None
