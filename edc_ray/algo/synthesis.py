"""The synthesis ("recover") loop of one work unit (METHOD.md 1.4): pixels in, pixels out."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edc_ray.algo.augment import apply_crops, random_crop_thetas, random_roll_offsets, roll_images
from edc_ray.algo.losses import flatness_kl, layer_matching_loss, smoothed_statistic
from edc_ray.algo.stats import HookedLayer, LayerTargets, StatisticHooks
from edc_ray.config import SynthesisConfig


@dataclass
class Observer:
    """A frozen observer in eval mode with its hooked layers and their matching targets."""

    model: nn.Module
    layers: list[HookedLayer]
    targets: list[LayerTargets]

    def __post_init__(self):
        if len(self.layers) != len(self.targets):
            raise ValueError(f"{len(self.layers)} hooked layers but {len(self.targets)} targets")
        self.model.eval().requires_grad_(False)


PATCH_KEYS = ("patch_mean", "patch_var")


def restrict_matching(observer: Observer, match: Sequence[str]) -> Observer:
    """The same observer matching only the statistic kinds in `match` ("bn", "conv", "patch")."""
    layers, targets = [], []
    for layer, target in zip(observer.layers, observer.targets):
        if layer.kind not in match:
            continue
        if layer.patch is not None and "patch" not in match:
            layer = replace(layer, patch=None)
            target = LayerTargets(target.kind,
                                  {k: v for k, v in target.global_.items() if k not in PATCH_KEYS},
                                  {k: v for k, v in target.per_class.items() if k not in PATCH_KEYS})
        layers.append(layer)
        targets.append(target)
    return Observer(observer.model, layers, targets)


@dataclass
class SynthesisResult:
    """Optimised images (normalised space) and the per-iteration loss terms."""

    images: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)


def layer_weights(count: int, first_layer_weight: float) -> list[float]:
    """w_l: `first_layer_weight` for the first hooked layer, 1 for the others."""
    return [first_layer_weight if i == 0 else 1.0 for i in range(count)]


def matching_regulariser(records: list[dict[str, torch.Tensor]], observer: Observer,
                         labels: torch.Tensor, alpha: float, first_layer_weight: float,
                         running: dict | None = None, momentum: float = 0.0) -> torch.Tensor:
    """sum_l w_l * R_l over the hooked layers, optionally with momentum-smoothed statistics.

    `running` maps (layer index, stat) to the EMA state; it is updated in place.
    """
    total = labels.new_zeros((), dtype=torch.float32)
    weights = layer_weights(len(records), first_layer_weight)
    for i, (stats, targets, w) in enumerate(zip(records, observer.targets, weights)):
        if running is not None:
            smoothed = {}
            for key, value in stats.items():
                smoothed[key], running[(i, key)] = smoothed_statistic(value, running.get((i, key)),
                                                                      momentum)
            stats = smoothed
        total = total + w * layer_matching_loss(stats, targets, labels, alpha)
    return total


def matching_loss(x: torch.Tensor, labels: torch.Tensor, observers: Sequence[Observer],
                  cfg: SynthesisConfig, crops: int = 0, seed: int = 0) -> float:
    """The matching regulariser (un-smoothed) averaged over observers: a diagnostic.

    With `crops` > 0 it is averaged over that many seeded RandomResizedCrop + flip draws, the views
    the synthesis optimises; the same seed gives the same crops, so two images sets compare fairly.
    """
    generator = torch.Generator().manual_seed(seed)
    views = [x] if crops == 0 else [
        apply_crops(x, random_crop_thetas(x, (cfg.min_scale, 1.0), cfg.flip, generator))
        for _ in range(crops)]
    values = []
    with torch.no_grad():
        for obs in observers:
            hooks = StatisticHooks(obs.layers)
            try:
                for view in views:
                    with hooks.capture() as records:
                        obs.model(view)
                    values.append(float(matching_regulariser(records, obs, labels, cfg.alpha,
                                                             cfg.first_layer_weight)))
            finally:
                hooks.remove()
    return sum(values) / len(values)


def clamp_bounds(mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid pixel range [0, 1] in normalised space, per channel, shaped (1, C, 1, 1)."""
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def augmented(images: torch.Tensor, thetas: torch.Tensor, offsets: torch.Tensor | None
              ) -> torch.Tensor:
    """One iteration's view of the images: circular jitter (if `offsets`), then crop + flip.

    Replayable: the flatness term sends the EMA images through the same view.
    """
    return apply_crops(images if offsets is None else roll_images(images, offsets), thetas)


def synthesize_unit(x_init: torch.Tensor, labels: torch.Tensor, observers: Sequence[Observer],
                    cfg: SynthesisConfig, bounds: tuple[torch.Tensor, torch.Tensor], seed: int,
                    progress: Callable[[int, dict[str, float]], None] | None = None
                    ) -> SynthesisResult:
    """Optimise the pixels of one unit against the observers (round-robin, one per iteration).

    Loss per iteration t with observer k = t mod K on a per-image RandomResizedCrop + flip x~
    (after a random circular shift of up to `jitter` pixels when jitter > 0, SRe2L's augmentation):
    ce_weight * CE(phi_k(x~), y) + r * sum_l w_l R_l + flatness_weight * KL(phi_k(x~)/tau || phi_k(x~_ema)/tau);
    Adam(lr, betas) with cosine decay to 0; pixels clamped to the valid range after each step.
    Deterministic for a given `seed` on a given device.
    """
    if not observers:
        raise ValueError("synthesis needs at least one observer")
    device = x_init.device
    generator = torch.Generator().manual_seed(seed)
    x = x_init.detach().clone().requires_grad_(True)
    x_ema = x_init.detach().clone()
    labels = labels.to(device)
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=tuple(cfg.betas))
    hooks = [StatisticHooks(obs.layers) for obs in observers]
    running: list[dict] = [{} for _ in observers]  # momentum state, reset per unit
    scale = (cfg.min_scale, 1.0)
    history: list[dict[str, float]] = []
    try:
        for t in range(cfg.iterations):
            k = t % len(observers)
            obs = observers[k]
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * t / cfg.iterations))
            thetas = random_crop_thetas(x, scale, cfg.flip, generator)
            offsets = random_roll_offsets(len(x), cfg.jitter, generator) if cfg.jitter > 0 else None
            with hooks[k].capture() as records:
                logits = obs.model(augmented(x, thetas, offsets))
            ce = F.cross_entropy(logits, labels)
            reg = matching_regulariser(records, obs, labels, cfg.alpha, cfg.first_layer_weight,
                                       running[k], cfg.stat_momentum)
            loss = cfg.ce_weight * ce + cfg.r * reg
            terms = {"ce": ce.item(), "match": reg.item()}
            if cfg.flatness_weight > 0:
                with torch.no_grad():
                    ema_logits = obs.model(augmented(x_ema, thetas, offsets))
                fr = flatness_kl(logits, ema_logits, cfg.flatness_tau)
                loss = loss + cfg.flatness_weight * fr
                terms["flat"] = fr.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
                x_ema.mul_(cfg.flatness_beta).add_(x, alpha=1 - cfg.flatness_beta)
            terms["loss"] = loss.item()
            history.append(terms)
            if progress is not None:
                progress(t, terms)
    finally:
        for h in hooks:
            h.remove()
    return SynthesisResult(x.detach(), history)
