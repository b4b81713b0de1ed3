"""Helpers for code running inside Ray Train workers: rank, count reduction, checkpoints, launch."""
from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Callable

import torch
import torch.distributed as dist

from edc_ray.storage import fsio
from edc_ray.storage.run_folder import load_torch_bytes


def rank_and_world() -> tuple[int, int]:
    """(world rank, world size) of this Ray Train worker; also quiets Ray Train's per-report log lines."""
    import ray.train

    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs every report at INFO
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def all_reduce_counts(correct: int, total: int) -> tuple[int, int]:
    """Sum (correct, total) over all ranks (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        counts = torch.tensor([correct, total], dtype=torch.long)
        dist.all_reduce(counts)
        return int(counts[0]), int(counts[1])
    return correct, total


TRAIN_MAX_FAILURES = 2  # worker-group failures (a lost node, a killed worker) resumed from the last checkpoint


def latest_state(rank: int) -> dict | None:
    """This rank's state from the last checkpoint, when Ray Train restarted the run after a failure."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, f"rank{rank}.pt"), "rb") as f:
            return load_torch_bytes(f.read(), "checkpoint")


def report_checkpoint(scores: dict, state: dict, rank: int) -> None:
    """Report `scores` with a checkpoint holding every rank's `state` (one file per rank)."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, f"rank{rank}.pt"))
        ray.train.report(scores, checkpoint=ray.train.Checkpoint.from_directory(folder))


def fit_torch_trainer(loop: Callable[[dict], None], config: dict, name: str, storage: str,
                      workers: int, use_gpu: bool, cpus_per_worker: float, max_failures: int,
                      placement_timeout_s: float, checkpoints_to_keep: int | None = None):
    """Run `loop` on `workers` Ray Train workers (DDP) and return the `Result`.

    `storage` (a local folder or an s3:// URL) receives checkpoints and metrics through the same
    filesystem as the rest of the run folder. A failed worker group is restarted from its last
    checkpoint up to `max_failures` times. It first waits (up to `placement_timeout_s`) until the cluster
    could hold all the workers at once; Ray Train's own wait for its placement group (60 s per try) is
    retried only for about as long, not forever.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from edc_ray.pipeline.cluster import wait_for_room

    bundle = {"CPU": cpus_per_worker, "GPU": 1.0 if use_gpu else 0.0}
    wait_for_room(f"Ray Train run {name}", bundle, workers, placement_timeout_s)

    # The controller collects each worker report when it polls (every 2 s by default) and a worker's
    # report blocks until then: per-epoch reports of short epochs would mostly wait. Ray propagates
    # these variables from the driver to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every print shows twice

    filesystem, path = fsio.arrow_filesystem(storage)
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
                             failure_config=FailureConfig(
                                 max_failures=max_failures,
                                 controller_failure_limit=max(1, math.ceil(placement_timeout_s / 60.0)))),
    )
    return trainer.fit()
