"""Schedules, EMA and the student step."""
import math

import pytest
import torch

from edc_ray.algo.student import (ModelEMA, evaluate_counts, lr_factor, train_student)
from edc_ray.config import EvaluationConfig
from edc_ray.models import create_model
from tiny import MEAN, STD, make_tiny, tiny_observers


def test_smooth_schedule_zeta2_ends_at_half():
    cfg = EvaluationConfig(schedule="smooth", zeta=2.0)
    assert lr_factor(0, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_zeta1_is_plain_cosine():
    cfg = EvaluationConfig(schedule="smooth", zeta=1.0)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5)


def test_multistep_schedule():
    cfg = EvaluationConfig(schedule="multistep", milestones=[800, 900, 950], gamma=0.5)
    assert [lr_factor(e, 1000, cfg) for e in (0, 799, 800, 900, 950, 999)] == \
        [1.0, 1.0, 0.5, 0.25, 0.125, 0.125]


def test_ssrs_smooth_then_linear_drop():
    cfg = EvaluationConfig(schedule="ssrs", zeta=2.0)
    smooth = EvaluationConfig(schedule="smooth", zeta=2.0)
    assert lr_factor(60, 120, cfg) == lr_factor(60, 120, smooth)
    knee = lr_factor(100, 120, cfg)
    assert knee == pytest.approx(lr_factor(100, 120, smooth))
    assert lr_factor(110, 120, cfg) == pytest.approx(knee / 2)
    assert lr_factor(120, 120, cfg) == pytest.approx(0.0)


def test_model_ema_update():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.99)
    ema.updates = 10_000  # past the warm-up: d = 0.99
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.99 * 1 + 0.01 * 3))
    assert not ema.module.weight.requires_grad


def test_model_ema_warms_up_and_averages_batchnorm_buffers():
    model = torch.nn.BatchNorm1d(1)
    ema = ModelEMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(4.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model)  # first step: d = min(0.99, 1 / 10) = 0.1
    assert torch.allclose(ema.module.weight, torch.tensor([0.1 * 1 + 0.9 * 2]))
    assert torch.allclose(ema.module.running_mean, torch.tensor([0.9 * 4.0]))
    assert int(ema.module.num_batches_tracked) == 7


def test_evaluate_counts():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
    images = torch.tensor([[[[255, 0], [0, 0]]], [[[0, 255], [0, 0]]], [[[255, 0], [0, 0]]]],
                          dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1])
    assert evaluate_counts(model, images, labels, [0.0], [1.0], batch_size=2) == (2, 3)


@pytest.fixture(scope="module")
def tiny():
    images, labels = make_tiny()
    return images, labels, tiny_observers(images, labels)


@pytest.mark.parametrize("loss", ["mse_ce", "kl"])
def test_train_student_learns_and_is_deterministic(tiny, loss):
    images, labels, teachers = tiny
    cfg = EvaluationConfig(epochs=8, batch_size=10, loss=loss, eval_every=4)
    subset = torch.arange(0, len(images), 4)  # 15 training images, 5 per class

    def run():
        torch.manual_seed(0)
        student = create_model("convnet", num_classes=3, in_chans=1, image_size=12, depth=2, width=8)
        return train_student(student, teachers, images[subset], labels[subset], cfg, MEAN, STD,
                             val=(images, labels), seed=3)

    a, b = run(), run()
    assert a["final_top1"] == b["final_top1"] and a["history"] == b["history"]
    assert [r["epoch"] for r in a["history"] if "top1" in r] == [4, 8]
    assert a["final_top1"] > 100 / 3 + 10  # well above chance on this easy set
