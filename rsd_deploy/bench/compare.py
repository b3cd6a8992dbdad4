"""The comparison behind ``rsd-deploy bench``: unfused RSD vs fused RSD vs the plain baseline.

:func:`bench_run` loads a training run, prepares the three models for the chosen
backend, times them in interleaved rounds at each batch size, and writes the
report. With ONNX Runtime and TensorRT the fused model is the artifact that
``fuse-export`` wrote and verified (``RUN_DIR/deploy/model.onnx`` or
``model.engine``, or those in another export folder), refused unless that export was
made from the run's current weights; the unfused model and the baseline are exported
or built here, with the same settings (opset, batch axis, engine profile, precision),
into a temporary folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import run as runs
from ..complexity import count_macs, count_params
from ..errors import RSDError
from ..fuse import fuse_model
from ..schema import to_json
from . import backends, stats
from .report import ROLES, available_cores, machine_info, write_report
from .runner import Budget, Timer, measure

DEPLOY_DIR = "deploy"
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
BENCH_DIR = "bench"
DEFAULT_BATCH_SIZES = (1, 64)
Progress = Callable[[str], None]


@dataclass
class Subject:
    """One model under test: how it was made, and what the backend loads."""

    role: str
    description: str
    module: nn.Module  # the PyTorch form (always kept: parameter and MAC counts come from it)
    artifact: Path | None = None  # the ONNX file or engine for --ort / --trt


# Input checks -----------------------------------------------------------------------------

def parse_batch_sizes(text: str | Iterable[int]) -> list[int]:
    """``"1,64"`` (or a sequence of ints) -> sorted distinct positive batch sizes."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        sizes = sorted({int(str(s).strip()) for s in items if str(s).strip()})
    except ValueError:
        raise RSDError(f"batch sizes must be comma-separated integers (got {text!r})") from None
    if not sizes or sizes[0] < 1:
        raise RSDError(f"batch sizes must be positive integers (got {text!r})")
    return sizes


def _check_backend(backend: str, device: str | None) -> str:
    if backend not in backends.BACKENDS:
        raise RSDError(f"unknown backend {backend!r}; choose from: {', '.join(backends.BACKENDS)}")
    device = device or ("cuda" if backend == "trt" else "cpu")
    if device not in backends.DEVICES:
        raise RSDError(f"unknown device {device!r}; choose from: {', '.join(backends.DEVICES)}")
    if backend == "trt" and device != "cuda":
        raise RSDError("TensorRT runs on CUDA only: drop --device cpu")
    return device


def _read_training_run(run_dir: Path) -> runs.RunInfo:
    info = runs.read_run(run_dir)
    if info.form != "rsd":
        raise RSDError(
            f"{run_dir} holds a {info.form!r}-form model; bench compares an RSD training run "
            "(form 'rsd') against its fused form and a plain baseline"
        )
    return info


def trt_profile(deploy_dir: Path, run_dir: Path, batch_sizes: Sequence[int]) -> runs.TensorRTProfile:
    """The engine profile of the export in ``deploy_dir`` (made from ``run_dir``'s weights),
    checked against ``batch_sizes``.

    Needs no TensorRT, so a batch size the engine cannot run is refused up front.
    """
    engine = deploy_dir / ENGINE_FILE
    if not engine.is_file():
        raise RSDError(
            f"no TensorRT engine at {engine}: build one with `rsd-deploy fuse-export RUN_DIR --onnx --trt`"
        )
    profile = runs.check_made_from(deploy_dir, run_dir).tensorrt
    if profile is None:
        keys = ", ".join(f.name for f in dataclasses.fields(runs.TensorRTProfile))
        raise RSDError(f"{deploy_dir / runs.RUN_FILE} has no complete 'tensorrt' profile ({keys})")
    lo, hi = profile.min_batch, profile.max_batch
    outside = [b for b in batch_sizes if not lo <= b <= hi]
    if outside:
        raise RSDError(
            f"batch size {outside[-1]} is outside the engine's profile ({lo} to {hi}); "
            f"rebuild with `rsd-deploy fuse-export RUN_DIR --onnx --trt --max-batch {outside[-1]}` "
            f"or pass --batch-sizes within {lo}-{hi}"
        )
    if profile.precision not in ("fp32", "fp16"):
        raise RSDError(f"unknown TensorRT precision {profile.precision!r} in {deploy_dir / runs.RUN_FILE}")
    return profile


def onnx_settings(path: Path, input_shape: tuple[int, int, int]) -> tuple[int, int | None]:
    """``(opset, fixed batch or None)`` of an exported model, checked against the run's input shape."""
    import onnx

    if not path.is_file():
        raise RSDError(
            f"no exported ONNX at {path}: export first with `rsd-deploy fuse-export RUN_DIR --onnx`"
        )
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own decode errors
        raise RSDError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not proto.graph.input:
        raise RSDError(f"{path} has no default-domain opset or no input")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or tuple(shape[1:]) != tuple(input_shape):
        raise RSDError(f"{path} takes input {shape}, but the run's models take (N, {', '.join(map(str, input_shape))})")
    return int(opset), shape[0]


# The three models ---------------------------------------------------------------------------

def _baseline(info: runs.RunInfo, baseline_dir: Path | None) -> Subject:
    if baseline_dir is None:
        module = fuse_model(info.build_model(form="plain").eval())
        return Subject("baseline", f"plain {info.model}, BatchNorm folded (random weights: "
                       "latency does not depend on them)", module)
    model, binfo = runs.load_run(baseline_dir)
    ours, theirs = info.to_json(), binfo.to_json()
    for key in ("model", "num_classes", "in_channels", "input_size"):
        if theirs[key] != ours[key]:
            raise RSDError(f"baseline run {baseline_dir} has {key} {theirs[key]!r}, the RSD run has {ours[key]!r}")
    if binfo.form == "rsd":
        raise RSDError(f"baseline run {baseline_dir} is an RSD run; give a plain (baseline-trained) run")
    module = fuse_model(model) if binfo.form == "plain" else model
    return Subject("baseline", f"baseline run {baseline_dir} ({binfo.form} form, BatchNorm folded)", module)


def _subjects(run_dir: Path, info: runs.RunInfo, baseline_dir: Path | None) -> dict[str, Subject]:
    unfused, _ = runs.load_run(run_dir)
    return {
        "unfused": Subject("unfused", f"RSD training form of {run_dir} (multi-branch, eval mode)", unfused),
        "fused": Subject("fused", f"{run_dir} fused in-process with rsd_deploy.fuse_model", fuse_model(unfused)),
        "baseline": _baseline(info, baseline_dir),
    }


def _export_others(subjects: dict[str, Subject], tmp: Path, input_shape, opset: int, batch: int | None) -> None:
    from ..onnx import export_onnx

    for role in ("unfused", "baseline"):
        path = tmp / f"{role}.onnx"
        export_onnx(subjects[role].module, path, input_shape=input_shape, batch=batch, opset=opset)
        subjects[role].artifact = path
        subjects[role].description += f"; exported here (opset {opset}, batch {batch or 'dynamic'})"


def _require_trt_module():
    trt_mod = importlib.import_module("rsd_deploy.tensorrt")  # looked up at call time (tests swap it)
    trt_mod.require_tensorrt()
    return trt_mod


# The measurement ----------------------------------------------------------------------------

def _overall(entries: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = [e["verdict"]["status"] for e in entries]
    status = next((s for s in ("overhead", "inconclusive") if s in statuses), "no_overhead")
    text = "; ".join(f"batch {e['batch']}: {e['verdict']['text']}" for e in entries)
    return {"status": status, "text": text}


def _analyse(batch: int, rounds: dict[str, list[list[float]]]) -> dict[str, Any]:
    reps = stats.bootstrap_medians(rounds)
    medians = stats.median_intervals(rounds, reps)
    uf = stats.ratio_interval(rounds, "unfused", "fused")
    fb = stats.ratio_interval(rounds, "fused", "baseline")
    return {
        "batch": batch,
        "rounds": len(rounds["fused"]),
        "models": {r: stats.summarize([t for rnd in rounds[r] for t in rnd], batch) for r in ROLES},
        "median_ci_ms": {r: {k: v * 1e3 for k, v in medians[r].to_json().items() if k != "level"} for r in ROLES},
        "ratios": {"unfused/fused": uf.to_json(), "fused/baseline": fb.to_json()},
        "verdict": stats.verdict(fb),
        "warnings": stats.instability(rounds, fb),
    }


def _load(backend: str, subjects: dict[str, Subject], device: str, threads: int) -> dict[str, Any]:
    """Each subject loaded for the backend: the module, an ONNX Runtime session or a TensorRT runner."""
    if backend == "torch":
        return {r: s.module for r, s in subjects.items()}
    if backend == "ort":
        return {r: backends.ort_load(s.artifact, device, threads) for r, s in subjects.items()}
    return {r: backends.trt_load(s.artifact) for r, s in subjects.items()}


def _backend_settings(backend: str, loaded: Any, device: str) -> dict[str, Any]:
    """What the backend ran with, beyond the machine: providers and their options (TF32!), cuDNN."""
    if backend == "ort":
        opts = loaded.get_session_options()
        return {"onnxruntime_providers": loaded.get_providers(),
                "provider_options": loaded.get_provider_options(),
                "graph_optimization": str(opts.graph_optimization_level),
                "intra_op_threads": opts.intra_op_num_threads}
    if backend == "torch":
        return {"cudnn_benchmark": device == "cuda", "inference_mode": True}
    return {}


def _timer(backend: str, loaded: Any, batch: int, input_shape, device: str) -> Timer:
    if backend == "torch":
        return backends.torch_timer(loaded, batch, input_shape, device)
    if backend == "ort":
        return backends.ort_timer(loaded, batch, input_shape, device)
    return backends.trt_timer(loaded, batch, input_shape)


def bench_run(
    run_dir: str | os.PathLike,
    backend: str,
    *,
    device: str | None = None,
    baseline: str | os.PathLike | None = None,
    deploy: str | os.PathLike | None = None,
    batch_sizes: str | Sequence[int] = DEFAULT_BATCH_SIZES,
    budget: Budget | None = None,
    threads: int | None = None,
    out: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Benchmark an RSD run's unfused, fused and baseline models; write and return the report.

    ``backend``: "torch", "ort" or "trt"; ``device``: "cpu" or "cuda" (default: cuda
    for TensorRT, else cpu). ``threads``: CPU intra-op threads (default: every core
    this process may use). ``deploy``: the fuse-export folder of the run (default
    ``RUN_DIR/deploy``) whose artifact ONNX Runtime or TensorRT times; it must have been
    made from the run's current weights. The report goes to ``out`` (default ``RUN_DIR/bench``);
    the returned dict is ``bench.json``'s content plus ``"files"``, the paths written.
    """
    run_dir = Path(run_dir)
    device = _check_backend(backend, device)
    sizes = parse_batch_sizes(batch_sizes)
    budget = budget or Budget()
    if threads is not None and threads < 1:
        raise RSDError(f"--threads must be positive (got {threads})")
    threads = threads or available_cores()
    info = _read_training_run(run_dir)
    deploy_dir = Path(deploy) if deploy is not None else run_dir / DEPLOY_DIR
    input_shape = info.input_shape
    precision = "fp32"

    # Check everything a user can get wrong before the slow work starts.
    fixed_batch, opset, profile = None, None, None
    if backend == "ort":
        opset, fixed_batch = onnx_settings(deploy_dir / ONNX_FILE, input_shape)
        if fixed_batch is not None and sizes != [fixed_batch]:
            raise RSDError(
                f"{deploy_dir / ONNX_FILE} was exported for batch {fixed_batch} only; "
                f"pass --batch-sizes {fixed_batch} or re-export with a dynamic batch"
            )
        runs.check_made_from(deploy_dir, run_dir)
    elif backend == "trt":
        profile = trt_profile(deploy_dir, run_dir, sizes)
        precision = profile.precision
    # TensorRT's own check says how to get it (and checks CUDA); the others need CUDA only.
    trt_mod = _require_trt_module() if backend == "trt" else None
    if device == "cuda":
        backends.require_cuda()
    baseline_dir = Path(baseline) if baseline is not None else None

    say = progress or (lambda _msg: None)
    say(f"loading {run_dir} ({info.model}) and building the three models")
    subjects = _subjects(run_dir, info, baseline_dir)
    model_info = {
        r: {"description": s.description, "params": count_params(s.module),
            "macs_per_image": count_macs(s.module, input_shape)}
        for r, s in subjects.items()
    }

    with tempfile.TemporaryDirectory(prefix="rsd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if backend in ("ort", "trt"):
            if opset is None:  # TensorRT: export the others like the fused ONNX when it is there
                fused_onnx = deploy_dir / ONNX_FILE
                opset = onnx_settings(fused_onnx, input_shape)[0] if fused_onnx.is_file() else None
            say("exporting the unfused model and the baseline to ONNX")
            from ..onnx import DEFAULT_OPSET

            _export_others(subjects, tmp, input_shape, opset or DEFAULT_OPSET, fixed_batch)
            subjects["fused"].artifact = deploy_dir / ONNX_FILE
            subjects["fused"].description = f"{deploy_dir / ONNX_FILE}, the exported fused model"
        if backend == "trt":
            say("building TensorRT engines for the unfused model and the baseline")
            for role in ("unfused", "baseline"):
                engine = tmp / f"{role}.engine"
                trt_mod.build_engine(
                    subjects[role].artifact, engine, input_shape=input_shape,
                    min_batch=profile.min_batch, opt_batch=profile.opt_batch,
                    max_batch=profile.max_batch, fp16=precision == "fp16",
                )
                subjects[role].artifact = engine
                subjects[role].description += f"; engine built here ({precision}, same profile)"
            subjects["fused"].artifact = deploy_dir / ENGINE_FILE
            subjects["fused"].description = f"{deploy_dir / ENGINE_FILE}, the exported fused engine"
        for r in ROLES:
            model_info[r]["description"] = subjects[r].description

        entries, timings = [], {}
        with backends.torch_settings(threads, device):
            loaded = _load(backend, subjects, device, threads)
            settings = _backend_settings(backend, loaded["fused"], device)
            for batch in sizes:
                say(f"batch {batch}: timing {', '.join(ROLES)} in interleaved rounds")
                timers = {r: _timer(backend, loaded[r], batch, input_shape, device) for r in ROLES}
                rounds = measure(timers, budget, progress=lambda m, b=batch: say(f"batch {b}: {m}"))
                entry = _analyse(batch, rounds)
                entries.append(entry)
                timings[str(batch)] = {r: [[round(t * 1e3, 5) for t in rnd] for rnd in rounds[r]] for r in ROLES}
                say(f"batch {batch}: {entry['verdict']['text']}")

    result = {
        "schema": "rsd-deploy/bench/1",
        "run_dir": str(run_dir),
        "model": str(info.model),
        "deploy_dir": str(deploy_dir) if backend in ("ort", "trt") else None,
        "input_size": info.input_size,
        "in_channels": info.in_channels,
        "num_classes": info.num_classes,
        "backend": backend,
        "device": device,
        "threads": threads,
        "precision": precision,
        "tensorrt_profile": to_json(profile),
        "backend_settings": settings,
        "budget": budget.to_json(),
        "batch_sizes": sizes,
        "models": model_info,
        "results": entries,
        "verdict": _overall(entries),
        "machine": machine_info(threads),
        "timings_unit": "ms",
    }
    out_dir = Path(out) if out is not None else run_dir / BENCH_DIR
    result["files"] = write_report(result, {"unit": "ms", "batches": timings}, out_dir)
    return result
