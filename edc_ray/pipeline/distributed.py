"""Helpers for code running inside Ray Train workers: rank, batch shares, count reduction, launch."""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
import torch.distributed as dist

from edc_ray.storage import fsio


def rank_and_world() -> tuple[int, int]:
    """(world rank, world size) of this Ray Train worker; also quiets Ray Train's per-report log lines."""
    import ray.train

    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs every report at INFO
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def rank_share(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of a global batch (every rank gets a slice; DDP averages the gradients)."""
    return indices[rank::world]


def all_reduce_counts(correct: int, total: int) -> tuple[int, int]:
    """Sum (correct, total) over all ranks (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        counts = torch.tensor([correct, total], dtype=torch.long)
        dist.all_reduce(counts)
        return int(counts[0]), int(counts[1])
    return correct, total


def fit_torch_trainer(loop: Callable[[dict], None], config: dict, name: str, storage: str,
                      workers: int, use_gpu: bool, cpus_per_worker: float, max_failures: int = 0):
    """Run `loop` on `workers` Ray Train workers (DDP) and return the `Result`.

    `storage` (a local folder or an s3:// URL) receives checkpoints and metrics through the same
    filesystem as the rest of the run folder.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()
