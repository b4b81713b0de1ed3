"""The typed config: YAML loading, CLI overrides, and clear errors for each class of bad input."""
import copy
import glob
import importlib.util
import os

import pytest
import yaml

from benchmarks import probe
from edc_ray.pipeline.grid import cell_config, cells, check_not_stale, load_grid
from edc_ray.cli import DEMO_CONFIG
from edc_ray.config import Config, ConfigError, dump_config, load_config, to_dict
from edc_ray.pipeline.resume import check_run_folder
from edc_ray.pipeline.run import absolute_paths, prepare_data
from edc_ray.storage.prepare import prepare_dataset
from edc_ray.storage.run_folder import RunFolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_YAML = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
GRIDS = [p for p in ALL_YAML if "datasets" in (yaml.safe_load(open(p)) or {})]  # benchmark grids
CONFIGS = [p for p in ALL_YAML if p not in GRIDS] + [DEMO_CONFIG]


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg == Config()
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.synthesis.ipc >= 1


@pytest.mark.parametrize("path", GRIDS, ids=[os.path.relpath(p, REPO) for p in GRIDS])
def test_every_shipped_grid_gives_valid_cell_configs(path, monkeypatch):
    monkeypatch.chdir(REPO)  # grids name their base configs relative to the repository root
    grid = load_grid(path)
    assert all(cell_config(grid, cell).synthesis.ipc == cell.ipc for cell in cells(grid))


def test_a_grid_refuses_per_method_overrides_for_a_method_it_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = yaml.safe_load(open("configs/benchmark/digits.yaml"))
    grid["per_method"]["edcc"] = ["synthesis.iterations=5"]
    path = write(tmp_path, grid)
    with pytest.raises(ConfigError, match=r"per_method: 'edcc' is not one of the grid's methods \(edc, random"):
        load_grid(path)


def test_a_cell_folder_of_another_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = load_grid("configs/benchmark/small.yaml")
    grid.output = str(tmp_path)
    cell = next(c for c in cells(grid) if c.method == "edc")
    cfg = cell_config(grid, cell)
    check_not_stale(cfg, cell)  # no folder yet
    os.makedirs(cfg.output.run_dir)
    resolved = copy.deepcopy(cfg)
    absolute_paths(resolved)  # the pipeline writes config.yaml with absolute local paths
    data = to_dict(resolved)
    del data["synthesis"]["jitter"]  # a run from before a key existed, at its default: not a change
    with open(os.path.join(cfg.output.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(data, f)
    check_not_stale(cfg, cell)
    changed = cell_config(grid, cell)
    changed.init.pool_fraction = 0.25
    changed.evaluation.epochs = 7
    with pytest.raises(ConfigError, match=r"changed: evaluation.epochs, init.pool_fraction.*move that folder"):
        check_not_stale(changed, cell)


@pytest.mark.parametrize("method, refused",
                         [("random", False), ("rded", False), ("edc", True), ("sre2l", True)])
def test_synthesis_settings_count_only_for_cells_that_optimise(tmp_path, monkeypatch, method, refused):
    monkeypatch.chdir(REPO)
    grid = load_grid("configs/benchmark/small.yaml")
    grid.output = str(tmp_path)
    cell = next(c for c in cells(grid) if c.method == method)
    cfg = cell_config(grid, cell)
    os.makedirs(cfg.output.run_dir)
    resolved = copy.deepcopy(cfg)
    absolute_paths(resolved)
    resolved.synthesis.flip = not cfg.synthesis.flip
    resolved.synthesis.lr = 0.5
    with open(os.path.join(cfg.output.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(resolved), f)
    if refused:
        with pytest.raises(ConfigError, match=r"changed: synthesis.flip, synthesis.lr\)"):
            check_not_stale(cfg, cell)
    else:
        check_not_stale(cfg, cell)
        cfg.synthesis.ipc += 1  # what a non-optimising cell does depend on still counts
        with pytest.raises(ConfigError, match=r"changed: .*synthesis.ipc"):
            check_not_stale(cfg, cell)


def _run_folder_with(tmp_path, cfg, markers: list[str]) -> RunFolder:
    run = RunFolder(str(tmp_path / "run"))
    run.write_text(dump_config(cfg), "config.yaml")
    for marker in markers:
        run.write_text("", *marker.split("/"))
    return run


@pytest.mark.parametrize("markers, override, refused_stage", [
    ([], "observers.epochs=9", None),  # nothing computed yet: any change is the new run
    (["observers/0-convnet_d2.json"], "synthesis.lr=0.5", None),  # later stages are still to come
    (["observers/0-convnet_d2.json"], "observers.epochs=9", "observers"),
    (["candidates/_complete.json"], "init.candidates_per_class=7", "statistics"),
    (["distilled/unit-00000.tar"], "synthesis.lr=0.5", "synthesis"),
    (["eval/distilled-convnet_d2.json"], "evaluation.epochs=9", "evaluation"),
    (["eval/distilled-convnet_d2.json"], "evaluation.students=[convnet, convnet_d2]", None),
    (["eval/distilled-convnet_d2.json"], "ray.num_cpus=7", None),  # resources never matter
])
def test_a_run_folder_refuses_a_config_its_finished_stages_did_not_use(tmp_path, markers, override,
                                                                        refused_stage):
    base = ["observers.models=[{arch: convnet_d2}]", f"output.run_dir={tmp_path / 'run'}"]
    run = _run_folder_with(tmp_path, load_config(None, base), markers)
    changed = load_config(None, base + [override])
    if refused_stage is None:
        check_run_folder(run, changed)
    else:
        key = override.split("=")[0]
        expected = rf"its finished {refused_stage} stage was computed .*changed: {key}\).*new output"
        with pytest.raises(ConfigError, match=expected):
            check_run_folder(run, changed)


def test_condense_job_names_the_changed_keys_of_a_finished_run_folder(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("condense_job", os.path.join(REPO, "jobs", "condense.py"))
    condense = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(condense)
    args = ["--set", f"data.root={tmp_path / 'digits'}", "--set", f"output.run_dir={tmp_path / 'run'}"]
    cfg = load_config(DEMO_CONFIG, [a for a in args if a != "--set"])
    absolute_paths(cfg)
    _run_folder_with(tmp_path, cfg, ["observers/0-convnet_d2.json"])
    assert condense.main(args + ["--set", "observers.epochs=3"]) == 2
    assert "its finished observers stage was computed under another config (changed: observers.epochs)" in \
        capsys.readouterr().err


def test_a_run_that_does_not_optimise_ignores_synthesis_settings(tmp_path):
    cfg = load_config(None, ["method=random", f"output.run_dir={tmp_path / 'run'}"])
    run = _run_folder_with(tmp_path, cfg, ["distilled/unit-00000.tar"])
    check_run_folder(run, load_config(None, ["method=random", "synthesis.flip=false",
                                             f"output.run_dir={tmp_path / 'run'}"]))


def test_probe_names_bad_arguments_and_a_missing_shared_folder(tmp_path):
    base = os.path.join(REPO, "configs", "benchmark", "mnist-base.yaml")
    path = write(tmp_path, {"output": str(tmp_path / "bench"), "datasets": {"mnist": base}})
    with pytest.raises(SystemExit, match=r"--dataset 'cifar' is not in .*choose one of mnist"):
        probe.main(["--grid", path, "--dataset", "cifar", "--ipc", "1"])
    with pytest.raises(SystemExit, match=r"no shared observers and statistics for mnist .*--ipc 10"):
        probe.main(["--grid", path, "--dataset", "mnist", "--ipc", "10"])
    with pytest.raises(SystemExit, match=r"config error: synthesis.ipc: 0 is not allowed; ipc must be >= 1"):
        probe.main(["--grid", path, "--dataset", "mnist", "--ipc", "0"])
    with pytest.raises(SystemExit, match=r"config error: method: 'foo' is not allowed; choose one of edc"):
        probe.main(["--grid", path, "--dataset", "mnist", "--ipc", "1", "--method", "foo"])


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = write(tmp_path, {"synthesis": {"iterations": 10, "ipc": 3}})
    cfg = load_config(path, ["synthesis.iterations=200", "evaluation.students=[convnet, resnet18_cifar]",
                             "observers.models=[{arch: convnet_w64, weights: w.pt}]"])
    assert cfg.synthesis.iterations == 200 and cfg.synthesis.ipc == 3
    assert cfg.evaluation.students == ["convnet", "resnet18_cifar"]
    assert cfg.observers.models[0].arch == "convnet_w64" and cfg.observers.models[0].weights == "w.pt"
    assert load_config(None, ["synthesis.betas=[0.4, 0.8]"]).synthesis.betas == (0.4, 0.8)


def test_a_config_file_layers_over_its_base_file(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text("synthesis: {ipc: 3, iterations: 10}\nseed: 4\n")
    (tmp_path / "shared" / "edc.yaml").write_text("base: base.yaml\nsynthesis: {iterations: 20}\n")
    (tmp_path / "ipc5.yaml").write_text("base: shared/edc.yaml\nsynthesis: {ipc: 5}\n")
    cfg = load_config(str(tmp_path / "ipc5.yaml"), ["seed=6"])  # paths relative to the including file
    assert (cfg.synthesis.ipc, cfg.synthesis.iterations, cfg.seed) == (5, 20, 6)
    (tmp_path / "shared" / "base.yaml").write_text("base: ../ipc5.yaml\n")
    with pytest.raises(ConfigError, match=r"`base:` files include each other \(.*ipc5.yaml -> .*edc.yaml -> "
                                          r".*base.yaml -> .*ipc5.yaml\)"):
        load_config(str(tmp_path / "ipc5.yaml"))
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml' \(the base of .*lost.yaml'\) does not exist"):
        load_config(str(tmp_path / "lost.yaml"))


def test_dataset_configs_do_not_fix_a_method(monkeypatch):
    monkeypatch.chdir(REPO)
    for base in glob.glob("configs/*/base.yaml"):
        for method in ("edc", "sre2l", "gvbsm", "rded", "random"):
            assert load_config(base, [f"method={method}"]).method == method


def test_unknown_key_names_key_path_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"synthesis": {"iterationz": 5}}))
    message = str(err.value)
    assert "'iterationz'" in message and "synthesis.iterationz" in message and "iterations" in message
    with pytest.raises(ConfigError, match=r"unknown key 'arhc' at 'observers.models\[0\].arhc'"):
        load_config(None, ["observers.models=[{arhc: convnet}]"])
    with pytest.raises(ConfigError, match="unknown key 'sinthesis'"):
        load_config(None, ["sinthesis.ipc=1"])


@pytest.mark.parametrize("override, fragments", [
    ("synthesis.ipc=ten", ["synthesis.ipc", "'ten'", "integer"]),
    ("synthesis.ipc=0", ["synthesis.ipc", "0", "ipc must be >= 1"]),
    ("synthesis.alpha=1.5", ["synthesis.alpha", "1.5", "alpha must be in [0, 1]"]),
    ("synthesis.lr=true", ["synthesis.lr", "True", "number"]),
    ("init.mode=gaussian", ["init.mode", "'gaussian'", "'real', 'mosaic', 'noise'"]),
    ("evaluation.schedule=cosine", ["evaluation.schedule", "'smooth', 'multistep', 'ssrs'"]),
    ("evaluation.students=[resnet99]", ["evaluation.students[0]", "'resnet99'", "convnet_w128",
                                       "timm:<name>"]),
    ("observers.models=[{arch: vgg}]", ["observers.models[0].arch", "'vgg'", "known architectures"]),
    ("evaluation.teachers=[3]", ["evaluation.teachers[0]", "3", "0..0"]),
    ("evaluation.zeta=0.5", ["evaluation.zeta", "0.5", ">= 1"]),
    ("synthesis.betas=[0.5]", ["synthesis.betas", "expected 2 values"]),
    ("init.pool_fraction=1.5", ["init.pool_fraction", "1.5", "must be in [0, 1]"]),
    ("synthesis.jitter=-2", ["synthesis.jitter", "-2", "must be >= 0"]),
])
def test_bad_values_name_the_value_and_what_is_allowed(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["synthesis.iterations"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_missing_dataset_names_the_path(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="missing"):
        prepare_data(cfg)
    cfg = load_config(None, [f"data.root={tmp_path / 'd'}", "data.source=idx", f"data.src={tmp_path / 'nosrc'}"])
    with pytest.raises((FileNotFoundError, ValueError), match="nosrc"):
        prepare_data(cfg)


def test_image_size_must_match_the_dataset(tmp_path):
    root = str(tmp_path / "digits")
    prepare_dataset("digits", None, root)
    assert prepare_data(load_config(None, [f"data.root={root}", "data.image_size=8"])).image_size == 8
    with pytest.raises(ConfigError, match=r"data.image_size: 28 does not match .* 8x8"):
        prepare_data(load_config(None, [f"data.root={root}", "data.image_size=28"]))
    with pytest.raises(ConfigError,
                       match=r"data.val_split: dataset 'digits' has no split 'val'; it has \['test', 'train'\]"):
        prepare_data(load_config(None, [f"data.root={root}", "data.val_split=val"]))
