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
from edc_ray.errors import ClusterError
from edc_ray.pipeline import metrics
from edc_ray.pipeline.cluster import describe_cluster, wait_for_room
from edc_ray.pipeline.common import (PREVIEW_CLASSES, DatasetMeta, ObserverSet, PeakMemory, load_models, resolve_device,
                                    set_threads)
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.images import encode_png
from edc_ray.storage.shards import ShardReadError, count_samples, write_shard


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
RESTART_GRACE_S = 2.0  # a failed actor's pause before it is probed again (Ray restarts it meanwhile)
WAITING_NOTICE_S = 10.0  # no usable actor for this long: say what the stage waits for


ModelLoader = Callable[[list[int]], tuple[list[nn.Module], int]]  # observer indices -> (their models, bytes pulled)


class UnitWorker:
    """Synthesises whole units: optimises against the observers `synthesis.observers` selects and
    scores mosaic crops with those of `init.score_observers`.

    The Ray-free body of `SynthesisWorker`, also run by the single-process probe. `names` are every
    observer's; the models a unit needs come from `load` once (from the object store in an actor), the
    global statistic totals are read once, and each unit then reads only its own classes' candidates
    and statistics from the run folder.
    """

    def __init__(self, name: str, cfg: Config, meta: DatasetMeta, run: RunFolder, names: Sequence[str],
                 load: ModelLoader, device: torch.device):
        self.name, self.cfg, self.meta, self.run, self.device = name, cfg, meta, run, device
        self.load = load
        every = list(range(len(names)))
        self.optimised = (cfg.synthesis.observers or every) if cfg.synthesis.iterations > 0 else []
        self.scoring = (cfg.init.score_observers or every) if cfg.init.mode == "mosaic" else []
        self.names = [names[k] for k in self.optimised]
        self.models: list | None = None
        self.scorers: list = []
        self.totals: list | None = None
        self.pulled_mib = 0.0

    def _setup(self) -> None:
        if self.models is not None:
            return
        needed = list(dict.fromkeys(self.optimised + self.scoring))
        loaded, pulled = self.load(needed) if needed else ([], 0)
        by_index = dict(zip(needed, loaded))
        self.models = [by_index[k] for k in self.optimised]
        self.scorers = [by_index[k] for k in self.scoring]
        self.pulled_mib = pulled / 2**20
        if self.optimised:
            totals = self.run.global_statistics()
            self.totals = [totals[name] for name in self.names]

    def _unit_observers(self, classes: list[int]) -> list:
        if not self.optimised:
            return []
        per_class = [self.run.class_statistics(c) for c in classes]
        sums = [ClassStatSums.concat([p[name] for p in per_class]) for name in self.names]
        return build_observers(self.models, self.totals, sums, classes, self.cfg.statistics, self.device,
                               self.cfg.synthesis.match)

    def synthesize(self, unit: int, classes: list[int], on_init: Callable[[torch.Tensor], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """One unit's (uint8 images, labels, loss history), from its classes' files only; `on_init` gets
        the initial images."""
        self._setup()
        cands = Candidates.concat([self.run.class_candidates(c, self.meta.spec().decode) for c in classes])

        def progress(t: int, terms: dict) -> None:
            metrics.synthesis_loss(self.name, terms["loss"])

        return synthesize_class_unit(unit, classes, self.scorers, self._unit_observers(classes), cands, self.cfg,
                                     self.meta.mean, self.meta.std, self.device, progress, on_init)

    def keeps_initial(self, classes: list[int]) -> bool:
        """Whether the unit's real initial images are kept (in `initial/`) for the report: units of the
        classes it shows, when synthesis starts from real images and changes them."""
        return (self.cfg.synthesis.iterations > 0 and self.cfg.init.mode in ("real", "mosaic")
                and min(classes) < PREVIEW_CLASSES)

    def run_unit(self, unit: int, classes: list[int], folder: str) -> dict:
        """Synthesise one unit and commit its shard into `folder` (its initial images first, for the
        report's units); returns a summary."""
        start = time.perf_counter()
        with PeakMemory() as memory:
            initial: list[torch.Tensor] = []
            images, labels, history = self.synthesize(unit, classes, initial.append)
            if folder == "distilled" and self.keeps_initial(classes):
                write_shard(self.run.unit_shard(unit, "initial"), unit_samples(unit, initial[0], labels))
            count = write_shard(self.run.unit_shard(unit, folder), unit_samples(unit, images, labels))
        seconds = time.perf_counter() - start
        last = history[-1] if history else {}
        metrics.unit_finished(self.name, count, seconds, last.get("loss", 0.0))
        return {"unit": unit, "classes": classes, "images": count, "worker": self.name, "seconds": seconds,
                "last": last, "peak_mib": memory.peak_mib, "pulled_mib": self.pulled_mib}


@ray.remote
class SynthesisWorker:
    """A named actor around a `UnitWorker`.

    The observers' refs come with each unit, not with the constructor: a restarted actor is built again
    from its constructor's arguments, and Ray warns (rightly) about refs among those.
    """

    def __init__(self, name: str, cfg: Config, meta: DatasetMeta, run: RunFolder, names: tuple[str, ...],
                 folder: str):
        set_threads(cfg.ray.actor_cpus)
        device = resolve_device(cfg.device, ray.get_gpu_ids())
        self.folder = folder
        self.observers: ObserverSet | None = None
        self.worker = UnitWorker(name, cfg, meta, run, names,
                                 lambda indices: load_models(self.observers.subset(indices), meta, device), device)

    def ready(self) -> dict:
        """Who and where this actor is (answered once it is placed and constructed)."""
        return {"name": self.worker.name, "pid": os.getpid(), "device": str(self.worker.device),
                "node": ray.get_runtime_context().get_node_id()}

    def run_unit(self, unit: int, classes: list[int], observers: ObserverSet) -> dict:
        """Synthesise one unit against `observers` (loaded at the first unit) and commit its shard."""
        self.observers = observers
        return self.worker.run_unit(unit, classes, self.folder)


def synthesis_stage(cfg: Config, run: RunFolder, meta: DatasetMeta, observers: ObserverSet,
                    folder: str = "distilled") -> SynthesisResult:
    """Run every unit of `folder` not yet complete on the actor pool; write `<folder>/_info.json`.

    It first waits (up to `ray.placement_timeout_s`) until the cluster could place one actor. Units go
    to whichever started actor is free. A unit whose actor dies is queued again; the actor restarts (up
    to `MAX_ACTOR_RESTARTS` times) and keeps taking work, and the stage fails with a clear error when
    every actor is gone for good or none has been usable for `ray.placement_timeout_s`.
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
        bundle = {k: v for k, v in (("CPU", cfg.ray.actor_cpus), ("GPU", cfg.ray.actor_gpus)) if v}
        wait_for_room("synthesis actors", bundle, 1, cfg.ray.placement_timeout_s)
        actors = [SynthesisWorker.options(name=f"{prefix}-{i}", num_cpus=cfg.ray.actor_cpus,
                                          num_gpus=cfg.ray.actor_gpus, max_restarts=MAX_ACTOR_RESTARTS)
                  .remote(f"{prefix}-{i}", cfg, meta, run, observers.names, folder)
                  for i in range(min(cfg.ray.synthesis_actors, len(todo)))]
        try:
            results, requeued, workers = _dispatch(actors, units, observers, todo, cfg.ray.placement_timeout_s,
                                                   bundle)
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


@dataclass
class _Pool:
    """The dispatcher's view of the actors: which are free, probed (starting or restarting), resting
    before a probe, or gone, and since when each has been unusable."""

    actors: list
    free: deque = field(default_factory=deque)
    probing: dict = field(default_factory=dict)  # ready() ref -> actor
    resting: dict = field(default_factory=dict)  # actor -> when to probe it again
    down_since: dict = field(default_factory=dict)  # id(actor) -> when it was last seen unusable
    deaths: dict = field(default_factory=dict)  # id(actor) -> deaths counted
    gone: set = field(default_factory=set)  # id(actor) of actors that died too often

    def __post_init__(self):
        now = time.monotonic()
        for actor in self.actors:
            self.probe(actor)
            self.down_since[id(actor)] = now

    def probe(self, actor) -> None:
        self.probing[actor.ready.remote()] = actor

    def up(self, actor) -> None:
        self.down_since.pop(id(actor), None)
        self.free.append(actor)

    def failed(self, actor, err: Exception) -> None:
        """`actor` failed a call: rest, then probe it again, unless it died more than Ray restarts it."""
        self.down_since.setdefault(id(actor), time.monotonic())
        if not isinstance(err, ray.exceptions.ActorUnavailableError):  # unavailable: restarting or unreachable
            self.deaths[id(actor)] = self.deaths.get(id(actor), 0) + 1
        if self.deaths.get(id(actor), 0) > MAX_ACTOR_RESTARTS:
            self.gone.add(id(actor))
            self.down_since.pop(id(actor))
        else:
            self.resting[actor] = time.monotonic() + RESTART_GRACE_S

    def wake(self) -> None:
        now = time.monotonic()
        for actor in [a for a, t in self.resting.items() if t <= now]:
            del self.resting[actor]
            self.probe(actor)

    def stalled_for(self) -> float:
        """Seconds since the last actor became unusable, when none is usable now (else 0)."""
        if self.free or len(self.down_since) + len(self.gone) < len(self.actors):
            return 0.0
        return time.monotonic() - max(self.down_since.values(), default=time.monotonic())


def _dispatch(actors: list, units: list[list[int]], observers: ObserverSet, todo: deque, timeout_s: float,
              bundle: dict) -> tuple[list[dict], list[int], list[dict]]:
    """Hand queued units (with the `observers` to load) to free actors until all are done; returns
    (summaries, units queued again, actors).

    An actor is free once its `ready` call has answered (it was placed and built): units never wait on
    an actor the cluster cannot place, and the stage goes on with those that did start. A unit whose
    actor failed goes back to the queue (one line says so) and to the next free actor; the failed actor
    rests for `RESTART_GRACE_S`, then is probed with `ready` again, so calls refused while Ray restarts
    it are never counted or logged. After `MAX_ACTOR_RESTARTS` deaths it is gone. The stage fails with
    a clear error when every actor is gone, or when none has been usable for `timeout_s` (not placed,
    or lost with its node and not placed again).
    """
    pool = _Pool(actors)
    in_flight: dict = {}
    results: list[dict] = []
    requeued: list[int] = []
    workers: dict[str, dict] = {}
    told_waiting = False
    with tqdm(total=len(todo), desc="synthesis units", unit="unit") as bar:
        while todo or in_flight:
            pool.wake()
            while todo and pool.free:
                actor, unit = pool.free.popleft(), todo.popleft()
                in_flight[actor.run_unit.remote(unit, units[unit], observers)] = (actor, unit)
            metrics.units_progress(len(results), len(todo), len(in_flight))
            if not in_flight:
                _check_progress(pool, todo, timeout_s, bundle)
                if not told_waiting and pool.stalled_for() > WAITING_NOTICE_S:
                    told_waiting = True
                    tqdm.write(f"[synthesis] waiting for an actor ({bundle} each) to be placed or to come back, "
                               f"up to ray.placement_timeout_s={timeout_s:g} s; {len(todo)} units queued")
            waiting = list(in_flight) + list(pool.probing)
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0) if waiting else ([], [])
            if not done:
                if not waiting:
                    time.sleep(0.2)
                continue
            ref = done[0]
            if ref in pool.probing:
                actor = pool.probing.pop(ref)
                try:
                    info = ray.get(ref)
                    workers[info["name"]] = info
                    pool.up(actor)
                except ray.exceptions.RayActorError as err:
                    pool.failed(actor, err)
                continue
            actor, unit = in_flight.pop(ref)
            try:
                results.append(ray.get(ref))
                pool.free.append(actor)
                if "loss" in results[-1]["last"]:  # (none for methods that do not optimise)
                    bar.set_postfix_str(f"last loss {results[-1]['last']['loss']:.4f}", refresh=False)
                bar.update(1)
            except ray.exceptions.RayActorError as err:
                todo.append(unit)
                requeued.append(unit)
                tqdm.write(f"[synthesis] unit {unit} queued again: its actor failed ({type(err).__name__})")
                pool.failed(actor, err)
    metrics.units_progress(len(results), 0, 0)
    return results, requeued, list(workers.values())


def _check_progress(pool: _Pool, todo: deque, timeout_s: float, bundle: dict) -> None:
    """Raise when no actor can take the queued units: all gone, or none usable for `timeout_s`."""
    left = f"units {sorted(todo)} were not synthesised. Re-run the job: finished units are kept and skipped"
    if len(pool.gone) == len(pool.actors):
        raise RuntimeError(f"every synthesis actor died more than {MAX_ACTOR_RESTARTS} times; {left}")
    if pool.stalled_for() > timeout_s:
        raise ClusterError(f"no synthesis actor ({bundle} each) could be placed, or placed again after a "
                           f"failure, within ray.placement_timeout_s={timeout_s:g} s; the cluster has "
                           f"{describe_cluster()}; {left}")
