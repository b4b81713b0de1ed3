"""Stage "observers": load weights files, or train the observers with a Ray Train TorchTrainer."""
from __future__ import annotations

import torch

from edc_ray.algo.observer import classifier_step, make_optimizer
from edc_ray.algo.student import evaluate_counts, normalize
from edc_ray.config import Config, ObserversConfig, from_dict, to_dict
from edc_ray.models import create_model, load_weights
from edc_ray.pipeline.common import DatasetMeta, build_model, set_threads
from edc_ray.pipeline.distributed import (all_reduce_counts, equal_steps, fit_torch_trainer,
                                          rank_and_world, rank_share)
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import load_split


def observer_names(cfg: Config) -> list[str]:
    """Run-folder names of the observers: index and architecture (`0-convnet_w128`)."""
    return [f"{k}-{spec.arch.replace(':', '_')}" for k, spec in enumerate(cfg.observers.models)]


def validation_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        meta: DatasetMeta, batch_size: int, device: torch.device) -> float:
    """Top-1 (%) over this rank's share of the validation set, summed over all ranks."""
    correct, total = evaluate_counts(model, images, labels, meta.mean, meta.std, batch_size, device)
    correct, total = all_reduce_counts(correct, total)
    return 100.0 * correct / max(1, total)


def train_observers_loop(config: dict) -> None:
    """Ray Train worker function: train each listed observer in turn (DDP across workers).

    Every rank loads the (small) train split, takes its share of each global batch from a shared
    permutation (equal steps on every rank), and validates on its share of the test split. Rank 0
    writes each observer's weights and accuracy into the run folder.
    """
    import ray.train
    import ray.train.torch

    rank, world = rank_and_world()
    set_threads(config["cpus"])
    device = ray.train.torch.get_device()
    ocfg = from_dict(ObserversConfig, config["observers"])
    meta = DatasetMeta(**config["meta"])
    run = RunFolder(config["run_dir"])
    images, labels, _ = load_split(config["data_root"], config["train_split"])
    val_images, val_labels, _ = load_split(config["data_root"], config["val_split"])
    val_images, val_labels = rank_share(val_images, rank, world), rank_share(val_labels, rank, world)
    steps = equal_steps(len(images), ocfg.batch_size, world)
    for k, (name, arch) in enumerate(zip(config["names"], config["archs"])):
        torch.manual_seed(config["seed"] + k)
        model = ray.train.torch.prepare_model(build_model(arch, meta))
        optimizer, scheduler = make_optimizer(model, ocfg, steps * ocfg.epochs)
        order = torch.Generator().manual_seed(config["seed"] + k)  # same permutation on every rank
        augment = torch.Generator().manual_seed(config["seed"] + 1000 * (k + 1) + rank)
        for epoch in range(ocfg.epochs):
            perm = torch.randperm(len(images), generator=order)
            losses = []
            for step in range(steps):
                batch = rank_share(perm[step * ocfg.batch_size:(step + 1) * ocfg.batch_size], rank, world)
                x = normalize(images[batch].to(device), meta.mean, meta.std)
                losses.append(classifier_step(model, optimizer, scheduler, x, labels[batch].to(device),
                                              ocfg, augment))
            ray.train.report({"observer": name, "epoch": epoch + 1, "loss": sum(losses) / len(losses)})
            if rank == 0:
                print(f"[observers] {name} epoch {epoch + 1}/{ocfg.epochs} "
                      f"loss {sum(losses) / len(losses):.4f}", flush=True)
        plain = getattr(model, "module", model)
        accuracy = validation_accuracy(plain, val_images, val_labels, meta, 500, device)
        if rank == 0:
            save_observer(run, name, arch, plain, accuracy, trained_epochs=ocfg.epochs)
            print(f"[observers] {name} test top-1 {accuracy:.2f}%", flush=True)
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
        if spec.weights or spec.pretrained:
            model = create_model(spec.arch, meta.num_classes, meta.channels, meta.image_size,
                                 pretrained=spec.pretrained)
            if spec.weights:
                load_weights(model, spec.weights)
            save_observer(run, name, spec.arch, model, None, source=spec.weights or "pretrained")
        else:
            to_train.append((name, spec.arch))
    if to_train:
        config = {"observers": to_dict(cfg.observers), "meta": meta.__dict__, "run_dir": run.root,
                  "data_root": cfg.data.root, "train_split": cfg.data.train_split,
                  "val_split": cfg.data.val_split, "names": [n for n, _ in to_train],
                  "archs": [a for _, a in to_train], "seed": cfg.seed, "cpus": cfg.ray.train_worker_cpus}
        fit_torch_trainer(train_observers_loop, config, "observers", run.path("eval"),
                          cfg.ray.train_workers, cfg.ray.train_use_gpu, cfg.ray.train_worker_cpus)
    models = []
    for name, spec in zip(names, cfg.observers.models):
        model = build_model(spec.arch, meta)
        load_weights(model, run.path("observers", f"{name}.pt"))
        models.append((spec.arch, model.eval()))
    return models
