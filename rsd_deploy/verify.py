"""Numerical parity between two implementations of the same network.

Every export step is checked the same way: run a reference (the unfused PyTorch
model, the fused PyTorch model, ONNX Runtime) and a candidate on the same inputs
and compare their logits. The error is judged against the scale of the logits,
``max|a - b| <= atol + rtol * max|a|``, because a network's logits may be O(1) or
O(1e6) (untrained BN statistics) and a per-element relative error is meaningless
near zero. Top-1 agreement is reported beside it; it can only differ where the two
best reference logits lie within twice the error, which the tolerance bounds.
Each implementation is a runner from :mod:`rsd_deploy.backends`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .backends.base import as_numpy
from .errors import RSDError

if TYPE_CHECKING:
    from .backends import Runner
    from .data import DataInfo


@dataclass(frozen=True)
class Tolerance:
    """Allowed error: ``max|a - b| <= atol + rtol * max|a|`` (``a`` the reference)."""

    atol: float
    rtol: float

    def __post_init__(self) -> None:
        # An infinite tolerance makes a check that cannot fail; NaN fails ">= 0".
        if not all(math.isfinite(t) and t >= 0 for t in (self.atol, self.rtol)):
            raise RSDError(f"tolerances must be finite and non-negative (got atol={self.atol}, rtol={self.rtol})")

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def compare(reference: Tensor | np.ndarray, output: Tensor | np.ndarray) -> dict[str, Any]:
    """Error statistics of ``output`` against ``reference`` (both ``(N, classes)`` logits)."""
    a, b = _numpy(reference), _numpy(output)
    if a.shape != b.shape:
        raise RSDError(f"output shape {tuple(b.shape)} differs from the reference's {tuple(a.shape)}")
    finite = bool(np.isfinite(b).all())
    diff = np.abs(a - b)
    scale = float(np.abs(a).max()) if a.size else 0.0
    max_abs = float(diff.max()) if finite and diff.size else float("inf")
    return {
        "n": int(a.shape[0]),
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else max_abs,
        "max_ref": scale,
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()) if a.size else 1.0,
        "finite": finite,
    }


def parity(
    name: str,
    reference: Tensor | np.ndarray,
    output: Tensor | np.ndarray,
    tol: Tolerance,
    **info: Any,
) -> dict[str, Any]:
    """A check record: :func:`compare`'s numbers, the tolerance, and whether it passed."""
    stats = compare(reference, output)
    bound = tol.bound(stats["max_ref"])
    passed = stats["finite"] and stats["max_abs"] <= bound
    return {"name": name, "passed": passed, **info, **stats,
            "atol": tol.atol, "rtol": tol.rtol, "bound": bound}


def require(check: Mapping[str, Any]) -> None:
    """Raise :class:`RSDError` describing ``check`` when it did not pass."""
    if check["passed"]:
        return
    if not check.get("finite", True):
        raise RSDError(f"{check['name']}: the output holds non-finite values")
    raise RSDError(
        f"{check['name']}: max abs error {check['max_abs']:.3g} exceeds the tolerance "
        f"{check['bound']:.3g} (atol {check['atol']:g} + rtol {check['rtol']:g} x max|y| "
        f"{check['max_ref']:.3g}); top-1 agreement {check['top1_agreement']:.4f}"
    )


def logits(runner: Runner, x: Tensor | np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """``runner``'s logits of ``x`` as float32 numpy, run in chunks of ``batch_size``.

    ``None`` runs everything at once; a fixed-batch model needs its batch.
    """
    step = batch_size or len(x)
    return np.concatenate([as_numpy(runner(x[i:i + step])) for i in range(0, len(x), step)])


def torch_logits(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """``model(x)`` in eval mode, in chunks of ``batch_size``, on CPU float32 (through the torch runner)."""
    from .backends import get_backend

    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    return torch.from_numpy(logits(get_backend("torch").load(model, device=device), x, batch_size))


def tile_batch(x: Tensor, n: int) -> Tensor:
    """``n`` samples taken cyclically from ``x`` (to fill a fixed or maximal batch)."""
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


def verification_inputs(
    data: DataInfo | None,
    input_shape: tuple[int, int, int],
    n: int,
    *,
    seed: int = 0,
) -> tuple[Tensor, str]:
    """``n`` inputs of ``(C, H, W)`` = ``input_shape`` for the parity checks, and where they came from.

    Real validation images (with the run's own preprocessing) when ``data`` describes a
    data set available here; otherwise fixed standard-normal inputs, which is what
    normalized images look like to the network.
    """
    from .data import eval_dataset, first_batch

    if n < 1:
        raise RSDError(f"the number of verification samples must be positive (got {n})")
    if data is not None:
        try:
            ds = eval_dataset(data)
            if len(ds) > 0:
                x, _ = first_batch(ds, min(n, len(ds)))
                return x, f"{len(x)} validation images of {data.name} ({data.dir or 'built-in'})"
        except (RSDError, TypeError, OSError):
            pass
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_shape, generator=g)
    return x, f"{n} fixed random inputs (seed {seed}; the run's data set is not available)"
