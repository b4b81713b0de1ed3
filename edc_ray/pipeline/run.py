"""The stage pipeline: prepare -> observers -> statistics + candidates -> synthesis -> export -> evaluation
-> report.

Every stage writes into the run folder and skips what is already complete there, so running the
same config again resumes. Ray calls stay in the stage modules; this file only sequences them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Callable, Iterator

import ray

from edc_ray.config import Config, ConfigError, check_local_resources, dump_config, to_dict
from edc_ray.errors import DataError
from edc_ray.pipeline.cluster import check_shared_paths, wait_for_room
from edc_ray.pipeline.common import PREVIEW_CLASSES, DatasetMeta, ObserverSet, observer_payload
from edc_ray.pipeline.console import RAY_LOGS, progress_display
from edc_ray.pipeline.evaluation import EvalSet, evaluate_sets, load_images
from edc_ray.pipeline.observers import (check_pretrained_weights, observer_names, observers_stage,
                                       pretrained_preprocessing)
from edc_ray.pipeline.resume import check_run_folder
from edc_ray.pipeline.report import config_hash, write_report
from edc_ray.pipeline.statistics import statistics_stage
from edc_ray.pipeline.synthesis import (SynthesisResult, baseline_folder, random_baseline_config,
                                        synthesis_stage)
from edc_ray.storage import fsio
from edc_ray.storage.export import export_imagefolder, imagefolder_shard
from edc_ray.storage.prepare import ensure_prepared
from edc_ray.storage.lease import RunLease
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.dataset_info import DatasetInfo, read_info


def prepare_data(cfg: Config) -> DatasetInfo:
    """The dataset's info, preparing it on first use (as `ray.stats_tasks` Ray tasks); checks the configured
    image size and splits against it. Shards prepared elsewhere (timm's layout) are read in place."""
    if fsio.exists(fsio.join(cfg.data.root, "_info.json")) or cfg.data.source is None:
        info = read_info(cfg.data.root, cfg.data.classes)
    else:
        info = ensure_prepared(cfg.data.source, cfg.data.src, cfg.data.root, shard_size=cfg.data.shard_size,
                               tasks=cfg.ray.stats_tasks)
    if info.image_size is None and cfg.data.image_size is None:
        raise ConfigError(f"data.image_size: the images of {cfg.data.root!r} have any size, so set the size "
                          "they are read at (e.g. 224 for ImageNet)")
    if info.image_size is not None and cfg.data.image_size not in (None, info.image_size):
        raise ConfigError(f"data.image_size: {cfg.data.image_size} does not match the dataset at "
                          f"{cfg.data.root!r}, whose images are {info.image_size}x{info.image_size}")
    for key in ("train_split", "val_split"):
        try:
            info.split(getattr(cfg.data, key))
        except ValueError as exn:
            raise ConfigError(f"data.{key}: {exn}") from None
    return info


def local_gpus() -> int:
    """The CUDA devices a local Ray instance would see."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_ray(cfg: Config, verbose: bool = False) -> bool:
    """Start a private local Ray instance or join a cluster; False when Ray was already running.

    Workers' output stays in Ray's log files unless `verbose` (see `pipeline/console.py`).
    """
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if cfg.ray.address == "local":
        context = ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.dashboard,
                           **quiet)
    else:
        context = ray.init(address=cfg.ray.address, **quiet)
    private_token_file()
    if context.dashboard_url:
        print(f"[edc-ray] Ray dashboard: http://{context.dashboard_url} (Ray's logs: {RAY_LOGS})", flush=True)
    return True


def private_token_file(path: str = "~/.ray/auth_token") -> None:
    """Make Ray's token file readable by its owner only (`ray.init` writes it with the umask, often 0644)."""
    path = os.path.expanduser(path)
    if os.path.isfile(path) and os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)


class StageTimer:
    """Prints one line per stage and records its wall time; `before_each` runs at every stage start."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.before_each: Callable[[], None] = lambda: None

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.before_each()
        print(f"[edc-ray] stage {name} ...", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        print(f"[edc-ray] stage {name} done in {self.seconds[name]:.1f} s", flush=True)


def absolute_paths(cfg: Config) -> None:
    """Make every local path of `cfg` absolute, in place (Ray workers do not share the driver's cwd)."""
    cfg.data.root = fsio.absolute(cfg.data.root)
    cfg.data.src = cfg.data.src and fsio.absolute(cfg.data.src)
    cfg.output.run_dir = fsio.absolute(cfg.output.run_dir)
    for spec in cfg.observers.models:
        spec.weights = spec.weights and fsio.absolute(spec.weights)


@dataclasses.dataclass
class Session:
    """What every entry point has once the data is prepared and the observers are in the object store."""

    cfg: Config
    info: DatasetInfo
    meta: DatasetMeta
    run: RunFolder
    stage: StageTimer
    observers: ObserverSet


@contextlib.contextmanager
def session(cfg: Config, break_lease: bool = False, verbose: bool = False) -> Iterator[Session]:
    """Start Ray (or join the cluster) and check the paths every node will use, prepare the data, lease
    the run folder, write the resolved config and load (or train) the observers; the lease is released at
    the end (`break_lease`: take over another driver's lease; `verbose`: show Ray's own log lines)."""
    absolute_paths(cfg)
    if cfg.ray.address == "local" and not ray.is_initialized():  # requests it can never place would hang
        check_local_resources(cfg, cfg.ray.num_cpus or os.cpu_count() or 1, local_gpus())
    started = start_ray(cfg, verbose)
    lease = None
    display = contextlib.ExitStack()
    try:
        display.enter_context(progress_display())
        check_shared_paths(cfg)  # before any work: the other nodes could not see node-local paths
        check_pretrained_weights(cfg)  # and before it: a missing weights file is named now
        stage = StageTimer()
        with stage("prepare"):
            info = prepare_data(cfg)
        meta = DatasetMeta.from_info(info, cfg.data, pretrained_preprocessing(cfg, info))
        run = RunFolder(cfg.output.run_dir)
        taken = RunLease(run.root)
        taken.acquire(break_lease)  # before the first write into the run folder
        lease = taken
        stage.before_each = lease.check
        check_run_folder(run, cfg)
        run.write_text(dump_config(cfg), "config.yaml")
        with stage("observers"):
            observers = observers_stage(cfg, run, meta)
        refs = tuple(ray.put(observer_payload(arch, model)) for arch, model in observers)  # once
        archs = tuple(arch for arch, _ in observers)
        yield Session(cfg, info, meta, run, stage, ObserverSet(tuple(observer_names(cfg)), archs, refs))
    finally:
        display.close()
        if started:
            ray.shutdown()
        if lease is not None:
            lease.release()


def teacher_spec(s: Session) -> dict:
    """How to reproduce our soft labels elsewhere: the teachers, the normalisation and the protocol."""
    teachers = s.observers.subset(s.cfg.evaluation.teachers)
    return {"soft_labels": "online: mean of the teachers' logits on every augmented batch (METHOD.md 1.5)",
            "teachers": [{"name": name, "arch": arch, "weights": s.run.path("observers", f"{name}.pt")}
                         for name, arch in zip(teachers.names, teachers.archs)],
            "classes": s.info.classes, "mean": list(s.meta.mean), "std": list(s.meta.std),
            "image_size": s.meta.image_size, "channels": s.meta.channels,
            "evaluation": to_dict(s.cfg.evaluation)}


@ray.remote
def _export_task(urls: list[str], classes: list[str], dest: str) -> int:
    return export_imagefolder(urls, classes, dest)


EXPORT_UNITS_PER_TASK = 10


def export_stage(s: Session, distilled: SynthesisResult) -> str:
    """The distilled set as an ImageFolder of PNGs (written by parallel tasks, a few units each) plus
    `teachers.json` (written last: the marker)."""
    if not s.run.exists("export", "teachers.json"):
        urls = list(distilled.urls)
        chunks = [urls[i:i + EXPORT_UNITS_PER_TASK] for i in range(0, len(urls), EXPORT_UNITS_PER_TASK)]
        cpus = min(1.0, s.cfg.ray.actor_cpus or 1.0)
        wait_for_room("export tasks", {"CPU": cpus}, 1, s.cfg.ray.placement_timeout_s)
        task = _export_task.options(num_cpus=cpus)
        written = sum(ray.get([task.remote(chunk, s.info.classes, s.run.path("export", "images"))
                               for chunk in chunks]))
        if written != distilled.images:  # a unit shard lost or cut short since synthesis
            raise DataError(f"{distilled.folder} holds {written} images, synthesis wrote {distilled.images}; "
                            f"nothing was marked exported")
        s.run.write_json(teacher_spec(s), "export", "teachers.json")
    return s.run.path("export")


def run_pipeline(cfg: Config, break_lease: bool = False, verbose: bool = False) -> dict:
    """Run (or resume) the whole condensation for `cfg`; returns the report (`verbose`: Ray's own log
    lines in the terminal too)."""
    with session(cfg, break_lease, verbose) as s:
        run, meta, stage = s.run, s.meta, s.stage
        with stage("statistics"):
            statistics_stage(cfg, run, s.info, meta, s.observers)
        with stage("synthesis"):
            start = time.perf_counter()
            distilled = synthesis_stage(cfg, run, meta, s.observers)
            synthesis_seconds = time.perf_counter() - start
            sets = [("distilled", distilled)]
            if cfg.evaluation.random_baseline and cfg.method != "random":
                baseline = random_baseline_config(cfg)
                sets.append(("random", synthesis_stage(baseline, run, meta, s.observers, baseline_folder(cfg))))
        with stage("export"):
            export_stage(s, distilled)
        with stage("evaluation"):
            evaluation = evaluate_sets(cfg, run, meta, s.observers,
                                       [EvalSet(label, result.urls, result.images) for label, result in sets])
        with stage("report"):
            shown = -(-PREVIEW_CLASSES // cfg.synthesis.classes_per_unit)  # the units of the classes shown
            images, labels = load_images(list(distilled.urls[:shown]))
            report = {
                "dataset": s.info.name, "method": cfg.method, "protocol": cfg.evaluation.protocol,
                "ipc": cfg.synthesis.ipc, "run_dir": run.root,
                "config_hash": config_hash(cfg), "num_classes": meta.num_classes,
                "shown": {"classes": s.info.classes[:PREVIEW_CLASSES], "units": shown,
                          "folders": {"initial": "initial", "distilled": "distilled",
                                      **({"random": baseline_folder(cfg)} if len(sets) > 1 else {})}},
                "observers": [{"name": n, **run.read_json("observers", f"{n}.json")} for n in s.observers.names],
                "evaluation": evaluation,
                "export": run.path("export"),
                "synthesis": {"images": distilled.images, "seconds": synthesis_seconds,
                              "images_per_s": distilled.images / max(synthesis_seconds, 1e-9),
                              "units_total": distilled.units_total,
                              "units_run": [{k: r[k] for k in ("unit", "worker", "seconds", "images", "peak_mib")}
                                            for r in distilled.units_run],
                              "workers": list(distilled.workers)},
            }
            report["stage_seconds"] = dict(stage.seconds)  # the report stage itself is not in it
            write_report(run, report, images, labels)
        return report


def evaluate_imagefolder(cfg: Config, src: str, label: str = "imported", break_lease: bool = False,
                         verbose: bool = False) -> list[dict]:
    """Evaluate an ImageFolder distilled set (made by any tool) with our protocol and observers."""
    with session(cfg, break_lease, verbose) as s:
        url = s.run.path("imported", f"{label}.tar")
        with s.stage("import"):
            count = imagefolder_shard(src, url, s.meta.channels, s.meta.image_size, s.info.classes)
            print(f"[edc-ray] {count} images from {src}", flush=True)
        with s.stage("evaluation"):
            results = evaluate_sets(cfg, s.run, s.meta, s.observers, [EvalSet(label, (url,), count)])
        s.run.write_json({"source": src, "images": count, "evaluation": results}, "imported", f"{label}.json")
        return results
