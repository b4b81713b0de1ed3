"""The synthesis loop of one unit and the single-process condensation API, end to end on tiny data."""
import pytest
import torch
import torch.nn.functional as F

from edc_ray.algo.candidates import CandidateReservoir, Candidates, bottom_k, sample_priority
from edc_ray.algo.condense import (StatisticsPass, accumulate_statistics, build_observers, candidates_in_memory,
                                   condense, initial_images, make_units, real_init_positions, synthesize_class_unit,
                                   unit_seed)
from edc_ray.algo.matching import layer_weights
from edc_ray.algo.student import normalize
from edc_ray.algo.synthesis import matching_loss
from edc_ray.config import Config, StatisticsConfig
from edc_ray.pipeline.synthesis import UnitWorker
from tiny import MEAN, STD, make_tiny, tiny_observers


@pytest.fixture(scope="module")
def tiny():
    images, labels = make_tiny()
    return images, labels, tiny_observers(images, labels)


def _cfg(**synthesis):
    cfg = Config()
    cfg.statistics = StatisticsConfig(patch_size=4, batch_size=16)
    cfg.init.candidates_per_class = 10
    cfg.synthesis.ipc = 2
    cfg.synthesis.classes_per_unit = 2
    cfg.synthesis.iterations = 30
    cfg.synthesis.r = 1.0  # strong matching so the effect is visible in 30 steps
    for k, v in synthesis.items():
        setattr(cfg.synthesis, k, v)
    return cfg


def _observers(images, labels, models, cfg):
    batches = [(images[s:s + 16], labels[s:s + 16]) for s in range(0, len(images), 16)]
    sums = [accumulate_statistics(m, batches, 3, cfg.statistics, MEAN, STD) for m in models]
    return build_observers(models, [s.totals() for s in sums], sums, range(3), cfg.statistics)


def _pool(images, labels, models, per_class=10):
    return candidates_in_memory(models, images, labels, [str(i) for i in range(len(images))], per_class, 0, MEAN,
                                STD)


def test_layer_weights():
    assert layer_weights(3, 10.0) == [10.0, 1.0, 1.0]


def test_units_and_seeds():
    assert make_units(5, 2) == [[0, 1], [2, 3], [4]]
    assert unit_seed(0, 1) == unit_seed(0, 1)
    assert len({unit_seed(0, u) for u in range(50)} | {unit_seed(1, 0)}) == 51


def test_candidates_are_a_uniform_sample_scored_by_the_ensemble(tiny):
    images, labels, models = tiny
    keys = [f"train-{i:08d}" for i in range(len(images))]
    cands = candidates_in_memory(models, images, labels, keys, 7, 0, MEAN, STD)
    assert torch.bincount(cands.labels).tolist() == [7, 7, 7]
    for c in range(3):  # the 7 lowest priorities of each class, in priority order
        own = [k for k, y in zip(keys, labels.tolist()) if y == c]
        expected = sorted(own, key=lambda k: sample_priority(k, 0))[:7]
        assert [k for k, y in zip(cands.keys, cands.labels.tolist()) if y == c] == expected
    index = [keys.index(k) for k in cands.keys]
    assert torch.equal(cands.images(), images[index])
    assert not torch.isnan(cands.losses).any() and (cands.losses >= 0).all()


def test_score_observers_alone_score_the_candidates_and_the_sums_stay(tiny):
    images, labels, models = tiny
    stats = StatisticsConfig(patch_size=4)
    every, second = (StatisticsPass(models, 3, stats, MEAN, STD, scorers=scorers) for scorers in (None, [1]))
    mean_logits = sum(m(normalize(images, MEAN, STD)) for m in models) / len(models)
    alone = models[1](normalize(images, MEAN, STD))
    with torch.no_grad():
        assert torch.allclose(every.add(images, labels), F.cross_entropy(mean_logits, labels, reduction="none"),
                              atol=1e-5)
        assert torch.allclose(second.add(images, labels), F.cross_entropy(alone, labels, reduction="none"),
                              atol=1e-5)
    for a, b in zip(every.sums, second.sums):
        assert torch.equal(a.counts, b.counts) and all(
            torch.equal(x[key], y[key]) for x, y in zip(a.sums, b.sums) for key in x)
    every.close(), second.close()
    unscored = StatisticsPass(models, 3, stats, MEAN, STD, with_sums=False, scorers=[0])
    assert torch.allclose(unscored.add(images, labels),
                          F.cross_entropy(models[0](normalize(images, MEAN, STD)), labels, reduction="none"), atol=1e-5)


class _Totals:
    """The one run-folder read of `UnitWorker._setup`: every observer's global totals."""

    def global_statistics(self):
        return {"a": "totals of a", "b": "totals of b"}


def test_a_unit_worker_loads_the_optimised_and_the_scoring_observers_once(tiny):
    images, labels, models = tiny
    cfg = _cfg(iterations=3, observers=[0])
    cfg.init.mode, cfg.init.score_observers = "mosaic", [1, 0]
    loads = []

    def load(indices):
        loads.append(list(indices))
        return [models[k] for k in indices], 0

    worker = UnitWorker("w", cfg, None, _Totals(), ["a", "b"], load, torch.device("cpu"))
    worker._setup()
    assert loads == [[0, 1]] and worker.models == [models[0]] and worker.scorers == [models[1], models[0]]
    assert worker.totals == ["totals of a"]
    cfg.synthesis.iterations, cfg.init.score_observers = 0, [1]
    worker = UnitWorker("w", cfg, None, _Totals(), ["a", "b"], load, torch.device("cpu"))
    worker._setup()
    assert loads[-1] == [1] and worker.models == [] and worker.totals is None
    pool = _pool(images, labels, models)
    by_second, _, _ = synthesize_class_unit(0, [0, 1], [models[1]], [], pool, cfg, MEAN, STD)
    by_first, _, _ = synthesize_class_unit(0, [0, 1], [models[0]], [], pool, cfg, MEAN, STD)
    assert not torch.equal(by_second, by_first)  # the scoring observer decides which crops are stitched


def test_real_init_picks_distinct_lowest_loss_candidates(tiny):
    images, labels, models = tiny
    cfg = _cfg(ipc=4)
    cfg.init.pool_fraction = 0.0  # METHOD.md 1.3's exactly-lowest-loss init
    pool = _pool(images, labels, models)
    x, y = initial_images(pool, [0, 2], 4, cfg, models, MEAN, STD, torch.Generator().manual_seed(0))
    assert y.tolist() == [0] * 4 + [2] * 4
    assert len({tuple(img.flatten().tolist()) for img in x}) == 8  # no duplicated seeds
    class0 = pool.of_class(0)
    expected = normalize(class0.images(torch.argsort(class0.losses)[:4]), MEAN, STD)
    assert torch.allclose(x[:4], expected)


def test_real_init_samples_distinct_images_from_the_low_loss_fraction(tiny):
    images, labels, models = tiny
    cfg = _cfg(ipc=3)
    cfg.init.pool_fraction = 0.5
    pool = _pool(images, labels, models)
    class0 = pool.of_class(0)
    sorted0 = class0.images(torch.argsort(class0.losses))
    low_half = {tuple(normalize(img[None], MEAN, STD).flatten().tolist()) for img in sorted0[:5]}
    picks = []
    for seed in range(4):
        x, _ = initial_images(pool, [0], 3, cfg, models, MEAN, STD, torch.Generator().manual_seed(seed))
        picked = {tuple(img.flatten().tolist()) for img in x}
        assert len(picked) == 3 and picked <= low_half  # distinct, all from the 5 lowest of 10
        picks.append(picked)
    assert len({frozenset(p) for p in picks}) > 1  # the sample depends on the unit's generator


def test_real_init_positions_hand_cases():
    g = torch.Generator().manual_seed(0)
    assert real_init_positions(10, 4, 0.0, g).tolist() == [0, 1, 2, 3]
    assert real_init_positions(3, 5, 0.5, g).tolist() == [0, 1, 2, 0, 1]  # fewer than ipc: cycled
    sample = real_init_positions(300, 10, 0.5, g)
    assert len(set(sample.tolist())) == 10 and int(sample.max()) < 150
    assert sample.tolist() == sorted(sample.tolist())


def test_synthesis_lowers_matching_loss_changes_images_and_is_deterministic(tiny):
    images, labels, models = tiny
    cfg = _cfg()
    observers = _observers(images, labels, models, cfg)
    pool = _pool(images, labels, models)
    x0, y = initial_images(pool, [0, 1], 2, cfg, models, MEAN, STD, torch.Generator().manual_seed(0))
    cfg_noise = _cfg()
    cfg_noise.init.mode = "noise"
    for c in (cfg, cfg_noise):
        out, out_labels, history = synthesize_class_unit(0, [0, 1], models, observers, pool, c, MEAN, STD)
        again, _, _ = synthesize_class_unit(0, [0, 1], models, observers, pool, c, MEAN, STD)
        assert torch.equal(out, again)
        assert out.dtype == torch.uint8 and out.shape == (4, 1, 12, 12)
        assert out_labels.tolist() == [0, 0, 1, 1]
        start = initial_images(pool, [0, 1], 2, c, models, MEAN, STD,
                               torch.Generator().manual_seed(unit_seed(c.seed, 0)))[0]
        before = matching_loss(start, y, observers, c.synthesis, crops=16)
        after = matching_loss(normalize(out, MEAN, STD), y, observers, c.synthesis, crops=16)
        assert after < before, (c.init.mode, before, after)
        assert not torch.equal(normalize(out, MEAN, STD), start)
        assert len(history) == 30 and {"ce", "match", "flat", "loss"} <= set(history[0])


def test_jitter_changes_the_optimised_views_deterministically(tiny):
    images, labels, models = tiny
    cfg = _cfg(iterations=5)
    observers = _observers(images, labels, models, cfg)
    pool = _pool(images, labels, models)
    plain, _, _ = synthesize_class_unit(0, [0, 1], models, observers, pool, cfg, MEAN, STD)
    cfg.synthesis.jitter = 2
    jittered, _, _ = synthesize_class_unit(0, [0, 1], models, observers, pool, cfg, MEAN, STD)
    again, _, _ = synthesize_class_unit(0, [0, 1], models, observers, pool, cfg, MEAN, STD)
    assert torch.equal(jittered, again) and not torch.equal(jittered, plain)


def test_condense_api_end_to_end(tiny):
    images, labels, models = tiny
    cfg = _cfg(iterations=10)
    a_images, a_labels = condense(models, images, labels, 3, MEAN, STD, cfg)
    b_images, _ = condense(models, images, labels, 3, MEAN, STD, cfg)
    assert a_images.shape == (6, 1, 12, 12) and a_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(a_images, b_images)


def test_reservoir_over_a_stream_equals_a_single_pass_bottom_k(tiny):
    images, labels, _ = tiny
    keys = [f"k{i:04d}" for i in range(len(images))]
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(3)).tolist()  # any arrival order
    priorities = torch.tensor([sample_priority(k, 0) for k in keys], dtype=torch.float64)
    single = bottom_k(Candidates(keys, labels, priorities, torch.zeros(len(keys)), list(images)), 5)
    reservoir = CandidateReservoir(3, 5)
    for start in range(0, len(order), 7):
        batch = order[start:start + 7]
        reservoir.offer(Candidates([keys[i] for i in batch], labels[batch], priorities[batch],
                                   torch.zeros(len(batch)), [images[i] for i in batch]))
    streamed = reservoir.result()
    assert streamed.keys == single.keys and torch.equal(streamed.images(), single.images())
    assert len(reservoir.held) <= 3 * 5


def test_reservoir_keeps_sources_instead_of_bytes_above_the_threshold(tiny):
    images, labels, _ = tiny
    keys = [f"k{i:04d}" for i in range(len(images))]
    priorities = torch.tensor([sample_priority(k, 0) for k in keys], dtype=torch.float64)
    cands = Candidates(keys, labels, priorities, torch.zeros(len(keys)), list(images),
                       [("src", i) for i in range(len(keys))])
    reservoir = CandidateReservoir(3, 5, hold_below=torch.full((3,), 0.5))
    reservoir.offer(cands)
    held = reservoir.result()
    assert held.keys == bottom_k(cands, 5).keys  # the sample does not change
    for priority, payload, source in zip(held.priorities.tolist(), held.payloads, held.sources):
        assert (payload is None) == (priority > 0.5) and source is not None
