"""Per-image crops, flips, shifts and CutMix."""
import torch

from edc_ray.algo.augment import (apply_crops, crop_thetas, cutmix, random_crop_thetas,
                                  random_resized_crop_flip, random_roll_offsets, random_shift_flip,
                                  roll_images, rrc_boxes)


def test_full_box_without_flip_is_identity():
    x = torch.randn(3, 2, 6, 6)
    boxes = torch.tensor([[0.0, 0.0, 6.0, 6.0]]).repeat(3, 1)
    out = apply_crops(x, crop_thetas(boxes, 6, 6, torch.zeros(3, dtype=torch.bool)))
    assert torch.allclose(out, x, atol=1e-5)


def test_flip_mirrors_horizontally():
    x = torch.randn(2, 1, 5, 5)
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0]]).repeat(2, 1)
    out = apply_crops(x, crop_thetas(boxes, 5, 5, torch.ones(2, dtype=torch.bool)))
    assert torch.allclose(out, torch.flip(x, dims=[3]), atol=1e-5)


def test_crop_of_a_quadrant_upsamples_that_quadrant():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :2, :2] = 1.0  # only the top-left quadrant is bright
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    out = apply_crops(x, crop_thetas(boxes, 4, 4, torch.zeros(1, dtype=torch.bool)))
    # Sample points inside the box read only bright pixels; the last row/column sits half a source
    # pixel from the box edge, where bilinear interpolation also reads the dark neighbour.
    assert torch.allclose(out[..., :3, :3], torch.ones(3, 3))
    assert out.min() > 0.5


def test_crops_differ_per_image_within_a_batch():
    x = torch.randn(1, 1, 16, 16).repeat(8, 1, 1, 1)
    out = random_resized_crop_flip(x, (0.3, 1.0), True, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) == 8


def test_boxes_fit_and_respect_scale():
    boxes = rrc_boxes(500, 28, 28, (0.5, 1.0), torch.Generator().manual_seed(1))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert ((h * w) / (28 * 28) > 0.45).all()  # rounding of h, w may shave a little off 0.5


def test_same_seed_same_crops_and_gradients_flow():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    a = random_crop_thetas(x, (0.5, 1.0), True, torch.Generator().manual_seed(3))
    b = random_crop_thetas(x, (0.5, 1.0), True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    apply_crops(x, a).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_shift_moves_pixels_by_whole_steps_and_pads_with_zeros():
    x = torch.arange(1.0, 26.0).view(1, 1, 5, 5).repeat(16, 1, 1, 1)
    out = random_shift_flip(x, padding=2, flip=False, generator=torch.Generator().manual_seed(0))
    values = set(x.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= values
    assert torch.equal(random_shift_flip(x, 0, False), x)


def test_cutmix_pastes_a_box_and_reports_the_kept_area():
    x = torch.cat([torch.zeros(1, 1, 10, 10), torch.ones(1, 1, 10, 10)])
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        mixed, perm, lam = cutmix(x, g)
        for i in range(2):
            own = (mixed[i] == x[i]).float().mean().item()
            if perm[i] != i:
                assert abs(own - lam) < 1e-6
            assert 0.0 <= lam <= 1.0


def test_roll_images_matches_torch_roll_per_image_and_passes_gradients():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4).requires_grad_(True)
    offsets = torch.tensor([[1, -1], [0, 2]])
    out = roll_images(x, offsets)
    assert torch.equal(out[0], torch.roll(x[0], shifts=(1, -1), dims=(1, 2)))
    assert torch.equal(out[1], torch.roll(x[1], shifts=(0, 2), dims=(1, 2)))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # a permutation: every pixel used once


def test_random_roll_offsets_stay_within_jitter():
    offsets = random_roll_offsets(500, 3, torch.Generator().manual_seed(0))
    assert offsets.shape == (500, 2)
    assert int(offsets.min()) == -3 and int(offsets.max()) == 3
