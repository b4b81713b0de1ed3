"""The fused matching loss and synthesis step against the per-layer, per-statistic formulation.

`reference_*` below is the synthesis step as it was written before the matching was fused (a loop over
layers and statistics, autograd through every reduction); the fused step must give the same loss,
gradients and optimised images at fp32.
"""
import pytest
import torch
import torch.nn.functional as F

from edc_ray.algo.augment import random_crop_thetas
from edc_ray.algo.losses import flatness_kl, smoothed_statistic
from edc_ray.algo.matching import MatchingPlan, layer_weights
from edc_ray.algo.stats import (ClassStatSums, LayerTargets, StatisticHooks, batch_statistics, compute_targets,
                                hooked_layers, layer_moments, patch_resize)
from edc_ray.algo.synthesis import Observer, augmented, synthesize_unit
from edc_ray.config import SynthesisConfig
from edc_ray.models import create_model


def reference_batch_statistics(h, patch):
    mean, sq = h.mean((0, 2, 3)), (h * h).mean((0, 2, 3))
    out = {"mean": mean, "var": (sq - mean ** 2).clamp(min=0)}
    if patch:
        r = patch_resize(h, patch)
        pm = F.avg_pool2d(r.mean(1, keepdim=True), patch)[:, 0].mean(0)
        pq = F.avg_pool2d((r * r).mean(1, keepdim=True), patch)[:, 0].mean(0)
        out.update(patch_mean=pm, patch_var=(pq - pm ** 2).clamp(min=0))
    return out


def reference_layer_loss(stats, targets, labels_rows, alpha):
    loss = stats["mean"].new_zeros(())
    for key, value in stats.items():
        g, c = targets.global_[key], targets.per_class[key][labels_rows].mean(0)
        loss = loss + alpha * torch.linalg.vector_norm(g - value) + (1 - alpha) * torch.linalg.vector_norm(c - value)
    return loss


def reference_regulariser(records, observer, rows, cfg, running):
    total = torch.zeros(())
    for i, (stats, targets, w) in enumerate(zip(records, observer.targets,
                                                layer_weights(len(records), cfg.first_layer_weight))):
        smoothed = {}
        for key, value in stats.items():
            smoothed[key], running[(i, key)] = smoothed_statistic(value, running.get((i, key)), cfg.stat_momentum)
        total = total + w * reference_layer_loss(smoothed, targets, rows, cfg.alpha)
    return total


def reference_synthesize(x_init, labels, observers, cfg, bounds, seed):
    """The pre-fusion loop: same draws, per-layer/per-statistic losses, per-iteration host reads."""
    generator = torch.Generator().manual_seed(seed)
    x, x_ema = x_init.clone().requires_grad_(True), x_init.clone()
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=tuple(cfg.betas))
    running = [{} for _ in observers]
    rows = [o.class_rows(labels) for o in observers]
    import math
    for t in range(cfg.iterations):
        k = t % len(observers)
        obs = observers[k]
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * t / cfg.iterations))
        thetas = random_crop_thetas(x, (cfg.min_scale, 1.0), cfg.flip, generator)
        records = [None] * len(obs.layers)
        handles = [layer.module.register_forward_pre_hook(
            lambda m, inp, i=i, p=layer.patch: records.__setitem__(i, reference_batch_statistics(inp[0], p)))
            for i, layer in enumerate(obs.layers)]
        logits = obs.model(augmented(x, thetas, None))
        for h in handles:
            h.remove()
        loss = cfg.ce_weight * F.cross_entropy(logits, labels) + cfg.r * reference_regulariser(
            records, obs, rows[k], cfg, running[k])
        if cfg.flatness_weight > 0:
            with torch.no_grad():
                ema_logits = obs.model(augmented(x_ema, thetas, None))
            loss = loss + cfg.flatness_weight * flatness_kl(logits, ema_logits, cfg.flatness_tau)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
            x_ema.mul_(cfg.flatness_beta).add_(x, alpha=1 - cfg.flatness_beta)
    return x.detach()


def _observers(patch=4, size=12, classes=3):
    torch.manual_seed(0)
    observers = []
    for arch in ("convnet_bn", "convnet"):
        model = create_model(arch, num_classes=classes, in_chans=1, image_size=size, depth=2, width=6).eval()
        layers = hooked_layers(model, patch=patch)
        hooks = StatisticHooks(layers, mode="image")
        sums = ClassStatSums(classes)
        with torch.no_grad(), hooks.capture() as records:
            model(torch.randn(30, 1, size, size))
        sums.add(records, torch.arange(30) % classes)
        hooks.remove()
        observers.append(Observer(model, layers, compute_targets(sums.totals(), sums, layers), list(range(classes))))
    return observers


@pytest.mark.parametrize("shape, patch", [((4, 3, 8, 8), 4), ((3, 2, 7, 9), 4), ((2, 5, 6, 6), None)])
def test_layer_moments_value_and_gradient_match_autograd(shape, patch):
    h = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).float()
    stats = batch_statistics(h, patch)
    reference = reference_batch_statistics(h.double(), patch)
    for key, value in reference.items():
        assert torch.allclose(stats[key].double(), value, atol=1e-5), key
    weights = torch.randn(len(layer_moments(h, patch)))
    a, b = h.clone().requires_grad_(True), h.double().clone().requires_grad_(True)
    (layer_moments(a, patch) * weights).sum().backward()
    ref = reference_batch_statistics(b, patch)
    block = torch.cat([ref["mean"]] + ([ref["patch_mean"].flatten()] if patch else []) + [ref["var"]] +
                      ([ref["patch_var"].flatten()] if patch else []))
    (block * weights.double()).sum().backward()
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_plan_equals_the_per_layer_loss(alpha):
    observers = _observers()
    labels = torch.tensor([0, 0, 2, 1])
    x = torch.randn(4, 1, 12, 12)
    cfg = SynthesisConfig(alpha=alpha)
    for obs in observers:
        plan = obs.plan(labels, cfg, "cpu")
        hooks = StatisticHooks(obs.layers)
        with hooks.capture():
            obs.model(x)
        hooks.remove()
        fused, _ = plan.loss(hooks.batch_moments(), None, 0.0)
        records = [None] * len(obs.layers)
        handles = [layer.module.register_forward_pre_hook(
            lambda m, inp, i=i, p=layer.patch: records.__setitem__(i, reference_batch_statistics(inp[0], p)))
            for i, layer in enumerate(obs.layers)]
        obs.model(x)
        for h in handles:
            h.remove()
        reference = reference_regulariser(records, obs, obs.class_rows(labels), SynthesisConfig(alpha=alpha,
                                                                                                stat_momentum=0.0), {})
        assert fused.item() == pytest.approx(reference.item(), rel=1e-5)


def test_plan_hand_computed_with_plain_norms():
    targets = [LayerTargets("bn", {"mean": torch.tensor([30.0, 40.0]), "var": torch.tensor([1.0, 1.0])},
                            {"mean": torch.zeros(1, 2), "var": torch.ones(1, 2)})]
    plan = MatchingPlan.build(targets, torch.tensor([0, 0]), alpha=1.0, first_layer_weight=10.0)
    block = torch.tensor([0.0, 0.0, 1.0, 4.0], requires_grad=True)  # mean (0, 0), var (1, 4)
    loss, _ = plan.loss(block, None, 0.0)
    assert loss.item() == pytest.approx(10 * (50.0 + 3.0))  # first-layer weight x (||(30, 40)|| + ||(0, -3)||)
    loss.backward()
    assert torch.allclose(block.grad, torch.tensor([-6.0, -8.0, 0.0, 10.0]))  # unit vectors, times 10


@pytest.mark.parametrize("overrides", [{}, {"flatness_weight": 0.0, "alpha": 1.0}, {"stat_momentum": 0.0}])
def test_fused_synthesis_equals_the_reference_loop_at_fp32(overrides):
    observers, x0, labels, bounds = _unit()
    cfg = SynthesisConfig(iterations=12, r=1.0, precision="fp32", **overrides)
    fused = synthesize_unit(x0, labels, observers, cfg, bounds, seed=5).images
    reference = reference_synthesize(x0, labels, observers, cfg, bounds, seed=5)
    assert torch.allclose(fused, reference, atol=1e-4), (fused - reference).abs().max()
    assert not torch.allclose(fused, x0, atol=1e-3)  # it did optimise


def _unit():
    """Observers, starting images, labels and pixel bounds of a small unit."""
    x0 = torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    return _observers(), x0, torch.tensor([0, 0, 1, 1, 2, 2]), (torch.full((1, 1, 1, 1), -2.0),
                                                              torch.full((1, 1, 1, 1), 2.0))


def test_bf16_synthesis_runs_on_cpu_and_stays_close():
    observers, x0, labels, bounds = _unit()
    out = {p: synthesize_unit(x0, labels, observers, SynthesisConfig(iterations=8, precision=p), bounds, seed=5)
           for p in ("fp32", "bf16")}
    assert out["bf16"].images.dtype == torch.float32 and torch.isfinite(out["bf16"].images).all()
    assert (out["bf16"].images - out["fp32"].images).abs().max() < 0.2
    assert len(out["bf16"].history) == 8 and set(out["bf16"].history[0]) == {"ce", "match", "flat", "loss"}


def test_progress_sees_the_loss_every_k_iterations():
    observers = _observers()
    seen = []
    x0 = torch.randn(3, 1, 12, 12)
    cfg = SynthesisConfig(iterations=10)
    bounds = (torch.full((1, 1, 1, 1), -2.0), torch.full((1, 1, 1, 1), 2.0))
    result = synthesize_unit(x0, torch.tensor([0, 1, 2]), observers, cfg, bounds, 0,
                             progress=lambda t, terms: seen.append((t, terms["loss"])), progress_every=4)
    assert [t for t, _ in seen] == [3, 7, 9]
    assert [loss for _, loss in seen] == [result.history[t]["loss"] for t, _ in seen]


@pytest.mark.slow
def test_compiled_step_gives_the_eager_result():
    observers, x0, labels, bounds = _unit()
    runs = {c: synthesize_unit(x0, labels, observers, SynthesisConfig(iterations=6, compile=c), bounds, seed=2)
            for c in (False, True)}
    assert torch.allclose(runs[True].images, runs[False].images, atol=1e-4)


def test_layer_sums_of_a_non_contiguous_input():
    h = torch.randn(2, 6, 7, 5).transpose(1, 3)  # (2, 5, 5, 7) strided, as after a channel shuffle
    weights = torch.randn(len(layer_moments(h.contiguous(), 4)))
    a, b = h.clone().requires_grad_(True), h.contiguous().clone().requires_grad_(True)
    (layer_moments(a.transpose(1, 3).transpose(1, 3), 4) * weights).sum().backward()
    (layer_moments(b, 4) * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
