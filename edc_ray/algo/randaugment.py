"""RandAugment on a whole uint8 batch, on its own device, with an explicit generator.

torchvision's `v2.RandAugment` draws one transform per call from the global RNG, so applying it per
image means a Python loop over the batch on the CPU. This draws every image's two operations (and
signs) at once and applies each distinct (operation, sign) to the sub-batch that drew it, with
torchvision's own functional ops and magnitudes (num_ops 2, magnitude 9 of 31 bins, nearest
interpolation, fill 0): the same distribution of outputs, a few batched kernels per operation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

NUM_OPS, MAGNITUDE, BINS = 2, 9, 31
_NEAREST = InterpolationMode.NEAREST


def _level(top: float) -> float:
    """torchvision's magnitude, computed as it does: float32 `linspace(0, top, 31)[9]`."""
    return float(torch.linspace(0.0, top, BINS)[MAGNITUDE])


def _ops(height: int, width: int) -> list[tuple[str, bool, Callable[[torch.Tensor, float], torch.Tensor]]]:
    """(name, signed, apply(images, sign)) for the 14 operations of torchvision's RandAugment."""
    shear = _level(0.3)
    return [
        ("Identity", False, lambda x, s: x),
        ("ShearX", True, lambda x, s: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, interpolation=_NEAREST,
                                                shear=[math.degrees(math.atan(s * shear)), 0.0], center=[0, 0])),
        ("ShearY", True, lambda x, s: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, interpolation=_NEAREST,
                                                shear=[0.0, math.degrees(math.atan(s * shear))], center=[0, 0])),
        ("TranslateX", True, lambda x, s: TF.affine(x, angle=0.0, translate=[int(s * _level(150 / 331 * width)), 0],
                                                    scale=1.0, interpolation=_NEAREST, shear=[0.0, 0.0])),
        ("TranslateY", True, lambda x, s: TF.affine(x, angle=0.0, translate=[0, int(s * _level(150 / 331 * height))],
                                                    scale=1.0, interpolation=_NEAREST, shear=[0.0, 0.0])),
        ("Rotate", True, lambda x, s: TF.rotate(x, angle=s * _level(30.0), interpolation=_NEAREST)),
        ("Brightness", True, lambda x, s: TF.adjust_brightness(x, 1.0 + s * _level(0.9))),
        ("Color", True, lambda x, s: TF.adjust_saturation(x, 1.0 + s * _level(0.9))),
        ("Contrast", True, lambda x, s: TF.adjust_contrast(x, 1.0 + s * _level(0.9))),
        ("Sharpness", True, lambda x, s: TF.adjust_sharpness(x, 1.0 + s * _level(0.9))),
        ("Posterize", False, lambda x, s: TF.posterize(x, bits=int(round(8 - MAGNITUDE / ((BINS - 1) / 4))))),
        ("Solarize", False, lambda x, s: TF.solarize(x, threshold=255.0 * float(torch.linspace(1.0, 0.0, BINS)[MAGNITUDE]))),
        ("AutoContrast", False, lambda x, s: TF.autocontrast(x)),
        ("Equalize", False, lambda x, s: TF.equalize(x)),
    ]


def rand_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandAugment (2 operations per image, magnitude 9) of uint8 (N, C, H, W) images, batched.

    The draws come from `generator` (a CPU generator: they are a few numbers per image), the pixels
    stay on their device.
    """
    n, _, height, width = images.shape
    ops = _ops(height, width)
    for _ in range(NUM_OPS):
        choice = torch.randint(len(ops), (n,), generator=generator)
        sign = torch.where(torch.rand(n, generator=generator) <= 0.5, -1.0, 1.0)
        out = images.clone()
        for index, (_, signed, apply) in enumerate(ops):
            for s in ((-1.0, 1.0) if signed else (1.0,)):
                picked = (choice == index) & ((sign == s) if signed else torch.ones(n, dtype=torch.bool))
                rows = torch.nonzero(picked).flatten()
                if len(rows):
                    rows_on = rows.to(images.device)
                    out[rows_on] = apply(images[rows_on], s)
        images = out
    return images
