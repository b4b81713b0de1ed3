"""Soft category-aware statistic matching over all hooked layers at once (METHOD.md 1.4, steps 4-5).

    R = sum_l w_l [ alpha * sum_s ||s_global - s_hat|| + (1 - alpha) * sum_s ||s_class - s_hat|| ]

Every statistic of every hooked layer is one segment of a flat vector (layer by layer, each layer's
block: mean, patch mean, variance, patch variance; `StatisticHooks.batch_moments`), so the moments,
the momentum smoothing, the distances to both targets, the per-segment L2 norms and the weighted sum
are a handful of kernels per observer whatever its depth, instead of a Python loop per layer and
statistic. The class target of a unit is fixed for the whole unit (its labels do not change),
so it is averaged once, when the plan is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from edc_ray.algo.losses import smoothed_statistic
from edc_ray.algo.stats import LayerTargets

BLOCK_KEYS = ("mean", "patch_mean", "var", "patch_var")  # a layer's block, as `block_moments` lays it out
_TINY = 1e-30  # below this a squared distance counts as zero: the norm's gradient there is 0, not NaN


def layer_weights(count: int, first_layer_weight: float) -> list[float]:
    """w_l: `first_layer_weight` for the first hooked layer, 1 for the others."""
    return [first_layer_weight if i == 0 else 1.0 for i in range(count)]


@dataclass
class MatchingPlan:
    """One observer's matching for one unit: flat targets, the segment of every value, segment weights.

    `targets` (R, n) holds the global and/or class-average targets (rows with zero weight are left out,
    so alpha 0 or 1 costs one row); `weights` (R, S) the weight of each segment in each row.
    """

    targets: torch.Tensor
    weights: torch.Tensor
    segments: torch.Tensor  # (n,) int64
    num_segments: int

    @classmethod
    def build(cls, targets: Sequence[LayerTargets], class_rows: torch.Tensor, alpha: float,
              first_layer_weight: float, device: torch.device | str = "cpu") -> "MatchingPlan":
        """The plan for images whose classes are rows `class_rows` (B,) of the targets' `per_class`."""
        w = layer_weights(len(targets), first_layer_weight)
        rows = class_rows.cpu()
        glob, cls_avg, seg_sizes, seg_weights = [], [], [], []
        for target, weight in zip(targets, w):
            for key in BLOCK_KEYS:
                if key not in target.global_:
                    continue
                glob.append(target.global_[key].reshape(-1))
                cls_avg.append(target.per_class[key][rows].mean(0).reshape(-1))
                seg_sizes.append(glob[-1].numel())
                seg_weights.append(weight)
        seg_w = torch.tensor(seg_weights)
        if not glob:  # nothing to match (e.g. BN matching of an observer without BatchNorm)
            glob = cls_avg = [torch.zeros(0)]
        pairs = [(torch.cat(glob), alpha * seg_w), (torch.cat(cls_avg), (1 - alpha) * seg_w)]
        kept = [(t, sw) for t, sw in pairs if bool((sw != 0).any())] or pairs[:1]
        segments = torch.repeat_interleave(torch.arange(len(seg_sizes)), torch.tensor(seg_sizes, dtype=torch.long))
        return cls(torch.stack([t for t, _ in kept]).float().to(device),
                   torch.stack([sw for _, sw in kept]).float().to(device), segments.to(device), len(seg_sizes))

    def regulariser(self, flat: torch.Tensor) -> torch.Tensor:
        """sum over rows and segments of weight * ||target_segment - flat_segment||."""
        squared = (self.targets - flat).square()
        per_segment = squared.new_zeros((len(self.targets), self.num_segments)).index_add_(1, self.segments, squared)
        return (per_segment.clamp_min(_TINY).sqrt() * self.weights).sum()

    def loss(self, moments: torch.Tensor, running: torch.Tensor | None,
             momentum: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The regulariser of one forward's flat moments (`StatisticHooks.batch_moments`),
        momentum-smoothed when `momentum` > 0. Returns (loss, new running statistics); `running` None
        starts the EMA.
        """
        if moments.numel() == 0:
            return self.targets.new_zeros(()), running
        if momentum > 0:
            moments, running = smoothed_statistic(moments, running, momentum)
        return self.regulariser(moments), running
