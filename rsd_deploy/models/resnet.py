"""ResNets: the CIFAR family (resnet20/32/56/110, wrn20_8) and torchvision-style resnet18/34."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from ..blocks import Form, conv_block
from .base import StagedNet, classifier_head
from .registry import register


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, form: Form, in_channels: int, planes: int, stride: int, width: int) -> None:
        super().__init__()
        self.conv1 = conv_block(form, in_channels, planes, 3, stride)
        self.conv2 = conv_block(form, planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            conv_block(form, in_channels, planes, 1, stride)
            if stride != 1 or in_channels != planes
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, form: Form, in_channels: int, planes: int, stride: int, width: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv_block(form, in_channels, width, 1)
        self.conv2 = conv_block(form, width, width, 3, stride)
        self.conv3 = conv_block(form, width, out_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            conv_block(form, in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        return self.relu(out + identity)


@dataclass(frozen=True)
class ResNetConfig:
    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, ...]  #: blocks per stage
    planes: tuple[int, ...]  #: block width per stage (output is planes * expansion)
    stem: str  #: "cifar" (3x3 conv) or "imagenet" (7x7/2 conv and 3x3/2 max pool)
    stem_width: int
    width_per_group: int = 64  #: bottleneck inner width is planes * width_per_group / 64


def _stem(cfg: ResNetConfig, form: Form, in_channels: int) -> nn.Sequential:
    if cfg.stem == "cifar":
        return nn.Sequential(conv_block(form, in_channels, cfg.stem_width, 3), nn.ReLU(inplace=True))
    return nn.Sequential(
        conv_block(form, in_channels, cfg.stem_width, 7, 2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )


def resnet(cfg: ResNetConfig, *, form: Form, num_classes: int, in_channels: int) -> StagedNet:
    """Build a ResNet from its stage configuration."""
    stages, channels = [], cfg.stem_width
    for i, (n, planes) in enumerate(zip(cfg.layers, cfg.planes, strict=True)):
        width = planes * cfg.width_per_group // 64
        blocks = []
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            blocks.append(cfg.block(form, channels, planes, stride, width))
            channels = planes * cfg.block.expansion
        stages.append(nn.Sequential(*blocks))
    return StagedNet(_stem(cfg, form, in_channels), stages, classifier_head(channels, num_classes))


_CIFAR = (16, 32, 64)
CONFIGS: dict[str, tuple[ResNetConfig, str, int]] = {
    "resnet20": (ResNetConfig(BasicBlock, (3, 3, 3), _CIFAR, "cifar", 16), "cifar", 32),
    "resnet32": (ResNetConfig(BasicBlock, (5, 5, 5), _CIFAR, "cifar", 16), "cifar", 32),
    "resnet56": (ResNetConfig(BasicBlock, (9, 9, 9), _CIFAR, "cifar", 16), "cifar", 32),
    # As in the paper's code: depth 110 with bottleneck blocks, (110 - 2) / 9 = 12 per stage.
    "resnet110": (ResNetConfig(Bottleneck, (12, 12, 12), _CIFAR, "cifar", 16), "cifar", 32),
    # Bottleneck, 2 blocks per stage (depth 2 + 9 * 2 = 20), width per group 512 (8x wider).
    "wrn20_8": (ResNetConfig(Bottleneck, (2, 2, 2), _CIFAR, "cifar", 16, 512), "cifar", 32),
    "resnet18": (
        ResNetConfig(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "imagenet", 64), "imagenet", 224
    ),
    "resnet34": (
        ResNetConfig(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet", 64), "imagenet", 224
    ),
}

for _name, (_cfg, _family, _size) in CONFIGS.items():
    register(_name, family=_family, input_size=_size, builder=partial(resnet, _cfg))
