"""Ray's fake multi-node autoscaler (`fake_multinode` provider) started with our own config, on its own
ports and temp dir: GPU workers scale from zero for synthesis and back to zero after it, and CPU-only
work does not launch GPU nodes.

Not `ray.cluster_utils.AutoscalingCluster`: its start and shutdown run `ray stop --force`, which stops
every Ray instance on the machine, and it reads an example YAML the 2.60 wheel lacks. The autoscaler is
v1 here: v2's monitor fills its config from that same missing file.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import ray
import yaml
from ray._private.authentication_test_utils import reset_auth_token_state

from edc_ray.pipeline.cluster import alive_nodes
from edc_ray.pipeline.common import DatasetMeta
from edc_ray.pipeline.statistics import statistics_stage
from edc_ray.pipeline.synthesis import synthesis_stage
from edc_ray.storage.prepare import prepare_dataset
from edc_ray.storage.run_folder import RunFolder
from tiny import MEAN, STD, free_ports, synthesis_config, synthesis_inputs

pytestmark = pytest.mark.slow
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
IDLE_S = 3.0  # idle workers are removed after this long
WAIT_S = 180.0


def fake_cluster_config(gcs_address: str) -> dict:
    """The node layout of cluster/aws.yaml in small: a CPU head, a CPU worker type and a GPU worker type,
    both from zero."""
    return {
        "cluster_name": "edc-ray-fake", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_S / 60,
        # As Ray's own fake config: nodes are processes here, nothing to set up over SSH, and their
        # ids stand in for IPs (all share 127.0.0.1).
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}},
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling_cluster():
    """A fake autoscaling cluster of its own (head in its own session, killed at the end), connected."""
    temp_dir = tempfile.mkdtemp(prefix="edc-as-", dir="/tmp")  # short: Unix socket paths are limited
    gcs, agent, agent_grpc, runtime_env, client, metrics = free_ports(6)
    ip = ray._private.services.get_node_ip_address()
    config = os.path.join(temp_dir, "autoscaler.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(fake_cluster_config(f"{ip}:{gcs}"), f)
    token = secrets.token_hex(16)
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    with open(os.path.join(temp_dir, "head.log"), "w") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={temp_dir}", "--num-cpus=1",
             f"--autoscaling-config={config}", "--include-dashboard=false",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}",
             f"--metrics-export-port={metrics}"],
            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    # This process's Ray reads its auth mode and token once (an earlier local instance may have set
    # them): point it at this cluster's token, as Ray's own tests do, and restore it afterwards.
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "token")
    patch.setenv("RAY_AUTH_TOKEN", token)
    patch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    reset_auth_token_state()
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                ray.init(address=f"{ip}:{gcs}")
                break
            except (ConnectionError, RuntimeError):
                assert time.monotonic() < deadline and head.poll() is None, open(log.name).read()[-3000:]
                time.sleep(1)
        yield
    finally:
        ray.shutdown()
        patch.undo()
        reset_auth_token_state()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


class NodeWatch:
    """Samples the alive nodes in the background; `most_gpus` is the most GPUs seen at once."""

    def __init__(self):
        self.most_gpus, self.most_nodes = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            nodes = alive_nodes()
            self.most_nodes = max(self.most_nodes, len(nodes))
            self.most_gpus = max(self.most_gpus, sum(n["Resources"].get("GPU", 0.0) for n in nodes))

    def __enter__(self) -> "NodeWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def gpus_now() -> float:
    return sum(node["Resources"].get("GPU", 0.0) for node in alive_nodes())


def test_cpu_work_scales_cpu_workers_and_never_gpu_nodes(autoscaling_cluster, tiny_imagefolder, tmp_path):
    data = str(tmp_path / "data")
    info = prepare_dataset("imagefolder", tiny_imagefolder, data, shard_size=25)
    observers, _ = synthesis_inputs(str(tmp_path / "unused"), num_classes=3)
    cfg = synthesis_config()
    cfg.data.root = data
    cfg.ray.stats_tasks, cfg.ray.stats_cpus = 1, 2.0  # more than the head's one CPU
    assert gpus_now() == 0
    with NodeWatch() as watch:
        result = statistics_stage(cfg, RunFolder(str(tmp_path / "run")), info,
                                  DatasetMeta(3, 1, 12, tuple(MEAN), tuple(STD)), observers)
    assert result.images == 60
    assert watch.most_nodes >= 2  # a CPU worker was launched for the task
    assert watch.most_gpus == 0  # and no GPU node


def test_gpu_workers_scale_from_zero_for_synthesis_and_back(autoscaling_cluster, tmp_path):
    observers, run = synthesis_inputs(str(tmp_path / "run"))
    cfg = synthesis_config(iterations=50)
    cfg.ray.actor_gpus, cfg.ray.placement_timeout_s = 1.0, WAIT_S
    head = ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + WAIT_S
    while gpus_now() > 0:  # nodes of an earlier test idle out first
        assert time.monotonic() < deadline
        time.sleep(1)
    result = synthesis_stage(cfg, run, DatasetMeta(4, 1, 12, tuple(MEAN), tuple(STD)), observers)
    assert sorted(r["unit"] for r in result.units_run) == [0, 1, 2, 3]
    assert all(worker["node"] != head for worker in result.workers)  # on GPU nodes launched for them
    deadline = time.monotonic() + WAIT_S
    while gpus_now() > 0:  # idle GPU nodes are removed again
        assert time.monotonic() < deadline, alive_nodes()
        time.sleep(1)
