"""Stage "evaluation": Ray Train trains students on a distilled (or baseline) set and validates them.

The per-worker function is the core's `StudentTrainer` on this rank's share of every global batch
(DDP), with the observer ensemble as online soft-label teacher (read from the object store), a report
every epoch, a checkpoint at every validation, and validation on this rank's share of the real test
split, summed across ranks.
"""
from __future__ import annotations

import math
import os
import tempfile

import torch

from edc_ray.algo.condense import CandidatePool, bottom_k
from edc_ray.algo.student import StudentTrainer, epoch_batches
from edc_ray.config import Config, EvaluationConfig, from_dict, to_dict
from edc_ray.pipeline import metrics
from edc_ray.pipeline.common import DatasetMeta, build_model, model_from_payload, set_threads
from edc_ray.pipeline.distributed import fit_torch_trainer, rank_and_world, rank_share
from edc_ray.pipeline.observers import validation_accuracy
from edc_ray.storage.run_folder import RunFolder, load_torch_bytes
from edc_ray.storage.shards import encode_png, iter_samples, write_shard


def load_images(urls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of a few shards (a distilled set is small)."""
    samples = list(iter_samples(urls))
    return torch.stack([s[1] for s in samples]), torch.tensor([s[2] for s in samples])


def _checkpoint_state(trainer: StudentTrainer, seed_index: int, epoch: int, best: float,
                      generators: list, finished: list[dict]) -> dict:
    model = getattr(trainer.model, "module", trainer.model)
    return {"seed_index": seed_index, "epoch": epoch, "best": best, "finished": finished,
            "model": model.state_dict(), "ema": trainer.ema.module.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "ema_updates": trainer.ema.updates, "generators": [g.get_state() for g in generators],
            "rng": torch.get_rng_state()}


def _restore(trainer: StudentTrainer, state: dict, generators: list) -> None:
    getattr(trainer.model, "module", trainer.model).load_state_dict(state["model"])
    trainer.ema.module.load_state_dict(state["ema"])
    trainer.ema.updates = state["ema_updates"]
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    torch.set_rng_state(state["rng"])


def _latest_state(rank: int) -> dict | None:
    """This rank's state from the last checkpoint, when Ray Train restarted the run after a failure."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, f"rank{rank}.pt"), "rb") as f:
            return load_torch_bytes(f.read(), "checkpoint")


REPORT_EVERY_STEPS = 50  # a Ray Train report is a barrier across workers (~0.06 s here): not every tiny epoch


def report_interval(steps_per_epoch: int) -> int:
    """Epochs between metric-only reports: about `REPORT_EVERY_STEPS` optimiser steps, at least one epoch.

    Depends only on the epoch length, so every rank reports at the same epochs (Ray Train requires it).
    """
    return max(1, math.ceil(REPORT_EVERY_STEPS / max(1, steps_per_epoch)))


def train_student_loop(config: dict) -> None:
    """Ray Train worker function: post-train one student per seed on a distilled set (METHOD.md 1.6).

    Seeds run one after another in the same worker group; metrics are reported every `report_interval`
    epochs, and every validation carries a checkpoint (all seeds finished so far + the current one's
    full state), so a restarted run resumes at the last validated epoch of the seed it was in.
    """
    import ray
    import ray.train
    import ray.train.torch

    rank, world = rank_and_world()
    set_threads(config["cpus"])
    device = ray.train.torch.get_device()
    ecfg = from_dict(EvaluationConfig, config["evaluation"])
    meta = DatasetMeta(**config["meta"])
    images, labels = load_images(config["train_urls"])
    teachers = [model_from_payload(ray.get(ref), meta, device) for ref in config["teacher_refs"]]
    steps = math.ceil(len(images) / ecfg.batch_size)
    report_every = report_interval(steps)
    state = _latest_state(rank)
    finished: list[dict] = state["finished"] if state else []
    for seed_index, seed in enumerate(ecfg.seeds):
        if seed_index < len(finished):
            continue
        torch.manual_seed(seed)  # identical initial weights on every rank
        model = ray.train.torch.prepare_model(build_model(config["student"], meta))
        trainer = StudentTrainer(model, teachers, ecfg, meta.mean, meta.std, steps, device)
        order = torch.Generator().manual_seed(seed)  # the global batch order, shared by all ranks
        augment = torch.Generator().manual_seed(seed * 1000 + 1 + rank)
        torch.manual_seed(seed * 1000 + 1 + rank)  # RandAugment draws from the global RNG
        start, best = 0, float("-inf")
        if state and state["seed_index"] == seed_index:
            _restore(trainer, state, [order, augment])
            start, best = state["epoch"], state["best"]
        for epoch in range(start, ecfg.epochs):
            losses = [trainer.step(images[rank_share(idx, rank, world)],
                                   labels[rank_share(idx, rank, world)], augment)
                      for idx in epoch_batches(len(images), ecfg.batch_size, order)
                      if len(idx) >= world]  # a last batch smaller than the world would leave a rank empty
            scores = {"seed": seed, "epoch": epoch + 1, "loss": sum(losses) / len(losses)}
            last = epoch + 1 == ecfg.epochs
            if not (last or (ecfg.eval_every and (epoch + 1) % ecfg.eval_every == 0)):
                if (epoch + 1) % report_every == 0:
                    ray.train.report(scores)
                continue
            top1 = validation_accuracy(trainer.ema.module, config["data_root"], config["val_split"], meta,
                                       ecfg.val_batch_size, device)
            best = max(best, top1)
            scores.update(top1=top1, best_top1=best)
            if last:
                finished = finished + [{"seed": seed, "final_top1": top1, "best_top1": best}]
            scores["finished"] = finished
            if rank == 0:
                metrics.evaluation_accuracy(config["label"], seed, top1)
                print(f"[eval {config['label']}] seed {seed} epoch {epoch + 1}/{ecfg.epochs} "
                      f"loss {scores['loss']:.4f} top-1 {top1:.2f}% (best {best:.2f}%)", flush=True)
            with tempfile.TemporaryDirectory() as folder:
                torch.save(_checkpoint_state(trainer, seed_index, epoch + 1, best, [order, augment], finished),
                           os.path.join(folder, f"rank{rank}.pt"))
                ray.train.report(scores, checkpoint=ray.train.Checkpoint.from_directory(folder))
        state = None


def random_subset_shard(run: RunFolder, pool: CandidatePool, ipc: int) -> str:
    """Write IPC random real images per class (the lowest sampling priorities: a uniform sample)."""
    subset = bottom_k(pool, ipc)
    samples = [{"__key__": f"random-{i:05d}", "png": encode_png(image.permute(1, 2, 0).numpy()),
                "cls": int(label)} for i, (image, label) in enumerate(zip(subset.images, subset.labels))]
    url = run.path("baseline", f"random-ipc{ipc}.tar")
    write_shard(url, samples)
    return url


def evaluate_set(cfg: Config, run: RunFolder, meta: DatasetMeta, observer_refs: list, label: str,
                 urls: list[str], student: str) -> dict:
    """Train and validate `student` on the shards at `urls` with Ray Train; cached in the run folder."""
    name = f"{label}-{student.replace(':', '_')}"
    if run.exists("eval", f"{name}.json"):
        return run.read_json("eval", f"{name}.json")
    teachers = cfg.evaluation.teachers
    teacher_refs = observer_refs if teachers is None else [observer_refs[i] for i in teachers]
    config = {"evaluation": to_dict(cfg.evaluation), "meta": meta.__dict__, "train_urls": urls,
              "data_root": cfg.data.root, "val_split": cfg.data.val_split, "teacher_refs": teacher_refs,
              "student": student, "cpus": cfg.ray.train_worker_cpus,
              "label": name}
    result = fit_torch_trainer(train_student_loop, config, name, run.path("eval"), cfg.ray.train_workers,
                               cfg.ray.train_use_gpu, cfg.ray.train_worker_cpus, max_failures=2)
    per_seed = result.metrics["finished"]
    finals = torch.tensor([r["final_top1"] for r in per_seed], dtype=torch.float64)
    bests = torch.tensor([r["best_top1"] for r in per_seed], dtype=torch.float64)
    summary = {"set": label, "student": student, "final_top1": float(finals.mean()),
               "final_top1_std": float(finals.std(correction=0)), "best_top1": float(bests.mean()),
               "per_seed": per_seed, "epochs": cfg.evaluation.epochs, "images": len(list(iter_samples(urls)))}
    run.write_json(summary, "eval", f"{name}.json")
    return summary
