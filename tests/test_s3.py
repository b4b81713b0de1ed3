"""Dataset roots and run folders at s3://bucket/prefix, against a real S3 server (SeaweedFS, see conftest)."""
import io
import pickle
import tarfile
import threading

import pytest
import ray
import s3fs
import torch
from PIL import Image

from edc_ray.config import ObserverSpec
from edc_ray.pipeline.run import run_pipeline
from edc_ray.storage import fsio
from edc_ray.storage.prepare import prepare_dataset
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.dataset_info import read_info
from edc_ray.storage.images import encode_png
from edc_ray.storage.shards import ShardReadError, iter_samples, load_split, write_shard
from tiny import make_tiny, tiny_config

pytestmark = pytest.mark.s3


def independent_s3() -> s3fs.S3FileSystem:
    """An S3 client of its own (no shared instance, no listing cache): what another process would see."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def objects_under(url: str) -> dict[str, bytes]:
    """Every object below ``url``, by its path relative to ``url``."""
    fs = independent_s3()
    prefix = url.removeprefix("s3://").rstrip("/")
    return {path.removeprefix(prefix + "/"): fs.cat_file(path) for path in fs.find(prefix)}


def tiny_samples(count: int) -> list[dict]:
    """``count`` webdataset samples of the tiny generated images."""
    images, labels = make_tiny(per_class=count // 3 + 1)
    return [{"__key__": f"s{i:04d}", "png": encode_png(images[i, 0].numpy()), "cls": int(labels[i])}
            for i in range(count)]


@pytest.fixture(scope="module")
def ray_with_s3(s3_server):
    """A private Ray instance started after the AWS variables are set, so that its workers inherit them."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_prepare_digits_to_s3_equals_local(s3_server, tmp_path):
    root = s3_server.url("digits")
    remote = prepare_dataset("digits", None, root, shard_size=500)
    local = prepare_dataset("digits", None, str(tmp_path / "digits"), shard_size=500)
    assert remote == local
    objects = objects_under(root)
    assert sorted(objects) == sorted(["_info.json"] + [shard for info in local.splits.values()
                                                      for shard in info.filenames])
    for split, info in local.splits.items():
        for shard in info.filenames:  # deterministic shards: the same bytes on both sides
            assert objects[shard] == (tmp_path / "digits" / shard).read_bytes()
        remote_images, remote_labels, remote_keys = load_split(root, split)
        local_images, local_labels, local_keys = load_split(str(tmp_path / "digits"), split)
        assert torch.equal(remote_images, local_images) and torch.equal(remote_labels, local_labels)
        assert remote_keys == local_keys
    assert prepare_dataset("digits", None, root, shard_size=500) == remote  # finished: reused as is
    assert read_info(root) == remote


def test_run_folder_on_s3(s3_server):
    run = RunFolder(s3_server.url("run") + "/")
    assert not run.exists("stats", "a.pt")
    url = run.save_torch({"x": torch.arange(4)}, "stats", "a.pt")
    assert url == f"{run.root}/stats/a.pt" and run.exists("stats", "a.pt")
    assert torch.equal(run.load_torch("stats", "a.pt")["x"], torch.arange(4))
    run.write_json({"b": [1, 2]}, "observers", "o.json")
    assert run.read_json("observers", "o.json") == {"b": [1, 2]}
    run.write_text("hello", "report.md")
    fsio.atomic_write_bytes(run.path("preview.png"), b"\x89PNG")
    objects = objects_under(run.root)
    assert sorted(objects) == ["observers/o.json", "preview.png", "report.md", "stats/a.pt"]
    assert objects["report.md"] == b"hello" and objects["preview.png"] == b"\x89PNG"
    assert fsio.list_dirs(run.root) == ["observers", "stats"]
    assert fsio.list_files(run.path("stats"), "*.pt") == [url]
    fsio.remove(url)
    assert not run.exists("stats", "a.pt") and fsio.list_files(run.path("stats")) == []


def test_files_written_by_another_process_are_seen(s3_server):
    """No stale listing: a resume check or the driver must see what Ray workers wrote after it last looked."""
    folder = s3_server.url("other")
    first, second = fsio.join(folder, "sub", "unit-00000.tar"), fsio.join(folder, "sub", "unit-00001.tar")
    fsio.atomic_write_bytes(first, b"old")
    assert fsio.list_files(fsio.join(folder, "sub")) == [first] and fsio.list_dirs(folder) == ["sub"]
    assert not fsio.exists(second)
    elsewhere = independent_s3()
    elsewhere.pipe_file(second.removeprefix("s3://"), b"written elsewhere")
    elsewhere.pipe_file(first.removeprefix("s3://"), b"rewritten elsewhere")
    assert fsio.exists(second) and fsio.read_bytes(second) == b"written elsewhere"
    assert fsio.list_files(fsio.join(folder, "sub")) == [first, second]
    with fsio.open_file(first) as f:  # the size comes from a fresh HEAD, not from the listing above
        assert f.read() == b"rewritten elsewhere"


def test_truncated_or_missing_s3_shard_names_the_url(s3_server):
    folder = s3_server.url("cut")
    whole = fsio.join(folder, "whole.tar")
    count = write_shard(whole, tiny_samples(12))
    assert len(list(iter_samples([whole], expected_counts={whole: count}))) == count
    data = fsio.read_bytes(whole)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last_sample = tar.getmember("s0011.cls").offset
    for cut in (len(data) // 2, last_sample):  # mid-member, and on a header boundary (the tar just ends)
        url = fsio.join(folder, f"cut-{cut}.tar")
        independent_s3().pipe_file(url.removeprefix("s3://"), data[:cut])
        with pytest.raises(ShardReadError, match=f"cannot read shard {url}:"):
            list(iter_samples([url], expected_counts={url: count}))
    missing = fsio.join(folder, "missing.tar")
    with pytest.raises(ShardReadError, match=f"cannot read shard {missing}:"):
        list(iter_samples([missing]))


def test_arrow_filesystem_for_ray_train(s3_server, tmp_path):
    assert fsio.arrow_filesystem("relative/eval") == (None, fsio.absolute("relative/eval"))
    url = s3_server.url("arrow")
    filesystem, path = fsio.arrow_filesystem(fsio.join(url, "eval"))
    assert path == f"{url.removeprefix('s3://')}/eval"
    with filesystem.open_output_stream(f"{path}/checkpoint/rank0.pt") as stream:
        stream.write(b"weights")
    assert fsio.read_bytes(fsio.join(url, "eval", "checkpoint", "rank0.pt")) == b"weights"
    shipped = pickle.dumps(filesystem)  # Ray sends it to the train controller and workers
    assert s3_server.secret_key.encode() not in shipped and s3_server.access_key.encode() not in shipped


@pytest.mark.slow
def test_pipeline_with_dataset_and_run_folder_in_s3(s3_server, ray_with_s3, tiny_imagefolder):
    data_root, run_dir = s3_server.url("data"), s3_server.url("run")
    report = run_pipeline(tiny_config(tiny_imagefolder, data_root, run_dir))
    run = RunFolder(run_dir)

    data = objects_under(data_root)
    assert {"_info.json", "train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar",
            "test/shard-000000.tar", "test/shard-000001.tar"} == set(data)
    written = objects_under(run_dir)
    expected = {"config.yaml", "observers/0-convnet_d2.pt", "observers/0-convnet_d2.json", "stats/global.pt",
                "stats/_complete.json", "candidates/_complete.json", "distilled/_info.json",
                "distilled/unit-00000.tar", "distilled/unit-00001.tar", "distilled/unit-00002.tar",
                "baseline/random-ipc2/unit-00000.tar", "baseline/random-ipc2/_info.json",
                "eval/distilled-convnet_d2.json", "eval/random-convnet_d2.json", "report.json", "report.md",
                "preview.png"} | {f"stats/classes/class-{c:05d}.pt" for c in range(3)} | \
        {f"candidates/class-{c:05d}.tar" for c in range(3)}
    assert expected <= set(written)
    assert not any(path.startswith("stats/parts/") for path in written)  # merged, then removed
    for name in ("observers-", "distilled-convnet_d2-seed0-", "random-convnet_d2-seed1-"):  # Ray Train storage, in S3 too
        assert any(path.startswith(f"eval/{name}") for path in written)
    checkpoints = [p for p in written if p.startswith("eval/distilled-convnet_d2-seed0-") and p.endswith("/rank0.pt")]
    assert checkpoints and any(p.endswith("/rank1.pt") for p in written)

    for unit in range(3):
        assert [label for _, _, label in iter_samples([run.unit_shard(unit)])] == [unit, unit]
    rows = {(r["set"], r["student"]): r for r in report["evaluation"]}
    assert set(rows) == {("distilled", "convnet_d2"), ("random", "convnet_d2")}
    for row in rows.values():
        assert 0.0 <= row["final_top1"] <= row["best_top1"] <= 100.0 and row["images"] == 6
    assert run.read_json("report.json")["evaluation"] == report["evaluation"] and report["run_dir"] == run_dir
    with Image.open(fsio.open_file(run.path("preview.png"))) as preview:
        assert preview.format == "PNG" and preview.height > 3 * 12

    # credentials reach no file of the run (config, report, Ray Train's own state, weights)
    for path, content in written.items():
        assert s3_server.secret_key.encode() not in content, path
        assert s3_server.access_key.encode() not in content, path

    # a re-run finds everything complete in S3 and redoes nothing
    again = run_pipeline(tiny_config(tiny_imagefolder, data_root, run_dir))
    assert again["synthesis"]["units_run"] == [] and again["evaluation"] == report["evaluation"]
    assert {p: c for p, c in objects_under(run_dir).items() if p.startswith("distilled/")} == \
        {p: c for p, c in written.items() if p.startswith("distilled/")}


@pytest.mark.slow
def test_s3_server_restart_mid_synthesis_loses_nothing(s3_server, ray_with_s3, tiny_imagefolder, observer_weights,
                                                      tmp_path):
    """The server goes down and comes back while units are being written: the run either absorbs it, or
    fails naming the endpoint; either way what was committed stays valid and a re-run finishes it."""
    data_root = s3_server.url("data")

    def config(run_dir: str):
        cfg = tiny_config(tiny_imagefolder, data_root, run_dir, evaluate=False)
        cfg.observers.models = [ObserverSpec("convnet_d2", weights=observer_weights)]  # no observer training
        cfg.synthesis.iterations, cfg.ray.synthesis_actors = 150, 1  # units one after another, ~1.5 s each
        return cfg

    reference = str(tmp_path / "reference")  # uninterrupted, local run folder, the same dataset in S3
    run_pipeline(config(reference))
    expected = {f"distilled/unit-{u:05d}.tar": (tmp_path / "reference" / "distilled" / f"unit-{u:05d}.tar")
                .read_bytes() for u in range(3)}

    run_dir = s3_server.url("run")
    before: dict[str, bytes] = {}
    restarted, finished = threading.Event(), threading.Event()

    def restart_once_a_unit_is_committed() -> None:
        first, fs = RunFolder(run_dir).unit_shard(0).removeprefix("s3://"), independent_s3()
        while not fs.exists(first):
            if finished.wait(0.05):
                return
        before.update(objects_under(run_dir + "/distilled"))
        s3_server.restart()
        restarted.set()

    watcher = threading.Thread(target=restart_once_a_unit_is_committed)
    watcher.start()
    try:
        report, error = run_pipeline(config(run_dir)), None
    except Exception as exn:  # noqa: BLE001 (the allowed outcome is checked below)
        report, error = None, f"{type(exn).__name__}: {exn}"  # not the exception: its frames hold the actors
    finished.set()
    watcher.join()
    assert restarted.is_set(), "the run ended before a unit was committed"
    missing = sorted(set(expected) - {f"distilled/{name}" for name in before})
    assert "unit-00000.tar" in before and missing, f"the restart did not land mid-synthesis: {sorted(before)}"

    print(f"S3 restart mid-synthesis: {'absorbed by retries' if error is None else error.splitlines()[0]}")
    if error is not None:  # not absorbed: the error must say what failed, and a re-run finishes the job
        assert s3_server.endpoint in error or "connect" in error.lower(), error
        report = run_pipeline(config(run_dir))
        assert 0 not in {u["unit"] for u in report["synthesis"]["units_run"]}
    else:
        assert sorted(u["unit"] for u in report["synthesis"]["units_run"]) == [0, 1, 2]
    written = objects_under(run_dir)
    for name, content in before.items():  # what was committed before the restart is still there, unchanged
        assert written[f"distilled/{name}"] == content
    assert {p: c for p, c in written.items() if p in expected} == expected
    assert {"report.json", "distilled/_info.json"} <= set(written)
    assert run_pipeline(config(run_dir))["synthesis"]["units_run"] == []
