"""Candidate scoring and the initialisation of synthetic images (METHOD.md 1.3, from RDED)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edc_ray.algo.augment import apply_crops, random_crop_thetas


@torch.no_grad()
def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean of the models' logits on `x` (the online soft label and the scoring ensemble)."""
    outs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        outs.append(torch.stack([m(chunk) for m in models]).mean(0))
    return torch.cat(outs)


@torch.no_grad()
def candidate_losses(models: Sequence[nn.Module], x: torch.Tensor, labels: torch.Tensor,
                     batch_size: int = 256) -> torch.Tensor:
    """Per-image cross-entropy of the ensemble's mean logits against the true class."""
    return F.cross_entropy(ensemble_logits(models, x, batch_size), labels, reduction="none")


def lowest_per_class(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` lowest scores of every class present (distinct; ties by index), by class."""
    picked = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        order = torch.sort(scores[idx], stable=True).indices
        picked.append(idx[order[:k]])
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)


def stitch_mosaic(tiles: torch.Tensor, factor: int) -> torch.Tensor:
    """Stitch groups of factor**2 tiles (n*f*f, C, h, w), row-major, into (n, C, f*h, f*w)."""
    nf, c, h, w = tiles.shape
    n = nf // (factor * factor)
    grid = tiles.reshape(n, factor, factor, c, h, w)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(n, c, factor * h, factor * w)


def shuffle_patches(images: torch.Tensor, factor: int, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Permute the f x f cells of every mosaic; each image gets a permutation other than the identity.

    (The official helper returns its input unchanged by a bug; here the cells really move.)
    """
    n, c, height, width = images.shape
    h, w = height // factor, width // factor
    cells = images.reshape(n, c, factor, h, factor, w).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c, h, w)
    count = factor * factor
    out = torch.empty_like(cells)
    for i in range(n):
        perm = torch.arange(count)
        while count > 1 and torch.equal(perm, torch.arange(count)):
            perm = torch.randperm(count, generator=generator)
        out[i] = cells[i, perm]
    return stitch_mosaic(out.reshape(-1, c, h, w), factor)


def mosaic_init(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, ipc: int,
                factor: int = 2, crops_per_image: int = 4, scale: tuple[float, float] = (0.08, 1.0),
                shuffle: bool = False, generator: torch.Generator | None = None, chunk: int = 64,
                flip: bool = True, one_crop_per_image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RDED-style init for large images: score RandomResizedCrops (area fraction in `scale`, flipped
    at random with `flip`) of the candidates, keep the ipc * f**2 lowest-loss crops per class, shrink
    each to res / f and stitch f x f mosaics. With `one_crop_per_image` only each image's lowest-loss
    crop competes (RDED's selection), so no two tiles come from one image.

    Candidates are cropped and scored `chunk` images at a time, keeping only the running lowest-loss
    tiles (already shrunk), so memory holds one chunk's crops, not crops_per_image x all candidates.
    """
    height, width = images.shape[-2:]
    keep_per_class = ipc * factor**2
    tiles = images.new_zeros((0, images.shape[1], height // factor, width // factor))
    tile_labels = labels.new_zeros(0)
    tile_losses = images.new_zeros(0)
    for start in range(0, len(images), chunk):
        crop_labels = labels[start:start + chunk].repeat_interleave(crops_per_image)
        crops = images[start:start + chunk].repeat_interleave(crops_per_image, 0)
        crops = apply_crops(crops, random_crop_thetas(crops, scale, flip=flip, generator=generator))
        losses = candidate_losses(models, crops, crop_labels)
        if one_crop_per_image:  # the best of each image's crops_per_image consecutive crops
            best = losses.view(-1, crops_per_image).argmin(1) + torch.arange(
                0, len(losses), crops_per_image, device=losses.device)
            crop_labels, crops, losses = crop_labels[best], crops[best], losses[best]
        shrunk = F.interpolate(crops, size=(height // factor, width // factor), mode="bilinear",
                               antialias=True, align_corners=False)
        tiles, tile_labels, tile_losses = (torch.cat([tiles, shrunk]), torch.cat([tile_labels, crop_labels]),
                                           torch.cat([tile_losses, losses]))
        keep = lowest_per_class(tile_losses, tile_labels, keep_per_class)
        tiles, tile_labels, tile_losses = tiles[keep], tile_labels[keep], tile_losses[keep]
    for c in torch.unique(labels).tolist():
        if (found := int((tile_labels == c).sum())) < keep_per_class:
            raise ValueError(f"class {c}: {ipc} mosaics of {factor}x{factor} tiles need {keep_per_class} crops, its "
                             f"candidates gave {found}: raise init.candidates_per_class (or crops_per_image)")
    mosaics = stitch_mosaic(tiles, factor)
    if shuffle:
        mosaics = shuffle_patches(mosaics, factor, generator)
    return mosaics, tile_labels[:: factor * factor]


def noise_init(labels: torch.Tensor, shape: tuple[int, int, int],
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian-noise initialisation in normalised space (SRe2L, G-VBSM)."""
    return torch.randn((len(labels), *shape), generator=generator)
