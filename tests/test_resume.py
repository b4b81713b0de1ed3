"""Resume after real failures: the driver killed mid-synthesis, a Ray Train worker killed mid-evaluation."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml

from edc_ray.config import Config, EvaluationConfig, ObserverSpec
from edc_ray.pipeline import evaluation
from edc_ray.pipeline.common import DatasetMeta, ObserverSet, build_model, observer_payload
from edc_ray.pipeline.evaluation import EvalSet, fit_seed
from edc_ray.pipeline.synthesis import unit_samples
from edc_ray.storage.prepare import prepare_dataset
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.dataset_info import read_info
from edc_ray.storage.shards import write_shard
from tiny import MEAN, STD, make_tiny, recording_loop

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
META = DatasetMeta(3, 1, 12, tuple(MEAN), tuple(STD))
UNIT_SHARD = re.compile(r"unit-\d{5}\.tar")  # RunFolder.unit_shard's names (temporary files do not match)
WAIT_S = 600.0  # a bound for hangs only: a loaded 2-core machine can be very slow


# ---------------------------------------------------------------- processes (read from /proc, Linux)

def process_table() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (state, parent pid, process group, session) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def living(pids) -> list[int]:
    """The processes among `pids` that still run (a zombie has exited: it only waits to be reaped)."""
    table = process_table()
    return [pid for pid in pids if pid in table and table[pid][0] not in "ZX"]


def session_members(session: int) -> list[int]:
    """Processes of the session that `session` leads, zombies left out."""
    return living(pid for pid, (_, _, _, sid) in process_table().items() if sid == session)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` in the process tree."""
    table, found, frontier = process_table(), set(), {pid}
    while frontier:
        frontier = {p for p, (_, parent, _, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_session(driver: subprocess.Popen) -> list[int]:
    """SIGKILL the driver's process group, then whatever of its session outlives it; returns the latter.

    The driver was started as a session leader, so its session holds exactly the processes of this
    job: the driver, the Ray instance it started (same process group) and Ray's workers (each in a
    process group of its own, which die with their raylet).
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30
    while session_members(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    stray = session_members(driver.pid)
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return stray


# ---------------------------------------------------------------- the driver killed mid-synthesis

def write_job_config(path: Path, src: str, data_root: str, weights: str) -> str:
    """A tiny condense job: 3 one-class units, synthesised one after another (~1.5 s each), no evaluation."""
    config = {
        "data": {"root": data_root, "source": "imagefolder", "src": src, "shard_size": 25},
        "observers": {"models": [{"arch": "convnet_d2", "weights": weights}]},
        "statistics": {"patch_size": 4},
        "init": {"candidates_per_class": 10},
        "synthesis": {"ipc": 2, "classes_per_unit": 1, "iterations": 150},
        "evaluation": {"students": [], "random_baseline": False},
        "ray": {"address": "local", "num_cpus": 2, "dashboard": False, "synthesis_actors": 1, "actor_cpus": 1,
                "stats_tasks": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def condense(config: str, run_dir: Path, log: Path) -> subprocess.Popen:
    """`python jobs/condense.py` as its own session (so that it and its Ray instance can be killed as one)."""
    env = {**os.environ, "RAY_raylet_start_wait_time_s": "180"}  # Ray's 60 s is short on a loaded 2-core machine
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "jobs/condense.py", "--config", config, "--set",
                                 f"output.run_dir={run_dir}"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def finish(job: subprocess.Popen, log: Path) -> None:
    """Wait for a job that must succeed; kill its session if it does not end in time."""
    try:
        rc = job.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        kill_session(job)
        rc = "timeout"
    assert rc == 0, f"condense exited with {rc}; log tail:\n{log.read_text(errors='replace')[-4000:]}"


def committed_shards(run_dir: Path) -> dict[str, tuple[int, int, bytes]]:
    """name -> (inode, mtime in ns, bytes) of every distilled unit shard."""
    folder = run_dir / "distilled"
    if not folder.is_dir():
        return {}
    out = {}
    for name in sorted(os.listdir(folder)):
        if UNIT_SHARD.fullmatch(name):
            stat = os.stat(folder / name)
            out[name] = (stat.st_ino, stat.st_mtime_ns, (folder / name).read_bytes())
    return out


def test_driver_killed_mid_synthesis_then_rerun_redoes_only_missing_units(tiny_imagefolder, observer_weights,
                                                                          tmp_path):
    config = write_job_config(tmp_path / "job.yaml", tiny_imagefolder, str(tmp_path / "data"), observer_weights)
    log = tmp_path / "condense.log"

    reference = tmp_path / "reference"  # uninterrupted (it also prepares the dataset for both)
    finish(condense(config, reference, log), log)
    expected = {name: content for name, (_, _, content) in committed_shards(reference).items()}
    assert list(expected) == ["unit-00000.tar", "unit-00001.tar", "unit-00002.tar"]

    run = tmp_path / "interrupted"
    job = condense(config, run, log)
    try:
        first, deadline = run / "distilled" / "unit-00000.tar", time.monotonic() + WAIT_S
        while not first.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.exists(), f"no unit committed; log tail:\n{log.read_text(errors='replace')[-4000:]}"
        ray_processes = descendants(job.pid)
        assert ray_processes, "the driver started no Ray processes"
    finally:
        stray = kill_session(job)
    assert job.returncode == -signal.SIGKILL
    assert stray == [], f"processes {stray} outlived the killed driver's process group for 30 s"
    assert living(ray_processes) == []

    before = committed_shards(run)
    missing = sorted(int(name[5:10]) for name in set(expected) - set(before))
    assert "unit-00000.tar" in before and missing, "the kill did not land mid-synthesis"
    assert not (run / "report.json").exists()
    for name, (_, _, content) in before.items():
        assert content == expected[name], f"{name} committed before the kill differs from the reference"

    finish(condense(config, run, log), log)
    report = json.loads((run / "report.json").read_text())
    assert sorted(u["unit"] for u in report["synthesis"]["units_run"]) == missing
    after = committed_shards(run)
    for name, identity in before.items():  # committed shards were neither rewritten nor replaced
        assert after[name] == identity, name
    assert {name: content for name, (_, _, content) in after.items()} == expected


# ---------------------------------------------------------------- a Ray Train worker killed mid-evaluation

@pytest.fixture(scope="module")
def ray_local():
    """A private Ray instance to which this module's functions travel by value (workers cannot import it)."""
    this = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(this)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(this)


def checkpoint_epochs(storage: Path, ranks: int = 2) -> list[int]:
    """Epochs of the complete checkpoints (every rank's file present) under Ray Train's storage folder."""
    epochs = []
    for folder in storage.glob("checkpoint_*"):
        if all((folder / f"rank{rank}.pt").exists() for rank in range(ranks)):
            try:
                epochs.append(torch.load(folder / "rank0.pt", weights_only=True)["epoch"])
            except Exception:  # still being written
                continue
    return sorted(epochs)


def train_workers() -> list[int]:
    """Ray Train worker processes of this test's Ray instance (below this process, named by Ray)."""
    workers = []
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith("ray::RayTrainWo"):
                    workers.append(pid)
        except OSError:
            continue
    return living(workers)


def evaluation_setup(imagefolder: str, tmp_path: Path, epochs: int, eval_every: int, workers: int
                     ) -> tuple[Config, RunFolder, ObserverSet, EvalSet]:
    """A tiny prepared dataset, a 6-image distilled set, one untrained teacher and an evaluation config."""
    data_root = str(tmp_path / "data")
    prepare_dataset("imagefolder", imagefolder, data_root, shard_size=25)
    assert read_info(data_root).splits["test"].shard_lengths == [25, 5]
    images, labels = make_tiny(per_class=2, seed=3)
    run = RunFolder(str(tmp_path / "run"))
    distilled = run.unit_shard(0)
    write_shard(distilled, unit_samples(0, images, labels))
    torch.manual_seed(0)
    teacher = ObserverSet(("0-convnet_d2",), ("convnet_d2",),
                          (ray.put(observer_payload("convnet_d2", build_model("convnet_d2", META))),))
    cfg = Config()
    cfg.observers.models = [ObserverSpec("convnet_d2")]
    cfg.data.root, cfg.data.val_split = data_root, "test"
    cfg.evaluation = EvaluationConfig(students=["convnet_d2"], epochs=epochs, batch_size=2, eval_every=eval_every,
                                      val_batch_size=16, seeds=[0])
    cfg.ray.train_workers, cfg.ray.train_worker_cpus = workers, 0.5
    return cfg, run, teacher, EvalSet("distilled", (distilled,), len(images))


def test_evaluation_resumes_from_last_checkpoint_after_worker_dies(ray_local, tiny_imagefolder, tmp_path,
                                                                   monkeypatch):
    cfg, run, teacher, target = evaluation_setup(tiny_imagefolder, tmp_path, epochs=60, eval_every=10, workers=2)
    record = tmp_path / "starts.jsonl"
    monkeypatch.setattr(evaluation, "train_student_loop", functools.partial(recording_loop, str(record), evaluation.__name__, "train_student_loop"))

    outcome: dict = {}

    def evaluate() -> None:
        try:
            outcome["summary"] = fit_seed(cfg, run, META, teacher, target, "convnet_d2", 0)
        except BaseException as exn:  # noqa: BLE001 (reported by the assertion below)
            outcome["error"] = exn

    thread = threading.Thread(target=evaluate)
    thread.start()
    storage = Path(run.path("eval", f"distilled-convnet_d2-seed0-{evaluation.evaluation_key(cfg.evaluation)}"))
    # Two complete checkpoints: a worker's report returns only once the controller took it, so the
    # first one is registered with Ray Train by the time the second one's files exist.
    deadline = time.monotonic() + WAIT_S
    while len(checkpoint_epochs(storage)) < 2 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    registered = checkpoint_epochs(storage)
    victims = train_workers()
    assert len(registered) >= 2 and len(victims) == 2, (registered, victims, outcome)
    os.kill(victims[1], signal.SIGKILL)
    thread.join(timeout=WAIT_S)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome["error"]

    starts = [json.loads(line) for line in record.read_text().splitlines()]
    first = [s for s in starts if s["epoch"] is None]
    resumed = [s for s in starts if s["epoch"] is not None]
    assert sorted(s["rank"] for s in first) == [0, 1]  # the first worker group started from scratch
    assert sorted(s["rank"] for s in resumed) == [0, 1], starts  # the second one from a checkpoint ...
    resumed_epoch = resumed[0]["epoch"]
    assert all(s["epoch"] == resumed_epoch for s in resumed)
    assert resumed_epoch >= registered[-2] and resumed_epoch % 10 == 0  # ... one registered before the kill
    assert resumed_epoch < 60
    assert not {s["pid"] for s in resumed} & {s["pid"] for s in first}  # in new worker processes
    summary = outcome["summary"]
    assert summary["seed"] == 0 and run.read_json("eval", "distilled-convnet_d2-seed0.json") == summary
    assert 0.0 <= summary["final_top1"] <= summary["best_top1"] <= 100.0
    assert checkpoint_epochs(storage)[-1] == 60


def test_an_interrupted_evaluation_rerun_under_other_settings_starts_afresh(ray_local, tiny_imagefolder, tmp_path,
                                                                          monkeypatch):
    """Issue 16: Ctrl-C leaves Ray Train checkpoints but no eval/<run>.json. A re-run with other
    evaluation settings must train from scratch (it once restored the old run and cached NaN); a re-run
    with the same settings resumes from the checkpoint."""
    cfg, run, teacher, target = evaluation_setup(tiny_imagefolder, tmp_path, epochs=4, eval_every=2, workers=1)
    record = tmp_path / "starts.jsonl"
    monkeypatch.setattr(evaluation, "train_student_loop", functools.partial(recording_loop, str(record), evaluation.__name__, "train_student_loop"))
    summary_name = "distilled-convnet_d2-seed0.json"

    def starts() -> list:
        return [json.loads(line)["epoch"] for line in record.read_text().splitlines()]

    first_key = evaluation.evaluation_key(cfg.evaluation)
    fit_seed(cfg, run, META, teacher, target, "convnet_d2", 0)
    old_storage = Path(run.path("eval", f"distilled-convnet_d2-seed0-{first_key}"))
    assert checkpoint_epochs(old_storage, ranks=1) == [2, 4]
    Path(run.path("eval", summary_name)).unlink()  # what an interrupted run leaves: checkpoints, no summary

    cfg.evaluation.epochs = 2
    summary = fit_seed(cfg, run, META, teacher, target, "convnet_d2", 0)
    assert starts() == [None, None]  # the old run's checkpoint was not restored
    new_key = evaluation.evaluation_key(cfg.evaluation)
    assert new_key != first_key and summary["evaluation_key"] == new_key
    assert 0.0 <= summary["final_top1"] <= summary["best_top1"] <= 100.0
    assert checkpoint_epochs(Path(run.path("eval", f"distilled-convnet_d2-seed0-{new_key}")), ranks=1) == [2]
    assert run.read_json("eval", summary_name) == summary

    cfg.evaluation.epochs = 4  # back to the first settings: the summary on disk is not theirs, the checkpoint is
    again = fit_seed(cfg, run, META, teacher, target, "convnet_d2", 0)
    assert starts() == [None, None, 4] and again["evaluation_key"] == first_key
