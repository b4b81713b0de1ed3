"""Batched, differentiable augmentations with a crop drawn per image.

RandomResizedCrop + flip is expressed as one affine `grid_sample` per batch, so every image gets its
own crop (the official SRe2L/EDC code draws one crop per batch), gradients flow to the pixels, and the
same crop can be replayed on another tensor (the flatness term needs it for the EMA images).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_TRIES = 10


def _device(generator: torch.Generator | None) -> torch.device:
    """Where a generator draws (random numbers are made where they are used: no host-device copies)."""
    return torch.device("cpu") if generator is None else generator.device


def rrc_boxes(n: int, height: int, width: int, scale: tuple[float, float],
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample torchvision-style RandomResizedCrop boxes, one per image: (n, 4) = (top, left, h, w).

    Ten tries per image of (area fraction in `scale`, log-uniform aspect in [3/4, 4/3]); the first box
    that fits is kept, else the whole image (as torchvision falls back to a centre crop). Drawn on the
    generator's device, without a host sync.
    """
    device = _device(generator)
    area = height * width
    frac = torch.empty(n, _TRIES, device=device).uniform_(scale[0], scale[1], generator=generator)
    aspect = torch.exp(torch.empty(n, _TRIES, device=device).uniform_(*_LOG_RATIO, generator=generator))
    w = torch.round(torch.sqrt(area * frac * aspect))
    h = torch.round(torch.sqrt(area * frac / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1, device=device))
    rows = torch.arange(n, device=device)
    h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.full((n,), float(height), device=device))
    w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.full((n,), float(width), device=device))
    u = torch.rand(n, 2, generator=generator, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    return torch.stack([top, left, h, w], 1)


def crop_thetas(boxes: torch.Tensor, height: int, width: int, flips: torch.Tensor) -> torch.Tensor:
    """Affine matrices (n, 2, 3) that map the output grid onto each box, mirrored where `flips`."""
    top, left, h, w = boxes.unbind(1)
    sx, sy = w / width, h / height
    cx = (left + w / 2) / width * 2 - 1
    cy = (top + h / 2) / height * 2 - 1
    sign = 1 - 2 * flips.to(boxes.dtype)
    zeros = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx * sign, zeros, cx], 1), torch.stack([zeros, sy, cy], 1)], 1)


def random_crop_thetas(x: torch.Tensor, scale: tuple[float, float], flip: bool,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one RandomResizedCrop (+ optional horizontal flip) per image of `x` (N, C, H, W)."""
    n, _, height, width = x.shape
    device = _device(generator)
    boxes = rrc_boxes(n, height, width, scale, generator)
    flips = (torch.rand(n, generator=generator, device=device) < 0.5) if flip else \
        torch.zeros(n, dtype=torch.bool, device=device)
    return crop_thetas(boxes, height, width, flips).to(x.device, x.dtype)


@functools.lru_cache(maxsize=16)
def _base_grid(height: int, width: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(H*W, 3) rows (x, y, 1) of the output pixel centres in [-1, 1], as `F.affine_grid` lays them."""
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=dtype, device=device)
    xy = F.affine_grid(theta, [1, 1, height, width], align_corners=False).view(-1, 2)
    return torch.cat([xy, torch.ones_like(xy[:, :1])], 1)


def apply_crops(x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Resample every image of `x` through its affine crop (bilinear, output size = input size).

    The sampling grid is `F.affine_grid`'s, as one batched product with a cached grid of pixel centres.
    """
    n, _, height, width = x.shape
    base = _base_grid(height, width, thetas.dtype, str(thetas.device))
    grid = torch.bmm(base.expand(n, *base.shape), thetas.transpose(1, 2)).view(n, height, width, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop_flip(x: torch.Tensor, scale: tuple[float, float], flip: bool = True,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image RandomResizedCrop + flip, differentiable with respect to `x`."""
    return apply_crops(x, random_crop_thetas(x, scale, flip, generator))


def random_shift_flip(x: torch.Tensor, padding: int, flip: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding (`RandomCrop(size, padding)`) + flip, one draw per image."""
    n, _, height, width = x.shape
    device = _device(generator)
    shifts = torch.randint(-padding, padding + 1, (n, 2), generator=generator, device=device).to(x.dtype)
    boxes = torch.stack([shifts[:, 0], shifts[:, 1], torch.full((n,), float(height), device=device),
                         torch.full((n,), float(width), device=device)], 1)
    flips = (torch.rand(n, generator=generator, device=device) < 0.5) if flip else \
        torch.zeros(n, dtype=torch.bool, device=device)
    thetas = crop_thetas(boxes, height, width, flips).to(x.device, x.dtype)
    grid = F.affine_grid(thetas, list(x.shape), align_corners=False)
    # Integer shifts land exactly on pixel centres, so "nearest" copies pixels; outside is zero.
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def random_roll_offsets(n: int, jitter: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image (dy, dx) shifts, each uniform in [-jitter, jitter] (SRe2L's jitter)."""
    return torch.randint(-jitter, jitter + 1, (n, 2), generator=generator, device=_device(generator))


def roll_images(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Circularly shift image i of `x` (N, C, H, W) by offsets[i] = (dy, dx), as torch.roll would.

    A gather, so it is differentiable and every image gets its own shift.
    """
    n, c, height, width = x.shape
    offsets = offsets.to(x.device)
    rows = (torch.arange(height, device=x.device)[None] - offsets[:, :1]) % height  # (n, H)
    cols = (torch.arange(width, device=x.device)[None] - offsets[:, 1:]) % width  # (n, W)
    x = x.gather(2, rows[:, None, :, None].expand(n, c, height, width))
    return x.gather(3, cols[:, None, None, :].expand(n, c, height, width))


def cutmix(x: torch.Tensor, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix with lambda ~ Beta(1, 1): paste a box from a permuted batch.

    Returns (mixed images, permutation, lambda) where lambda is the kept area fraction, so a loss on
    labels is `lam * loss(y) + (1 - lam) * loss(y[perm])`.
    """
    n, _, height, width = x.shape
    lam = float(torch.rand((), generator=generator))
    perm = torch.randperm(n, generator=generator).to(x.device)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return mixed, perm, lam
