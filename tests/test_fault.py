"""Fault tolerance of the synthesis stage, resume, metrics, and untrusted weights files."""
import os
import pickle
import shutil
import threading
import time
import urllib.request

import pytest
import ray

from edc_ray.config import ObserverSpec
from edc_ray.pipeline.common import DatasetMeta
from edc_ray.pipeline.observers import observers_stage
from edc_ray.pipeline.synthesis import synthesis_stage
from edc_ray.storage.run_folder import RunFolder
from tiny import MEAN, STD, free_ports, synthesis_config, synthesis_inputs

pytestmark = pytest.mark.slow
META = DatasetMeta(4, 1, 12, tuple(MEAN), tuple(STD))


@pytest.fixture(scope="module")
def metrics_port():
    port, = free_ports(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=port)
    yield port
    ray.shutdown()


@pytest.fixture(scope="module")
def shared(metrics_port, tmp_path_factory):
    """The observer of a 4-class tiny set in the object store, with a run folder of its statistics."""
    observers, run = synthesis_inputs(str(tmp_path_factory.mktemp("statistics")))
    return observers, run


def seeded(shared, folder) -> RunFolder:
    """A run folder holding the statistics stage's outputs, as synthesis finds them."""
    shutil.copytree(shared[1].root, folder)
    return RunFolder(str(folder))


config = synthesis_config


def shards(folder) -> dict[str, bytes]:
    path = os.path.join(folder, "distilled")
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path)) if n.endswith(".tar")}


def test_killed_actor_unit_is_redone_and_output_is_identical(shared, tmp_path):
    reference = synthesis_stage(config(), seeded(shared, tmp_path / "ref"), META, shared[0])
    assert sorted(r["unit"] for r in reference.units_run) == [0, 1, 2, 3]

    outcome = {}
    killed = seeded(shared, tmp_path / "killed")
    stage = threading.Thread(target=lambda: outcome.update(
        result=synthesis_stage(config(), killed, META, shared[0])))
    stage.start()
    # Unit 0 goes to SynthesisWorker-0; once its shard is committed, that actor is busy with its
    # second unit (about a second of work): kill it then.
    first, deadline = tmp_path / "killed" / "distilled" / "unit-00000.tar", time.time() + 120
    while time.time() < deadline and not first.exists():
        time.sleep(0.02)
    time.sleep(0.2)
    ray.kill(ray.get_actor("SynthesisWorker-0"), no_restart=False)
    stage.join(timeout=300)
    assert not stage.is_alive()
    assert outcome["result"].requeued, "the kill did not hit a running unit"
    assert sorted(r["unit"] for r in outcome["result"].units_run) == [0, 1, 2, 3]  # each exactly once
    assert shards(tmp_path / "killed") == shards(tmp_path / "ref")


def test_rerun_redoes_only_missing_or_torn_units(shared, tmp_path):
    folder = tmp_path / "run"
    run = seeded(shared, folder)
    synthesis_stage(config(50), run, META, shared[0])
    complete = shards(folder)
    os.remove(folder / "distilled" / "unit-00001.tar")
    torn = folder / "distilled" / "unit-00002.tar"
    torn.write_bytes(complete["unit-00002.tar"][:700])  # a cut copy
    again = synthesis_stage(config(50), run, META, shared[0])
    assert sorted(r["unit"] for r in again.units_run) == [1, 2]
    assert shards(folder) == complete
    assert synthesis_stage(config(50), run, META, shared[0]).units_run == ()


def test_progress_metrics_reach_the_metrics_endpoint(shared, metrics_port, tmp_path):
    synthesis_stage(config(20), seeded(shared, tmp_path / "m"), META, shared[0])
    wanted = ("ray_edc_synthesis_units", "ray_edc_synthesis_images", "ray_edc_synthesis_loss")
    text, deadline = "", time.time() + 60
    while time.time() < deadline and not all(w in text for w in wanted):
        time.sleep(2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for name in wanted:
        assert name in text, name
    assert 'state="done"' in text and 'actor="SynthesisWorker-0"' in text


class Exploit:
    """A pickle whose loading would create a file: the marker of code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_observer_weights_do_not_execute(tmp_path):
    marker, weights = tmp_path / "pwned", tmp_path / "observer.pt"
    weights.write_bytes(pickle.dumps({"features.0.0.weight": Exploit(str(marker))}))
    cfg = config()
    cfg.observers.models = [ObserverSpec("convnet_d2", weights=str(weights))]
    with pytest.raises(pickle.UnpicklingError, match="observer.pt"):
        observers_stage(cfg, RunFolder(str(tmp_path / "run")), META)
    assert not marker.exists()
