"""Does RSD's fused network quantize worse than the baseline? INT8 top-1 and latency, per run.

For every run given (RSD and baseline runs trained with the same budget): fuse it and
export the verified fp32 ONNX (``fuse_export``; an export already in ``RUN/deploy`` made
from the run's current weights is reused), quantize it with ``onnxruntime.quantization``
(static, Q/DQ, per-channel weights, ``ort`` format) once per calibration method on the
same training images, and measure on the whole validation split: fp32 top-1, INT8 top-1,
the drop and the top-1 agreement; then fp32 and INT8 latency of the fused model in ONNX
Runtime on the CPU (interleaved rounds, batch 1 and 64). To explain a difference it
records what makes per-channel INT8 weights lossy: for every fused conv, each output
channel's ``max|w| / rms(w)`` (a kernel with outliers spends its 255 levels on them) and
the weight's relative INT8 rounding error, per run.

    python benchmarks/quantization.py RUN [RUN ...] --name cifar10_mini_resnet20_16px_30ep

Results: ``results/quantization_NAME.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd_deploy.backends import get_backend
from rsd_deploy.bench.report import cpu_model
from rsd_deploy.errors import RSDError
from rsd_deploy.export import ExportOptions, fuse_export
from rsd_deploy.io import atomic_path, sha256_file, write_json
from rsd_deploy.quantize import METHODS, accuracy_gate, calibrate, quantize_onnx, validation_set
from rsd_deploy.run import WEIGHTS_FILE, load_run, read_run
from rsd_deploy.study import relative

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def fp32_onnx(run: Path) -> Path:
    """The run's verified fused fp32 ONNX: its export when current, else a fresh one."""
    deploy = run / "deploy"
    try:
        info = read_run(deploy)
        if info.source and info.source.weights_sha256 == sha256_file(run / WEIGHTS_FILE) and (
                deploy / "model.onnx").is_file():
            return deploy / "model.onnx"
    except RSDError:
        pass
    fuse_export(run, ExportOptions(onnx=True, out=str(deploy)))
    return deploy / "model.onnx"


@torch.no_grad()
def weight_stats(run: Path) -> dict[str, float]:
    """Per fused conv and output channel: ``max|w| / rms(w)``, and the relative INT8 rounding error."""
    from rsd_deploy import fuse_model

    model, _ = load_run(run)
    fused = fuse_model(model)
    peaks, errors = [], []
    for m in fused.modules():
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight.flatten(1).double()
            amax = w.abs().amax(1).clamp_min(1e-12)
            rms = w.pow(2).mean(1).sqrt().clamp_min(1e-12)
            peaks += (amax / rms).tolist()
            scale = (amax / 127)[:, None]
            q = (w / scale).round().clamp(-127, 127) * scale
            errors.append(float((q - w).norm() / w.norm()))
    return {"channel_peak_to_rms_median": statistics.median(peaks), "channel_peak_to_rms_p99":
            float(np.percentile(peaks, 99)), "channel_peak_to_rms_max": max(peaks),
            "weight_int8_error_median": statistics.median(errors), "weight_int8_error_max": max(errors)}


def latency(paths: dict[str, Path], shape: tuple[int, ...], batch: int, rounds: int, threads: int) -> dict[str, float]:
    """Median ms per call of each ONNX file, timed in interleaved rounds of 10 calls."""
    runners = {k: get_backend("ort").load(p, threads=threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    for r in runners.values():
        for _ in range(3):
            r(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            t = time.perf_counter()
            for _ in range(10):
                r(x)
            times[k].append((time.perf_counter() - t) / 10 * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(run: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    info = read_run(run)
    src = fp32_onnx(run)
    ort = get_backend("ort")
    fp32 = ort.load(src, threads=args.threads)
    val = validation_set(info.data)
    row: dict[str, Any] = {"run": relative(run, ROOT), "model": str(info.model), "method": info.method,
                           "seed": (info.config or {}).get("seed"), "weights": weight_stats(run), "int8": {}}
    files = {"fp32": src}
    for method in args.methods:
        calibration = calibrate(info.data, args.calib_samples, method, "ort")
        dst = tmp / f"{run.name}_{method}.onnx"
        quantize_onnx(src, dst, calibration)
        gate = accuracy_gate(fp32, ort.load(dst, threads=args.threads), val, max_top1_drop=float("inf"))
        row["fp32_top1"] = gate["fp32_top1"]
        row["int8"][method] = {k: gate[k] for k in ("int8_top1", "top1_drop", "top1_agreement", "images")}
        files[f"int8 {method}"] = dst
        print(f"  {run.name}: {method}: fp32 {gate['fp32_top1']:.2f} -> int8 {gate['int8_top1']:.2f} "
              f"(drop {gate['top1_drop']:.2f}, agreement {gate['top1_agreement']:.4f})", flush=True)
    timed = {"fp32": files["fp32"], "int8": files[f"int8 {args.methods[0]}"]}
    row["latency_ms"] = {str(b): latency(timed, info.input_shape, b, args.rounds, args.threads) for b in args.batches}
    return row


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    methods = args.methods
    lines = [f"# INT8 post-training quantization: RSD against baseline ({args.name})", "",
             f"ONNX Runtime static Q/DQ quantization, per-channel int8 weights, uint8 activations "
             f"(`ort` format), calibrated on {args.calib_samples} training images; top-1 on the whole "
             f"validation split. CPU: {cpu_model()}, {args.threads} ORT thread(s).", "",
             "| run | method | seed | fp32 top-1 | " + " | ".join(f"INT8 {m} (drop)" for m in methods)
             + " | agreement (" + methods[0] + ") |", "|---|---|---|---:|" + "---:|" * len(methods) + "---:|"]
    for r in rows:
        cells = " | ".join(f"{r['int8'][m]['int8_top1']:.2f} ({r['int8'][m]['top1_drop']:+.2f})" for m in methods)
        lines.append(f"| {Path(r['run']).name} | {r['method']} | {r['seed']} | {r['fp32_top1']:.2f} | {cells} | "
                     f"{r['int8'][methods[0]]['top1_agreement']:.4f} |")
    lines += ["", "Mean drop per method (points of top-1, fp32 minus INT8):", "",
              "| method | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    drops: dict[str, dict[str, float]] = {}
    for kind in ("rsd", "baseline"):
        mine = [r for r in rows if r["method"] == kind]
        if mine:
            drops[kind] = {m: statistics.mean(r["int8"][m]["top1_drop"] for r in mine) for m in methods}
            lines.append(f"| {kind} ({len(mine)} runs) | " + " | ".join(f"{drops[kind][m]:+.2f}" for m in methods) + " |")
    lines += ["", f"Latency of the fused model in ONNX Runtime (median ms per call, INT8 = {methods[0]} file):", "",
              "| run | batch | fp32 | INT8 | fp32/INT8 |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        for b, t in r["latency_ms"].items():
            lines.append(f"| {Path(r['run']).name} | {b} | {t['fp32']:.3f} | {t['int8']:.3f} | {t['fp32'] / t['int8']:.2f}x |")
    lines += ["", "Fused conv weights (per output channel; INT8 error: per-channel symmetric rounding, relative):", "",
              "| run | peak/rms median | p99 | max | INT8 weight error median | max |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        w = r["weights"]
        lines.append(f"| {Path(r['run']).name} | {w['channel_peak_to_rms_median']:.2f} | {w['channel_peak_to_rms_p99']:.2f} "
                     f"| {w['channel_peak_to_rms_max']:.2f} | {w['weight_int8_error_median']:.4f} | "
                     f"{w['weight_int8_error_max']:.4f} |")
    if "rsd" in drops and "baseline" in drops:
        counts = {k: sum(r["method"] == k for r in rows) for k in drops}
        agreement = {k: statistics.mean(r["int8"][methods[0]]["top1_agreement"] for r in rows if r["method"] == k)
                     for k in drops}
        lines += ["", f"**Verdict** (computed from the table): {verdict(drops, agreement, counts, methods)}"]
    return "\n".join(lines) + "\n"


#: RSD quantizes worse when its mean top-1 drop exceeds the baseline's by more than this.
WORSE_BY = 0.5


def verdict(drops: dict[str, dict[str, float]], agreement: dict[str, float], counts: dict[str, int],
            methods: list[str]) -> str:
    """Does RSD's fused network lose more top-1 in INT8 than the baseline's? One run per method
    is a hint, not an answer; the agreement with the fp32 model (first method) is stated too."""
    gaps = {m: drops["rsd"][m] - drops["baseline"][m] for m in methods}
    worse = [m for m in methods if gaps[m] > WORSE_BY]
    widest = max(methods, key=lambda m: gaps[m])
    agree = (f"top-1 agreement with the fp32 model ({methods[0]}): RSD {agreement['rsd']:.3f}, "
             f"baseline {agreement['baseline']:.3f}")
    if min(counts.values()) < 2:
        return (f"inconclusive: {min(counts.values())} run(s) of a method is a hint, not an answer. "
                f"The largest gap in mean drop, RSD - baseline, is {gaps[widest]:+.2f} points ({widest}; "
                f"worse means above {WORSE_BY:+.2f}); {agree}.")
    if worse:
        return (f"RSD's fused networks lose more top-1 in INT8 than the baseline's with {', '.join(worse)} "
                f"calibration (by more than {WORSE_BY} points on average); {agree}.")
    return (f"RSD's fused networks do not quantize worse than the baseline's: the mean drops differ by at most "
            f"{WORSE_BY} points for every calibration method (largest gap {gaps[widest]:+.2f}, {widest}); {agree}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="training run directories (RSD and baseline)")
    p.add_argument("--name", required=True, help="results are results/quantization_NAME.{json,md}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"calibration methods [{','.join(METHODS)}]")
    p.add_argument("--calib-samples", type=int, default=192)
    p.add_argument("--batches", default="1,64", help="latency batch sizes [1,64]")
    p.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds [15]")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads [2]")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    try:
        with tempfile.TemporaryDirectory(prefix="rsd-quant-") as tmp:
            rows = [measure(run, args, Path(tmp)) for run in args.runs]
    except RSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {"name": args.name, "cpu": cpu_model(), "threads": args.threads, "calib_samples": args.calib_samples,
              "methods": args.methods, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / f"quantization_{args.name}.json", result)
    text = report(rows, args)
    with atomic_path(args.out_dir / f"quantization_{args.name}.md") as tmp_md:
        tmp_md.write_text(text)
    print(text)
    print(json.dumps({"wrote": str(args.out_dir / f"quantization_{args.name}.md")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
