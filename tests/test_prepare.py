"""Storage layer: every source round-trips through prepare -> shards -> load_split, plus the failure paths."""

from __future__ import annotations

import gzip
import pickle
import runpy
import tarfile
import uuid
from pathlib import Path
from urllib.error import URLError

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from edc_ray.storage import (
    ImageFit,
    ShardReadError,
    decode_image,
    encode_png,
    iter_samples,
    load_split,
    open_source,
    prepare_dataset,
    read_info,
    write_shard,
)
from edc_ray.storage import fsio
from edc_ray.storage.sources import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx
REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"
RNG = np.random.default_rng(0)

# ---------------------------------------------------------------- tiny sources in their real file formats


def _images(count: int, size: int, channels: int | None = None) -> np.ndarray:
    shape = (count, size, size) if channels is None else (count, size, size, channels)
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _idx_gz(magic: int, array: np.ndarray) -> bytes:
    """A gzipped idx file: big-endian magic and dimensions, then the uint8 data."""
    header = b"".join(v.to_bytes(4, "big") for v in (magic, *array.shape))
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def write_idx(folder: Path, split_arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """idx .gz files for splits 'train' / 'test' ('t10k' on disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in split_arrays.items():
        prefix = {"train": "train", "test": "t10k"}[split]
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(_idx_gz(IDX_IMAGES_MAGIC, images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(_idx_gz(IDX_LABELS_MAGIC, labels))


def _as_key(key: str, python2: bool) -> str | bytes:
    return key.encode() if python2 else key


def write_cifar(folder: Path, files: dict[str, tuple[np.ndarray, np.ndarray]], labels_key: str, python2: bool) -> None:
    """CIFAR python pickles: rows of 3072 planar CHW bytes; ``python2`` gives bytes keys like the originals."""
    folder.mkdir(parents=True)
    for name, (images, labels) in files.items():
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
        batch = {_as_key("data", python2): rows, _as_key(labels_key, python2): labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))


def write_png_tree(root: Path, tree: dict[str, dict[str, list[np.ndarray]]]) -> None:
    """``root/<split>/<class>/<i>.png``."""
    for split, classes in tree.items():
        for name, images in classes.items():
            (root / split / name).mkdir(parents=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(root / split / name / f"{i:03d}.png")


Expected = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (NxHxWxC images, labels)


def idx_case(tmp_path: Path) -> tuple[str, str, Expected, list[str]]:
    expected = {
        "train": (_images(7, 6), RNG.integers(0, 10, 7)),
        "test": (_images(3, 6), RNG.integers(0, 10, 3)),
    }
    write_idx(tmp_path / "fashion-mnist", expected)
    hwc = {split: (images[..., None], labels) for split, (images, labels) in expected.items()}
    return "idx", str(tmp_path / "fashion-mnist"), hwc, ["T-shirt/top"]


def cifar10_case(tmp_path: Path) -> tuple[str, str, Expected, list[str]]:
    train = [(_images(2, 32, 3), RNG.integers(0, 10, 2)) for _ in range(5)]
    test = (_images(3, 32, 3), RNG.integers(0, 10, 3))
    folder = tmp_path / "cifar-10-batches-py"
    files = {f"data_batch_{i + 1}": batch for i, batch in enumerate(train)} | {"test_batch": test}
    write_cifar(folder, files, "labels", python2=True)
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    train_all = (np.concatenate([i for i, _ in train]), np.concatenate([l for _, l in train]))
    return "cifar10", str(tmp_path), {"train": train_all, "test": test}, ["c0", "c1"]


def cifar100_case(tmp_path: Path) -> tuple[str, str, Expected, list[str]]:
    expected = {
        "train": (_images(5, 32, 3), RNG.integers(0, 100, 5)),
        "test": (_images(2, 32, 3), RNG.integers(0, 100, 2)),
    }
    folder = tmp_path / "cifar-100-python"
    write_cifar(folder, expected, "fine_labels", python2=False)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{i}" for i in range(100)]}))
    return "cifar100", str(folder), expected, ["f0", "f1"]


def imagefolder_case(tmp_path: Path) -> tuple[str, str, Expected, list[str]]:
    cats, dogs, val_dogs = _images(2, 5, 3), _images(3, 5, 3), _images(1, 5, 3)
    write_png_tree(tmp_path / "pics", {"train": {"cat": list(cats), "dog": list(dogs)}, "val": {"dog": list(val_dogs)}})
    expected = {
        "train": (np.concatenate([cats, dogs]), np.array([0, 0, 1, 1, 1])),
        "val": (val_dogs, np.array([1])),
    }
    return "imagefolder", str(tmp_path / "pics"), expected, ["cat", "dog"]


CASES = {"idx": idx_case, "cifar10": cifar10_case, "cifar100": cifar100_case, "imagefolder": imagefolder_case}


def _chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(tmp_path: Path, case: str) -> None:
    source, src, expected, class_prefix = CASES[case](tmp_path)
    out = tmp_path / "out"
    info = prepare_dataset(source, src, str(out), shard_size=2)
    assert read_info(str(out)) == info
    assert info.classes[: len(class_prefix)] == class_prefix
    assert list(info.splits) == list(expected)
    for split, (images, labels) in expected.items():
        loaded, loaded_labels, keys = load_split(str(out), split)
        assert torch.equal(loaded, _chw(images))
        assert loaded_labels.tolist() == labels.tolist()
        assert keys == [f"{split}-{i:08d}" for i in range(len(labels))]
        assert info.splits[split].counts_per_class == np.bincount(labels, minlength=len(info.classes)).tolist()
    train = expected["train"][0] / 255.0
    assert info.mean == pytest.approx(train.mean(axis=(0, 1, 2)).tolist())
    assert info.std == pytest.approx(train.std(axis=(0, 1, 2)).tolist())


def test_digits_round_trip(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    scaled = np.round(digits.images * 255 / 16).astype(np.uint8)
    info = prepare_dataset("digits", None, str(tmp_path), shard_size=1000)
    assert (info.image_size, info.channels, info.classes) == (8, 1, [str(d) for d in range(10)])
    assert (info.splits["train"].num_samples, info.splits["test"].num_samples) == (1437, 360)
    pairs = []
    for split in ("train", "test"):
        images, labels, _ = load_split(str(tmp_path), split)
        pairs += [(image.numpy().tobytes(), int(label)) for image, label in zip(images[:, 0], labels, strict=True)]
    originals = [(image.tobytes(), int(label)) for image, label in zip(scaled, digits.target, strict=True)]
    assert sorted(pairs) == sorted(originals)


def test_mean_std_hand_checked(tmp_path: Path) -> None:
    write_idx(tmp_path / "gray", {
        "train": (np.array([[[0, 255], [255, 255]], [[0, 0], [0, 0]]], np.uint8), np.array([0, 1])),
        "test": (np.zeros((1, 2, 2), np.uint8), np.array([0])),
    })  # fmt: skip
    gray = prepare_dataset("idx", str(tmp_path / "gray"), str(tmp_path / "gray-out"))
    assert gray.mean == pytest.approx([3 / 8]) and gray.std == pytest.approx([(3 / 8 - 9 / 64) ** 0.5])
    red, yellow = np.array([[[255, 0, 0]]], np.uint8), np.array([[[255, 255, 0]]], np.uint8)
    write_png_tree(tmp_path / "rgb", {"train": {"a": [red], "b": [yellow]}})
    rgb = prepare_dataset("imagefolder", str(tmp_path / "rgb"), str(tmp_path / "rgb-out"))
    assert rgb.mean == pytest.approx([1.0, 0.5, 0.0]) and rgb.std == pytest.approx([0.0, 0.5, 0.0])


def test_shards_are_plain_webdataset_tars(tmp_path: Path) -> None:
    source, src, _, _ = idx_case(tmp_path)
    info = prepare_dataset(source, src, str(tmp_path / "out"), shard_size=4)
    assert info.splits["train"].filenames == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert info.splits["train"].shard_lengths == [4, 3]
    with tarfile.open(list(info.shard_list(str(tmp_path / "out"), "train").urls)[1]) as tar:
        names = tar.getnames()
        label = tar.extractfile("train-00000004.cls").read()
    assert names == [f"train-{i:08d}.{ext}" for i in (4, 5, 6) for ext in ("cls", "png")]
    assert int(label) == int(load_split(str(tmp_path / "out"), "train")[1][4])


def test_grayscale_imagefolder_of_any_size_or_resized(tmp_path: Path) -> None:
    write_png_tree(tmp_path / "g", {"train": {"x": [_images(1, 6)[0], np.zeros((4, 8), np.uint8)]}})
    kept = prepare_dataset("imagefolder", str(tmp_path / "g"), str(tmp_path / "any"))
    assert (kept.channels, kept.image_size) == (1, None)  # sizes differ: fitted when read
    with pytest.raises(ValueError, match="any size"):
        load_split(str(tmp_path / "any"), "train")
    fitted, _, _ = load_split(str(tmp_path / "any"), "train", fit=ImageFit(4, 1))
    assert tuple(fitted.shape) == (2, 1, 4, 4) and fitted[1].max() == 0
    info = prepare_dataset("imagefolder", str(tmp_path / "g"), str(tmp_path / "ok"), image_size=4)
    images, _, _ = load_split(str(tmp_path / "ok"), "train")
    assert (info.channels, info.image_size, tuple(images.shape)) == (1, 4, (2, 1, 4, 4))
    assert images[1].max() == 0


def test_rerun_is_a_noop_and_output_is_deterministic(tmp_path: Path) -> None:
    source, src, _, _ = cifar10_case(tmp_path)
    first, second = tmp_path / "a", tmp_path / "b"
    info = prepare_dataset(source, src, str(first), shard_size=3)
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    assert prepare_dataset(source, src, str(first), shard_size=3) == info
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == mtimes
    prepare_dataset(source, src, str(second), shard_size=3)
    assert _file_bytes(first) == _file_bytes(second)


def test_an_interrupted_prepare_resumes_with_the_shards_it_lacks(tmp_path: Path, monkeypatch) -> None:
    from edc_ray.storage import prepare

    source, src, _, _ = cifar10_case(tmp_path)  # 10 train + 3 test images: 4 + 1 shards of 3
    out, clean = tmp_path / "out", tmp_path / "clean"
    real, written = prepare.write_source_shard, []

    def dies_at_the_fourth_shard(out_root, job, *args):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        written.append(job.name)
        return real(out_root, job, *args)

    monkeypatch.setattr(prepare, "write_source_shard", dies_at_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(source, src, str(out), shard_size=3)
    assert not (out / "_info.json").exists() and len(list((out / "_prepare").glob("*-shard-*.json"))) == 3
    written.clear()
    monkeypatch.setattr(prepare, "write_source_shard", lambda out_root, job, *args: (
        written.append(job.name), real(out_root, job, *args))[1])
    info = prepare_dataset(source, src, str(out), shard_size=3)
    assert written == ["train/shard-000003.tar", "test/shard-000000.tar"]  # only the two it lacked
    assert not (out / "_prepare").exists()
    assert info == prepare_dataset(source, src, str(clean), shard_size=3)
    assert _file_bytes(out) == _file_bytes(clean)
    (out / "_prepare").mkdir()  # another request's leftovers are not resumed
    prepare.fsio.atomic_write_json(str(out / "_prepare" / "_request.json"), {"shard_size": 2})
    (out / "_info.json").unlink()
    written.clear()
    prepare_dataset(source, src, str(out), shard_size=3)
    assert len(written) == 5 and _file_bytes(out) == _file_bytes(clean)


def test_other_arguments_need_overwrite_which_removes_stale_shards(tmp_path: Path) -> None:
    source, src, _, _ = idx_case(tmp_path)
    out = str(tmp_path / "out")
    prepare_dataset(source, src, out, shard_size=2)
    with pytest.raises(ValueError, match="--overwrite"):
        prepare_dataset(source, src, out, shard_size=100)
    info = prepare_dataset(source, src, out, shard_size=100, overwrite=True)
    on_disk = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert [f"train/{name}" for name in on_disk] == info.splits["train"].filenames == ["train/shard-000000.tar"]


def test_memory_filesystem_root_goes_through_the_fsspec_opener(tmp_path: Path) -> None:
    source, src, expected, _ = idx_case(tmp_path)
    root = f"memory://edc-test-{uuid.uuid4().hex}/fmnist"
    try:
        info = prepare_dataset(source, src, root, shard_size=3)
        images, labels, _ = load_split(root, "test")
        assert torch.equal(images, _chw(expected["test"][0]))
        urls = list(info.shard_list(root, "train").urls)
        only_first = list(iter_samples(urls, classes=None, nodesplitter=lambda shards: list(shards)[:1]))
        assert [key for key, _, _ in only_first] == ["train-00000000", "train-00000001", "train-00000002"]
    finally:
        fsspec.filesystem("memory").rm(root.split("://")[1].split("/")[0], recursive=True)


def test_class_filter(tmp_path: Path) -> None:
    source, src, expected, _ = idx_case(tmp_path)
    prepare_dataset(source, src, str(tmp_path / "out"), shard_size=2)
    wanted = int(expected["train"][1][0])
    images, labels, _ = load_split(str(tmp_path / "out"), "train", classes=[wanted])
    assert labels.tolist() == [wanted] * int((expected["train"][1] == wanted).sum())
    assert torch.equal(images, _chw(expected["train"][0][expected["train"][1] == wanted]))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, src, _, _ = idx_case(tmp_path)
    prepare_main = runpy.run_path(str(REPO / "jobs" / "prepare.py"))["main"]
    assert prepare_main(["--source", source, "--src", src, "--out", str(tmp_path / "o"), "--names", "mnist"]) == 0
    assert read_info(str(tmp_path / "o")).classes[0] == "0"
    assert "fashion-mnist train: 7 images in 1 shards under" in capsys.readouterr().out
    cluster = ["--source", source, "--src", src, "--out", str(tmp_path / "c"), "--address", "ray://head:10001"]
    assert prepare_main([*cluster, "--tasks", "2", "--shared-paths", src]) == 2  # refused before connecting
    assert f"error: --out {tmp_path / 'c'}: on this machine's disk, but the tasks run on the cluster" in \
        capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- failures are loud and name the culprit


def test_truncated_shard_names_the_shard(tmp_path: Path) -> None:
    source, src, _, _ = idx_case(tmp_path)
    out = str(tmp_path / "out")
    info = prepare_dataset(source, src, out, shard_size=4)
    shard = Path(list(info.shard_list(out, "train").urls)[0])
    whole = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # tarfile notices a cut inside a member's data; a cut at or inside a later header just ends the tar
    # stream, which only the per-shard sample counts of _info.json reveal
    for cut in (members[1].offset_data + 10, members[2].offset, members[2].offset + 100):
        shard.write_bytes(whole[:cut])
        with pytest.raises(ShardReadError, match=str(shard)):
            load_split(out, "train")
    shard.unlink()
    with pytest.raises(ShardReadError, match=str(shard)) as raised:
        load_split(out, "train")
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)  # Ray ships errors pickled


def test_corrupt_png_names_the_shard(tmp_path: Path) -> None:
    shard = str(tmp_path / "s.tar")
    write_shard(shard, [{"__key__": "k", "png": b"not a png", "cls": 0}])
    with pytest.raises(ShardReadError, match="s.tar"):
        list(iter_samples([shard]))


def test_missing_or_invalid_info_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="jobs/prepare.py"):
        read_info(str(tmp_path))
    (tmp_path / "_info.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="_info.json.*jobs/prepare.py"):
        read_info(str(tmp_path))


def test_bad_idx_magic(tmp_path: Path) -> None:
    source, src, _, _ = idx_case(tmp_path)
    labels = Path(src) / "train-labels-idx1-ubyte.gz"
    (Path(src) / "train-images-idx3-ubyte.gz").write_bytes(labels.read_bytes())
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: idx magic number 2049, expected 2051"):
        prepare_dataset(source, src, str(tmp_path / "out"))


def test_unknown_source_missing_path_and_bad_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown source 'mnist'.*'cifar10'.*'digits'.*'idx'"):
        open_source("mnist", None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source("idx", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"'imagefolder' does not take options \['names'\]"):
        open_source("imagefolder", str(tmp_path), names="mnist")


def test_torchvision_offline_points_to_the_offline_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match=r"network looks unreachable.*--source cifar10 --src"):
        open_source("torchvision", str(tmp_path), dataset="CIFAR10")


def test_paths_join_and_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert fsio.join("s3://bucket/", "a", "b/") == "s3://bucket/a/b"
    assert (fsio.join("/", "x"), fsio.join("", "x"), fsio.join("data/", "x", "y")) == ("/x", "x", "data/x/y")
    monkeypatch.chdir(tmp_path)
    assert fsio.absolute("data/x") == f"{tmp_path}/data/x"
    assert fsio.absolute("s3://bucket/data") == "s3://bucket/data"


def test_atomic_write_leaves_no_temp_file_and_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsio.atomic_write_json(str(tmp_path / "sub" / "a.json"), {"b": 1, "a": 2})
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.json"]
    assert (tmp_path / "sub" / "a.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'

    def crash(self: LocalFileSystem, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(LocalFileSystem, "mv", crash)
    with pytest.raises(OSError, match="disk full"):
        fsio.atomic_write_bytes(str(tmp_path / "sub" / "c.bin"), b"data")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.json"]


@pytest.mark.parametrize("error, failures, outcome, calls_expected", [
    (ConnectionResetError("connection reset by peer"), 2, None, 3),  # transient: retried, then written
    (ConnectionRefusedError("connection refused"), 99, ConnectionRefusedError, fsio.PUT_ATTEMPTS),
    (PermissionError("access denied"), 99, PermissionError, 1),  # not transient: no retry
])
def test_object_store_put_retries_only_transient_errors(monkeypatch, error, failures, outcome,
                                                       calls_expected) -> None:
    from fsspec.implementations.memory import MemoryFileSystem
    monkeypatch.setattr(fsio, "PUT_BACKOFF_S", 0.0)
    real_pipe, calls = MemoryFileSystem.pipe_file, []

    def flaky(self, path, value, **kwargs):
        calls.append(path)
        if len(calls) <= failures:
            raise error
        return real_pipe(self, path, value, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", flaky)
    url = f"memory://retry-{uuid.uuid4().hex}/a.bin"
    if outcome is None:
        fsio.atomic_write_bytes(url, b"data")
        assert fsio.read_bytes(url) == b"data"
    else:
        with pytest.raises(outcome):
            fsio.atomic_write_bytes(url, b"data")
        assert not fsio.exists(url)
    assert len(calls) == calls_expected


def test_real_mnist_header_parses() -> None:
    if not MNIST.is_dir():
        pytest.skip(f"{MNIST} not present")
    images = read_idx(str(MNIST / "train-images-idx3-ubyte.gz"), IDX_IMAGES_MAGIC, limit=5)
    labels = read_idx(str(MNIST / "train-labels-idx1-ubyte.gz"), IDX_LABELS_MAGIC, limit=5)
    assert images.shape == (5, 28, 28) and images.max() == 255
    assert labels.tolist() == [5, 0, 4, 1, 9]


def test_png_codec_round_trip() -> None:
    rgb, gray = _images(1, 3, 3)[0], _images(1, 3)[0]
    assert torch.equal(decode_image(encode_png(rgb)), torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(decode_image(encode_png(gray[:, :, None])), torch.from_numpy(gray)[None])
    with pytest.raises(ValueError, match="uint8"):
        encode_png(rgb.astype(np.float32))
