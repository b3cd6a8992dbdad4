"""DenseNet-BC for CIFAR (densenet40_12: growth 12, 6 bottleneck layers per block).

DenseNet is pre-activation (BN-ReLU-conv): the 1x1 bottleneck conv is followed by
BN and is a conv+BN unit, but the 3x3 conv, the stem and the transition convs feed
the next layer's BN through a concatenation, so they are convs with bias and no BN
(in the RSD form, each branch a conv with bias, as in the paper's code). Their
pre-activation BNs belong to the architecture and stay (as :class:`Affine2d` when
deployed).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ..blocks import Form, conv_block, norm_layer
from .base import StagedNet, classifier_head
from .registry import register


class DenseLayer(nn.Module):
    def __init__(self, form: Form, in_channels: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.norm = norm_layer(form, in_channels)
        self.conv1 = conv_block(form, in_channels, bottleneck * growth, 1)  # 1x1 conv + BN
        self.conv2 = conv_block(form, bottleneck * growth, growth, 3, bn=False)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.norm(x)))
        out = self.conv2(self.relu(out))
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    def __init__(self, form: Form, in_channels: int, out_channels: int) -> None:
        super().__init__(
            norm_layer(form, in_channels),
            nn.ReLU(),
            conv_block(form, in_channels, out_channels, 1, bn=False),
            nn.AvgPool2d(2, 2),
        )


def densenet_bc(
    depth: int, growth: int, *, form: Form, num_classes: int, in_channels: int,
    compression: float = 0.5, bottleneck: int = 4,
) -> StagedNet:
    """DenseNet-BC of ``depth`` with ``(depth - 4) / 6`` bottleneck layers per block."""
    n = (depth - 4) // 6
    channels = 2 * growth
    stem = conv_block(form, in_channels, channels, 3, bn=False)
    stages = []
    for i in range(3):
        layers: list[nn.Module] = []
        for _ in range(n):
            layers.append(DenseLayer(form, channels, growth, bottleneck))
            channels += growth
        if i < 2:
            out = int(channels * compression)
            layers.append(Transition(form, channels, out))
            channels = out
        stages.append(nn.Sequential(*layers))
    head = classifier_head(channels, num_classes, norm_layer(form, channels), nn.ReLU())
    return StagedNet(stem, stages, head)


register(
    "densenet40_12", family="cifar", input_size=32, builder=partial(densenet_bc, 40, 12)
)
