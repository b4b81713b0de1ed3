"""The stage pipeline: prepare -> observers -> statistics + candidates -> synthesis -> export -> evaluation
-> report.

Every stage writes into the run folder and skips what is already complete there, so running the
same config again resumes. Ray calls stay in the stage modules; this file only sequences them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator

import ray
import yaml

from edc_ray.config import Config, ConfigError, changed_keys, dump_config, from_dict, to_dict
from edc_ray.pipeline.common import DatasetMeta, observer_payload
from edc_ray.pipeline.evaluation import evaluate_set, load_images, random_subset_shard
from edc_ray.pipeline.observers import observer_names, observers_stage
from edc_ray.pipeline.report import config_hash, write_report
from edc_ray.pipeline.statistics import pool_to_dict, statistics_stage
from edc_ray.pipeline.synthesis import synthesis_stage
from edc_ray.storage import fsio
from edc_ray.storage.export import export_imagefolder, imagefolder_shard
from edc_ray.storage.prepare import ensure_prepared
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import DatasetInfo, read_info


def prepare_data(cfg: Config) -> DatasetInfo:
    """The dataset's info, preparing it on first use; checks the configured image size against it."""
    if fsio.exists(fsio.join(cfg.data.root, "_info.json")) or cfg.data.source is None:
        info = read_info(cfg.data.root)
    else:
        info = ensure_prepared(cfg.data.source, cfg.data.src, cfg.data.root, shard_size=cfg.data.shard_size)
    if cfg.data.image_size is not None and cfg.data.image_size != info.image_size:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} does not match the dataset at "
                          f"{cfg.data.root!r}, whose images are {info.image_size}x{info.image_size}")
    for key in ("train_split", "val_split"):
        split = getattr(cfg.data, key)
        if split not in info.splits:
            raise ConfigError(f"data.{key}: {split!r} is not a split of {cfg.data.root!r}; "
                              f"it has {sorted(info.splits)}")
    return info


def start_ray(cfg: Config) -> bool:
    """Start a private local Ray instance or join a cluster; False when Ray was already running."""
    if ray.is_initialized():
        return False
    if cfg.ray.address == "local":
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.dashboard)
    else:
        ray.init(address=cfg.ray.address)
    return True


class StageTimer:
    """Prints one line per stage and records its wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
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
    names: list[str]
    observer_refs: list


# Each stage's marker files in the run folder and the keys its outputs depend on (besides those of the
# stages before it). `evaluation.students` and `random_baseline` only pick which sets and students are
# evaluated, each cached under its own name, so they may change between runs.
STAGE_INPUTS = (("observers", ("observers", "*.json"), ("seed", "data.", "observers.")),
                ("statistics", ("candidates", "pool.pt"), ("statistics.", "init.candidates_per_class")),
                ("synthesis", ("distilled", "*.tar"), ("method", "init.", "synthesis.")),
                ("evaluation", ("eval", "*.json"), ("evaluation.",)))
FREE_KEYS = ("evaluation.students", "evaluation.random_baseline")


def stored_config(run: RunFolder) -> Config | None:
    """The resolved config a run folder was last run with (None: no run yet)."""
    if not run.exists("config.yaml"):
        return None
    return from_dict(Config, yaml.safe_load(fsio.read_bytes(run.path("config.yaml"))) or {})


def check_run_folder(run: RunFolder, cfg: Config) -> None:
    """Refuse to resume a run folder whose finished stages were computed under another config.

    A re-run skips every stage whose outputs exist, so a changed key those outputs depend on would be
    silently ignored; resource settings (`ray`, `device`) and which students run may change freely.
    """
    previous = stored_config(run)
    if previous is None:
        return
    changed = [k for k in changed_keys(previous, cfg) if k not in FREE_KEYS]
    inputs: tuple[str, ...] = ()
    for name, (folder, pattern), keys in STAGE_INPUTS:
        inputs += keys
        if not fsio.list_files(run.path(folder), pattern):
            continue
        stale = [k for k in changed if k.startswith(inputs)]
        if stale:
            raise ConfigError(f"run folder {run.root}: its finished {name} stage was computed under another "
                              f"config (changed: {', '.join(stale)}); choose a new output.run_dir, or remove "
                              "the folder to start over")


@contextlib.contextmanager
def session(cfg: Config) -> Iterator[Session]:
    """Prepare the data, write the resolved config, start Ray and load (or train) the observers."""
    absolute_paths(cfg)
    stage = StageTimer()
    with stage("prepare"):
        info = prepare_data(cfg)
    meta = DatasetMeta.from_info(info)
    run = RunFolder(cfg.output.run_dir)
    check_run_folder(run, cfg)
    run.write_text(dump_config(cfg), "config.yaml")
    started = start_ray(cfg)
    try:
        with stage("observers"):
            observers = observers_stage(cfg, run, meta)
        refs = [ray.put(observer_payload(arch, model)) for arch, model in observers]  # once
        yield Session(cfg, info, meta, run, stage, observer_names(cfg), refs)
    finally:
        if started:
            ray.shutdown()


def teacher_spec(s: Session) -> dict:
    """How to reproduce our soft labels elsewhere: the teachers, the normalisation and the protocol."""
    teachers = s.cfg.evaluation.teachers
    indices = range(len(s.names)) if teachers is None else teachers
    return {"soft_labels": "online: mean of the teachers' logits on every augmented batch (METHOD.md 1.5)",
            "teachers": [{"name": s.names[i], "arch": s.cfg.observers.models[i].arch,
                          "weights": s.run.path("observers", f"{s.names[i]}.pt")} for i in indices],
            "classes": s.info.classes, "mean": list(s.meta.mean), "std": list(s.meta.std),
            "image_size": s.meta.image_size, "channels": s.meta.channels,
            "evaluation": to_dict(s.cfg.evaluation)}


def export_stage(s: Session, urls: list[str]) -> str:
    """The distilled set as an ImageFolder of PNGs plus `teachers.json` (written last: the marker)."""
    if not s.run.exists("export", "teachers.json"):
        export_imagefolder(urls, s.info.classes, s.run.path("export", "images"))
        s.run.write_json(teacher_spec(s), "export", "teachers.json")
    return s.run.path("export")


def run_pipeline(cfg: Config) -> dict:
    """Run (or resume) the whole condensation for `cfg`; returns the report."""
    with session(cfg) as s:
        run, meta, stage = s.run, s.meta, s.stage
        with stage("statistics"):
            sums, pool = statistics_stage(cfg, run, meta, s.observer_refs, s.names)
        with stage("synthesis"):
            start = time.perf_counter()
            if cfg.method == "random":  # the method is the baseline: nothing to synthesise
                distilled_urls = [random_subset_shard(run, pool, cfg.synthesis.ipc)]
                synthesis = {"units_total": 1, "units_run": [], "workers": []}
            else:
                shared = s.observer_refs + [ray.put([x.state_dict() for x in sums]), ray.put(pool_to_dict(pool))]
                synthesis = synthesis_stage(cfg, run, meta, shared)
                distilled_urls = [run.unit_shard(u) for u in range(synthesis["units_total"])]
            synthesis_seconds = time.perf_counter() - start
        with stage("export"):
            export_stage(s, distilled_urls)
        with stage("evaluation"):
            evaluation = []
            baseline = None
            if cfg.evaluation.random_baseline and cfg.method != "random":
                baseline = random_subset_shard(run, pool, cfg.synthesis.ipc)
            for student in cfg.evaluation.students:
                evaluation.append(evaluate_set(cfg, run, meta, s.observer_refs, "distilled", distilled_urls,
                                               student))
                if baseline is not None:
                    evaluation.append(evaluate_set(cfg, run, meta, s.observer_refs, "random", [baseline],
                                                   student))
        with stage("report"):
            images, labels = load_images(distilled_urls)
            report = {
                "dataset": s.info.name, "method": cfg.method, "protocol": cfg.evaluation.protocol,
                "ipc": cfg.synthesis.ipc, "run_dir": run.root,
                "config_hash": config_hash(cfg), "num_classes": meta.num_classes,
                "observers": [{"name": n, **run.read_json("observers", f"{n}.json")} for n in s.names],
                "evaluation": evaluation,
                "export": run.path("export"),
                "synthesis": {"images": len(images), "seconds": synthesis_seconds,
                              "images_per_s": len(images) / max(synthesis_seconds, 1e-9),
                              "units_total": synthesis["units_total"],
                              "units_run": [{k: r[k] for k in ("unit", "worker", "seconds", "images")}
                                            for r in synthesis["units_run"]],
                              "workers": synthesis["workers"]},
            }
            report["stage_seconds"] = dict(stage.seconds)  # the report stage itself is not in it
            write_report(run, report, images, labels)
        return report


def evaluate_imagefolder(cfg: Config, src: str, label: str = "imported") -> list[dict]:
    """Evaluate an ImageFolder distilled set (made by any tool) with our protocol and observers."""
    with session(cfg) as s:
        url = s.run.path("imported", f"{label}.tar")
        with s.stage("import"):
            count = imagefolder_shard(src, url, s.meta.channels, s.meta.image_size, s.meta.num_classes)
            print(f"[edc-ray] {count} images from {src}", flush=True)
        with s.stage("evaluation"):
            results = [evaluate_set(cfg, s.run, s.meta, s.observer_refs, label, [url], student)
                       for student in cfg.evaluation.students]
        s.run.write_json({"source": src, "images": count, "evaluation": results}, "imported", f"{label}.json")
        return results
