"""benchmarks/latency_suite.py: its goal checks, and one tiny run end to end that writes only its own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import benchmark_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_suite.py"


@pytest.fixture(scope="module")
def suite():
    with benchmark_module("latency_suite") as module:
        yield module


def _row(model, backend, batch, uf_lo, verdict):
    return {"model": model, "backend": backend, "device": "cpu", "batch": batch,
            "unfused_fused": {"value": uf_lo + 0.5, "lo": uf_lo, "hi": uf_lo + 1}, "verdict": verdict}


def test_goals_use_the_lower_interval_bound_and_every_verdict(suite):
    rows = [_row("resnet32", "ort", 1, 3.2, "no_overhead"), _row("resnet32", "ort", 64, 3.0, "no_overhead"),
            _row("resnet32", "torch", 1, 1.5, "no_overhead")]  # PyTorch does not count for the 3x goal
    g = suite.goals(rows)
    assert g["resnet32_ort_cpu_unfused_over_fused_at_least_3x"]["met"]
    assert g["fused_over_baseline_within_0.97_1.03"] == {"met": True, "not_met": []}
    rows[1] = _row("resnet32", "ort", 64, 2.9, "inconclusive")
    g = suite.goals(rows)
    assert not g["resnet32_ort_cpu_unfused_over_fused_at_least_3x"]["met"]
    assert g["fused_over_baseline_within_0.97_1.03"]["not_met"] == ["resnet32 ort-cpu b64: inconclusive"]
    assert not suite.goals([])["resnet32_ort_cpu_unfused_over_fused_at_least_3x"]["met"]


def test_tiny_suite_run(suite, tmp_path):
    readmes = {p: p.read_bytes() for p in (SCRIPT.parent / "README.md", SCRIPT.parents[1] / "README.md")}
    assert suite.main(["--models", "resnet20", "--batch-sizes", "1", "--configs", "ort_cpu", "--scale", "0.02",
                       "--threads", "2", "--machine", "ci", "--trial", "--results", str(tmp_path / "r")]) == 0
    out = tmp_path / "r" / "ci-trial"
    assert {p.name for p in out.iterdir()} == {"resnet20_ort_cpu", "summary.json", "summary.md"}
    assert (out / "resnet20_ort_cpu" / "bench.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trial"] and summary["threads"] == 2 and len(summary["rows"]) == 1
    assert summary["rows"][0]["model"] == "resnet20" and summary["rows"][0]["backend"] == "ort"
    md = (out / "summary.md").read_text()
    assert md.startswith("# Latency suite: ci-trial") and "TRIAL" in md and "| resnet20 | 32x32 | ort-cpu | 1 |" in md
    # Its own files only: the hand-written READMEs link to the summaries and are never rewritten.
    assert all(p.read_bytes() == text for p, text in readmes.items())


def test_tiny_int8_suite_run(suite, tmp_path, capsys):
    # INT8 models calibrated on the embedded digits images (real images, untrained weights):
    # PyTorch has no int8 and is left out with its reason; files carry the precision.
    assert suite.main(["--models", "resnet20", "--batch-sizes", "2", "--configs", "ort_cpu,torch_cpu",
                       "--scale", "0.02", "--threads", "1", "--machine", "ci", "--trial",
                       "--precision", "int8", "--results", str(tmp_path / "r")]) == 0
    assert "PyTorch on cpu skipped: it has no int8 precision" in capsys.readouterr().err
    out = tmp_path / "r" / "ci-trial"
    assert {p.name for p in out.iterdir()} == {"resnet20_ort_cpu_int8", "summary_int8.json", "summary_int8.md"}
    bench = json.loads((out / "resnet20_ort_cpu_int8" / "bench.json").read_text())
    assert bench["precision"] == "int8" and "digits" in json.dumps(bench)
    row, = json.loads((out / "summary_int8.json").read_text())["rows"]
    assert row["precision"] == "int8" and row["fp32_speedup"]["lo"] <= row["fp32_speedup"]["value"]
    md = (out / "summary_int8.md").read_text()
    assert "; int8; exported" in md and "fused fp32/int8 (95% CI)" in md


def test_suite_refuses_a_precision_no_backend_here_has(suite, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        suite.main(["--configs", "torch_cpu", "--precision", "fp16", "--results", str(tmp_path)])
    assert e.value.code == 2 and "no backend here times fp16 models" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_suite_calibration_data_mistakes_are_one_line(suite, tmp_path, capsys):
    calib = tmp_path / "calib"
    (calib / "train").mkdir(parents=True)
    argv = ["--models", "resnet20", "--batch-sizes", "1", "--configs", "ort_cpu", "--results", str(tmp_path / "r")]
    for extra, needle in ((["--calib-data", str(calib)], "--calib-data is for --precision int8"),
                          (["--precision", "int8", "--calib-data", str(calib)], "train has no class folders")):
        with pytest.raises(SystemExit) as e:
            suite.main(argv + extra)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    (calib / "train" / "cat").mkdir()  # a class without images: refused by the calibration, mid-suite
    assert suite.main(argv + ["--precision", "int8", "--calib-data", str(calib)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: int8 quantization calibrates on the run's training images") and "Traceback" not in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("summary*"))
