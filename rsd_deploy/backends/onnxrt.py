"""ONNX Runtime: the artifact is an ONNX file exported from the module; the runner a session.

onnxruntime is imported only when a session is made or availability is asked.
Runs go through I/O binding when timed: input and output stay on the device and
``run_with_iobinding`` returns once the device is done, so a call is exactly one
inference (ONNX Runtime runs on its own CUDA stream, which torch's CUDA events
cannot see: it is timed by the wall clock).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RSDError, option
from ..onnx import INPUT_NAME, OUTPUT_NAME, export_onnx
from ..verify import Tolerance
from .base import Array, ArtifactSpec, Availability, as_numpy, check_device, check_precision, file_artifact

NAME = "ort"
LABEL = "ONNX Runtime"
SOURCE = "torch"
FILE = "model.onnx"
DEVICES = ("cpu", "cuda")
#: fp16 (fp16 weights and compute, fp32 input and output) against the fp32 reference, as
#: TensorRT's fp16; int8 has no logit tolerance: it is judged by its top-1 on validation
#: images (:func:`rsd_deploy.quantize.accuracy_gate`).
TOLERANCES = {"fp32": Tolerance(atol=1e-4, rtol=1e-4), "fp16": Tolerance(atol=1e-2, rtol=2e-2), "int8": None}
INT8_FORMAT = "ort"  # uint8 activations: what ONNX Runtime's CPU kernels run fast
_THIS = sys.modules[__name__]


def available(device: str = "cpu") -> Availability:
    try:
        import onnxruntime as ort
    except ImportError:
        return Availability("ONNX Runtime is not installed: pip install onnxruntime")
    if device == "cuda" and (
        "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available()
    ):
        return Availability(
            "ONNX Runtime has no usable CUDA provider here: install onnxruntime-gpu "
            "on a machine with an NVIDIA GPU"
        )
    return Availability()


def onnx_settings(path: Path, input_shape: tuple[int, int, int]) -> tuple[int, int | None]:
    """``(opset, fixed batch or None)`` of an exported model, checked against the run's input shape."""
    import onnx

    file_artifact(path, "exported ONNX", f"export one first with fuse_export ({option('onnx')})")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own decode errors
        raise RSDError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not proto.graph.input:
        raise RSDError(f"{path} has no default-domain opset or no input")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or tuple(shape[1:]) != tuple(input_shape):
        raise RSDError(f"{path} takes input {shape}, but the run's models take (N, {', '.join(map(str, input_shape))})")
    return int(opset), shape[0]


def deployed(deploy_dir: Path, input_shape: tuple[int, int, int], batch_sizes: Sequence[int]) -> ArtifactSpec:
    """The fused ONNX file's opset and batch axis; a fixed batch runs only that batch."""
    path = deploy_dir / FILE
    opset, fixed = onnx_settings(path, input_shape)
    if fixed is not None and list(batch_sizes) != [fixed]:
        raise RSDError(
            f"{path} was exported for batch {fixed} only; "
            f"set {option('batch_sizes')} to {fixed} or re-export with a dynamic {option('batch')}"
        )
    return ArtifactSpec(tuple(input_shape), batch=fixed, opset=opset)


def make(source: nn.Module, folder: Path, name: str, spec: ArtifactSpec) -> Path:
    """``source`` exported to ``folder/NAME.onnx`` with the spec's opset, batch axis and precision.

    fp16: exported from a half-precision copy (fp32 input and output); int8: the fp32
    file (``NAME_fp32.onnx``) quantized with ``spec.calibration``.
    """
    from ..quantize import MIN_OPSET, quantize_onnx

    check_precision(_THIS, spec.precision)
    path = Path(folder) / f"{name}.onnx"
    if spec.precision != "int8":
        export_onnx(source, path, input_shape=spec.input_shape, batch=spec.batch, opset=spec.opset,
                    precision=spec.precision)
        return path
    if spec.calibration is None:
        raise RSDError("an int8 ONNX file needs calibration images (ArtifactSpec.calibration)")
    if spec.opset < MIN_OPSET:
        raise RSDError(f"int8 files (per-channel Q/DQ) need opset {MIN_OPSET} or later, not {spec.opset}")
    fp32 = Path(folder) / f"{name}_fp32.onnx"
    export_onnx(source, fp32, input_shape=spec.input_shape, batch=spec.batch, opset=spec.opset)
    quantize_onnx(fp32, path, spec.calibration, batch=spec.batch)
    return path


class OrtRunner:
    """An ONNX Runtime session on ``device``: numpy (or tensor) in, numpy logits out."""

    backend = NAME
    cuda_events = False  # ONNX Runtime uses its own CUDA stream; calls return when done

    def __init__(self, path: Path, device: str, precision: str, threads: int | None) -> None:
        import onnxruntime as ort

        self.path, self.device, self.precision = path, device, precision
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise RSDError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RSDError(f"ONNX Runtime did not place {path} on the CUDA provider")
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Array) -> np.ndarray:
        return self.session.run(None, {self.input_name: as_numpy(x)})[0]

    def bind(self, x: Array) -> Callable[[], None]:
        """One inference through I/O binding, input and output bound on the device."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(as_numpy(x), self.device, 0)
        binding.bind_ortvalue_input(INPUT_NAME, value)
        binding.bind_output(OUTPUT_NAME, self.device)

        def run() -> None:
            self.session.run_with_iobinding(binding)

        run.input = value  # the bound input must live as long as the call
        return run

    def settings(self) -> dict[str, Any]:
        opts = self.session.get_session_options()
        return {"onnxruntime_providers": self.session.get_providers(),
                "provider_options": self.session.get_provider_options(),
                "graph_optimization": str(opts.graph_optimization_level),
                "intra_op_threads": opts.intra_op_num_threads}


def load(
    path: str | os.PathLike,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
) -> OrtRunner:
    """A session for the ONNX file at ``path`` on ``device`` with ``threads`` intra-op threads."""
    check_device(_THIS, device)
    check_precision(_THIS, precision)
    available(device).require()
    return OrtRunner(Path(path), device, precision, threads)
