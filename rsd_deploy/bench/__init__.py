"""Latency benchmarks: evidence that fused RSD models cost nothing at inference.

``bench_run`` compares an RSD run's unfused training form, its fused form and a
plain baseline of the same architecture through PyTorch, ONNX Runtime or TensorRT.
"""

from .compare import bench_run, parse_batch_sizes
from .runner import Budget

__all__ = ["Budget", "bench_run", "parse_batch_sizes"]
