"""benchmarks/latency_suite.py: its goal checks, its README update, and one tiny run end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("latency_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


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


def test_readme_sections_are_replaced_per_machine(suite, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n")
    suite.update_readme(readme, "m1", "### m1\nold")
    suite.update_readme(readme, "m2", "### m2\nother")
    suite.update_readme(readme, "m1", "### m1\nnew")
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "old" not in text and text.count("### m1\nnew") == 1 and "### m2\nother" in text
    assert text.index("### m1") < text.index("### m2")


def test_tiny_suite_run(suite, tmp_path):
    readme = tmp_path / "README.md"
    assert suite.main(["--models", "resnet20", "--batch-sizes", "1", "--configs", "ort_cpu", "--scale", "0.02",
                       "--threads", "2", "--machine", "ci", "--trial", "--results", str(tmp_path / "r"),
                       "--readme", str(readme)]) == 0
    out = tmp_path / "r" / "ci-trial"
    assert (out / "resnet20_ort_cpu" / "bench.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trial"] and summary["threads"] == 2 and len(summary["rows"]) == 1
    assert summary["rows"][0]["model"] == "resnet20" and summary["rows"][0]["backend"] == "ort"
    assert "TRIAL" in readme.read_text() and "| resnet20 | 32x32 | ort-cpu | 1 |" in readme.read_text()
