"""CIFAR VGG with batch norm, global average pooling and one linear layer.

The layout is the RSD authors' CIFAR VGG: five conv groups, a 2x2 max pool after
groups 1-3 only, so groups 4 and 5 both run at 4x4 on a 32x32 image, and the features
are taken after each group's ReLU, before its pool. (Their code adds a pool after
group 4 only for 64x64 inputs; the zoo builds the 32x32 layout.)
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ..blocks import Form, conv_block
from .base import StagedNet, classifier_head
from .registry import register

#: Output channels of each conv, grouped by conv group.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

#: Indices of the conv groups followed by a 2x2 max pool (the authors' 32x32 layout).
POOLED_GROUPS = (0, 1, 2)


def _convs(form: Form, in_channels: int, widths: tuple[int, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [conv_block(form, in_channels, width, 3), nn.ReLU(inplace=True)]
        in_channels = width
    return layers


def vgg(
    cfg: tuple[tuple[int, ...], ...], *, form: Form, num_classes: int, in_channels: int
) -> StagedNet:
    """Build a VGG whose mix points are the five groups' outputs (after ReLU, before pool).

    The stem is group 1; stage ``i`` is the pool that follows group ``i`` (if any) and
    then group ``i + 1``.
    """
    stem = nn.Sequential(*_convs(form, in_channels, cfg[0]))
    stages, channels = [], cfg[0][-1]
    for i, widths in enumerate(cfg[1:]):
        pool = [nn.MaxPool2d(2, 2)] if i in POOLED_GROUPS else []
        stages.append(nn.Sequential(*pool, *_convs(form, channels, widths)))
        channels = widths[-1]
    return StagedNet(stem, stages, classifier_head(channels, num_classes))


for _name, _cfg in CONFIGS.items():
    register(_name, family="cifar", input_size=32, builder=partial(vgg, _cfg))
