"""Timers: run one model once on a fixed input through a backend, return the seconds taken.

* PyTorch eager, CPU (wall clock) or CUDA (CUDA events on the current stream).
* ONNX Runtime, CPU or CUDA, through I/O binding: input and output stay on the
  device and ``run_with_iobinding`` returns once the device is done, so the wall
  clock covers exactly one inference (ONNX Runtime runs on its own CUDA stream,
  which torch's CUDA events cannot see).
* TensorRT engines through :class:`rsd_deploy.tensorrt.TrtRunner` (imported
  lazily), inputs and outputs resident on the GPU, timed with CUDA events.

Every timer owns its input, made once with a fixed seed, so the three models of
a comparison see the same data.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import RSDError
from .runner import Timer

BACKENDS = ("torch", "ort", "trt")
DEVICES = ("cpu", "cuda")


def example_input(batch: int, input_shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A fixed ``(batch, C, H, W)`` float32 input on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=g)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RSDError("--device cuda needs a CUDA device, and PyTorch sees none here")


@contextlib.contextmanager
def torch_settings(threads: int, device: str) -> Iterator[None]:
    """Intra-op threads for PyTorch, and cuDNN autotuning on CUDA; restored afterwards."""
    old_threads, old_bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_bench


def _cuda_event_timer(fn, x: torch.Tensor) -> Timer:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def run() -> float:
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return run


def torch_timer(model: nn.Module, batch: int, input_shape: tuple[int, int, int], device: str) -> Timer:
    """PyTorch eager inference of ``model`` (moved to ``device``, eval mode, no autograd)."""
    model = model.to(device).eval()
    x = example_input(batch, input_shape).to(device)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(inp)

    if device == "cuda":
        return _cuda_event_timer(forward, x)

    def run() -> float:
        t = time.perf_counter()
        forward(x)
        return time.perf_counter() - t

    return run


def ort_load(onnx_path: str | os.PathLike, device: str, threads: int):
    """An ONNX Runtime session for ``onnx_path`` on ``device``, checked to really use it."""
    from ..onnx import ort_session

    session = ort_session(onnx_path, device=device, threads=threads)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RSDError(f"ONNX Runtime did not place {onnx_path} on the CUDA provider")
    return session


def ort_timer(session, batch: int, input_shape: tuple[int, int, int], device: str) -> Timer:
    """ONNX Runtime inference with ``session`` (from :func:`ort_load`) through I/O binding.

    Input and output are bound on ``device`` (on CUDA they never leave the GPU), so a
    call is one inference with no host copies; ``run_with_iobinding`` returns when
    the device is done. The same binding path serves CPU and CUDA.
    """
    import onnxruntime as ort

    from ..onnx import INPUT_NAME, OUTPUT_NAME

    x = example_input(batch, input_shape).numpy()
    binding = session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    binding.bind_output(OUTPUT_NAME, device)

    def run() -> float:
        t = time.perf_counter()
        session.run_with_iobinding(binding)
        return time.perf_counter() - t

    return run


def trt_load(engine_path: str | os.PathLike):
    """A :class:`rsd_deploy.tensorrt.TrtRunner` for a serialized engine (TensorRT imported here)."""
    from ..tensorrt import TrtRunner

    return TrtRunner(engine_path)


def trt_timer(runner, batch: int, input_shape: tuple[int, int, int]) -> Timer:
    """TensorRT inference with ``runner`` (from :func:`trt_load`), timed with CUDA events."""
    if not runner.min_batch <= batch <= runner.max_batch:
        raise RSDError(
            f"batch size {batch} is outside the engine's profile "
            f"({runner.min_batch} to {runner.max_batch})"
        )
    x = example_input(batch, input_shape).to("cuda")
    return _cuda_event_timer(runner, x)
