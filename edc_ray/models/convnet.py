"""The ConvNet of the dataset-condensation literature (Zhao et al., "Dataset Condensation with Gradient
Matching"): ``depth`` blocks of Conv3x3 -> norm -> ReLU -> AvgPool(2), then one linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from edc_ray.models.registry import register_model

NORMS = ("instance", "batch", "none")


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer named ``norm`` for ``channels`` feature maps.

    "instance" is ``GroupNorm`` with one group per channel: instance normalisation with a per-channel affine,
    as the dataset-condensation ConvNet defines it (``InstanceNorm2d`` has no affine by default).
    """
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


@register_model("convnet_bn", depth=3, width=128, norm="batch")
@register_model("convnet_d3", depth=3)
@register_model("convnet_d2", depth=2)
@register_model("convnet_d1", depth=1)
@register_model("convnet_w32", width=32)
@register_model("convnet_w64", width=64)
@register_model("convnet_w128", width=128)
@register_model("convnet")
class ConvNet(nn.Module):
    """DC ConvNet; the defaults (depth 3, width 128, instance norm) are "ConvNet-3" / "ConvNet-W128".

    The flattened feature size follows from ``image_size``: each block halves it (floor), so 28px input
    ends at 3x3 and 32px at 4x4 with depth 3.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 32,
        depth: int = 3,
        width: int = 128,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        if image_size < 2**depth:
            raise ValueError(f"ConvNet of depth {depth} needs image_size >= {2**depth}, got {image_size}")
        blocks = [_block(in_chans if i == 0 else width, width, norm) for i in range(depth)]
        self.features = nn.Sequential(*blocks)
        feature_size = image_size // 2**depth
        self.classifier = nn.Linear(width * feature_size**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.classifier(self.features(x).flatten(1))


def _block(in_channels: int, width: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
        make_norm(norm, width),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
    )
