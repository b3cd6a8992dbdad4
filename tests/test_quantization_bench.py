"""benchmarks/quantization.py on two tiny runs: figures consistent with the files it made."""

from __future__ import annotations

import json

import pytest

from helpers import benchmark_module, trained_run


@pytest.fixture
def bench():
    with benchmark_module("quantization") as module:
        yield module


def test_rsd_and_baseline_runs_quantized_alike(bench, cifar_mini, tmp_path):
    runs = []
    for form in ("rsd", "plain"):
        run = tmp_path / form
        trained_run(run, "resnet20", cifar_mini, steps=2, batch_size=32, probe=500, input_size=16, form=form)
        runs.append(run)
    out = tmp_path / "out"
    argv = [*map(str, runs), "--name", "tiny", "--methods", "minmax,percentile", "--calib-samples", "32",
            "--batches", "2", "--rounds", "2", "--threads", "1", "--out-dir", str(out)]
    assert bench.main(argv) == 0
    r = json.loads((out / "quantization_tiny.json").read_text())
    assert [row["method"] for row in r["runs"]] == ["rsd", "baseline"]
    for row in r["runs"]:
        for m in ("minmax", "percentile"):
            q = row["int8"][m]
            assert q["images"] == 2000
            assert q["top1_drop"] == pytest.approx(row["fp32_top1"] - q["int8_top1"])
        assert set(row["latency_ms"]["2"]) == {"fp32", "int8"}
        w = row["weights"]
        assert 1.0 <= w["channel_peak_to_rms_median"] <= w["channel_peak_to_rms_p99"] <= w["channel_peak_to_rms_max"]
        assert 0 < w["weight_int8_error_median"] <= w["weight_int8_error_max"] < 0.05
    md = (out / "quantization_tiny.md").read_text()
    assert "**Verdict** (computed from the table): inconclusive: 1 run(s)" in md and "| rsd (1 runs) |" in md
    assert (runs[0] / "deploy" / "model.onnx").is_file()  # the verified fp32 export it quantized
    assert bench.main([str(tmp_path / "missing"), "--name", "x", "--out-dir", str(out)]) == 1


def test_verdict_needs_two_runs_a_method_and_half_a_point(bench):
    methods = ["minmax", "percentile"]
    drops = {"rsd": {"minmax": 0.60, "percentile": 0.85}, "baseline": {"minmax": 0.10, "percentile": 0.60}}
    agreement = {"rsd": 0.863, "baseline": 0.9665}
    one = bench.verdict(drops, agreement, {"rsd": 1, "baseline": 1}, methods)
    assert one.startswith("inconclusive: 1 run(s)") and "+0.50 points (minmax" in one
    assert "RSD 0.863, baseline 0.967" in one
    two = bench.verdict(drops, agreement, {"rsd": 2, "baseline": 3}, methods)
    assert two.startswith("RSD's fused networks do not quantize worse") and "largest gap +0.50, minmax" in two
    drops["rsd"]["percentile"] = 1.20  # 0.60 points worse than the baseline's 0.60
    worse = bench.verdict(drops, agreement, {"rsd": 2, "baseline": 2}, methods)
    assert worse.startswith("RSD's fused networks lose more top-1 in INT8 than the baseline's with percentile ")
