"""The model zoo: ``create(name, num_classes=..., form=...)`` and ``names()``."""

from . import densenet, resnet, vgg  # noqa: F401  (registers the architectures)
from .base import StagedNet
from .registry import ModelSpec, create, get_spec, names

__all__ = ["ModelSpec", "StagedNet", "create", "get_spec", "names"]
