"""Hand-computed checks of every synthesis and student loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from edc_ray.algo.losses import flatness_kl, kl_distill_loss, mse_ce_loss, smoothed_statistic, soft_cross_entropy
from edc_ray.algo.matching import MatchingPlan
from edc_ray.algo.stats import LayerTargets


def test_smoothed_statistic_value_is_ema_gradient_is_current():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    current = x.mean()  # 2
    value, running = smoothed_statistic(current, torch.tensor(4.0), momentum=0.8)
    assert value.item() == pytest.approx(0.8 * 4 + 0.2 * 2)  # 3.6
    assert running.item() == pytest.approx(3.6) and not running.requires_grad
    value.backward()
    assert torch.allclose(x.grad, torch.full((3,), 1 / 3))  # d mean / dx, not scaled by (1 - m)


def test_smoothed_statistic_starts_from_first_value():
    x = torch.tensor([5.0], requires_grad=True)
    value, running = smoothed_statistic(x * 2, None, momentum=0.8)
    assert value.item() == 10.0 and running.item() == 10.0


def _targets():
    return LayerTargets(
        "conv",
        {"mean": torch.tensor([3.0, 4.0]), "var": torch.tensor([1.0, 1.0])},
        {"mean": torch.tensor([[0.0, 0.0], [6.0, 8.0]]), "var": torch.tensor([[1.0, 1.0], [1.0, 1.0]])},
    )


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_soft_category_aware_matching_hand_computed(alpha):
    block = torch.tensor([0.0, 0.0, 1.0, 3.0])  # mean (0, 0), var (1, 3)
    rows = torch.tensor([1, 1, 0, 0])  # label-frequency class average of means: (3, 4)
    # global: ||(3,4)|| + ||(0,-2)|| = 5 + 2; class: ||(3,4)|| + ||(0,-2)|| = 7
    plan = MatchingPlan.build([_targets()], rows, alpha, first_layer_weight=1.0)
    assert plan.loss(block, None, 0.0)[0].item() == pytest.approx(alpha * 7 + (1 - alpha) * 7)
    plan = MatchingPlan.build([_targets()], torch.tensor([0, 0]), alpha, first_layer_weight=1.0)
    # class average (0, 0): the class mean term vanishes -> 0 + 2
    assert plan.loss(block, None, 0.0)[0].item() == pytest.approx(alpha * 7 + (1 - alpha) * 2)


def test_flatness_kl_hand_computed_and_zero_when_equal():
    a = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4) at tau 1
    b = torch.tensor([[0.0, 0.0]])  # (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert flatness_kl(a, b, tau=1.0).item() == pytest.approx(expected)
    assert flatness_kl(a, a, tau=4.0).item() == pytest.approx(0.0, abs=1e-7)
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    ema = torch.tensor([[0.0, 0.0]], requires_grad=True)
    flatness_kl(z, ema, 4.0).backward()
    assert ema.grad is None and z.grad is not None  # the EMA side is a constant


def test_kl_distill_matches_torch_kl_div():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    ref = F.kl_div(F.log_softmax(s / 20, 1), F.softmax(t / 20, 1), reduction="batchmean")
    assert kl_distill_loss(s, t, 20.0).item() == pytest.approx(ref.item(), abs=1e-6)


def test_mse_ce_hand_computed():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[1.0, 3.0]])
    # MSE = (1 + 9) / 2 = 5; CE(uniform, y) = log 2
    out = mse_ce_loss(s, t, torch.tensor([1]), ce_weight=0.025)
    assert out.item() == pytest.approx(5 + 0.025 * math.log(2))


def test_cutmix_cross_entropy_mixes_labels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    perm = torch.tensor([1, 0])
    lam = 0.25
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert soft_cross_entropy(logits, y, perm, lam).item() == pytest.approx(expected.item())
