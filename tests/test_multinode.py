"""A simulated multi-node cluster (`ray.cluster_utils.Cluster`: a head and worker nodes with logical GPUs,
all on 127.0.0.1): actors spread over nodes, nodes lost mid-synthesis and mid-observer-training, more
actors than GPUs, no node with a GPU, node-local paths refused before any work."""
from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from edc_ray.config import Config, ObserverSpec
from edc_ray.errors import ClusterError
from edc_ray.pipeline import observers as observers_module
from edc_ray.pipeline.cluster import check_shared_paths
from edc_ray.pipeline.common import DatasetMeta
from edc_ray.pipeline.distributed import fit_torch_trainer
from edc_ray.pipeline.observers import observers_key, observers_stage
from edc_ray.pipeline.run import run_pipeline
from edc_ray.pipeline.synthesis import synthesis_stage
from edc_ray.storage.prepare import prepare_dataset
from edc_ray.storage.run_folder import RunFolder
from tiny import MEAN, STD, recording_loop, synthesis_config, synthesis_inputs

pytestmark = pytest.mark.slow
META = DatasetMeta(4, 1, 12, tuple(MEAN), tuple(STD))
GPU_NODE = {"num_cpus": 1, "num_gpus": 1}  # logical GPUs: the actors run on the CPU
WAIT_S = 300.0  # a bound for hangs only


@contextlib.contextmanager
def cluster(*workers: dict, head_cpus: int = 1) -> Iterator[tuple[Cluster, list]]:
    """A head of `head_cpus` CPUs and one worker node per entry of `workers` (add_node arguments),
    with this process connected as the driver."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    try:
        added = [nodes.add_node(**spec) for spec in workers]
        nodes.wait_for_nodes()
        ray.init(address=nodes.address)
        yield nodes, added
    finally:
        ray.shutdown()
        nodes.shutdown()


def gpu_config(actors: int, iterations: int = 1000, timeout_s: float = 60.0) -> Config:
    cfg = synthesis_config(iterations)
    cfg.ray.synthesis_actors, cfg.ray.actor_gpus, cfg.ray.placement_timeout_s = actors, 1.0, timeout_s
    return cfg


def in_background(work) -> tuple[threading.Thread, dict]:
    """Run `work()` in a thread; the dict receives its `result` or its `error`."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as err:  # noqa: BLE001 (asserted by the caller)
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(path: Path, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_actors_spread_over_nodes_and_a_lost_node_is_survived(tmp_path, capsys):
    with cluster(GPU_NODE, GPU_NODE) as (nodes, workers):
        observers, run = synthesis_inputs(str(tmp_path / "run"))
        thread, outcome = in_background(lambda: synthesis_stage(gpu_config(2), run, META, observers))
        wait_for(tmp_path / "run" / "distilled" / "unit-00000.tar")
        # Each actor is running a unit now (about a second of work each, 4 units for 2 actors): lose one
        # node with its actor and unit.
        nodes.remove_node(workers[0])
        thread.join(WAIT_S)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert len({worker["node"] for worker in result.workers}) == 2  # one actor on each GPU node
    assert sorted(r["unit"] for r in result.units_run) == [0, 1, 2, 3]  # each exactly once
    assert result.requeued, "the lost node held no running unit"
    assert capsys.readouterr().out.count("queued again") == len(result.requeued)  # one line per re-queue


def test_more_actors_than_gpus_run_with_those_that_were_placed(tmp_path):
    with cluster(GPU_NODE, GPU_NODE):
        observers, run = synthesis_inputs(str(tmp_path / "run"))
        result = synthesis_stage(gpu_config(4, iterations=50), run, META, observers)
    assert len(result.workers) == 2
    assert sorted(r["unit"] for r in result.units_run) == [0, 1, 2, 3]


def test_no_node_with_a_gpu_fails_with_the_clear_error_within_the_timeout(tmp_path):
    with cluster({"num_cpus": 1}):
        observers, run = synthesis_inputs(str(tmp_path / "run"))
        start = time.monotonic()
        with pytest.raises(ClusterError, match=r"synthesis actors asked for 1 x \{'CPU': 0\.5, 'GPU': 1\.0\}.*"
                                               r"placement_timeout_s=3 s.*2 node\(s\)"):
            synthesis_stage(gpu_config(2, timeout_s=3.0), run, META, observers)
        assert time.monotonic() - start < 60
        assert not (tmp_path / "run" / "distilled").exists()
        # Ray Train's worker groups likewise (it would retry its placement group every 60 s forever).
        with pytest.raises(ClusterError, match=r"Ray Train run students asked for 2 x \{'CPU': 0\.5, 'GPU': 1\.0\}"):
            fit_torch_trainer(lambda config: None, {}, "students", str(tmp_path / "eval"), workers=2, use_gpu=True,
                              cpus_per_worker=0.5, max_failures=0, placement_timeout_s=3.0)


def test_losing_the_only_gpu_node_ends_with_the_clear_error(tmp_path, capsys):
    with cluster(GPU_NODE) as (nodes, workers):
        observers, run = synthesis_inputs(str(tmp_path / "run"))
        thread, outcome = in_background(lambda: synthesis_stage(gpu_config(1, timeout_s=5.0), run, META, observers))
        wait_for(tmp_path / "run" / "distilled" / "unit-00000.tar")
        nodes.remove_node(workers[0])
        thread.join(WAIT_S)
        assert not thread.is_alive()
    assert isinstance(outcome.get("error"), ClusterError), outcome
    assert "placed again after a failure" in str(outcome["error"])
    assert "Re-run the job: finished units are kept" in str(outcome["error"])
    assert capsys.readouterr().out.count("queued again") <= 1  # the lost unit, not every refused call


def tiny_data(imagefolder: str, root: Path) -> str:
    prepare_dataset("imagefolder", imagefolder, str(root), shard_size=25)
    return str(root)


def test_node_local_paths_are_refused_on_two_nodes_before_any_work(tiny_imagefolder, tmp_path):
    cfg = Config()
    cfg.data.root, cfg.output.run_dir = tiny_data(tiny_imagefolder, tmp_path / "data"), str(tmp_path / "run")
    cfg.observers.models = [ObserverSpec("convnet_d2", weights=str(tmp_path / "w.pt"))]
    with cluster({"num_cpus": 1}):
        with pytest.raises(ClusterError) as refused:
            run_pipeline(cfg)
        for key in ("data.root", "output.run_dir", "observers.models[0].weights"):
            assert key in str(refused.value)
        assert "s3://" in str(refused.value) and "ray.shared_paths" in str(refused.value)
        assert not (tmp_path / "run").exists()
        cfg.ray.shared_paths = [str(tmp_path)]  # declared: a mount every node sees at this path
        check_shared_paths(cfg)
        cfg.output.run_dir = "/elsewhere/run"
        with pytest.raises(ClusterError, match=r"output.run_dir='/elsewhere/run'"):
            check_shared_paths(cfg)


def test_local_paths_pass_on_a_private_instance_and_are_refused_on_a_joined_cluster(tmp_path):
    cfg = Config()
    cfg.data.root, cfg.output.run_dir = str(tmp_path / "data"), str(tmp_path / "run")
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        check_shared_paths(cfg)  # one node, started by this run: every path is on it
        cfg.ray.address = "auto"  # a cluster joined: an autoscaler may add nodes at any time
        with pytest.raises(ClusterError, match="data.root=.*output.run_dir="):
            check_shared_paths(cfg)
        cfg.ray.shared_paths = [str(tmp_path)]
        check_shared_paths(cfg)
        cfg.observers.models = [ObserverSpec("timm:local-dir:/models/resnet18", pretrained=True)]  # a timm folder
        with pytest.raises(ClusterError, match=r"^observers.models\[0\].arch='/models/resnet18': on this machine"):
            check_shared_paths(cfg)
    finally:
        ray.shutdown()


def test_observer_training_resumes_after_its_node_is_lost(tiny_imagefolder, tmp_path, monkeypatch):
    cfg = Config()
    cfg.data.root, cfg.data.val_split = tiny_data(tiny_imagefolder, tmp_path / "data"), "test"
    cfg.observers.models = [ObserverSpec("convnet_d2")]
    cfg.observers.epochs, cfg.observers.batch_size = 30, 4
    cfg.ray.train_workers, cfg.ray.train_worker_cpus, cfg.ray.placement_timeout_s = 1, 1.0, 120.0
    record = tmp_path / "starts.jsonl"
    monkeypatch.setattr(observers_module, "train_observers_loop", functools.partial(
        recording_loop, str(record), observers_module.__name__, "train_observers_loop"))
    run = RunFolder(str(tmp_path / "run"))
    storage = tmp_path / "run" / "eval" / f"observers-{observers_key(cfg)}"
    meta = DatasetMeta(3, 1, 12, tuple(MEAN), tuple(STD))
    # The head has no CPU for Ray Train's worker: it runs on the worker node, which is then lost
    # (a spot reclaim) and replaced.
    with cluster({"num_cpus": 1}, head_cpus=0) as (nodes, workers):
        thread, outcome = in_background(lambda: observers_stage(cfg, run, meta))
        deadline = time.monotonic() + WAIT_S
        while not list(storage.glob("checkpoint_*/rank0.pt")):
            assert time.monotonic() < deadline and thread.is_alive(), outcome
            time.sleep(0.05)
        time.sleep(1.0)  # a few more epochs
        nodes.remove_node(workers[0])
        nodes.add_node(num_cpus=1)
        thread.join(WAIT_S)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    starts = [json.loads(line)["epoch"] for line in record.read_text().splitlines()]
    assert starts[0] is None and len(starts) == 2 and starts[1] >= 1, starts  # resumed, not restarted
    saved = run.read_json("observers", "0-convnet_d2.json")
    assert saved["trained_epochs"] == 30 and saved["top1"] is not None
