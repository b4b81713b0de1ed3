"""Stage "statistics + candidates": one streaming pass over the train shards, in Ray tasks, merged by class.

    tasks:   shard group t -> stats/parts/task-t/{sums,candidates}-<block>  (+ _done.json, last)
    merges:  class block b <- every task's block b -> stats/classes/class-c.pt, candidates/class-c.tar,
             stats/blocks/block-b.pt (its totals, last)
    driver:  block totals, one at a time -> stats/global.pt, then the _complete.json markers

A task holds one decoded batch (decoded by background loader processes while the observers run), the
exact per-class sums and a per-class bottom-k candidate reservoir; a merge holds one class block; the
driver holds one block's totals. Nothing the size of the dataset, of (classes x candidates) images or of
all classes' statistics passes through the driver or the object store. A re-run redoes only the tasks
and merges whose outputs are missing. Methods that match no statistics skip the sums and score only
the candidates that survive the merge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import ray
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from edc_ray.algo.candidates import Candidates, CandidateReservoir, bottom_k, payload_thresholds, sample_priority
from edc_ray.algo.condense import StatisticsPass, score_candidates
from edc_ray.algo.stats import ClassStatSums, StatTotals
from edc_ray.config import Config, flat_config
from edc_ray.pipeline.cluster import wait_for_room
from edc_ray.pipeline.common import DatasetMeta, ObserverSet, PeakMemory, load_models, resolve_device, set_threads
from edc_ray.storage import fsio
from edc_ray.storage.candidates import fetch_payloads, raw_source, read_candidates, write_candidates
from edc_ray.storage.run_folder import CLASSES_PER_BLOCK, RunFolder, load_torch_bytes, torch_bytes
from edc_ray.storage.dataset_info import DatasetInfo
from edc_ray.storage.shards import SampleSpec, check_label, decode_sample, iter_raw_samples


def needs_sums(cfg: Config) -> bool:
    """Whether the method matches statistics (it optimises); otherwise only candidates are needed."""
    return cfg.synthesis.iterations > 0


@dataclass(frozen=True)
class Products:
    """What a pass (or one of its tasks or merges) makes: statistic sums, candidates, or both."""

    sums: bool
    candidates: bool

    def covers(self, other: "Products") -> bool:
        """Whether everything `other` makes is made here too."""
        return (self.sums or not other.sums) and (self.candidates or not other.candidates)


def class_blocks(num_classes: int) -> list[tuple[int, int]]:
    """(first, stop) of every merge block of classes."""
    return [(s, min(s + CLASSES_PER_BLOCK, num_classes)) for s in range(0, num_classes, CLASSES_PER_BLOCK)]


@dataclass(frozen=True)
class StatisticsResult:
    """What the statistics stage leaves in the run folder (the per-class files are read from there)."""

    with_sums: bool
    num_classes: int
    images: int
    candidate_counts: tuple[int, ...]
    tasks_run: tuple[int, ...] = ()
    blocks_run: tuple[int, ...] = ()
    task_peak_mib: tuple[float, ...] = ()  # of the tasks and merges this run ran
    task_held_mib: tuple[float, ...] = ()  # candidate bytes each task held at its end
    merge_growth_mib: tuple[float, ...] = ()  # how much each merge's process grew


# ---------------------------------------------------------------- one task: a group of shards


@dataclass
class SampleBatch:
    """A batch of real samples: keys, labels, priorities, encoded bytes, sources and (decoded) images."""

    keys: list[str]
    labels: torch.Tensor
    priorities: torch.Tensor
    payloads: list[bytes]
    sources: list[tuple]
    images: torch.Tensor | None = None

    def pin_memory(self) -> "SampleBatch":
        """Pinned images, for asynchronous copies to the GPU (the DataLoader calls this)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_samples(items: list[tuple]) -> SampleBatch:
    """The DataLoader's collate function for `TaskSamples` items."""
    keys, labels, priorities, payloads, sources, images = zip(*items)
    return SampleBatch(list(keys), torch.tensor(labels, dtype=torch.long), torch.tensor(priorities, dtype=torch.float64),
                       list(payloads), list(sources), None if images[0] is None else torch.stack(images))


class TaskSamples(IterableDataset):
    """The samples of a task's shards (split across loader processes), decoded when `decode`."""

    def __init__(self, urls: list[str], counts: dict[str, int], seed: int, decode: bool, spec: SampleSpec):
        self.urls, self.counts, self.seed, self.decode, self.spec = urls, counts, seed, decode, spec

    def __iter__(self):
        for raw in iter_raw_samples(self.urls, expected_counts=self.counts, workersplitter=wds.split_by_worker):
            if self.decode:
                _, image, label = decode_sample(raw, self.spec)
            else:
                image, label = None, check_label(raw, self.spec)
            yield (raw.key, label, sample_priority(raw.key, self.seed), raw.fields[raw.image_field],
                   raw_source(raw), image)


def run_statistics_task(run: RunFolder, task: int, urls: list[str], counts: dict[str, int],
                        observers: ObserverSet, cfg: Config, meta: DatasetMeta, hold_below: torch.Tensor | None,
                        products: Products, device: str | None = None) -> dict:
    """Stream one group of shards: the `products` (sums, candidates), written per class block.

    Candidates above `hold_below[class]` keep only their source (see `payload_thresholds`).
    """
    set_threads(cfg.ray.stats_cpus)
    device = torch.device(device) if device else resolve_device(cfg.device, ray.get_gpu_ids())
    k = cfg.init.candidates_per_class
    with PeakMemory() as memory:
        models, pulled = load_models(observers, meta, device) if products.sums else ([], 0)
        scan = StatisticsPass(models, meta.num_classes, cfg.statistics, meta.mean, meta.std, device,
                              scorers=cfg.init.score_observers) if products.sums else None
        reservoir = CandidateReservoir(meta.num_classes, k, hold_below)
        spec = meta.spec("train", seed=cfg.seed)  # images of any size: a reproducible crop per sample
        loader = DataLoader(TaskSamples(urls, counts, cfg.seed, decode=products.sums, spec=spec),
                            batch_size=cfg.statistics.batch_size, collate_fn=collate_samples,
                            num_workers=min(cfg.statistics.loader_workers, len(urls)),
                            pin_memory=device.type == "cuda")
        images = 0
        for batch in loader:
            losses = scan.add(batch.images, batch.labels).float().cpu() if scan is not None else \
                torch.full((len(batch.keys),), math.nan)
            if products.candidates:
                reservoir.offer(Candidates(batch.keys, batch.labels, batch.priorities, losses, batch.payloads,
                                           batch.sources))
            images += len(batch.keys)
        held = reservoir.result()
        for block, (first, stop) in enumerate(class_blocks(meta.num_classes)):
            if scan is not None:
                fsio.atomic_write_bytes(run.task_path(task, f"sums-{block:05d}.pt"), torch_bytes(
                    {name: s.block(first, stop).state_dict() for name, s in zip(observers.names, scan.sums)}))
            if products.candidates:
                inside = torch.nonzero((held.labels >= first) & (held.labels < stop)).flatten()
                write_candidates(run.task_path(task, f"candidates-{block:05d}.tar"), held.take(inside))
        if scan is not None:
            scan.close()
    summary = {"task": task, "images": images, "sums": products.sums, "candidates": products.candidates,
               "peak_mib": memory.peak_mib, "pulled_mib": pulled / 2**20, "held": len(held),
               "held_mib": sum(len(p) for p in held.payloads if p is not None) / 2**20}
    run.write_json(summary, "stats", "parts", f"task-{task:05d}", "_done.json")
    return summary


# ---------------------------------------------------------------- one merge: a block of classes


def save_class_files(run: RunFolder, first: int, stop: int, sums: dict[str, ClassStatSums] | None,
                     cands: Candidates | None) -> list[int]:
    """Write the candidates (with `cands`) and the statistic sums (with `sums`, whose rows are classes
    `first`.. `stop` - 1) of each of those classes; returns the candidate counts."""
    counts = []
    for label in range(first, stop):
        if cands is not None:
            counts.append(run.save_class_candidates(label, cands.of_class(label)))
        if sums is not None:
            run.save_class_statistics(label, {name: s.block(label - first, label - first + 1)
                                              for name, s in sums.items()})
    return counts


def write_markers(run: RunFolder, names: tuple[str, ...], totals: dict[str, StatTotals] | None,
                  counts: list[int] | None, images: int, per_class: int) -> None:
    """The global totals (when statistics were computed) and the completion markers of what was made, last."""
    if totals is not None:
        run.save_global_statistics(totals)
        run.write_json({"observers": list(names), "images": images}, "stats", "_complete.json")
    if counts is not None:
        run.write_json({"counts": counts, "images": images, "per_class": per_class}, "candidates", "_complete.json")


def save_statistics(run: RunFolder, names: tuple[str, ...], num_classes: int, sums: list[ClassStatSums] | None,
                    cands: Candidates, images: int, per_class: int) -> None:
    """Store statistics and candidates computed in one process (sums over every class) as the stage does."""
    named = None if sums is None else dict(zip(names, sums))
    counts = save_class_files(run, 0, num_classes, named, cands)
    write_markers(run, names, None if named is None else {n: s.totals() for n, s in named.items()}, counts,
                  images, per_class)


def run_merge_block(run: RunFolder, block: int, tasks: int, observers: ObserverSet, cfg: Config,
                    meta: DatasetMeta, products: Products, device: str | None = None) -> dict:
    """Merge every task's share of class block `block`; write its per-class files and totals."""
    set_threads(cfg.ray.stats_cpus)
    with PeakMemory() as memory:
        fetched = _merge(run, block, tasks, observers, cfg, meta, products, device)
    return {"block": block, "fetched": fetched, "growth_mib": memory.peak_mib - memory.start_mib}


def _merge(run: RunFolder, block: int, tasks: int, observers: ObserverSet, cfg: Config, meta: DatasetMeta,
           products: Products, device: str | None) -> int:
    first, stop = class_blocks(meta.num_classes)[block]
    k = cfg.init.candidates_per_class
    sums: dict[str, ClassStatSums] | None = None
    cands = Candidates.empty() if products.candidates else None
    for task in range(tasks):  # one task's share in memory at a time, beside the running result
        if products.sums:
            url = run.task_path(task, f"sums-{block:05d}.pt")
            part = {name: ClassStatSums.from_state_dict(state)
                    for name, state in load_torch_bytes(fsio.read_bytes(url), url).items()}
            sums = part if sums is None else {name: sums[name].merge(part[name]) for name in part}
        if cands is not None:
            part_cands = read_candidates([run.task_path(task, f"candidates-{block:05d}.tar")], meta.spec().decode)
            cands = bottom_k(Candidates.concat([cands, part_cands]), k)
    fetched = 0
    if cands is not None:
        fetched = fetch_payloads(cands)
        if bool(torch.isnan(cands.losses).any()):
            device = torch.device(device) if device else resolve_device(cfg.device, ray.get_gpu_ids())
            models, _ = load_models(observers.subset(cfg.init.score_observers), meta, device)
            score_candidates(models, cands, meta.mean, meta.std, device)
    counts = save_class_files(run, first, stop, sums, cands)
    totals = {name: s.totals().state_dict() for name, s in sums.items()} if sums is not None else {}
    fsio.atomic_write_bytes(run.block_path(block), torch_bytes(
        {"sums": products.sums, "candidates": products.candidates, "totals": totals, "counts": counts,
         "fetched": fetched}))
    return fetched


# ---------------------------------------------------------------- the driver


# A worker process per statistics task: the memory a task held goes back to the system when it ends,
# and the peak it reports is its own. Merges are many and small: they reuse processes (and report how
# much their process grew).
statistics_task = ray.remote(max_calls=1)(run_statistics_task)
merge_task = ray.remote(run_merge_block)


def plan_inputs(cfg: Config, observers: ObserverSet) -> dict:
    """What the partial results depend on: a re-run with other values starts the pass over."""
    flat = flat_config(cfg)
    return {"observers": list(observers.names), "seed": cfg.seed,
            "config": {k: v for k, v in flat.items() if k.startswith(("data.", "statistics.", "observers."))
                       or k in ("init.candidates_per_class", "init.score_observers")}}


def task_plan(run: RunFolder, cfg: Config, info: DatasetInfo, observers: ObserverSet) -> list[list[str]]:
    """The shard groups of the pass: fixed by its first run (`ray.stats_tasks` may change meanwhile)."""
    plan_url = run.path("stats", "parts", "_plan.json")
    inputs = plan_inputs(cfg, observers)
    if fsio.exists(plan_url):
        plan = fsio.read_json(plan_url)
        if plan["inputs"] == inputs:
            return plan["groups"]
        remove_parts(run)  # computed under other settings: start over
    urls = list(info.shard_list(cfg.data.root, cfg.data.train_split).urls)
    groups = [urls[i::cfg.ray.stats_tasks] for i in range(min(cfg.ray.stats_tasks, len(urls)))]
    fsio.atomic_write_json(plan_url, {"inputs": inputs, "groups": groups})
    return groups


def remove_parts(run: RunFolder) -> None:
    """Delete the partial results (they are large and only the merges need them)."""
    fsio.remove_tree(run.path("stats", "parts"))


def stored_statistics(run: RunFolder, with_sums: bool) -> StatisticsResult | None:
    """The stage's result from the run folder's markers (None: not complete for this need)."""
    cands = run.candidates_marker()
    stats = run.statistics_marker()
    if cands is None or (with_sums and stats is None):
        return None
    return StatisticsResult(stats is not None, len(cands["counts"]), cands["images"], tuple(cands["counts"]))


def _part_products(run: RunFolder, task: int) -> Products | None:
    url = run.path("stats", "parts", f"task-{task:05d}", "_done.json")
    if not fsio.exists(url):
        return None
    done = fsio.read_json(url)
    return Products(done["sums"], done["candidates"])


def _block_products(run: RunFolder, block: int) -> Products | None:
    url = run.block_path(block)
    if not fsio.exists(url):
        return None
    done = load_torch_bytes(fsio.read_bytes(url), url)
    return Products(done["sums"], done["candidates"])


def _wait(refs: list, desc: str) -> list:
    """Results of `refs`, with a progress bar as they finish."""
    results, pending = [], list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray.get(done))
            bar.update(len(done))
    return results


def statistics_stage(cfg: Config, run: RunFolder, info: DatasetInfo, meta: DatasetMeta,
                     observers: ObserverSet) -> StatisticsResult:
    """Run (or resume) the pass; returns where its outputs stand.

    It makes what is missing: statistic sums when the method matches statistics, candidates unless
    they are complete already (e.g. left by a method that needed only them; they are never rewritten).
    """
    with_sums = needs_sums(cfg)
    stored = stored_statistics(run, with_sums)
    if stored is not None:
        return stored
    need = Products(sums=with_sums, candidates=run.candidates_marker() is None)
    groups = task_plan(run, cfg, info, observers)
    split = info.split(cfg.data.train_split)
    counts = split.shard_list(cfg.data.root).expected_counts() or {}  # {}: lengths not recorded, not checked
    resources = {"num_cpus": cfg.ray.stats_cpus, "num_gpus": cfg.ray.stats_gpus}
    todo = [t for t in range(len(groups)) if not ((_part_products(run, t) or Products(False, False)).covers(need))]
    per_class = split.counts_per_class or [split.num_samples / meta.num_classes] * meta.num_classes
    hold_below = payload_thresholds(per_class, cfg.init.candidates_per_class)  # an estimate only costs reads
    num_blocks = len(class_blocks(meta.num_classes))
    blocks = [b for b in range(num_blocks) if not ((_block_products(run, b) or Products(False, False)).covers(need))]
    if todo or blocks:  # a resume with nothing left to run must not ask for (GPU) nodes
        wait_for_room("statistics tasks", {"CPU": cfg.ray.stats_cpus, "GPU": cfg.ray.stats_gpus}, 1,
                      cfg.ray.placement_timeout_s)
    summaries = _wait([statistics_task.options(name=f"statistics-{t}", **resources).remote(
        run, t, groups[t], {u: counts[u] for u in groups[t] if u in counts}, observers, cfg, meta, hold_below, need)
        for t in todo], "statistics tasks")
    merges = _wait([merge_task.options(name=f"statistics-merge-{b}", **resources).remote(
        run, b, len(groups), observers, cfg, meta, need) for b in blocks], "statistics merges")
    totals: dict[str, StatTotals] = {}
    class_counts: list[int] = []
    for block in range(num_blocks):  # one block's totals in memory at a time
        url = run.block_path(block)
        state = load_torch_bytes(fsio.read_bytes(url), url)
        class_counts += state["counts"]
        for name, t in state["totals"].items():
            part = StatTotals.from_state_dict(t)
            totals[name] = totals[name].merge(part) if name in totals else part
    images = split.num_samples
    write_markers(run, observers.names, totals if need.sums else None, class_counts if need.candidates else None,
                  images, cfg.init.candidates_per_class)
    remove_parts(run)
    counts_done = run.candidates_marker()["counts"]
    return StatisticsResult(with_sums, meta.num_classes, images, tuple(counts_done), tuple(todo), tuple(blocks),
                            tuple(s["peak_mib"] for s in summaries), tuple(s["held_mib"] for s in summaries),
                            tuple(m["growth_mib"] for m in merges))
