#!/usr/bin/env python
"""The standard latency comparison: does a fused RSD model run exactly as fast as a plain one?

For resnet32 and vgg16 (32x32 inputs) and resnet18 (224x224), at batch 1 and 64, it
runs ``rsd-deploy bench`` (the library function behind it) on ONNX Runtime CPU and
PyTorch CPU, plus PyTorch CUDA, ONNX Runtime CUDA and TensorRT where present. The
models are untrained RSD runs (latency does not depend on weight values), exported
with ``rsd-deploy fuse-export`` (the library function behind it).

``--precision fp16|int8`` times the three models at that precision instead, each made the
same way (``rsd-deploy bench --precision``), with the fused model at fp32 beside them for the
speed-up; backends without that precision (PyTorch) are left out. INT8 models are
calibrated on real training images, never random inputs: those of ``--calib-data`` (an
ImageFolder with a ``train/`` folder) or, by default, the embedded digits set resized to the
model's input; the weights stay untrained, so the figures are latencies, not accuracies.

Results: ``benchmarks/results/<machine>/<model>_<backend>_<device>/`` (bench.json,
bench.md, bench.png, timings.json; ``_<precision>`` appended but for fp32), and
``summary.json`` and ``summary.md`` (``summary_<precision>.*``; the table and the goals)
beside them; ``benchmarks/README.md`` links to the summaries and is
never rewritten. Goals checked and recorded:
unfused/fused >= 3x for resnet32 on ONNX Runtime CPU, and "no inference overhead"
(fused/baseline interval within [0.97, 1.03] or below) everywhere.

    python benchmarks/latency_suite.py              # the full suite (~15 min on 2 CPU cores)
    python benchmarks/latency_suite.py --trial --scale 0.3 --models resnet32
    python benchmarks/latency_suite.py --precision int8 --models resnet32,vgg16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rsd_deploy import RSDError, models
from rsd_deploy.backends import get_backend
from rsd_deploy.bench import Budget, bench_run
from rsd_deploy.bench.report import FP32_ROLE, available_cores, machine_info, machine_slug
from rsd_deploy.data import DataInfo
from rsd_deploy.export import ExportOptions, fuse_export
from rsd_deploy.io import atomic_path, write_json
from rsd_deploy.run import ModelSource, Normalization, RunInfo, save_run

HERE = Path(__file__).resolve().parent
MODELS = ("resnet32", "vgg16", "resnet18")
PRECISIONS = ("fp32", "fp16", "int8")
BATCH_SIZES = (1, 64)
GOAL_SPEEDUP = 3.0  # unfused/fused for resnet32 on ONNX Runtime CPU
EXPORTER = "rsd-deploy fuse-export"

# Per-model CPU budgets, sized so that the whole CPU suite takes about 15 minutes on a
# quiet 2-core machine. A batch-64 call of unfused resnet18 at 224x224 costs ~400 GMACs,
# tens of seconds on 2 cores: those configurations get the minimum of 3 rounds (one
# call per model per round), and their instability warnings say so.
CPU_BUDGETS = {
    "resnet32": Budget(warmup_s=1.0, min_s=4.0, round_s=0.2, min_rounds=5),
    "vgg16": Budget(warmup_s=1.0, min_s=4.0, round_s=0.3, min_rounds=5),
    "resnet18": Budget(warmup_s=0.5, min_s=5.0, round_s=0.5, min_rounds=3),
}
GPU_BUDGET = Budget(warmup_s=1.0, min_s=3.0, round_s=0.1, min_rounds=10)


@dataclass(frozen=True)
class Config:
    backend: str  # torch | ort | trt
    device: str  # cpu | cuda

    @property
    def name(self) -> str:
        return f"{self.backend}_{self.device}"


def with_precision(configs: list[Config], precision: str) -> list[Config]:
    """The configurations whose backend makes and loads ``precision``; the others are named."""
    kept = []
    for cfg in configs:
        backend = get_backend(cfg.backend)
        if precision in backend.TOLERANCES:
            kept.append(cfg)
        else:
            print(f"{backend.LABEL} on {cfg.device} skipped: it has no {precision} precision", file=sys.stderr)
    return kept


def available_configs() -> list[Config]:
    """ONNX Runtime and PyTorch on CPU always; CUDA and TensorRT where this machine has them."""
    configs = [Config("ort", "cpu"), Config("torch", "cpu")]
    if torch.cuda.is_available():
        configs.append(Config("torch", "cuda"))
        for name in ("ort", "trt"):
            backend = get_backend(name)
            availability = backend.available("cuda")
            if availability:
                configs.append(Config(name, "cuda"))
            else:
                print(f"{backend.LABEL} on CUDA skipped: {availability.reason}", file=sys.stderr)
    return configs


# Runs ---------------------------------------------------------------------------------------

def calibration_data(size: int, calib_dir: Path | None) -> DataInfo:
    """Where INT8 calibration images come from: ``calib_dir`` (an ImageFolder with ``train/``)
    or the embedded digits set, resized to ``size`` and given three channels."""
    classes = [str(i) for i in range(10)]
    if calib_dir is not None:
        classes = sorted(p.name for p in (calib_dir / "train").iterdir() if p.is_dir())
    return DataInfo(name="imagefolder" if calib_dir else "digits", dir=str(calib_dir) if calib_dir else None,
                    classes=classes, input_size=[size, size], in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)


def run_info(name: str, calib_dir: Path | None = None, with_data: bool = False) -> RunInfo:
    """The record of an untrained RSD run of zoo model ``name`` at its own input size; with
    ``with_data``, the real images its INT8 models are calibrated on."""
    size = models.get_spec(name).input_size
    data = calibration_data(size, calib_dir) if with_data else None
    return RunInfo(
        model=ModelSource(name), form="rsd", method="rsd", num_classes=len(data.classes) if data else 10,
        in_channels=3, input_size=[size, size], classes=data.classes if data else [str(i) for i in range(10)],
        normalization=Normalization([0.5] * 3, [0.25] * 3), data=data,
        config={"note": "untrained: made by benchmarks/latency_suite.py for timing only"},
    )


def prepare_run(name: str, root: Path, trt_max_batch: int | None, calib_dir: Path | None = None,
                with_data: bool = False) -> Path:
    """An untrained RSD run of ``name`` exported by ``rsd-deploy fuse-export`` (and its engine)."""
    run_dir = root / name
    torch.manual_seed(0)
    info = run_info(name, calib_dir, with_data)
    save_run(run_dir, info.build_model().eval(), info)
    options = ExportOptions(onnx=True, trt=bool(trt_max_batch), max_batch=trt_max_batch or None)
    report = fuse_export(run_dir, options)
    if trt_max_batch and report["tensorrt"]["status"] != "built":
        raise RSDError(report["tensorrt"]["error"])
    return run_dir


# Summary ------------------------------------------------------------------------------------

def summary_rows(reports: list[dict]) -> list[dict]:
    rows = []
    for r in reports:
        for e in r["results"]:
            m, uf, fb = e["models"], e["ratios"]["unfused/fused"], e["ratios"]["fused/baseline"]
            rows.append({
                "model": r["model"], "input": f"{r['input_size'][0]}x{r['input_size'][1]}",
                "backend": r["backend"], "device": r["device"], "batch": e["batch"], "rounds": e["rounds"],
                "unfused_ms": m["unfused"]["median_ms"], "fused_ms": m["fused"]["median_ms"],
                "baseline_ms": m["baseline"]["median_ms"],
                "unfused_fused": uf, "fused_baseline": fb, "verdict": e["verdict"]["status"],
                "warnings": len(e["warnings"]), "precision": r["precision"],
                "fp32_speedup": e["ratios"].get(f"{FP32_ROLE}/fused"),
            })
    return rows


def goals(rows: list[dict]) -> dict:
    speed = [r for r in rows if (r["model"], r["backend"], r["device"]) == ("resnet32", "ort", "cpu")]
    return {
        "resnet32_ort_cpu_unfused_over_fused_at_least_3x": {
            "met": bool(speed) and all(r["unfused_fused"]["lo"] >= GOAL_SPEEDUP for r in speed),
            "measured": {r["batch"]: round(r["unfused_fused"]["value"], 2) for r in speed},
        },
        "fused_over_baseline_within_0.97_1.03": {
            "met": bool(rows) and all(r["verdict"] == "no_overhead" for r in rows),
            "not_met": [f"{r['model']} {r['backend']}-{r['device']} b{r['batch']}: {r['verdict']}"
                        for r in rows if r["verdict"] != "no_overhead"],
        },
    }


def _interval(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['value']:.2f}x ({r['lo']:.2f}-{r['hi']:.2f})"


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def summary_markdown(rows: list[dict], info: dict, goal: dict, title: str, minutes: float, export: str,
                     scale: float, precision: str = "fp32") -> str:
    gpu = f"{info['gpu']['name']} (driver {info['gpu']['driver']}), " if info.get("gpu") else ""
    v = info["versions"]
    lines = [
        f"# Latency suite: {title}",
        "",
        f"{gpu}{info['cpu']}, {info['available_cores']} cores, {info['threads']} threads; "
        f"torch {v.get('torch')}, onnxruntime {v.get('onnxruntime-gpu') or v.get('onnxruntime')}"
        f"{', tensorrt ' + v['tensorrt'] if 'tensorrt' in v else ''}; {precision}; exported with {export}; "
        f"time budgets x{scale:g}; suite took {minutes:.1f} min.",
        "",
        "| model | input | backend | batch | rounds | unfused ms | fused ms | baseline ms "
        "| unfused/fused (95% CI) | fused/baseline (95% CI) | verdict |"
        + (f" fused fp32/{precision} (95% CI) |" if precision != "fp32" else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---|---|---|" + ("---|" if precision != "fp32" else ""),
    ]
    for r in rows:
        uf, fb = r["unfused_fused"], r["fused_baseline"]
        flag = f" ({r['warnings']} warnings)" if r["warnings"] else ""
        lines.append(
            f"| {r['model']} | {r['input']} | {r['backend']}-{r['device']} | {r['batch']} | {r['rounds']} | "
            f"{_ms(r['unfused_ms'])} | {_ms(r['fused_ms'])} | {_ms(r['baseline_ms'])} | "
            f"{uf['value']:.2f}x ({uf['lo']:.2f}-{uf['hi']:.2f}) | "
            f"{fb['value']:.3f} ({fb['lo']:.3f}-{fb['hi']:.3f}) | {r['verdict']}{flag} |"
            + (f" {_interval(r['fp32_speedup'])} |" if precision != "fp32" else "")
        )
    g1 = goal["resnet32_ort_cpu_unfused_over_fused_at_least_3x"]
    g2 = goal["fused_over_baseline_within_0.97_1.03"]
    lines += [
        "",
        f"- Goal unfused/fused >= 3x for resnet32 on ONNX Runtime CPU (lower CI bound): "
        f"{'met' if g1['met'] else 'NOT met'} ({g1['measured']}).",
        f"- Goal fused/baseline within [0.97, 1.03] or below: {'met' if g2['met'] else 'NOT met'}"
        + (f" ({'; '.join(g2['not_met'])})" if g2["not_met"] else "") + ".",
        "",
    ]
    return "\n".join(lines)


# Main ---------------------------------------------------------------------------------------

def run_suite(names: list[str], configs: list[Config], sizes: list[int], threads: int,
              args: argparse.Namespace, out_root: Path, suffix: str) -> list[dict]:
    """Prepare every model's untrained run and bench it with every configuration."""
    reports = []
    with tempfile.TemporaryDirectory(prefix="rsd-suite-") as work:
        for name in names:
            trt = max(sizes) if any(c.backend == "trt" for c in configs) else None
            t = time.perf_counter()
            run_dir = prepare_run(name, Path(work), trt, args.calib_data, with_data=args.precision == "int8")
            print(f"{name}: run prepared in {time.perf_counter() - t:.0f} s", flush=True)
            for cfg in configs:
                base = GPU_BUDGET if cfg.device == "cuda" else CPU_BUDGETS.get(name, CPU_BUDGETS["resnet32"])
                budget = Budget(warmup_s=base.warmup_s * args.scale, min_s=base.min_s * args.scale,
                                round_s=base.round_s, min_rounds=base.min_rounds)
                t = time.perf_counter()
                report = bench_run(run_dir, cfg.backend, device=cfg.device, batch_sizes=sizes, budget=budget,
                                   threads=threads, out=out_root / f"{name}_{cfg.name}{suffix}",
                                   precision=args.precision)
                reports.append(report)
                for e in report["results"]:
                    print(f"  {name} {cfg.name} b{e['batch']}: unfused/fused "
                          f"{e['ratios']['unfused/fused']['value']:.2f}x; {e['verdict']['text']}"
                          f"{' [' + str(len(e['warnings'])) + ' warnings]' if e['warnings'] else ''}", flush=True)
                print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    return reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--configs", default=None,
                   help="comma-separated backend_device, e.g. ort_cpu,torch_cpu [default: all available]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads [default: all available cores]")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every time budget (e.g. 0.3 for a trial)")
    p.add_argument("--machine", default=None, help="results folder name [default: from the CPU / GPU]")
    p.add_argument("--trial", action="store_true",
                   help="a check that the suite works: results go to <machine>-trial and are labelled so")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="precision the three models are timed at [fp32]")
    p.add_argument("--calib-data", type=Path, default=None,
                   help="ImageFolder (with train/) INT8 calibration images come from [the embedded digits set]")
    args = p.parse_args(argv)
    if args.calib_data is not None and args.precision != "int8":
        p.error("--calib-data is for --precision int8 (the images INT8 models are calibrated on)")
    if args.calib_data is not None and not (args.calib_data / "train").is_dir():
        p.error(f"--calib-data {args.calib_data} has no train/ folder")
    if args.calib_data is not None and not any(d.is_dir() for d in (args.calib_data / "train").iterdir()):
        p.error(f"--calib-data {args.calib_data}/train has no class folders")

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    threads = args.threads or available_cores()
    configs = available_configs()
    if args.configs:
        wanted = set(args.configs.split(","))
        configs = [c for c in configs if c.name in wanted]
    configs = with_precision(configs, args.precision)
    if not configs:
        p.error(f"no backend here times {args.precision} models")
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    info = machine_info(threads)
    machine = (args.machine or machine_slug(info)) + ("-trial" if args.trial else "")
    out_root = args.results / machine
    print(f"machine {machine}: {', '.join(c.name for c in configs)}; {threads} threads; {args.precision}",
          flush=True)

    start = time.perf_counter()
    try:
        reports = run_suite(names, configs, sizes, threads, args, out_root, suffix)
    except RSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - start) / 60

    rows = summary_rows(reports)
    goal = goals(rows)
    title = f"{machine}" + (" — TRIAL on a shared, noisy machine: NOT final figures" if args.trial else "")
    md = summary_markdown(rows, info, goal, title, minutes, EXPORTER, args.scale, args.precision)
    write_json(out_root / f"summary{suffix}.json", {
        "machine": info, "trial": args.trial, "threads": threads, "scale": args.scale, "precision": args.precision,
        "budgets": {k: b.to_json() for k, b in CPU_BUDGETS.items()} | {"gpu": GPU_BUDGET.to_json()},
        "minutes": minutes, "export": EXPORTER, "rows": rows, "goals": goal,
    })
    with atomic_path(out_root / f"summary{suffix}.md") as tmp:
        tmp.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
