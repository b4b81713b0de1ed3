"""The Ray Train workers run the core's training loops: a one-worker student run gives the single-process
API's numbers exactly, and a one-worker observer run the core loop's weights on the same stream."""
import pytest
import ray
import torch

from edc_ray.algo.observer import ObserverRun, epoch_seed
from edc_ray.algo.student import train_student
from edc_ray.pipeline.common import DatasetMeta, ObserverSet, build_model, observer_payload
from edc_ray.pipeline.evaluation import EvalSet, fit_seed, load_images
from edc_ray.pipeline.observers import observer_batches, observer_steps, observers_stage
from edc_ray.pipeline.run import prepare_data
from edc_ray.pipeline.streaming import split_shards
from edc_ray.storage.run_folder import RunFolder
from tiny import tiny_config

pytestmark = pytest.mark.slow


def test_a_one_worker_student_run_equals_the_single_process_api(ray_local, tiny_imagefolder, tmp_path):
    cfg = tiny_config(tiny_imagefolder, str(tmp_path / "data"), str(tmp_path / "run"))
    cfg.ray.train_workers, cfg.evaluation.epochs, cfg.evaluation.eval_every = 1, 4, 2
    info = prepare_data(cfg)
    meta = DatasetMeta.from_info(info, cfg.data)
    torch.manual_seed(3)
    teachers = [build_model("convnet_d2", meta).eval() for _ in range(2)]
    refs = tuple(ray.put(observer_payload("convnet_d2", t)) for t in teachers)
    observers = ObserverSet(("0-convnet_d2", "1-convnet_d2"), ("convnet_d2", "convnet_d2"), refs)
    train = split_shards(cfg.data, cfg.data.train_split)
    target = EvalSet("real", train.urls[:1], train.lengths[0])  # one shard of real images as "the set"

    seed = 5
    pipeline = fit_seed(cfg, RunFolder(cfg.output.run_dir), meta, observers, target, "convnet_d2", seed)

    images, labels = load_images(list(target.urls))
    val = load_images(list(split_shards(cfg.data, cfg.data.val_split).urls))
    torch.manual_seed(seed)  # the pipeline's initial weights
    alone = train_student(build_model("convnet_d2", meta), teachers, images, labels, cfg.evaluation, meta.mean,
                          meta.std, val=val, seed=seed)
    assert [r["epoch"] for r in alone["history"] if "top1" in r] == [2, 4]
    assert (pipeline["final_top1"], pipeline["best_top1"]) == (alone["final_top1"], alone["best_top1"])
    assert pipeline["final_loss"] == alone["history"][-1]["loss"]


def test_a_one_worker_observer_run_equals_the_core_loop_in_one_process(ray_local, tiny_imagefolder, tmp_path):
    cfg = tiny_config(tiny_imagefolder, str(tmp_path / "data"), str(tmp_path / "run"))
    cfg.ray.train_workers, cfg.observers.epochs = 1, 2
    info = prepare_data(cfg)
    meta = DatasetMeta.from_info(info, cfg.data)
    run = RunFolder(cfg.output.run_dir)
    ((arch, trained),) = observers_stage(cfg, run, meta)

    shards = split_shards(cfg.data, cfg.data.train_split)
    ObserverRun.seed_weights(cfg.seed, 0)
    model = build_model(arch, meta)
    losses = []
    alone = ObserverRun(model, cfg.observers, observer_steps(shards, cfg.observers, 1), cfg.seed, 0)
    alone.train(lambda epoch: observer_batches(shards, meta, cfg.observers, epoch_seed(cfg.seed, 0, epoch)),
                meta.mean, meta.std, "cpu", lambda epochs, loss: losses.append(loss))
    assert len(losses) == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]), key
