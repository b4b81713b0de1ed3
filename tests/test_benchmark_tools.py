"""The measurement commands' own pieces: the ImageNet-shaped generator and the Ray-free GPU timing script."""
import pytest

from benchmarks import gpu, scale
from edc_ray.storage.shards import iter_samples


def test_imagenet_shaped_data_has_1000_interleaved_classes(tmp_path):
    info = scale.generate(str(tmp_path / "data"), 2000)
    assert len(info.classes) == 1000 and info.image_size == 32 and info.channels == 3
    train = info.splits["train"]
    assert train.num_samples == 2000 and train.shard_lengths == [1000, 1000] and set(train.counts_per_class) == {2}
    labels = [label for _, _, label in iter_samples(list(info.shard_list(str(tmp_path / "data"), "train").urls)[:1])]
    assert len(set(labels)) > 500  # one shard holds most classes, as real ImageNet shards do
    assert scale.generate(str(tmp_path / "data"), 2000) == info  # reused, not regenerated


@pytest.mark.slow
def test_gpu_timing_script_runs_anywhere():
    result = gpu.main(["--device", "cpu", "--size", "64", "--quick", "--precisions", "fp32", "bf16"])
    for precision in ("fp32", "bf16"):
        rates = result[precision]
        assert all(rates[k] > 0 for k in ("statistics_images_per_s", "synthesis_iterations_per_s",
                                          "student_steps_per_s"))
        estimate = rates["imagenet1k_ipc10_estimate"]
        assert estimate["total_min"] == pytest.approx(sum(estimate[k] for k in ("statistics_min", "synthesis_min",
                                                                                 "evaluation_min")))
