"""jobs/benchmark.py and jobs/evaluate.py end to end on the tiny dataset through local Ray: a grid run
in two parts that merge, observers and statistics computed once, exports evaluated by evaluate.py."""
import importlib.util
import json
import os

import pytest
import yaml

from benchmarks import probe
from edc_ray.config import apply_override
from edc_ray.storage import fsio
from edc_ray.storage.shards import iter_samples
from tiny import tiny_overrides

pytestmark = pytest.mark.slow
JOBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")


def job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", os.path.join(JOBS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_grid(tmp_path, src: str) -> str:
    base: dict = {}
    for assignment in tiny_overrides(src, str(tmp_path / "data"), str(tmp_path / "unused"), iterations=None):
        apply_override(base, assignment)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"output": str(tmp_path / "bench"), "datasets": {"tiny": str(tmp_path / "base.yaml")},
            "methods": ["edc", "random", "rded"], "ipc": [2], "students": ["convnet_d2"],
            "seeds": {"default": [0]}, "per_method": {"edc": ["synthesis.iterations=5"]},
            "published": {"tiny": {2: 50.0}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    return str(tmp_path / "grid.yaml")


def test_grid_in_parts_reuses_observers_and_evaluates_exports(ray_local, tiny_imagefolder, tmp_path):
    grid = tiny_grid(tmp_path, tiny_imagefolder)
    benchmark = job("benchmark")
    assert benchmark.main(["--grid", grid, "--methods", "random", "rded"]) == 0
    assert benchmark.main(["--grid", grid, "--methods", "edc"]) == 0
    bench = tmp_path / "bench"
    # observers trained by the first cell only (Ray Train's observer run folder), then reused
    trained = [c for c in ("random-ipc2", "rded-ipc2", "edc-ipc2")
               if list((bench / "tiny" / c / "eval").glob("observers-*"))]
    assert trained == ["random-ipc2"]
    # candidates made once (by the first cell, which needed no statistic sums), then reused as they are
    candidates = {c: [(bench / "tiny" / c / "candidates" / f"class-{k:05d}.tar").read_bytes() for k in range(3)]
                  for c in ("random-ipc2", "rded-ipc2", "edc-ipc2")}
    assert candidates["random-ipc2"] == candidates["rded-ipc2"] == candidates["edc-ipc2"]
    assert not (bench / "tiny" / "random-ipc2" / "stats" / "_complete.json").exists()
    assert (bench / "tiny" / "edc-ipc2" / "stats" / "_complete.json").exists()

    assert benchmark.main(["--grid", grid, "--table-only"]) == 0
    results = json.loads((bench / "grid.json").read_text())
    assert sorted(c["method"] for c in results["cells"]) == ["edc", "random", "rded"]
    for cell in results["cells"]:
        top1 = cell["students"]["convnet_d2"]["final_top1"]
        assert 0.0 <= top1 <= 100.0 and cell["cell_seconds"] > 0
    row = next(r for r in (bench / "grid.md").read_text().splitlines() if r.startswith("| tiny | 2 |"))
    assert row.count("(1)") == 3 and "| 50.0 |" in row
    page = (bench / "grid.html").read_text()  # the same table, and every cell's images
    cells_shown = [c.strip() for c in row.strip().strip("|").split("|")]
    assert all(f"<td>{c}</td>" in page for c in cells_shown if "**" not in c)
    assert page.count('<img alt="tiny / ') == 3 and page.count("data:image/png;base64,") == 3

    # the export: an ImageFolder of the 6 distilled PNGs plus the teacher spec, evaluated by evaluate.py
    edc_run = bench / "tiny" / "edc-ipc2"
    export = edc_run / "export"
    assert sorted(os.listdir(export / "images")) == ["0-class0", "1-class1", "2-class2"]
    assert sum(len(os.listdir(export / "images" / d)) for d in os.listdir(export / "images")) == 6
    spec = json.loads((export / "teachers.json").read_text())
    assert [t["arch"] for t in spec["teachers"]] == ["convnet_d2"] and fsio.exists(spec["teachers"][0]["weights"])
    assert spec["evaluation"]["loss"] == "mse_ce"
    evaluate = job("evaluate")
    assert evaluate.main(["--images", str(export / "images"), "--config", str(edc_run / "config.yaml"),
                          "--label", "roundtrip"]) == 0
    imported = json.loads((edc_run / "imported" / "roundtrip.json").read_text())
    assert imported["images"] == 6 and 0.0 <= imported["evaluation"][0]["final_top1"] <= 100.0
    assert len(list(iter_samples([str(edc_run / "imported" / "roundtrip.tar")]))) == 6
    assert evaluate.main(["--images", str(tmp_path / "missing"), "--config",
                          str(edc_run / "config.yaml")]) == 2

    # the Ray-free probe reads the grid's shared observers and statistics, overrides on top
    probes = str(tmp_path / "probes.jsonl")
    lines = [probe.main(["--grid", grid, "--dataset", "tiny", "--ipc", "2", "--method", method, "--student",
                         "convnet_d2", "--set", "synthesis.flip=false", "--out", probes])
             for method in ("edc", "random")]
    assert [json.loads(line)["method"] for line in open(probes)] == ["edc", "random"]
    assert all(0.0 <= line["mean"] <= 100.0 and line["set"] == ["synthesis.flip=false"] for line in lines)
