"""Student post-training on a distilled set, and top-1 evaluation (METHOD.md 1.5, 1.6).

Everything here is per-process and Ray-free: the Ray Train layer calls `StudentTrainer.step` on each
worker's slice of a batch, and `evaluate_counts` on each worker's slice of the validation set.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from edc_ray.algo.augment import cutmix, random_resized_crop_flip
from edc_ray.algo.init import ensemble_logits
from edc_ray.algo.losses import kl_distill_loss, mse_ce_loss
from edc_ray.algo.randaugment import rand_augment
from edc_ray.algo.precision import autocast, resolve_precision
from edc_ray.config import EvaluationConfig


def lr_factor(epoch: float, total_epochs: int, cfg: EvaluationConfig) -> float:
    """Learning-rate multiplier at (fractional) `epoch`.

    smooth:    1/2 (1 + cos(pi e / (zeta E)))  -- zeta = 2 ends at 1/2, zeta = 1 is plain cosine
    multistep: gamma ** (number of milestones <= e)
    ssrs:      smooth until 5E/6, then a linear drop from there to 0 at E
    """
    def smooth(e: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * e / (cfg.zeta * total_epochs)))

    if cfg.schedule == "smooth":
        return smooth(epoch)
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    knee = 5 * total_epochs / 6
    if epoch <= knee:
        return smooth(epoch)
    return smooth(knee) * max(0.0, (total_epochs - epoch) / (total_epochs - knee))


class ModelEMA:
    """theta_ema <- d_t * theta_ema + (1 - d_t) * theta after every optimiser step (METHOD.md 1.6).

    d_t = min(d, (1 + t) / (10 + t)) warms the decay up over the first steps (as timm's EMA does), so
    that runs of a few hundred steps are not dominated by the random initial weights. Floating-point
    buffers (BatchNorm running statistics) are averaged the same way, so they stay consistent with the
    averaged weights; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the live weights into the EMA copy."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        live = model.state_dict()
        for key, ema_value in self.module.state_dict().items():
            if ema_value.is_floating_point():
                ema_value.mul_(d).add_(live[key].detach(), alpha=1 - d)
            else:
                ema_value.copy_(live[key])


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, normalised per channel."""
    m = torch.tensor(mean, device=images_uint8.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images_uint8.device).view(1, -1, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s


def denormalize_to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float images -> uint8 (rounded, clamped)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


class StudentAugment:
    """RandAugment (per image, uint8) + per-image RandomResizedCrop + flip, then normalisation.

    Batched on the images' device; every draw comes from the CPU `generator` (a few numbers per image).
    """

    def __init__(self, cfg: EvaluationConfig, mean: Sequence[float], std: Sequence[float]):
        self.cfg, self.mean, self.std = cfg, mean, std

    def __call__(self, images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.cfg.randaugment:
            images_uint8 = rand_augment(images_uint8, generator)
        x = normalize(images_uint8, self.mean, self.std)
        return random_resized_crop_flip(x, (self.cfg.min_scale, 1.0), True, generator)


@dataclass
class StudentTrainer:
    """One student trained with online ensemble soft labels (METHOD.md 1.6).

    `step` takes a batch of uint8 images and hard labels: augment, CutMix, label with the mean logits of
    the teachers, then MSE + ce_weight * CE (or KL at temperature T), AdamW, scheduler, EMA update.
    """

    model: nn.Module
    teachers: Sequence[nn.Module]
    cfg: EvaluationConfig
    mean: Sequence[float]
    std: Sequence[float]
    steps_per_epoch: int
    device: torch.device | str = "cpu"

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.precision = resolve_precision(self.cfg.precision, self.device)
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.model.to(self.device, memory_format=memory_format)
        for t in self.teachers:
            t.to(self.device, memory_format=memory_format).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr,
                                           weight_decay=self.cfg.weight_decay)
        total = self.cfg.epochs
        spe = max(1, self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step / spe, total, self.cfg))
        self.ema = ModelEMA(_unwrap(self.model), self.cfg.ema_decay)
        self.augment = StudentAugment(self.cfg, self.mean, self.std)

    def step(self, images_uint8: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One optimiser step on one batch (uint8, moved to the device first and augmented there);
        returns the loss as a device tensor (reading it waits for the device)."""
        self.model.train()
        x = self.augment(images_uint8.to(self.device, non_blocking=True), generator)
        labels = labels.to(self.device, non_blocking=True)
        perm, lam = None, 1.0
        if self.cfg.cutmix > 0 and float(torch.rand((), generator=generator)) < self.cfg.cutmix:
            x, perm, lam = cutmix(x, generator)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            teacher = ensemble_logits(self.teachers, x).float()
            student = self.model(x).float()
        if self.cfg.loss == "mse_ce":
            loss = mse_ce_loss(student, teacher, labels, self.cfg.ce_weight, perm, lam)
        else:
            loss = kl_distill_loss(student, teacher, self.cfg.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(_unwrap(self.model))
        return loss.detach()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def to_device(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (small) distilled set moved to `device` once, through pinned memory when that is a GPU."""
    if device.type == "cuda":
        return images_uint8.pin_memory().to(device, non_blocking=True)
    return images_uint8.to(device)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled split of range(n) into batches (the last may be smaller)."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


@torch.no_grad()
def count_correct(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
                  ) -> tuple[int, int]:
    """(correct, total) top-1 counts over (uint8 images, labels) batches, so shards reduce by addition."""
    model.eval()
    correct = total = 0
    for images, labels in batches:
        pred = model(normalize(images.to(device), mean, std)).argmax(1).cpu()
        correct += int((pred == labels).sum())
        total += len(labels)
    return correct, total


def evaluate_counts(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor,
                    mean: Sequence[float], std: Sequence[float], batch_size: int = 500,
                    device: torch.device | str = "cpu") -> tuple[int, int]:
    """`count_correct` over in-memory images."""
    batches = ((images_uint8[s:s + batch_size], labels[s:s + batch_size])
               for s in range(0, len(images_uint8), batch_size))
    return count_correct(model, batches, mean, std, device)


def rank_share(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of a global batch (every rank gets a slice; DDP averages the gradients)."""
    return indices[rank::world]


def student_generators(seed: int, rank: int = 0) -> tuple[torch.Generator, torch.Generator]:
    """The one seed rule of a student run: (batch order, augmentation draws).

    The order comes from `seed` and is shared by every rank; the augmentation draws (and torch's global
    generator, which this seeds too) from `seed * 1000 + 1 + rank`, so each rank augments its share
    differently. The student's initial weights are the caller's (the pipeline seeds them with `seed`).
    """
    torch.manual_seed(seed * 1000 + 1 + rank)
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed * 1000 + 1 + rank)


class StudentRun:
    """One student's training as a resumable loop: the trainer, its generators, the epochs done and the
    best top-1 so far. `state()` is everything a checkpoint needs and `load_state()` resumes from it;
    `train()` runs the remaining epochs. The single-process API and the Ray Train worker both run it,
    the latter on its rank's share of every batch."""

    def __init__(self, trainer: StudentTrainer, seed: int, rank: int = 0, world: int = 1):
        self.trainer, self.rank, self.world = trainer, rank, world
        self.order, self.augment = student_generators(seed, rank)
        self.epoch, self.best = 0, float("-inf")
        self.curve: list[list[float]] = []  # [epoch, top-1] of every validation so far

    def validates(self, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based) ends with a validation: every `eval_every`, and the last."""
        cfg = self.trainer.cfg
        return epoch == cfg.epochs or bool(cfg.eval_every and epoch % cfg.eval_every == 0)

    def train(self, images_uint8: torch.Tensor, labels: torch.Tensor,
              validate: Callable[[nn.Module], float] | None, on_epoch: Callable[[dict], None]) -> None:
        """The remaining epochs; after each, `on_epoch(row)` with its mean loss and, on validation epochs
        (with `validate`), the EMA model's top-1 from `validate(model)` and the best so far."""
        cfg = self.trainer.cfg
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            losses = [self.trainer.step(images_uint8[rank_share(idx, self.rank, self.world)],
                                        labels[rank_share(idx, self.rank, self.world)], self.augment)
                      for idx in epoch_batches(len(images_uint8), cfg.batch_size, self.order)
                      if len(idx) >= self.world]  # a last batch smaller than the world would leave a rank empty
            self.epoch = epoch
            row = {"epoch": epoch, "loss": float(torch.stack(losses).mean())}
            if validate is not None and self.validates(epoch):
                top1 = validate(self.trainer.ema.module)
                self.best = max(self.best, top1)
                self.curve.append([epoch, top1])
                row.update(top1=top1, best_top1=self.best)
            on_epoch(row)

    def state(self) -> dict:
        """The full training state (weights, EMA, optimiser, schedule, generators, epoch, best, curve)."""
        t = self.trainer
        return {"epoch": self.epoch, "best": self.best, "curve": self.curve, "model": _unwrap(t.model).state_dict(),
                "ema": t.ema.module.state_dict(), "ema_updates": t.ema.updates,
                "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                "generators": [self.order.get_state(), self.augment.get_state()], "rng": torch.get_rng_state()}

    def load_state(self, state: dict) -> None:
        """Resume from `state()`."""
        t = self.trainer
        _unwrap(t.model).load_state_dict(state["model"])
        t.ema.module.load_state_dict(state["ema"])
        t.ema.updates = state["ema_updates"]
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        for generator, saved in zip((self.order, self.augment), state["generators"]):
            generator.set_state(saved)
        torch.set_rng_state(state["rng"])
        self.epoch, self.best = state["epoch"], state["best"]
        self.curve = state.get("curve", [])  # (checkpoints from before the curve was kept have none)


def train_student(model: nn.Module, teachers: Sequence[nn.Module], images_uint8: torch.Tensor,
                  labels: torch.Tensor, cfg: EvaluationConfig, mean: Sequence[float],
                  std: Sequence[float], val: tuple[torch.Tensor, torch.Tensor] | None = None,
                  seed: int = 0, device: torch.device | str = "cpu",
                  on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` on a distilled set in one process and return final/best top-1 of the EMA model.

    The loop is `StudentRun`'s, as in a Ray Train worker: the same seed on the same set gives the
    pipeline's numbers. Validates every `cfg.eval_every` epochs (0: only at the end) and after the last.
    """
    steps = math.ceil(len(images_uint8) / cfg.batch_size)
    trainer = StudentTrainer(model, teachers, cfg, mean, std, steps, device)
    images_uint8 = to_device(images_uint8, trainer.device)
    history: list[dict] = []

    def validate(ema: nn.Module) -> float:
        correct, total = evaluate_counts(ema, *val, mean, std, cfg.val_batch_size, device)
        return 100.0 * correct / total

    def record(row: dict) -> None:
        history.append(row)
        if on_epoch is not None:
            on_epoch(row["epoch"] - 1, row)

    with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
        StudentRun(trainer, seed).train(images_uint8, labels, validate if val is not None else None, record)
    accs = [r["top1"] for r in history if "top1" in r]
    return {"final_top1": accs[-1] if accs else None, "best_top1": max(accs) if accs else None,
            "history": history, "ema_model": trainer.ema.module}
