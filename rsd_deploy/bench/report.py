"""Benchmark reports: the machine it ran on, and the result as JSON, Markdown and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path, write_json

JSON_FILE, TIMINGS_FILE, MARKDOWN_FILE, PLOT_FILE = "bench.json", "timings.json", "bench.md", "bench.png"
ROLES = ("unfused", "fused", "baseline")
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
        f"{m['available_cores']} cores, {result['threads']} threads; precision {result['precision']}.",
        "",
        "| batch | model | median ms | 95% CI | mean | p90 | p99 | min | std | images/s |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in result["results"]:
        for role in ROLES:
            s, ci = entry["models"][role], entry["median_ci_ms"][role]
            lines.append(
                f"| {entry['batch']} | {role} | {_f(s['median_ms'])} | {_f(ci['lo'])}-{_f(ci['hi'])} | "
                f"{_f(s['mean_ms'])} | {_f(s['p90_ms'])} | {_f(s['p99_ms'])} | {_f(s['min_ms'])} | "
                f"{_f(s['std_ms'])} | {s['throughput_ips']:.1f} |"
            )
    lines += ["", "| batch | rounds | unfused/fused (95% CI) | fused/baseline (95% CI) | verdict |",
              "|---:|---:|---|---|---|"]
    for entry in result["results"]:
        uf, fb = entry["ratios"]["unfused/fused"], entry["ratios"]["fused/baseline"]
        lines.append(
            f"| {entry['batch']} | {entry['rounds']} | {uf['value']:.2f}x ({uf['lo']:.2f}-{uf['hi']:.2f}) | "
            f"{fb['value']:.3f} ({fb['lo']:.3f}-{fb['hi']:.3f}) | {entry['verdict']['status']} |"
        )
    warnings = [f"batch {e['batch']}: {w}" for e in result["results"] for w in e["warnings"]]
    if warnings:
        lines += ["", "Warnings:", *[f"- {w}" for w in warnings]]
    lines += ["", "Models:", *[f"- {r}: {result['models'][r]['description']}" for r in ROLES], ""]
    return "\n".join(lines)


# Chart ---------------------------------------------------------------------------------

def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """A PNG bar chart: median latency per model and batch size, error bars the 95% CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = result["results"]
    fig = Figure(figsize=(3.2 * len(entries) + 0.8, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(entries), squeeze=False)[0]
    colors = {"unfused": "#c44e52", "fused": "#4c72b0", "baseline": "#8c8c8c"}
    for ax, entry in zip(axes, entries, strict=True):
        med = [entry["models"][r]["median_ms"] for r in ROLES]
        ci = [entry["median_ci_ms"][r] for r in ROLES]
        err = [[max(0.0, m - c["lo"]) for m, c in zip(med, ci, strict=True)],
               [max(0.0, c["hi"] - m) for m, c in zip(med, ci, strict=True)]]
        ax.bar(ROLES, med, yerr=err, capsize=4, color=[colors[r] for r in ROLES])
        uf, fb = entry["ratios"]["unfused/fused"]["value"], entry["ratios"]["fused/baseline"]["value"]
        ax.set_title(f"batch {entry['batch']}\nunfused/fused {uf:.2f}x, fused/base {fb:.3f}", fontsize=9)
        ax.set_ylabel("median latency (ms)")
    fig.suptitle(f"{result['model']}: {result['backend']} on {result['device']} "
                 "(bars: median; error bars: its 95% CI)", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_report(result: dict[str, Any], timings: dict[str, Any], out: str | os.PathLike) -> dict[str, str]:
    """Write JSON, raw timings, Markdown and chart into ``out``; returns the paths written."""
    out = Path(out)
    paths = {k: str(out / f) for k, f in
             (("json", JSON_FILE), ("timings", TIMINGS_FILE), ("markdown", MARKDOWN_FILE), ("plot", PLOT_FILE))}
    write_json(paths["json"], result)
    with atomic_path(paths["timings"]) as tmp:  # compact: it can hold many thousands of numbers
        tmp.write_text(json.dumps(timings, separators=(",", ":")) + "\n")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown(result))
    plot(result, paths["plot"])
    return paths
