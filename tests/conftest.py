"""Shared fixtures: the real-image data set, and skips for CUDA / TensorRT tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_tensorrt = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TENSORRT),
    reason="needs TensorRT (pip install 'rsd-deploy[trt]') and a CUDA device",
)


@pytest.fixture(scope="session")
def cifar_mini() -> Path:
    if not (CIFAR_MINI / "train").is_dir():
        pytest.skip(f"real images not found at {CIFAR_MINI}")
    return CIFAR_MINI
