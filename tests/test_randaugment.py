"""The batched RandAugment: torchvision's operations and magnitudes, drawn per image from a generator."""
import pytest
import torch
from torchvision.transforms import InterpolationMode, v2

from edc_ray.algo.randaugment import BINS, MAGNITUDE, _ops, rand_augment


def _images(n=6, c=3, size=16, seed=0):
    return (torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_operation_is_torchvisions_at_magnitude_9(channels):
    reference = v2.RandAugment()  # the per-image transform this batched version replaces
    images = _images(c=channels)
    names = [name for name, _, _ in _ops(16, 16)]
    assert names == list(reference._AUGMENTATION_SPACE)
    for name, signed, apply in _ops(16, 16):
        magnitudes, tv_signed = reference._AUGMENTATION_SPACE[name]
        assert signed == tv_signed, name
        levels = magnitudes(BINS, 16, 16)
        level = float(levels[MAGNITUDE]) if levels is not None and levels.ndim > 0 else 0.0
        for sign in ((-1.0, 1.0) if signed else (1.0,)):
            expected = torch.stack([reference._apply_image_or_video_transform(
                img, name, sign * level, InterpolationMode.NEAREST, reference._fill) for img in images])
            assert torch.equal(apply(images, sign), expected), (name, sign)


def test_draws_come_from_the_generator_and_vary_per_image():
    images = _images(n=64)
    a = rand_augment(images, torch.Generator().manual_seed(1))
    b = rand_augment(images, torch.Generator().manual_seed(1))
    c = rand_augment(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == images.shape
    same = images[:1].expand(64, -1, -1, -1).clone()  # 64 copies of one image: their outputs differ
    outputs = {tuple(x.flatten().tolist()) for x in rand_augment(same, torch.Generator().manual_seed(3))}
    assert len(outputs) > 32
