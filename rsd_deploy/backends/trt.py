"""TensorRT 10 and 11: the artifact is an engine built from the ONNX file; the runner runs it on CUDA.

TensorRT is optional (``pip install 'rsd-deploy[trt]'`` on a machine with an
NVIDIA GPU: the ``tensorrt`` package on PyPI fetches NVIDIA's wheels from
pypi.nvidia.com) and imported lazily: :func:`require_tensorrt` gives a one-line
:class:`RSDError` saying how to get it when it, a supported version or a CUDA
device is missing.

Networks are *strongly typed* on both versions (TensorRT 11 removed weak typing and
its precision builder flags): every tensor takes the type the ONNX file gives it, so
the engine's precision comes from the file. An fp32 file gives an fp32 engine, an
fp16 file (fp16 weights and compute, fp32 input and output) an fp16 engine, a Q/DQ
file an int8 engine. ``precision`` says which of these the file is expected to carry.
Builds clear TF32 (where the flag exists) so that fp32 layers compute in true fp32
(fp32 engines are checked against ONNX Runtime at fp32 tolerances).

Engines have one optimization profile over the batch axis, ``(min, opt, max)``;
the other axes are fixed by the ONNX file. Runners work on torch's current CUDA
stream, so CUDA events time them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
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
SOURCE_PRECISION = True  # strongly typed: the ONNX file carries the engine's precision
INT8_FORMAT = "trt"  # symmetric int8 Q/DQ: TensorRT's explicit quantization
FILE = "model.engine"
DEVICES = ("cuda",)
#: Against ONNX Runtime, per engine precision (TF32 off for fp32). int8: against ONNX
#: Runtime running the same Q/DQ file; provisional, not yet measured on a GPU.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-3, rtol=1e-3),
    "fp16": Tolerance(atol=1e-2, rtol=2e-2),
    "int8": Tolerance(atol=5e-2, rtol=5e-2),
}
#: TensorRT major versions the builder and runner are written for.
SUPPORTED_MAJORS = (10, 11)
INSTALL_HINT = "pip install 'rsd-deploy[trt]' on a machine with an NVIDIA GPU"
WORKSPACE_BYTES = 1 << 30
_THIS = sys.modules[__name__]
log = logging.getLogger(__name__)


def _major(version: str) -> int | None:
    """The major version in ``version`` ("10.9.0" -> 10), or None when it has none."""
    head = str(version).split(".")[0]
    return int(head) if head.isdigit() else None


def require_tensorrt():
    """The ``tensorrt`` module, or :class:`RSDError` when it or a CUDA device is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RSDError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise RSDError(f"TensorRT needs a CUDA device and none is available: {INSTALL_HINT}")
    if _major(trt.__version__) not in SUPPORTED_MAJORS:
        wanted = " or ".join(map(str, SUPPORTED_MAJORS))
        raise RSDError(f"TensorRT {trt.__version__} found; rsd-deploy needs TensorRT {wanted}: {INSTALL_HINT}")
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


def _network_flags(trt) -> int:
    """Creation flags of a strongly typed network (explicit batch is the only mode since TensorRT 10).

    TensorRT 11 types every network strongly and ignores the flag; should a later 11.x
    drop it, no flag is needed there.
    """
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if _major(trt.__version__) == 10:
            raise RSDError(f"TensorRT {trt.__version__} has no strongly typed networks: {INSTALL_HINT}")
        return 0
    return 1 << int(flag)


def _parse_onnx(trt, builder, logger, onnx_path: str | os.PathLike, input_shape: tuple[int, int, int]):
    """The strongly typed network of ``onnx_path``, checked to take one ``(N, *input_shape)`` input
    and give one output."""
    network = builder.create_network(_network_flags(trt))
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


def _clear_tf32(trt, config) -> bool:
    """Clear TF32 so that fp32 layers compute in true fp32; False where TensorRT has no TF32 flag.

    TF32 is a compute mode of fp32 tensors, not a tensor type: strong typing leaves it
    (on by default), and TensorRT 11 removed only the weak-typing precision flags.
    """
    flag = getattr(trt.BuilderFlag, "TF32", None)
    if flag is None:
        log.warning(f"TensorRT {trt.__version__} has no TF32 builder flag: fp32 layers may compute in TF32")
        return False
    config.clear_flag(flag)
    return True


def _use_timing_cache(config, cache_path: Path | None) -> None:
    """Start from the timing cache at ``cache_path`` when it exists and fits this TensorRT and GPU."""
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another TensorRT version or GPU: start from an empty one.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


#: Datatype words of the engine inspector's JSON ("Half", "Row major linear FP32 format", ...).
_DATATYPE_WORDS = {
    "float": "fp32", "fp32": "fp32", "half": "fp16", "fp16": "fp16", "bf16": "bf16", "bfloat16": "bf16",
    "int8": "int8", "uint8": "uint8", "fp8": "fp8", "int4": "int4", "fp4": "fp4", "int32": "int32",
    "int64": "int64", "bool": "bool",
}
#: Datatypes a layer can compute in, narrowest first.
_COMPUTE_TYPES = ("int4", "fp4", "int8", "fp8", "fp16", "bf16", "fp32")
#: Where the asked precision comes from, per precision (for the fallback error).
_PRECISION_SOURCE = {
    "fp32": "an fp32 ONNX file",
    "fp16": "an fp16 ONNX file (fp16 weights and compute)",
    "int8": "a Q/DQ-quantized ONNX file",
}


def _tensor_datatype(tensor: Any) -> str | None:
    """The datatype of one tensor of the inspector's JSON: TensorRT 11's "Datatype" (or
    "DataType"), else the datatype word in TensorRT 10's "Format/Datatype"."""
    if not isinstance(tensor, Mapping):
        return None
    text = tensor.get("Datatype") or tensor.get("DataType") or tensor.get("Format/Datatype") or ""
    for word in re.findall(r"[a-z0-9]+", str(text).lower()):
        if word in _DATATYPE_WORDS:
            return _DATATYPE_WORDS[word]
    return None


def layer_precision(layer: Any) -> str | None:
    """The datatype a layer of the inspector's JSON computes in: the narrowest of its inputs'
    (an int8 convolution reads int8 and may write fp32), else of its outputs'; None if untyped."""
    if not isinstance(layer, Mapping):
        return None
    for key in ("Inputs", "Outputs"):
        types = {_tensor_datatype(t) for t in layer.get(key) or ()}
        for dtype in _COMPUTE_TYPES:
            if dtype in types:
                return dtype
    return None


def _is_convolution(layer: Any) -> bool:
    """Whether a layer of the inspector's JSON is a convolution ("CaskConvolution", ...)."""
    if not isinstance(layer, Mapping):
        return False
    return "convolution" in f"{layer.get('LayerType', '')} {layer.get('ParameterType', '')}".lower()


def layer_precisions(layers: Iterable[Any]) -> dict[str, dict[str, int]]:
    """Per-datatype counts of the engine's layers: ``{"convolution": {...}, "all": {...}}``;
    a layer the inspector gives no datatype for counts as "unknown"."""
    layers = list(layers)

    def count(group: list[Any]) -> dict[str, int]:
        return dict(Counter(layer_precision(layer) or "unknown" for layer in group).most_common())

    return {"convolution": count([la for la in layers if _is_convolution(la)]), "all": count(layers)}


def _engine_layers(trt, logger, engine_bytes: bytes | memoryview) -> list[Any]:
    """The layers of a serialized engine as its inspector describes them (JSON; detailed when the
    engine was built with ``ProfilingVerbosity.DETAILED``); empty when it describes none."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise RSDError("TensorRT cannot load the engine it has just built (see its log above)")
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        info = json.loads(text)
    except (TypeError, ValueError):
        log.warning("TensorRT's engine information is not JSON: the engine's layer datatypes are unknown")
        return []
    layers = info.get("Layers") if isinstance(info, Mapping) else None
    return list(layers) if isinstance(layers, list) else []


def check_engine_precision(precision: str, counts: Mapping[str, Mapping[str, int]],
                           onnx_path: str | os.PathLike) -> None:
    """Refuse an engine whose layers do not mostly compute in ``precision`` (a silent fallback).

    The rule: more than half of the engine's convolution layers (of all its layers when
    it has none) must compute in ``precision``. When the inspector gives no datatypes,
    an fp32 build passes with a warning and an fp16 or int8 build is refused: it cannot
    be verified.
    """
    basis, group = ("convolution", counts["convolution"]) if counts["convolution"] else ("all", counts["all"])
    typed = {dtype: n for dtype, n in group.items() if dtype != "unknown"}
    if not typed:
        if precision == "fp32":
            log.warning(f"TensorRT gave no layer datatypes for the engine from {onnx_path}: its precision is unchecked")
            return
        raise RSDError(
            f"TensorRT gave no layer datatypes for the engine built from {onnx_path}, so its {precision} "
            f"precision cannot be verified; nothing was written"
        )
    if typed.get(precision, 0) * 2 > sum(typed.values()):
        return
    what = "convolution layers" if basis == "convolution" else "layers"
    held = ", ".join(f"{dtype} {n}" for dtype, n in group.items())
    raise RSDError(
        f"{precision} was asked but the engine TensorRT built from {onnx_path} computes mostly in another "
        f"precision ({what}: {held}); strongly typed builds take their precision from the ONNX file, so "
        f"build from {_PRECISION_SOURCE[precision]}; nothing was written"
    )


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
    equal to its batch. The network is strongly typed: ``precision`` ("fp32", "fp16",
    "int8") is the one the ONNX file carries, and no precision flag is set.
    ``timing_cache``, when given, is read if it exists and rewritten (atomically) with
    the tactics timed by this build. Returns what was built: the profile, precision,
    TensorRT version and engine size.
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
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer datatypes for the inspector
    tf32_cleared = _clear_tf32(trt, config)
    _add_profile(builder, config, network, onnx_path, input_shape, (min_batch, opt_batch, max_batch))
    cache_path = Path(timing_cache) if timing_cache is not None else None
    _use_timing_cache(config, cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RSDError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    engine_bytes = memoryview(serialized)
    counts = layer_precisions(_engine_layers(trt, logger, engine_bytes))
    log.info(f"TensorRT engine layers by datatype: {counts}")
    check_engine_precision(precision, counts, onnx_path)
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
        "strongly_typed": True,
        "tf32": False if tf32_cleared else None,
        "tensorrt_version": trt.__version__,
        "engine_bytes": len(engine_bytes),
        "layer_precisions": counts,
        "device": torch.cuda.get_device_name(),
    }


def _torch_dtype(trt, engine, name: str, path: Path) -> torch.dtype:
    """The torch type of the engine's input or output ``name``: fp32 or fp16, else RSDError."""
    dtype = engine.get_tensor_dtype(name)
    to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if dtype not in to_torch:
        raise RSDError(f"{path}: tensor {name!r} is {dtype}; rsd-deploy runs engines with fp32 or fp16 input and output")
    return to_torch[dtype]


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
        self.input_dtype = _torch_dtype(trt, self.engine, self.input_name, path)
        self.output_dtype = _torch_dtype(trt, self.engine, self.output_name, path)

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
