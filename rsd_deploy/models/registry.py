"""Model registry: name -> builder, with the input size the architecture is made for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..blocks import FORMS, Form
from ..errors import RSDError
from .base import StagedNet

Builder = Callable[..., StagedNet]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  #: data set family the architecture is designed for: "cifar" or "imagenet"
    input_size: int  #: default square input side
    builder: Builder


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, family: str, input_size: int, builder: Builder) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelSpec(name, family, input_size, builder)


def names() -> list[str]:
    """Names of all registered architectures."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RSDError(f"unknown model {name!r}; choose from: {', '.join(names())}") from None


def create(name: str, *, num_classes: int, in_channels: int = 3, form: Form = "rsd") -> StagedNet:
    """Build architecture ``name`` in ``form`` ("rsd", "plain" or "deploy")."""
    spec = get_spec(name)
    if form not in FORMS:
        raise RSDError(f"unknown form {form!r}; choose from: {', '.join(FORMS)}")
    if num_classes < 1 or in_channels < 1:
        raise RSDError("num_classes and in_channels must be positive")
    return spec.builder(form=form, num_classes=num_classes, in_channels=in_channels)
