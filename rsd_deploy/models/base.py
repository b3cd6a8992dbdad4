"""The shape every model in the zoo shares: a stem, a list of stages and a head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class StagedNet(nn.Module):
    """``head(stages[-1](...stages[0](stem(x))))``.

    The *mix points* are the outputs of the stem (point 0) and of each stage (point i
    after stage i): the places where RSD's training step may insert its feature
    mixture block (:class:`~rsd_deploy.training.rsd.RSDStep`, through forward hooks on
    the modules :attr:`mix_points` names). The model itself holds no training logic.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    @property
    def mix_points(self) -> tuple[str, ...]:
        """Names of the modules whose outputs are the mix points: the stem, then each stage."""
        return ("stem", *(f"stages.{i}" for i in range(len(self.stages))))

    @property
    def num_mix_points(self) -> int:
        return len(self.stages) + 1

    def forward_to(self, x: Tensor, point: int) -> Tensor:
        """The feature at mix point ``point``."""
        x = self.stem(x)
        for stage in self.stages[:point]:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def classifier_head(in_features: int, num_classes: int, *pre: nn.Module) -> nn.Sequential:
    """``pre`` layers, global average pooling and one linear layer."""
    return nn.Sequential(
        *pre, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_features, num_classes)
    )
