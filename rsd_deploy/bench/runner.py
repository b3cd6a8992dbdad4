"""Interleaved timing: rounds of A B C, B C A, C A B ... so machine drift hits every model alike.

A *timer* runs one model once on a fixed input and returns the elapsed seconds
(the backend decides how to measure: wall clock on CPU, CUDA events on a GPU).
Each model is first warmed up; its warm-up latency sets how many back-to-back
calls make up its turn in a round (about ``round_s`` seconds, at least one), so
every round gives each model a comparable slice of time. The order rotates from
round to round so no model always follows the same one. Each turn starts with an
untimed lead call: the first call after another model ran pays for refilling caches
(on a 2-core CPU, ONNX Runtime resnet32 at batch 64 took ~110 ms there against ~62 ms
steady), which a deployed model serving alone never pays.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import RSDError, option

Timer = Callable[[], float]
DEFAULT_MIN_S = 3.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """How long to measure.

    ``min_s``: keep adding rounds until every model has been timed for at least
    this many seconds and ``min_rounds`` rounds have run (default when neither is
    given: :data:`DEFAULT_MIN_S`). ``iters``: instead, run exactly that many rounds
    of one call per model. Warm-up: at least ``warmup_s`` seconds and one call.
    ``lead_calls``: untimed calls at the start of every turn, after the model switch.
    """

    warmup_s: float = 1.0
    min_s: float | None = None
    iters: int | None = None
    round_s: float = 0.1
    min_rounds: int = 5
    lead_calls: int = 1

    def __post_init__(self) -> None:
        # Written as "not (x >= 0)" so that NaN, which fails every comparison, is refused too:
        # a NaN min_s would never be reached and the measurement would run forever.
        if not (math.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise RSDError(f"{option('warmup_s')} must be a finite number >= 0 (got {self.warmup_s})")
        if self.min_s is not None and self.iters is not None:
            raise RSDError(f"give either {option('min_s')} or {option('iters')}, not both")
        if self.min_s is None and self.iters is None:
            object.__setattr__(self, "min_s", DEFAULT_MIN_S)
        if self.min_s is not None and not (math.isfinite(self.min_s) and self.min_s > 0):
            raise RSDError(f"{option('min_s')} must be a finite positive number (got {self.min_s})")
        if self.iters is not None and self.iters < 1:
            raise RSDError(f"{option('iters')} must be at least 1 (got {self.iters})")
        if not (math.isfinite(self.round_s) and self.round_s > 0) or self.min_rounds < 1 or self.lead_calls < 0:
            raise RSDError("round_s must be positive, min_rounds at least 1 and lead_calls at least 0")

    def to_json(self) -> dict[str, float | int | None]:
        return asdict(self)


def warm_up(timer: Timer, seconds: float, min_calls: int = 1) -> list[float]:
    """Call ``timer`` for at least ``seconds`` and ``min_calls`` calls; return the call times."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        times.append(timer())
    return times


def calls_per_turn(latency_s: float, round_s: float, cap: int = 10_000) -> int:
    """Back-to-back calls that fill about ``round_s`` seconds (at least 1, at most ``cap``)."""
    if latency_s <= 0:
        return cap
    return int(min(cap, max(1, round(round_s / latency_s))))


def measure(
    timers: Mapping[str, Timer], budget: Budget, label: str = "timing"
) -> dict[str, list[list[float]]]:
    """Time every model in interleaved rounds; returns ``{model: [[seconds per call] per round]}``.

    Progress is logged at INFO, each line starting with ``label``.
    """
    names = list(timers)
    if not names:
        raise ValueError("nothing to measure")
    per_turn: dict[str, int] = {}
    for name in names:
        warm = warm_up(timers[name], budget.warmup_s)
        # The last half of the warm-up, past one-time setup, predicts the steady state
        # (with a single warm-up call, that call: an overestimate, so fewer calls per turn).
        per_turn[name] = 1 if budget.iters else calls_per_turn(
            float(np.median(warm[len(warm) // 2 :])), budget.round_s
        )
        log.info(f"{label}: warm-up {name}: {len(warm)} calls, {per_turn[name]} per turn")

    rounds: dict[str, list[list[float]]] = {n: [] for n in names}
    totals = dict.fromkeys(names, 0.0)

    def done() -> bool:
        r = len(rounds[names[0]])
        if budget.iters is not None:
            return r >= budget.iters
        return r >= budget.min_rounds and min(totals.values()) >= budget.min_s

    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one model's turn would be charged to that model
    try:
        r = 0
        while not done():
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                timer = timers[name]
                for _ in range(budget.lead_calls):
                    timer()
                turn = [timer() for _ in range(per_turn[name])]
                rounds[name].append(turn)
                totals[name] += sum(turn)
            r += 1
            if r % 10 == 0 or done():
                log.info(f"{label}: round {r}: " + ", ".join(f"{n} {totals[n]:.1f}s" for n in names))
    finally:
        if gc_was_enabled:
            gc.enable()
    return rounds
