"""Timers built on runners: one inference on a fixed input, returning the seconds taken.

A runner's :meth:`~rsd_deploy.backends.Runner.bind` keeps the input resident on
its device, so a call is one inference and nothing else. Runners whose CUDA work
is queued on torch's current stream (PyTorch and TensorRT on CUDA) are timed with
CUDA events; the others (CPU, and ONNX Runtime, whose calls return when its own
stream is done) with the wall clock.

Every timer owns its input, made once with a fixed seed, so the three models of
a comparison see the same data.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from ..backends import Runner
from .runner import Timer


def example_input(batch: int, input_shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A fixed ``(batch, C, H, W)`` float32 input on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=g)


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


def runner_timer(runner: Runner, batch: int, input_shape: tuple[int, int, int]) -> Timer:
    """A timer of ``runner`` on :func:`example_input` ``(batch, *input_shape)``."""
    call = runner.bind(example_input(batch, input_shape))
    if runner.cuda_events:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def run() -> float:
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run

    def wall() -> float:
        t = time.perf_counter()
        call()
        return time.perf_counter() - t

    return wall
