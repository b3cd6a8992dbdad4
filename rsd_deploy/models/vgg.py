"""CIFAR VGG with batch norm, global average pooling and one linear layer."""

from __future__ import annotations

from functools import partial

from torch import nn

from ..blocks import Form, conv_block
from .base import StagedNet, classifier_head
from .registry import register

#: Output channels of each conv, grouped by stage; stages 1-4 end with a 2x2 max pool,
#: the last one with the head's global average pool.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _convs(form: Form, in_channels: int, widths: tuple[int, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [conv_block(form, in_channels, width, 3), nn.ReLU(inplace=True)]
        in_channels = width
    return layers


def vgg(
    cfg: tuple[tuple[int, ...], ...], *, form: Form, num_classes: int, in_channels: int
) -> StagedNet:
    """Build a VGG; the stem is the first conv, each stage the rest of a conv group."""
    first = cfg[0][0]
    stem = nn.Sequential(*_convs(form, in_channels, (first,)))
    stages, channels = [], first
    for i, widths in enumerate(cfg):
        widths = widths[1:] if i == 0 else widths
        layers = _convs(form, channels, widths)
        channels = widths[-1] if widths else channels
        if i < len(cfg) - 1:
            layers.append(nn.MaxPool2d(2, 2))
        stages.append(nn.Sequential(*layers))
    return StagedNet(stem, stages, classifier_head(channels, num_classes))


for _name, _cfg in CONFIGS.items():
    register(_name, family="cifar", input_size=32, builder=partial(vgg, _cfg))
