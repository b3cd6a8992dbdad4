"""benchmarks/gpu_evidence.py: its planning helpers, and a --tiny dry run end to end on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import benchmark_module
from rsd_deploy.errors import RSDError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_evidence.py"


@pytest.fixture(scope="module")
def ev():
    with benchmark_module("gpu_evidence") as module:
        yield module


def test_milestones_scale_with_the_epochs_run(ev):
    assert ev.milestones([0.5, 0.75], 20) == [10, 15]
    assert ev.milestones([0.5, 0.75], 3) == [2]  # round(1.5) = 2, round(2.25) = 2: one milestone
    assert ev.milestones([0.5, 0.75], 1) == []  # none inside a one-epoch run


def test_probe_timing_takes_the_slowest_runs_steady_epoch_and_start_up(ev):
    reports = [{"start": 100.0, "epoch_ends": [112.0, 120.0]},  # start-up 4 s, epoch 8 s
               {"start": 100.0, "epoch_ends": [109.0, 111.0]}]  # start-up 7 s, epoch 2 s
    assert ev.probe_timing(reports) == (8.0, 7.0)  # the slowest epoch, the longest start-up
    assert ev.probe_timing([{"start": 0.0, "epoch_ends": [5.0]}]) == (5.0, 0.0)


def test_plan_epochs_fits_the_budget(ev):
    assert ev.plan_epochs(200.0, 9.0, cap=100) == 22
    assert ev.plan_epochs(200.0, 1.0, cap=100) == 100
    assert ev.plan_epochs(5.0, 9.0, cap=100) == 0


def test_method_configs_share_settings_and_refuse_bad_keys(ev):
    settings = {"lr": 0.02, "lr_milestones_frac": [0.5], "rsd": {"drop_rate": 0.1}}
    cfgs = ev.method_configs(settings, {"data": "imagefolder", "model": "resnet20"}, 10)
    assert {m: c.method for m, c in cfgs.items()} == {"baseline": "baseline", "rsd": "rsd"}
    assert cfgs["baseline"].lr == cfgs["rsd"].lr == 0.02
    assert cfgs["rsd"].lr_milestones == cfgs["baseline"].lr_milestones == [5]
    assert (cfgs["rsd"].drop_rate, cfgs["baseline"].drop_rate) == (0.1, 0.2)
    with pytest.raises(RSDError, match="unknown key 'lr_shedule'"):
        ev.method_configs({"lr_shedule": "cosine"}, {}, 10)
    with pytest.raises(RSDError, match="epochs is set by gpu_evidence"):
        ev.method_configs({"epochs": 5}, {}, 10)


def test_junit_counts(ev, tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="2" skipped="3"/></testsuites>')
    assert ev.junit_counts(xml) == {"passed": 1, "failed": 1, "errors": 2, "skipped": 3, "total": 7}


def test_latency_budget_keeps_a_model_within_its_share(ev):
    b = ev.latency_budget(30.0, 3, tiny=False)
    # 9 cells (3 forms x 3 batch sizes) of warm-up + 1.5 x min_s fit 80% of 30 s less 4 s.
    assert math.isclose(9 * (b.warmup_s + 1.5 * b.min_s) + 4.0, 0.8 * 30.0)
    assert ev.latency_budget(30.0, 3, tiny=True).iters == 3


def _tiny_imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_dry_run_writes_every_figure(tmp_path):
    data, out = _tiny_imagefolder(tmp_path / "data"), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--data-dir", str(data)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["tiny"] and evidence["device"] == "cpu"
    sections = evidence["sections"]
    assert list(sections) == ["accuracy", "cuda_tests", "latency", "rsd_step"]
    assert all(s["status"] in ("ok", "partial") for s in sections.values()), sections
    assert all(_finite_positive(s["wall_s"]) and _finite_positive(s["budget_s"]) for s in sections.values())
    md = (out / "evidence.md").read_text()
    assert all(f"| {name} |" in md for name in sections)

    acc = sections["accuracy"]["result"]
    assert acc["epochs_planned"] == 3 and acc["seeds"] == [0] and acc["probe"]["epochs"] == 2
    for method in ("baseline", "rsd"):
        per_seed = acc["val_top1_per_epoch"][method]
        assert set(per_seed) == {"0"}
        assert all(1 <= len(v) <= 3 and all(0 <= t <= 100 for t in v) for v in per_seed.values())
        s = acc["summary"][method]
        assert _finite_positive(s["epoch_time_median_s"]) and _finite_positive(s["epoch_wall_median_s"])
        if s["last_top1_mean"] is not None:  # None only when the budget stopped the run early
            assert 0 <= s["last_top1_mean"] <= 100 and s["last_top1_range"][0] == s["last_top1_range"][1]
    assert _finite_positive(acc["probe"]["epoch_wall_s"]) and acc["probe"]["run_setup_s"] >= 0
    assert acc["configs"]["rsd"]["input_size"] == 16 and acc["configs"]["rsd"]["epochs"] == 3
    assert acc["configs"]["rsd"]["lr_milestones"] == [2]  # the default fractions 0.5, 0.75 of 3 epochs
    for name in ("baseline-seed0", "rsd-seed0"):
        lines = (out / "accuracy_runs" / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(1, len(lines) + 1))
    assert "| epoch |" in (out / "accuracy.md").read_text()

    tests = sections["cuda_tests"]["result"]
    assert tests["total"] == tests["passed"] + tests["failed"] + tests["errors"] + tests["skipped"] >= 1
    assert (out / "cuda_tests.xml").is_file()

    rows = sections["latency"]["result"]["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("resnet20", 1), ("resnet20", 2)]
    for r in rows:
        assert all(_finite_positive(r[k]) for k in ("unfused_ms", "fused_ms", "baseline_ms"))
        assert _finite_positive(r["fused/baseline"]["value"]) and _finite_positive(r["unfused/fused"]["value"])
    assert json.loads((out / "latency" / "resnet20" / "bench.json").read_text())["device"] == "cpu"

    step = sections["rsd_step"]["result"]
    assert set(step["median_ms"]) == {"plain_step", "rsd_step_point0", "block_fast", "block_reference"}
    assert set(step["gflop"]) == {"plain_step", "block_fast", "block_reference"}  # no RSD FLOPs in --tiny
    assert all(_finite_positive(v) for v in [*step["median_ms"].values(), *step["gflop"].values()])
    assert _finite_positive(step["rsd_over_plain_step"]) and step["rsd_over_plain_step_flops"] is None
    # The fast block does the reference's arithmetic, and more than the plain conv+BN step.
    assert math.isclose(step["gflop"]["block_fast"], step["gflop"]["block_reference"], rel_tol=1e-6)
    assert step["gflop"]["block_fast"] > 3 * step["gflop"]["plain_step"]
    assert json.loads((out / "rsd_step.json").read_text())["repeats"] == step["repeats"] == 2


def test_bad_settings_fail_before_anything_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path / "o"),
                           "--settings", '{"clip_grad_nrom": 1.0}'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'clip_grad_nrom'" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_tiny_regime_map_runs_the_data_efficiency_study(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--sections", "regime_map"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = json.loads((out / "evidence.json").read_text())["sections"]["regime_map"]
    assert section["status"] == "ok", section
    r = section["result"]
    assert r["profile"] == "smoke" and r["pending"] == 0 and r["runs_done"] >= 6  # 4 pilot runs, 2 RSD
    assert [x["size"] for x in r["map"]] == [64, 128] and all(x["n"] == [1, 1] for x in r["map"])
    assert (out / "regime_map" / "data_efficiency_smoke.md").is_file()
    assert "| regime_map | ok |" in (out / "evidence.md").read_text()
    # Without the full CIFAR-10 on the machine a real run skips, saying where it looked.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu"), "--sections", "regime_map",
                           "--cifar10-dir", str(tmp_path / "nowhere")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    section = json.loads((tmp_path / "gpu" / "evidence.json").read_text())["sections"]["regime_map"]
    assert proc.returncode == 0 and section["status"] == "skipped", section
