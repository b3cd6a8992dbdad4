"""Models from torchvision and timm, in the three forms RSD needs.

``plain`` is the library's model as built (``weights=None``: nothing is downloaded),
``rsd`` is it restructured (:func:`rsd_deploy.restructure`), ``deploy`` is it with every
conv+BN pair folded (:func:`rsd_deploy.fuse_model`): the same modules and names, so an
RSD model's fused state dict loads into it. Each kind names default mix points for the
families it knows (:func:`default_mix_points`); other models are given them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import RSDError
from ..fuse import fuse_model
from ..restructure import DEFAULT_KERNEL_SIZES, restructure

KINDS = ("torchvision", "timm")
_INSTALL = {"torchvision": "pip install torchvision", "timm": "pip install 'rsd-deploy[timm]'"}


def _module(kind: str):
    try:
        return importlib.import_module(kind)
    except ImportError:
        raise RSDError(f"{kind} models need {kind}, which is not installed: {_INSTALL[kind]}") from None


def check(kind: str, name: str) -> None:
    """RSDError unless ``kind`` builds a classification model called ``name``."""
    lib = _module(kind)
    if kind == "torchvision":
        known = lib.models.list_models(module=lib.models)
        hint = "torchvision.models.list_models(module=torchvision.models) lists them"
    else:
        known = lib.list_models()
        hint = "timm.list_models() lists them"
    if name not in known:
        raise RSDError(f"{kind} has no classification model {name!r}; {hint}")


def build_plain(kind: str, name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """The library's model with fresh weights (never downloaded)."""
    check(kind, name)
    lib = _module(kind)
    if kind == "torchvision":
        if in_channels != 3:
            raise RSDError(f"torchvision's {name} takes 3-channel images; the data has {in_channels}")
        # Their auxiliary heads make the training forward return a tuple, not logits.
        extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return lib.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    return lib.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def deploy_form(label: str, plain: nn.Module) -> nn.Module:
    """``plain`` with every BatchNorm folded; RSDError naming model ``label`` when one cannot be."""
    try:
        return fuse_model(plain)
    except RSDError as e:
        raise RSDError(f"{label} cannot be deployed by rsd-deploy ({e})") from None


def create(kind: str, name: str, *, num_classes: int, in_channels: int, form: str,
           restructured: dict[str, Any] | None = None) -> nn.Module:
    """Model ``name`` of ``kind`` in ``form``; ``restructured`` repeats a recorded restructuring.

    ``restructured`` is a :meth:`~rsd_deploy.restructure.RestructureReport.to_json` record:
    its pairs are converted again, so a run's model is rebuilt without tracing.
    """
    plain = build_plain(kind, name, num_classes=num_classes, in_channels=in_channels)
    if form == "plain":
        return plain
    if form == "deploy":
        return deploy_form(f"{kind}:{name}", plain)
    options = restructured or {}
    model, _ = restructure(plain, kernel_sizes=options.get("kernel_sizes", DEFAULT_KERNEL_SIZES),
                           num_square=options.get("num_square", 3), exclude=options.get("exclude", ()),
                           pairs=options.get("pairs"))
    return model


# Default mix points ---------------------------------------------------------------------------


def _stage_ends(model: nn.Module, input_size: int, in_channels: int) -> list[str] | None:
    """For a model with an ``nn.Sequential`` ``features``: its last child at each resolution.

    The outputs after which the spatial side next halves, and the last one: "after each
    stage", as the paper mixes (for VGG: after each group's ReLU, before its pool).
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        return None
    sides: list[int] = []
    hooks = [child.register_forward_hook(lambda _m, _a, out: sides.append(out.shape[-1]))
             for child in features]
    was_training = model.training
    p = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, input_size, input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    ends = [i for i in range(len(sides) - 1) if sides[i + 1] < sides[i]]
    if not isinstance(features[-1], nn.modules.pooling._MaxPoolNd | nn.modules.pooling._AvgPoolNd):
        ends.append(len(sides) - 1)  # a closing pool is not a stage (VGG mixes before it)
    return [f"features.{i}" for i in ends]


_TORCHVISION: list[tuple[Callable[[str], bool], Callable[..., list[str] | None]]] = [
    (lambda n: n.startswith(("resnet", "resnext", "wide_resnet")),
     lambda m, *_: ["maxpool", "layer1", "layer2", "layer3", "layer4"]),
    (lambda n: n.startswith("regnet"),
     lambda m, *_: ["stem", *(f"trunk_output.{n}" for n, _ in m.trunk_output.named_children())]),
    (lambda n: n.startswith(("vgg", "mobilenet", "efficientnet")), _stage_ends),
]


def default_mix_points(kind: str, name: str, model: nn.Module, input_size: int,
                       in_channels: int = 3) -> list[str] | None:
    """Mix points for the families ``kind`` knows (stage outputs), or None.

    torchvision: ResNet/ResNeXt/Wide ResNet (after the stem's pool and each layer),
    RegNet (stem and each block), VGG, MobileNet and EfficientNet (the last module of
    ``features`` at each resolution). timm: the modules of ``feature_info``.
    """
    if kind == "timm":
        info = getattr(model, "feature_info", None)
        names = [f.get("module") for f in info] if isinstance(info, Sequence) else []
        return [n for n in names if n] or None
    for matches, points in _TORCHVISION:
        if matches(name):
            return points(model, input_size, in_channels)
    return None
