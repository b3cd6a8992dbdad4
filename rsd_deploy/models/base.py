"""The shape every model in the zoo shares: a stem, a list of stages and a head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class StagedNet(nn.Module):
    """``head(stages[-1](...stages[0](stem(x))))``.

    The *mix points* are the features after the stem (point 0) and after each stage
    (point i after stage i): the places where RSD's training loop may insert its
    feature mixture block. The model itself holds no training logic.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    @property
    def num_mix_points(self) -> int:
        return len(self.stages) + 1

    def forward_to(self, x: Tensor, point: int) -> Tensor:
        """The feature at mix point ``point``."""
        x = self.stem(x)
        for stage in self.stages[:point]:
            x = stage(x)
        return x

    def forward_from(self, h: Tensor, point: int) -> Tensor:
        """Logits, continuing from the feature ``h`` at mix point ``point``."""
        for stage in self.stages[point:]:
            h = stage(h)
        return self.head(h)

    def forward_features(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """The features at every mix point, and the logits."""
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats, self.head(feats[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from(self.stem(x), 0)


def classifier_head(in_features: int, num_classes: int, *pre: nn.Module) -> nn.Sequential:
    """``pre`` layers, global average pooling and one linear layer."""
    return nn.Sequential(
        *pre, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_features, num_classes)
    )
