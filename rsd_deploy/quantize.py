"""Static post-training INT8 quantization of an ONNX file, and the accuracy gate that judges it.

:func:`quantize_onnx` runs ``onnxruntime.quantization``: its pre-processing
(``quant_pre_process``: shape inference and graph clean-up), then ``quantize_static``
in the QDQ format with per-channel weights, calibrated on a :class:`Calibration`:
images of the run's *training* split with its evaluation preprocessing
(:func:`calibrate`), never the validation split the gate judges on, and never random
inputs (ranges measured on noise would quantize real images badly). Two formats for
two homes:

- ``ort``: uint8 (asymmetric) activations and int8 weights, what ONNX Runtime's CPU
  kernels run fast;
- ``trt``: symmetric int8 activations and weights, what TensorRT's explicit
  quantization takes (ONNX Runtime runs it too, but on the CPU slower than fp32).

Calibration methods are ONNX Runtime's ``minmax``, ``entropy`` and ``percentile``.
As ``quantize_static`` runs the entropy calibrator (128 histogram bins into 128
quantized bins; ``quantize_static`` cannot change them) it can only choose the full
range, so ``entropy`` gives ``minmax``'s ranges.

:func:`accuracy_gate` compares the quantized model's top-1 with the fp32 model's on
the run's validation images: the drop in points, and how often the two agree.

onnx and onnxruntime are imported inside the functions (``import rsd_deploy`` loads neither).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RSDError, option
from .io import atomic_path
from .onnx import INPUT_NAME

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from .backends.base import Runner
    from .data import DataInfo

#: The Q/DQ formats: activation and weight types, and who runs the file.
FORMATS = {
    "ort": "uint8 activations, int8 weights (ONNX Runtime's CPU kernels)",
    "trt": "symmetric int8 activations and weights (TensorRT's explicit quantization)",
}
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_SAMPLES = 192
DEFAULT_METHOD = "minmax"
DEFAULT_MAX_TOP1_DROP = 1.0  #: points of top-1 the int8 model may lose against the fp32 one
#: Per-channel Q/DQ (QuantizeLinear/DequantizeLinear with ``axis``) needs opset 13.
MIN_OPSET = 13
CALIB_BATCH = 32  #: images per calibration run (a fixed-batch model: its batch)
GATE_BATCH = 256  #: images per run of the accuracy gate (a fixed-batch model: its batch)

log = logging.getLogger(__name__)


def check_choice(value: Any, choices: Mapping[str, Any] | tuple[str, ...], name: str) -> None:
    """Refuse ``value`` unless it is one of ``choices``; ``name`` is the option's field name."""
    if value not in choices:
        raise RSDError(f"{option(name)} must be one of {', '.join(choices)} (got {value!r})")


@dataclass(frozen=True, eq=False)
class Calibration:
    """Images to calibrate on, and how: one Calibration quantizes every model of a comparison alike."""

    images: np.ndarray  #: ``(N, C, H, W)`` float32, preprocessed as the model's inputs are
    method: str = DEFAULT_METHOD
    format: str = "ort"
    source: str = ""  #: where the images came from, for reports

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "calib_method")
        check_choice(self.format, FORMATS, "int8_format")
        if self.images.ndim != 4 or len(self.images) == 0:
            raise RSDError(f"calibration needs a non-empty (N, C, H, W) batch of images (got {self.images.shape})")

    @property
    def samples(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        return f"int8 ({self.format} format, {self.method} calibration on {self.samples} training images)"

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "method": self.method, "samples": self.samples, "images": self.source}


def _real_data_error(data: DataInfo | None, why: str) -> RSDError:
    where = "the run records no data set" if data is None else why
    return RSDError(
        f"int8 quantization calibrates on the run's training images and is judged on its validation "
        f"images, and {where} (it does not calibrate on random inputs)"
    )


def _real_split(data: DataInfo | None, load: Callable[[DataInfo], Dataset], split: str) -> Dataset:
    """``load(data)``, a non-empty split of the run's real data, or the one-line refusal saying why."""
    if data is None:
        raise _real_data_error(data, "")
    try:
        ds = load(data)
    except RSDError as e:
        raise _real_data_error(data, str(e)) from None
    if len(ds) == 0:
        raise _real_data_error(data, f"its {split} split ({data.dir}) holds no images")
    return ds


def calibrate(data: DataInfo | None, samples: int, method: str = DEFAULT_METHOD, fmt: str = "ort") -> Calibration:
    """A :class:`Calibration` on ``samples`` images of the run's training split, spread over it.

    The images get the run's evaluation preprocessing (no augmentation). RSDError when the
    run's data set is not available here.
    """
    from .data import calibration_dataset, first_batch

    check_choice(method, METHODS, "calib_method")
    check_choice(fmt, FORMATS, "int8_format")
    if samples < 1:
        raise RSDError(f"{option('calib_samples')} must be at least 1 (got {samples})")
    ds = _real_split(data, calibration_dataset, "training")
    x, _ = first_batch(ds, min(samples, len(ds)))
    source = f"{len(x)} training images of {data.name} ({data.dir or 'built-in'})"
    return Calibration(x.numpy().astype(np.float32), method, fmt, source)


def validation_set(data: DataInfo | None) -> Dataset:
    """The run's validation split, with its evaluation preprocessing, for :func:`accuracy_gate`."""
    from .data import eval_dataset

    return _real_split(data, eval_dataset, "validation")


class CalibrationReader:
    """The calibration images in batches of ``batch``, as ``quantize_static`` reads them (``get_next``).

    ``served`` counts the images handed out (reports and tests read it).
    """

    def __init__(self, images: np.ndarray, batch: int) -> None:
        self.images, self.batch = images, batch
        self.served = 0
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        chunk = np.ascontiguousarray(self.images[self._next:self._next + self.batch])
        self._next += self.batch
        self.served += len(chunk)
        return {INPUT_NAME: chunk}


def _filled(images: np.ndarray, batch: int | None) -> np.ndarray:
    """``images`` cycled to a multiple of a fixed ``batch`` (a fixed-batch model takes no other size)."""
    if batch is None or len(images) % batch == 0:
        return images
    n = -(-len(images) // batch) * batch
    return np.resize(images, (n, *images.shape[1:]))


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    """Put the root logger's handlers and level back as they were on leaving.

    ``onnxruntime.quantization`` configures the root logger: its import runs
    ``logging.basicConfig(level=INFO)`` (``matmul_nbits_quantizer``) and its functions log
    through ``logging.info`` & co., which add a root handler when there is none. That
    handler would print every line this library logs a second time.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def _ort_quantization() -> ModuleType:
    """``onnxruntime.quantization`` (with ``quant_pre_process``), imported with the root logger kept."""
    with _root_logger_kept():
        import onnxruntime.quantization as quantization
        import onnxruntime.quantization.shape_inference  # noqa: F401  (quant_pre_process)
    return quantization


def _quantize_args(calibration: Calibration) -> dict[str, Any]:
    """``quantize_static``'s keyword arguments for ``calibration``'s format and method."""
    q = _ort_quantization()
    CalibrationMethod, QuantFormat, QuantType = q.CalibrationMethod, q.QuantFormat, q.QuantType

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    args: dict[str, Any] = {"quant_format": QuantFormat.QDQ, "per_channel": True,
                            "calibrate_method": methods[calibration.method], "weight_type": QuantType.QInt8}
    if calibration.format == "ort":
        args["activation_type"] = QuantType.QUInt8
    else:
        args["activation_type"] = QuantType.QInt8
        args["extra_options"] = {"ActivationSymmetric": True, "WeightSymmetric": True}
    return args


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's calibrators print progress to stdout (where the commands print results): log it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        yield
    for line in out.getvalue().splitlines():
        log.debug(f"onnxruntime.quantization: {line}")


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Calibration,
    *,
    batch: int | None = None,
    reader: CalibrationReader | None = None,
) -> None:
    """The fp32 ONNX file ``src`` quantized to int8 Q/DQ at ``dst`` (written atomically).

    ``batch``: the model's fixed batch (None: dynamic); calibration runs in batches of
    it. ``reader``: the reader to calibrate through (default: one over
    ``calibration.images``). ``dst`` keeps ``src``'s metadata and adds ``precision`` and
    ``quantization`` (format, method, samples).
    """
    import onnx

    q = _ort_quantization()
    src, dst = Path(src), Path(dst)
    reader = reader or CalibrationReader(_filled(calibration.images, batch), batch or CALIB_BATCH)
    log.info(f"quantizing {src.name}: {calibration.describe()}")
    with tempfile.TemporaryDirectory(prefix="rsd-quantize-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            with _quiet(), _root_logger_kept():
                q.shape_inference.quant_pre_process(str(src), str(tmp / "pre.onnx"))
                q.quantize_static(str(tmp / "pre.onnx"), str(tmp / "int8.onnx"), reader, **_quantize_args(calibration))
        except Exception as e:  # onnxruntime raises its own exception types for graphs it cannot quantize
            raise RSDError(f"ONNX Runtime cannot quantize {src.name}: {str(e).strip().splitlines()[0][:200]}") from None
        proto = onnx.load(str(tmp / "int8.onnx"))
    extra = {"precision": "int8", "quantization": json.dumps({k: v for k, v in calibration.to_json().items()
                                                              if k != "images"})}
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(extra)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(dst) as tmp_path:
        onnx.save(proto, str(tmp_path))


def predictions(runner: Runner, x: Any, batch: int | None) -> np.ndarray:
    """``runner``'s top-1 class per input; a fixed-``batch`` model gets its last chunk padded."""
    from .backends.base import as_numpy

    x = as_numpy(x)
    n = len(x)
    if batch is not None and n != batch:
        x = _filled(x, batch)
        return np.concatenate([as_numpy(runner(x[i:i + batch])) for i in range(0, len(x), batch)])[:n].argmax(1)
    return as_numpy(runner(x)).argmax(1)


def accuracy_gate(
    reference: Runner,
    candidate: Runner,
    dataset: Dataset,
    *,
    max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
    batch: int | None = None,
) -> dict[str, Any]:
    """Top-1 of ``candidate`` (the int8 model) against ``reference`` (the fp32 model) on every
    image of ``dataset`` (the validation split), as a check record.

    Top-1 in percent, the drop ``fp32_top1 - int8_top1`` in points (from the counts of
    correct images, so it is exact); passed when the drop is at most ``max_top1_drop``.
    """
    from torch.utils.data import DataLoader

    right_ref = right_cand = agree = n = 0
    for x, y in DataLoader(dataset, batch_size=batch or GATE_BATCH, num_workers=0):
        a, b, y = predictions(reference, x, batch), predictions(candidate, x, batch), y.numpy()
        right_ref += int((a == y).sum())
        right_cand += int((b == y).sum())
        agree += int((a == b).sum())
        n += len(y)
    drop = 100.0 * (right_ref - right_cand) / n
    return {
        "name": "int8 top-1 gate on validation images",
        "passed": drop <= max_top1_drop,
        "images": n,
        "fp32_top1": 100.0 * right_ref / n,
        "int8_top1": 100.0 * right_cand / n,
        "top1_drop": drop,
        "top1_agreement": agree / n,
        "max_top1_drop": max_top1_drop,
    }


def gate_message(gate: Mapping[str, Any]) -> str:
    """One line saying why the gate refused: the figures and what to try."""
    return (
        f"{gate['name']}: top-1 drops {gate['top1_drop']:.2f} points (fp32 {gate['fp32_top1']:.2f}% -> int8 "
        f"{gate['int8_top1']:.2f}% on {gate['images']} images, top-1 agreement {gate['top1_agreement']:.4f}), "
        f"more than {option('max_top1_drop')} {gate['max_top1_drop']:g}; try another {option('calib_method')} "
        f"or more {option('calib_samples')}, or deploy the fp32 model"
    )
