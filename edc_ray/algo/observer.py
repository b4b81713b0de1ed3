"""Observer ("squeeze") training on real data: SGD, cosine, random-crop(pad) + flip (METHOD.md 1.1)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

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


def train_observer(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor,
                   cfg: ObserversConfig, mean: Sequence[float], std: Sequence[float], seed: int = 0,
                   device: torch.device | str = "cpu",
                   on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train an observer in one process on in-memory images (the Ray layer distributes the same step)."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    steps = math.ceil(len(images_uint8) / cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg, steps * cfg.epochs)
    for epoch in range(cfg.epochs):
        losses = []
        for idx in epoch_batches(len(images_uint8), cfg.batch_size, generator):
            x = normalize(images_uint8[idx].to(device), mean, std)
            losses.append(classifier_step(model, optimizer, scheduler, x, labels[idx].to(device),
                                          cfg, generator))
        if on_epoch is not None:
            on_epoch(epoch, sum(losses) / len(losses))
    return model.eval()
