"""Benchmark reports: the machine it ran on, and the result as JSON, compact timings, Markdown and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path, write_json

JSON_FILE, TIMINGS_FILE, MARKDOWN_FILE, PLOT_FILE = "bench.json", "timings.json", "bench.md", "bench.png"
ROLES = ("unfused", "fused", "baseline")
#: The fused model at fp32, timed beside the three when they run at another precision (its speed-up).
FP32_ROLE = "fused_fp32"
_PACKAGES = ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "tensorrt")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def physical_cores() -> int | None:
    """Distinct (socket, core) pairs in ``/proc/cpuinfo``; None where that is unavailable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, phys = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_info() -> dict[str, Any] | None:
    """Name, compute capability, memory and driver of CUDA device 0; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                capture_output=True, text=True, timeout=10, check=True,
            )
            driver = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def library_versions() -> dict[str, str]:
    from .. import __version__

    versions = {"python": platform.python_version(), "rsd-deploy": __version__}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine_info(threads: int) -> dict[str, Any]:
    """What a reader needs to judge a timing: CPU, cores, threads used, GPU, library versions."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "available_cores": available_cores(),
        "threads": threads,
        "gpu": gpu_info(),
        "versions": library_versions(),
        "torch_precision": {
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
    }


def machine_slug(info: dict[str, Any] | None = None) -> str:
    """A folder name for a machine: the GPU when there is one, else the CPU, plus core count."""
    info = info or machine_info(available_cores())
    name = info["gpu"]["name"] if info.get("gpu") else f"{info['cpu']}-{info['available_cores']}c"
    slug = "".join(c.lower() if c.isalnum() else "-" for c in name)
    return "-".join(filter(None, slug.split("-")))


# Markdown ------------------------------------------------------------------------------

def _f(x: float) -> str:
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown report: per-model latency table, ratios, verdict, warnings."""
    m = result["machine"]
    where = f"{result['backend']} on {result['device']}"
    lines = [
        f"# {result['model']} {result['input_size'][0]}x{result['input_size'][1]}: {where}",
        "",
        f"**{result['verdict']['text']}**",
        "",
        f"Machine: {m['gpu']['name'] + ', ' if m.get('gpu') else ''}{m['cpu']}, "
        f"{m['available_cores']} cores, {result['threads']} threads; precision {result['precision']}"
        + (f", {_calibration_text(result['calibration'])}" if result.get("calibration") else "") + ".",
        "",
        "| batch | model | median ms | 95% CI | mean | p90 | p99 | min | std | images/s |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in result["results"]:
        for role in entry["models"]:
            s, ci = entry["models"][role], entry["median_ci_ms"][role]
            lines.append(
                f"| {entry['batch']} | {role} | {_f(s['median_ms'])} | {_f(ci['lo'])}-{_f(ci['hi'])} | "
                f"{_f(s['mean_ms'])} | {_f(s['p90_ms'])} | {_f(s['p99_ms'])} | {_f(s['min_ms'])} | "
                f"{_f(s['std_ms'])} | {s['throughput_ips']:.1f} |"
            )
    speedup = f"{FP32_ROLE}/fused"
    timed_fp32 = any(speedup in e["ratios"] for e in result["results"])
    head = f" {result['precision']} speed-up of fused, fp32/{result['precision']} (95% CI) |" if timed_fp32 else ""
    lines += ["", f"| batch | rounds | unfused/fused (95% CI) | fused/baseline (95% CI) |{head} verdict |",
              "|---:|---:|---|---|" + ("---|" if timed_fp32 else "") + "---|"]
    for entry in result["results"]:
        uf, fb = entry["ratios"]["unfused/fused"], entry["ratios"]["fused/baseline"]
        sp = entry["ratios"].get(speedup)
        cell = f" {sp['value']:.2f}x ({sp['lo']:.2f}-{sp['hi']:.2f}) |" if sp else ""
        lines.append(
            f"| {entry['batch']} | {entry['rounds']} | {uf['value']:.2f}x ({uf['lo']:.2f}-{uf['hi']:.2f}) | "
            f"{fb['value']:.3f} ({fb['lo']:.3f}-{fb['hi']:.3f}) |{cell} {entry['verdict']['status']} |"
        )
    warnings = [f"batch {e['batch']}: {w}" for e in result["results"] for w in e["warnings"]]
    if warnings:
        lines += ["", "Warnings:", *[f"- {w}" for w in warnings]]
    lines += ["", "Models:", *[f"- {r}: {info['description']}" for r, info in result["models"].items()], ""]
    return "\n".join(lines)


def _calibration_text(cal: dict[str, Any]) -> str:
    return f"int8 {cal['format']} format, {cal['method']} calibration on {cal['images']}"


# Chart ---------------------------------------------------------------------------------

def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """A PNG bar chart: median latency per model and batch size, error bars the 95% CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = result["results"]
    fig = Figure(figsize=(3.2 * len(entries) + 0.8, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(entries), squeeze=False)[0]
    colors = {"unfused": "#c44e52", "fused": "#4c72b0", "baseline": "#8c8c8c", FP32_ROLE: "#a6bddb"}
    for ax, entry in zip(axes, entries, strict=True):
        roles = list(entry["models"])
        med = [entry["models"][r]["median_ms"] for r in roles]
        ci = [entry["median_ci_ms"][r] for r in roles]
        err = [[max(0.0, m - c["lo"]) for m, c in zip(med, ci, strict=True)],
               [max(0.0, c["hi"] - m) for m, c in zip(med, ci, strict=True)]]
        ax.bar(roles, med, yerr=err, capsize=4, color=[colors[r] for r in roles])
        uf, fb = entry["ratios"]["unfused/fused"]["value"], entry["ratios"]["fused/baseline"]["value"]
        ax.set_title(f"batch {entry['batch']}\nunfused/fused {uf:.2f}x, fused/base {fb:.3f}", fontsize=9)
        ax.set_ylabel("median latency (ms)")
    fig.suptitle(f"{result['model']}: {result['backend']} on {result['device']} "
                 "(bars: median; error bars: its 95% CI)", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


# Timings ---------------------------------------------------------------------------------

TIMINGS_SCHEMA = "rsd-deploy/bench-timings/2"
#: Percentile levels of all calls kept per model and batch size: 0, 1, ..., 100.
TIMINGS_LEVELS = tuple(range(101))


def _ms5(x: float) -> float:
    return round(float(x), 5)  # 10 ns: the resolution the raw timings are taken to


def compact_timings(timings: dict[str, Any]) -> dict[str, Any]:
    """The per-call timings reduced to what a re-analysis needs, a few tens of KB at most.

    ``timings`` is ``{"unit": "ms", "batches": {batch: {model: rounds}}}``, ``rounds``
    one list of call times (ms) per round of the interleaved schedule. Kept per batch
    size and model, in columns with one entry per round: the number of calls and their
    median (the per-round ratios and their bootstrap intervals use exactly these); and
    the percentiles 0, 1, ..., 100 of all its calls (min, quartiles, median, p90, p99,
    max). A round of one call (``--iters``, or calls that take longer than a round)
    keeps that call as it is.
    """
    batches = {}
    for batch, per_model in timings["batches"].items():
        batches[batch] = {}
        for role, rounds in per_model.items():
            calls = np.concatenate([np.asarray(r, dtype=np.float64) for r in rounds])
            batches[batch][role] = {
                "calls": [len(r) for r in rounds],
                "median": [_ms5(np.median(r)) for r in rounds],
                "percentiles": [_ms5(v) for v in np.percentile(calls, TIMINGS_LEVELS, method="linear")],
            }
    return {
        "schema": TIMINGS_SCHEMA,
        "unit": timings.get("unit", "ms"),
        "layout": "batches[batch][model]: calls and median of each round of the interleaved schedule "
                  "(one entry per round), percentiles 0, 1, ..., 100 of all its calls",
        "batches": batches,
    }


def write_report(result: dict[str, Any], timings: dict[str, Any], out: str | os.PathLike) -> dict[str, str]:
    """Write JSON, compact timings (:func:`compact_timings`), Markdown and chart into ``out``.

    Returns the paths written.
    """
    out = Path(out)
    paths = {k: str(out / f) for k, f in
             (("json", JSON_FILE), ("timings", TIMINGS_FILE), ("markdown", MARKDOWN_FILE), ("plot", PLOT_FILE))}
    write_json(paths["json"], result)
    with atomic_path(paths["timings"]) as tmp:
        tmp.write_text(json.dumps(compact_timings(timings), separators=(",", ":")) + "\n")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown(result))
    plot(result, paths["plot"])
    return paths
