"""What RSD would do to a model: convs restructured and skipped, sizes of both forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .complexity import count_macs, count_params, human
from .restructure import RestructureReport, restructure
from .run import ModelSource

#: Input side and class count a model is inspected at when it has none of its own (ImageNet's).
DEFAULT_SIDE, DEFAULT_CLASSES = 224, 1000


@dataclass
class Inspection:
    source: ModelSource
    input_size: int
    num_classes: int
    report: RestructureReport | None  #: None for zoo models (their RSD form is built natively)
    train_params: int
    train_macs: int
    deploy_params: int
    deploy_macs: int
    mix_points: list[str] | None

    def to_json(self) -> dict[str, Any]:
        return {"model": str(self.source), "input_size": self.input_size, "num_classes": self.num_classes,
                "train": {"params": self.train_params, "macs": self.train_macs},
                "deploy": {"params": self.deploy_params, "macs": self.deploy_macs},
                "mix_points": self.mix_points,
                "restructure": None if self.report is None else self.report.to_json()}

    def text(self) -> str:
        lines = [f"{self.source} at {self.input_size}x{self.input_size}, {self.num_classes} classes"]
        if self.report is not None:
            lines.append(self.report.summary())
        lines += ["", f"{'form':<22}{'params':>10}{'MACs':>10}",
                  f"{'training (RSD)':<22}{human(self.train_params):>10}{human(self.train_macs):>10}",
                  f"{'deployed (fused)':<22}{human(self.deploy_params):>10}{human(self.deploy_macs):>10}",
                  "", "default mix points: " + (", ".join(self.mix_points) if self.mix_points else
                                                "none (give them with --mix-points)")]
        if self.report is not None:
            width = max(len(c.conv) for c in self.report.convs) if self.report.convs else 4
            lines += ["", f"{'conv':<{width}}  {'kernel':<7}{'stride':<7}{'groups':<7}result"]
            for c in self.report.convs:
                result = f"restructured (BN {c.bn})" if c.converted else f"skipped: {c.reason}"
                lines.append(f"{c.conv:<{width}}  {'x'.join(map(str, c.kernel_size)):<7}"
                             f"{'x'.join(map(str, c.stride)):<7}{c.groups:<7}{result}")
        return "\n".join(lines)


def inspect_model(model: str, *, input_size: int | None = None, num_classes: int | None = None) -> Inspection:
    """Restructure ``model`` (``[KIND:]NAME``) and count both forms at one ``input_size`` image."""
    source = ModelSource.from_json(model)
    side = input_size or source.input_size() or DEFAULT_SIDE
    if num_classes is None:
        family = source.spec.check(source.name)
        num_classes = 100 if getattr(family, "family", None) == "cifar" else DEFAULT_CLASSES
    from .training.config import check_input_size

    check_input_size(source, side)
    shape = (3, side, side)
    report = None
    with torch.no_grad():
        if source.kind == "zoo":
            train = source.create(num_classes=num_classes, in_channels=3, form="rsd")
        else:
            plain = source.create(num_classes=num_classes, in_channels=3, form="plain")
            train, report = restructure(plain)
        deploy = source.create(num_classes=num_classes, in_channels=3, form="deploy")
        points = source.default_mix_points(train, side)
        return Inspection(source, side, num_classes, report, count_params(train), count_macs(train, shape),
                          count_params(deploy), count_macs(deploy, shape), points)
