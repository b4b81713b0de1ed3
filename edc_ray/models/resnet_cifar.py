"""ResNet-18 adapted to small images (He et al., "Deep Residual Learning"; the CIFAR variant used by the
dataset-condensation literature): a 3x3 stride-1 stem without max-pool keeps 32px inputs at full resolution
for the first stage."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edc_ray.models.registry import register_model


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm always follows or precedes it)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def make_stage(
    block: Callable[[int, int, int], nn.Module], in_channels: int, out_channels: int, count: int, stride: int
) -> nn.Sequential:
    """``count`` residual blocks ``block(in, out, stride)``; only the first changes width and resolution."""
    blocks = [block(in_channels, out_channels, stride)]
    blocks += [block(out_channels, out_channels, 1) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1 conv-BN one when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(F(x) + shortcut(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@register_model("resnet18_cifar", blocks=(2, 2, 2, 2))
class CifarResNet(nn.Module):
    """CIFAR-style ResNet with BasicBlocks and stage widths ``width`` x (1, 2, 4, 8); ``image_size`` is
    unused (global average pooling)."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 32,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(in_chans, width), nn.BatchNorm2d(width), nn.ReLU())
        stages = []
        in_channels = width
        for index, count in enumerate(blocks):
            out_channels = width * 2**index
            stride = 1 if index == 0 else 2
            stages.append(make_stage(BasicBlock, in_channels, out_channels, count, stride))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))
