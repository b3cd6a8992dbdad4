"""The comparison behind ``rsd-deploy bench``: unfused RSD vs fused RSD vs the plain baseline.

:func:`bench_run` loads a training run, prepares the three models for the chosen
backend, times them in interleaved rounds at each batch size, and writes the
report. Backends come from :mod:`rsd_deploy.backends` by name. When a backend
has a deploy file (ONNX Runtime: ``RUN_DIR/deploy/model.onnx``, TensorRT:
``model.engine``) the fused model is that artifact, which ``fuse-export`` wrote and
verified; the unfused model and the baseline are made here, with the settings the
backend reads from it (opset, batch axis, engine profile, precision), into a
temporary folder.

``precision`` (default: the deploy artifact's, fp32 for ONNX Runtime) times the three
models at fp16 or int8: each is made here the same way (one :class:`ArtifactSpec`: for
int8 the same calibration images of the run's training split, the same method, the
backend's Q/DQ format), so fused/baseline stays a fair comparison; a deploy artifact of
that precision (a TensorRT int8 engine) is the fused model, as in fp32, and the others
are quantized with the settings its ``run.json`` records. The fused model at fp32 is
timed too, interleaved with the others (``fused_fp32``), for the fused model's speed-up
over fp32 (``ratios["fused_fp32/fused"]``).

:func:`bench_run` is four steps over one :class:`Bench` record: :func:`check_inputs`
(everything a user can get wrong, before any slow work), :func:`build_models`,
:func:`time_models` and :func:`result_record`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .. import run as runs
from ..backends import ArtifactSpec, get_backend, make_artifact
from ..backends.base import check_device, check_precision
from ..complexity import count_macs, count_params
from ..errors import RSDError, option
from ..fuse import fuse_model
from ..quantize import DEFAULT_CALIB_SAMPLES, DEFAULT_METHOD, MIN_OPSET, Calibration, calibrate
from . import stats, timing
from .report import FP32_ROLE, available_cores, machine_info, write_report
from .runner import Budget, measure

DEPLOY_DIR = "deploy"
DEFAULT_BATCH_SIZES = (1, 64)
BENCH_DIR = "bench"

log = logging.getLogger(__name__)


@dataclass
class Subject:
    """One model under test: how it was made, and what the backend loads."""

    role: str
    description: str
    module: nn.Module  # the PyTorch form (always kept: parameter and MAC counts come from it)
    artifact: Any = None  # what the backend loads: the module, an ONNX file, an engine


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


def _check_device(backend: ModuleType, device: str | None) -> str:
    device = device or backend.DEVICES[0]  # the backend's default device is listed first
    check_device(backend, device)
    return device


def _read_training_run(run_dir: Path) -> runs.RunInfo:
    info = runs.read_run(run_dir)
    if info.form != "rsd":
        raise RSDError(
            f"{run_dir} holds a {info.form!r}-form model; bench compares an RSD training run "
            "(form 'rsd') against its fused form and a plain baseline"
        )
    return info


# The three models ---------------------------------------------------------------------------

def _baseline(info: runs.RunInfo, baseline_dir: Path | None) -> Subject:
    if baseline_dir is None:
        module = fuse_model(info.build_model(form="plain").eval())
        return Subject("baseline", f"plain {info.model}, BatchNorm folded (random weights: latency does "
                       "not depend on their values)", module)
    model, binfo = runs.load_run(baseline_dir)
    ours, theirs = info.to_json(), binfo.to_json()
    for key in ("model", "num_classes", "in_channels", "input_size"):
        if theirs[key] != ours[key]:
            raise RSDError(f"baseline run {baseline_dir} has {key} {theirs[key]!r}, the RSD run has {ours[key]!r}")
    if binfo.form == "rsd":
        raise RSDError(f"baseline run {baseline_dir} is an RSD run; give a plain (baseline-trained) run")
    module = fuse_model(model) if binfo.form == "plain" else model
    return Subject("baseline", f"baseline run {baseline_dir} ({binfo.form} form, BatchNorm folded)", module)


def _subjects(run_dir: Path, info: runs.RunInfo, baseline_dir: Path | None, precision: str) -> dict[str, Subject]:
    """The three models; a precision other than fp32 adds the fused model at fp32 (its speed-up)."""
    unfused, _ = runs.load_run(run_dir)
    fused = fuse_model(unfused)
    subjects = {
        "unfused": Subject("unfused", f"RSD training form of {run_dir} (multi-branch, eval mode)", unfused),
        "fused": Subject("fused", f"{run_dir} fused in-process with rsd_deploy.fuse_model", fused),
        "baseline": _baseline(info, baseline_dir),
    }
    if precision != "fp32":
        subjects[FP32_ROLE] = Subject(FP32_ROLE, f"the fused model at fp32, for the {precision} speed-up", fused)
    return subjects


def _role_spec(role: str, spec: ArtifactSpec) -> ArtifactSpec:
    """The spec a model is made with: ``spec``, but fp32 for the fused model's fp32 reference."""
    return replace(spec, precision="fp32", calibration=None) if role == FP32_ROLE else spec


def _make_artifacts(backend: ModuleType, subjects: dict[str, Subject], deploy_dir: Path, tmp: Path,
                    spec: ArtifactSpec, deployed_precision: str) -> None:
    """Set what the backend loads for each model: for the fused one the deploy folder's file
    when the backend has one of its precision; otherwise an artifact made here from the
    module with ``spec`` (the fp32 reference: at fp32)."""
    for role, subject in subjects.items():
        role_spec = _role_spec(role, spec)
        if role in ("fused", FP32_ROLE) and backend.FILE is not None and role_spec.precision == deployed_precision:
            subject.artifact = deploy_dir / backend.FILE
            subject.description = f"{subject.artifact}, the fused model fuse-export wrote and verified"
            continue
        subject.artifact = make_artifact(backend, subject.module, tmp, role, role_spec)
        if backend.FILE is not None:
            subject.description += f"; made here like the others ({role_spec.describe()})"


def _calibration(backend: ModuleType, info: runs.RunInfo, deploy_dir: Path, deployed_precision: str) -> Calibration:
    """The calibration every int8 model of the comparison is quantized with: the settings the
    deploy folder's int8 file was made with when its artifact is int8 (a TensorRT int8 engine),
    else the defaults in the backend's Q/DQ format; images of the run's training split."""
    onnx_info = runs.read_run(deploy_dir).onnx if deployed_precision == "int8" else None
    recorded = onnx_info.int8 if onnx_info is not None else None
    if recorded is not None:
        return calibrate(info.data, recorded.calib_samples, recorded.calib_method, recorded.format)
    return calibrate(info.data, DEFAULT_CALIB_SAMPLES, DEFAULT_METHOD, getattr(backend, "INT8_FORMAT", "ort"))


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
    ratios = {"unfused/fused": uf.to_json(), "fused/baseline": fb.to_json()}
    if FP32_ROLE in rounds:  # the fused model's speed-up over fp32 (> 1: faster)
        ratios[f"{FP32_ROLE}/fused"] = stats.ratio_interval(rounds, FP32_ROLE, "fused").to_json()
    return {
        "batch": batch,
        "rounds": len(rounds["fused"]),
        "models": {r: stats.summarize([t for rnd in rounds[r] for t in rnd], batch) for r in rounds},
        "median_ci_ms": {r: {k: v * 1e3 for k, v in medians[r].to_json().items() if k != "level"} for r in rounds},
        "ratios": ratios,
        "verdict": stats.verdict(fb),
        "warnings": stats.instability(rounds, fb),
    }


@dataclass
class Bench:
    """One benchmark: its checked inputs, and what the steps made (models, timings)."""

    run_dir: Path
    backend_name: str
    backend: ModuleType
    device: str
    sizes: list[int]
    budget: Budget
    threads: int
    info: runs.RunInfo
    deploy_dir: Path
    spec: ArtifactSpec  #: how the models are made, at the precision timed
    baseline_dir: Path | None
    deployed_precision: str = "fp32"  #: the precision of the deploy folder's artifact
    subjects: dict[str, Subject] | None = None
    model_info: dict[str, dict[str, Any]] | None = None
    entries: list[dict[str, Any]] | None = None
    timings: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None


def check_inputs(run_dir: Path, backend: str, device: str | None, baseline: str | os.PathLike | None,
                 deploy: str | os.PathLike | None, batch_sizes: str | Sequence[int], budget: Budget | None,
                 threads: int | None, precision: str | None = None) -> Bench:
    """Check everything a user can get wrong before the slow work starts.

    The deploy artifact (needs no backend library) and that it was made from the run's
    current weights come before the backend itself (which says how to get it); int8's
    calibration images (the run's training split) are loaded here, so a run whose data
    set is not here is refused before anything is timed.
    """
    be = get_backend(backend)
    device = _check_device(be, device)
    sizes = parse_batch_sizes(batch_sizes)
    budget = budget or Budget()
    if threads is not None and threads < 1:
        raise RSDError(f"{option('threads')} must be positive (got {threads})")
    threads = threads or available_cores()
    info = _read_training_run(run_dir)
    deploy_dir = Path(deploy) if deploy is not None else run_dir / DEPLOY_DIR
    if precision is not None:
        check_precision(be, precision)
    spec = be.deployed(deploy_dir, info.input_shape, sizes)
    if be.FILE is not None:
        runs.check_made_from(deploy_dir, run_dir)
    deployed_precision = spec.precision
    precision = precision or deployed_precision
    if precision == "int8" and spec.opset < MIN_OPSET:
        raise RSDError(f"int8 models (per-channel Q/DQ) need opset {MIN_OPSET} or later; {deploy_dir} was "
                       f"exported at opset {spec.opset}: re-export it with {option('opset')} {MIN_OPSET}")
    calibration = _calibration(be, info, deploy_dir, deployed_precision) if precision == "int8" else None
    spec = replace(spec, precision=precision, calibration=calibration)
    be.available(device).require()
    baseline_dir = Path(baseline) if baseline is not None else None
    return Bench(run_dir, backend, be, device, sizes, budget, threads, info, deploy_dir, spec, baseline_dir,
                 deployed_precision)


def build_models(b: Bench) -> None:
    """The three models in PyTorch, with their parameter and MAC counts."""
    log.info(f"loading {b.run_dir} ({b.info.model}) and building the three models")
    b.subjects = _subjects(b.run_dir, b.info, b.baseline_dir, b.spec.precision)
    b.model_info = {
        r: {"description": s.description, "params": count_params(s.module),
            "macs_per_image": count_macs(s.module, b.info.input_shape)}
        for r, s in b.subjects.items()
    }


def time_models(b: Bench) -> None:
    """Make what the backend loads, load it, and time the three models at every batch size."""
    be = b.backend
    with tempfile.TemporaryDirectory(prefix="rsd-bench-") as tmp_name:
        if be.FILE is not None:
            log.info(f"making the models {be.LABEL} times ({b.spec.describe()})")
        _make_artifacts(be, b.subjects, b.deploy_dir, Path(tmp_name), b.spec, b.deployed_precision)
        roles = list(b.subjects)
        for r in roles:
            b.model_info[r]["description"] = b.subjects[r].description
        b.entries, b.timings = [], {}
        with timing.torch_settings(b.threads, b.device):
            runners = {r: be.load(s.artifact, device=b.device, precision=_role_spec(r, b.spec).precision,
                                  threads=b.threads)
                       for r, s in b.subjects.items()}
            b.settings = runners["fused"].settings()
            for batch in b.sizes:
                log.info(f"batch {batch}: timing {', '.join(roles)} in interleaved rounds")
                timers = {r: timing.runner_timer(runners[r], batch, b.info.input_shape) for r in roles}
                rounds = measure(timers, b.budget, label=f"batch {batch}")
                entry = _analyse(batch, rounds)
                b.entries.append(entry)
                b.timings[str(batch)] = {r: [[round(t * 1e3, 5) for t in rnd] for rnd in rounds[r]] for r in roles}
                log.info(f"batch {batch}: {entry['verdict']['text']}")


def result_record(b: Bench) -> dict[str, Any]:
    """``bench.json``'s content."""
    spec, info = b.spec, b.info
    profile = None
    if spec.profile is not None:
        profile = dict(zip(("min_batch", "opt_batch", "max_batch"), spec.profile, strict=True),
                       precision=spec.precision)
    return {
        "schema": "rsd-deploy/bench/1",
        "run_dir": str(b.run_dir),
        "model": str(info.model),
        "deploy_dir": str(b.deploy_dir) if b.backend.FILE is not None else None,
        "input_size": info.input_size,
        "in_channels": info.in_channels,
        "num_classes": info.num_classes,
        "backend": b.backend_name,
        "device": b.device,
        "threads": b.threads,
        "precision": spec.precision,
        "calibration": spec.calibration.to_json() if spec.calibration is not None else None,
        "tensorrt_profile": profile,
        "backend_settings": b.settings,
        "budget": b.budget.to_json(),
        "batch_sizes": b.sizes,
        "models": b.model_info,
        "results": b.entries,
        "verdict": _overall(b.entries),
        "machine": machine_info(b.threads),
        "timings_unit": "ms",
    }


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
    precision: str | None = None,
) -> dict[str, Any]:
    """Benchmark an RSD run's unfused, fused and baseline models; write and return the report.

    ``backend``: "torch", "ort" or "trt"; ``device``: "cpu" or "cuda" (default: cuda
    for TensorRT, else cpu). ``threads``: CPU intra-op threads (default: every core
    this process may use). ``deploy``: the fuse-export folder of the run (default
    ``RUN_DIR/deploy``) whose artifact a backend with a deploy file times; it must have
    been made from the run's current weights. ``precision``: "fp32", "fp16" or "int8", as
    far as the backend has it (default: the deploy artifact's; see the module docstring).
    The report goes to ``out`` (default ``RUN_DIR/bench``);
    the returned dict is ``bench.json``'s content plus ``"files"``, the paths written.
    """
    run_dir = Path(run_dir)
    b = check_inputs(run_dir, backend, device, baseline, deploy, batch_sizes, budget, threads, precision)
    build_models(b)
    time_models(b)
    result = result_record(b)
    out_dir = Path(out) if out is not None else run_dir / BENCH_DIR
    result["files"] = write_report(result, {"unit": "ms", "batches": b.timings}, out_dir)
    return result
