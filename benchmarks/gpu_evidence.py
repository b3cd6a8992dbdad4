#!/usr/bin/env python
"""One command for the GPU evidence: accuracy, the CUDA tests, inference latency, RSD step speed.

Made for a machine with one NVIDIA GPU, torch with CUDA and onnxruntime, and no network.
Every section has a time budget it stops within (a section that is over the budget or
misses something, CUDA or the data, is skipped with the reason recorded), and the whole
command stays under ``--total-s`` (default 500 s, so well under 9 minutes):

* ``accuracy`` (280 s): RSD against the plain baseline on cifar10-mini (ImageFolder at
  ``--data-dir``), resnet20, 32x32, same settings, epochs and seeds, every run a
  process of its own on the one GPU. Two epochs of every run are timed first (the
  probe: the second epoch's wall time, evaluation included, and the start-up before the
  first); the number of epochs that fits the rest of the budget (at most
  ``--max-epochs``) is then trained from scratch, and a run that would overrun stops
  after its last epoch that fits. Per-epoch validation top-1 for each method and seed, last-epoch top-1 mean
  and spread, time per epoch. ``--settings`` (a JSON object or file) holds the training
  settings both methods share (TrainConfig keys: lr, schedule, warmup_epochs, ...), with
  optional ``"rsd": {...}`` / ``"baseline": {...}`` objects for one method only and
  ``"lr_milestones_frac"`` for milestones as fractions of the epochs actually run; an
  unknown key is an error before anything runs.
* ``cuda_tests`` (50 s): ``python -m pytest -q -m cuda``, pass / fail / skip counts.
* ``latency`` (90 s): ``rsd_deploy.bench.bench_run`` with PyTorch on CUDA (CUDA events)
  for resnet32, vgg16 and resnet18 at batch 1, 64 and 256: unfused, fused and baseline.
* ``rsd_step`` (50 s): one RSD optimizer step at each mix point against a plain step
  (``rsd_step_speed.py``), and the fast RSD block's training step against the per-branch
  reference, the convolution-only bound and plain conv+BN (``block_speed.py``), resnet32,
  batch 64, CUDA events.

* ``regime_map`` (480 s; only when ``--sections`` names it): ``benchmarks/data_efficiency.py
  --profile cifar10`` on the GPU: baseline and RSD at 32 px on subsets of the full CIFAR-10
  training split (1,000 to 50,000 images; ``--cifar10-dir``, torchvision's format, which
  must be on the machine), the epochs per size chosen by the study's pilot. It stops at its
  budget and continues from ``benchmarks/results/data_efficiency_cifar10.json`` (copy
  ``OUT/regime_map/data_efficiency_cifar10.json`` there and commit it between calls).

Output in ``--out DIR``: ``evidence.json`` (every figure, the machine, the budgets,
what ran), ``evidence.md`` (summary table), ``accuracy.{json,md}`` with
``accuracy_runs/*/metrics.jsonl``, ``cuda_tests.{xml,log}``, ``latency/<model>/`` (bench
reports) and ``rsd_step.json``. ``evidence.json`` is rewritten after every section.
Section status: ok, partial (cut short by its budget), skipped (with the reason),
failed (CUDA tests that ran and failed) or error (the section itself broke; its
traceback is recorded and the next section still runs). Exit status 1 when a section
failed or broke, 2 on a bad option or setting
(checked before anything runs), else 0. ``--tiny`` runs every section on the CPU with
tiny sizes (resnet20 at 16x16 on 16 images, three epochs after the probe, batch 4 steps):
it checks the code path, its figures mean nothing.

    python benchmarks/gpu_evidence.py --out gpu-evidence
    python benchmarks/gpu_evidence.py --out gpu-evidence --settings '{"lr": 0.02}' --seeds 0 1
    python benchmarks/gpu_evidence.py --tiny --out /tmp/evidence     # CPU dry run of the default sections
    python benchmarks/gpu_evidence.py --out gpu-evidence --sections regime_map --cifar10-dir ~/data
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: the total budget counts them too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from itertools import pairwise  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from rsd_deploy.bench import Budget, bench_run  # noqa: E402
from rsd_deploy.bench.report import machine_info  # noqa: E402
from rsd_deploy.errors import RSDError  # noqa: E402
from rsd_deploy.io import atomic_path, write_json  # noqa: E402
from rsd_deploy.run import save_run  # noqa: E402
from rsd_deploy.study import mean_std, read_history  # noqa: E402
from rsd_deploy.training import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
SECTIONS = ("accuracy", "cuda_tests", "latency", "rsd_step", "regime_map")
DEFAULT_SECTIONS = SECTIONS[:4]  #: regime_map is a long study of its own: asked for by --sections
BUDGETS_S = {"accuracy": 280.0, "cuda_tests": 50.0, "latency": 90.0, "rsd_step": 50.0, "regime_map": 480.0}
TINY_BUDGETS_S = {"accuracy": 60.0, "cuda_tests": 40.0, "latency": 15.0, "rsd_step": 30.0, "regime_map": 150.0}
#: A regime map's results, committed: a later call resumes from what they record.
REGIME_LEDGER = HERE / "results" / "data_efficiency_cifar10.json"
TOTAL_S = 500.0
PROBE_EPOCHS = 2  #: the first epoch holds the start-up; the second times an epoch
#: The probe's second epoch may run with fewer neighbours (the fast baseline runs done):
#: the plan assumes epochs this much slower.
EPOCH_SAFETY = 1.2
MIN_SECTION_S = 5.0  #: a section with less time than this left is skipped
KILL_GRACE_S = 10.0  #: training processes still alive this long after their budget are killed
METHODS = ("baseline", "rsd")
#: Keys the accuracy section sets itself (from its options); --settings may not.
RESERVED = {"model", "method", "seed", "epochs", "device", "data", "data_dir", "workers", "max_steps",
            "download"}
DEFAULT_SETTINGS: dict[str, Any] = {"lr": 0.01, "batch_size": 64, "lr_milestones_frac": [0.5, 0.75]}


@functools.cache
def _load_benchmark(name: str):
    """A sibling benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Skip(Exception):
    """A section that cannot run here; the message is the recorded reason."""


@dataclass
class Context:
    out: Path
    work: Path
    device: str
    tiny: bool
    args: argparse.Namespace
    deadline: float = 0.0  #: wall-clock time (time.time()) by which the current section ends


# Timing -------------------------------------------------------------------------------------

def time_call(fn: Callable[[], Any], device: str) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on CUDA, the wall clock on CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# Accuracy -----------------------------------------------------------------------------------

def read_settings(text: str | None) -> dict[str, Any]:
    """``--settings``: a JSON object, or the path of a file holding one; defaults when absent."""
    if text is None:
        return dict(DEFAULT_SETTINGS)
    source = Path(text).read_text() if not text.lstrip().startswith("{") else text
    values = json.loads(source)
    if not isinstance(values, dict):
        raise RSDError("--settings must be a JSON object")
    return values


def milestones(fractions: list[float], epochs: int) -> list[int]:
    """Milestone epochs at ``fractions`` of ``epochs``; only those inside (0, epochs)."""
    return sorted({round(f * epochs) for f in fractions if 1 <= round(f * epochs) < epochs})


def method_configs(settings: dict[str, Any], base: dict[str, Any], epochs: int) -> dict[str, TrainConfig]:
    """The validated TrainConfig of each method for ``epochs`` epochs; RSDError on a bad key."""
    settings = dict(settings)
    per_method = {m: settings.pop(m, {}) for m in METHODS}
    if not all(isinstance(v, dict) for v in per_method.values()):
        raise RSDError(f"--settings: {' and '.join(METHODS)} hold objects of settings for that method")
    fractions = settings.pop("lr_milestones_frac", None)
    configs = {}
    for method in METHODS:
        values = {**settings, **per_method[method]}
        bad = RESERVED & {k.replace("-", "_") for k in values}
        if bad:
            raise RSDError(f"--settings: {', '.join(sorted(bad))} is set by gpu_evidence itself")
        if fractions is not None:
            if "lr_milestones" in values:
                raise RSDError("--settings: give lr_milestones or lr_milestones_frac, not both")
            values["lr_milestones"] = milestones(fractions, epochs)
        values.update(base, method=method, epochs=epochs)
        configs[method] = TrainConfig.from_dict(values, "--settings").validate()
    return configs


def probe_timing(reports: list[dict[str, Any]]) -> tuple[float, float]:
    """``(seconds per epoch, start-up seconds of a run)`` from the probe: each the largest of any run.

    A run's epoch is timed by its last epoch (evaluation and files included); its
    start-up is what its first epoch took beyond that (data, model, first calls).
    """
    epoch_s = max(epoch_walls(r)[-1] for r in reports)
    setup_s = max(r["epoch_ends"][0] - r["start"] - epoch_walls(r)[-1] for r in reports)
    return epoch_s, max(0.0, setup_s)


def plan_epochs(seconds_left: float, epoch_s: float, cap: int) -> int:
    """How many epochs of ``epoch_s`` fit in ``seconds_left`` (at most ``cap``; 0 when none)."""
    return max(0, min(cap, math.floor(seconds_left / epoch_s))) if epoch_s > 0 else cap


class _Deadline(Exception):
    pass


def _train_until(config: dict[str, Any], out: str, deadline: float) -> dict[str, Any]:
    """Train one run, stopping after the last epoch that ends before ``deadline``.

    Returns the wall-clock start, the end time of every epoch, and how the run ended.
    """
    from rsd_deploy.training import train

    start, ends = time.time(), []

    def on_epoch_end(epoch: int, _metrics: dict, _model) -> None:
        ends.append(time.time())
        last = ends[-1] - (ends[-2] if len(ends) > 1 else start)
        if epoch < config["epochs"] and ends[-1] + last > deadline:
            raise _Deadline

    status = "finished"
    try:
        train(TrainConfig.from_dict(config), out, on_epoch_end=on_epoch_end)
    except _Deadline:
        status = "stopped: the next epoch would end past the budget"
    except Exception as e:  # recorded, not raised: the parent reads the report
        status = f"error: {type(e).__name__}: {e}"
    return {"start": start, "epoch_ends": ends, "status": status}


def _train_child(conn, probe: tuple[dict[str, Any], str], deadline: float, threads: int) -> None:
    """Child process: the probe run, then the real run the parent sends (None: stop)."""
    torch.set_num_threads(threads)
    conn.send(_train_until(*probe, deadline))
    job = conn.recv()
    if job is not None:
        conn.send(_train_until(*job, deadline))


class Runs:
    """Training processes side by side, one per run, each a probe run and then the real run.

    A process is started once (imports, CUDA context) and serves both; one that has not
    reported ``KILL_GRACE_S`` after the deadline is killed (its run directory keeps its
    last finished epoch: every file is written atomically).
    """

    def __init__(self, probes: dict[str, tuple[dict[str, Any], str]], deadline: float, threads: int) -> None:
        spawn = mp.get_context("spawn")  # no CUDA state inherited from this process
        self.deadline, self.children = deadline, {}
        for name, probe in probes.items():
            parent, child = spawn.Pipe()
            p = spawn.Process(target=_train_child, args=(child, probe, deadline, threads), daemon=False)
            p.start()
            self.children[name] = (p, parent, time.time())

    def collect(self, outs: dict[str, str]) -> dict[str, dict[str, Any]]:
        """One report from every process, with the history read from its run directory ``outs[name]``."""
        reports: dict[str, dict[str, Any]] = {}
        while len(reports) < len(self.children):
            for name, (p, conn, launched) in self.children.items():
                if name in reports:
                    continue
                if conn.poll(0.1):
                    reports[name] = conn.recv()
                elif not p.is_alive() or time.time() > self.deadline + KILL_GRACE_S:
                    status = "killed past the budget" if p.is_alive() else f"died (exit code {p.exitcode})"
                    p.kill()
                    reports[name] = {"start": launched, "epoch_ends": [], "status": status}
                else:
                    continue
                reports[name].update(launched=launched, history=read_history(Path(outs[name])))
        return reports

    def send(self, jobs: dict[str, tuple[dict[str, Any], str] | None]) -> None:
        for name, (p, conn, _) in self.children.items():
            if p.is_alive():
                conn.send(jobs.get(name))

    def close(self) -> None:
        for p, conn, _ in self.children.values():
            p.join(timeout=max(0.0, self.deadline + KILL_GRACE_S - time.time()))
            if p.is_alive():
                p.kill()
                p.join()
            conn.close()


def epoch_walls(report: dict[str, Any]) -> list[float]:
    """Wall time of each epoch after the first (which also holds the start-up); the first if alone."""
    ends = report["epoch_ends"]
    if len(ends) < 2:
        return [ends[0] - report["start"]] if ends else []
    return [b - a for a, b in pairwise(ends)]


def _run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def _summarize(histories: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per method, over its seeds: last / best validation top-1 (%), time per epoch, img/s."""
    out = {}
    for method, by_seed in histories.items():
        last = {s: 100 * h[-1]["val_top1"] for s, h in by_seed.items() if h}
        best = [100 * max(e["val_top1"] for e in h) for h in by_seed.values() if h]
        epochs = [e for h in by_seed.values() for e in h]
        top1 = mean_std(last.values())
        out[method] = {
            "last_top1_per_seed": {str(s): v for s, v in sorted(last.items())},
            "last_top1_mean": top1["mean"], "last_top1_std": top1["std"],
            "best_top1_mean": mean_std(best)["mean"],
            "epoch_time_median_s": statistics.median(e["epoch_time"] for e in epochs) if epochs else None,
            "images_per_sec_median": statistics.median(e["images_per_sec"] for e in epochs) if epochs else None,
        }
    return out


def _accuracy_markdown(result: dict[str, Any]) -> str:
    """The accuracy section's table: both methods at the same epoch."""
    lines = [f"# RSD vs baseline on {result['data']}",
             "", f"Compared at epoch {result['compared_at_epoch']} of {result['epochs_planned']} planned; "
             f"seeds {result['seeds']}; {result['machine']}; {result['date']}.", "",
             "| method | top-1 last (mean ± std) | per seed | top-1 best (mean) | time/epoch (median) | img/s |",
             "|---|---|---|---|---|---|"]
    for method, v in result["summary"].items():
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        seeds = ", ".join(f"{k}: {x:.2f}" for k, x in v["last_top1_per_seed"].items())
        lines.append(f"| {method} | {fmt(v['last_top1_mean'])} ± {fmt(v['last_top1_std'])} | {seeds} | "
                     f"{fmt(v['best_top1_mean'])} | {fmt(v['epoch_time_median_s'])} s | "
                     f"{fmt(v['images_per_sec_median'])} |")
    return "\n".join(lines) + "\n"


def section_accuracy(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    data_dir = Path(args.data_dir).expanduser().resolve()
    if not (data_dir / "train").is_dir():
        raise Skip(f"no ImageFolder data at {data_dir} (train/ and val/ expected)")
    settings = read_settings(args.settings)
    base: dict[str, Any] = {"model": args.model, "data": "imagefolder", "data_dir": str(data_dir),
                            "device": ctx.device, "workers": args.workers}
    if ctx.tiny:  # a few images at 16x16: the pipeline, not the figures
        base.update(input_size=16, train_samples=16, val_samples=16, batch_size=8, eval_batch_size=16)
    seeds = args.seeds
    names = {_run_name(m, s): (m, s) for s in seeds for m in METHODS}

    def jobs(epochs: int, root: Path) -> dict[str, tuple[dict[str, Any], str]]:
        configs = method_configs(settings, base, epochs)
        return {n: (configs[m].update({"seed": s}).to_json(), str(root / n)) for n, (m, s) in names.items()}

    # Probe: a short run of every run, side by side as the real runs will train, times
    # an epoch and a run's start-up; the real runs get as many epochs as then fit.
    probe_epochs = min(PROBE_EPOCHS, args.max_epochs)
    probes = jobs(probe_epochs, ctx.work / "probe")
    children = Runs(probes, ctx.deadline, threads=1)
    epoch_s = setup_s = 0.0
    try:
        probe = children.collect({n: out for n, (_, out) in probes.items()})
        failed = {n: r["status"] for n, r in probe.items() if r["status"] != "finished"}
        if not failed:
            epoch_s, setup_s = probe_timing(list(probe.values()))
        left = ctx.deadline - time.time() - setup_s
        epochs = 0 if failed else plan_epochs(left, EPOCH_SAFETY * epoch_s, args.max_epochs)
        if ctx.tiny and not failed:  # always through the second phase, which the GPU run needs
            epochs = args.max_epochs
        real = jobs(epochs, ctx.work / "runs") if epochs > probe_epochs else {}
        children.send(real)
        runs = children.collect({n: out for n, (_, out) in real.items()}) if real else probe
    finally:
        children.close()
    if failed:
        raise RuntimeError(f"the probe failed: {failed}")
    epochs = epochs if real else probe_epochs  # no more fits: the probe runs are the experiment
    root = ctx.work / ("runs" if real else "probe")
    startup_s = max(r["start"] - r["launched"] for r in probe.values())
    histories = {m: {s: runs[_run_name(m, s)]["history"] for s in seeds} for m in METHODS}
    configs = method_configs(settings, base, epochs)
    # Every method and seed compared at the same epoch: the last that all runs finished.
    compared = min(len(h) for by_seed in histories.values() for h in by_seed.values())
    if compared == 0:
        raise RuntimeError(f"a run finished no epoch: { {n: r['status'] for n, r in runs.items()} }")
    summary = _summarize({m: {s: h[:compared] for s, h in by_seed.items()} for m, by_seed in histories.items()})
    for method, s in summary.items():
        last = list(s["last_top1_per_seed"].values())
        s["last_top1_range"] = [min(last), max(last)] if last else None
        walls = [w for n, r in runs.items() if names[n][0] == method for w in epoch_walls(r)]
        s["epoch_wall_median_s"] = round(statistics.median(walls), 2) if walls else None
    result = {
        "benchmark": "accuracy", "data": f"imagefolder {data_dir}", "seeds": seeds,
        "complete": all(len(h) >= epochs for by_seed in histories.values() for h in by_seed.values()),
        "epochs_planned": epochs, "compared_at_epoch": compared, "max_epochs": args.max_epochs,
        "epochs_run": {n: len(r["history"]) for n, r in runs.items()},
        "run_status": {n: r["status"] for n, r in runs.items()},
        "parallel_runs": len(names), "settings": settings,
        "probe": {"epochs": probe_epochs, "epoch_wall_s": round(epoch_s, 2), "run_setup_s": round(setup_s, 2),
                  "process_startup_s": round(startup_s, 2),
                  "epoch_time_s": {n: [e["epoch_time"] for e in r["history"]] for n, r in probe.items()}},
        "config": configs["rsd"].to_json(), "configs": {m: c.to_json() for m, c in configs.items()},
        "summary": summary,
        "val_top1_per_epoch": {m: {str(s): [round(100 * e["val_top1"], 2) for e in h] for s, h in by_seed.items()}
                               for m, by_seed in histories.items()},
        "histories": {m: {str(s): h for s, h in by_seed.items()} for m, by_seed in histories.items()},
        "machine": f"{ctx.device}, {len(names)} runs side by side, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json(ctx.out / "accuracy.json", result)
    with atomic_path(ctx.out / "accuracy.md") as tmp:
        note = "" if result["complete"] else f"Some runs stopped early ({result['run_status']}): " \
            f"every run is compared at epoch {compared}, the last that all finished.\n\n"
        tmp.write_text(_accuracy_markdown(result) + "\n" + note + _epoch_table(result) + "\n")
    for name in runs:  # the figures, not the weights
        dst = ctx.out / "accuracy_runs" / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("metrics.jsonl", "run.json"):
            with contextlib.suppress(FileNotFoundError):
                shutil.copy2(root / name / f, dst / f)
    del result["histories"]  # in accuracy.json; evidence.json keeps the per-epoch top-1
    status = "ok" if result["complete"] else "partial"
    reason = None if result["complete"] else (f"some runs stopped early, all compared at epoch {compared} of "
                                              f"{epochs}: {result['run_status']}")
    return {"status": status, "reason": reason, "result": result}


def _epoch_table(result: dict[str, Any]) -> str:
    cols = [(m, s) for m in METHODS for s in result["val_top1_per_epoch"][m]]
    lines = ["Validation top-1 (%) per epoch:", "",
             "| epoch | " + " | ".join(f"{m} s{s}" for m, s in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    n = max((len(result["val_top1_per_epoch"][m][s]) for m, s in cols), default=0)
    for e in range(n):
        cells = [result["val_top1_per_epoch"][m][s] for m, s in cols]
        lines.append(f"| {e + 1} | " + " | ".join(f"{c[e]:.2f}" if e < len(c) else "" for c in cells) + " |")
    return "\n".join(lines) + "\n"


# Regime map ---------------------------------------------------------------------------------

def section_regime_map(ctx: Context) -> dict[str, Any]:
    """benchmarks/data_efficiency.py on the GPU: subsets of the full CIFAR-10 training split at 32 px.

    The study runs until the section's deadline and resumes from the committed results
    (``REGIME_LEDGER``) on the next call; its files go to ``OUT/regime_map/``.
    """
    args = ctx.args
    de = _load_benchmark("data_efficiency")
    out = ctx.out / "regime_map"
    if ctx.tiny:  # the code path on digits
        argv = ["--profile", "smoke", "--groups", "pilot,map", "--seeds", "0", "--parallel", "1"]
        name = "data_efficiency_smoke"
    else:
        cifar = Path(args.cifar10_dir).expanduser().resolve() if args.cifar10_dir else None
        if cifar is None or not (cifar / "cifar-10-batches-py").is_dir():
            raise Skip(f"no CIFAR-10 in torchvision's format (cifar-10-batches-py/) at {cifar}: give --cifar10-dir "
                       "(this machine has no network to download it)")
        argv = ["--profile", "cifar10", "--data-dir", str(cifar), "--groups", args.regime_groups,
                "--seeds", ",".join(map(str, args.seeds)), "--parallel", str(args.regime_parallel)]
        name = "data_efficiency_cifar10"
        if REGIME_LEDGER.exists():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REGIME_LEDGER, out / REGIME_LEDGER.name)
    left = ctx.deadline - time.time() - 10.0  # room to write the results
    if de.main([*argv, "--work-dir", str(ctx.work / "regime_map"), "--out-dir", str(out),
                "--deadline-s", f"{max(left, 1.0):.0f}"]) != 0:
        raise RuntimeError(f"the study reported failed runs ({out}/{name}.md)")
    r = json.loads((out / f"{name}.json").read_text())
    rows = [{"size": x["size"], "epochs": x["epochs"], **{m: x[m]["mean"] for m in METHODS},
             "n": [x[m]["n"] for m in METHODS]} for x in r["summary"]["map"]]
    groups, seeds = argv[argv.index("--groups") + 1].split(","), argv[argv.index("--seeds") + 1].split(",")
    pending = sum(r["pending_by_seed"][s][g] for s in seeds for g in groups)  # what this call was asked to train
    result = {"profile": r["profile"], "groups": groups, "map": rows, "crossover": r["summary"]["crossover"]["text"],
              "pending": pending, "runs_done": sum(x["status"] == "finished" for x in r["runs"])}
    if not pending:
        return {"status": "ok", "reason": None, "result": result}
    return {"status": "partial", "reason": f"{pending} runs left: run the section again to continue "
                                           f"(commit {name}.json to benchmarks/results/ first)", "result": result}


# CUDA tests ---------------------------------------------------------------------------------

def junit_counts(path: Path) -> dict[str, int]:
    """Passed / failed / errors / skipped from a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"],
            "total": total["tests"]}


def section_cuda_tests(ctx: Context) -> dict[str, Any]:
    xml, log = ctx.out / "cuda_tests.xml", ctx.out / "cuda_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    timeout = max(1.0, ctx.deadline - time.time())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, timed_out = None, True
    log.write_text(output)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_code": code,
                              "summary_line": (output.strip().splitlines() or [""])[-1]}
    if xml.exists():
        result.update(junit_counts(xml))
    if timed_out:
        return {"status": "partial", "reason": f"pytest ran past its {timeout:.0f} s budget", "result": result}
    if code == 5:  # pytest: no test collected
        return {"status": "ok", "reason": "no test is marked cuda", "result": result}
    if code == 1 and result.get("total"):  # the tests ran and some failed: a finding, counted
        return {"status": "failed", "reason": f"{result['failed']} failed, {result['errors']} errors",
                "result": result}
    ok = code == 0 and "total" in result
    return {"status": "ok" if ok else "error", "reason": None if ok else f"pytest exit code {code}",
            "result": result}


# Latency ------------------------------------------------------------------------------------

def untrained_run(root: Path, name: str) -> Path:
    """An RSD run directory with random weights (latency does not depend on them)."""
    suite = _load_benchmark("latency_suite")
    torch.manual_seed(0)
    run_dir = root / name
    info = suite.run_info(name)
    save_run(run_dir, info.build_model().eval(), info)
    return run_dir


def latency_budget(seconds: float, batch_sizes: int, tiny: bool) -> Budget:
    """A bench budget that keeps one model's three forms at ``batch_sizes`` sizes within ``seconds``."""
    if tiny:
        return Budget(warmup_s=0.0, iters=3)
    warmup, overhead = 0.5, 4.0  # overhead: building, MAC counts, report and chart
    per_cell = (0.8 * seconds - overhead) / (3 * batch_sizes)  # three forms per batch size
    return Budget(warmup_s=warmup, min_s=max(0.3, (per_cell - warmup) / 1.5), round_s=0.1, min_rounds=10)


def section_latency(ctx: Context) -> dict[str, Any]:
    names = ["resnet20"] if ctx.tiny else ["resnet32", "vgg16", "resnet18"]
    sizes = [1, 2] if ctx.tiny else [1, 64, 256]
    rows, skipped = [], {}
    for i, name in enumerate(names):
        per_model = (ctx.deadline - time.time()) / (len(names) - i)
        if per_model < MIN_SECTION_S:
            skipped[name] = f"out of time ({per_model:.0f} s left for it)"
            continue
        budget = latency_budget(per_model, len(sizes), ctx.tiny)
        run_dir = untrained_run(ctx.work / "latency_runs", name)
        report = bench_run(run_dir, "torch", device=ctx.device, batch_sizes=sizes, budget=budget,
                           threads=1 if ctx.tiny else None, out=ctx.out / "latency" / name)
        for e in report["results"]:
            m, uf, fb = e["models"], e["ratios"]["unfused/fused"], e["ratios"]["fused/baseline"]
            rows.append({"model": name, "batch": e["batch"], "rounds": e["rounds"],
                         "unfused_ms": m["unfused"]["median_ms"], "fused_ms": m["fused"]["median_ms"],
                         "baseline_ms": m["baseline"]["median_ms"], "unfused/fused": uf,
                         "fused/baseline": fb, "verdict": e["verdict"]["status"], "warnings": e["warnings"],
                         "budget": budget.to_json()})
    result = {"backend": f"torch-{ctx.device}", "batch_sizes": sizes, "rows": rows, "skipped_models": skipped}
    if not rows:
        raise Skip(f"no model fitted the budget: {skipped}")
    return {"status": "partial" if skipped else "ok", "reason": f"skipped: {skipped}" if skipped else None,
            "result": result}


# RSD step -----------------------------------------------------------------------------------

def section_rsd_step(ctx: Context) -> dict[str, Any]:
    step_speed, block_speed = _load_benchmark("rsd_step_speed"), _load_benchmark("block_speed")
    name, batch, size = ("resnet20", 4, 16) if ctx.tiny else ("resnet32", 64, 32)
    classes, device = 100, ctx.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    _, plain = step_speed.make_step(name, "baseline", classes, x, y)
    rsd_model, rsd = step_speed.make_step(name, "rsd", classes, x, y)
    points = list(range(rsd_model.num_mix_points))
    nets = {k: net.to(device) for k, net in block_speed.networks(name, 0.2).items()}
    if ctx.tiny:  # the code path, not the figures: the first mix point and two block networks
        points, nets = points[:1], {k: nets[k] for k in ("fast", "reference")}
    kinds: dict[str, Callable[[], Any]] = {"plain_step": plain}
    kinds |= {f"rsd_step_point{q}": (lambda q=q: rsd(q)) for q in points}
    kinds |= {f"block_{k}": (lambda net=net: block_speed.step(net, x, y)) for k, net in nets.items()}

    gflop = {"plain_step": step_speed.step_flops(plain) / 1e9}
    if not ctx.tiny:  # counting an RSD step's FLOPs costs ~20 s of CPU: not in a dry run
        gflop |= {f"rsd_step_point{q}": step_speed.step_flops(rsd, q) / 1e9 for q in points}
    gflop |= {f"block_{k}": block_speed.step_gflops(net, x, y) for k, net in nets.items()}
    for _ in range(1 if ctx.tiny else 2):  # warm-up: first calls load kernels, fill the allocator
        round_s = sum(time_call(fn, device) for fn in kinds.values())
    left = ctx.deadline - time.time()
    repeats = 2 if ctx.tiny else max(1, min(30, math.floor(0.9 * left / max(round_s, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):  # interleaved: drift hits every kind alike
        for k, fn in kinds.items():
            times[k].append(time_call(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    rsd_expected = statistics.mean(med[f"rsd_step_point{q}"] for q in points)  # uniform mix point
    flops = [gflop[f"rsd_step_point{q}"] for q in points if f"rsd_step_point{q}" in gflop]
    flop_ratio = round(statistics.mean(flops) / gflop["plain_step"], 3) if flops else None
    result = {
        "model": name, "batch": batch, "input_size": size, "device": device, "repeats": repeats,
        "timer": "CUDA events" if device == "cuda" else "wall clock",
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "gflop": {k: round(v, 3) for k, v in gflop.items()},
        "rsd_step_expected_ms": round(rsd_expected * 1e3, 3),
        "rsd_over_plain_step": round(rsd_expected / med["plain_step"], 3),
        "rsd_over_plain_step_flops": flop_ratio,
        "block_fast_speedup_vs_reference": round(med["block_reference"] / med["block_fast"], 3),
        "mix_points_timed": points,
        "times_s": times,
    }
    if "block_conv_only" in med:  # the bound, and the cost over plain conv+BN
        result["block_conv_only_speedup_vs_reference"] = round(med["block_reference"] / med["block_conv_only"], 3)
        result["block_fast_over_plain"] = round(med["block_fast"] / med["block_plain"], 3)
    write_json(ctx.out / "rsd_step.json", result)
    status = "ok" if repeats >= 3 or ctx.tiny else "partial"
    return {"status": status, "reason": None if status == "ok" else f"only {repeats} repeats fitted",
            "result": {k: v for k, v in result.items() if k != "times_s"}}


# The report ---------------------------------------------------------------------------------

def _figures(name: str, s: dict[str, Any]) -> str:
    r = s.get("result")
    if not r:
        return s.get("reason") or ""
    if name == "accuracy":
        at = r["compared_at_epoch"]
        epochs = f"{at} epochs" if at == r["epochs_planned"] else f"epoch {at} of {r['epochs_planned']}"
        parts = [f"{r['config']['model']}, {epochs} x {len(r['seeds'])} seeds:"]
        for m in METHODS:
            v = r["summary"][m]
            spread = f" ± {v['last_top1_std']:.2f}" if v["last_top1_std"] is not None else ""
            top1 = "n/a" if v["last_top1_mean"] is None else f"{v['last_top1_mean']:.2f}{spread}"
            parts.append(f"{m} {top1} ({v['epoch_time_median_s']} s/epoch)")
        return " ".join(parts)
    if name == "regime_map":
        cells = ", ".join(f"{x['size']}: " + "/".join("-" if x[m] is None else f"{x[m]:.1f}" for m in METHODS)
                          for x in r["map"])
        return f"baseline/RSD top-1 by train images: {cells}; {r['crossover']}; {r['pending']} runs left"
    if name == "cuda_tests":
        if "total" not in r:
            return r["summary_line"]
        return f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if name == "latency":
        by_model: dict[str, list[dict[str, Any]]] = {}
        for row in r["rows"]:
            by_model.setdefault(row["model"], []).append(row)
        return "; ".join(
            f"{m} b{'/'.join(str(x['batch']) for x in rows)}: fused/baseline "
            + "/".join(f"{x['fused/baseline']['value']:.3f}" for x in rows) + ", unfused/fused "
            + "/".join(f"{x['unfused/fused']['value']:.2f}x" for x in rows) for m, rows in by_model.items())
    flops = f" (FLOPs {r['rsd_over_plain_step_flops']:.2f}x)" if r["rsd_over_plain_step_flops"] else ""
    return (f"{r['model']} b{r['batch']}: RSD step {r['rsd_over_plain_step']:.2f}x plain{flops}; fast block "
            f"{r['block_fast_speedup_vs_reference']:.2f}x the per-branch reference")


def markdown(evidence: dict[str, Any]) -> str:
    gpu = evidence["machine"].get("gpu")
    lines = [f"# GPU evidence{' (TINY CPU dry run: not figures)' if evidence['tiny'] else ''}", "",
             f"{gpu['name'] if gpu else 'no GPU'}; torch {torch.__version__}; "
             f"{evidence['wall_s']:.0f} s of {evidence['total_budget_s']:.0f} s; {evidence['date']}.", "",
             "| section | status | figures | time (s) / budget |", "|---|---|---|---|"]
    for name, s in evidence["sections"].items():
        lines.append(f"| {name} | {s['status']} | {_figures(name, s)} | "
                     f"{s.get('wall_s', 0):.0f} / {s.get('budget_s', 0):.0f} |")
    latency = (evidence["sections"].get("latency") or {}).get("result")
    if latency:
        lines += ["", f"Latency ({latency['backend']}, median ms):", "",
                  "| model | batch | unfused | fused | baseline | unfused/fused | fused/baseline (95% CI) | verdict |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        lines += [f"| {x['model']} | {x['batch']} | {x['unfused_ms']:.3g} | {x['fused_ms']:.3g} | "
                  f"{x['baseline_ms']:.3g} | {x['unfused/fused']['value']:.2f}x | "
                  f"{x['fused/baseline']['value']:.3f} ({x['fused/baseline']['lo']:.3f}-"
                  f"{x['fused/baseline']['hi']:.3f}) | {x['verdict']} |" for x in latency["rows"]]
    return "\n".join(lines) + "\n"


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    return None


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "accuracy": section_accuracy, "cuda_tests": section_cuda_tests,
    "latency": section_latency, "rsd_step": section_rsd_step, "regime_map": section_regime_map,
}


def _parse_budgets(items: list[str], defaults: dict[str, float]) -> dict[str, float]:
    budgets = dict(defaults)
    for item in items:
        name, _, value = item.partition("=")
        if name not in SECTIONS or not value:
            raise RSDError(f"--budget takes SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)} (got {item!r})")
        budgets[name] = float(value)
    return budgets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for every figure")
    p.add_argument("--tiny", action="store_true", help="dry run on the CPU: tiny sizes, a few steps")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated, in this order, of {', '.join(SECTIONS)} [{','.join(DEFAULT_SECTIONS)}]")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help=f"override a section's budget (defaults {BUDGETS_S})")
    p.add_argument("--total-s", type=float, default=None, help=f"the whole command's budget [{TOTAL_S:g}]")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10-mini"))
    p.add_argument("--model", default="resnet20", help="accuracy: the architecture")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="accuracy: seeds [0 1 2; tiny: 0]")
    p.add_argument("--max-epochs", type=int, default=None, help="accuracy: at most this many epochs [100; tiny: 3]")
    p.add_argument("--workers", type=int, default=None, help="accuracy: data loader processes per run [2; tiny: 0]")
    p.add_argument("--settings", default=None,
                   help="accuracy: training settings, a JSON object or a file holding one; it replaces "
                        f"the default {json.dumps(DEFAULT_SETTINGS)}")
    p.add_argument("--work-dir", type=Path, default=None, help="where runs go [a temporary folder, removed]")
    p.add_argument("--cifar10-dir", default=None,
                   help="regime_map: the full CIFAR-10 in torchvision's format (cifar-10-batches-py/ inside)")
    p.add_argument("--regime-groups", default="pilot,map",
                   help="regime_map: data_efficiency.py's groups to train [pilot,map]")
    p.add_argument("--regime-parallel", type=int, default=4, help="regime_map: runs at once on the GPU [4]")
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.tiny else [0, 1, 2])
    args.max_epochs = args.max_epochs or (3 if args.tiny else 100)
    args.workers = args.workers if args.workers is not None else (0 if args.tiny else 2)
    total = args.total_s or (sum(TINY_BUDGETS_S.values()) + 30 if args.tiny else TOTAL_S)
    try:
        budgets = _parse_budgets(args.budget, TINY_BUDGETS_S if args.tiny else BUDGETS_S)
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        if unknown := [s for s in sections if s not in SECTIONS]:
            raise RSDError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
        if "accuracy" in sections:  # a bad setting fails now, not after minutes of other work
            method_configs(read_settings(args.settings), {"data": "imagefolder", "model": args.model}, 10)
    except (RSDError, OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2

    has_cuda = torch.cuda.is_available()
    device = "cpu" if args.tiny else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    evidence: dict[str, Any] = {
        "tiny": args.tiny, "device": device, "command": sys.argv, "git_commit": _git_commit(),
        "machine": machine_info(torch.get_num_threads()), "budgets_s": budgets, "total_budget_s": total,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sections": {},
    }
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rsd-evidence-")))
        ctx = Context(out=args.out, work=work, device=device, tiny=args.tiny, args=args)
        for name in sections:
            start = time.time()
            budget = min(budgets[name], STARTED + total - start)
            ctx.deadline = start + budget
            print(f"== {name} (budget {budget:.0f} s)", flush=True)
            try:
                if not args.tiny and not has_cuda:
                    raise Skip("no CUDA device (torch.cuda.is_available() is False)")
                if budget < MIN_SECTION_S:
                    raise Skip(f"out of time: {budget:.0f} s left of the {total:.0f} s total")
                record = RUNNERS[name](ctx)
            except Skip as e:
                record = {"status": "skipped", "reason": str(e), "result": None}
            except Exception as e:  # one section's failure must not cost the others their time
                record = {"status": "error", "reason": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc(limit=8), "result": None}
            record.update(budget_s=round(budget, 1), wall_s=round(time.time() - start, 1))
            evidence["sections"][name] = record
            evidence["wall_s"] = time.time() - STARTED
            write_json(args.out / "evidence.json", evidence)
            print(f"   {record['status']}{': ' + record['reason'] if record.get('reason') else ''} "
                  f"({record['wall_s']:.0f} s)", flush=True)
    evidence["wall_s"] = time.time() - STARTED
    write_json(args.out / "evidence.json", evidence)
    md = markdown(evidence)
    with atomic_path(args.out / "evidence.md") as tmp:
        tmp.write_text(md)
    print(md)
    return 1 if any(s["status"] in ("error", "failed") for s in evidence["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
