"""Stage "synthesis": a pool of SynthesisWorker actors, fed work units dynamically by the driver.

Observers reach every actor as object-store references (put once by the driver); each actor builds
them once, then reads from the run folder only the candidates and statistic targets of its current
unit's classes, and writes the unit's shard itself, atomically. Units whose shard already exists and
is complete are skipped, so a re-run resumes. Units go only to actors that have started: an actor the
cluster cannot place never holds one, and the stage goes on with those that did start.

The same stage writes the random real baseline (`init.mode: random`, no optimisation) into its own
folder: a baseline is just another set of units.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import ray
import torch
from torch import nn
from tqdm import tqdm

from edc_ray.algo.candidates import Candidates
from edc_ray.algo.condense import build_observers, make_units, synthesize_class_unit
from edc_ray.algo.stats import ClassStatSums
from edc_ray.config import Config
from edc_ray.pipeline import metrics
from edc_ray.pipeline.common import DatasetMeta, ObserverSet, PeakMemory, load_models, resolve_device, set_threads
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import ShardReadError, count_samples, encode_png, write_shard


def unit_samples(unit: int, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """WebDataset samples of a unit: lossless PNG, class, and where the image came from."""
    samples = []
    for i, (image, label) in enumerate(zip(images, labels)):
        samples.append({"__key__": f"u{unit:05d}-{i:04d}", "png": encode_png(image.permute(1, 2, 0).numpy()),
                        "cls": int(label), "json": {"unit": unit, "index": i}})
    return samples


def unit_complete(url: str, expected: int) -> bool:
    """A unit's shard exists and holds all its images (a torn or foreign file does not count); no decoding."""
    try:
        return count_samples(url) == expected
    except (FileNotFoundError, ShardReadError):
        return False


def random_baseline_config(cfg: Config) -> Config:
    """The config of the random real subset at `cfg`'s IPC: the lowest-priority candidates, unchanged."""
    return replace(cfg, method="random", init=replace(cfg.init, mode="random"),
                   synthesis=replace(cfg.synthesis, iterations=0))


def baseline_folder(cfg: Config) -> str:
    """The run-folder subfolder of the random baseline at `cfg`'s IPC."""
    return f"baseline/random-ipc{cfg.synthesis.ipc}"


@dataclass(frozen=True)
class SynthesisResult:
    """A synthesised set in the run folder: its folder, units and counts, and what this run did."""

    folder: str
    urls: tuple[str, ...]
    units_total: int
    images: int
    units_run: tuple[dict, ...] = ()
    workers: tuple[dict, ...] = ()
    requeued: tuple[int, ...] = field(default_factory=tuple)


MAX_ACTOR_RESTARTS = 2
RESTART_GRACE_S = 2.0  # a dead actor's pause before it is offered work again (Ray restarts it meanwhile)


ModelLoader = Callable[[], tuple[list[nn.Module], int]]  # () -> (the synthesis observers' models, bytes pulled)


class UnitWorker:
    """Synthesises whole units against the observers `names` (those `synthesis.observers` selects).

    The Ray-free body of `SynthesisWorker`, also run by the single-process probe. The models come from
    `load` once (from the object store in an actor), the global statistic totals are read once, and
    each unit then reads only its own classes' candidates and statistics from the run folder.
    """

    def __init__(self, name: str, cfg: Config, meta: DatasetMeta, run: RunFolder, names: Sequence[str],
                 load: ModelLoader, device: torch.device):
        self.name, self.cfg, self.meta, self.run, self.device = name, cfg, meta, run, device
        self.names, self.load = list(names), load
        self.optimise = cfg.synthesis.iterations > 0
        self.models: list | None = None
        self.totals: list | None = None
        self.pulled_mib = 0.0

    def _setup(self) -> None:
        if self.models is not None:
            return
        needs_models = self.optimise or self.cfg.init.mode == "mosaic"
        models, pulled = self.load() if needs_models else ([], 0)
        self.models, self.pulled_mib = models, pulled / 2**20
        if self.optimise:
            totals = self.run.global_statistics()
            self.totals = [totals[name] for name in self.names]

    def _unit_observers(self, classes: list[int]) -> list:
        if not self.optimise:
            return []
        per_class = [self.run.class_statistics(c) for c in classes]
        sums = [ClassStatSums.concat([p[name] for p in per_class]) for name in self.names]
        return build_observers(self.models, self.totals, sums, classes, self.cfg.statistics, self.device,
                               self.cfg.synthesis.match)

    def synthesize(self, unit: int, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """One unit's (uint8 images, labels, loss history), from its classes' files only."""
        self._setup()
        cands = Candidates.concat([self.run.class_candidates(c) for c in classes])

        def progress(t: int, terms: dict) -> None:
            metrics.synthesis_loss(self.name, terms["loss"])

        return synthesize_class_unit(unit, classes, self.models, self._unit_observers(classes), cands, self.cfg,
                                     self.meta.mean, self.meta.std, self.device, progress)

    def run_unit(self, unit: int, classes: list[int], folder: str) -> dict:
        """Synthesise one unit and commit its shard into `folder`; returns a summary."""
        start = time.perf_counter()
        with PeakMemory() as memory:
            images, labels, history = self.synthesize(unit, classes)
            count = write_shard(self.run.unit_shard(unit, folder), unit_samples(unit, images, labels))
        seconds = time.perf_counter() - start
        last = history[-1] if history else {}
        metrics.unit_finished(self.name, count, seconds, last.get("loss", 0.0))
        return {"unit": unit, "classes": classes, "images": count, "worker": self.name, "seconds": seconds,
                "last": last, "peak_mib": memory.peak_mib, "pulled_mib": self.pulled_mib}


@ray.remote
class SynthesisWorker:
    """A named actor around a `UnitWorker`."""

    def __init__(self, name: str, cfg: Config, meta: DatasetMeta, run: RunFolder, observers: ObserverSet,
                 folder: str):
        set_threads(cfg.ray.actor_cpus)
        device = resolve_device(cfg.device, ray.get_gpu_ids())
        chosen = observers.subset(cfg.synthesis.observers)
        self.folder = folder
        self.worker = UnitWorker(name, cfg, meta, run, chosen.names, lambda: load_models(chosen, meta, device),
                                 device)

    def ready(self) -> dict:
        """Who and where this actor is (answered once it is placed and constructed)."""
        return {"name": self.worker.name, "pid": os.getpid(), "device": str(self.worker.device),
                "node": ray.get_runtime_context().get_node_id()}

    def run_unit(self, unit: int, classes: list[int]) -> dict:
        """Synthesise one unit and commit its shard."""
        return self.worker.run_unit(unit, classes, self.folder)


def synthesis_stage(cfg: Config, run: RunFolder, meta: DatasetMeta, observers: ObserverSet,
                    folder: str = "distilled") -> SynthesisResult:
    """Run every unit of `folder` not yet complete on the actor pool; write `<folder>/_info.json`.

    Units go to whichever started actor is free. A unit whose actor dies is queued again; the actor
    restarts (up to `MAX_ACTOR_RESTARTS` times) and keeps taking work, and the stage fails with a clear
    error only when every actor is gone for good.
    """
    units = make_units(meta.num_classes, cfg.synthesis.classes_per_unit)
    ipc = cfg.synthesis.ipc
    todo = deque(u for u, classes in enumerate(units)
                 if not unit_complete(run.unit_shard(u, folder), ipc * len(classes)))
    results: list[dict] = []
    workers: list[dict] = []
    requeued: list[int] = []
    if todo:
        prefix = "SynthesisWorker" if folder == "distilled" else "BaselineWorker"
        actors = [SynthesisWorker.options(name=f"{prefix}-{i}", num_cpus=cfg.ray.actor_cpus,
                                          num_gpus=cfg.ray.actor_gpus, max_restarts=MAX_ACTOR_RESTARTS)
                  .remote(f"{prefix}-{i}", cfg, meta, run, observers, folder)
                  for i in range(min(cfg.ray.synthesis_actors, len(todo)))]
        try:
            results, requeued, workers = _dispatch(actors, units, todo)
        finally:  # named actors would outlive a failed stage and block a re-run's names
            for actor in actors:
                ray.kill(actor)
    run.write_json({"ipc": ipc, "num_classes": meta.num_classes, "image_size": meta.image_size,
                    "channels": meta.channels, "mean": list(meta.mean), "std": list(meta.std),
                    "units": [{"unit": u, "classes": c, "shard": os.path.basename(run.unit_shard(u, folder)),
                               "count": ipc * len(c)} for u, c in enumerate(units)]},
                   folder, "_info.json")
    return SynthesisResult(folder, tuple(run.unit_shard(u, folder) for u in range(len(units))), len(units),
                           ipc * meta.num_classes, tuple(results), tuple(workers), tuple(requeued))


def _dispatch(actors: list, units: list[list[int]], todo: deque) -> tuple[list[dict], list[int], list[dict]]:
    """Hand queued units to free actors until all are done; returns (summaries, units queued again, actors).

    An actor is free once its `ready` call has answered (it was placed and built): units never wait on
    an actor the cluster cannot place. A unit whose actor died goes back to the queue and to the next
    free actor; the dead actor rests for `RESTART_GRACE_S` while Ray restarts it and counts a death
    (calls refused while it is restarting do not count). After `MAX_ACTOR_RESTARTS` deaths it takes no
    more work.
    """
    starting = {actor.ready.remote(): actor for actor in actors}
    in_flight: dict = {}
    free: deque = deque()
    resting: dict = {}  # actor -> time it may take work again
    deaths = {id(a): 0 for a in actors}
    results: list[dict] = []
    requeued: list[int] = []
    workers: list[dict] = []
    with tqdm(total=len(todo), desc="synthesis units", unit="unit") as bar:
        while todo or in_flight:
            now = time.monotonic()
            for actor in [a for a, t in resting.items() if t <= now]:
                del resting[actor]
                free.append(actor)
            while todo and free:
                actor, unit = free.popleft(), todo.popleft()
                in_flight[actor.run_unit.remote(unit, units[unit])] = (actor, unit)
            metrics.units_progress(len(results), len(todo), len(in_flight))
            if not in_flight and not starting and not resting:
                raise RuntimeError(f"every synthesis actor died; units {sorted(todo)} were not "
                                   "synthesised. Re-run the job: finished units are kept and skipped.")
            waiting = list(in_flight) + list(starting)
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0) if waiting else ([], [])
            if not done:
                if not waiting:
                    time.sleep(0.2)
                continue
            ref = done[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    workers.append(ray.get(ref))
                    free.append(actor)
                except ray.exceptions.RayActorError as err:
                    print(f"[synthesis] an actor failed to start ({type(err).__name__}); going on without it",
                          flush=True)
                continue
            actor, unit = in_flight.pop(ref)
            try:
                results.append(ray.get(ref))
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
    return results, requeued, workers
