"""Run directories and :class:`RunInfo`, the one record of a run (``run.json``).

A run directory holds ``model.safetensors`` (the state dict) and ``run.json``, which
says how to rebuild the model and where it came from. Training writes it, fuse-export
writes one for the deploy folder, eval and bench read them: all through
:class:`RunInfo`, the only reader and writer of ``run.json``.

Model sources are the entries of :data:`SOURCES` (the zoo, ``torchvision:NAME``,
``timm:NAME``; a new one is one entry): the record names a model as ``[KIND:]NAME``, a
bare name being a zoo model. A restructured model's record holds its restructuring
(``"restructure"``), which rebuilds its RSD form. Changing the record's layout means raising :data:`SCHEMA_VERSION` and teaching
:func:`_migrate` to bring older files up to it, so runs made before keep working.

``run.json`` (version 3; 2 lacked ``restructure`` and the ONNX precision files, 1 the
version key)::

    {"version": 3, "model": "resnet20", "form": "rsd", "num_classes": 10, "in_channels": 3,
     "input_size": [32, 32], "method": "rsd", "classes": [...],
     "normalization": {"mean": [...], "std": [...]}, "data": {...}, "config": {...},
     "training": {...}, "versions": {...}, "metrics": {...}, "weights_sha256": "...",
     "source": {"weights_sha256": "...", "run_dir": "...", "form": "rsd"},   # exports only
     "onnx": {...}, "tensorrt": {...}}                                         # exports only

An export's ``"onnx"``: ``{"file", "opset", "batch"}``, plus ``"fp16_file"`` and
``"int8": {"file", "format", "calib_method", "calib_samples"}`` when it wrote them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from . import models
from .blocks import FORMS
from .data import DataInfo, is_count, is_names, is_numbers, is_size
from .errors import RSDError
from .io import json_text, load_tensors, read_json, save_tensors, sha256_file, write_json
from .models import external
from .restructure import with_square_branches
from .schema import Rule, fields_json, from_mapping

WEIGHTS_FILE = "model.safetensors"
RUN_FILE = "run.json"
#: 1: the files written before the version key; 2: before "restructure" and the fp16/int8 ONNX
#: entries (both read and migrated). An older rsd-deploy refuses a newer file in one line.
SCHEMA_VERSION = 3


# Model sources -------------------------------------------------------------------------------


class SourceKind(NamedTuple):
    """How to check a model name of one kind, build the model, and where it may be mixed."""

    check: Callable[[str], Any]  #: raises RSDError for an unknown name
    #: (name, *, num_classes, in_channels, form, restructured) -> module; ``restructured``
    #: is the record of a restructuring to repeat (None for the zoo, whose RSD form is native)
    create: Callable[..., nn.Module]
    input_size: Callable[[str], int | None]  #: the architecture's own input side (None: the data's)
    #: (name, model, input side) -> default mix points, or None when the kind knows none
    mix_points: Callable[[str, nn.Module, int], list[str] | None]


def _zoo_create(name: str, *, form: str, restructured: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """A zoo model; its RSD form is native, and ``restructured`` may only say how many KxK branches."""
    options = dict(restructured or {})
    num_square = options.pop("num_square", 3)
    if options:
        raise RSDError(f"zoo model {name!r} has its own RSD form; it is not restructured ({', '.join(options)})")
    model = models.create(name, form=form, **kwargs)
    return with_square_branches(model, num_square) if form == "rsd" and num_square != 3 else model


#: Model sources by kind. A new kind is one entry here.
SOURCES: dict[str, SourceKind] = {
    "zoo": SourceKind(models.get_spec, _zoo_create, lambda n: models.get_spec(n).input_size,
                      lambda n, m, s: list(m.mix_points)),
    **{kind: SourceKind(partial(external.check, kind), partial(external.create, kind), lambda n: None,
                        partial(external.default_mix_points, kind))
       for kind in external.KINDS},
}
DEFAULT_KIND = "zoo"


@dataclass(frozen=True)
class ModelSource:
    """Where an architecture comes from: a ``kind`` of :data:`SOURCES` and a ``name`` in it.

    Written as ``"KIND:NAME"``, or just ``"NAME"`` for the zoo (the default kind).
    """

    name: str
    kind: str = DEFAULT_KIND

    @classmethod
    def from_json(cls, text: Any) -> "ModelSource":
        """``"[KIND:]NAME"`` -> the source, its kind and name checked."""
        if not isinstance(text, str) or not text:
            raise RSDError(f"must be a model name (got {text!r})")
        kind, colon, name = text.partition(":")
        source = cls(name, kind) if colon else cls(text)
        if source.kind not in SOURCES:
            raise RSDError(f"unknown model source {source.kind!r} in {text!r}; known: {', '.join(SOURCES)}")
        SOURCES[source.kind].check(source.name)
        return source

    def to_json(self) -> str:
        return self.name if self.kind == DEFAULT_KIND else f"{self.kind}:{self.name}"

    __str__ = to_json

    @property
    def spec(self) -> SourceKind:
        return SOURCES[self.kind]

    def create(self, *, num_classes: int, in_channels: int, form: str,
               restructured: dict[str, Any] | None = None) -> nn.Module:
        """The architecture in ``form``; ``restructured`` repeats a recorded restructuring."""
        return self.spec.create(self.name, num_classes=num_classes, in_channels=in_channels, form=form,
                                restructured=restructured)

    def input_size(self) -> int | None:
        """The architecture's own input side, or None when it takes the data's."""
        return self.spec.input_size(self.name)

    def default_mix_points(self, model: nn.Module, input_size: int) -> list[str] | None:
        return self.spec.mix_points(self.name, model, input_size)


# The record ----------------------------------------------------------------------------------


@dataclass
class Normalization:
    """Per-channel mean and std the inputs are normalized with."""

    mean: list[float]
    std: list[float]


@dataclass
class Source:
    """Provenance of an export: the sha256 of the weights it was made from, and their run."""

    weights_sha256: str
    run_dir: str | None = None
    form: str | None = None


@dataclass
class Int8Info:
    """The int8 Q/DQ file of an export and how it was quantized (see :mod:`rsd_deploy.quantize`)."""

    file: str
    format: str  #: "ort" or "trt"
    calib_method: str
    calib_samples: int


@dataclass
class OnnxInfo:
    """The ONNX files of an export: the fp32 one, and the fp16 and int8 ones when written."""

    file: str
    opset: int
    batch: int | str  #: a fixed batch size, or "dynamic"
    fp16_file: str | None = None
    int8: Int8Info | None = None

    def to_json(self) -> dict[str, Any]:
        return fields_json(self, drop_none=True)  # exports without fp16 or int8 files keep their layout


@dataclass
class TensorRTProfile:
    """The batch profile and precision a TensorRT engine was built for."""

    min_batch: int
    opt_batch: int
    max_batch: int
    precision: str


@dataclass
class RunInfo:
    """Everything ``run.json`` records about a run; see the module docstring for the layout."""

    model: ModelSource
    form: str  #: "rsd", "plain" or "deploy"
    num_classes: int
    in_channels: int
    input_size: list[int]  #: [H, W]
    method: str | None = None  #: how it was trained: "rsd" or "baseline"
    classes: list[str] | None = None
    normalization: Normalization | None = None
    data: DataInfo | None = None
    config: dict[str, Any] | None = None  #: the TrainConfig, in full
    training: dict[str, Any] | None = None  #: processes, effective batch, device
    versions: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None  #: of this folder's model.safetensors, set when it is written
    source: Source | None = None  #: exports: the weights they were made from
    onnx: OnnxInfo | None = None
    tensorrt: TensorRTProfile | None = None
    #: models restructured from another library: the restructuring (options, pairs, report);
    #: a zoo model's RSD form with other than 3 KxK branches per block: ``{"num_square": k}``
    restructure: dict[str, Any] | None = None
    version: int = SCHEMA_VERSION

    @classmethod
    def from_json(cls, data: Any, where: str = RUN_FILE) -> "RunInfo":
        """The record in ``data`` (a ``run.json``'s content, any version); RSDError naming ``where``."""
        if not isinstance(data, dict):
            raise RSDError(f"{where} must hold a JSON object")
        data = _migrate(data, where)
        info = from_mapping(cls, data, where, rules=_RULES)
        if info.form not in FORMS:
            raise RSDError(f"{where}: unknown form {info.form!r}")
        if info.classes is not None and len(info.classes) != info.num_classes:
            raise RSDError(f"{where}: {len(info.classes)} classes for num_classes {info.num_classes}")
        return info

    def to_json(self) -> dict[str, Any]:
        """The record as written to ``run.json`` (entries not recorded left out)."""
        data = fields_json(self, drop_none=True)
        return {"version": data.pop("version"), **data}

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> "RunInfo":
        """``RUN_DIR/run.json``, checked and brought to the current version."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RSDError(f"run directory {run_dir} does not exist")
        return cls.from_json(read_json(run_dir / RUN_FILE), str(run_dir / RUN_FILE))

    def write(self, run_dir: str | os.PathLike) -> None:
        write_json(Path(run_dir) / RUN_FILE, self.to_json())

    def text(self) -> str:
        """The file's text, for writers that stage several files together."""
        return json_text(self.to_json())

    def replace(self, **changes: Any) -> "RunInfo":
        return dataclasses.replace(self, **changes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input."""
        return (self.in_channels, *self.input_size)

    @property
    def is_export(self) -> bool:
        """Whether this is a fuse-export's record (a deploy form with its provenance)."""
        return self.form == "deploy" and self.source is not None

    def build_model(self, form: str | None = None) -> nn.Module:
        """The architecture, in its own form or in ``form``, with fresh weights."""
        return self.model.create(num_classes=self.num_classes, in_channels=self.in_channels,
                                 form=form or self.form, restructured=self.restructure)


#: Tests of the raw values, with the words of the messages (run before the types are checked).
_RULES: dict[str, Rule] = {
    "version": (is_count, "a positive integer"),
    "model": (lambda v: isinstance(v, str), "a model name"),
    "num_classes": (is_count, "a positive integer"),
    "in_channels": (is_count, "a positive integer"),
    "input_size": (is_size, "[H, W], two positive integers"),
    "classes": (is_names, "a list of class names"),
    "normalization": (lambda v: isinstance(v, dict) and is_numbers(v.get("mean"))
                      and is_numbers(v.get("std"), positive=True),
                      'an object {"mean": [...], "std": [...]} of finite numbers, std positive'),
    "tensorrt": (lambda v: isinstance(v, dict) and all(is_count(v.get(k)) for k in
                                                       ("min_batch", "opt_batch", "max_batch")),
                 "an object with positive integers min_batch, opt_batch and max_batch"),
}


def _migrate(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` brought from its version to :data:`SCHEMA_VERSION`."""
    version = data.get("version", 1)
    if not is_count(version):
        raise RSDError(f"{where}: version must be a positive integer (got {version!r})")
    if version > SCHEMA_VERSION:
        raise RSDError(f"{where} is version {version} of the run record; this rsd-deploy reads up to "
                       f"{SCHEMA_VERSION}: upgrade rsd-deploy")
    if version == 1:
        data = _from_version_1(data)
    if data.get("version", 1) == 2:  # 3 only added optional entries
        data = {**data, "version": 3}
    return data


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (no version key): "source" had several shapes, and normalization and
    classes were sometimes only in "data"."""
    data = {**data, "version": 2}
    src = data.get("source")
    if isinstance(src, dict):
        sha = src.get("weights_sha256", src.get("sha256"))
        data["source"] = None if sha is None else {
            "weights_sha256": sha, "run_dir": src.get("run_dir"), "form": src.get("form")}
    described = data.get("data")
    if isinstance(described, dict):
        if data.get("normalization") is None and "mean" in described and "std" in described:
            data["normalization"] = {"mean": described["mean"], "std": described["std"]}
        if data.get("classes") is None and "classes" in described:
            data["classes"] = described["classes"]
    return data


# Run directories -----------------------------------------------------------------------------


def read_run(run_dir: str | os.PathLike) -> RunInfo:
    """The record of ``run_dir`` (see :meth:`RunInfo.read`)."""
    return RunInfo.read(run_dir)


def load_state(model: nn.Module, path: str | os.PathLike, what: str = "") -> None:
    """Load safetensors weights into ``model`` strictly; any mismatch is an :class:`RSDError`."""
    state = load_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise RSDError(f"{path} does not match {what or 'the model'}: {detail[:300]}") from None


def load_run(run_dir: str | os.PathLike) -> tuple[nn.Module, RunInfo]:
    """The model of a run directory, with its weights, in eval mode, and its record."""
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    model = info.build_model()
    load_state(model, run_dir / WEIGHTS_FILE, f"architecture {str(info.model)!r} ({info.form} form)")
    return model.eval(), info


def save_run(run_dir: str | os.PathLike, model: nn.Module, info: RunInfo) -> RunInfo:
    """Write ``model``'s weights and their record to ``run_dir``, each file atomically.

    Returns the record written: ``info`` with the sha256 of the weights.
    """
    run_dir = Path(run_dir)
    save_tensors(run_dir / WEIGHTS_FILE, model.state_dict())
    info = info.replace(weights_sha256=sha256_file(run_dir / WEIGHTS_FILE))
    info.write(run_dir)
    return info


def check_made_from(deploy_dir: str | os.PathLike, run_dir: str | os.PathLike) -> RunInfo:
    """The record of export ``deploy_dir``, refused unless it was made from ``run_dir``'s weights.

    The export records the sha256 of the weights it was fused from; a run trained further
    (or replaced) since has other weights, and its old export would be timed in its place.
    """
    deploy_dir, run_dir = Path(deploy_dir), Path(run_dir)
    info = read_run(deploy_dir)
    hint = f"re-export it with fuse_export from {run_dir}"
    if info.source is None:
        raise RSDError(f"{deploy_dir / RUN_FILE} records no sha256 of the weights it was exported from; {hint}")
    if not (run_dir / WEIGHTS_FILE).is_file():
        raise RSDError(f"weights file {run_dir / WEIGHTS_FILE} not found")
    current = sha256_file(run_dir / WEIGHTS_FILE)
    if info.source.weights_sha256 != current:
        raise RSDError(
            f"{deploy_dir} was exported from other weights (sha256 {info.source.weights_sha256[:12]}) than "
            f"{run_dir / WEIGHTS_FILE} now holds ({current[:12]}); {hint}")
    return info
