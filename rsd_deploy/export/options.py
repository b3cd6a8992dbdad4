"""What :func:`~rsd_deploy.export.fuse_export` is asked for: :class:`ExportOptions`, from
keyword arguments, a JSON profile (the ``export/`` folder) or command-line overrides.

Fields are checked by the one dataclass-from-mapping validator (:mod:`rsd_deploy.schema`);
``batch`` has its own parser ("dynamic" or a positive integer). Messages name options by
field (:func:`rsd_deploy.errors.option`).

Precisions: ``fp16`` writes an fp16 ONNX file beside the fp32 one; ``int8`` an int8
Q/DQ file (:mod:`rsd_deploy.quantize`), calibrated on training images and written only
when its top-1 on validation images stays within ``max_top1_drop`` points of the fp32
model's. A TensorRT engine is built from the file of its precision (:attr:`ExportOptions.precision`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..backends.trt import TOLERANCES as TRT_TOLERANCES
from ..errors import RSDError, option
from ..io import read_json
from ..onnx import DEFAULT_OPSET, max_opset
from ..quantize import DEFAULT_CALIB_SAMPLES, DEFAULT_MAX_TOP1_DROP, DEFAULT_METHOD, FORMATS, METHODS, MIN_OPSET
from ..quantize import check_choice as _check_choice
from ..schema import AT_LEAST_1, NON_NEGATIVE, check_values, from_mapping
from ..verify import Tolerance

DEFAULT_MAX_BATCH = 64


@dataclass
class ExportOptions:
    """What :func:`fuse_export` writes and how strictly it checks; mirrors the CLI flags."""

    onnx: bool = False  #: write and verify model.onnx (implied by trt)
    trt: bool = False  #: build and verify a TensorRT engine from model.onnx
    out: str | None = None  #: output folder; default RUN_DIR/deploy
    opset: int = DEFAULT_OPSET
    batch: int | None = None  #: fixed ONNX batch size; None makes the batch axis dynamic
    max_batch: int | None = None  #: TensorRT profile maximum (default 64, or the fixed batch)
    opt_batch: int | None = None  #: TensorRT profile optimum (default max_batch)
    fp16: bool = False  #: also write model_fp16.onnx (fp16 compute, fp32 input/output); with trt, an fp16 engine
    int8: bool = False  #: also write model_int8.onnx (static Q/DQ), gated on validation top-1; with trt, an int8 engine
    int8_format: str | None = None  #: "ort" or "trt" (default: "trt" when building an engine, else "ort")
    calib_samples: int = DEFAULT_CALIB_SAMPLES  #: training images the int8 ranges are calibrated on
    calib_method: str = DEFAULT_METHOD  #: "minmax", "entropy" or "percentile"
    max_top1_drop: float = DEFAULT_MAX_TOP1_DROP  #: points of validation top-1 int8 may lose against fp32
    keep_unfused: bool = False  #: also export the unfused training form (model_unfused.onnx)
    atol: float = 1e-4  #: fp32 parity tolerance (PyTorch, ONNX Runtime)
    rtol: float = 1e-4  #: relative to max|logit| of the reference
    trt_atol: float | None = None  #: TensorRT tolerance; default per precision
    trt_rtol: float | None = None
    samples: int = 64  #: verification inputs (also the "larger batch" of the ONNX check)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "options") -> "ExportOptions":
        """Options from a profile-like mapping; unknown keys and wrong types are an RSDError."""
        return from_mapping(cls, values, where, parsers=_parsers(where), ignore=("description",))

    def with_overrides(self, values: Mapping[str, Any]) -> "ExportOptions":
        """A copy with ``values`` (e.g. explicit command-line flags) taking precedence."""
        return from_mapping(ExportOptions, values, "options", base=self, parsers=_parsers("options"))

    @property
    def writes_onnx(self) -> bool:
        """model.onnx is written: asked for, or the source of an engine or of another precision's file."""
        return self.onnx or self.trt or self.fp16 or self.int8

    @property
    def precision(self) -> str:
        """The TensorRT engine's precision: the file it is built from carries it."""
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    @property
    def quant_format(self) -> str:
        """The int8 Q/DQ format: as asked, else the one the engine (or ONNX Runtime) wants."""
        return self.int8_format or ("trt" if self.trt else "ort")

    def trt_profile(self) -> tuple[int, int, int]:
        """``(min, opt, max)`` batch of the TensorRT engine."""
        if self.batch is not None:
            if self.max_batch not in (None, self.batch) or self.opt_batch not in (None, self.batch):
                raise RSDError(
                    f"a fixed ONNX batch of {self.batch} makes a fixed-batch engine: drop "
                    f"{option('max_batch')}/{option('opt_batch')} or make {option('batch')} dynamic"
                )
            return self.batch, self.batch, self.batch
        hi = self.max_batch or DEFAULT_MAX_BATCH
        opt = self.opt_batch or hi
        if not 1 <= opt <= hi:
            raise RSDError(f"{option('opt_batch')} must be between 1 and {option('max_batch')} ({hi}); got {opt}")
        return 1, opt, hi

    def trt_tolerance(self) -> Tolerance:
        base = TRT_TOLERANCES[self.precision]
        return Tolerance(
            base.atol if self.trt_atol is None else self.trt_atol,
            base.rtol if self.trt_rtol is None else self.trt_rtol,
        )

    def validate(self) -> None:
        """Reject impossible settings before any work is done."""
        if self.writes_onnx and not 9 <= self.opset <= max_opset():
            raise RSDError(
                f"opset {self.opset} cannot be produced by the installed PyTorch exporter "
                f"(supported: 9 to {max_opset()})"
            )
        check_values(self, _RANGES, option)
        Tolerance(self.atol, self.rtol)
        self.trt_tolerance()
        self._validate_precisions()
        if self.trt:
            self.trt_profile()

    def _validate_precisions(self) -> None:
        """int8's settings, and one precision per TensorRT engine, built from the file that carries it."""
        _check_choice(self.calib_method, METHODS, "calib_method")
        if self.int8_format is not None:
            _check_choice(self.int8_format, FORMATS, "int8_format")
        if self.int8 and self.opset < MIN_OPSET:
            raise RSDError(f"{option('int8')} quantizes weights per channel, which needs {option('opset')} "
                           f"{MIN_OPSET} or later (got {self.opset})")
        if self.trt and self.int8 and self.fp16:
            raise RSDError(f"a TensorRT engine has one precision: ask for {option('fp16')} or {option('int8')}, "
                           "not both")
        if self.trt and self.int8 and self.quant_format != "trt":
            raise RSDError(f"a TensorRT int8 engine is built from the symmetric 'trt' Q/DQ file: set "
                           f"{option('int8_format')} trt (or leave it unset)")


#: Ranges of the options (every number is also checked to be finite; see schema.check_values).
_RANGES = {"batch": AT_LEAST_1, "max_batch": AT_LEAST_1, "opt_batch": AT_LEAST_1, "samples": AT_LEAST_1,
           "calib_samples": AT_LEAST_1, "max_top1_drop": NON_NEGATIVE}


def _parsers(where: str) -> dict[str, Callable[[Any], Any]]:
    """Options read by their own parser: ``batch`` is "dynamic" or a positive integer."""
    return {"batch": lambda value: parse_batch(value, f"{where}: batch")}


def parse_batch(value: Any, where: str = option("batch")) -> int | None:
    """``"dynamic"`` (or None) -> None; a positive integer (or its string) -> that int."""
    if value is None or value == "dynamic":
        return None
    if isinstance(value, bool):
        raise RSDError(f"{where} must be 'dynamic' or a positive integer (got {value!r})")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise RSDError(f"{where} must be 'dynamic' or a positive integer (got {value!r})") from None
    if n < 1 or (isinstance(value, float) and value != n):
        raise RSDError(f"{where} must be 'dynamic' or a positive integer (got {value!r})")
    return n


def load_profile(path: str | os.PathLike) -> ExportOptions:
    """Export options from a JSON profile (see the ``export/`` folder)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise RSDError(f"profile {path} must hold a JSON object")
    return ExportOptions.from_mapping(data, f"profile {path}")


