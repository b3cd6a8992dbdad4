"""TensorRT 10: the artifact is an engine built from the ONNX file; the runner runs it on CUDA.

TensorRT is optional (``pip install 'rsd-deploy[trt]'`` on a machine with an
NVIDIA GPU) and imported lazily: :func:`require_tensorrt` gives a one-line
:class:`RSDError` saying how to get it when it or a CUDA device is missing.

Engines have one optimization profile over the batch axis, ``(min, opt, max)``;
the other axes are fixed by the ONNX file. Builds clear TF32 so that fp32 engines
compute in true fp32 (their parity against ONNX Runtime is checked at fp32
tolerances); precision ``fp16`` lets TensorRT pick half-precision kernels.
Runners work on torch's current CUDA stream, so CUDA events time them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import RSDError, option
from ..io import atomic_path
from ..onnx import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME
from ..verify import Tolerance
from .base import Array, ArtifactSpec, Availability, as_tensor, check_device, check_precision, file_artifact

if TYPE_CHECKING:
    from ..run import TensorRTProfile

NAME = "trt"
LABEL = "TensorRT"
SOURCE = "ort"  # engines are built from the ONNX file
FILE = "model.engine"
DEVICES = ("cuda",)
#: Against ONNX Runtime fp32, per engine precision (TF32 off for fp32).
TOLERANCES = {"fp32": Tolerance(atol=1e-3, rtol=1e-3), "fp16": Tolerance(atol=1e-2, rtol=2e-2)}
INSTALL_HINT = "pip install 'rsd-deploy[trt]' on a machine with an NVIDIA GPU"
WORKSPACE_BYTES = 1 << 30
_THIS = sys.modules[__name__]


def require_tensorrt():
    """The ``tensorrt`` module, or :class:`RSDError` when it or a CUDA device is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RSDError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise RSDError(f"TensorRT needs a CUDA device and none is available: {INSTALL_HINT}")
    if int(trt.__version__.split(".")[0]) != 10:
        raise RSDError(f"TensorRT {trt.__version__} found; rsd-deploy needs TensorRT 10: {INSTALL_HINT}")
    return trt


def available(device: str = "cuda") -> Availability:
    if device not in DEVICES:
        return Availability(f"TensorRT runs on CUDA only, not {device}")
    try:
        require_tensorrt()
    except RSDError as e:
        return Availability(str(e))
    return Availability()


def deployed_profile(deploy_dir: Path, batch_sizes: Sequence[int]) -> TensorRTProfile:
    """The engine profile recorded in the deploy ``run.json``, checked against ``batch_sizes``.

    Needs no TensorRT, so a batch size the engine cannot run is refused up front.
    """
    from .. import run as runs

    file_artifact(deploy_dir / FILE, "TensorRT engine", f"build one with fuse_export ({option('trt')})")
    profile = runs.read_run(deploy_dir).tensorrt
    if profile is None:
        keys = ", ".join(f.name for f in dataclasses.fields(runs.TensorRTProfile))
        raise RSDError(f"{deploy_dir / runs.RUN_FILE} has no complete 'tensorrt' profile ({keys})")
    lo, hi = profile.min_batch, profile.max_batch
    outside = [b for b in batch_sizes if not lo <= b <= hi]
    if outside:
        raise RSDError(
            f"batch size {outside[-1]} is outside the engine's profile ({lo} to {hi}); rebuild it with "
            f"fuse_export ({option('trt')}, {option('max_batch')} {outside[-1]}) "
            f"or keep {option('batch_sizes')} within {lo}-{hi}"
        )
    if profile.precision not in TOLERANCES:
        raise RSDError(f"unknown TensorRT precision {profile.precision!r} in {deploy_dir / runs.RUN_FILE}")
    return profile


def deployed(deploy_dir: Path, input_shape: tuple[int, int, int], batch_sizes: Sequence[int]) -> ArtifactSpec:
    """The fused engine's profile and precision, and the opset of the ONNX file it came from."""
    from . import onnxrt

    profile = deployed_profile(deploy_dir, batch_sizes)
    onnx_path = deploy_dir / onnxrt.FILE
    opset = onnxrt.onnx_settings(onnx_path, input_shape)[0] if onnx_path.is_file() else DEFAULT_OPSET
    return ArtifactSpec(tuple(input_shape), precision=profile.precision, opset=opset,
                        profile=(profile.min_batch, profile.opt_batch, profile.max_batch))


def make(source: Path, folder: Path, name: str, spec: ArtifactSpec) -> Path:
    """An engine built from the ONNX file ``source`` into ``folder/NAME.engine``."""
    if spec.profile is None:
        raise RSDError("a TensorRT engine needs a batch profile (min, opt, max)")
    lo, opt, hi = spec.profile
    path = Path(folder) / f"{name}.engine"
    build_engine(source, path, input_shape=spec.input_shape, min_batch=lo, opt_batch=opt, max_batch=hi,
                 precision=spec.precision)
    return path


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _parse_onnx(trt, builder, logger, onnx_path: str | os.PathLike, input_shape: tuple[int, int, int]):
    """The network of ``onnx_path``, checked to take one ``(N, *input_shape)`` input and give one output."""
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RSDError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise RSDError(f"{onnx_path} must have one input and one output for TensorRT")
    dims = tuple(network.get_input(0).shape)
    if tuple(dims[1:]) != tuple(input_shape):
        raise RSDError(f"{onnx_path} takes input (N, {', '.join(map(str, dims[1:]))}), not (N, {input_shape})")
    # The parser must outlive the network's use: it owns the weights the network refers to.
    return network, parser


def _add_profile(builder, config, network, onnx_path, input_shape: tuple[int, int, int],
                 batches: tuple[int, int, int]) -> None:
    """The batch profile ``(min, opt, max)``: a dynamic-batch input gets one; a fixed one must equal it."""
    tensor = network.get_input(0)
    fixed = tuple(tensor.shape)[0]
    if fixed == -1:
        profile = builder.create_optimization_profile()
        profile.set_shape(tensor.name, *((b, *input_shape) for b in batches))
        config.add_optimization_profile(profile)
    elif batches != (fixed,) * 3:
        raise RSDError(
            f"{onnx_path} has a fixed batch of {fixed}: the engine profile must be "
            f"({fixed}, {fixed}, {fixed}), not ({', '.join(map(str, batches))})"
        )


def _use_timing_cache(config, cache_path: Path | None) -> None:
    """Start from the timing cache at ``cache_path`` when it exists and fits this TensorRT and GPU."""
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another TensorRT version or GPU: start from an empty one.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    input_shape: tuple[int, int, int],
    min_batch: int = 1,
    opt_batch: int,
    max_batch: int,
    precision: str = "fp32",
    timing_cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build a serialized engine from ``onnx_path`` and write it to ``engine_path`` atomically.

    ``input_shape`` is ``(C, H, W)``; the profile covers batches ``min_batch`` to
    ``max_batch``, tuned for ``opt_batch``. A fixed-batch ONNX file needs all three
    equal to its batch. ``timing_cache``, when given, is read if it exists and
    rewritten (atomically) with the tactics timed by this build. Returns what was
    built: the profile, precision, TensorRT version and engine size.
    """
    check_precision(_THIS, precision)
    trt = require_tensorrt()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise RSDError(
            f"the batch profile needs 1 <= min <= opt <= max (got {min_batch}, {opt_batch}, {max_batch})"
        )
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse_onnx(trt, builder, logger, onnx_path, input_shape)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    _add_profile(builder, config, network, onnx_path, input_shape, (min_batch, opt_batch, max_batch))
    cache_path = Path(timing_cache) if timing_cache is not None else None
    _use_timing_cache(config, cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RSDError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    engine_bytes = memoryview(serialized)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(engine_bytes)
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {
        "min_batch": int(min_batch),
        "opt_batch": int(opt_batch),
        "max_batch": int(max_batch),
        "precision": precision,
        "tf32": False,
        "tensorrt_version": trt.__version__,
        "engine_bytes": len(engine_bytes),
        "device": torch.cuda.get_device_name(),
    }


class TrtRunner:
    """A deserialized engine that maps ``(N, C, H, W)`` inputs to logits on the GPU.

    Runs on torch's current CUDA stream; inputs are moved to the GPU, outputs stay
    there. Batches from :attr:`min_batch` to :attr:`max_batch` are accepted.
    ``precision`` is the one the engine was built with.
    """

    backend = NAME
    device = "cuda"
    cuda_events = True

    def __init__(self, engine_path: str | os.PathLike, precision: str = "fp32") -> None:
        check_precision(_THIS, precision)
        trt = require_tensorrt()
        self.precision = precision
        path = Path(engine_path)
        if not path.is_file():
            raise RSDError(f"engine file {path} not found")
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RSDError(
                f"TensorRT cannot load {path}: it is corrupt or was built by another TensorRT "
                f"version or GPU; rebuild it with fuse_export ({option('trt')})"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RSDError(f"{path} must have one input and one output (has {inputs} and {outputs})")
        self.input_name, self.output_name = inputs[0], outputs[0]
        if (self.input_name, self.output_name) != (INPUT_NAME, OUTPUT_NAME):
            raise RSDError(f"{path} does not come from an rsd-deploy ONNX file")
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_shape: tuple[int, ...] = shape[1:]
        if shape[0] == -1:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        else:
            self.min_batch = self.max_batch = int(shape[0])
        to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.input_dtype = to_torch[self.engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = to_torch[self.engine.get_tensor_dtype(self.output_name)]

    def _input(self, x: Array) -> torch.Tensor:
        """``x`` on the GPU in the engine's input type, checked against its profile."""
        if tuple(x.shape[1:]) != self.input_shape or not self.min_batch <= x.shape[0] <= self.max_batch:
            raise RSDError(
                f"input shape {tuple(x.shape)} is outside the engine's profile: batch "
                f"{self.min_batch} to {self.max_batch} of {self.input_shape}"
            )
        return as_tensor(x, "cuda", self.input_dtype)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise RSDError(f"TensorRT rejected input shape {tuple(x.shape)}")
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=self.output_dtype, device=x.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(x.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out

    def __call__(self, x: Array) -> torch.Tensor:
        return self._run(self._input(x))

    def bind(self, x: Array) -> Callable[[], torch.Tensor]:
        x = self._input(x)
        return lambda: self._run(x)

    def settings(self) -> dict[str, Any]:
        return {}


def load(
    path: str | os.PathLike,
    *,
    device: str = "cuda",
    precision: str = "fp32",
    threads: int | None = None,
) -> TrtRunner:
    """A runner for the serialized engine at ``path`` (built with ``precision``)."""
    check_device(_THIS, device)
    check_precision(_THIS, precision)
    return TrtRunner(path, precision)
