"""Baseline vs RSD at the same budget: validation top-1 over seeds, and time per epoch.

Trains ``--method baseline`` and ``--method rsd`` from one recipe for every seed (same
data, schedule, seed), then records the last-epoch validation top-1 of each (mean and
spread over seeds; the paper's metric), the best epoch's top-1, and the median time
per epoch, as JSON and Markdown under ``benchmarks/results/``.

Runs live under ``--work-dir``; an interrupted benchmark is continued by running the
same command again: finished runs are read back, interrupted ones resumed.

    python benchmarks/accuracy.py --config train/cifar10_mini_resnet20.json --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from rsd_deploy.errors import RSDError
from rsd_deploy.io import atomic_path, write_json
from rsd_deploy.training import TrainConfig, load_recipe, train
from rsd_deploy.training import checkpoint
from rsd_deploy.training.loop import METRICS_FILE

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("baseline", "rsd")


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(config: TrainConfig, run_dir: Path, quiet: bool) -> list[dict]:
    """Train (or resume, or just read back) one run; returns its per-epoch metrics."""
    done = checkpoint.exists(run_dir) and checkpoint.read_config(run_dir)["epochs"] == config.epochs
    history = _history(run_dir)
    if done and len(history) >= config.epochs and history[-1].get("complete", True):
        return history
    train(config, run_dir, resume=checkpoint.exists(run_dir), quiet=quiet)
    return _history(run_dir)


def summarize(runs: dict[str, dict[int, list[dict]]], epochs: int) -> dict:
    out = {}
    for method, by_seed in runs.items():
        finished = {s: h for s, h in by_seed.items() if len(h) >= epochs}
        last = [h[-1]["val_top1"] * 100 for h in finished.values()]
        best = [max(e["val_top1"] for e in h) * 100 for h in finished.values()]
        times = [e["epoch_time"] for h in by_seed.values() for e in h]
        ips = [e["images_per_sec"] for h in by_seed.values() for e in h]
        out[method] = {
            "seeds_finished": sorted(finished),
            "last_top1_per_seed": dict(zip(sorted(finished), [round(v, 2) for v in last])),
            "last_top1_mean": round(statistics.mean(last), 2) if last else None,
            "last_top1_std": round(statistics.stdev(last), 2) if len(last) > 1 else None,
            "best_top1_mean": round(statistics.mean(best), 2) if best else None,
            "epoch_time_median_s": round(statistics.median(times), 1) if times else None,
            "images_per_sec_median": round(statistics.median(ips), 1) if ips else None,
        }
    return out


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"# Baseline vs RSD: {cfg['model']} on {result['data']}",
        "",
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, lr {cfg['lr']} (x{cfg['lr_gamma']} at "
        f"{cfg['lr_milestones']}), seeds {result['seeds']}; metric: validation top-1 of the last epoch "
        f"(the paper's), mean ± std over seeds. Finished: {result['complete']}.",
        "Training images: " + ("all" if cfg.get("train_samples") is None
                               else f"{cfg['train_samples']} (an evenly spread subset)") + ".",
        f"Machine: {result['machine']}; recorded {result['date']}.",
        "",
        "| method | top-1 last (mean ± std) | per seed | top-1 best (mean) | time/epoch (median) | img/s |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in result["summary"].items():
        mean = "n/a" if s["last_top1_mean"] is None else f"{s['last_top1_mean']:.2f}"
        std = "" if s["last_top1_std"] is None else f" ± {s['last_top1_std']:.2f}"
        per = ", ".join(f"{k}: {v:.2f}" for k, v in s["last_top1_per_seed"].items()) or "none finished"
        best = "n/a" if s["best_top1_mean"] is None else f"{s['best_top1_mean']:.2f}"
        t = "n/a" if s["epoch_time_median_s"] is None else f"{s['epoch_time_median_s']:.1f} s"
        ips = "n/a" if s["images_per_sec_median"] is None else f"{s['images_per_sec_median']:.1f}"
        lines.append(f"| {method} | {mean}{std} | {per} | {best} | {t} | {ips} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="recipe both methods start from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--model", help="override the recipe's model")
    p.add_argument("--data-dir", help="override the recipe's data directory")
    p.add_argument("--train-samples", type=int, help="subset of the training set (quick checks)")
    p.add_argument("--workers", type=int)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--work-dir", default="runs/accuracy", help="where the runs go")
    p.add_argument("--name", help="result file stem [default: accuracy_<recipe stem>]")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        base = TrainConfig.from_dict(load_recipe(args.config), args.config)
        overrides = {k: getattr(args, k) for k in ("epochs", "model", "data_dir", "train_samples", "workers")
                     if getattr(args, k) is not None}
        base = base.update(overrides, "options").validate()
    except RSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = args.name or f"accuracy_{Path(args.config).stem}"
    work = Path(args.work_dir) / name
    runs: dict[str, dict[int, list[dict]]] = {m: {} for m in METHODS}
    result: dict = {}
    for seed in args.seeds:
        for method in METHODS:
            config = base.update({"method": method, "seed": seed})
            print(f"== {method}, seed {seed}", flush=True)
            try:
                runs[method][seed] = run_one(config, work / f"{method}-seed{seed}", args.quiet)
            except RSDError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            complete = all(len(runs[m].get(s, [])) >= base.epochs for m in METHODS for s in args.seeds)
            result = {
                "benchmark": "accuracy", "data": f"{base.data} {base.data_dir or ''}".strip(),
                "recipe": args.config, "seeds": args.seeds, "complete": complete,
                "config": base.to_json(),
                "summary": summarize(runs, base.epochs),
                "histories": {m: {str(s): h for s, h in r.items()} for m, r in runs.items()},
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                           f"torch {torch.__version__}",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
            RESULTS.mkdir(parents=True, exist_ok=True)
            write_json(RESULTS / f"{name}.json", result)
            with atomic_path(RESULTS / f"{name}.md") as tmp:
                tmp.write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
