"""PyTorch eager: the artifact is the module itself, run in eval mode without autograd."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..verify import Tolerance
from .base import Array, ArtifactSpec, Availability, as_tensor, check_device, check_precision

NAME = "torch"
LABEL = "PyTorch"
SOURCE = None
FILE = None  # bench fuses the run in-process
DEVICES = ("cpu", "cuda")
TOLERANCES = {"fp32": Tolerance(atol=1e-4, rtol=1e-4)}
_DTYPES = {"fp32": torch.float32}
_THIS = sys.modules[__name__]


def available(device: str = "cpu") -> Availability:
    if device == "cuda" and not torch.cuda.is_available():
        return Availability("a CUDA device was asked for, and PyTorch sees none here")
    return Availability()


def deployed(deploy_dir: Path, input_shape: tuple[int, int, int], batch_sizes: Sequence[int]) -> ArtifactSpec:
    """Nothing to read: the fused model is made in-process from the run's weights."""
    return ArtifactSpec(tuple(input_shape))


def make(source: nn.Module, folder: Path, name: str, spec: ArtifactSpec) -> nn.Module:
    """The module itself (a later precision would convert it here)."""
    check_precision(_THIS, spec.precision)
    return source


class TorchRunner:
    """``model(x)`` in eval mode under ``torch.inference_mode`` on ``device``."""

    backend = NAME

    def __init__(self, model: nn.Module, device: str, precision: str) -> None:
        self.device, self.precision = device, precision
        self.dtype = _DTYPES[precision]
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.cuda_events = device == "cuda"

    def __call__(self, x: Array) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(as_tensor(x, self.device, self.dtype))

    def bind(self, x: Array) -> Callable[[], torch.Tensor]:
        x = as_tensor(x, self.device, self.dtype)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return self.model(x)

        return run

    def settings(self) -> dict[str, Any]:
        return {"cudnn_benchmark": self.device == "cuda", "inference_mode": True}


def load(model: nn.Module, *, device: str = "cpu", precision: str = "fp32", threads: int | None = None) -> TorchRunner:
    """A runner for ``model``, moved to ``device`` (threads are set by the caller: torch's are global)."""
    check_device(_THIS, device)
    check_precision(_THIS, precision)
    available(device).require()
    return TorchRunner(model, device, precision)
