"""Why RSD collapses at the paper's learning rate: the first steps, instrumented.

For each setting (data, model, method, learning rate, stabilisers) this runs the first
``--steps`` optimizer steps exactly as ``rsd-deploy train`` does (same data, step,
learning-rate schedule and clipping; ``TrainConfig.lr_at``) and records at every step:

* every loss term, and the scale of the full network's logits (standard deviation over
  the batch and classes, and the largest magnitude);
* the gradient norm of the stem, of each stage and of the head (before clipping);
* the activation RMS at every mix point in the student pass, and the fraction of exact
  zeros there (dead ReLU outputs);
* the RMS of the BatchNorm weights of each stage.

Writes ``stability.json`` (every step of every setting) and ``stability_table.md`` (a table at
chosen steps and, per setting, the first step at which each quantity left its normal
range) into ``--out``, and a PNG of the main curves.

    python benchmarks/stability.py --out benchmarks/results/stability            # full grid
    python benchmarks/stability.py --steps 5 --grid digits --out /tmp/s          # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rsd_deploy import models  # noqa: E402
from rsd_deploy.data import load_datasets  # noqa: E402
from rsd_deploy.training import CEStep, RSDStep, TrainConfig  # noqa: E402

CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"
#: Data set -> (model, TrainConfig data fields). cifar10-mini runs at 16x16 to fit a CPU.
DATA = {
    "digits": ("resnet20", {"data": "digits"}),
    "cifar10-mini": ("resnet32", {"data": "imagefolder", "data_dir": str(CIFAR_MINI), "input_size": 16}),
}
#: Every setting starts from a constant learning rate with no stabiliser ...
PLAIN = {"schedule": "step", "lr_milestones": [], "warmup_epochs": 0.0, "clip_grad_norm": None}
#: ... and changes only what its label says: (label, method, config overrides).
SETTINGS = [
    ("baseline lr 0.01", "baseline", {"lr": 0.01}),
    ("baseline lr 0.05", "baseline", {"lr": 0.05}),
    ("rsd lr 0.01", "rsd", {"lr": 0.01}),
    ("rsd lr 0.05", "rsd", {"lr": 0.05}),
    ("rsd lr 0.05 warm-up 2", "rsd", {"lr": 0.05, "warmup_epochs": 2.0}),
    ("rsd lr 0.05 clip 5", "rsd", {"lr": 0.05, "clip_grad_norm": 5.0}),
    ("rsd lr 0.05 warm-up 1 clip 5", "rsd", {"lr": 0.05, "warmup_epochs": 1.0, "clip_grad_norm": 5.0}),
]


def _groups(model: nn.Module) -> dict[str, nn.Module]:
    return {"stem": model.stem, **{f"stage{i + 1}": s for i, s in enumerate(model.stages)}, "head": model.head}


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def run_setting(data: str, method: str, overrides: dict[str, Any], steps: int, seed: int,
                threads: int) -> dict[str, Any]:
    """The first ``steps`` steps of one setting; a dict of per-step series."""
    torch.set_num_threads(threads)
    model_name, data_fields = DATA[data]
    config = TrainConfig.from_dict({"model": model_name, "method": method, "seed": seed, "workers": 0,
                                    "epochs": 1000, "precise_bn": 0, **PLAIN, **data_fields,
                                    **overrides}).validate()
    train_ds, _, info = load_datasets(config.data, config.data_dir, input_size=config.resolved_input_size())
    torch.manual_seed(config.seed)
    form = "rsd" if method == "rsd" else "plain"
    model = models.create(config.model, num_classes=info.num_classes, in_channels=info.in_channels, form=form)
    step_fn = RSDStep(model, config.objective()) if method == "rsd" else CEStep(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    groups = _groups(model)
    points = [model.stem, *model.stages]
    acts: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(module, args, out):
            acts.setdefault(i, out.detach())  # the first call of a step: the student pass
        return record

    for i, module in enumerate(points):
        module.register_forward_hook(hook(i))
    bns = {name: [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)] for name, g in groups.items()}
    series: dict[str, list] = {k: [] for k in ("step", "epoch", "lr", "loss", "terms", "logit_std", "logit_absmax",
                                                "grad_norm", "grad_norm_total", "act_rms", "act_zero",
                                                "bn_weight_rms", "train_acc")}
    steps_per_epoch = len(train_ds) // config.batch_size
    step, epoch, start = 0, 0, time.perf_counter()
    while step < steps:
        torch.manual_seed(config.seed * 1_000_003 + epoch * 1_009)
        loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 1_009))
        for i, (x, y) in enumerate(loader):
            if step >= steps:
                break
            lr = config.lr_at(epoch, i, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            acts.clear()
            model.train()
            out = step_fn(x, y)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            gnorm = {name: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in g.parameters() if p.grad is not None))
                     for name, g in groups.items()}
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimizer.step()
            step += 1
            logits = out.logits.float()
            series["step"].append(step)
            series["epoch"].append(epoch + 1)
            series["lr"].append(lr)
            series["loss"].append(float(out.loss.detach()))
            series["terms"].append({k: float(v) for k, v in out.terms.items()})
            series["logit_std"].append(float(logits.std()))
            series["logit_absmax"].append(float(logits.abs().max()))
            series["grad_norm"].append(gnorm)
            series["grad_norm_total"].append(math.sqrt(sum(v * v for v in gnorm.values())))
            series["act_rms"].append([_rms(acts[j]) for j in range(len(points))])
            series["act_zero"].append([float((acts[j] == 0).float().mean()) for j in range(len(points))])
            series["bn_weight_rms"].append({name: _rms(torch.cat([b.weight for b in lst])) if lst else None
                                            for name, lst in bns.items()})
            series["train_acc"].append(float((out.logits.argmax(1) == y).float().mean()))
        epoch += 1
    return {"data": data, "model": config.model, "method": method, "overrides": overrides,
            "input_size": config.resolved_input_size(), "batch_size": config.batch_size,
            "steps_per_epoch": steps_per_epoch, "seconds": time.perf_counter() - start, "series": series}


def first_step(values: list[float], threshold: float, above: bool = True) -> int | None:
    """The first (1-based) step whose value is beyond ``threshold``, or None."""
    for i, v in enumerate(values):
        if (v > threshold) if above else (v < threshold):
            return i + 1
    return None


def summarize(run: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Where each quantity first left the range the same data's baseline stays in."""
    s = run["series"]
    last_zero = [z[-1] for z in s["act_zero"]]
    mean_tail = lambda xs: sum(xs[-20:]) / len(xs[-20:])  # noqa: E731
    out = {
        "logit_absmax_peak": max(s["logit_absmax"]),
        "logit_absmax_peak_step": s["logit_absmax"].index(max(s["logit_absmax"])) + 1,
        "grad_norm_step1": s["grad_norm_total"][0],
        "head_grad_norm_step1": s["grad_norm"][0]["head"],
        "act_rms_step1": s["act_rms"][0],
        "final_point_zero_fraction": last_zero[-1],
        "final_point_dead_step": first_step([z[-1] for z in s["act_zero"]], 0.99),
        "loss_last20": mean_tail(s["loss"]),
        "train_acc_last20": mean_tail(s["train_acc"]),
    }
    if baseline is not None:
        b = baseline["series"]
        out["logit_absmax_runaway_step"] = first_step(s["logit_absmax"], 2 * max(b["logit_absmax"]))
        out["grad_runaway_step"] = first_step(s["grad_norm_total"], 2 * max(b["grad_norm_total"]))
    return out


def _rounded(v: Any) -> Any:
    """``v`` with every float at 4 significant digits (compact JSON)."""
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def compact(run: dict[str, Any], every: int = 5, first: int = 20) -> dict[str, Any]:
    """``run`` with its series kept at steps 1..``first`` and every ``every``-th step after
    (the recorded JSON stays small; the summary is computed from every step before this)."""
    n = len(run["series"]["step"])
    keep = [i for i in range(n) if i < first or (i + 1) % every == 0]
    return {**run, "series": {k: [v[i] for i in keep] for k, v in run["series"].items()}}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_markdown(runs: list[dict[str, Any]], path: Path, at_steps: list[int]) -> None:
    lines = ["# First steps of RSD and baseline training", "",
             "Generated by `benchmarks/stability.py`. Per setting: the total loss, logit scale "
             "(largest |logit| in the batch), total gradient norm (before clipping) and head gradient "
             "norm, activation RMS at the last mix point and the fraction of exact zeros there "
             "(dead ReLU outputs), at chosen steps.", ""]
    for data in dict.fromkeys(r["data"] for r in runs):
        sel = [r for r in runs if r["data"] == data]
        r0 = sel[0]
        lines += [f"## {data}: {r0['model']}, {r0['input_size']}x{r0['input_size']}, batch {r0['batch_size']}, "
                  f"{r0['steps_per_epoch']} steps/epoch", "",
                  "| setting | step | loss | max abs logit | grad norm | head grad | RMS last point | zeros last point | "
                  "BN weight RMS last stage | train acc |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            s = r["series"]
            last_stage = list(s["bn_weight_rms"][0])[-2]
            for k in at_steps:
                if k not in s["step"]:
                    continue
                j = s["step"].index(k)
                lines.append(
                    f"| {r['label']} | {k} | {_fmt(s['loss'][j])} | {_fmt(s['logit_absmax'][j])} | "
                    f"{_fmt(s['grad_norm_total'][j])} | {_fmt(s['grad_norm'][j]['head'])} | "
                    f"{_fmt(s['act_rms'][j][-1])} | {_fmt(s['act_zero'][j][-1])} | "
                    f"{_fmt(s['bn_weight_rms'][j][last_stage])} | {_fmt(s['train_acc'][j])} |")
        lines += ["", "Summary (runaway: first step beyond twice the largest value of the baseline at the "
                  "same lr; dead: first step with > 99 % zeros at the last mix point):", "",
                  "| setting | step-1 grad norm | step-1 head grad | step-1 RMS per mix point | peak max abs logit (step) | "
                  "logit runaway step | grad runaway step | last point dead at step | mean loss, last 20 steps | "
                  "train acc, last 20 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            m = r["summary"]
            lines.append(
                f"| {r['label']} | {_fmt(m['grad_norm_step1'])} | {_fmt(m['head_grad_norm_step1'])} | "
                f"{' / '.join(_fmt(v) for v in m['act_rms_step1'])} | {_fmt(m['logit_absmax_peak'])} "
                f"({m['logit_absmax_peak_step']}) | {_fmt(m.get('logit_absmax_runaway_step'))} | "
                f"{_fmt(m.get('grad_runaway_step'))} | {_fmt(m['final_point_dead_step'])} | "
                f"{_fmt(m['loss_last20'])} | {_fmt(m['train_acc_last20'])} |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = list(dict.fromkeys(r["data"] for r in runs))
    fig, axes = plt.subplots(len(datas), 3, figsize=(13, 3.4 * len(datas)), squeeze=False)
    for row, data in enumerate(datas):
        for r in (r for r in runs if r["data"] == data):
            s = r["series"]
            axes[row, 0].plot(s["step"], s["logit_absmax"], label=r["label"])
            axes[row, 1].plot(s["step"], [z[-1] for z in s["act_zero"]], label=r["label"])
            axes[row, 2].plot(s["step"], s["loss"], label=r["label"])
        for ax, title in zip(axes[row], ("max |logit|", "zero fraction, last mix point", "loss"), strict=True):
            ax.set_title(f"{data}: {title}")
            ax.set_xlabel("step")
        axes[row, 0].set_yscale("log")
        axes[row, 2].set_yscale("log")
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=60)


def write_report(runs: list[dict[str, Any]], out: Path) -> None:
    at_steps = [k for k in (1, 2, 3, 4, 5, 10, 20, 50, 100, 200) if k in runs[0]["series"]["step"]]
    write_markdown(runs, out / "stability_table.md", at_steps)
    plot(runs, out / "stability.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--grid", default="digits,cifar10-mini", help="data sets, comma-separated")
    ap.add_argument("--settings", default=None, help="labels of SETTINGS to run, comma-separated [all]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="keep the settings already in OUT/partial.json")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the table and the figure from OUT/stability.json")
    args = ap.parse_args(argv)
    if args.report_only:
        runs = json.loads((args.out / "stability.json").read_text())
        write_report(runs, args.out)
        return
    wanted = None if args.settings is None else set(args.settings.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "partial.json"
    runs = json.loads(partial.read_text()) if args.resume and partial.exists() else []
    done = {(r["data"], r["label"]) for r in runs}
    for data in args.grid.split(","):
        for label, method, overrides in SETTINGS:
            if (wanted is not None and label not in wanted) or (data, label) in done:
                continue
            run = run_setting(data, method, overrides, args.steps, args.seed, args.threads)
            run["label"] = label
            runs.append(run)
            (args.out / "partial.json").write_text(json.dumps(_rounded(runs), separators=(",", ":")))
            print(f"{data} {label}: {run['seconds']:.0f}s, final loss {run['series']['loss'][-1]:.3f}", flush=True)
    for r in runs:
        base = next((b for b in runs if b["data"] == r["data"] and b["method"] == "baseline"
                     and b["overrides"].get("lr") == r["overrides"].get("lr")), None)
        r["summary"] = summarize(r, base)
    runs = [compact(r) for r in runs]
    (args.out / "stability.json").write_text(json.dumps(_rounded(runs), separators=(",", ":")))
    write_report(runs, args.out)
    partial.unlink()
    print(f"wrote {args.out}/stability.json, stability_table.md, stability.png")


if __name__ == "__main__":
    main()
