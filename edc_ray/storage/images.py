"""Encoded images in and out: lossless PNG, decoding, and fitting an image of any size to a square.

:class:`ImageFit` is how images of any size (ImageNet's JPEGs, read in place) become the square
``data.image_size`` tensors every stage works on, at decode time: a random-resized crop for training
views, or the ImageNet validation convention (shorter side to ``size * resize_ratio``, then a centre
crop). JPEGs are decoded at a reduced scale where the crop allows it (libjpeg's DCT scaling via
``Image.draft``), so a 500x375 photo read for a 56 px crop is not decoded at full size.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CHANNEL_MODES = {1: "L", 3: "RGB"}
CROPS = ("random_resized", "center")
Box = tuple[float, float, float, float]


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 image, ``HxW`` (grayscale) or ``HxWxC`` with C in 1 or 3."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"expected a uint8 HxW or HxWx{{1,3}} image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def _as_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def decode_image(data: bytes) -> torch.Tensor:
    """A uint8 ``CxHxW`` tensor from encoded image bytes (PNG, JPEG or WebP; C=1 for grayscale, 3 for RGB)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB"):
            raise ValueError(f"image mode {image.mode!r} is not supported: expected 'L' (grayscale) or 'RGB'")
        return _as_tensor(image)


@dataclass(frozen=True)
class ImageFit:
    """Turn an encoded image of any size and mode into a uint8 ``channels x size x size`` tensor.

    ``crop="center"``: resize the shorter side to ``round(size * resize_ratio)`` and take the centre
    ``size x size`` (``resize_ratio`` 8/7: 256 -> 224). ``crop="random_resized"``: torchvision's
    RandomResizedCrop (area fraction in ``scale``, aspect ratio in ``ratio``, 10 tries, then a centre
    crop), drawn from a generator seeded by (``seed``, sample key), so a pass is reproducible and a
    new ``seed`` (e.g. per epoch) draws new crops. Resizing is bilinear with antialiasing (PIL).
    """

    size: int
    channels: int
    crop: str = "center"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize_ratio: float = 8 / 7
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} unknown; allowed: {list(CROPS)}")
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels {self.channels!r} not supported; allowed: {sorted(CHANNEL_MODES)}")

    def box(self, width: int, height: int, key: str = "") -> Box:
        """The crop (left, top, right, bottom) in the image's own pixels."""
        if self.crop == "center":
            side = min(width, height) / max(1e-9, self.resize_ratio)
            return _centred(width, height, side, side)
        rng = random.Random(f"{self.seed}:{key}")
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        return _centred(width, height, min(w, width), min(h, height))

    def __call__(self, data: bytes, key: str = "") -> torch.Tensor:
        """The fitted image of the encoded ``data`` (``key`` seeds its random crop)."""
        mode = CHANNEL_MODES[self.channels]
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            left, top, right, bottom = self.box(width, height, key)
            shrink = self.size / min(right - left, bottom - top)
            if shrink < 1 and image.format == "JPEG":
                image.draft(mode if image.mode in CHANNEL_MODES.values() else None,
                            (math.ceil(width * shrink), math.ceil(height * shrink)))
            sx, sy = image.size[0] / width, image.size[1] / height
            image = image.convert(mode) if image.mode != mode else image
            fitted = image.resize((self.size, self.size), Image.Resampling.BILINEAR,
                                  box=(left * sx, top * sy, right * sx, bottom * sy))
        return _as_tensor(fitted)


def _centred(width: int, height: int, w: float, h: float) -> Box:
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h
