"""Statistics and scheduling of rsd-deploy bench, on synthetic timings (no real timing here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsd_deploy.bench import stats
from rsd_deploy.bench.runner import Budget, calls_per_turn, measure
from rsd_deploy.errors import RSDError


def _rounds(rng, n_rounds, calls, scale, drift=None, noise=0.02):
    """Lognormal per-call times around ``scale`` seconds, times a per-round drift factor."""
    drift = np.ones(n_rounds) if drift is None else drift
    return [list(scale * d * rng.lognormal(0.0, noise, calls)) for d in drift]


# Percentiles and summaries ---------------------------------------------------------------

def test_percentile_interpolates_linearly():
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5
    assert stats.percentile(range(1, 11), 90) == pytest.approx(9.1)
    assert stats.percentile(range(1, 11), 99) == pytest.approx(9.91)
    assert stats.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_summarize_reports_milliseconds_and_throughput():
    s = stats.summarize([0.004, 0.001, 0.003, 0.002], batch=4)
    assert s["calls"] == 4 and s["total_s"] == pytest.approx(0.010)
    assert s["median_ms"] == pytest.approx(2.5)
    assert s["mean_ms"] == pytest.approx(2.5)
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(4.0)
    assert s["p90_ms"] == pytest.approx(3.7)
    assert s["p99_ms"] == pytest.approx(3.97)
    assert s["std_ms"] == pytest.approx(math.sqrt(5 / 3))  # sample std of 1, 2, 3, 4
    assert s["throughput_ips"] == pytest.approx(4 / 0.0025)
    with pytest.raises(ValueError):
        stats.summarize([], batch=1)


# Bootstrap intervals -----------------------------------------------------------------------

def test_ratio_interval_brackets_the_true_ratio():
    rng = np.random.default_rng(1)
    times = {
        "unfused": _rounds(rng, 30, 20, 4e-3),
        "fused": _rounds(rng, 30, 20, 1e-3),
        "baseline": _rounds(rng, 30, 20, 1e-3),
    }
    reps = stats.bootstrap_medians(times, n_boot=1000)
    uf = stats.ratio_interval(times, "unfused", "fused")
    fb = stats.ratio_interval(times, "fused", "baseline")
    assert uf.lo < 4.0 < uf.hi and uf.hi - uf.lo < 0.1
    assert fb.lo < 1.0 < fb.hi and 0.97 < fb.lo and fb.hi < 1.03
    med = stats.median_intervals(times, reps)["fused"]
    assert med.lo < 1e-3 < med.hi


def test_paired_rounds_cancel_drift_that_hits_all_models():
    # The machine slows down by up to 3x from round to round, equally for both models:
    # each model's own median is very uncertain, their ratio is not.
    rng = np.random.default_rng(2)
    drift = rng.uniform(1.0, 3.0, 40)
    times = {"fused": _rounds(rng, 40, 10, 1e-3, drift, noise=0.01),
             "baseline": _rounds(rng, 40, 10, 1e-3, drift, noise=0.01)}
    reps = stats.bootstrap_medians(times, n_boot=1000)
    med = stats.median_intervals(times, reps)["fused"]
    fb = stats.ratio_interval(times, "fused", "baseline")
    assert (med.hi - med.lo) / med.value > 0.2
    assert fb.hi - fb.lo < 0.03 and fb.lo < 1.0 < fb.hi


def test_ratio_is_taken_within_each_round():
    # Pooled, fused's median is 3 and baseline's 1; round by round they are equal in
    # two rounds of three: the paired ratio is the median of [1, 3, 1].
    times = {"fused": [[1.0, 1.0], [3.0, 3.0], [3.0, 3.0]], "baseline": [[1.0, 1.0], [1.0, 1.0], [3.0, 3.0]]}
    np.testing.assert_allclose(stats.round_ratios(times, "fused", "baseline"), [1.0, 3.0, 1.0])
    r = stats.ratio_interval(times, "fused", "baseline", n_boot=200)
    assert r.value == 1.0 and r.lo == 1.0 and r.hi == 3.0
    with pytest.raises(ValueError, match="same number of rounds"):
        stats.ratio_interval({"a": [[1.0]], "b": [[1.0], [1.0]]}, "a", "b")


def test_interval_coverage_is_near_95_percent():
    rng = np.random.default_rng(3)
    hits, trials = 0, 120
    for i in range(trials):
        times = {"fused": _rounds(rng, 20, 5, 1.05e-3, noise=0.1),
                 "baseline": _rounds(rng, 20, 5, 1e-3, noise=0.1)}
        r = stats.ratio_interval(times, "fused", "baseline", n_boot=400, seed=i)
        hits += r.lo <= 1.05 <= r.hi
    assert 0.85 <= hits / trials <= 1.0


def test_bootstrap_resamples_whole_rounds_jointly():
    # The vectorised path equals the definition: the same rounds drawn for every model,
    # all their calls pooled, the median taken.
    rng = np.random.default_rng(4)
    times = {"a": _rounds(rng, 7, 3, 2e-3, noise=0.3), "b": _rounds(rng, 7, 5, 1e-3, noise=0.3)}
    reps = stats.bootstrap_medians(times, n_boot=50, seed=9)
    picks = np.random.default_rng(9).integers(0, 7, size=(50, 7))
    for name in times:
        expected = [np.median(np.concatenate([times[name][j] for j in p])) for p in picks]
        np.testing.assert_allclose(reps[name], expected)


def test_ragged_rounds_are_supported():
    rng = np.random.default_rng(6)
    times = {"a": [list(2e-3 * rng.lognormal(0, 0.02, 3 + i % 4)) for i in range(40)],
             "b": [list(1e-3 * rng.lognormal(0, 0.02, 2 + i % 3)) for i in range(40)]}
    r = stats.ratio_interval(times, "a", "b")
    assert r.lo < 2.0 < r.hi and r.hi - r.lo < 0.1


def test_bootstrap_refuses_unpaired_rounds():
    with pytest.raises(ValueError, match="same number of rounds"):
        stats.bootstrap_medians({"a": [[1.0]], "b": [[1.0], [1.0]]})
    with pytest.raises(ValueError, match="empty round"):
        stats.bootstrap_medians({"a": [[1.0], []], "b": [[1.0], [1.0]]})


# Verdict and instability -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "lo", "hi", "status"),
    [
        (1.00, 0.98, 1.02, "no_overhead"),
        (1.01, 0.99, 1.03, "no_overhead"),  # touching the band edge still counts
        (0.90, 0.85, 0.95, "no_overhead"),  # faster than the baseline
        (1.10, 1.05, 1.15, "overhead"),
        (1.02, 0.99, 1.05, "inconclusive"),
    ],
)
def test_verdict(value, lo, hi, status):
    v = stats.verdict(stats.Interval(value, lo, hi))
    assert v["status"] == status
    if status == "no_overhead":
        assert v["text"].startswith("no inference overhead")
    if status == "overhead":
        assert "+10.0%" in v["text"]


def test_instability_flags_noise_and_stays_quiet_on_clean_timings():
    rng = np.random.default_rng(5)
    clean = {"fused": _rounds(rng, 20, 10, 1e-3), "baseline": _rounds(rng, 20, 10, 1e-3)}
    assert stats.instability(clean, stats.ratio_interval(clean, "fused", "baseline")) == []

    noisy = {"fused": _rounds(rng, 3, 10, 1e-3, noise=0.8), "baseline": _rounds(rng, 3, 10, 1e-3, noise=0.8)}
    warnings = stats.instability(noisy, stats.ratio_interval(noisy, "fused", "baseline"))
    text = " | ".join(warnings)
    assert "only 3 rounds" in text
    assert "wider than the +-0.03 band" in text
    assert "fused timings spread widely" in text and "baseline timings spread widely" in text


# The interleaved schedule ------------------------------------------------------------------

def _fake_timers(latency, log):
    def make(name):
        def run():
            log.append(name)
            return latency[name]
        return run
    return {name: make(name) for name in latency}


def test_rounds_interleave_and_rotate_the_order():
    log: list[str] = []
    timers = _fake_timers({"A": 0.01, "B": 0.01, "C": 0.01}, log)
    rounds = measure(timers, Budget(warmup_s=0, iters=3, lead_calls=0))
    assert log[:3] == ["A", "B", "C"]  # one warm-up call each
    assert log[3:] == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert all(len(rounds[n]) == 3 and all(len(r) == 1 for r in rounds[n]) for n in "ABC")


def test_the_lead_call_of_each_turn_is_not_timed():
    last: list[str] = []

    def make(name):
        def run():  # the first call after another model is slow (cold caches)
            cold = last[-1:] != [name]
            last.append(name)
            return 1.0 if cold else 0.01
        return run

    timers = {n: make(n) for n in "AB"}
    budget = dict(warmup_s=0, min_s=0.02, round_s=0.02, min_rounds=4)
    rounds = measure(timers, Budget(**budget))  # one lead call by default
    assert all(turn == [0.01] for n in "AB" for turn in rounds[n])
    # Without it, every turn that follows the other model is timed cold: after the warm-up
    # (A B) the rounds run A B | B A | A B | B A, so 5 of the 8 turns follow the other model.
    rounds = measure(timers, Budget(**budget, lead_calls=0))
    assert sorted(turn[0] for n in "AB" for turn in rounds[n]) == [0.01] * 3 + [1.0] * 5


def test_min_s_budget_fills_turns_and_stops_when_every_model_had_its_time():
    log: list[str] = []
    timers = _fake_timers({"slow": 0.5, "fast": 0.001}, log)
    budget = Budget(warmup_s=0, min_s=2.0, round_s=0.1, min_rounds=3)
    rounds = measure(timers, budget)
    assert all(len(r) == 1 for r in rounds["slow"])  # a call longer than a turn: one per turn
    assert all(len(r) == 100 for r in rounds["fast"])  # 0.1 s / 1 ms
    n = len(rounds["slow"])
    assert n == len(rounds["fast"]) == 20  # fast needs 2.0 s / 0.1 s per round
    assert sum(map(sum, rounds["slow"])) >= 2.0 and sum(map(sum, rounds["fast"])) >= 2.0 - 1e-9


def test_budget_defaults_to_a_time_budget():
    assert Budget().min_s == 3.0 and Budget().iters is None
    assert Budget(iters=4).min_s is None


def test_calls_per_turn():
    assert calls_per_turn(0.001, 0.1) == 100
    assert calls_per_turn(5.0, 0.1) == 1
    assert calls_per_turn(0.0, 0.1) == 10_000


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_s=1.0, iters=5), dict(min_s=-1.0), dict(min_s=0.0), dict(iters=0),
     dict(warmup_s=-1.0), dict(lead_calls=-1),
     # NaN fails every comparison: a NaN min_s was never reached (measure ran forever) and
     # a NaN warm-up was written into bench.json; infinity never ends either.
     dict(min_s=float("nan")), dict(min_s=float("inf")), dict(warmup_s=float("nan")),
     dict(warmup_s=float("inf")), dict(iters=3, round_s=float("nan"))],
)
def test_budget_rejects_bad_settings(kwargs):
    with pytest.raises(RSDError):
        Budget(**kwargs)
