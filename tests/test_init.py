"""Candidate scoring, distinct real initialisation, mosaics and patch shuffling."""
import pytest
import torch

from edc_ray.algo.candidates import sample_priority
from edc_ray.algo.init import lowest_per_class, mosaic_init, shuffle_patches, stitch_mosaic
from edc_ray.models import create_model


def test_stitch_mosaic_row_major():
    tiles = torch.arange(8.0).view(8, 1, 1, 1)  # two mosaics of 4 tiles
    out = stitch_mosaic(tiles, 2)
    assert out.shape == (2, 1, 2, 2)
    assert out[0, 0].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert out[1, 0].tolist() == [[4.0, 5.0], [6.0, 7.0]]


def test_shuffle_patches_really_moves_cells_and_keeps_them():
    tiles = torch.arange(40.0).view(40, 1, 1, 1).repeat(1, 2, 3, 3)
    mosaics = stitch_mosaic(tiles, 2)  # 10 mosaics of 6x6
    shuffled = shuffle_patches(mosaics, 2, torch.Generator().manual_seed(0))
    assert shuffled.shape == mosaics.shape
    for before, after in zip(mosaics, shuffled):
        assert not torch.equal(before, after)
        cells = lambda m: sorted(m.reshape(2, 2, 3, 2, 3)[0, :, 0, :, 0].flatten().tolist())
        assert cells(before) == cells(after)


def test_lowest_per_class_distinct_and_sorted():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.05])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    picked = lowest_per_class(scores, labels, 2)
    assert picked.tolist() == [1, 0, 5, 4]


def test_sample_priority_deterministic_uniform_range():
    a = [sample_priority(f"k{i}", 7) for i in range(200)]
    assert a == [sample_priority(f"k{i}", 7) for i in range(200)]
    assert all(0.0 <= v < 1.0 for v in a)
    assert a != [sample_priority(f"k{i}", 8) for i in range(200)]
    assert 0.35 < sum(a) / len(a) < 0.65


def test_mosaic_init_shapes_labels_and_content():
    torch.manual_seed(0)
    model = create_model("convnet", num_classes=2, in_chans=1, image_size=8, depth=1, width=4).eval()
    images = torch.rand(12, 1, 8, 8)
    labels = torch.tensor([0] * 6 + [1] * 6)
    out, out_labels = mosaic_init([model], images, labels, ipc=2, factor=2, crops_per_image=2,
                                  generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 8, 8)
    assert out_labels.tolist() == [0, 0, 1, 1]
    shuffled, _ = mosaic_init([model], images, labels, ipc=2, factor=2, crops_per_image=2,
                              shuffle=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out, shuffled)


def test_mosaic_tiles_come_from_distinct_images_when_asked():
    torch.manual_seed(0)
    model = create_model("convnet", num_classes=1, in_chans=1, image_size=8, depth=1, width=4).eval()
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 8, 8).contiguous()  # image i is constant i
    labels = torch.zeros(5, dtype=torch.long)
    out, _ = mosaic_init([model], images, labels, ipc=1, factor=2, crops_per_image=4, one_crop_per_image=True,
                         generator=torch.Generator().manual_seed(0))
    tiles = {round(float(out[0, 0, r, c]), 4) for r in (0, 4) for c in (0, 4)}  # a crop of a constant image
    assert len(tiles) == 4  # four tiles, four source images
    with pytest.raises(ValueError, match="class 0: 2 mosaics of 2x2 tiles need 8 crops, its candidates gave 5"):
        mosaic_init([model], images, labels, ipc=2, factor=2, crops_per_image=4, one_crop_per_image=True)
