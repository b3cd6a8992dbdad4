"""Backends: the ways a model runs, each in one module; this registry finds them.

Polygraphy's split: a backend module *makes* its artifact (``make``) and *loads*
it into a runner (``load``); the comparison lives elsewhere
(:mod:`rsd_deploy.verify` for parity, :mod:`rsd_deploy.bench` for latency)::

    ort = get_backend("ort")
    ort.available("cpu").require()            # RSDError with a one-line hint if not
    runner = ort.load("deploy/model.onnx")     # runner(x) -> logits; runner.device, runner.precision

* ``torch`` (``backends/pytorch.py``): the module itself; cpu, cuda.
* ``ort`` (``backends/onnxrt.py``): an ONNX file exported from the module; cpu, cuda.
* ``trt`` (``backends/trt.py``): a TensorRT engine built from the ONNX file; cuda.

**Adding a backend**: write ``rsd_deploy/backends/NEW.py`` with what
:mod:`rsd_deploy.backends.base` lists (``NAME``, ``LABEL``, ``SOURCE``, ``FILE``,
``DEVICES``, ``TOLERANCES``, ``available``, ``deployed``, ``make``, ``load``
returning a :class:`~rsd_deploy.backends.base.Runner`) and add it to
:data:`_MODULES` below; ``bench`` (the library call and the command's
``--NAME`` flag) then takes it by name.

**Adding a precision**: in the backend's module, add it to ``TOLERANCES`` (how
close it must come to the fp32 reference) and handle it in ``make`` and ``load``
(torch: convert the module; onnxruntime: write a converted ONNX file, fp16 or int8
Q/DQ; TensorRT: build from a source that carries it). Sources are made in fp32 by
:func:`make_artifact` below, unless the backend sets ``SOURCE_PRECISION``: TensorRT's
strongly typed engines take their precision from the ONNX file, so its source is
made at the engine's precision (an fp16 file, a ``trt``-format Q/DQ file).

Backend modules are imported on first use, so ``import rsd_deploy`` loads none
of onnxruntime, onnx or tensorrt; tests put stand-in modules in ``sys.modules``
under a backend's module name and :func:`get_backend` returns them.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import RSDError
from .base import DEVICES, ArtifactSpec, Availability, Runner

#: Registry name -> module under ``rsd_deploy.backends``.
_MODULES = {"torch": "pytorch", "ort": "onnxrt", "trt": "trt"}

__all__ = ["DEVICES", "ArtifactSpec", "Availability", "Runner", "get_backend", "list_backends",
           "make_artifact"]


def list_backends() -> tuple[str, ...]:
    """The registry names, in the order commands list them."""
    return tuple(_MODULES)


def get_backend(name: str) -> ModuleType:
    """The backend module registered as ``name`` (imported now, on first use)."""
    if name not in _MODULES:
        raise RSDError(f"unknown backend {name!r}; choose from: {', '.join(_MODULES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def make_artifact(backend: ModuleType, model: Any, folder: Path, name: str, spec: ArtifactSpec) -> Any:
    """``model`` (a PyTorch module) made into ``backend``'s artifact, through its chain of sources.

    Sources are made in fp32 and the last backend applies ``spec.precision``, unless it
    sets ``SOURCE_PRECISION``: then its source is made at that precision too.
    """
    if backend.SOURCE is not None:
        source = get_backend(backend.SOURCE)
        carried = spec if getattr(backend, "SOURCE_PRECISION", False) else dataclasses.replace(spec, precision="fp32")
        model = make_artifact(source, model, folder, name, carried)
    return backend.make(model, folder, name, spec)
