"""Observer ("squeeze") training on real data: SGD, cosine, random-crop(pad) + flip (METHOD.md 1.1)."""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edc_ray.algo.augment import random_shift_flip
from edc_ray.algo.student import epoch_batches, normalize
from edc_ray.config import ObserversConfig


def make_optimizer(model: nn.Module, cfg: ObserversConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD(lr, momentum, weight decay) with cosine decay to 0 over `total_steps`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps))))
    return optimizer, scheduler


def classifier_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, x: torch.Tensor,
                    labels: torch.Tensor, cfg: ObserversConfig, generator: torch.Generator) -> float:
    """One supervised step on normalised images `x` with random-crop(pad) + flip; returns the loss."""
    model.train()
    x = random_shift_flip(x, cfg.crop_padding, cfg.flip, generator) if cfg.crop_padding or cfg.flip else x
    loss = F.cross_entropy(model(x), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (uint8 images, labels)


def epoch_seed(seed: int, index: int, epoch: int) -> int:
    """The seed of observer `index`'s batch order (and decode-time crops) in `epoch` (0-based), the same on
    every rank."""
    return seed + 7919 * epoch + index


class ObserverRun:
    """One observer's training as a resumable loop (METHOD.md 1.1): its optimiser and cosine schedule
    over `steps_per_epoch * cfg.epochs` steps, its augmentation generator and the epochs done.

    The one seed rule: torch's global generator is seeded with `seed + index` before the model is built
    (`seed_weights`), and the augmentation draws come from `seed + 1000 (index + 1) + rank`. `state()` is a
    checkpoint's content and `load_state()` resumes from it; `train()` runs the remaining epochs on the
    batches `epoch_batches(epoch)` yields. The single-process API and the Ray Train worker both run it.
    """

    def __init__(self, model: nn.Module, cfg: ObserversConfig, steps_per_epoch: int, seed: int, index: int,
                 rank: int = 0):
        self.model, self.cfg, self.steps = model, cfg, steps_per_epoch
        self.optimizer, self.scheduler = make_optimizer(model, cfg, steps_per_epoch * cfg.epochs)
        self.augment = torch.Generator().manual_seed(seed + 1000 * (index + 1) + rank)
        self.epoch = 0

    @staticmethod
    def seed_weights(seed: int, index: int) -> None:
        """Seed torch's generator for observer `index`'s initial weights (identical on every rank)."""
        torch.manual_seed(seed + index)

    def train(self, epoch_batches: Callable[[int], Batches], mean: Sequence[float], std: Sequence[float],
              device: torch.device | str, on_epoch: Callable[[int, float], None]) -> None:
        """The remaining epochs, `steps_per_epoch` batches each; after each, `on_epoch(epochs done, mean loss)`."""
        for epoch in range(self.epoch, self.cfg.epochs):
            losses = [classifier_step(self.model, self.optimizer, self.scheduler,
                                      normalize(images.to(device), mean, std), labels.to(device), self.cfg,
                                      self.augment)
                      for images, labels in itertools.islice(epoch_batches(epoch), self.steps)]
            self.epoch = epoch + 1
            on_epoch(self.epoch, sum(losses) / len(losses))

    def state(self) -> dict:
        """The full training state (weights, optimiser, schedule, generators, epoch)."""
        return {"epoch": self.epoch, "model": getattr(self.model, "module", self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "augment": self.augment.get_state(), "rng": torch.get_rng_state()}

    def load_state(self, state: dict) -> None:
        """Resume from `state()`."""
        getattr(self.model, "module", self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.augment.set_state(state["augment"])
        torch.set_rng_state(state["rng"])
        self.epoch = state["epoch"]


def memory_batches(images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> Batches:
    """Shuffled batches of in-memory images (order from `seed`)."""
    for idx in epoch_batches(len(images_uint8), batch_size, torch.Generator().manual_seed(seed)):
        yield images_uint8[idx], labels[idx]


def train_observer(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor,
                   cfg: ObserversConfig, mean: Sequence[float], std: Sequence[float], seed: int = 0,
                   device: torch.device | str = "cpu", index: int = 0,
                   on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train observer `index` in one process on in-memory images with `ObserverRun`'s loop (the Ray Train
    worker runs the same loop on streamed shards); `on_epoch(epochs done, mean loss)`."""
    model.to(device)
    steps = math.ceil(len(images_uint8) / cfg.batch_size)
    with torch.random.fork_rng(devices=[]):
        run = ObserverRun(model, cfg, steps, seed, index)
        run.train(lambda epoch: memory_batches(images_uint8, labels, cfg.batch_size, epoch_seed(seed, index, epoch)),
                  mean, std, device, on_epoch or (lambda epoch, loss: None))
    return model.eval()
