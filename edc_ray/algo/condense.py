"""The single-process condensation API: observers and real tensors in, distilled tensors out.

    from edc_ray.algo.condense import condense
    images, labels = condense(observers, train_images, train_labels, num_classes, mean, std, cfg)

Every piece is a function the Ray layer distributes: `StatisticsPass` runs per statistics task over
its batches (sums and candidates merge exactly), `synthesize_class_unit` per unit.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edc_ray.algo.candidates import Candidates, CandidateReservoir, bottom_k, sample_priority
from edc_ray.algo.init import candidate_losses, mosaic_init, noise_init
from edc_ray.algo.stats import ClassStatSums, StatisticHooks, StatTotals, compute_targets, hooked_layers
from edc_ray.algo.student import denormalize_to_uint8, normalize
from edc_ray.algo.precision import autocast, resolve_precision
from edc_ray.algo.synthesis import Observer, clamp_bounds, restrict_matching, synthesize_unit
from edc_ray.config import Config, StatisticsConfig


T = TypeVar("T")


def observer_layers(model: nn.Module, cfg: StatisticsConfig):
    """The hooked layers of `model` under the statistics config."""
    return hooked_layers(model, bn=cfg.bn, conv=cfg.conv, patch=cfg.patch_size if cfg.patch else None)


class StatisticsPass:
    """The one streaming pass over real images (METHOD.md 1.2-1.3), batch by batch.

    Each batch runs through every observer once: with `with_sums`, forward hooks add every image's
    layer-input statistics to exact per-class sums (one `ClassStatSums` per observer); the mean logits
    of the observers at `scorers` (None: all) give every image's cross-entropy, its candidate score.
    Memory holds the sums (fixed by the classes and layers) and one batch, never the images seen.
    """

    def __init__(self, models: Sequence[nn.Module], num_classes: int, cfg: StatisticsConfig,
                 mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                 with_sums: bool = True, scorers: Sequence[int] | None = None):
        self.device = torch.device(device)
        self.models = [m.eval().to(self.device) for m in models]
        self.scorers = set(range(len(self.models)) if scorers is None else scorers)
        self.mean, self.std = mean, std
        self.precision = resolve_precision(cfg.precision, self.device)
        self.hooks = [StatisticHooks(observer_layers(m, cfg), mode="image") for m in self.models] \
            if with_sums else []
        self.sums = [ClassStatSums(num_classes) for _ in self.models] if with_sums else []

    @torch.no_grad()
    def add(self, images_uint8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add one batch; returns each image's ensemble cross-entropy (on the device)."""
        x = normalize(images_uint8.to(self.device, non_blocking=True), self.mean, self.std)
        labels = labels.to(self.device, non_blocking=True)
        logits = 0
        for k, model in enumerate(self.models):
            if not self.hooks and k not in self.scorers:
                continue
            with autocast(self.precision, self.device):
                if self.hooks:
                    with self.hooks[k].capture() as records:
                        out = model(x)
                    self.sums[k].add(records, labels)
                else:
                    out = model(x)
            if k in self.scorers:
                logits = logits + out.float()
        return F.cross_entropy(logits / len(self.scorers), labels, reduction="none")

    def close(self) -> None:
        """Detach the hooks."""
        for hooks in self.hooks:
            hooks.remove()


def accumulate_statistics(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          num_classes: int, cfg: StatisticsConfig, mean: Sequence[float],
                          std: Sequence[float], device: torch.device | str = "cpu") -> ClassStatSums:
    """Per-class sums of per-image layer-input statistics of one observer over (uint8 images, labels) batches."""
    scan = StatisticsPass([model], num_classes, cfg, mean, std, device)
    try:
        for images, labels in batches:
            scan.add(images, labels)
    finally:
        scan.close()
    return scan.sums[0]


def score_candidates(models: Sequence[nn.Module], cands: Candidates, mean: Sequence[float],
                     std: Sequence[float], device: torch.device | str = "cpu", batch_size: int = 256) -> None:
    """Fill in the ensemble loss of every candidate not scored yet (NaN), in place."""
    todo = torch.nonzero(torch.isnan(cands.losses)).flatten()
    for start in range(0, len(todo), batch_size):
        index = todo[start:start + batch_size]
        x = normalize(cands.images(index).to(device), mean, std)
        cands.losses[index] = candidate_losses(models, x, cands.labels[index].to(device)).float().cpu()


def candidates_in_memory(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                         keys: Sequence[str], per_class: int, seed: int, mean: Sequence[float],
                         std: Sequence[float], device: torch.device | str = "cpu") -> Candidates:
    """`per_class` uniformly sampled images of each class (bottom-k by key priority), scored."""
    priorities = torch.tensor([sample_priority(k, seed) for k in keys], dtype=torch.float64)
    everything = Candidates(list(keys), labels.long(), priorities, torch.full((len(keys),), float("nan")),
                            list(images))
    reservoir = CandidateReservoir(int(labels.max()) + 1 if len(labels) else 1, per_class)
    reservoir.offer(everything)
    cands = reservoir.result()
    score_candidates(models, cands, mean, std, device)
    return cands


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


def initial_images(cands: Candidates, classes: Sequence[int], ipc: int, cfg: Config,
                   models: Sequence[nn.Module], mean: Sequence[float], std: Sequence[float],
                   generator: torch.Generator, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting images (normalised) and labels of a unit, by `cfg.init.mode`.

    real: ipc distinct candidates of each class sampled from its lowest-loss `init.pool_fraction`
    (exactly the ipc lowest-loss ones at 0; cycled if a class has fewer than ipc); mosaic: f x f
    stitches of the lowest-loss crops; noise: Gaussian noise; random: the ipc lowest-priority
    candidates (a uniform random subset). Only the images used are decoded.
    """
    labels = torch.tensor([c for c in classes for _ in range(ipc)], dtype=torch.long)
    per_class = [cands.of_class(c) for c in classes]
    for c, own in zip(classes, per_class):
        if len(own) == 0:
            raise ValueError(f"class {c} has no candidate images: is it missing from the train split?")
    if cfg.init.mode == "noise":
        shape = tuple(per_class[0].images([0]).shape[1:])
        return noise_init(labels, shape, generator).to(device), labels
    xs = []
    for own in per_class:
        if cfg.init.mode == "mosaic":
            x = normalize(own.images().to(device), mean, std)
            mosaics, _ = mosaic_init(models, x, own.labels.to(device), ipc, cfg.init.factor,
                                     cfg.init.crops_per_image, tuple(cfg.init.crop_scale),
                                     shuffle=cfg.init.shuffle_patches, generator=generator,
                                     flip=cfg.init.crop_flip, one_crop_per_image=cfg.init.one_crop_per_image)
            xs.append(mosaics)
        elif cfg.init.mode == "random":
            by_priority = bottom_k(own, ipc)
            xs.append(normalize(by_priority.images(torch.arange(ipc) % len(by_priority)).to(device), mean, std))
        else:
            order = torch.sort(own.losses, stable=True).indices
            picks = order[real_init_positions(len(order), ipc, cfg.init.pool_fraction, generator)]
            xs.append(normalize(own.images(picks).to(device), mean, std))
    return torch.cat(xs), labels


def make_units(num_classes: int, classes_per_unit: int) -> list[list[int]]:
    """Groups of consecutive classes; a unit is the atom of sharding, retry and resume."""
    return [list(range(s, min(s + classes_per_unit, num_classes)))
            for s in range(0, num_classes, classes_per_unit)]


def unit_seed(run_seed: int, unit: int) -> int:
    """A seed derived from (run seed, unit id), independent of which worker runs the unit."""
    return int(np.random.SeedSequence([run_seed, unit]).generate_state(1)[0])


def build_observers(models: Sequence[nn.Module], totals: Sequence[StatTotals],
                    class_sums: Sequence[ClassStatSums], classes: Sequence[int], cfg: StatisticsConfig,
                    device: torch.device | str = "cpu", match: Sequence[str] = ("bn", "conv", "patch"),
                    select: Sequence[int] | None = None) -> list[Observer]:
    """Observers with hooks and the targets of `classes` (the rows of `class_sums`).

    `totals[k]` are observer k's sums over the whole training set (the global targets). `select` picks
    observers by index (None: all); `match` keeps only those statistic kinds of the accumulated ones
    ("bn", "conv", "patch"), so one statistics pass serves every method.
    """
    observers = []
    for k in range(len(models)) if select is None else select:
        model = models[k].to(device)
        layers = observer_layers(model, cfg)
        targets = compute_targets(totals[k], class_sums[k], layers)
        observers.append(restrict_matching(Observer(model, layers, targets, list(classes)), match))
    return observers


def selected(items: Sequence[T], select: Sequence[int] | None) -> list[T]:
    """The `items` (models, names) at the indices `select` (`synthesis.observers`,
    `init.score_observers`), all for None."""
    return list(items) if select is None else [items[k] for k in select]


def synthesize_class_unit(unit: int, classes: Sequence[int], models: Sequence[nn.Module],
                          observers: Sequence[Observer], cands: Candidates, cfg: Config,
                          mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                          progress: Callable[[int, dict], None] | None = None,
                          on_init: Callable[[torch.Tensor], None] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Initialise and optimise one unit; returns (uint8 images, labels, loss history).

    `models` score mosaic crops; `observers` (unused when `synthesis.iterations` is 0) are optimised against;
    `on_init` receives the initial images (uint8, before any optimisation).
    """
    seed = unit_seed(cfg.seed, unit)
    generator = torch.Generator().manual_seed(seed)
    x0, labels = initial_images(cands, classes, cfg.synthesis.ipc, cfg, models, mean, std, generator, device)
    if on_init is not None:
        on_init(denormalize_to_uint8(x0, mean, std).cpu())
    if cfg.synthesis.iterations == 0:
        return denormalize_to_uint8(x0, mean, std).cpu(), labels, []
    result = synthesize_unit(x0, labels, observers, cfg.synthesis, clamp_bounds(mean, std, device),
                             seed, progress)
    return denormalize_to_uint8(result.images, mean, std).cpu(), labels, result.history


def condense(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             mean: Sequence[float], std: Sequence[float], cfg: Config,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The whole condensation in one process: statistics, candidates, every unit. uint8 out."""
    batch = cfg.statistics.batch_size
    sums = [accumulate_statistics(m, ((images[s:s + batch], labels[s:s + batch])
                                      for s in range(0, len(images), batch)),
                                  num_classes, cfg.statistics, mean, std, device) for m in models]
    keys = [str(i) for i in range(len(images))]
    scorers = selected(models, cfg.init.score_observers)
    cands = candidates_in_memory(scorers, images, labels, keys, cfg.init.candidates_per_class, cfg.seed,
                                 mean, std, device)
    observers = build_observers(models, [s.totals() for s in sums], sums, range(num_classes), cfg.statistics,
                                device, cfg.synthesis.match, cfg.synthesis.observers)
    outs = [synthesize_class_unit(u, classes, scorers, observers, cands, cfg, mean, std, device)
            for u, classes in enumerate(make_units(num_classes, cfg.synthesis.classes_per_unit))]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
