"""Streaming shards split by rank and dataloader worker: partitions, equal steps, exact validation."""
import itertools

import pytest
import torch

from edc_ray.algo.student import count_correct, evaluate_counts
from edc_ray.models import create_model
from edc_ray.pipeline.evaluation import report_interval
from edc_ray.pipeline.streaming import (rank_sample_counts, shuffled, split_stream,
                                        steps_every_rank_can_take)
from edc_ray.storage.prepare import prepare_dataset
from edc_ray.storage.shards import SampleSpec, load_split


@pytest.mark.parametrize("steps_per_epoch, epochs_between_reports",
                         [(1, 50), (4, 13), (10, 5), (50, 1), (400, 1)])
def test_student_reports_about_every_fifty_steps(steps_per_epoch, epochs_between_reports):
    assert report_interval(steps_per_epoch) == epochs_between_reports


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("digits"))
    return root, prepare_dataset("digits", None, root, shard_size=50)


def test_rank_counts_and_equal_steps():
    counts = [50, 50, 50, 10]
    assert rank_sample_counts(counts, 2) == [100, 60]
    assert steps_every_rank_can_take(counts, 2, 16) == 3  # 60 // 16: rank 1 can fill 3 batches
    assert steps_every_rank_can_take(counts, 5, 16) == 1  # a rank without shards still gets a step


def test_shuffle_buffer_is_a_seeded_permutation():
    a = list(shuffled(range(100), 10, torch.Generator().manual_seed(0)))
    b = list(shuffled(range(100), 10, torch.Generator().manual_seed(0)))
    assert a == b and sorted(a) == list(range(100)) and a != list(range(100))


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (3, 2)])
def test_ranks_and_workers_partition_the_split(digits, world, workers):
    root, info = digits
    labels = torch.cat([y for r in range(world) for _, y in split_stream(info.shard_list(root, "test"), SampleSpec.of(info), r, world, 32, workers)])
    assert len(labels) == info.splits["test"].num_samples
    assert torch.equal(torch.bincount(labels, minlength=10),
                       torch.tensor(info.splits["test"].counts_per_class))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_streamed_validation_equals_single_process(digits, world):
    root, info = digits
    torch.manual_seed(0)
    model = create_model("convnet_d2", 10, 1, 8).eval()
    images, labels, _ = load_split(root, "test")
    expected = evaluate_counts(model, images, labels, info.mean, info.std)
    parts = [count_correct(model, split_stream(info.shard_list(root, "test"), SampleSpec.of(info), r, world, 64), info.mean, info.std)
             for r in range(world)]
    assert (sum(p[0] for p in parts), sum(p[1] for p in parts)) == expected


def test_a_repeating_stream_never_runs_short(digits):
    root, info = digits
    shards = info.shard_list(root, "test")
    stream = split_stream(shards, SampleSpec.of(info), 0, 1, 100, shuffle=20, seed=1, repeat=True)
    batches = [y for _, y in itertools.islice(stream, 8)]  # 800 samples from a split of 360
    assert len(batches) == 8 and all(len(y) == 100 for y in batches)
