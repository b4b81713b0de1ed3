"""Stage "observers": load weights files, or train the observers with a Ray Train TorchTrainer."""
from __future__ import annotations

import re

import torch

from edc_ray.algo.observer import ObserverRun, epoch_seed
from edc_ray.algo.student import count_correct
from edc_ray.config import Config, ConfigError, ObserversConfig, from_dict, settings_key, to_dict
from edc_ray.errors import DataError
from edc_ray.models.external import PretrainedWeightsError
from edc_ray.models.pretrained import Preprocessing, missing_weights, preprocessing
from edc_ray.models import create_model, load_weights
from edc_ray.pipeline.common import DatasetMeta, build_model, set_threads
from edc_ray.pipeline.console import report_progress
from edc_ray.pipeline.distributed import (TRAIN_MAX_FAILURES, all_reduce_counts, fit_torch_trainer, latest_state,
                                          rank_and_world, report_checkpoint)
from edc_ray.pipeline.streaming import split_shards, split_stream, steps_every_rank_can_take
from edc_ray.storage.dataset_info import DatasetInfo, ShardList, imagenet_classes
from edc_ray.storage.run_folder import RunFolder

STREAM_SHUFFLE = 2000  # samples in each rank's shuffle buffer while training observers


def observer_names(cfg: Config) -> list[str]:
    """Run-folder names of the observers: index and architecture (`0-convnet_w128`)."""
    return [f"{k}-{re.sub(r'[^A-Za-z0-9_.-]', '_', spec.arch)}" for k, spec in enumerate(cfg.observers.models)]


def observers_key(cfg: Config) -> str:
    """A short hash of what trained observers depend on: their Ray Train storage carries it, so an
    interrupted training resumes only under the same settings."""
    return settings_key({"seed": cfg.seed, "data": to_dict(cfg.data), "observers": to_dict(cfg.observers)})


def validation_accuracy(model: torch.nn.Module, shards: ShardList, meta: DatasetMeta, batch_size: int,
                        device: torch.device) -> float:
    """Top-1 (%) over the split's `shards`, each rank streaming its share, summed over all ranks."""
    rank, world = rank_and_world()
    batches = split_stream(shards, meta.spec("val"), rank, world, batch_size)
    correct, total = all_reduce_counts(*count_correct(model, batches, meta.mean, meta.std, device))
    return 100.0 * correct / max(1, total)


def observer_steps(shards: ShardList, ocfg: ObserversConfig, world: int) -> int:
    """Steps per observer epoch: what the rank with the fewest samples can fill with its batch share."""
    return steps_every_rank_can_take(shards.estimated_lengths(), world, max(1, ocfg.batch_size // world))


def observer_batches(shards: ShardList, meta: DatasetMeta, ocfg: ObserversConfig, seed: int, rank: int = 0,
                     world: int = 1):
    """One epoch's batches for this rank: its shards (shard i to rank i mod world), shuffled and, for
    images of any size, cropped with `seed` (shared by the ranks), repeated so every rank fills its steps."""
    return split_stream(shards, meta.spec("train", seed=seed), rank, world, max(1, ocfg.batch_size // world),
                        shuffle=STREAM_SHUFFLE, seed=seed, repeat=True)


def train_observers_loop(config: dict) -> None:
    """Ray Train worker function: train each listed observer in turn (DDP across workers).

    The loop is the core's `ObserverRun`, fed by `observer_batches`: every rank streams its share of the
    train shards and takes the same number of steps per epoch, the most the rank with the fewest samples
    can fill, so DDP never waits. This adds the reports: every epoch a checkpoint (model, optimiser,
    schedule and random state), so a run restarted after a lost node or worker resumes at its last
    epoch; observers already in the run folder are skipped. Rank 0 writes each observer's weights and
    test accuracy into the run folder.
    """
    import ray.train
    import ray.train.torch

    rank, world = rank_and_world()
    set_threads(config["cpus"])
    device = ray.train.torch.get_device()
    ocfg = from_dict(ObserversConfig, config["observers"])
    meta = DatasetMeta(**config["meta"])
    run = RunFolder(config["run_dir"])
    shards: ShardList = config["train_shards"]
    steps = observer_steps(shards, ocfg, world)
    state = latest_state(rank)
    todo = [(k, name, arch) for k, (name, arch) in enumerate(zip(config["names"], config["archs"]))
            if not run.exists("observers", f"{name}.json")]  # decided before any rank writes one
    for k, name, arch in todo:
        ObserverRun.seed_weights(config["seed"], k)
        model = ray.train.torch.prepare_model(build_model(arch, meta))
        observer = ObserverRun(model, ocfg, steps, config["seed"], k, rank)
        if state and state["observer"] == name:
            observer.load_state(state)

        def batches(epoch: int, k: int = k):
            return observer_batches(shards, meta, ocfg, epoch_seed(config["seed"], k, epoch), rank, world)

        def report(epochs: int, loss: float, name: str = name, observer: ObserverRun = observer) -> None:
            report_checkpoint({"observer": name, "epoch": epochs, "loss": loss},
                              {"observer": name, **observer.state()}, rank)
            if rank == 0 and epochs < ocfg.epochs:  # the last epoch is shown with the test top-1
                report_progress(name, f"observer {name}", epochs, ocfg.epochs, f"loss {loss:.4f}")

        observer.train(batches, meta.mean, meta.std, device, report)
        plain = getattr(model, "module", model)
        accuracy = validation_accuracy(plain, config["val_shards"], meta, 500, device)
        if rank == 0:
            save_observer(run, name, arch, plain, accuracy, trained_epochs=ocfg.epochs)
            report_progress(name, f"observer {name}", ocfg.epochs, ocfg.epochs, f"test top-1 {accuracy:.2f}%")
        ray.train.report({"observer": name, "epoch": ocfg.epochs, "top1": accuracy})


def save_observer(run: RunFolder, name: str, arch: str, model: torch.nn.Module, accuracy: float | None,
                  **extra) -> None:
    """Weights, then the JSON beside them (the JSON marks the observer complete)."""
    run.save_torch({k: v.cpu() for k, v in model.state_dict().items()}, "observers", f"{name}.pt")
    run.write_json({"arch": arch, "top1": accuracy, **extra}, "observers", f"{name}.json")


def observers_stage(cfg: Config, run: RunFolder, meta: DatasetMeta) -> list[tuple[str, torch.nn.Module]]:
    """Make sure every observer's weights are in the run folder; return (arch, model) pairs.

    Weights files and pretrained weights are loaded (`weights_only=True`); the rest are trained in
    one TorchTrainer. Observers already complete in the run folder are reused as they are.
    """
    names = observer_names(cfg)
    to_train = []
    for name, spec in zip(names, cfg.observers.models):
        if run.exists("observers", f"{name}.json"):
            continue
        if spec.weights or spec.pretrained:  # a weights file holds the pretrained weights when both are set
            model = create_model(spec.arch, meta.num_classes, meta.channels, meta.image_size,
                                 pretrained=spec.pretrained and not spec.weights)
            if spec.weights:
                load_weights(model, spec.weights)
            save_observer(run, name, spec.arch, model, None, source=spec.weights or "pretrained")
        else:
            to_train.append((name, spec.arch))
    if to_train:
        config = {"observers": to_dict(cfg.observers), "meta": meta.__dict__, "run_dir": run.root,
                  "train_shards": split_shards(cfg.data, cfg.data.train_split),
                  "val_shards": split_shards(cfg.data, cfg.data.val_split), "names": [n for n, _ in to_train],
                  "archs": [a for _, a in to_train], "seed": cfg.seed, "cpus": cfg.ray.train_worker_cpus}
        fit_torch_trainer(train_observers_loop, config, f"observers-{observers_key(cfg)}", run.path("eval"),
                          cfg.ray.train_workers, cfg.ray.train_use_gpu, cfg.ray.train_worker_cpus,
                          max_failures=TRAIN_MAX_FAILURES, placement_timeout_s=cfg.ray.placement_timeout_s,
                          checkpoints_to_keep=1)
    return load_observers(cfg, run, meta)


def check_pretrained_weights(cfg: Config) -> None:
    """Before any work: every pretrained observer without a weights file has its file in torch's hub
    cache, or a `PretrainedWeightsError` names the file to fetch and where to put it."""
    for k, spec in enumerate(cfg.observers.models):
        if spec.pretrained and not spec.weights and (problem := missing_weights(spec.arch, spec.pretrained)):
            raise PretrainedWeightsError(f"observers.models[{k}]: {problem}")


def pretrained_preprocessing(cfg: Config, info: DatasetInfo) -> Preprocessing | None:
    """The preprocessing the pretrained observers share (None: there are none), checked against the dataset.

    Their normalisation and validation resize ratio replace the dataset's (they were trained with
    them); observers that disagree are a config error, and so is a dataset whose classes are not the
    ones the observers classify (ImageNet-1k's, in sorted-wnid order) or a `data.val_resize_ratio`
    other than theirs.
    """
    found = [(k, spec.arch, preprocessing(spec.arch, spec.pretrained))
             for k, spec in enumerate(cfg.observers.models) if spec.pretrained]
    if not found:
        return None
    k0, arch0, first = found[0]
    for k, arch, pre in found[1:]:
        if (pre.mean, pre.std, pre.resize_ratio) != (first.mean, first.std, first.resize_ratio):
            raise ConfigError(f"observers.models[{k}] ({arch}) was trained with mean {pre.mean}, std {pre.std}, "
                              f"resize ratio {pre.resize_ratio:.4f}, observers.models[{k0}] ({arch0}) with "
                              f"{first.mean}, {first.std}, {first.resize_ratio:.4f}: one run needs one of them")
    if first.num_classes == 1000 and info.classes != imagenet_classes():
        shown = ", ".join(info.classes[:3])
        raise DataError(f"the pretrained observers classify ImageNet-1k's 1000 classes in sorted-wnid order, but "
                        f"dataset {info.name!r} has {len(info.classes)} classes ({shown}, ...): give the dataset's "
                        "labels in that order (data.classes: imagenet-1k, or a file of wnids)")
    if first.num_classes != len(info.classes):
        raise DataError(f"the pretrained observers classify {first.num_classes} classes, dataset {info.name!r} "
                        f"has {len(info.classes)}")
    if abs(cfg.data.val_resize_ratio - first.resize_ratio) > 1e-6:
        raise ConfigError(f"data.val_resize_ratio: {cfg.data.val_resize_ratio} differs from the pretrained "
                          f"observers' {first.resize_ratio} (their validation resize / crop)")
    return first


def load_observers(cfg: Config, run: RunFolder, meta: DatasetMeta) -> list[tuple[str, torch.nn.Module]]:
    """The observers of `cfg` from the run folder's weights, in eval mode, as (arch, model) pairs."""
    models = []
    for name, spec in zip(observer_names(cfg), cfg.observers.models):
        model = build_model(spec.arch, meta)
        load_weights(model, run.path("observers", f"{name}.pt"))
        models.append((spec.arch, model.eval()))
    return models
