"""Datasets brought the way people have them: timm-layout WebDataset shards read in place (any image
size, fitted as they are decoded), and a prepare that keeps image files' own bytes, in Ray tasks, in a
layout timm's own reader reads."""
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.timm_layout import jpeg, photo, write_timm_layout
from edc_ray.config import ConfigError, load_config
from edc_ray.pipeline.run import prepare_data, run_pipeline
from edc_ray.storage import ImageFit, encode_png, fsio, prepare_dataset
from edc_ray.storage.dataset_info import read_info
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import SampleSpec, iter_raw_samples, iter_samples

RNG = np.random.default_rng(0)


def encoded(image: np.ndarray) -> bytes:
    return jpeg(image, quality=95)


# ---------------------------------------------------------------- fitting images of any size


def test_center_fit_matches_resize_then_centre_crop():
    yy, xx = np.meshgrid(np.linspace(0, 1, 300), np.linspace(0, 1, 400), indexing="ij")
    image = (np.stack([xx, yy, xx * yy], -1) * 255).astype(np.uint8)  # smooth: sub-pixel offsets barely show
    fitted = ImageFit(224, 3, "center")(encoded(image))
    pil = Image.open(io.BytesIO(encoded(image))).convert("RGB")
    reference = pil.resize((341, 256), Image.Resampling.BILINEAR)  # shorter side 224 * 8/7 = 256
    left, top = (341 - 224) // 2, (256 - 224) // 2
    reference = np.asarray(reference.crop((left, top, left + 224, top + 224))).transpose(2, 0, 1)
    assert fitted.shape == (3, 224, 224) and fitted.dtype == torch.uint8
    assert np.abs(fitted.numpy().astype(int) - reference.astype(int)).mean() < 2  # rounding of the box only


def test_random_resized_fit_is_reproducible_per_key_and_seed():
    data = encoded(RNG.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    fit = ImageFit(32, 3, "random_resized", (0.08, 1.0))
    assert torch.equal(fit(data, "a"), fit(data, "a"))
    assert not torch.equal(fit(data, "a"), fit(data, "b"))
    assert not torch.equal(fit(data, "a"), ImageFit(32, 3, "random_resized", (0.08, 1.0), seed=1)(data, "a"))
    for key in map(str, range(50)):  # every box lies inside the image with an area fraction in scale
        left, top, right, bottom = fit.box(90, 120, key)
        assert 0 <= left < right <= 90 and 0 <= top < bottom <= 120
        assert (right - left) * (bottom - top) <= 90 * 120


def test_fit_converts_modes_and_decodes_jpegs_at_reduced_scale():
    gray = Image.fromarray(RNG.integers(0, 256, (64, 48), dtype=np.uint8))
    buffer = io.BytesIO()
    gray.save(buffer, "JPEG")
    assert ImageFit(16, 3)(buffer.getvalue()).shape == (3, 16, 16)  # a grayscale JPEG in an RGB dataset
    big = encoded(photo(1, 800, 1200, RNG))
    drafted = ImageFit(32, 3)(big)  # libjpeg decodes at 1/8 scale: 150x100 is still >= the crop
    full = ImageFit(32, 3)(encode_png(np.asarray(Image.open(io.BytesIO(big)))))  # PNG: decoded at full size
    assert drafted.shape == (3, 32, 32)
    assert (drafted.float() - full.float()).abs().mean() < 3
    with pytest.raises(ValueError, match="crop 'zoom' unknown"):
        ImageFit(32, 3, "zoom")


# ---------------------------------------------------------------- timm's layout read in place


@pytest.fixture(scope="module")
def timm_root(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("tiny-wds"))
    return root, write_timm_layout(root)


def test_timm_info_is_read_with_class_names_from_a_file(timm_root):
    root, written = timm_root
    info = read_info(root, f"{root}/classes.txt")
    assert info.classes == ["n00000000", "n00000001", "n00000002"] and info.image_size is None
    assert info.splits["train"].filenames == ["tiny-train-0000.tar", "tiny-train-0001.tar", "tiny-train-0002.tar"]
    assert info.splits["train"].num_samples == 36 and info.normalisation()[0] == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="data.classes"):
        read_info(root)  # timm's info names no classes


def test_a_split_by_pattern_takes_lengths_from_the_info_or_a_count(timm_root, tmp_path):
    root, _ = timm_root
    info = read_info(root, f"{root}/classes.txt")
    part = info.split("tiny-train-{0001..0002}.tar")
    assert part.filenames == ["tiny-train-0001.tar", "tiny-train-0002.tar"] and part.num_samples == 24
    bare = tmp_path / "bare"  # no _info.json at all: the count comes after '|'
    bare.mkdir()
    for name in info.splits["train"].filenames:
        (bare / name).write_bytes(Path(root, name).read_bytes())
    (bare / "classes.txt").write_bytes(Path(root, "classes.txt").read_bytes())
    shards = read_info(str(bare), str(bare / "classes.txt")).shard_list(str(bare), "tiny-train-{0000..0002}.tar|36")
    assert shards.lengths is None and shards.estimated_lengths() == (12, 12, 12)
    with pytest.raises(ValueError, match=r"add the split's sample count after '\|'"):
        read_info(str(bare), str(bare / "classes.txt")).split("tiny-train-{0000..0002}.tar")


def test_in_place_samples_are_fitted_with_their_labels(timm_root):
    root, written = timm_root
    fit = ImageFit(16, 3, "center")
    info = read_info(root, f"{root}/classes.txt")
    shards = info.shard_list(root, "validation")
    samples = list(iter_samples(list(shards.urls), expected_counts=shards.expected_counts(),
                                spec=SampleSpec.of(info, fit)))
    assert len(samples) == 12 and all(image.shape == (3, 16, 16) for _, image, _ in samples)
    raw = {s.key: s for s in iter_raw_samples(list(shards.urls))}
    for key, image, label in samples:
        assert json.loads(raw[key].fields["json"])["label"] == label
        assert torch.equal(image, fit(raw[key].fields["jpg"]))


def timm_overrides(root: str, run_dir: str) -> list[str]:
    return [f"data.root={root}", f"data.classes={root}/classes.txt", "data.image_size=16",
            "data.val_split=validation", "observers.models=[{arch: convnet_d2}]", "observers.epochs=1",
            "observers.batch_size=12", "init.candidates_per_class=6", "synthesis.ipc=1",
            "synthesis.classes_per_unit=3", "synthesis.iterations=2", "evaluation.students=[convnet_d2]",
            "evaluation.epochs=1", "evaluation.batch_size=3", "evaluation.seeds=[0]", "evaluation.eval_every=0",
            "evaluation.val_batch_size=12", "ray.synthesis_actors=1", "ray.actor_cpus=0.5", "ray.train_workers=1",
            "ray.train_worker_cpus=0.5", "ray.stats_tasks=2", "ray.stats_cpus=0.5", "statistics.loader_workers=0",
            f"output.run_dir={run_dir}"]


def test_a_dataset_of_any_size_needs_data_image_size(timm_root):
    root, _ = timm_root
    cfg = load_config(None, [f"data.root={root}", f"data.classes={root}/classes.txt", "data.val_split=validation"])
    with pytest.raises(ConfigError, match="data.image_size: the images of .* have any size"):
        prepare_data(cfg)
    cfg.data.val_split = "valid"
    cfg.data.image_size = 16
    with pytest.raises(ConfigError, match="data.val_split: dataset 'tiny' has no split 'valid'"):
        prepare_data(cfg)


@pytest.mark.slow
def test_the_pipeline_runs_on_timm_shards_in_place(ray_local, timm_root, tmp_path):
    root, _ = timm_root
    before = sorted(p.name for p in Path(root).iterdir())
    report = run_pipeline(load_config(None, timm_overrides(root, str(tmp_path / "run"))))
    assert sorted(p.name for p in Path(root).iterdir()) == before  # nothing prepared, nothing copied
    assert RunFolder(str(tmp_path / "run")).candidates_marker()["images"] == 36
    distilled = [s for s in iter_raw_samples([str(p) for p in sorted((tmp_path / "run" / "distilled").glob("*.tar"))])]
    assert len(distilled) == 3 and all(Image.open(io.BytesIO(s.fields["png"])).size == (16, 16) for s in distilled)
    assert {row["set"] for row in report["evaluation"]} >= {"distilled", "random"}


@pytest.mark.slow
def test_the_pipeline_runs_on_timm_shards_on_s3(ray_local, s3_server, tmp_path):
    root = s3_server.url("timm-wds")
    write_timm_layout(root, seed=1)
    report = run_pipeline(load_config(None, timm_overrides(root, str(tmp_path / "run"))))
    assert RunFolder(str(tmp_path / "run")).candidates_marker()["images"] == 36
    assert {row["set"] for row in report["evaluation"]} >= {"distilled", "random"}


# ---------------------------------------------------------------- prepare keeps the original bytes


def jpeg_imagefolder(root: Path) -> dict[str, str]:
    """An ImageFolder of JPEGs of several sizes (one grayscale, one PNG); file name -> sha256."""
    sums = {}
    for split, per_class in (("train", 5), ("val", 2)):
        for label, name in enumerate(("ant", "bee")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                data = jpeg(photo(label, 30 + 7 * i, 40 + 3 * i, RNG))
                (folder / f"{i}.jpg").write_bytes(data)
                sums[f"{split}/{name}/{i}.jpg"] = hashlib.sha256(data).hexdigest()
    gray = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (20, 20), dtype=np.uint8)).save(gray, "JPEG")
    (root / "train" / "ant" / "gray.jpg").write_bytes(gray.getvalue())  # converted: not an RGB JPEG
    return sums


def test_prepare_keeps_jpeg_bytes_and_tasks_do_not_change_the_output(ray_local, tmp_path):
    sums = jpeg_imagefolder(tmp_path / "src")
    one = prepare_dataset("imagefolder", str(tmp_path / "src"), str(tmp_path / "one"), shard_size=4)
    two = prepare_dataset("imagefolder", str(tmp_path / "src"), str(tmp_path / "two"), shard_size=4, tasks=2)
    assert one == two and one.image_size is None and one.channels == 3
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.tar"))
    assert len(files) == 4  # train: 11 images in 3 shards, val: 4 in 1
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    stored = [s for s in iter_raw_samples([str(tmp_path / "one" / f) for f in files])]
    kept = {hashlib.sha256(s.fields["jpg"]).hexdigest() for s in stored if "jpg" in s.fields}
    assert kept == set(sums.values())  # every RGB JPEG stored as it was
    assert sum("png" in s.fields for s in stored) == 1  # the grayscale one, converted losslessly
    assert one.splits["train"].counts_per_class == [6, 5] and len(one.mean) == 3


def test_timms_own_reader_reads_what_prepare_wrote(tmp_path):
    from timm.data import create_dataset

    jpeg_imagefolder(tmp_path / "src")
    info = prepare_dataset("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), shard_size=4)
    dataset = create_dataset("wds/tiny", root=str(tmp_path / "out"), split="train", is_training=False)
    read = [(image.size, int(target)) for image, target in dataset]
    assert len(read) == info.splits["train"].num_samples == 11
    assert sorted(t for _, t in read) == [0] * 6 + [1] * 5
    assert fsio.exists(str(tmp_path / "out" / "_info.json"))
