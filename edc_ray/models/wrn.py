"""Wide residual network for small images (Zagoruyko & Komodakis, "Wide Residual Networks"):
pre-activation blocks, three stages of widths 16k, 32k, 64k, (depth - 4) / 6 blocks per stage."""

from __future__ import annotations

import torch
from torch import nn

from edc_ray.models.registry import register_model
from edc_ray.models.resnet_cifar import conv3x3, make_stage


class PreActBlock(nn.Module):
    """BN -> ReLU -> Conv3x3 -> BN -> ReLU -> Conv3x3, plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) + shortcut; a projecting shortcut reads the pre-activated input, as in the WRN paper."""
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


@register_model("wrn16_2", depth=16, widen_factor=2)
class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` with BatchNorm; ``image_size`` is unused (global average pooling)."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 32,
        depth: int = 16,
        widen_factor: int = 2,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        count = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = conv3x3(in_chans, 16)
        self.stages = nn.Sequential(
            make_stage(PreActBlock, 16, widths[0], count, stride=1),
            make_stage(PreActBlock, widths[0], widths[1], count, stride=2),
            make_stage(PreActBlock, widths[1], widths[2], count, stride=2),
        )
        self.head = nn.Sequential(nn.BatchNorm2d(widths[2]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.fc(self.head(self.stages(self.stem(x))))
