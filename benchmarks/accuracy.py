"""Baseline vs RSD at equal epochs, each at its own best setting from a small sweep.

The protocol:

1. **Sweep.** For each method, train every (learning rate, warm-up) pair of ``--lrs`` x
   ``--warmups`` once (seed ``--sweep-seed``, ``--sweep-epochs`` epochs, inputs
   ``--sweep-input-size`` px: 16 px costs about a quarter of 32 px). Every other setting
   comes from the recipe (``--config``), the same for both methods. A run that collapses
   or diverges is recorded as such, with its message, and not chosen.
2. **Choice.** Per method, the setting with the best last-epoch validation top-1
   (ties: the lower learning rate, then the shorter warm-up).
3. **Final runs.** Both methods at their chosen settings for every seed of ``--seeds``,
   ``--epochs`` epochs at ``--input-size`` (default: the model's, 32 px).

Results: ``accuracy_<name>.json`` (every run's per-epoch metrics, the choice, the summary),
``accuracy_<name>.md`` (tables and a verdict computed from the numbers) and
``accuracy_<name>.png`` (validation top-1 against the epoch) in ``--out-dir``
(``benchmarks/results``), rewritten after every finished run.

Runs live under ``--work-dir`` in directories named by their settings; running the same
command again continues: finished runs are read back, interrupted ones resumed, collapsed
ones kept (delete a run's directory to retrain it). A run whose settings differ from
what a directory holds is an error, never a silent mix. ``--stage sweep`` and
``--stage final`` split the work over two sessions; ``--report-only`` and ``--plot-only``
rebuild the outputs from the runs on disk without training.

    # the issue's budget: all 10,000 cifar10-mini images, resnet20, 30 epochs, 2 seeds
    python benchmarks/accuracy.py --parallel 2
    # a smoke test (under a minute)
    python benchmarks/accuracy.py --data digits --data-dir '' --input-size 8 \\
        --sweep-input-size 8 --train-samples 128 --epochs 2 --lrs 0.01,0.05 --warmups 0,1 \\
        --workers 0 --work-dir /tmp/acc --out-dir /tmp/acc --out-name smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsd_deploy.data import load_datasets
from rsd_deploy.errors import RSDError
from rsd_deploy.io import atomic_path, write_json
from rsd_deploy.study import DONE, FAILED, Run, Study, command_line, machine, relative
from rsd_deploy.training import TrainConfig, load_recipe
from rsd_deploy.training.distributed import resolve_device

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("baseline", "rsd")
TREND_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
REPORT_EVERY_S = 60.0  #: while training, rewrite the outputs at most this often (and at the end)
#: The issue's budget; the report lists every way a run departs from it.
ISSUE = {"data": "cifar10-mini", "train_images": 10_000, "model": "resnet20", "epochs": 30,
         "seeds": 2, "lrs": [0.01, 0.02, 0.05], "warmup_options": 2}


# Options ---------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    a = p.add_argument
    a("--config", default=str(ROOT / "train" / "cifar10_mini_resnet20.json"),
      help="recipe both methods start from [train/cifar10_mini_resnet20.json]")
    a("--model", help="override the recipe's model")
    a("--data", help="override the recipe's data set (e.g. digits for a smoke test)")
    a("--data-dir", help="override the recipe's data directory ('' for none)")
    a("--settings", default="{}", help="JSON of further TrainConfig keys for both methods")
    a("--epochs", type=int, default=30, help="epochs of the final runs [30]")
    a("--sweep-epochs", type=int, help="epochs of the sweep runs [--epochs]")
    a("--input-size", type=int, help="input side of the final runs [the model's: 32]")
    a("--sweep-input-size", type=int, default=16, help="input side of the sweep runs [16]")
    a("--train-samples", type=int, help="train on an evenly spread subset [all images]")
    a("--lrs", type=_floats, nargs="+", default=[0.01, 0.02, 0.05],
      help="sweep learning rates [0.01,0.02,0.05]")
    a("--warmups", type=_floats, nargs="+", default=[0.0, 2.0], help="sweep warm-up epochs [0,2]")
    a("--seeds", type=_ints, nargs="+", default=[0, 1], help="seeds of the final runs [0,1]")
    a("--sweep-seed", type=int, default=0, help="seed of the sweep runs [0]")
    a("--workers", type=int, help="data-loader processes per run [the recipe's]")
    a("--threads", type=int, default=1, help="torch threads per run [1]")
    a("--parallel", type=int, default=1, help="runs trained at once, as separate processes [1]")
    a("--methods", type=lambda t: [m for m in t.split(",") if m], default=list(METHODS),
      help="train only these methods' runs (e.g. baseline in one process, rsd in another on the "
           "same --work-dir: a run folder has one writer) [baseline,rsd]")
    a("--stage", choices=("all", "sweep", "final"), default="all",
      help="sweep, final (needs a finished sweep) or both [all]")
    a("--work-dir", help="where the runs go [runs/accuracy/<name>]")
    a("--out-dir", default=str(HERE / "results"), help="where the results go [benchmarks/results]")
    a("--out-name", help="results are accuracy_<name>.* [<recipe stem>_<epochs>ep[_<n>img]]")
    a("--report-only", action="store_true", help="rebuild JSON, Markdown and PNG from the runs on disk")
    a("--plot-only", action="store_true", help="rebuild the PNG from the runs on disk")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for key in ("lrs", "warmups", "seeds"):  # "0,1" and "0 1" alike
        values = getattr(args, key)
        setattr(args, key, [v for part in values for v in (part if isinstance(part, list) else [part])])
    args.sweep_epochs = args.sweep_epochs or args.epochs
    args.out_name = args.out_name or _default_name(args)
    args.work_dir = Path(args.work_dir or Path("runs") / "accuracy" / args.out_name)
    args.out_dir = Path(args.out_dir)
    return args


def _default_name(args: argparse.Namespace) -> str:
    subset = f"_{args.train_samples}img" if args.train_samples else ""
    return f"{Path(args.config).stem}_{args.epochs}ep{subset}"


def check_args(args: argparse.Namespace) -> None:
    """RSDError naming the first option that cannot work."""
    if not args.methods or set(args.methods) - set(METHODS):
        raise RSDError(f"--methods must list some of {', '.join(METHODS)} (got {args.methods})")
    if not args.lrs or any(lr <= 0 for lr in args.lrs):
        raise RSDError("--lrs must list positive learning rates")
    if not args.warmups or any(w < 0 for w in args.warmups):
        raise RSDError("--warmups must list warm-up epochs >= 0")
    if not args.seeds:
        raise RSDError("--seeds must list at least one seed")
    if args.parallel < 1 or args.threads < 1:
        raise RSDError("--parallel and --threads must be at least 1")
    if min(args.epochs, args.sweep_epochs) < 1:
        raise RSDError("--epochs and --sweep-epochs must be at least 1")


# Configurations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What the sweep varies."""

    lr: float
    warmup: float

    def label(self) -> str:
        return f"lr {self.lr:g}, warm-up {self.warmup:g}"


@dataclass(frozen=True)
class Job:
    """One training run of the benchmark."""

    stage: str  #: "sweep" or "final"
    method: str
    setting: Setting
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        """The run directory's name: its settings, so equal runs share one directory."""
        c = self.config
        subset = f"_n{c.train_samples}" if c.train_samples else ""
        return (f"{c.method}_lr{c.lr:g}_wu{c.warmup_epochs:g}_s{c.seed}_"
                f"px{c.resolved_input_size()}_e{c.epochs}{subset}")


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe with the command line's overrides: what both methods share."""
    base = TrainConfig.from_dict(load_recipe(args.config), args.config)
    try:
        extra = json.loads(args.settings)
    except json.JSONDecodeError as e:
        raise RSDError(f"--settings is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise RSDError("--settings must be a JSON object")
    base = base.update(extra, "--settings")
    options = {"model": args.model, "data": args.data, "train_samples": args.train_samples,
               "workers": args.workers}
    base = base.update({k: v for k, v in options.items() if v is not None}, "options")
    if args.data_dir is not None:
        base = base.update({"data_dir": args.data_dir or None}, "options")
    return base.validate()


def scale_milestones(milestones: Sequence[int], recipe_epochs: int, epochs: int) -> list[int]:
    """The recipe's step milestones moved to the same fractions of ``epochs``."""
    if epochs == recipe_epochs:
        return list(milestones)
    scaled = sorted({max(1, round(m * epochs / recipe_epochs)) for m in milestones})
    return [m for m in scaled if m < epochs]


def run_config(base: TrainConfig, method: str, setting: Setting, seed: int,
               input_size: int | None, epochs: int) -> TrainConfig:
    return base.update({
        "method": method, "lr": setting.lr, "warmup_epochs": setting.warmup, "seed": seed,
        "input_size": input_size, "epochs": epochs,
        "lr_milestones": scale_milestones(base.lr_milestones, base.epochs, epochs),
    }).validate()


def sweep_jobs(args: argparse.Namespace, base: TrainConfig) -> list[Job]:
    return [Job("sweep", m, s, args.sweep_seed,
                run_config(base, m, s, args.sweep_seed, args.sweep_input_size, args.sweep_epochs))
            for m in METHODS for s in sweep_settings(args)]


def sweep_settings(args: argparse.Namespace) -> list[Setting]:
    return [Setting(lr, w) for lr in args.lrs for w in args.warmups]


def final_jobs(args: argparse.Namespace, base: TrainConfig, chosen: dict[str, Setting | None]) -> list[Job]:
    return [Job("final", m, s, seed, run_config(base, m, s, seed, args.input_size, args.epochs))
            for m, s in chosen.items() if s is not None for seed in args.seeds]


# Runs ------------------------------------------------------------------------------------


def study(args: argparse.Namespace) -> Study:
    return Study(args.work_dir, threads=args.threads, parallel=args.parallel)


def run_jobs(jobs: Sequence[Job], args: argparse.Namespace, on_done: Callable[[Job], None]) -> None:
    """Train ``jobs`` not yet done, longest first (so parallel runs end together)."""
    todo = sorted({j.name: j for j in jobs}.values(), key=lambda j: -_cost(j.config))  # a final run may be a sweep run
    failed = study(args).run(todo, on_done)
    if failed:
        raise RSDError(f"{len(failed)} run(s) failed: {', '.join(failed)} (their logs say why)")


def _cost(config: TrainConfig) -> float:
    """Relative cost of a run, for ordering: RSD steps are about 10x a plain step."""
    return config.epochs * config.resolved_input_size() ** 2 * (10 if config.method == "rsd" else 1)


# Choice and summaries --------------------------------------------------------------------


def choose(sweep: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per method: the chosen run (best last-epoch top-1; ties: lower lr, shorter warm-up)."""
    out = {}
    for method in METHODS:
        runs = [r for r in sweep if r.job.method == method]
        finished = [r for r in runs if r.status == "finished"]
        if any(r.status not in DONE for r in runs):
            out[method] = {"setting": None, "reason": "the sweep is not finished"}
        elif not finished:
            out[method] = {"setting": None, "reason": "every setting of the sweep collapsed or diverged"}
        else:
            best = max(finished, key=lambda r: (r.top1(), -r.job.setting.lr, -r.job.setting.warmup))
            out[method] = {"setting": best.job.setting, "run": best.job.name, "last_top1": best.top1(),
                           "reason": "best last-epoch validation top-1 of the sweep"}
    return out


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def run_record(run: Run, shared: bool = False) -> dict[str, Any]:
    """Everything the results keep about one run."""
    h = run.history
    best = max(range(len(h)), key=lambda i: h[i]["val_top1"]) if h else None
    record = {
        "name": run.job.name, "stage": run.job.stage, "method": run.job.method,
        "lr": run.job.setting.lr, "warmup_epochs": run.job.setting.warmup, "seed": run.job.seed,
        "input_size": run.job.config.resolved_input_size(), "epochs": run.job.config.epochs,
        "status": run.status, "message": run.message, "epochs_run": len(h),
        "last_top1": run.top1(), "best_top1": run.top1(best + 1) if h else None,
        "best_epoch": best + 1 if h else None,
        "last_train_acc": 100 * h[-1]["train_acc"] if h else None,
        "epoch_time_median_s": _median([e["epoch_time"] for e in h]),
        "images_per_sec_median": _median([e["images_per_sec"] for e in h]),
        "machine": run.machine, "history": h,
    }
    if run.job.stage == "final":
        record["shared_with_sweep"] = shared
    return record


def summarize(final: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per method, over the finished seeds: last / best top-1, time per epoch, img/s."""
    out = {}
    for method in METHODS:
        runs = [r for r in final if r.job.method == method and r.status == "finished"]
        last = {r.job.seed: r.top1() for r in runs}
        best = [max(e["val_top1"] for e in r.history) * 100 for r in runs]
        epochs_all = [e for r in runs for e in r.history]
        out[method] = {
            "seeds_finished": sorted(last),
            "last_top1_per_seed": {str(s): v for s, v in sorted(last.items())},
            "last_top1_mean": _mean(list(last.values())),
            "last_top1_std": _std(list(last.values())),
            "best_top1_mean": _mean(best),
            "last_train_acc_mean": _mean([100 * r.history[-1]["train_acc"] for r in runs]),
            "epoch_time_median_s": _median([e["epoch_time"] for e in epochs_all]),
            "images_per_sec_median": _median([e["images_per_sec"] for e in epochs_all]),
        }
    return out


def compare(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """RSD - baseline over the seeds both finished: mean, per-seed differences, spread."""
    rsd, base = summary["rsd"]["last_top1_per_seed"], summary["baseline"]["last_top1_per_seed"]
    seeds = sorted(set(rsd) & set(base), key=int)
    diffs = {s: rsd[s] - base[s] for s in seeds}
    values = list(diffs.values())
    times = summary["rsd"]["epoch_time_median_s"], summary["baseline"]["epoch_time_median_s"]
    return {
        "seeds": [int(s) for s in seeds], "diff_per_seed": diffs,
        "diff_mean": _mean(values), "diff_std": _std(values),
        "diff_min": min(values) if values else None, "diff_max": max(values) if values else None,
        "epoch_time_ratio": times[0] / times[1] if None not in times and times[1] else None,
    }


def verdict(cmp: dict[str, Any], summary: dict[str, dict[str, Any]], complete: bool) -> str:
    """One plain sentence computed from the numbers, no further than they go."""
    n = len(cmp["seeds"])
    if n == 0:
        return "No verdict yet: no seed has finished for both methods."
    d, lo, hi = cmp["diff_mean"], cmp["diff_min"], cmp["diff_max"]
    seeds = f"{n} seed{'s' if n > 1 else ''}"
    spread = (f"per-seed differences {lo:+.2f} to {hi:+.2f}" if n > 1
              else "one seed only, so no seed spread was measured")
    if lo > 0:
        text = f"RSD beats the baseline by {d:.2f} points of last-epoch validation top-1 ({seeds}; {spread})."
    elif hi < 0:
        text = f"RSD trails the baseline by {-d:.2f} points of last-epoch validation top-1 ({seeds}; {spread})."
    else:
        text = (f"No clear winner: RSD - baseline = {d:+.2f} points on average, but the sign changes "
                f"with the seed ({seeds}; {spread}).")
    stds = [s for s in (summary["rsd"]["last_top1_std"], summary["baseline"]["last_top1_std"]) if s is not None]
    if stds and (lo > 0 or hi < 0) and abs(d) < max(stds):
        text += (f" The difference is smaller than a method's own seed-to-seed std ({max(stds):.2f}), "
                 "so it is not a clear margin.")
    if not complete:
        text += " Provisional: not every final run has finished."
    return text


def trend_epochs(epochs: int) -> list[int]:
    return sorted({max(1, round(f * epochs)) for f in TREND_FRACTIONS})


def trend(final: Sequence[Run], epochs: int) -> list[dict[str, Any]]:
    """Mean validation top-1 per method at 25/50/75/100% of the epochs, and RSD - baseline."""
    rows = []
    for e in trend_epochs(epochs):
        row: dict[str, Any] = {"epoch": e}
        for method in METHODS:
            row[method] = _mean([r.top1(e) for r in final if r.job.method == method and r.top1(e) is not None])
        row["diff"] = row["rsd"] - row["baseline"] if None not in (row["rsd"], row["baseline"]) else None
        rows.append(row)
    return rows


def diagnose(final: Sequence[Run], sweep: Sequence[Run], rows: list[dict[str, Any]],
             summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """What the recorded numbers say about why RSD does not beat the baseline."""
    notes = []
    diffs = [r for r in rows if r["diff"] is not None]
    if len(diffs) > 1:
        first, last = diffs[0], diffs[-1]
        change = last["diff"] - first["diff"]
        how = ("narrowed" if change > 0.5 else "widened" if change < -0.5 else "stayed about the same")
        notes.append(f"With epochs, the gap RSD - baseline {how}: {first['diff']:+.2f} points at epoch "
                     f"{first['epoch']}, {last['diff']:+.2f} at epoch {last['epoch']} (table above).")
        if len(diffs) > 2:
            late = diffs[-2]
            gain = {m: last[m] - late[m] for m in METHODS}
            notes.append(f"Over the last epochs ({late['epoch']} to {last['epoch']}) RSD gained "
                         f"{gain['rsd']:+.2f} points, the baseline {gain['baseline']:+.2f}."
                         + (" RSD was still closing the gap when training stopped; these runs do not show "
                            "whether more epochs would close it." if gain["rsd"] > gain["baseline"] + 0.5 else ""))
    fit = fit_note(final, summary)
    if fit:
        notes.append(fit)
    for method in METHODS:
        failed = [r for r in sweep if r.job.method == method and r.status in FAILED]
        if failed:
            notes.append(f"In the sweep, {method} {'/'.join(sorted({r.status for r in failed}))} at "
                         f"{len(failed)} of {sum(r.job.method == method for r in sweep)} settings: "
                         + "; ".join(r.job.setting.label() for r in failed) + ".")
    chosen = {r.job.method: r.job.setting for r in final}
    for method, s in chosen.items():
        if len(args.lrs) > 1 and s.lr in (min(args.lrs), max(args.lrs)):
            edge = "lowest" if s.lr == min(args.lrs) else "highest"
            notes.append(f"{method}'s chosen lr {s.lr:g} is the {edge} of the grid: its best setting may "
                         "lie outside the range tried.")
    if args.sweep_input_size != final_input_size(args, final):
        notes.append(f"The settings were chosen at {args.sweep_input_size} px; the final runs are at "
                     f"{final_input_size(args, final)} px, where they need not be the best.")
    return notes


def fit_note(final: Sequence[Run], summary: dict[str, dict[str, Any]]) -> str | None:
    """Training vs validation accuracy: under-fitting or over-fitting, when every seed agrees."""
    train = {m: [100 * r.history[-1]["train_acc"] for r in final
                 if r.job.method == m and r.status == "finished"] for m in METHODS}
    if not (train["rsd"] and train["baseline"]):
        return None
    tr, tb = statistics.mean(train["rsd"]), statistics.mean(train["baseline"])
    vr, vb = summary["rsd"]["last_top1_mean"], summary["baseline"]["last_top1_mean"]
    text = (f"Last-epoch training accuracy (full network, on augmented training batches): RSD {tr:.2f}%, "
            f"baseline {tb:.2f}%; validation top-1: RSD {vr:.2f}%, baseline {vb:.2f}%.")
    if max(train["rsd"]) < min(train["baseline"]):
        return text + (" RSD's training accuracy is lower on every seed: it fits the training images less well, "
                       "so in this budget it falls short by under-fitting, not by over-fitting.")
    if min(train["rsd"]) > max(train["baseline"]) and vr < vb:
        return text + (" RSD's training accuracy is higher on every seed but its validation top-1 lower: "
                       "it generalizes worse here (a larger train-validation gap).")
    return text + " The seeds overlap, so this does not separate under-fitting from over-fitting."


def final_input_size(args: argparse.Namespace, final: Sequence[Run]) -> int | None:
    return final[0].job.config.resolved_input_size() if final else args.input_size


# The result ------------------------------------------------------------------------------


def data_sizes(base: TrainConfig, input_size: int) -> dict[str, int]:
    """Training and validation images of the data set (all of them, before any subset)."""
    train_ds, val_ds, _ = load_datasets(base.data, base.data_dir, input_size=input_size)
    return {"train": len(train_ds), "val": len(val_ds)}


def data_name(base: TrainConfig) -> str:
    return Path(base.data_dir).name if base.data_dir else base.data


def issue_differences(args: argparse.Namespace, base: TrainConfig, sizes: dict[str, int],
                      final_size: int) -> list[str]:
    """Every way this benchmark departs from the issue's budget (the 16 px sweep included)."""
    out = []
    train_images = min(base.train_samples or sizes["train"], sizes["train"])
    if data_name(base) != ISSUE["data"]:
        out.append(f"data: {data_name(base)}, not {ISSUE['data']}")
    if train_images < ISSUE["train_images"]:
        subset = " (an evenly spread subset)" if train_images < sizes["train"] else ""
        out.append(f"training images: {train_images}{subset}, not all {ISSUE['train_images']:,}")
    if base.model != ISSUE["model"]:
        out.append(f"model: {base.model}, not {ISSUE['model']}")
    if min(args.epochs, args.sweep_epochs) < ISSUE["epochs"]:
        out.append(f"epochs: {args.epochs} (sweep {args.sweep_epochs}), under the issue's {ISSUE['epochs']}")
    if args.sweep_epochs != args.epochs:
        out.append(f"the sweep ran {args.sweep_epochs} epochs, the final runs {args.epochs}")
    if len(args.seeds) < ISSUE["seeds"]:
        out.append(f"seeds: {len(args.seeds)}, under the issue's {ISSUE['seeds']}")
    if sorted(args.lrs) != ISSUE["lrs"]:
        out.append(f"learning rates swept: {args.lrs}, not {ISSUE['lrs']}")
    if len(args.warmups) < ISSUE["warmup_options"] or 0 not in args.warmups:
        out.append(f"warm-ups swept: {args.warmups}, not 'with and without'")
    if args.sweep_input_size != final_size:
        factor = (final_size / args.sweep_input_size) ** 2
        out.append(f"the sweep used {args.sweep_input_size} px inputs ({factor:g}x fewer pixels than the "
                   f"final runs' {final_size} px, as the issue allows)")
    return out


def build_result(args: argparse.Namespace, base: TrainConfig, sweep: list[Run], final: list[Run],
                 chosen: dict[str, dict[str, Any]], sizes: dict[str, int]) -> dict[str, Any]:
    final_size = base.update({"input_size": args.input_size}).resolved_input_size()
    summary = summarize(final)
    expected = len(args.seeds) * len(METHODS)
    complete = len([r for r in final if r.status == "finished"]) == expected
    cmp = compare(summary)
    rows = trend(final, args.epochs)
    sweep_names = {r.job.name for r in sweep}
    text = verdict(cmp, summary, complete)
    beats = cmp["diff_min"] is not None and cmp["diff_min"] > 0
    machines = [r.machine for r in sweep + final if r.machine]
    return {
        "benchmark": "accuracy", "name": args.out_name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command_line("benchmarks/accuracy.py", args.argv, ROOT),
        "recipe": relative(args.config, ROOT),
        "setup": {
            "data": data_name(base), "data_set": base.data,
            "data_dir": relative(base.data_dir, ROOT) if base.data_dir else None,
            "train_images": min(base.train_samples or sizes["train"], sizes["train"]),
            "train_images_available": sizes["train"], "val_images": sizes["val"],
            "model": base.model, "batch_size": base.batch_size, "schedule": base.schedule,
            "recipe_epochs": base.epochs, "recipe_lr_milestones": base.lr_milestones,
            "lr_gamma": base.lr_gamma, "momentum": base.momentum, "weight_decay": base.weight_decay,
            "final": {"epochs": args.epochs, "input_size": final_size, "seeds": args.seeds,
                      "lr_milestones": scale_milestones(base.lr_milestones, base.epochs, args.epochs)},
            "sweep": {"epochs": args.sweep_epochs, "input_size": args.sweep_input_size, "seed": args.sweep_seed,
                      "lrs": args.lrs, "warmup_epochs": args.warmups,
                      "lr_milestones": scale_milestones(base.lr_milestones, base.epochs, args.sweep_epochs)},
            "threads_per_run": args.threads, "parallel_runs": args.parallel,
            "machine_now": machine(args.threads, args.parallel, resolve_device(base.device).type),
            "machines_of_runs": [dict(t) for t in sorted({tuple(sorted(m.items())) for m in machines}, key=str)],
            "base_config": dict(base.to_json(), data_dir=relative(base.data_dir, ROOT) if base.data_dir else None),
        },
        "issue_differences": issue_differences(args, base, sizes, final_size),
        "sweep": [run_record(r) for r in sweep],
        "chosen": {m: dict(c, setting=dataclasses.asdict(c["setting"]) if c["setting"] else None)
                   for m, c in chosen.items()},
        "final": [run_record(r, r.job.name in sweep_names) for r in final],
        "final_complete": complete, "summary": summary, "comparison": cmp,
        "verdict": text, "trend": rows,
        "diagnosis": [] if beats or not cmp["seeds"] else diagnose(final, sweep, rows, summary, args),
    }


# Markdown --------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _secs(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} s"


def _machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']} ({m['logical_cores']} logical cores){gpu}, {m['threads']} torch thread(s) per run, "
            f"{m['parallel_runs']} run(s) at once, device {m['device']}, torch {m['torch']}")


def md_setup(r: dict[str, Any]) -> list[str]:
    s = r["setup"]
    subset = (" (all)" if s["train_images"] == s["train_images_available"]
              else f" of {s['train_images_available']} (an evenly spread subset)")
    machines = s["machines_of_runs"] or [s["machine_now"]]
    if s["schedule"] != "step":
        schedule = s["schedule"]
    elif not s["recipe_lr_milestones"]:
        schedule = "constant lr (step schedule without milestones)"
    else:
        schedule = (f"step, x{s['lr_gamma']} at epochs {s['final']['lr_milestones']} of the final runs "
                    f"({s['sweep']['lr_milestones']} of the sweep's; the recipe's {s['recipe_lr_milestones']} "
                    f"of {s['recipe_epochs']} epochs, scaled to the epochs run)")
    lines = [
        "## Setup", "",
        f"- Data: {s['data']} ({s['data_set']}), {s['train_images']} training images{subset}, "
        f"{s['val_images']} validation images.",
        f"- Model {s['model']}, batch {s['batch_size']}, SGD momentum {s['momentum']}, weight decay "
        f"{s['weight_decay']}; schedule: {schedule}; warm-up: linear, over the epochs given.",
        f"- Sweep: lr {', '.join(f'{v:g}' for v in s['sweep']['lrs'])} x warm-up "
        f"{', '.join(f'{v:g}' for v in s['sweep']['warmup_epochs'])} epochs, seed {s['sweep']['seed']}, "
        f"{s['sweep']['epochs']} epochs at {s['sweep']['input_size']} px. Choice: best last-epoch validation "
        "top-1 (ties: lower lr, then shorter warm-up).",
        f"- Final runs: seeds {', '.join(map(str, s['final']['seeds']))}, {s['final']['epochs']} epochs at "
        f"{s['final']['input_size']} px, each method at its chosen setting.",
        "- Metric: validation top-1 of the last epoch (the paper's); time per epoch: median over every "
        "epoch of the method's final runs (training only, not validation).",
    ]
    lines += [f"- Machine: {_machine_line(m)}." for m in machines]
    lines.append(f"- Recorded {r['date']}; recipe `{r['recipe']}`.")
    diffs = r["issue_differences"]
    lines += ["", "Differences from the issue's budget: " + ("none." if not diffs else "")]
    if diffs:
        lines += [""] + [f"- {d}" for d in diffs]
    return lines


def md_sweep(r: dict[str, Any]) -> list[str]:
    chosen = {c.get("run") for c in r["chosen"].values()}
    lines = ["## Sweep", "",
             "| method | lr | warm-up | status | last top-1 | best top-1 (epoch) | epochs run | time/epoch | chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in r["sweep"]:
        best = "n/a" if e["best_top1"] is None else f"{e['best_top1']:.2f} ({e['best_epoch']})"
        lines.append(f"| {e['method']} | {e['lr']:g} | {e['warmup_epochs']:g} | {e['status']} | "
                     f"{_pct(e['last_top1'])} | {best} | {e['epochs_run']}/{e['epochs']} | "
                     f"{_secs(e['epoch_time_median_s'])} | {'**yes**' if e['name'] in chosen else ''} |")
    failed = [e for e in r["sweep"] if e["message"]]
    if failed:
        lines += [""] + [f"- {e['method']}, lr {e['lr']:g}, warm-up {e['warmup_epochs']:g}: {e['message']}"
                         for e in failed]
    lines += ["", "Chosen settings:", ""]
    for method, c in r["chosen"].items():
        s = c["setting"]
        lines.append(f"- {method}: " + (f"lr {s['lr']:g}, warm-up {s['warmup']:g} epoch(s) "
                                        f"(sweep top-1 {c['last_top1']:.2f})" if s else f"none: {c['reason']}"))
    return lines


def md_final(r: dict[str, Any]) -> list[str]:
    if not r["final"]:
        return ["## Final runs", "", "Not run yet: they need a chosen setting for both methods."]
    settings = {e["method"]: f"lr {e['lr']:g}, warm-up {e['warmup_epochs']:g}" for e in r["final"]}
    lines = ["## Final runs", "",
             "| method | setting | top-1 last (mean ± std) | per seed | top-1 best (mean) | time/epoch (median) "
             "| img/s |", "|---|---|---|---|---|---|---|"]
    for method, s in r["summary"].items():
        std = "" if s["last_top1_std"] is None else f" ± {s['last_top1_std']:.2f}"
        per = ", ".join(f"{k}: {v:.2f}" for k, v in s["last_top1_per_seed"].items()) or "none finished"
        ips = "n/a" if s["images_per_sec_median"] is None else f"{s['images_per_sec_median']:.1f}"
        lines.append(f"| {method} | {settings.get(method, 'n/a')} | {_pct(s['last_top1_mean'])}{std} | {per} | "
                     f"{_pct(s['best_top1_mean'])} | {_secs(s['epoch_time_median_s'])} | {ips} |")
    lines += ["", "| method | seed | status | top-1 last | top-1 best (epoch) | train acc last | time/epoch | "
                  "img/s | also a sweep run |", "|---|---|---|---|---|---|---|---|---|"]
    for e in r["final"]:
        best = "n/a" if e["best_top1"] is None else f"{e['best_top1']:.2f} ({e['best_epoch']})"
        ips = "n/a" if e["images_per_sec_median"] is None else f"{e['images_per_sec_median']:.1f}"
        lines.append(f"| {e['method']} | {e['seed']} | {e['status']} ({e['epochs_run']}/{e['epochs']}) | "
                     f"{_pct(e['last_top1'])} | {best} | {_pct(e['last_train_acc'])} | "
                     f"{_secs(e['epoch_time_median_s'])} | {ips} | {'yes' if e['shared_with_sweep'] else ''} |")
    if any(e["shared_with_sweep"] for e in r["final"]):
        lines += ["", "A final run that is also a sweep run was chosen on its own result: that seed's number "
                      "is optimistic for both methods alike."]
    return lines


def md_comparison(r: dict[str, Any]) -> list[str]:
    c = r["comparison"]
    lines = ["## RSD - baseline", ""]
    if c["seeds"]:
        per = ", ".join(f"seed {s}: {v:+.2f}" for s, v in c["diff_per_seed"].items())
        std = "" if c["diff_std"] is None else f" ± {c['diff_std']:.2f} (std over seeds)"
        lines.append(f"Last-epoch top-1, paired by seed: {c['diff_mean']:+.2f}{std} points ({per}).")
    if c["epoch_time_ratio"] is not None:
        t = r["summary"]
        lines.append(f"Time per epoch: RSD {_secs(t['rsd']['epoch_time_median_s'])}, baseline "
                     f"{_secs(t['baseline']['epoch_time_median_s'])}: RSD takes {c['epoch_time_ratio']:.1f}x "
                     "as long per epoch.")
    lines += ["", "Validation top-1 (mean over seeds) at fractions of the epochs:", "",
              "| epoch | baseline | rsd | rsd - baseline |", "|---|---|---|---|"]
    for row in r["trend"]:
        diff = "n/a" if row["diff"] is None else f"{row['diff']:+.2f}"
        lines.append(f"| {row['epoch']} | {_pct(row['baseline'])} | {_pct(row['rsd'])} | {diff} |")
    if r["diagnosis"]:
        lines += ["", "## Why RSD does not beat the baseline here: what the numbers show", ""]
        lines += [f"- {n}" for n in r["diagnosis"]]
    return lines


def to_markdown(r: dict[str, Any]) -> str:
    s = r["setup"]
    lines = [f"# RSD vs baseline at equal epochs: {s['model']} on {s['data']}", "",
             f"**Verdict** (computed from the final runs below): {r['verdict']}", ""]
    lines += md_setup(r) + [""] + md_sweep(r) + [""] + md_final(r) + [""] + md_comparison(r)
    lines += ["", f"Curves: `accuracy_{r['name']}.png`; every run's per-epoch metrics: "
                  f"`accuracy_{r['name']}.json`."]
    return "\n".join(lines) + "\n"


# Plot ------------------------------------------------------------------------------------

COLORS = {"baseline": "tab:blue", "rsd": "tab:red"}


def plot(r: dict[str, Any], path: Path) -> None:
    """Validation top-1 against the epoch: final runs (seeds thin, mean thick) and the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.5), dpi=100)
    ax_final, ax_sweep = fig.subplots(1, 2)
    for method in METHODS:
        runs = [e for e in r["final"] if e["method"] == method and e["history"]]
        for e in runs:
            ax_final.plot(_epochs(e), _top1(e), color=COLORS[method], linewidth=0.8, alpha=0.45)
        n = min((len(e["history"]) for e in runs), default=0)
        if n:
            mean = [statistics.mean(_top1(e)[i] for e in runs) for i in range(n)]
            label = f"{method} (lr {runs[0]['lr']:g}, warm-up {runs[0]['warmup_epochs']:g}), mean of {len(runs)}"
            ax_final.plot(range(1, n + 1), mean, color=COLORS[method], linewidth=2.5, label=label)
    s = r["setup"]
    ax_final.set(xlabel="epoch", ylabel="validation top-1 (%)",
                 title=f"final runs: {s['final']['input_size']} px, {s['train_images']} images, seeds thin")
    chosen = {c.get("run") for c in r["chosen"].values()}
    for e in r["sweep"]:
        if not e["history"]:
            continue
        style = "-" if e["warmup_epochs"] else "--"
        bold = e["name"] in chosen
        ax_sweep.plot(_epochs(e), _top1(e), style, color=COLORS[e["method"]], linewidth=2.2 if bold else 0.9,
                      alpha=1.0 if bold else 0.55,
                      label=f"{e['method']} lr {e['lr']:g} wu {e['warmup_epochs']:g}"
                            + (" (chosen)" if bold else "") + (f" [{e['status']}]" if e["status"] in FAILED else ""))
        if e["status"] in FAILED:
            ax_sweep.plot(_epochs(e)[-1], _top1(e)[-1], "x", color=COLORS[e["method"]], markersize=8)
    ax_sweep.set(xlabel="epoch", ylabel="validation top-1 (%)",
                 title=f"sweep: {s['sweep']['input_size']} px, seed {s['sweep']['seed']} (dashed: no warm-up)")
    for ax in (ax_final, ax_sweep):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _epochs(e: dict[str, Any]) -> list[int]:
    return [h["epoch"] for h in e["history"]]


def _top1(e: dict[str, Any]) -> list[float]:
    return [100 * h["val_top1"] for h in e["history"]]


# Main ------------------------------------------------------------------------------------


def out_paths(args: argparse.Namespace) -> dict[str, Path]:
    stem = args.out_dir / f"accuracy_{args.out_name}"
    return {ext: stem.with_suffix(f".{ext}") for ext in ("json", "md", "png")}


def collect(args: argparse.Namespace, base: TrainConfig) -> tuple[list[Run], dict[str, dict[str, Any]], list[Run]]:
    """The sweep runs, the choice and the final runs, as the work directory holds them."""
    runs = study(args)
    sweep = [runs.load(j) for j in sweep_jobs(args, base)]
    chosen = choose(sweep)
    settings = {m: c["setting"] for m, c in chosen.items()}
    final = [runs.load(j) for j in final_jobs(args, base, settings)]
    return sweep, chosen, final


def write_outputs(args: argparse.Namespace, base: TrainConfig, sizes: dict[str, int],
                  plot_only: bool = False) -> dict[str, Any]:
    sweep, chosen, final = collect(args, base)
    result = build_result(args, base, sweep, final, chosen, sizes)
    paths = out_paths(args)
    if not plot_only:
        write_json(paths["json"], result)
        with atomic_path(paths["md"]) as tmp:
            tmp.write_text(to_markdown(result))
    plot(result, paths["png"])
    return result


def throttled(fn: Callable[[], Any], every_s: float) -> Callable[[Job], None]:
    """A callback that calls ``fn`` at most once every ``every_s`` seconds."""
    last = [-math.inf]

    def call(_job: Job) -> None:
        if time.monotonic() - last[0] >= every_s:
            fn()
            last[0] = time.monotonic()

    return call


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    try:
        check_args(args)
        base = base_config(args)
        sizes = data_sizes(base, base.resolved_input_size())
        report = throttled(lambda: write_outputs(args, base, sizes), REPORT_EVERY_S)

        def mine(jobs: list[Job]) -> list[Job]:  # this process trains --methods; reports show all
            return [j for j in jobs if j.method in args.methods]

        if args.plot_only or args.report_only:
            write_outputs(args, base, sizes, plot_only=args.plot_only)
        else:
            if args.stage in ("all", "sweep"):
                run_jobs(mine(sweep_jobs(args, base)), args, report)
            if args.stage in ("all", "final"):
                chosen = choose(collect(args, base)[0])
                missing = [m for m, c in chosen.items() if c["setting"] is None]
                if missing:
                    raise RSDError(f"no setting chosen for {', '.join(missing)}: "
                                   + "; ".join(dict.fromkeys(chosen[m]["reason"] for m in missing))
                                   + (" (run --stage sweep first)" if args.stage == "final" else ""))
                settings = {m: c["setting"] for m, c in chosen.items()}
                run_jobs(mine(final_jobs(args, base, settings)), args, report)
            result = write_outputs(args, base, sizes)
            print(f"\n{result['verdict']}")
    except RSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    paths = out_paths(args)
    print(f"wrote {paths['md']}, {paths['json'].name}, {paths['png'].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
