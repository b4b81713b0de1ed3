"""Stage "statistics + candidates": one pass over the train shards, split across Ray tasks by shard.

Each task returns exact per-class statistic sums for every observer and its shard's share of the
candidate sample; the driver reduces both exactly (the result equals a single pass).
"""
from __future__ import annotations

import ray
import torch

from edc_ray.algo.condense import (CandidatePool, accumulate_statistics, candidate_pool,
                                   merge_candidate_pools)
from edc_ray.algo.stats import ClassStatSums
from edc_ray.config import Config, StatisticsConfig, from_dict, to_dict
from edc_ray.pipeline.common import DatasetMeta, model_from_payload, set_threads
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import iter_samples, read_info, shard_urls


def pool_to_dict(pool: CandidatePool) -> dict:
    """A CandidatePool as plain tensors and strings (loadable with weights_only)."""
    return dict(pool.__dict__)


def pool_from_dict(data: dict) -> CandidatePool:
    """Inverse of `pool_to_dict`."""
    return CandidatePool(**data)


@ray.remote
def statistics_task(urls: list[str], observer_refs: list, stats_cfg: dict, meta: dict,
                    candidates_per_class: int, seed: int, cpus: float) -> dict:
    """Sums and candidates of the shards at `urls` (observer refs come wrapped in a list)."""
    set_threads(cpus)
    meta_ = DatasetMeta(**meta)
    cfg = from_dict(StatisticsConfig, stats_cfg)
    models = [model_from_payload(ray.get(ref), meta_) for ref in observer_refs]
    keys, images, labels = [], [], []
    for key, image, label in iter_samples(urls):
        keys.append(key)
        images.append(image)
        labels.append(label)
    images_t, labels_t = torch.stack(images), torch.tensor(labels)
    batches = [(images_t[s:s + cfg.batch_size], labels_t[s:s + cfg.batch_size])
               for s in range(0, len(images_t), cfg.batch_size)]
    sums = [accumulate_statistics(m, batches, meta_.num_classes, cfg, meta_.mean, meta_.std).state_dict()
            for m in models]
    pool = candidate_pool(models, images_t, labels_t, keys, candidates_per_class, seed, meta_.mean,
                          meta_.std)
    return {"sums": sums, "pool": pool_to_dict(pool)}


def stored_statistics(run: RunFolder, names: list[str]) -> tuple[list[ClassStatSums], CandidatePool] | None:
    """The statistic sums of the observers `names` and the candidate pool in the run folder (None: absent)."""
    if not (run.exists("candidates", "pool.pt") and all(run.exists("stats", f"{n}.pt") for n in names)):
        return None
    sums = [ClassStatSums.from_state_dict(run.load_torch("stats", f"{n}.pt")) for n in names]
    return sums, pool_from_dict(run.load_torch("candidates", "pool.pt"))


def statistics_stage(cfg: Config, run: RunFolder, meta: DatasetMeta, observer_refs: list,
                     names: list[str]) -> tuple[list[ClassStatSums], CandidatePool]:
    """Statistic sums per observer and the merged candidate pool, from the run folder when present."""
    stored = stored_statistics(run, names)
    if stored is not None:
        return stored
    info = read_info(cfg.data.root)
    urls = shard_urls(cfg.data.root, info, cfg.data.train_split)
    groups = [urls[i::cfg.ray.stats_tasks] for i in range(min(cfg.ray.stats_tasks, len(urls)))]
    task = statistics_task.options(name="statistics", num_cpus=cfg.ray.actor_cpus)
    refs = [task.remote(group, observer_refs, to_dict(cfg.statistics), meta.__dict__,
                        cfg.init.candidates_per_class, cfg.seed, cfg.ray.actor_cpus) for group in groups]
    results = ray.get(refs)
    sums = []
    for k, name in enumerate(names):
        total = ClassStatSums(meta.num_classes)
        for result in results:
            total = total.merge(ClassStatSums.from_state_dict(result["sums"][k]))
        run.save_torch(total.state_dict(), "stats", f"{name}.pt")
        sums.append(total)
    pool = merge_candidate_pools([pool_from_dict(r["pool"]) for r in results],
                                 cfg.init.candidates_per_class)
    run.save_torch(pool_to_dict(pool), "candidates", "pool.pt")
    return sums, pool
