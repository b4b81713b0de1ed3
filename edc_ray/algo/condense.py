"""The single-process condensation API: observers and real tensors in, distilled tensors out.

    from edc_ray.algo.condense import condense
    images, labels = condense(observers, train_images, train_labels, num_classes, mean, std, cfg)

Every piece is a function the Ray layer distributes: `accumulate_statistics` per shard,
`candidate_pool` per shard (merged with `merge_candidate_pools`), `synthesize_class_unit` per unit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from edc_ray.algo.init import candidate_losses, mosaic_init, noise_init, sample_priority
from edc_ray.algo.stats import ClassStatSums, StatisticHooks, compute_targets, hooked_layers
from edc_ray.algo.student import denormalize_to_uint8, normalize
from edc_ray.algo.synthesis import Observer, clamp_bounds, restrict_matching, synthesize_unit
from edc_ray.config import Config, StatisticsConfig


def observer_layers(model: nn.Module, cfg: StatisticsConfig):
    """The hooked layers of `model` under the statistics config."""
    return hooked_layers(model, bn=cfg.bn, conv=cfg.conv, patch=cfg.patch_size if cfg.patch else None)


@torch.no_grad()
def accumulate_statistics(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          num_classes: int, cfg: StatisticsConfig, mean: Sequence[float],
                          std: Sequence[float], device: torch.device | str = "cpu") -> ClassStatSums:
    """Per-class sums of per-image layer-input statistics over (uint8 images, labels) batches."""
    model.eval().to(device)
    hooks = StatisticHooks(observer_layers(model, cfg), mode="image")
    sums = ClassStatSums(num_classes)
    try:
        for images, labels in batches:
            with hooks.capture() as records:
                model(normalize(images.to(device), mean, std))
            sums.add(records, labels)
    finally:
        hooks.remove()
    return sums


@dataclass
class CandidatePool:
    """A uniform random sample of real images per class (bottom-k by key priority) with their losses."""

    keys: list[str]
    labels: torch.Tensor  # (n,)
    priorities: torch.Tensor  # (n,) float64
    losses: torch.Tensor  # (n,) ensemble cross-entropy
    images: torch.Tensor  # (n, C, H, W) uint8


def bottom_k(pool: CandidatePool, k: int) -> CandidatePool:
    """The `k` samples of lowest priority per class: a uniform random sample, in pool order."""
    keep = []
    for c in torch.unique(pool.labels).tolist():
        idx = torch.nonzero(pool.labels == c).flatten()
        keep.append(idx[torch.sort(pool.priorities[idx], stable=True).indices[:k]])
    keep_t = torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.long)
    return CandidatePool([pool.keys[i] for i in keep_t.tolist()], pool.labels[keep_t],
                         pool.priorities[keep_t], pool.losses[keep_t], pool.images[keep_t])


def candidate_pool(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                   keys: Sequence[str], per_class: int, seed: int, mean: Sequence[float],
                   std: Sequence[float], device: torch.device | str = "cpu") -> CandidatePool:
    """Sample `per_class` images per class (mergeable across shards) and score them with the ensemble."""
    priorities = torch.tensor([sample_priority(k, seed) for k in keys], dtype=torch.float64)
    pool = bottom_k(CandidatePool(list(keys), labels.long(), priorities,
                                   torch.zeros(len(keys)), images), per_class)
    x = normalize(pool.images.to(device), mean, std)
    pool.losses = candidate_losses(models, x, pool.labels.to(device)).cpu()
    return pool


def merge_candidate_pools(pools: Sequence[CandidatePool], per_class: int) -> CandidatePool:
    """Exact merge of per-shard pools: the same sample a single pass would pick."""
    merged = CandidatePool([k for p in pools for k in p.keys], torch.cat([p.labels for p in pools]),
                           torch.cat([p.priorities for p in pools]), torch.cat([p.losses for p in pools]),
                           torch.cat([p.images for p in pools]))
    return bottom_k(merged, per_class)


def real_init_positions(count: int, ipc: int, pool_fraction: float, generator: torch.Generator
                        ) -> torch.Tensor:
    """Positions, in a class's loss-sorted candidates, of its ipc real-init images.

    A uniform sample without replacement from the lowest max(ipc, round(pool_fraction * count)),
    returned in loss order; cycled when the class has fewer than ipc candidates.
    """
    pool = min(count, max(ipc, round(pool_fraction * count)))
    if pool <= ipc:
        return torch.arange(ipc) % count
    return torch.sort(torch.randperm(pool, generator=generator)[:ipc]).values


def initial_images(pool: CandidatePool, classes: Sequence[int], ipc: int, cfg: Config,
                   models: Sequence[nn.Module], mean: Sequence[float], std: Sequence[float],
                   generator: torch.Generator, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting images (normalised) and labels of a unit, by `cfg.init.mode`.

    real: ipc distinct candidates of each class sampled from its lowest-loss `init.pool_fraction`
    (exactly the ipc lowest-loss ones at 0; cycled if a class has fewer than ipc);
    mosaic: f x f stitches of the lowest-loss crops; noise: Gaussian noise.
    """
    labels = torch.tensor([c for c in classes for _ in range(ipc)], dtype=torch.long)
    shape = tuple(pool.images.shape[1:])
    if cfg.init.mode == "noise":
        return noise_init(labels, shape, generator).to(device), labels
    xs = []
    for c in classes:
        idx = torch.nonzero(pool.labels == c).flatten()
        if len(idx) == 0:
            raise ValueError(f"class {c} has no candidate images: is it missing from the train split?")
        if cfg.init.mode == "mosaic":
            x = normalize(pool.images[idx].to(device), mean, std)
            mosaics, _ = mosaic_init(models, x, pool.labels[idx].to(device), ipc, cfg.init.factor,
                                     cfg.init.crops_per_image, shuffle=cfg.init.shuffle_patches,
                                     generator=generator)
            xs.append(mosaics)
        else:
            order = idx[torch.sort(pool.losses[idx], stable=True).indices]
            picks = order[real_init_positions(len(order), ipc, cfg.init.pool_fraction, generator)]
            xs.append(normalize(pool.images[picks].to(device), mean, std))
    return torch.cat(xs), labels


def make_units(num_classes: int, classes_per_unit: int) -> list[list[int]]:
    """Groups of consecutive classes; a unit is the atom of sharding, retry and resume."""
    return [list(range(s, min(s + classes_per_unit, num_classes)))
            for s in range(0, num_classes, classes_per_unit)]


def unit_seed(run_seed: int, unit: int) -> int:
    """A seed derived from (run seed, unit id), independent of which worker runs the unit."""
    return int(np.random.SeedSequence([run_seed, unit]).generate_state(1)[0])


def build_observers(models: Sequence[nn.Module], sums: Sequence[ClassStatSums], cfg: StatisticsConfig,
                    device: torch.device | str = "cpu", match: Sequence[str] = ("bn", "conv", "patch"),
                    select: Sequence[int] | None = None) -> list[Observer]:
    """Observers with hooks and targets computed from their statistic sums.

    `select` picks observers by index (None: all); `match` keeps only those statistic kinds of the
    accumulated ones ("bn", "conv", "patch"), so one statistics pass serves every method.
    """
    observers = []
    for k in range(len(models)) if select is None else select:
        model = models[k].to(device)
        layers = observer_layers(model, cfg)
        targets = [t.to(device) for t in compute_targets(sums[k], layers)]
        observers.append(restrict_matching(Observer(model, layers, targets), match))
    return observers


def synthesize_class_unit(unit: int, classes: Sequence[int], observers: Sequence[Observer],
                          pool: CandidatePool, cfg: Config, mean: Sequence[float], std: Sequence[float],
                          device: torch.device | str = "cpu",
                          progress: Callable[[int, dict], None] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Initialise and optimise one unit; returns (uint8 images, labels, loss history)."""
    seed = unit_seed(cfg.seed, unit)
    generator = torch.Generator().manual_seed(seed)
    models = [o.model for o in observers]
    x0, labels = initial_images(pool, classes, cfg.synthesis.ipc, cfg, models, mean, std, generator,
                                device)
    result = synthesize_unit(x0, labels, observers, cfg.synthesis, clamp_bounds(mean, std, device),
                             seed, progress)
    return denormalize_to_uint8(result.images, mean, std).cpu(), labels, result.history


def condense(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             mean: Sequence[float], std: Sequence[float], cfg: Config,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The whole condensation in one process: statistics, candidates, every unit. uint8 out."""
    batch = cfg.statistics.batch_size
    batches = [(images[s:s + batch], labels[s:s + batch]) for s in range(0, len(images), batch)]
    sums = [accumulate_statistics(m, batches, num_classes, cfg.statistics, mean, std, device)
            for m in models]
    keys = [str(i) for i in range(len(images))]
    pool = candidate_pool(models, images, labels, keys, cfg.init.candidates_per_class, cfg.seed,
                          mean, std, device)
    observers = build_observers(models, sums, cfg.statistics, device, cfg.synthesis.match,
                                cfg.synthesis.observers)
    outs = [synthesize_class_unit(u, classes, observers, pool, cfg, mean, std, device)
            for u, classes in enumerate(make_units(num_classes, cfg.synthesis.classes_per_unit))]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
