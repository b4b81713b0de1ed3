"""Stage "synthesis": a pool of SynthesisWorker actors, fed work units dynamically by the driver.

Observers, statistic sums and the candidate pool reach every actor as object-store references (put
once by the driver); each actor builds its observers once and writes each unit's shard itself,
atomically. Units whose shard already exists and is complete are skipped, so a re-run resumes.
"""
from __future__ import annotations

import os
import time
from collections import deque

import ray
import torch
from tqdm import tqdm

from edc_ray.algo.condense import build_observers, make_units, synthesize_class_unit
from edc_ray.algo.stats import ClassStatSums
from edc_ray.config import Config, from_dict, to_dict
from edc_ray.pipeline import metrics
from edc_ray.pipeline.common import DatasetMeta, model_from_payload, resolve_device, set_threads
from edc_ray.pipeline.statistics import pool_from_dict
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import ShardReadError, encode_png, iter_samples, write_shard


def unit_samples(unit: int, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """WebDataset samples of a unit: lossless PNG, class, and where the image came from."""
    samples = []
    for i, (image, label) in enumerate(zip(images, labels)):
        samples.append({"__key__": f"u{unit:05d}-{i:04d}", "png": encode_png(image.permute(1, 2, 0).numpy()),
                        "cls": int(label), "json": {"unit": unit, "index": i}})
    return samples


def unit_complete(url: str, expected: int) -> bool:
    """A unit's shard exists and holds all its images (a torn or foreign file does not count)."""
    try:
        return sum(1 for _ in iter_samples([url])) == expected
    except (FileNotFoundError, ShardReadError):
        return False


MAX_ACTOR_RESTARTS = 2
RESTART_GRACE_S = 2.0  # a dead actor's pause before it is offered work again (Ray restarts it meanwhile)


@ray.remote
class SynthesisWorker:
    """Synthesises whole units against observers shared through the object store.

    The shared references come with every call (they are only ids) and the observers are built on
    the first one, so a restarted actor rebuilds them from the same objects by itself.
    """

    def __init__(self, name: str, cfg: dict, meta: dict, run_dir: str):
        self.name = name
        self.cfg = from_dict(Config, cfg)
        self.meta = DatasetMeta(**meta)
        self.run = RunFolder(run_dir)
        set_threads(self.cfg.ray.actor_cpus)
        self.device = resolve_device(self.cfg.device, ray.get_gpu_ids())
        self.ref_ids: list[str] = []

    def prepare(self, shared: list) -> dict:
        """Build the observers from `shared` = [observer refs..., sums ref, pool ref] (once)."""
        if not self.ref_ids:
            observer_refs, sums_ref, pool_ref = shared[:-2], shared[-2], shared[-1]
            models = [model_from_payload(ray.get(ref), self.meta, self.device) for ref in observer_refs]
            sums = [ClassStatSums.from_state_dict(s) for s in ray.get(sums_ref)]
            self.observers = build_observers(models, sums, self.cfg.statistics, self.device,
                                             self.cfg.synthesis.match, self.cfg.synthesis.observers)
            self.pool = pool_from_dict(ray.get(pool_ref))
            self.ref_ids = [ref.hex() for ref in shared]
        return {"name": self.name, "pid": os.getpid(), "device": str(self.device), "ref_ids": self.ref_ids}

    def run_unit(self, unit: int, classes: list[int], shared: list) -> dict:
        """Synthesise one unit and commit its shard; returns a summary."""
        self.prepare(shared)
        start = time.perf_counter()

        def progress(t: int, terms: dict) -> None:
            if t % 20 == 0:
                metrics.synthesis_loss(self.name, terms["loss"])

        images, labels, history = synthesize_class_unit(unit, classes, self.observers, self.pool, self.cfg,
                                                        self.meta.mean, self.meta.std, self.device, progress)
        count = write_shard(self.run.unit_shard(unit), unit_samples(unit, images, labels))
        seconds = time.perf_counter() - start
        last = history[-1] if history else {}
        metrics.unit_finished(self.name, count, seconds, last.get("loss", 0.0))
        return {"unit": unit, "classes": classes, "images": count, "worker": self.name,
                "seconds": seconds, "last": last}


def synthesis_stage(cfg: Config, run: RunFolder, meta: DatasetMeta, shared: list) -> dict:
    """Run every unit not yet complete on the actor pool; write `distilled/_info.json`; summarise.

    Units go to whichever actor is free. A unit whose actor dies is queued again; the actor restarts
    (up to `MAX_ACTOR_RESTARTS` times) and keeps taking work, and the stage fails with a clear error
    only when every actor is gone for good.
    """
    units = make_units(meta.num_classes, cfg.synthesis.classes_per_unit)
    ipc = cfg.synthesis.ipc
    todo = deque(u for u, classes in enumerate(units)
                 if not unit_complete(run.unit_shard(u), ipc * len(classes)))
    results: list[dict] = []
    workers: list[dict] = []
    requeued: list[int] = []
    if todo:
        actors = [SynthesisWorker.options(name=f"SynthesisWorker-{i}", num_cpus=cfg.ray.actor_cpus,
                                          num_gpus=cfg.ray.actor_gpus, max_restarts=MAX_ACTOR_RESTARTS)
                  .remote(f"SynthesisWorker-{i}", to_dict(cfg), meta.__dict__, run.root)
                  for i in range(min(cfg.ray.synthesis_actors, len(todo)))]
        try:
            workers = ray.get([a.prepare.remote(shared) for a in actors])
            results, requeued = _dispatch(actors, units, todo, shared)
        finally:  # named actors would outlive a failed stage and block a re-run's names
            for actor in actors:
                ray.kill(actor)
    run.write_json({"ipc": ipc, "num_classes": meta.num_classes, "image_size": meta.image_size,
                    "channels": meta.channels, "mean": list(meta.mean), "std": list(meta.std),
                    "units": [{"unit": u, "classes": c, "shard": os.path.basename(run.unit_shard(u)),
                               "count": ipc * len(c)} for u, c in enumerate(units)]},
                   "distilled", "_info.json")
    return {"units_run": results, "units_total": len(units), "workers": workers, "requeued": requeued}


def _dispatch(actors: list, units: list[list[int]], todo: deque, shared: list
              ) -> tuple[list[dict], list[int]]:
    """Hand queued units to free actors until all are done; returns (summaries, units queued again).

    A unit whose actor died goes back to the queue and to the next free actor; the dead actor rests
    for `RESTART_GRACE_S` while Ray restarts it and counts a death (calls refused while it is
    restarting do not count). After `MAX_ACTOR_RESTARTS` deaths it takes no more work.
    """
    in_flight: dict = {}
    free = deque(actors)
    resting: dict = {}  # actor -> time it may take work again
    deaths = {id(a): 0 for a in actors}
    results: list[dict] = []
    requeued: list[int] = []
    with tqdm(total=len(todo), desc="synthesis units", unit="unit") as bar:
        while todo or in_flight:
            now = time.monotonic()
            for actor in [a for a, t in resting.items() if t <= now]:
                del resting[actor]
                free.append(actor)
            while todo and free:
                actor, unit = free.popleft(), todo.popleft()
                in_flight[actor.run_unit.remote(unit, units[unit], shared)] = (actor, unit)
            metrics.units_progress(len(results), len(todo), len(in_flight))
            if not in_flight:
                if not resting:
                    raise RuntimeError(f"every synthesis actor died; units {sorted(todo)} were not "
                                       "synthesised. Re-run the job: finished units are kept and skipped.")
                time.sleep(0.2)
                continue
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            if not done:
                continue
            actor, unit = in_flight.pop(done[0])
            try:
                results.append(ray.get(done[0]))
                free.append(actor)
                bar.update(1)
            except ray.exceptions.RayActorError as err:
                todo.append(unit)
                requeued.append(unit)
                print(f"[synthesis] unit {unit} lost with its actor ({type(err).__name__}); queued again",
                      flush=True)
                if not isinstance(err, ray.exceptions.ActorUnavailableError):
                    deaths[id(actor)] += 1
                if deaths[id(actor)] <= MAX_ACTOR_RESTARTS:
                    resting[actor] = time.monotonic() + RESTART_GRACE_S
    metrics.units_progress(len(results), 0, 0)
    return results, requeued
