"""benchmarks/accuracy.py end to end on a tiny budget: sweep, choice, final seeds, report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from helpers import benchmark_module
from rsd_deploy import study
from rsd_deploy.errors import RSDError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"
COLLAPSED = {"method": "rsd", "lr": 0.05, "warmup_epochs": 0.0}  # made to collapse by the test


@pytest.fixture
def acc():
    with benchmark_module("accuracy") as module:
        yield module


def _history(work: Path, name: str) -> list[dict]:
    text = (work / "runs" / name / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _last_top1(work: Path, name: str) -> float:
    return 100 * _history(work, name)[-1]["val_top1"]


def test_sweep_choice_final_and_report(acc, tmp_path, monkeypatch):
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"model": "resnet20", "data": "digits", "batch_size": 32, "workers": 0}))
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--config", str(recipe), "--epochs", "2", "--input-size", "8", "--sweep-input-size", "8",
            "--train-samples", "128", "--lrs", "0.01,0.05", "--warmups", "0,1", "--seeds", "0,1",
            "--workers", "0", "--work-dir", str(work), "--out-dir", str(out), "--out-name", "tiny"]

    real_train, calls = study.train, []

    def train(config, run_dir, **kw):  # one sweep setting collapses, as RSD at a high lr does
        calls.append(run_dir)
        if (config.method, config.lr, config.warmup_epochs) == tuple(COLLAPSED.values()):
            raise RSDError("the network collapsed in epoch 2: training accuracy 10.0% (chance 10.0%); "
                           "training stopped")
        return real_train(config, run_dir, **kw)

    monkeypatch.setattr(study, "train", train)
    assert acc.main(argv) == 0
    assert len(calls) == 8 + 2  # 8 sweep runs; per method one final seed is its sweep run

    r = json.loads((out / "accuracy_tiny.json").read_text())
    assert (out / "accuracy_tiny.png").stat().st_size > 0
    md = (out / "accuracy_tiny.md").read_text()
    assert r["verdict"] in md and "Differences from the issue's budget" in md
    assert not (ROOT / "benchmarks" / "results" / "accuracy_tiny.json").exists()

    # The collapsed setting is recorded with its message, and never chosen.
    [collapsed] = [e for e in r["sweep"] if e["status"] != "finished"]
    assert {k: collapsed[k] for k in COLLAPSED} == COLLAPSED
    assert collapsed["status"] == "collapsed" and "collapsed in epoch 2" in collapsed["message"]

    # The choice is the argmax of the sweep (ties: lower lr, then shorter warm-up).
    for method in ("baseline", "rsd"):
        finished = [e for e in r["sweep"] if e["method"] == method and e["status"] == "finished"]
        for e in finished:
            assert e["last_top1"] == pytest.approx(_last_top1(work, e["name"]))
        best = max(finished, key=lambda e: (_last_top1(work, e["name"]), -e["lr"], -e["warmup_epochs"]))
        assert r["chosen"][method]["setting"] == {"lr": best["lr"], "warmup": best["warmup_epochs"]}
        finals = [e for e in r["final"] if e["method"] == method]
        assert {(e["lr"], e["warmup_epochs"]) for e in finals} == {(best["lr"], best["warmup_epochs"])}

    # The summary equals the per-seed numbers recomputed from metrics.jsonl.
    last = {}
    for method in ("baseline", "rsd"):
        s = r["summary"][method]
        runs = {e["seed"]: e["name"] for e in r["final"] if e["method"] == method}
        assert sorted(runs) == [0, 1]
        last[method] = {seed: _last_top1(work, name) for seed, name in runs.items()}
        histories = [_history(work, name) for name in runs.values()]
        assert all(len(h) == 2 for h in histories)
        assert s["last_top1_per_seed"] == pytest.approx({str(k): v for k, v in last[method].items()})
        assert s["last_top1_mean"] == pytest.approx(statistics.mean(last[method].values()))
        assert s["last_top1_std"] == pytest.approx(statistics.stdev(last[method].values()))
        assert s["best_top1_mean"] == pytest.approx(
            statistics.mean(100 * max(e["val_top1"] for e in h) for h in histories))
        assert s["epoch_time_median_s"] == pytest.approx(
            statistics.median(e["epoch_time"] for h in histories for e in h))
    diffs = [last["rsd"][seed] - last["baseline"][seed] for seed in (0, 1)]
    assert r["comparison"]["diff_mean"] == pytest.approx(statistics.mean(diffs))
    assert r["comparison"]["diff_std"] == pytest.approx(statistics.stdev(diffs))
    word = "beats" if min(diffs) > 0 else "trails" if max(diffs) < 0 else "No clear winner"
    assert word in r["verdict"]
    assert [row["epoch"] for row in r["trend"]] == [1, 2]

    # Running the same command again trains nothing; --report-only rebuilds the same numbers.
    assert acc.main(argv) == 0 and len(calls) == 10
    assert acc.main(argv + ["--report-only"]) == 0 and len(calls) == 10
    again = json.loads((out / "accuracy_tiny.json").read_text())
    assert again["summary"] == r["summary"] and again["chosen"] == r["chosen"]


def test_milestones_scale_with_the_epochs(acc):
    assert acc.scale_milestones([5, 8], 10, 30) == [15, 24]
    assert acc.scale_milestones([5, 8], 10, 10) == [5, 8]
    assert acc.scale_milestones([5, 8], 10, 2) == [1]  # 1.6 -> 2 is no milestone of a 2-epoch run


def test_failure_kinds(acc):
    assert study.failure_kind("the network collapsed in epoch 3: ...") == "collapsed"
    assert study.failure_kind("non-finite loss (nan) at epoch 1, step 2") == "diverged"
    assert study.failure_kind("digits not found") is None  # other errors stop the benchmark


def test_methods_split_the_training_not_the_report(acc, tmp_path, monkeypatch):
    """Two processes (one per method) can share a work directory; each report shows both."""
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"model": "resnet20", "data": "digits", "batch_size": 32, "workers": 0}))
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--config", str(recipe), "--epochs", "1", "--input-size", "8", "--sweep-input-size", "8",
            "--train-samples", "64", "--lrs", "0.01", "--warmups", "0", "--seeds", "0", "--stage", "sweep",
            "--workers", "0", "--work-dir", str(work), "--out-dir", str(out), "--out-name", "split"]
    trained = []
    real_train = study.train
    monkeypatch.setattr(study, "train", lambda config, run_dir, **kw: trained.append(config.method)
                        or real_train(config, run_dir, **kw))
    assert acc.main(argv + ["--methods", "baseline"]) == 0 and trained == ["baseline"]
    r = json.loads((out / "accuracy_split.json").read_text())
    assert {(e["method"], e["status"]) for e in r["sweep"]} == {("baseline", "finished"), ("rsd", "pending")}
    assert acc.main(argv + ["--methods", "rsd"]) == 0 and trained == ["baseline", "rsd"]
    r = json.loads((out / "accuracy_split.json").read_text())
    assert {(e["method"], e["status"]) for e in r["sweep"]} == {("baseline", "finished"), ("rsd", "finished")}
    assert acc.main(argv + ["--methods", "dino"]) == 1


def test_a_run_another_process_trains_is_skipped(acc, tmp_path, monkeypatch):
    from rsd_deploy.io import DirLock

    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"model": "resnet20", "data": "digits", "batch_size": 32, "workers": 0}))
    work = tmp_path / "work"
    argv = ["--config", str(recipe), "--epochs", "1", "--input-size", "8", "--sweep-input-size", "8",
            "--train-samples", "64", "--lrs", "0.01", "--warmups", "0", "--stage", "sweep", "--workers", "0",
            "--work-dir", str(work), "--out-dir", str(tmp_path / "out"), "--out-name", "busy"]
    trained = []
    monkeypatch.setattr(study, "train", lambda config, run_dir, **kw: trained.append(config.method))
    held = work / "runs" / "rsd_lr0.01_wu0_s0_px8_e1_n64"
    held.mkdir(parents=True)
    with DirLock(held, "run"):  # as a second benchmark process training that run would
        assert acc.main(argv) == 0
    assert trained == ["baseline"]
