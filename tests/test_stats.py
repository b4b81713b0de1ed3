"""Statistic hooks and accumulators: hand computations and exact sharded reduction."""
import pytest
import torch
from torch import nn

from edc_ray.algo.stats import (ClassStatSums, StatisticHooks, batch_statistics, compute_targets,
                                hooked_layers, image_statistics, patch_resize, split_moments)
from edc_ray.models import create_model


def test_batch_channel_statistics_hand_computed():
    h = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])  # B2 C2 H1 W2
    stats = batch_statistics(h, patch=None)
    assert torch.allclose(stats["mean"], torch.tensor([4.0, 1.0]))
    assert torch.allclose(stats["var"], torch.tensor([5.0, 1.0]))  # population variance


def test_patch_statistics_hand_computed():
    h = torch.arange(16.0).view(1, 1, 4, 4)
    stats = batch_statistics(h, patch=2)
    # top-left patch: 0 1 4 5 -> mean 2.5, var 4.25
    assert stats["patch_mean"].shape == (2, 2)
    assert stats["patch_mean"][0, 0].item() == pytest.approx(2.5)
    assert stats["patch_var"][0, 0].item() == pytest.approx(4.25)
    assert stats["patch_mean"][1, 1].item() == pytest.approx(12.5)


def test_patch_resize_to_a_multiple():
    assert patch_resize(torch.ones(2, 3, 7, 7), 4).shape == (2, 3, 8, 8)
    assert patch_resize(torch.ones(1, 1, 3, 3), 4).shape == (1, 1, 4, 4)
    h = torch.randn(1, 2, 8, 8)
    assert patch_resize(h, 4) is h
    assert batch_statistics(torch.ones(2, 3, 7, 7), 4)["patch_mean"].shape == (2, 2)


def test_image_statistics_per_image():
    h = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 5.0]]]])  # B2 C1 H1 W2
    stats = image_statistics(h, patch=None)
    assert torch.allclose(stats["mean"], torch.tensor([[2.0], [5.0]]))
    assert torch.allclose(stats["var"], torch.tensor([[1.0], [0.0]]))
    assert torch.allclose(stats["sq"], torch.tensor([[5.0], [25.0]]))


def test_hooked_layers_order_and_kinds():
    model = create_model("convnet_bn", num_classes=3, in_chans=1, image_size=8, depth=2, width=4)
    layers = hooked_layers(model)
    assert [layer.kind for layer in layers] == ["conv", "bn", "conv", "bn"]
    assert layers[0].module is next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert [layer.kind for layer in hooked_layers(model, bn=False)] == ["conv", "conv"]


def test_hooks_record_only_inside_capture():
    model = create_model("convnet", num_classes=3, in_chans=1, image_size=8, depth=1, width=4)
    hooks = StatisticHooks(hooked_layers(model))
    model(torch.randn(2, 1, 8, 8))
    assert hooks.records == [None]
    with hooks.capture() as records:
        model(torch.randn(2, 1, 8, 8))
    assert records[0].shape == (2 * (1 + 4),)  # the 1-channel image: sums over the image, 2x2 patches; squares
    moments = hooks.batch_moments()
    assert moments.shape == (2 * (1 + 4),)
    assert set(split_moments(moments, 1, patch=True)) == {"mean", "var", "patch_mean", "patch_var"}
    hooks.remove()


def _sums(model, batches, num_classes=3):
    layers = hooked_layers(model, patch=4)
    hooks = StatisticHooks(layers, mode="image")
    sums = ClassStatSums(num_classes)
    with torch.no_grad():
        for x, y in batches:
            with hooks.capture() as records:
                model(x)
            sums.add(records, y)
    hooks.remove()
    return sums, layers


def test_sharded_sums_equal_single_pass_exactly():
    torch.manual_seed(0)
    model = create_model("convnet_bn", num_classes=3, in_chans=1, image_size=8, depth=2, width=4).eval()
    batches = [(torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))) for _ in range(6)]
    single, _ = _sums(model, batches)
    parts = [_sums(model, batches[i:i + 2])[0] for i in (4, 0, 2)]  # any grouping, any order
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(merged.counts, single.counts)
    for a, b in zip(merged.sums, single.sums):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_targets_match_direct_computation():
    torch.manual_seed(1)
    model = create_model("convnet_bn", num_classes=2, in_chans=1, image_size=8, depth=1, width=4).eval()
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    sums, layers = _sums(model, [(x[:3], y[:3]), (x[3:], y[3:])], num_classes=2)
    targets = compute_targets(sums.totals(), sums, layers)
    conv_t, bn_t = targets[0], targets[1]
    # conv input = the images: global = pixel moments over the whole set
    assert torch.allclose(conv_t.global_["mean"], x.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(conv_t.global_["var"], x.var((0, 2, 3), unbiased=False), atol=1e-5)
    # per class: mean over the class's images of each image's spatial mean / variance
    cls1 = x[y == 1]
    assert torch.allclose(conv_t.per_class["mean"][1], cls1.mean((2, 3)).mean(0), atol=1e-6)
    assert torch.allclose(conv_t.per_class["var"][1], cls1.var((2, 3), unbiased=False).mean(0), atol=1e-5)
    pm = cls1.reshape(3, 1, 2, 4, 2, 4).mean((1, 3, 5)).mean(0)
    assert torch.allclose(conv_t.per_class["patch_mean"][1], pm, atol=1e-6)
    # BN global targets: the layer's running statistics
    bn = layers[1].module
    assert torch.equal(bn_t.global_["mean"], bn.running_mean.float())
    assert torch.equal(bn_t.global_["var"], bn.running_var.float())
    assert "patch_mean" not in bn_t.global_


def test_state_dict_round_trip_and_merge_rejects_mismatch():
    s = ClassStatSums(2)
    s.add([{"mean": torch.ones(2, 3)}], torch.tensor([0, 1]))
    again = ClassStatSums.from_state_dict(s.state_dict())
    assert torch.equal(again.sums[0]["mean"], s.sums[0]["mean"])
    with pytest.raises(ValueError, match="3 and 2 classes|2 and 3 classes"):
        s.merge(ClassStatSums(3))


def test_blocks_and_totals_recombine_the_class_sums():
    torch.manual_seed(2)
    model = create_model("convnet_bn", num_classes=5, in_chans=1, image_size=8, depth=2, width=4).eval()
    batches = [(torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))) for _ in range(3)]
    sums, layers = _sums(model, batches, num_classes=5)
    parts = [sums.block(0, 2), sums.block(2, 5)]
    again = ClassStatSums.concat(parts)
    assert torch.equal(again.counts, sums.counts)
    totals = parts[0].totals().merge(parts[1].totals())
    assert totals.count == int(sums.counts.sum())
    for a, b, t in zip(again.sums, sums.sums, totals.sums):
        for key in a:
            assert torch.equal(a[key], b[key]) and torch.equal(t[key], b[key].sum(0)), key
    # targets of a subset of classes: the same rows as those of all classes
    full = compute_targets(sums.totals(), sums, layers)
    subset = compute_targets(totals, sums.block(3, 5), layers)
    for f, s in zip(full, subset):
        assert all(torch.equal(f.global_[k], s.global_[k]) for k in f.global_)
        assert all(torch.equal(f.per_class[k][3:5], s.per_class[k]) for k in f.per_class)


def test_out_of_range_statistics_are_refused_when_read():
    s = ClassStatSums(1)
    s.add([{"mean": torch.tensor([[float("inf")]])}], torch.tensor([0]))  # no host sync while adding
    with pytest.raises(OverflowError, match="fixed-point range"):
        s.state_dict()
