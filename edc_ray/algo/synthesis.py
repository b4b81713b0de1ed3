"""The synthesis ("recover") loop of one work unit (METHOD.md 1.4): pixels in, pixels out."""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edc_ray.algo.augment import apply_crops, random_crop_thetas, random_roll_offsets, roll_images
from edc_ray.algo.losses import flatness_kl
from edc_ray.algo.matching import MatchingPlan
from edc_ray.algo.precision import autocast, resolve_precision
from edc_ray.algo.stats import HookedLayer, LayerTargets, StatisticHooks
from edc_ray.config import SynthesisConfig


@dataclass
class Observer:
    """A frozen observer in eval mode with its hooked layers and their matching targets.

    `targets[l].per_class` has one row per entry of `classes` (the classes whose targets were loaded:
    a unit's, or all of them in a single process).
    """

    model: nn.Module
    layers: list[HookedLayer]
    targets: list[LayerTargets]
    classes: list[int]

    def __post_init__(self):
        if len(self.layers) != len(self.targets):
            raise ValueError(f"{len(self.layers)} hooked layers but {len(self.targets)} targets")
        self.model.eval().requires_grad_(False)

    def class_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """The `per_class` row of each label."""
        index = {c: i for i, c in enumerate(self.classes)}
        missing = sorted({int(y) for y in labels.tolist()} - set(index))
        if missing:
            raise ValueError(f"no statistic targets for classes {missing} (loaded: {self.classes[:10]}...)")
        return torch.tensor([index[int(y)] for y in labels.tolist()], dtype=torch.long)

    def plan(self, labels: torch.Tensor, cfg: SynthesisConfig, device: torch.device | str) -> MatchingPlan:
        """The matching plan of a unit with these labels."""
        return MatchingPlan.build(self.targets, self.class_rows(labels), cfg.alpha, cfg.first_layer_weight,
                                  device)


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
    return Observer(observer.model, layers, targets, observer.classes)


@dataclass
class SynthesisResult:
    """Optimised images (normalised space) and the per-iteration loss terms."""

    images: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)


def matching_loss(x: torch.Tensor, labels: torch.Tensor, observers: Sequence[Observer],
                  cfg: SynthesisConfig, crops: int = 0, seed: int = 0) -> float:
    """The matching regulariser (un-smoothed) averaged over observers: a diagnostic.

    With `crops` > 0 it is averaged over that many seeded RandomResizedCrop + flip draws, the views
    the synthesis optimises; the same seed gives the same crops, so two images sets compare fairly.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    views = [x] if crops == 0 else [
        apply_crops(x, random_crop_thetas(x, (cfg.min_scale, 1.0), cfg.flip, generator))
        for _ in range(crops)]
    values = []
    with torch.no_grad():
        for obs in observers:
            plan = obs.plan(labels, cfg, x.device)
            hooks = StatisticHooks(obs.layers)
            try:
                for view in views:
                    with hooks.capture():
                        obs.model(view)
                    values.append(float(plan.loss(hooks.batch_moments(), None, 0.0)[0]))
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


TERMS = ("ce", "match", "flat", "loss")

# Synthesis hooks stay on an observer model for the life of the process (recording only inside
# `capture`), so that a compiled step, which traces them, is reused by every later unit.
_HOOKS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, StatisticHooks]]" = weakref.WeakKeyDictionary()


def synthesis_hooks(observer: Observer) -> StatisticHooks:
    """The batch-statistics hooks of `observer`'s layers, attached once per model and layer set."""
    spec = tuple((layer.name, layer.kind, layer.patch) for layer in observer.layers)
    cached = _HOOKS.get(observer.model)
    if cached is not None and cached[0] == spec:
        return cached[1]
    if cached is not None:
        cached[1].remove()
    hooks = StatisticHooks(observer.layers)
    _HOOKS[observer.model] = (spec, hooks)
    return hooks


def _observer_forward(model: nn.Module, view: torch.Tensor, precision: str) -> torch.Tensor:
    if view.is_cuda:
        view = view.contiguous(memory_format=torch.channels_last)
    with autocast(precision, view.device):
        return model(view).float()


def step_loss(model: nn.Module, hooks: StatisticHooks, plan: MatchingPlan, labels: torch.Tensor,
              x: torch.Tensor, x_ema: torch.Tensor, thetas: torch.Tensor, offsets: torch.Tensor | None,
              running: torch.Tensor | None, cfg: SynthesisConfig, precision: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One iteration's loss against one observer: views, hooked forward, matching, flatness.

    Returns (loss, the TERMS as one device tensor, new running statistics). Everything a unit changes
    (plan, labels, images) comes in as arguments, so a compiled version serves every unit.
    """
    with hooks.capture():
        logits = _observer_forward(model, augmented(x, thetas, offsets), precision)
    ce = F.cross_entropy(logits, labels)
    reg, running = plan.loss(hooks.batch_moments(), running, cfg.stat_momentum)
    loss = cfg.ce_weight * ce + cfg.r * reg
    flat = torch.zeros_like(ce)
    if cfg.flatness_weight > 0:
        with torch.no_grad():
            ema_logits = _observer_forward(model, augmented(x_ema, thetas, offsets), precision)
        flat = flatness_kl(logits, ema_logits, cfg.flatness_tau)
        loss = loss + cfg.flatness_weight * flat
    return loss, torch.stack([ce, reg, flat, loss]).detach(), running


@functools.lru_cache(maxsize=1)
def compiled_step_loss() -> Callable:
    """`step_loss` under torch.compile, made once per process (its graphs are cached per observer)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(step_loss)


def synthesize_unit(x_init: torch.Tensor, labels: torch.Tensor, observers: Sequence[Observer],
                    cfg: SynthesisConfig, bounds: tuple[torch.Tensor, torch.Tensor], seed: int,
                    progress: Callable[[int, dict[str, float]], None] | None = None,
                    progress_every: int = 20) -> SynthesisResult:
    """Optimise the pixels of one unit against the observers (round-robin, one per iteration).

    Loss per iteration t with observer k = t mod K on a per-image RandomResizedCrop + flip x~
    (after a random circular shift of up to `jitter` pixels when jitter > 0, SRe2L's augmentation):
    ce_weight * CE(phi_k(x~), y) + r * sum_l w_l R_l + flatness_weight * KL(phi_k(x~)/tau || phi_k(x~_ema)/tau);
    Adam(lr, betas) with cosine decay to 0; pixels clamped to the valid range after each step.

    Random crops are drawn on the images' device and the loop never waits for it: loss terms stay on
    the device, `progress(t, terms)` sees them every `progress_every` iterations, the history is read
    once at the end. `cfg.precision` picks autocast (bf16) or fp32; `cfg.compile` runs each observer's
    step under `torch.compile`. Deterministic for a given `seed` on the CPU.
    """
    if not observers:
        raise ValueError("synthesis needs at least one observer")
    device = x_init.device
    precision = resolve_precision(cfg.precision, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = x_init.detach().clone().requires_grad_(True)
    x_ema = x_init.detach().clone()
    labels = labels.to(device)
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=tuple(cfg.betas))
    plans = [obs.plan(labels, cfg, device) for obs in observers]
    hooks = [synthesis_hooks(obs) for obs in observers]
    if device.type == "cuda":
        for obs in observers:
            obs.model.to(memory_format=torch.channels_last)
    running: list[torch.Tensor | None] = [None] * len(observers)  # momentum state, reset per unit
    scale = (cfg.min_scale, 1.0)
    terms = torch.zeros((cfg.iterations, len(TERMS)), device=device)
    for t in range(cfg.iterations):
        k = t % len(observers)
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * t / cfg.iterations))
        thetas = random_crop_thetas(x, scale, cfg.flip, generator)
        offsets = random_roll_offsets(len(x), cfg.jitter, generator) if cfg.jitter > 0 else None
        # the first step of an observer starts its momentum state: eager, so one compiled graph serves
        step = compiled_step_loss() if cfg.compile and running[k] is not None else step_loss
        loss, terms[t], running[k] = step(observers[k].model, hooks[k], plans[k], labels, x, x_ema, thetas,
                                          offsets, running[k], cfg, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(bounds[0], bounds[1])
            x_ema.lerp_(x, 1 - cfg.flatness_beta)
        if progress is not None and ((t + 1) % progress_every == 0 or t + 1 == cfg.iterations):
            progress(t, dict(zip(TERMS, terms[t].tolist())))
    names = TERMS if cfg.flatness_weight > 0 else tuple(n for n in TERMS if n != "flat")
    history = [{n: row[TERMS.index(n)] for n in names} for row in terms.tolist()]
    return SynthesisResult(x.detach(), history)
