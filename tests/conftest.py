"""Shared fixtures: the real-image data set. Helpers and skips: the ``helpers`` package."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CIFAR_MINI


@pytest.fixture(scope="session")
def cifar_mini() -> Path:
    if not (CIFAR_MINI / "train").is_dir():
        pytest.skip(f"real images not found at {CIFAR_MINI}")
    return CIFAR_MINI
