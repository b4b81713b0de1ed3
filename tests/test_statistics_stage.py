"""The streaming statistics + candidates stage through Ray, and what synthesis actors read of it."""
import os

import pytest
import ray
import ray.cloudpickle
import torch

from edc_ray.algo.candidates import sample_priority
from edc_ray.algo.condense import StatisticsPass
from edc_ray.algo.init import candidate_losses
from edc_ray.algo.student import normalize
from edc_ray.config import load_config
from edc_ray.pipeline import statistics
from edc_ray.pipeline.common import DatasetMeta, ObserverSet, build_model, load_models, observer_payload
from edc_ray.pipeline.statistics import Products, run_statistics_task, statistics_stage, task_plan
from edc_ray.pipeline.synthesis import synthesis_stage
from edc_ray.storage.prepare import prepare_dataset
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.dataset_info import read_info
from edc_ray.storage.shards import iter_raw_samples, iter_samples

pytestmark = pytest.mark.slow
NAMES = ("0-convnet_d2", "1-convnet_bn")


@pytest.fixture(scope="module")
def dataset(tiny_imagefolder, tmp_path_factory):
    """The tiny set prepared in shards of 25 (train: 25 + 25 + 10 images, classes in order)."""
    root = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_dataset("imagefolder", tiny_imagefolder, root, shard_size=25)
    return root


def config(root: str, run_dir: str, *overrides: str):
    return load_config(None, [f"data.root={root}", "observers.models=[{arch: convnet_d2}, {arch: convnet_bn}]",
                              "statistics.batch_size=25", "statistics.loader_workers=2", "statistics.patch_size=4",
                              "init.candidates_per_class=7", "synthesis.ipc=2", "synthesis.classes_per_unit=1",
                              "ray.stats_tasks=2", "ray.stats_cpus=0.5",
                              "ray.actor_cpus=0.5", f"output.run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def observers(ray_local, dataset):
    meta = DatasetMeta.from_info(read_info(dataset))
    torch.manual_seed(0)
    models = [build_model(arch, meta).eval() for arch in ("convnet_d2", "convnet_bn")]
    return ObserverSet(NAMES, ("convnet_d2", "convnet_bn"),
                       tuple(ray.put(observer_payload(a, m)) for a, m in zip(("convnet_d2", "convnet_bn"), models)))


def single_pass(cfg, dataset, observers):
    """The reference: every train shard in order through one StatisticsPass, batch by batch."""
    info = read_info(dataset)
    meta = DatasetMeta.from_info(info)
    models, _ = load_models(observers, meta)
    scan = StatisticsPass(models, meta.num_classes, cfg.statistics, meta.mean, meta.std)
    keys, labels, losses = [], [], []
    for url in list(info.shard_list(dataset, "train").urls):  # one shard per batch, as the tasks' loaders make them
        samples = list(iter_samples([url]))
        images, y = torch.stack([s[1] for s in samples]), torch.tensor([s[2] for s in samples])
        losses.append(scan.add(images, y))
        keys += [s[0] for s in samples]
        labels.append(y)
    scan.close()
    return scan.sums, keys, torch.cat(labels), torch.cat(losses)


def test_streamed_statistics_equal_a_single_pass_exactly(dataset, observers, tmp_path):
    cfg = config(dataset, str(tmp_path / "run"))
    info, run = read_info(dataset), RunFolder(cfg.output.run_dir)
    result = statistics_stage(cfg, run, info, DatasetMeta.from_info(info), observers)
    assert result.with_sums and result.tasks_run == (0, 1) and result.candidate_counts == (7, 7, 7)
    sums, keys, labels, losses = single_pass(cfg, dataset, observers)
    totals = run.global_statistics()
    for k, name in enumerate(NAMES):
        for c in range(3):
            stored = run.class_statistics(c)[name]
            expected = sums[k].block(c, c + 1)
            assert torch.equal(stored.counts, expected.counts)
            for got, want in zip(stored.sums, expected.sums):
                assert all(torch.equal(got[key], want[key]) for key in want), (name, c)
        assert totals[name].count == 60
        for got, want in zip(totals[name].sums, sums[k].totals().sums):
            assert all(torch.equal(got[key], want[key]) for key in want)
    for c in range(3):  # candidates: the single-pass bottom-k by priority, with the same losses and bytes
        own = [i for i, y in enumerate(labels.tolist()) if y == c]
        picked = sorted(own, key=lambda i: sample_priority(keys[i], cfg.seed))[:7]
        stored = run.class_candidates(c)
        assert stored.keys == [keys[i] for i in picked]
        assert torch.allclose(stored.losses, losses[picked].float(), atol=1e-6)
        raw = {s.key: s.fields["png"] for s in iter_raw_samples(list(info.shard_list(dataset, "train").urls))}
        assert stored.payloads == [raw[keys[i]] for i in picked]  # the original encoded bytes
    assert not run.exists("stats", "parts")


def test_rerun_after_a_killed_task_redoes_only_that_task(dataset, observers, tmp_path):
    cfg = config(dataset, str(tmp_path / "run"))
    info, run = read_info(dataset), RunFolder(cfg.output.run_dir)
    meta = DatasetMeta.from_info(info)
    reference = RunFolder(str(tmp_path / "reference"))
    statistics_stage(config(dataset, reference.root), reference, info, meta, observers)
    groups = task_plan(run, cfg, info, observers)
    counts = dict(zip(list(info.shard_list(dataset, "train").urls), info.splits["train"].shard_lengths))
    run_statistics_task(run, 0, groups[0], {u: counts[u] for u in groups[0]}, observers, cfg, meta,
                        None, Products(sums=True, candidates=True), device="cpu")  # task 0 finished...
    torn = run.task_path(1, "sums-00000.pt")
    os.makedirs(os.path.dirname(torn))
    with open(torn, "wb") as f:  # ...task 1 died half-way through a file
        f.write(b"torn")
    result = statistics_stage(cfg, run, info, meta, observers)
    assert result.tasks_run == (1,) and result.blocks_run == (0,)
    for c in range(3):
        assert open(run.class_candidates_path(c), "rb").read() == open(reference.class_candidates_path(c), "rb").read()
        assert open(run.class_statistics_path(c), "rb").read() == open(reference.class_statistics_path(c), "rb").read()
    again = statistics_stage(cfg, run, info, meta, observers)  # complete: nothing to run
    assert again.tasks_run == () and again.candidate_counts == (7, 7, 7)


def test_bytes_left_behind_by_a_task_are_read_back_exactly(dataset, observers, tmp_path, monkeypatch):
    info = read_info(dataset)
    meta = DatasetMeta.from_info(info)
    normal = RunFolder(str(tmp_path / "normal"))
    statistics_stage(config(dataset, normal.root), normal, info, meta, observers)
    # thresholds near 0: tasks keep only the sources of almost every candidate, the merge re-reads them
    monkeypatch.setattr(statistics, "payload_thresholds", lambda counts, k: torch.full((len(counts),), 1e-6))
    sparse = RunFolder(str(tmp_path / "sparse"))
    statistics_stage(config(dataset, sparse.root), sparse, info, meta, observers)
    assert torch.load(sparse.block_path(0), weights_only=True)["fetched"] == 21  # 7 per class, all read back
    for c in range(3):
        assert open(sparse.class_candidates_path(c), "rb").read() == open(normal.class_candidates_path(c), "rb").read()


def test_methods_without_matching_skip_the_sums_and_score_the_survivors(dataset, observers, tmp_path):
    cfg = config(dataset, str(tmp_path / "run"), "method=random")
    info, run = read_info(dataset), RunFolder(cfg.output.run_dir)
    result = statistics_stage(cfg, run, info, DatasetMeta.from_info(info), observers)
    assert not result.with_sums and run.statistics_marker() is None and not run.exists("stats", "global.pt")
    full = RunFolder(str(tmp_path / "full"))
    statistics_stage(config(dataset, full.root), full, info, DatasetMeta.from_info(info), observers)
    for c in range(3):  # the same sample, scored afterwards by the same ensemble
        a, b = run.class_candidates(c), full.class_candidates(c)
        assert a.keys == b.keys and torch.allclose(a.losses, b.losses, atol=1e-5)
    one = RunFolder(str(tmp_path / "one"))
    statistics_stage(config(dataset, one.root, "method=random", "init.score_observers=[1]"), one, info,
                     DatasetMeta.from_info(info), observers)
    meta = DatasetMeta.from_info(info)
    second = load_models(observers, meta)[0][1]
    for c in range(3):  # the same sample, scored by observer 1 alone
        own = one.class_candidates(c)
        alone = candidate_losses([second], normalize(own.images(), meta.mean, meta.std), own.labels)
        assert own.keys == run.class_candidates(c).keys and torch.allclose(own.losses, alone, atol=1e-5)
        assert not torch.allclose(own.losses, run.class_candidates(c).losses, atol=1e-3)
    # a later method that matches statistics finds them missing and computes them, keeping the candidates
    before = {c: open(run.class_candidates_path(c), "rb").read() for c in range(3)}
    edc = config(dataset, run.root)
    assert statistics_stage(edc, run, info, DatasetMeta.from_info(info), observers).with_sums
    assert {c: open(run.class_candidates_path(c), "rb").read() for c in range(3)} == before
    assert run.class_statistics(0)["0-convnet_d2"].counts.tolist() == [20]


class RecordingRunFolder(RunFolder):
    """A run folder that appends every per-class read to a log file: (process id, kind, class)."""

    def __init__(self, root: str, log: str):
        super().__init__(root)
        self.log = log

    def _record(self, kind: str, label: int) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {kind} {label}\n")

    def class_statistics(self, label: int):
        self._record("statistics", label)
        return super().class_statistics(label)

    def class_candidates(self, label: int, *decode):
        self._record("candidates", label)
        return super().class_candidates(label, *decode)


ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # the actors get this class by value


def test_actors_read_only_their_units_classes_and_more_actors_than_fit_still_finish(dataset, observers, tmp_path):
    # 4 actors of 1 CPU each on a 2-CPU instance: at most 2 are ever placed
    cfg = config(dataset, str(tmp_path / "run"), "ray.synthesis_actors=4", "ray.actor_cpus=1")
    info = read_info(dataset)
    meta = DatasetMeta.from_info(info)
    log = str(tmp_path / "reads.log")
    run = RecordingRunFolder(cfg.output.run_dir, log)
    statistics_stage(cfg, RunFolder(cfg.output.run_dir), info, meta, observers)
    result = synthesis_stage(cfg, run, meta, observers)
    assert sorted(r["unit"] for r in result.units_run) == [0, 1, 2] and len(result.workers) <= 2
    pid_of = {w["name"]: w["pid"] for w in result.workers}
    expected = sorted((pid_of[r["worker"]], kind, c) for r in result.units_run for c in r["classes"]
                      for kind in ("statistics", "candidates"))
    reads = sorted((int(p), kind, int(c)) for p, kind, c in (line.split() for line in open(log)))
    assert reads == expected  # each unit's own classes, once, in the actor that ran it
    assert all(r["pulled_mib"] > 0 for r in result.units_run)  # observers came from the object store
    assert len(list(iter_samples(list(result.urls)))) == result.images == 6
