"""Stage "evaluation": Ray Train trains students on a distilled (or baseline) set and validates them.

One Ray Train run per (set, student, seed), as many at once as the cluster has room for. The
per-worker function is the core's `StudentTrainer` on this rank's share of every global batch (DDP),
with the observer ensemble as online soft-label teacher (read from the object store), the distilled set
on the device from the start, a report every ~50 steps, a checkpoint at every validation, and
validation on this rank's share of the real test split, summed across ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edc_ray.algo.student import StudentRun, StudentTrainer, to_device
from edc_ray.config import Config, EvaluationConfig, from_dict, settings_key, to_dict
from edc_ray.errors import DataError
from edc_ray.pipeline import metrics
from edc_ray.pipeline.common import DatasetMeta, ObserverSet, build_model, model_from_payload, set_threads
from edc_ray.pipeline.console import report_progress
from edc_ray.pipeline.distributed import (TRAIN_MAX_FAILURES, fit_torch_trainer, latest_state, rank_and_world,
                                          report_checkpoint)
from edc_ray.pipeline.observers import validation_accuracy
from edc_ray.pipeline.streaming import split_shards
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import SampleSpec, iter_samples


def load_images(urls: list[str], spec: SampleSpec | None = None, expected: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of a few shards (a distilled set is small), each sample checked against
    `spec` and the total against `expected` (a shard lost or cut short names the set)."""
    samples = list(iter_samples(urls, spec=spec))
    if expected is not None and len(samples) != expected:
        raise DataError(f"the set of {len(urls)} shard(s) from {urls[0] if urls else '?'} holds {len(samples)} "
                        f"images, {expected} were written")
    return torch.stack([s[1] for s in samples]), torch.tensor([s[2] for s in samples])


REPORT_EVERY_STEPS = 50  # a Ray Train report is a barrier across workers (~0.06 s here): not every tiny epoch


def report_interval(steps_per_epoch: int) -> int:
    """Epochs between metric-only reports: about `REPORT_EVERY_STEPS` optimiser steps, at least one epoch.

    Depends only on the epoch length, so every rank reports at the same epochs (Ray Train requires it).
    """
    return max(1, math.ceil(REPORT_EVERY_STEPS / max(1, steps_per_epoch)))


def train_student_loop(config: dict) -> None:
    """Ray Train worker function: post-train one student for one seed on a distilled set (METHOD.md 1.6).

    The loop is the core's `StudentRun` on this rank's share of every batch; this adds only the reports
    (metrics every `report_interval` epochs, a checkpoint with the full training state at every
    validation, so a restarted run resumes at its last validated epoch) and the driver's progress bar.
    """
    import ray
    import ray.train
    import ray.train.torch

    rank, world = rank_and_world()
    set_threads(config["cpus"])
    device = ray.train.torch.get_device()
    ecfg = from_dict(EvaluationConfig, config["evaluation"])
    meta = DatasetMeta(**config["meta"])
    seed, label = config["seed"], config["label"]
    spec = SampleSpec(meta.channels, meta.image_size, meta.num_classes)
    images, labels = load_images(config["train_urls"], spec, config["images"])
    images = to_device(images, device)  # once: every batch is then cut and augmented on the device
    teachers = [model_from_payload(ray.get(ref), meta, device) for ref in config["teacher_refs"]]
    steps = math.ceil(len(images) / ecfg.batch_size)
    report_every = report_interval(steps)
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = ray.train.torch.prepare_model(build_model(config["student"], meta))
    student = StudentRun(StudentTrainer(model, teachers, ecfg, meta.mean, meta.std, steps, device), seed, rank, world)
    state = latest_state(rank)
    if state:
        student.load_state(state)

    def validate(ema: torch.nn.Module) -> float:
        return validation_accuracy(ema, config["val_shards"], meta, ecfg.val_batch_size, device)

    def report(row: dict) -> None:
        scores = {"seed": seed, **row}
        if rank == 0:
            if "top1" in row:
                metrics.evaluation_accuracy(label, seed, row["top1"])
            latest = f" top-1 {student.curve[-1][1]:.2f}%" if student.curve else ""  # the last validation's
            report_progress(f"{label}/{seed}", f"eval {label} seed {seed}", row["epoch"], ecfg.epochs,
                            f"loss {row['loss']:.4f}{latest}")
        if "top1" in row:
            report_checkpoint({**scores, "curve": student.curve}, student.state(), rank)
        elif row["epoch"] % report_every == 0:
            ray.train.report(scores)

    student.train(images, labels, validate, report)


@dataclass(frozen=True)
class EvalSet:
    """A set to evaluate: its label (distilled, random, ...), its shards and its image count."""

    label: str
    urls: tuple[str, ...]
    images: int


def run_name(label: str, student: str) -> str:
    """The name of a (set, student) evaluation in the run folder."""
    return f"{label}-{student.replace(':', '_')}"


# What one student run does not depend on: which students and seeds run, and the random baseline.
_RUN_FREE_KEYS = ("students", "seeds", "random_baseline")


def evaluation_key(evaluation: EvaluationConfig) -> str:
    """A short hash of the evaluation settings one student run depends on: its Ray Train storage and
    its summary carry it, so a checkpoint or result made under other settings is never reused."""
    settings = {k: v for k, v in to_dict(evaluation).items() if k not in _RUN_FREE_KEYS}
    return settings_key(settings)


def fit_seed(cfg: Config, run: RunFolder, meta: DatasetMeta, observers: ObserverSet, target: EvalSet,
             student: str, seed: int) -> dict:
    """One Ray Train run: `student` trained with `seed` on `target`; cached as eval/<name>-seed<k>.json.

    Ray Train's storage is eval/<name>-seed<k>-<evaluation key>/, so an interrupted run resumes only
    under the same evaluation settings; a cached summary is reused only if its key matches. A
    non-finite top-1 raises instead of being cached.
    """
    name, key = f"{run_name(target.label, student)}-seed{seed}", evaluation_key(cfg.evaluation)
    if run.exists("eval", f"{name}.json"):
        cached = run.read_json("eval", f"{name}.json")
        if cached.get("evaluation_key") == key:
            return cached
    config = {"evaluation": to_dict(cfg.evaluation), "meta": meta.__dict__, "train_urls": list(target.urls),
              "val_shards": split_shards(cfg.data, cfg.data.val_split), "seed": seed,
              "teacher_refs": list(observers.subset(cfg.evaluation.teachers).refs), "student": student,
              "cpus": cfg.ray.train_worker_cpus, "label": run_name(target.label, student), "images": target.images}
    result = fit_torch_trainer(train_student_loop, config, f"{name}-{key}", run.path("eval"),
                               cfg.ray.train_workers, cfg.ray.train_use_gpu, cfg.ray.train_worker_cpus,
                               max_failures=TRAIN_MAX_FAILURES, placement_timeout_s=cfg.ray.placement_timeout_s)
    summary = {"seed": seed, "final_top1": result.metrics["top1"], "best_top1": result.metrics["best_top1"],
               "final_loss": result.metrics["loss"], "curve": result.metrics["curve"], "evaluation_key": key}
    if not all(math.isfinite(float(summary[k])) for k in ("final_top1", "best_top1")):
        raise RuntimeError(f"evaluation {name} ended with top-1 {summary['final_top1']} (best "
                           f"{summary['best_top1']}): not a number, so nothing was cached; see Ray Train's "
                           f"logs under {run.path('eval', f'{name}-{key}')}")
    run.write_json(summary, "eval", f"{name}.json")
    return summary


def concurrent_runs(cfg: Config) -> int:
    """How many evaluation runs the cluster has room for at once (at least one)."""
    import ray

    resources = ray.cluster_resources()
    per_run_cpus = cfg.ray.train_workers * cfg.ray.train_worker_cpus
    room = [resources.get("CPU", 0.0) // per_run_cpus if per_run_cpus else math.inf]
    if cfg.ray.train_use_gpu:
        room.append(resources.get("GPU", 0.0) // cfg.ray.train_workers)
    return max(1, int(min(room)))


def _current_summary(run: RunFolder, name: str, evaluation: EvaluationConfig) -> dict | None:
    """The cached summary eval/<name>.json if it was made under these evaluation settings and seeds."""
    if not run.exists("eval", f"{name}.json"):
        return None
    summary = run.read_json("eval", f"{name}.json")
    current = summary.get("evaluation_key") == evaluation_key(evaluation) and \
        [r["seed"] for r in summary["per_seed"]] == list(evaluation.seeds)
    return summary if current else None


def evaluate_sets(cfg: Config, run: RunFolder, meta: DatasetMeta, observers: ObserverSet,
                  targets: list[EvalSet]) -> list[dict]:
    """Train and validate every student of `cfg` on every set, one Ray Train run per seed, as many runs at
    once as the cluster has room for; one summary per (student, set), cached in the run folder."""
    import ray

    fit = ray.remote(num_cpus=0)(fit_seed)
    stale = [(target, student) for student in cfg.evaluation.students for target in targets
             if _current_summary(run, run_name(target.label, student), cfg.evaluation) is None]
    jobs = [(target, student, seed) for target, student in stale for seed in cfg.evaluation.seeds]
    pending, limit = list(jobs), concurrent_runs(cfg)
    in_flight: list = []
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            in_flight.append(fit.remote(cfg, run, meta, observers, *pending.pop(0)))
        done, in_flight = ray.wait(in_flight, num_returns=1)
        ray.get(done)  # raises a run's error here
    summaries = []
    for student in cfg.evaluation.students:
        for target in targets:
            name = run_name(target.label, student)
            if (target, student) in stale:
                per_seed = [run.read_json("eval", f"{name}-seed{seed}.json") for seed in cfg.evaluation.seeds]
                finals = torch.tensor([r["final_top1"] for r in per_seed], dtype=torch.float64)
                bests = torch.tensor([r["best_top1"] for r in per_seed], dtype=torch.float64)
                run.write_json({"set": target.label, "student": student, "final_top1": float(finals.mean()),
                                "final_top1_std": float(finals.std(correction=0)), "best_top1": float(bests.mean()),
                                "per_seed": per_seed, "epochs": cfg.evaluation.epochs, "images": target.images,
                                "evaluation_key": evaluation_key(cfg.evaluation)},
                               "eval", f"{name}.json")
            summaries.append(run.read_json("eval", f"{name}.json"))
    return summaries
