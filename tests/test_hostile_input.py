"""Careless and hostile input: each case gives the right result or a clear error, never a traceback,
a hang, a silently wrong number or code run from data (issue 16)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from edc_ray.config import Config, ConfigError, check_local_resources, load_config, run_dir_problem, valid_address
from edc_ray.errors import DataError
from edc_ray.pipeline import evaluation
from edc_ray.pipeline.common import DatasetMeta, ObserverSet
from edc_ray.pipeline.evaluation import EvalSet, evaluation_key, fit_seed
from edc_ray.storage import fsio
from edc_ray.storage.export import read_imagefolder
from edc_ray.storage.lease import RunFolderBusy, RunLease
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.dataset_info import DatasetInfo, ShardList, SplitInfo, write_info
from edc_ray.storage.images import encode_png
from edc_ray.storage.shards import ShardReadError, iter_split, write_shard
from edc_ray.storage.sources import open_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job(name: str) -> types.ModuleType:
    """The job script `jobs/<name>.py` as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", os.path.join(REPO, "jobs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- config files and overrides ------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("method: edc\nmethod: sre2l\n", r"line 2, column 1: duplicate key 'method'"),
    ("synthesis:\n  ipc: 1\n  ipc: 2\n", r"duplicate key 'ipc'"),
    ("method: [edc\n", r"not valid YAML at line 2"),
    ("x: !!python/object/apply:os.system ['true']\n", r"could not determine a constructor"),
    ("", r"is empty; give at least one key"),
    ("# only a comment\n", r"is empty"),
    ("- a\n- b\n", r"must hold a mapping of keys at the top level, not a list"),
])
def test_bad_config_files_are_named_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(str(path))
    assert "bad.yaml" in str(err.value)


def test_a_config_error_never_echoes_the_file(tmp_path):
    secret = "password=hunter2 [unclosed"
    path = tmp_path / "secrets.txt"
    path.write_text(f"{secret}\n  : :\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "hunter2" not in str(err.value)


def test_unreadable_config_paths(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    binary = tmp_path / "image.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x89PNG")
    with pytest.raises(ConfigError, match="image.yaml"):
        load_config(str(binary))


def test_a_bad_override_value_is_a_named_error():
    with pytest.raises(ConfigError, match=r"override 'synthesis.ipc': not valid YAML"):
        load_config(None, ["synthesis.ipc=[1"])


NONSENSE = ["seed=-1", "data.shard_size=0", "data.image_size=0", "observers.lr=-1", "observers.lr=0",
            "observers.momentum=5", "observers.weight_decay=-1", "observers.crop_padding=-1",
            "evaluation.lr=-1", "evaluation.weight_decay=-1", "evaluation.ce_weight=-1", "evaluation.gamma=0",
            "evaluation.val_batch_size=0", "evaluation.eval_every=-1", "evaluation.milestones=[5, 3]",
            "evaluation.milestones=[0]", "evaluation.seeds=[-1]", "statistics.batch_size=0", "ray.stats_tasks=0",
            "ray.num_cpus=-2", "ray.num_cpus=0", "ray.train_worker_cpus=-1", "ray.address=nonsense",
            "ray.address=host:99999", "ray.address=ray://:10001", "output.run_dir=/", "output.run_dir=''",
            "output.run_dir=s3://bucket", "output.run_dir=.", "data.root=''"]


@pytest.mark.parametrize("assignment", NONSENSE)
def test_nonsense_values_are_refused_naming_the_key(assignment):
    key = assignment.split("=", 1)[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [assignment])


@pytest.mark.parametrize("address, ok", [("local", True), ("auto", True), ("10.0.0.1:6379", True),
                                         ("ray://head:10001", True), ("head", False), ("http://x:1/", False)])
def test_ray_addresses(address, ok):
    assert valid_address(address) is ok


def test_run_dir_cannot_be_the_dataset(tmp_path):
    assert "dataset" in run_dir_problem(str(tmp_path / "data"), str(tmp_path / "data"))
    assert run_dir_problem(str(tmp_path / "runs" / "a"), str(tmp_path / "data")) is None
    assert run_dir_problem("s3://bucket/runs/a", "s3://bucket/data") is None


@pytest.mark.parametrize("assignment", ["ray.actor_cpus=3", "ray.stats_cpus=2.5", "ray.actor_gpus=1",
                                        "ray.stats_gpus=0.5", "ray.train_workers=3", "ray.train_use_gpu=true"])
def test_requests_a_local_instance_cannot_place_are_refused(assignment):
    cfg = load_config(None, [assignment])
    with pytest.raises(ConfigError, match=r"the local Ray instance has 2 CPUs .* and 0 GPUs"):
        check_local_resources(cfg, cpus=2, gpus=0)


def test_requests_that_fit_a_local_instance_pass():
    check_local_resources(load_config(None, ["ray.actor_cpus=2", "ray.train_workers=2",
                                             "ray.train_worker_cpus=1"]), cpus=2, gpus=0)


def test_the_job_exits_2_with_one_line_and_no_traceback(tmp_path, capsys):
    assert job("condense").main(["--set", "ray.actor_cpus=64", "--set", f"output.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ray.actor_cpus: 64.0") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- CIFAR pickles ---------------------------------------------------------------------------------

class Exploit:
    """A pickle whose loading would create a file: the marker of code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("poisoned", ["batches.meta", "data_batch_1"])
def test_a_malicious_cifar_folder_does_not_execute(tmp_path, poisoned):
    folder, marker = tmp_path / "cifar-10-batches-py", tmp_path / "pwned"
    folder.mkdir()
    rows = np.zeros((2, 3072), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": rows, b"labels": [0, 1]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    (folder / poisoned).write_bytes(pickle.dumps({b"data": rows, b"labels": [0, 1], b"label_names": [b"a"],
                                                  b"x": Exploit(str(marker))}))
    with pytest.raises(DataError, match=rf"{poisoned}: not a CIFAR python pickle, refused .*open"):
        open_source("cifar10", str(tmp_path))
    assert not marker.exists()


def test_the_prepare_job_reports_a_malicious_cifar_folder_in_one_line(tmp_path, capsys):
    folder, marker = tmp_path / "cifar-10-batches-py", tmp_path / "pwned"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [Exploit(str(marker))]}))
    assert job("prepare").main(["--source", "cifar10", "--src", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "batches.meta: not a CIFAR python pickle, refused" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_cifar_pickle_with_an_object_array_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": np.array([b"a", None], dtype=object)}))
    with pytest.raises(DataError, match=r"batches.meta: .*dtype"):
        open_source("cifar10", str(tmp_path))


# --- evaluation artefacts keyed by the evaluation settings -----------------------------------------

META = DatasetMeta(num_classes=2, channels=1, image_size=8, mean=(0.5,), std=(0.25,))


def _fake_trainer(calls: list, top1: float, monkeypatch):
    """A stand-in for Ray Train that records the runs asked for (no dataset is read)."""
    def fit(loop, config, name, storage, *args, **kwargs):
        calls.append(name)
        return types.SimpleNamespace(metrics={"top1": top1, "best_top1": top1, "loss": 0.5, "curve": [[1, top1]]})
    monkeypatch.setattr(evaluation, "split_shards", lambda data, split: ShardList(("val.tar",), (1,), 1))
    return fit


def test_a_run_under_other_evaluation_settings_is_never_reused(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(evaluation, "fit_torch_trainer", _fake_trainer(calls, 50.0, monkeypatch))
    run, target = RunFolder(str(tmp_path / "run")), EvalSet("distilled", ("unused.tar",), 2)
    observers = ObserverSet(("o",), ("convnet_d2",), ())
    first, second = Config(), Config()
    second.evaluation.epochs = first.evaluation.epochs + 1
    assert evaluation_key(first.evaluation) != evaluation_key(second.evaluation)
    assert fit_seed(first, run, META, observers, target, "convnet_d2", 0)["final_top1"] == 50.0
    fit_seed(first, run, META, observers, target, "convnet_d2", 0)  # cached: no new run
    fit_seed(second, run, META, observers, target, "convnet_d2", 0)  # other settings: a new run
    assert calls == [f"distilled-convnet_d2-seed0-{evaluation_key(first.evaluation)}",
                     f"distilled-convnet_d2-seed0-{evaluation_key(second.evaluation)}"]
    seeds_only = Config()
    seeds_only.evaluation.seeds, seeds_only.evaluation.students = [0, 5], ["other"]
    assert evaluation_key(seeds_only.evaluation) == evaluation_key(first.evaluation)


def test_a_non_finite_result_is_an_error_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "fit_torch_trainer", _fake_trainer([], math.nan, monkeypatch))
    run = RunFolder(str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="distilled-convnet_d2-seed0 ended with top-1 nan"):
        fit_seed(Config(), run, META, ObserverSet(("o",), ("convnet_d2",), ()),
                 EvalSet("distilled", ("unused.tar",), 2), "convnet_d2", 0)
    assert not run.exists("eval", "distilled-convnet_d2-seed0.json")


# --- shards: what _info.json promises is checked on every path -------------------------------------

def _dataset(tmp_path, samples: list[dict], counts: list[int] | None = None) -> str:
    """A one-split dataset of 8x8 grayscale images, 2 classes, the given samples in one shard."""
    root = str(tmp_path / "data")
    written = write_shard(f"{root}/train/shard-00000.tar", samples)
    write_info(root, DatasetInfo("hostile", ["a", "b"], 8, 1, [0.5], [0.25], {"train": SplitInfo(
        "train", written, ["train/shard-00000.tar"], counts or [written], [written, 0])}))
    return root


def _sample(i: int, image: np.ndarray | None = None, label: int = 0) -> dict:
    return {"__key__": f"s{i:03d}", "png": encode_png(np.zeros((8, 8), np.uint8) if image is None else image),
            "cls": label}


@pytest.mark.parametrize("bad, message", [
    (_sample(1, label=7), r"sample 's001': label 7 is outside 0..1"),
    (_sample(1, np.zeros((9, 8), np.uint8)), r"sample 's001': image is \(1, 9, 8\) \(CxHxW\), the dataset's are"),
    (_sample(1, np.zeros((8, 8, 3), np.uint8)), r"sample 's001': image is \(3, 8, 8\)"),
    ({"__key__": "s001", "png": b"not a png", "cls": 0}, r"sample 's001': UnidentifiedImageError"),
])
def test_a_bad_sample_is_named_with_its_shard(tmp_path, bad, message):
    root = _dataset(tmp_path, [_sample(0), bad])
    with pytest.raises(ShardReadError, match=r"shard-00000.tar: " + message):
        list(iter_split(root, "train"))


def test_a_decompression_bomb_is_named(tmp_path, monkeypatch):
    root = _dataset(tmp_path, [_sample(0), _sample(1)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # an 8x8 image is then 4x the bomb limit
    with pytest.raises(ShardReadError, match=r"sample 's000': DecompressionBombError"):
        list(iter_split(root, "train"))


def test_a_truncated_shard_is_refused_by_the_statistics_reader(tmp_path):
    from edc_ray.pipeline.statistics import TaskSamples
    from edc_ray.storage.dataset_info import read_info
    from edc_ray.storage.shards import SampleSpec

    root = _dataset(tmp_path, [_sample(i) for i in range(5)], counts=[6])  # _info.json promises 6
    urls = list(read_info(root).shard_list(root, "train").urls)
    samples = TaskSamples(urls, {urls[0]: 6}, seed=0, decode=False, spec=SampleSpec(1, 8, 2))
    with pytest.raises(ShardReadError, match="holds 5 samples but 6 were written"):
        list(samples)


# --- ImageFolder import ----------------------------------------------------------------------------

def _imagefolder(root, folders: dict[str, int]) -> str:
    """`root/<folder>/<i>.png`: `count` 8x8 gray images per folder, each image's value its folder's index."""
    for index, (folder, count) in enumerate(folders.items()):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), 10 * index, np.uint8)).save(root / folder / f"{i}.png")
    return str(root)


def test_imagefolder_import_labels_by_class_name_not_by_sorted_order(tmp_path):
    src = _imagefolder(tmp_path / "set", {"cat": 1, "ant": 1, "bee": 1})  # sorted: ant, bee, cat
    samples = read_imagefolder(src, channels=1, image_size=8, classes=["cat", "bee", "ant"])
    assert sorted((int(image[0, 0, 0]), label) for image, label in samples) == [(0, 0), (10, 2), (20, 1)]


def test_imagefolder_import_refuses_folders_that_are_not_classes(tmp_path):
    src = _imagefolder(tmp_path / "set", {"zero": 1, "one": 1})
    with pytest.raises(DataError, match=r"class folders \['one', 'zero'\] are not classes of the dataset"):
        read_imagefolder(src, channels=1, image_size=8, classes=["0", "1"])


def test_imagefolder_import_follows_symlinks_and_refuses_dangling_ones(tmp_path):
    src = _imagefolder(tmp_path / "set", {"a": 1, "b": 1})
    os.symlink(tmp_path / "set" / "a" / "0.png", tmp_path / "set" / "a" / "linked.png")
    assert len(read_imagefolder(src, channels=1, image_size=8, classes=["a", "b"])) == 3
    os.symlink(tmp_path / "gone.png", tmp_path / "set" / "b" / "dangling.png")
    with pytest.raises(FileNotFoundError, match=r"dangling.png is a symbolic link to .*gone.png.*does not exist"):
        read_imagefolder(src, channels=1, image_size=8, classes=["a", "b"])


# --- one driver per run folder ---------------------------------------------------------------------

RACER = """
import sys, time
from edc_ray.storage.lease import RunFolderBusy, RunLease
lease = RunLease(sys.argv[1])
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    lease.acquire()
except RunFolderBusy as err:
    print("refused:", err)
    sys.exit(3)
print("took")
time.sleep(3)
lease.release()
"""


def _race(run_dir: str) -> list[subprocess.CompletedProcess]:
    start = time.time() + 4  # both processes are up and waiting by then
    racers = [subprocess.Popen([sys.executable, "-c", RACER, run_dir, str(start)], stdout=subprocess.PIPE,
                               text=True, env=os.environ.copy()) for _ in range(2)]
    return [(r.wait(timeout=60), r.stdout.read()) for r in racers]


def _check_one_winner(outcomes, run_dir):
    assert sorted(code for code, _ in outcomes) == [0, 3], outcomes
    refused = next(out for code, out in outcomes if code == 3)
    assert re.search(r"(is in use by driver|was taken by driver) \S+:\d+", refused), refused
    assert not fsio.exists(fsio.join(run_dir, "_lease.json"))  # the winner released it


def test_two_drivers_racing_for_one_local_folder_see_one_winner(tmp_path):
    run_dir = str(tmp_path / "run")
    _check_one_winner(_race(run_dir), run_dir)


def test_two_drivers_racing_for_one_s3_folder_see_one_winner(s3_server):
    run_dir = s3_server.url("lease")
    _check_one_winner(_race(run_dir), run_dir)


def _foreign_lease(run_dir, owner: str, renewed: float) -> None:
    fsio.atomic_write_json(fsio.join(run_dir, "_lease.json"),
                           {"owner": owner, "token": "x", "taken": renewed, "renewed": renewed})


def test_a_lease_of_a_dead_local_driver_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _foreign_lease(str(tmp_path), f"{socket.gethostname()}:{int(dead.stdout)}", time.time())
    lease = RunLease(str(tmp_path))
    lease.acquire()
    lease.release()
    assert not (tmp_path / "_lease.json").exists()


def test_a_lease_of_another_machine_is_broken_only_when_asked(tmp_path):
    _foreign_lease(str(tmp_path), "other-host:123", time.time() - 3600)
    with pytest.raises(RunFolderBusy, match=r"in use by driver other-host:123 .*looks stale.*--break-lease"):
        RunLease(str(tmp_path)).acquire()
    lease = RunLease(str(tmp_path))
    lease.acquire(break_lease=True)
    assert json.loads((tmp_path / "_lease.json").read_text())["owner"] == lease.record.owner
    lease.release()


def test_the_condense_job_refuses_a_leased_run_folder_before_writing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _foreign_lease(str(run_dir), f"{socket.gethostname()}:{os.getpid()}", time.time())  # alive: this process
    args = ["--set", f"data.root={tmp_path / 'digits'}", "--set", f"output.run_dir={run_dir}"]
    assert job("condense").main(args) == 2
    assert f"is in use by driver {socket.gethostname()}:{os.getpid()}" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["_lease.json"]


def test_the_token_file_is_made_private(tmp_path):
    from edc_ray.pipeline.run import private_token_file

    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    private_token_file(str(token))
    assert token.stat().st_mode & 0o777 == 0o600


def test_an_unreachable_s3_endpoint_is_one_line(tmp_path, capsys, monkeypatch):
    for name, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                        "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    assert job("condense").main(["--set", "data.root=s3://nobucket/data",
                                 "--set", f"output.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "error: S3 is not reachable with this environment's AWS settings" in err and "Traceback" not in err


def test_s3_forbidden_is_one_line_and_a_new_environment_gets_a_new_client(s3_server, tmp_path, capsys, monkeypatch):
    prefix = s3_server.url("forbidden")
    fsio.atomic_write_bytes(fsio.join(prefix, "probe"), b"x")  # the right credentials work ...
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # ... and, in the same process, wrong ones don't
    with pytest.raises(PermissionError):
        fsio.read_bytes(fsio.join(prefix, "probe"))
    assert job("condense").main(["--set", f"data.root={prefix}/data",
                                 "--set", f"output.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{prefix}/data" in err and "AWS credentials" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert fsio.read_bytes(fsio.join(prefix, "probe")) == b"x"


def test_a_truncated_weights_file_is_named(tmp_path, capsys):
    weights = tmp_path / "observer.pt"
    weights.write_bytes(b"PK\x03\x04 truncated")
    args = ["--set", f"data.root={tmp_path / 'digits'}", "--set", f"output.run_dir={tmp_path / 'run'}",
            "--set", f"observers.models=[{{arch: convnet_d2, weights: {weights}}}]"]
    assert job("condense").main(args) == 2
    err = capsys.readouterr().err
    assert "observer.pt" in err and "Traceback" not in err


def test_a_distilled_set_is_checked_when_a_student_loads_it(tmp_path):
    from edc_ray.pipeline.evaluation import load_images
    from edc_ray.storage.shards import SampleSpec

    url = str(tmp_path / "unit-00000.tar")
    write_shard(url, [_sample(0), _sample(1, label=1)])
    images, labels = load_images([url], SampleSpec(1, 8, 2), expected=2)
    assert images.shape == (2, 1, 8, 8) and labels.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"holds 2 images, 3 were written"):
        load_images([url], SampleSpec(1, 8, 2), expected=3)
    with pytest.raises(ShardReadError, match=r"sample 's001': label 1 is outside 0..0"):
        load_images([url], SampleSpec(1, 8, 1))


def test_a_non_image_in_an_imagefolder_source_is_named(tmp_path, capsys):
    _imagefolder(tmp_path / "src" / "train", {"a": 1, "b": 1})
    (tmp_path / "src" / "train" / "b" / "fake.png").write_bytes(b"this is text, not a PNG")
    assert job("prepare").main(["--source", "imagefolder", "--src", str(tmp_path / "src"),
                                "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "fake.png: not a readable image" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "_info.json").exists()


def test_an_export_of_a_distilled_set_cut_short_is_refused(ray_local, tmp_path):
    from edc_ray.pipeline.run import export_stage
    from edc_ray.pipeline.synthesis import SynthesisResult

    run = RunFolder(str(tmp_path / "run"))
    write_shard(run.unit_shard(0), [_sample(0), _sample(1, label=1)])
    session = types.SimpleNamespace(run=run, cfg=Config(), info=types.SimpleNamespace(classes=["a", "b"]))
    cut_short = SynthesisResult(run.path("distilled"), (run.unit_shard(0),), units_total=1, images=3)
    with pytest.raises(DataError, match=r"holds 2 images, synthesis wrote 3"):
        export_stage(session, cut_short)
    assert not run.exists("export", "teachers.json")  # not marked complete
