"""Statistics of latency samples: summaries, bootstrap intervals, the overhead verdict.

Pure functions on arrays of per-call times in seconds, so they can be tested on
synthetic timings. Samples are grouped in *rounds*: ``times[m]`` holds model
``m``'s calls, one row per round of the interleaved schedule (rows may differ in
length). Rounds, not single calls, are the independent units: machine drift moves
all calls of a round together, so intervals come from a bootstrap that resamples
whole rounds. A ratio of two models is taken within each round (the models ran
back to back there), so drift that hit both alike cancels before resampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import option

#: fused/baseline ratios inside [1 - TOLERANCE, 1 + TOLERANCE] count as "no overhead".
TOLERANCE = 0.03
#: Confidence level of every interval reported.
LEVEL = 0.95
#: Bootstrap replicates behind every interval.
N_BOOT = 2000
#: Fewer rounds than this make a cluster bootstrap too coarse to trust.
MIN_ROUNDS = 5
#: A model whose interquartile range exceeds this fraction of its median is flagged.
MAX_RELATIVE_IQR = 0.25

Rounds = Sequence[Sequence[float]]


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100] (got {q})")
    return float(np.percentile(a, q, method="linear"))


def summarize(times_s: Sequence[float] | np.ndarray, batch: int) -> dict[str, float]:
    """Median, mean, p90, p99, min, max, standard deviation (ms) and throughput (images/s)."""
    a = np.asarray(times_s, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no timings to summarize")
    if batch < 1:
        raise ValueError(f"batch must be positive (got {batch})")
    median = float(np.median(a))
    return {
        "calls": int(a.size),
        "total_s": float(a.sum()),
        "median_ms": median * 1e3,
        "mean_ms": float(a.mean()) * 1e3,
        "p25_ms": percentile(a, 25) * 1e3,
        "p75_ms": percentile(a, 75) * 1e3,
        "p90_ms": percentile(a, 90) * 1e3,
        "p99_ms": percentile(a, 99) * 1e3,
        "min_ms": float(a.min()) * 1e3,
        "max_ms": float(a.max()) * 1e3,
        "std_ms": float(a.std(ddof=1)) * 1e3 if a.size > 1 else 0.0,
        "throughput_ips": batch / median,
    }


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval ``[lo, hi]``."""

    value: float
    lo: float
    hi: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "level": LEVEL}


def _flat(rounds: Rounds) -> np.ndarray:
    return np.concatenate([np.asarray(r, dtype=np.float64) for r in rounds])


def _check_rounds(times: Mapping[str, Rounds]) -> int:
    counts = {len(r) for r in times.values()}
    if len(counts) != 1:
        raise ValueError("every model needs the same number of rounds (they are paired)")
    n = counts.pop()
    if n == 0:
        raise ValueError("no rounds")
    for name, rounds in times.items():
        if any(len(r) == 0 for r in rounds):
            raise ValueError(f"model {name!r} has an empty round")
    return n


def bootstrap_medians(
    times: Mapping[str, Rounds], *, n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of each model's median, resampling the same rounds for all models.

    Returns ``{model: array (n_boot,)}``. With equal-length rounds (the usual case)
    the resampling is vectorised; ragged rounds fall back to a loop.
    """
    n_rounds = _check_rounds(times)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_rounds, size=(n_boot, n_rounds))
    out: dict[str, np.ndarray] = {}
    for name, rounds in times.items():
        lengths = {len(r) for r in rounds}
        if len(lengths) == 1:
            table = np.asarray(rounds, dtype=np.float64)  # (rounds, calls)
            reps = np.empty(n_boot)
            step = max(1, 2_000_000 // table.size)  # bound the memory of one chunk
            for i in range(0, n_boot, step):
                chunk = table[picks[i : i + step]]  # (chunk, rounds, calls)
                reps[i : i + step] = np.median(chunk.reshape(len(chunk), -1), axis=1)
        else:
            arrays = [np.asarray(r, dtype=np.float64) for r in rounds]
            reps = np.array([np.median(np.concatenate([arrays[j] for j in p])) for p in picks])
        out[name] = reps
    return out


def _interval(point: float, reps: np.ndarray) -> Interval:
    tail = (1.0 - LEVEL) / 2 * 100
    return Interval(point, percentile(reps, tail), percentile(reps, 100 - tail))


def median_intervals(times: Mapping[str, Rounds], reps: Mapping[str, np.ndarray]) -> dict[str, Interval]:
    """Each model's median (s) with its 95% interval from the replicates of :func:`bootstrap_medians`."""
    return {m: _interval(float(np.median(_flat(times[m]))), reps[m]) for m in times}


def round_ratios(times: Mapping[str, Rounds], num: str, den: str) -> np.ndarray:
    """Per round, ``median(num's calls) / median(den's calls)``: the paired comparison.

    The models of one round ran back to back, so drift slower than a round (another
    job, clock changes) scales both medians alike and cancels in their ratio.
    """
    _check_rounds({num: times[num], den: times[den]})
    return np.array([np.median(a) / np.median(b) for a, b in zip(times[num], times[den], strict=True)], dtype=np.float64)


def ratio_interval(
    times: Mapping[str, Rounds], num: str, den: str, *, n_boot: int = N_BOOT, seed: int = 0
) -> Interval:
    """The median over rounds of :func:`round_ratios`, with a bootstrap 95% interval over rounds."""
    ratios = round_ratios(times, num, den)
    picks = np.random.default_rng(seed).integers(0, ratios.size, size=(n_boot, ratios.size))
    return _interval(float(np.median(ratios)), np.median(ratios[picks], axis=1))


def verdict(fused_vs_baseline: Interval, tolerance: float = TOLERANCE) -> dict[str, object]:
    """The overhead verdict from the fused/baseline interval.

    "no inference overhead" when the whole interval lies at or below ``1 + tolerance``
    (inside the band, or faster than the baseline); "overhead" when even its lower
    end is above the band; otherwise "inconclusive", with the measured overhead.
    """
    r = fused_vs_baseline
    pct = (r.value - 1.0) * 100
    span = f"fused/baseline {r.value:.3f} (95% CI {r.lo:.3f}-{r.hi:.3f})"
    if r.hi <= 1.0 + tolerance:
        status, text = "no_overhead", f"no inference overhead: {span}"
    elif r.lo > 1.0 + tolerance:
        status, text = "overhead", f"overhead {pct:+.1f}%: {span}"
    else:
        status = "inconclusive"
        text = f"inconclusive, measured overhead {pct:+.1f}%: {span} reaches past {1 + tolerance:.2f}"
    return {"status": status, "text": text, "tolerance": tolerance}


def instability(
    times: Mapping[str, Rounds],
    fused_vs_baseline: Interval,
    tolerance: float = TOLERANCE,
) -> list[str]:
    """Warnings for timings too unstable for the verdict to mean anything (empty when fine).

    Flags: fewer than :data:`MIN_ROUNDS` rounds; a fused/baseline interval wider
    than the whole tolerance band (it could not show "no overhead" even for equal
    models); a model whose interquartile range exceeds :data:`MAX_RELATIVE_IQR` of
    its median.
    """
    warnings: list[str] = []
    n_rounds = _check_rounds(times)
    if n_rounds < MIN_ROUNDS:
        warnings.append(f"only {n_rounds} rounds: the interval is coarse; measure longer ({option('min_s')}) or more rounds ({option('iters')})")
    width = fused_vs_baseline.hi - fused_vs_baseline.lo
    if width > 2 * tolerance:
        warnings.append(
            f"fused/baseline interval is {width:.3f} wide, wider than the +-{tolerance:.2f} band: "
            "timings too noisy for the verdict (quiet the machine or measure longer)"
        )
    for name, rounds in times.items():
        a = _flat(rounds)
        med = float(np.median(a))
        iqr = percentile(a, 75) - percentile(a, 25)
        if med > 0 and iqr / med > MAX_RELATIVE_IQR:
            warnings.append(f"{name} timings spread widely (IQR {100 * iqr / med:.0f}% of the median)")
    return warnings
