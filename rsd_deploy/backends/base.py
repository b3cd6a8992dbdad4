"""What every backend module provides: the Runner protocol, the artifact spec, availability.

A *backend module* (see :mod:`rsd_deploy.backends`) is a plain module with:

``NAME``, ``LABEL``
    its registry name ("ort") and its name in messages ("ONNX Runtime");
``SOURCE``
    the backend whose artifact its own is made from (``None``: made from the
    PyTorch module), so artifacts chain: module -> ONNX file -> engine;
``FILE``
    the file name of its fused artifact in a ``fuse-export`` folder (``None``: the
    module itself, fused in-process);
``DEVICES``
    the devices it runs on, the default first;
``TOLERANCES``
    per precision it can make and load, the parity tolerance against the fp32
    reference (None: a precision judged otherwise, as int8 is by its top-1 on
    validation images); its keys are the backend's precisions;
``SOURCE_PRECISION``
    optional, default False: True when its ``SOURCE``'s artifact must already carry
    the precision (a strongly typed TensorRT engine is as precise as its ONNX file);
``INT8_FORMAT``
    for a backend with "int8": the Q/DQ format of :mod:`rsd_deploy.quantize` it runs
    fast ("ort" or "trt");
``available(device) -> Availability``
    whether it can run here, and if not why;
``deployed(deploy_dir, input_shape, batch_sizes) -> ArtifactSpec``
    how the fused artifact in a deploy folder was made, checked against the batch
    sizes a caller wants to run;
``make(source, folder, name, spec) -> artifact``
    its artifact made from its ``SOURCE``'s artifact, as ``spec`` says;
``load(artifact, *, device, precision, threads) -> Runner``
    the artifact ready to run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..errors import RSDError, option
from ..onnx import DEFAULT_OPSET

if TYPE_CHECKING:
    from ..quantize import Calibration

Array = torch.Tensor | np.ndarray
DEVICES = ("cpu", "cuda")


class Runner(Protocol):
    """One loaded model: ``runner(x) -> logits`` for ``x`` ``(N, C, H, W)``, tensor or numpy.

    Logits come back in the backend's own type (a torch tensor on ``device`` or a
    numpy array); :func:`rsd_deploy.verify.logits` turns any of them into numpy.
    """

    backend: str  #: registry name of the backend that loaded it
    device: str  #: "cpu" or "cuda"
    precision: str  #: "fp32", "fp16", ...
    #: True when its CUDA work is queued on torch's current stream, so CUDA events
    #: can time it; False when a call returns only once its work is done.
    cuda_events: bool

    def __call__(self, x: Array) -> Array: ...

    def bind(self, x: Array) -> Callable[[], Any]:
        """A zero-argument call that runs one inference on ``x``, kept resident on the device."""
        ...

    def settings(self) -> dict[str, Any]:
        """What it runs with beyond the machine (providers, options), for reports."""
        ...


@dataclass(frozen=True)
class ArtifactSpec:
    """How to make an artifact; one spec makes the models of a comparison alike.

    ``batch``: a fixed ONNX batch (``None``: dynamic); ``profile``: a TensorRT
    engine's ``(min, opt, max)`` batch; ``calibration``: the images and settings an
    int8 artifact is quantized with (:mod:`rsd_deploy.quantize`).
    """

    input_shape: tuple[int, int, int]
    precision: str = "fp32"
    batch: int | None = None
    opset: int = DEFAULT_OPSET
    profile: tuple[int, int, int] | None = None
    calibration: Calibration | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        parts = [f"opset {self.opset}", f"batch {self.batch or 'dynamic'}"]
        if self.precision == "int8" and self.calibration is not None:
            parts.append(self.calibration.describe())
        elif self.precision != "fp32" or self.profile is not None:
            parts.append(self.precision)
        if self.profile is not None:
            parts.append("engine profile {}/{}/{}".format(*self.profile))
        return ", ".join(parts)


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on a device here; ``reason`` (one line, with a fix) when not."""

    reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is None

    def require(self) -> None:
        if self.reason is not None:
            raise RSDError(self.reason)


def check_device(backend: ModuleType, device: str) -> None:
    """Refuse a device the backend module does not run on, naming those it does."""
    if device not in DEVICES:
        raise RSDError(f"unknown device {device!r}; choose from: {', '.join(DEVICES)}")
    if device not in backend.DEVICES:
        only = " and ".join(d.upper() for d in backend.DEVICES)
        raise RSDError(f"{backend.LABEL} runs on {only} only: drop {option('device')} {device}")


def check_precision(backend: ModuleType, precision: str) -> None:
    """Refuse a precision the backend module cannot make or load, naming those it can."""
    if precision not in backend.TOLERANCES:
        raise RSDError(
            f"{backend.LABEL} has no {precision!r} precision (it has: {', '.join(backend.TOLERANCES)})"
        )


def as_tensor(x: Array, device: str | torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` as a contiguous tensor of ``dtype`` on ``device``."""
    return torch.as_tensor(x).to(device=device, dtype=dtype).contiguous()


def as_numpy(x: Array) -> np.ndarray:
    """``x`` as a contiguous float32 numpy array on the host."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def file_artifact(path: Path, what: str, how: str) -> Path:
    """``path`` when it is a file, else :class:`RSDError` saying how to make it."""
    if not path.is_file():
        raise RSDError(f"no {what} at {path}: {how}")
    return path
