"""Method presets, evaluation protocols, the per-method synthesis paths, exports and the grid's pieces."""
import pytest
import torch
import yaml

from edc_ray.algo.condense import accumulate_statistics, build_observers, condense
from edc_ray.algo.stats import StatisticHooks
from edc_ray.pipeline.grid import (Cell, Grid, cell_config, cells, load_grid, markdown_tables, share,
                                   shared_folders)
from edc_ray.config import METHODS, ConfigError, StatisticsConfig, load_config
from edc_ray.storage import fsio
from edc_ray.storage.export import export_imagefolder, imagefolder_shard
from edc_ray.storage.images import encode_png
from edc_ray.storage.shards import iter_samples, write_shard
from tiny import MEAN, STD, make_tiny, tiny_observers


def test_every_method_and_protocol_loads_with_its_preset():
    for method in METHODS:
        cfg = load_config(None, [f"method={method}"])
        assert cfg.method == method
    edc, sre2l, gvbsm = (load_config(None, [f"method={m}"]) for m in ("edc", "sre2l", "gvbsm"))
    assert (edc.init.mode, edc.synthesis.alpha, edc.synthesis.flatness_weight) == ("real", 0.5, 0.25)
    assert (edc.init.pool_fraction, edc.synthesis.jitter) == (1.0, 0)
    assert (sre2l.init.mode, sre2l.synthesis.lr, sre2l.synthesis.min_scale) == ("noise", 0.25, 0.08)
    assert sre2l.synthesis.jitter == 4
    assert (sre2l.synthesis.match, sre2l.synthesis.observers, sre2l.synthesis.alpha) == (["bn"], [0], 1.0)
    assert (gvbsm.synthesis.match, gvbsm.synthesis.observers) == (["bn", "conv", "patch"], None)
    assert (gvbsm.synthesis.alpha, gvbsm.synthesis.flatness_weight, gvbsm.init.mode) == (1.0, 0.0, "noise")
    kl = load_config(None, ["evaluation.protocol=sre2l"]).evaluation
    assert (kl.loss, kl.temperature, kl.zeta, kl.ema_decay, kl.batch_size) == ("kl", 20.0, 1.0, 0.0, 100)
    rded = load_config(None, ["evaluation.protocol=rded"]).evaluation
    assert (rded.loss, rded.zeta, rded.ema_decay) == ("kl", 2.0, 0.0)


def test_explicit_values_beat_preset_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "sre2l", "synthesis": {"lr": 0.1, "iterations": 7, "alpha": 1.0},
                                    "evaluation": {"protocol": "sre2l", "batch_size": 8}}))
    cfg = load_config(str(path))
    assert cfg.synthesis.lr == 0.1 and cfg.synthesis.iterations == 7  # defaults and budget: yours
    assert cfg.synthesis.alpha == 1.0  # a fixed key may be given at its fixed value
    assert cfg.evaluation.batch_size == 8 and cfg.evaluation.loss == "kl"
    rded = load_config(None, ["method=rded"])
    assert rded.synthesis.iterations == 0 and rded.init.mode == "mosaic"
    assert rded.init.score_observers == [0]  # RDED scores with its one observer


@pytest.mark.parametrize("method, assignment, fixed", [
    ("sre2l", "synthesis.alpha=0.5", "1.0"), ("rded", "synthesis.iterations=100", "0"),
    ("random", "init.mode=real", "'random'"), ("gvbsm", "synthesis.match=[bn]", r"\['bn', 'conv', 'patch'\]"),
    ("rded", "init.score_observers=[0, 1]", r"\[0\]")])
def test_a_key_the_method_fixes_to_another_value_is_refused(tmp_path, method, assignment, fixed):
    key, value = assignment.split("=")
    expected = rf"{key}: .* conflicts with method '{method}', which fixes it to {fixed}; leave the key out"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"method={method}", "observers.models=[{arch: convnet}, {arch: convnet_bn}]", assignment])
    path = tmp_path / "c.yaml"  # from a file as from an override
    path.write_text(f"method: {method}\nobservers: {{models: [{{arch: convnet}}, {{arch: convnet_bn}}]}}\n"
                    f"{key.split('.')[0]}: {{{key.split('.')[1]}: {value}}}\n")
    with pytest.raises(ConfigError, match=expected):
        load_config(str(path))


def test_bad_method_protocol_and_matching_are_named():
    with pytest.raises(ConfigError, match="method: 'dc' is not allowed; choose one of edc, gvbsm"):
        load_config(None, ["method=dc"])
    with pytest.raises(ConfigError, match="evaluation.protocol: 'dsa'"):
        load_config(None, ["evaluation.protocol=dsa"])
    with pytest.raises(ConfigError, match="'patch' statistics are not accumulated"):
        load_config(None, ["statistics.patch=false"])
    with pytest.raises(ConfigError, match=r"synthesis.observers\[0\]: 3"):
        load_config(None, ["synthesis.observers=[3]"])
    with pytest.raises(ConfigError, match=r"init.score_observers\[1\]: 5 is not allowed; must index"):
        load_config(None, ["init.score_observers=[0, 5]"])
    with pytest.raises(ConfigError, match=r"init.score_observers: \[\] is not allowed"):
        load_config(None, ["init.score_observers=[]"])


@pytest.fixture(scope="module")
def tiny():
    images, labels = make_tiny()
    return images, labels, tiny_observers(images, labels)  # instance-norm and BatchNorm observers


def _sums(images, labels, models, stats):
    batches = [(images[s:s + 16], labels[s:s + 16]) for s in range(0, len(images), 16)]
    return [accumulate_statistics(m, batches, 3, stats, MEAN, STD) for m in models]


def test_matching_restricted_to_chosen_statistics(tiny):
    images, labels, models = tiny
    stats = StatisticsConfig(patch_size=4, batch_size=16)
    sums = _sums(images, labels, models, stats)
    totals = [s.totals() for s in sums]
    full = build_observers(models, totals, sums, range(3), stats)
    bn_only = build_observers(models, totals, sums, range(3), stats, match=["bn"], select=[1])
    no_patch = build_observers(models, totals, sums, range(3), stats, match=["bn", "conv"])
    assert len(bn_only) == 1 and bn_only[0].model is models[1]
    assert {layer.kind for layer in bn_only[0].layers} == {"bn"}
    assert len(bn_only[0].layers) == sum(layer.kind == "bn" for layer in full[1].layers) > 0
    assert all(layer.patch is None for o in no_patch for layer in o.layers)
    assert all(set(t.global_) == {"mean", "var"} and set(t.per_class) == {"mean", "var"}
               for o in no_patch for t in o.targets)
    assert len(no_patch[0].layers) == len(full[0].layers)
    hooks = StatisticHooks(no_patch[0].layers)  # the hooks record exactly the kept statistics
    with hooks.capture() as records:
        models[0](torch.zeros(2, 1, 12, 12))
    hooks.remove()
    assert [len(r) for r in records] == [sum(v.numel() for v in t.global_.values()) for t in no_patch[0].targets]


@pytest.mark.parametrize("method", ["edc", "sre2l", "gvbsm", "rded"])
def test_every_synthesising_method_condenses(tiny, method):
    images, labels, models = tiny
    cfg = load_config(None, [f"method={method}", "statistics.patch_size=4", "statistics.batch_size=16",
                             "init.candidates_per_class=10", "synthesis.ipc=2",
                             "synthesis.classes_per_unit=3", "seed=1"]
                      + ([] if method == "rded" else ["synthesis.iterations=3"]))
    out, out_labels = condense(models, images, labels, 3, MEAN, STD, cfg)
    assert out.dtype == torch.uint8 and out.shape == (6, 1, 12, 12)
    assert out_labels.tolist() == [0, 0, 1, 1, 2, 2]
    real = {tuple(x.flatten().tolist()) for x in images}
    if method == "rded":  # mosaics of 2x2 crops: never a training image, and no optimisation
        assert all(tuple(x.flatten().tolist()) not in real for x in out)
        again, _ = condense(models, images, labels, 3, MEAN, STD, cfg)
        assert torch.equal(out, again)
    if method in ("sre2l", "gvbsm"):  # noise init: far from any real image of the tiny set
        assert all(tuple(x.flatten().tolist()) not in real for x in out)


def test_imagefolder_export_round_trip(tmp_path):
    images, labels = make_tiny(per_class=3)
    shard = str(tmp_path / "set.tar")
    write_shard(shard, [{"__key__": f"k{i}", "png": encode_png(x.permute(1, 2, 0).numpy()), "cls": int(y)}
                        for i, (x, y) in enumerate(zip(images, labels))])
    folder = str(tmp_path / "export")
    assert export_imagefolder([shard], ["zero", "one/1", "two"], folder) == 9
    assert fsio.list_dirs(folder) == ["0-zero", "1-one_1", "2-two"]
    back = str(tmp_path / "back.tar")
    assert imagefolder_shard(folder, back, channels=1, image_size=12, classes=["zero", "one/1", "two"]) == 9
    samples = list(iter_samples([back]))
    assert sorted((tuple(x.flatten().tolist()), y) for _, x, y in samples) == \
        sorted((tuple(x.flatten().tolist()), int(y)) for x, y in zip(images, labels))
    with pytest.raises(ValueError, match=r"has no images of 1 of the dataset's 4 classes: \['three'\]"):
        imagefolder_shard(folder, back, channels=1, image_size=12, classes=["zero", "one/1", "two", "three"])
    with pytest.raises(ValueError, match=r"0-zero/k0.png: image is 12x12, the dataset's are 16x16"):
        imagefolder_shard(folder, back, channels=1, image_size=16, classes=["zero", "one/1", "two"])


def _grid(tmp_path, **kw) -> Grid:
    base = tmp_path / "base.yaml"
    base.write_text("observers: {models: [{arch: convnet_d2}, {arch: convnet_bn}]}\n")
    data = {"output": str(tmp_path / "out"), "datasets": {"toy": str(base)}, "ipc": [1, 10],
            "seeds": {"edc": [0, 1, 2], "default": [5]}, "per_ipc": {10: ["evaluation.epochs=7"]},
            "published": {"toy": {1: 50.0}}, **kw}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_grid(str(path))


def test_grid_cells_and_their_configs(tmp_path):
    grid = _grid(tmp_path)
    assert len(cells(grid)) == 10
    assert cells(grid, methods=["rded"], ipcs=[10]) == [Cell("toy", "rded", 10)]
    edc10 = cell_config(grid, Cell("toy", "edc", 10))
    assert (edc10.evaluation.seeds, edc10.evaluation.epochs, edc10.synthesis.ipc) == ([0, 1, 2], 7, 10)
    assert edc10.output.run_dir.endswith("out/toy/edc-ipc10") and not edc10.evaluation.random_baseline
    assert cell_config(grid, Cell("toy", "sre2l", 1)).evaluation.seeds == [5]
    with pytest.raises(ConfigError, match="unknown key 'ipcs'"):
        _grid(tmp_path, ipcs=[1])


def _row(method, top1, std=0.0, seeds=1):
    return {"dataset": "toy", "ipc": 1, "variant": "", "method": method, "cell_seconds": 3.0,
            "observers": {"0-convnet_d2": 97.5},
            "stage_seconds": {"synthesis": 1.0},
            "students": {"convnet": {"final_top1": top1, "final_top1_std": std, "best_top1": top1,
                                     "epochs": 1, "per_seed": [{}] * seeds}}}


def test_results_table_marks_edc_against_ours_and_published(tmp_path):
    grid = _grid(tmp_path)
    table = markdown_tables(grid, [_row("edc", 61.0, 0.5, 3), _row("random", 55.0), _row("rded", 60.0)])
    line = next(r for r in table.splitlines() if r.startswith("| toy | 1 |"))
    assert "61.00 ± 0.50 (3)" in line and "55.00 (1)" in line and "| yes | +11.00 |" in line
    assert "toy: 0-convnet_d2 97.50" in table
    table = markdown_tables(grid, [_row("edc", 45.0), _row("random", 55.0)])
    assert "| **no** | -5.00 |" in table


def test_shared_observers_and_statistics_only_when_complete(tmp_path):
    folders = {"observers": str(tmp_path / "s" / "obs"), "statistics": str(tmp_path / "s" / "stats"),
               "candidates": str(tmp_path / "s" / "stats")}
    run = tmp_path / "cell"
    (run / "observers").mkdir(parents=True)
    (run / "observers" / "0-a.json").write_text("{}")
    (run / "observers" / "0-a.pt").write_bytes(b"w")
    (run / "stats").mkdir()
    (run / "stats" / "global.pt").write_bytes(b"s")  # no stats/_complete.json yet: statistics incomplete
    share(folders, str(run), 2, "out")  # 1 of 2 observers: incomplete, nothing shared
    assert fsio.list_files(folders["observers"] + "/observers") == []
    (run / "observers" / "1-b.json").write_text("{}")
    share(folders, str(run), 2, "out")
    assert len(fsio.list_files(folders["observers"] + "/observers")) == 3
    assert fsio.list_files(folders["statistics"] + "/stats") == []
    other = tmp_path / "other"
    share(folders, str(other), 2, "in")
    assert sorted(p.name for p in (other / "observers").iterdir()) == ["0-a.json", "0-a.pt", "1-b.json"]
    assert not (other / "stats").exists()


def test_cells_share_candidates_only_when_the_same_observers_score_them(tmp_path):
    from types import SimpleNamespace

    grid = SimpleNamespace(output=str(tmp_path))
    two = "observers.models=[{arch: convnet_d2}, {arch: convnet_bn}]"
    edc, rded = (load_config(None, [two, f"method={m}"]) for m in ("edc", "rded"))
    assert shared_folders(grid, edc, "d")["candidates"] != shared_folders(grid, rded, "d")["candidates"]
    everyone = load_config(None, [two, "init.score_observers=[1, 0]"])  # every observer: the default
    assert shared_folders(grid, everyone, "d") == shared_folders(grid, edc, "d")
    edc, rded = (load_config(None, [f"method={m}"]) for m in ("edc", "rded"))  # one observer: scored alike
    assert shared_folders(grid, edc, "d") == shared_folders(grid, rded, "d")
