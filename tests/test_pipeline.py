"""The Ray pipeline end to end on a tiny generated dataset, through a private local Ray instance."""
import os

import pytest
from PIL import Image

from edc_ray.pipeline.evaluation import evaluation_key
from edc_ray.pipeline.run import run_pipeline
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import iter_samples, load_split
from tiny import tiny_config

pytestmark = pytest.mark.slow


def shard_bytes(run_dir: str) -> dict[str, bytes]:
    folder = os.path.join(run_dir, "distilled")
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if n.endswith(".tar")}


def test_pipeline_end_to_end(ray_local, tiny_imagefolder, tmp_path):
    data_root, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
    cfg = tiny_config(tiny_imagefolder, data_root, run_dir)
    report = run_pipeline(cfg)
    run = RunFolder(run_dir)

    # every unit written exactly once, by named actors that had started (units never wait on the others)
    synth = report["synthesis"]
    assert synth["units_total"] == 3
    assert sorted(r["unit"] for r in synth["units_run"]) == [0, 1, 2]
    started = {w["name"] for w in synth["workers"]}
    assert {r["worker"] for r in synth["units_run"]} <= started <= {"SynthesisWorker-0", "SynthesisWorker-1"}
    assert len({w["pid"] for w in synth["workers"]}) == len(started)

    # shards readable, labels right, images changed by synthesis
    train_images, _, _ = load_split(data_root, "train")
    real = {tuple(img.flatten().tolist()) for img in train_images}
    for unit in range(3):
        samples = list(iter_samples([run.unit_shard(unit)]))
        assert [label for _, _, label in samples] == [unit, unit]
        assert all(tuple(img.flatten().tolist()) not in real for _, img, _ in samples)
    assert run.read_json("distilled", "_info.json")["ipc"] == 2

    # report fields present and sane
    rows = {(r["set"], r["student"]): r for r in report["evaluation"]}
    assert set(rows) == {("distilled", "convnet_d2"), ("random", "convnet_d2")}
    for row in rows.values():
        assert 0.0 <= row["final_top1"] <= 100.0 and row["final_top1"] <= row["best_top1"]
        assert row["images"] == 6 and [r["seed"] for r in row["per_seed"]] == [0, 1]
    assert set(report["stage_seconds"]) == {"prepare", "observers", "statistics", "synthesis", "export",
                                            "evaluation"}
    exported = sorted(os.listdir(os.path.join(run_dir, "export", "images")))
    assert exported == ["0-class0", "1-class1", "2-class2"]
    assert sum(len(os.listdir(os.path.join(run_dir, "export", "images", d))) for d in exported) == 6
    assert 0.0 <= report["observers"][0]["top1"] <= 100.0
    on_disk = run.read_json("report.json")
    assert on_disk["evaluation"] == report["evaluation"]
    assert "| convnet_d2 | distilled |" in open(run.path("report.md")).read()
    with Image.open(run.path("preview.png")) as preview:
        assert preview.format == "PNG" and preview.height > 3 * 12 and preview.width > 2 * 12  # 3 rows x 2
    assert run.exists("config.yaml") and run.exists("stats", "global.pt") and run.exists("stats", "_complete.json")
    assert not run.exists("stats", "parts")  # the partial results are gone once merged
    key = evaluation_key(cfg.evaluation)
    assert all(os.path.isdir(run.path("eval", f"distilled-convnet_d2-seed{k}-{key}")) for k in (0, 1))  # Ray Train

    # a re-run resumes: nothing is redone, the distilled set is untouched
    before = shard_bytes(run_dir)
    again = run_pipeline(tiny_config(tiny_imagefolder, data_root, run_dir))
    assert again["synthesis"]["units_run"] == []
    assert again["evaluation"] == report["evaluation"]
    assert shard_bytes(run_dir) == before


def test_same_seed_gives_byte_identical_distilled_shards(ray_local, tiny_imagefolder, tmp_path):
    data_root = str(tmp_path / "data")
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    run_pipeline(tiny_config(tiny_imagefolder, data_root, first, evaluate=False))
    run_pipeline(tiny_config(tiny_imagefolder, data_root, second, evaluate=False))
    a, b = shard_bytes(first), shard_bytes(second)
    assert list(a) == ["unit-00000.tar", "unit-00001.tar", "unit-00002.tar"]
    assert a == b
    assert [RunFolder(first).class_statistics(c)["0-convnet_d2"].counts.tolist() for c in range(3)] == \
        [[20], [20], [20]]
