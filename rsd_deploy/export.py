"""Verified export: a training run in, deployable artifacts out, every one checked.

:func:`fuse_export` loads a run, fuses it and verifies each artifact before it
exists under its final name:

1. fuse the training form with :func:`rsd_deploy.fuse_model`;
2. PyTorch parity, fused against unfused, on real validation images when the
   run's data set is here (fixed random inputs otherwise);
3. fused weights (safetensors) and a deploy ``run.json``, reloaded strictly into
   ``models.create(name, form="deploy")`` and checked to give identical logits;
4. ONNX (``onnx.checker`` full check) with metadata for the deploying side;
5. graph audit against the plain architecture (:mod:`rsd_deploy.audit`);
6. ONNX Runtime parity at batch 1 and at a larger batch;
7. optionally a TensorRT engine, checked against ONNX Runtime;
8. ``report.json`` with every check and its numbers.

Everything is written into a hidden staging folder inside the output folder and
moved to its final name only when all checks have passed, so a failed check
leaves no artifact behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .audit import audit, failure_message, op_histogram, reference_histogram
from .backends import get_backend
from .backends.trt import TOLERANCES as TRT_TOLERANCES
from .errors import RSDError, option
from .fuse import fuse_model
from .io import DirLock, read_json, save_tensors, sha256_file, write_json
from .onnx import DEFAULT_OPSET, export_onnx, max_opset
from .run import RUN_FILE, WEIGHTS_FILE, OnnxInfo, RunInfo, Source, TensorRTProfile, load_run, load_state
from .schema import AT_LEAST_1, check_values, from_mapping
from .verify import (
    Tolerance,
    logits,
    parity,
    require,
    tile_batch,
    torch_logits,
    verification_inputs,
)

ONNX_FILE = "model.onnx"
UNFUSED_ONNX_FILE = "model_unfused.onnx"
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
REPORT_FILE = "report.json"
DEPLOY_DIR = "deploy"

#: Files this command owns in an output folder. One from an earlier export that
#: this export does not produce is removed when the new artifacts are published,
#: so the folder never mixes two exports. The timing cache is kept: it only
#: speeds up later builds and TensorRT checks it before use.
_OWNED = (WEIGHTS_FILE, RUN_FILE, ONNX_FILE, UNFUSED_ONNX_FILE, ENGINE_FILE, REPORT_FILE)

DEFAULT_MAX_BATCH = 64

log = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """What :func:`fuse_export` writes and how strictly it checks; mirrors the CLI flags."""

    onnx: bool = False  #: write and verify model.onnx (implied by trt)
    trt: bool = False  #: build and verify a TensorRT engine from model.onnx
    out: str | None = None  #: output folder; default RUN_DIR/deploy
    opset: int = DEFAULT_OPSET
    batch: int | None = None  #: fixed ONNX batch size; None makes the batch axis dynamic
    max_batch: int | None = None  #: TensorRT profile maximum (default 64, or the fixed batch)
    opt_batch: int | None = None  #: TensorRT profile optimum (default max_batch)
    fp16: bool = False  #: TensorRT fp16 engine
    keep_unfused: bool = False  #: also export the unfused training form (model_unfused.onnx)
    atol: float = 1e-4  #: fp32 parity tolerance (PyTorch, ONNX Runtime)
    rtol: float = 1e-4  #: relative to max|logit| of the reference
    trt_atol: float | None = None  #: TensorRT tolerance; default per precision
    trt_rtol: float | None = None
    samples: int = 64  #: verification inputs (also the "larger batch" of the ONNX check)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "options") -> "ExportOptions":
        """Options from a profile-like mapping; unknown keys and wrong types are an RSDError."""
        return from_mapping(cls, values, where, parsers=_parsers(where), ignore=("description",))

    def with_overrides(self, values: Mapping[str, Any]) -> "ExportOptions":
        """A copy with ``values`` (e.g. explicit command-line flags) taking precedence."""
        return from_mapping(ExportOptions, values, "options", base=self, parsers=_parsers("options"))

    @property
    def writes_onnx(self) -> bool:
        return self.onnx or self.trt

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def trt_profile(self) -> tuple[int, int, int]:
        """``(min, opt, max)`` batch of the TensorRT engine."""
        if self.batch is not None:
            if self.max_batch not in (None, self.batch) or self.opt_batch not in (None, self.batch):
                raise RSDError(
                    f"a fixed ONNX batch of {self.batch} makes a fixed-batch engine: drop "
                    f"{option('max_batch')}/{option('opt_batch')} or make {option('batch')} dynamic"
                )
            return self.batch, self.batch, self.batch
        hi = self.max_batch or DEFAULT_MAX_BATCH
        opt = self.opt_batch or hi
        if not 1 <= opt <= hi:
            raise RSDError(f"{option('opt_batch')} must be between 1 and {option('max_batch')} ({hi}); got {opt}")
        return 1, opt, hi

    def trt_tolerance(self) -> Tolerance:
        base = TRT_TOLERANCES[self.precision]
        return Tolerance(
            base.atol if self.trt_atol is None else self.trt_atol,
            base.rtol if self.trt_rtol is None else self.trt_rtol,
        )

    def validate(self) -> None:
        """Reject impossible settings before any work is done."""
        if self.writes_onnx and not 9 <= self.opset <= max_opset():
            raise RSDError(
                f"opset {self.opset} cannot be produced by the installed PyTorch exporter "
                f"(supported: 9 to {max_opset()})"
            )
        check_values(self, _RANGES, option)
        Tolerance(self.atol, self.rtol)
        self.trt_tolerance()
        if self.trt:
            self.trt_profile()


#: Ranges of the options (every number is also checked to be finite; see schema.check_values).
_RANGES = {"batch": AT_LEAST_1, "max_batch": AT_LEAST_1, "opt_batch": AT_LEAST_1, "samples": AT_LEAST_1}


def _parsers(where: str) -> dict[str, Callable[[Any], Any]]:
    """Options read by their own parser: ``batch`` is "dynamic" or a positive integer."""
    return {"batch": lambda value: parse_batch(value, f"{where}: batch")}


def parse_batch(value: Any, where: str = option("batch")) -> int | None:
    """``"dynamic"`` (or None) -> None; a positive integer (or its string) -> that int."""
    if value is None or value == "dynamic":
        return None
    if isinstance(value, bool):
        raise RSDError(f"{where} must be 'dynamic' or a positive integer (got {value!r})")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise RSDError(f"{where} must be 'dynamic' or a positive integer (got {value!r})") from None
    if n < 1 or (isinstance(value, float) and value != n):
        raise RSDError(f"{where} must be 'dynamic' or a positive integer (got {value!r})")
    return n


def load_profile(path: str | os.PathLike) -> ExportOptions:
    """Export options from a JSON profile (see the ``export/`` folder)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise RSDError(f"profile {path} must hold a JSON object")
    return ExportOptions.from_mapping(data, f"profile {path}")


# --------------------------------------------------------------------------------------


_STAGING_PREFIX = ".fuse-export-"


class _Staging:
    """A hidden folder inside ``out`` where artifacts wait for their checks.

    Entering locks ``out`` (a second export into it is refused while this one runs)
    and removes staging folders that killed exports left there. :meth:`publish`
    moves every staged file to ``out`` (same file system, so each move is an atomic
    rename). Leaving removes the staging folder and, when nothing was published,
    ``out`` itself if this export created it and it is still empty: only what this
    export made is ever removed.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.published: list[str] = []
        self.removed: list[str] = []
        self.stale: list[str] = []  #: staging folders of killed exports, removed

    def __enter__(self) -> "_Staging":
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RSDError(f"cannot write to {self.out}: {e.strerror or e}") from None
        self._lock = DirLock(self.out, "fuse-export").__enter__()
        try:
            for old in self.out.glob(f"{_STAGING_PREFIX}*"):
                shutil.rmtree(old, ignore_errors=True)
                self.stale.append(old.name)
            self.path = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.out))
        except OSError as e:
            self._release()
            raise RSDError(f"cannot write to {self.out}: {e.strerror or e}") from None
        return self

    def _release(self) -> None:
        if self.created and not self.published:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only when empty: never another export's or a user's files
        self._lock.__exit__()

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()
        if isinstance(exc, RSDError) and not self.published:
            raise RSDError(f"{exc} (nothing was written)") from None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def publish(self, last: str) -> None:
        """Move the staged files into ``out``, ``last`` last.

        ``last`` (the report) of an earlier export is removed first, so a folder that
        holds it always holds one complete export, even after a kill half-way through.
        """
        names = sorted(p.name for p in self.path.iterdir() if p.is_file())
        names = [n for n in names if n != last] + ([last] if last in names else [])
        (self.out / last).unlink(missing_ok=True)
        for name in _OWNED:
            if name not in names and (self.out / name).exists():
                (self.out / name).unlink()
                self.removed.append(name)
        umask = os.umask(0)
        os.umask(umask)
        for name in names:
            # Temporary files are created private (0600); artifacts get the usual mode.
            os.chmod(self.path / name, 0o666 & ~umask)
            os.replace(self.path / name, self.out / name)
            self.published.append(name)


#: Files a training run keeps beside model.safetensors and run.json (training/loop.py,
#: training/checkpoint.py): a folder holding one of them is a run, never an export's.
_TRAINING_FILES = ("metrics.jsonl", "checkpoint.safetensors", "checkpoint.json")


def _refuse_run_folder(out: Path, run_dir: Path) -> None:
    """Refuse an output folder whose model.safetensors / run.json belong to a run, not an export.

    Publishing there would replace a run's weights by the deployed ones: the source
    run folder, any other training run, or a folder holding a run's resume state.
    """
    if not out.is_dir():
        return
    hint = f"choose another {option('out')} (default: the run's {DEPLOY_DIR}/ folder)"
    if out.resolve() == run_dir.resolve():
        raise RSDError(f"{option('out')} {out} is the run folder itself: the export would replace its weights; "
                       f"{hint}")
    held = [name for name in _TRAINING_FILES if (out / name).exists()]
    if (out / RUN_FILE).exists():
        try:
            info = RunInfo.read(out)
        except RSDError:
            info = None
        if info is None or not info.is_export:
            held.insert(0, f"{RUN_FILE} of a {info.form!r}-form run" if info is not None
                        else f"a {RUN_FILE} that is not an export's")
    if held:
        raise RSDError(f"{option('out')} {out} holds a training run ({', '.join(held)}): the export would "
                       f"replace its weights; {hint}")


def _onnx_metadata(info: RunInfo, form: str, source_sha: str) -> dict[str, str]:
    norm = info.normalization
    entries = {
        "model": str(info.model),
        "form": form,
        "num_classes": info.num_classes,
        "classes": info.classes,
        "in_channels": info.in_channels,
        "input_size": info.input_size,
        "mean": norm and norm.mean,
        "std": norm and norm.std,
        "rsd_deploy_version": __version__,
        "source_sha256": source_sha,
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in entries.items() if v is not None}


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RSDError(f"onnx.checker rejects {path.name}: {str(e).splitlines()[0][:200]}") from None


def _artifact_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def fuse_export(
    run_dir: str | os.PathLike,
    options: ExportOptions | None = None,
) -> dict[str, Any]:
    """Fuse, verify and export the run in ``run_dir``; returns the report (also ``report.json``).

    Raises :class:`RSDError` on bad input or a failed check, leaving no artifact.
    When TensorRT was asked for but TensorRT or a CUDA device is missing, the other
    artifacts are still written and ``report["tensorrt"]["status"]`` is
    ``"unavailable"`` with the reason in ``report["tensorrt"]["error"]``.
    """
    opts = options or ExportOptions()
    opts.validate()
    started = time.perf_counter()
    run_dir = Path(run_dir)

    # 1. Load and fuse. -------------------------------------------------------------
    model, info = load_run(run_dir)
    weights = run_dir / WEIGHTS_FILE
    source_sha = sha256_file(weights)
    out = Path(opts.out) if opts.out else run_dir / DEPLOY_DIR
    _refuse_run_folder(out, run_dir)
    input_shape = info.input_shape
    name = str(info.model)
    tol = Tolerance(opts.atol, opts.rtol)
    checks: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "rsd_deploy_version": __version__,
        "run_dir": str(run_dir.resolve()),
        "out_dir": str(out.resolve()),
        "model": name,
        "source": {"form": info.form, "weights": str(weights.resolve()), "sha256": source_sha},
        "options": asdict(opts),
        "checks": checks,
        "warnings": [],
    }
    log.info(f"fusing {name} ({info.form} form)")
    fused = fuse_model(model)

    with _Staging(out) as stage:
        # 2. PyTorch parity: fused against unfused. --------------------------------------
        x, inputs = verification_inputs(info.to_json(), opts.samples)
        report["verification_inputs"] = inputs
        log.info(f"verifying in PyTorch on {inputs}")
        ref_unfused = torch_logits(model, x)
        ref_fused = torch_logits(fused, x)
        require(_add(checks, parity("pytorch fused vs unfused", ref_unfused, ref_fused, tol, batch=len(x))))

        # 3. Fused weights, reloaded the way a user would. --------------------------------
        save_tensors(stage / WEIGHTS_FILE, fused.state_dict(),
                     metadata={"model": name, "form": "deploy", "source_sha256": source_sha})
        plain = info.build_model(form="deploy")
        load_state(plain, stage / WEIGHTS_FILE, f"architecture {name!r} (deploy form)")
        require(_add(checks, parity("deploy weights reloaded", ref_fused, torch_logits(plain, x),
                                    Tolerance(0.0, 0.0), batch=len(x))))

        deploy = info.replace(form="deploy", weights_sha256=sha256_file(stage / WEIGHTS_FILE),
                              source=Source(source_sha, str(run_dir.resolve()), info.form))
        metadata = _onnx_metadata(info, "deploy", source_sha)
        for key in ("classes", "mean", "std"):
            if key not in metadata:
                report["warnings"].append(f"the run records no {key}; the ONNX metadata lacks it")

        if opts.writes_onnx:
            # 4. ONNX. ---------------------------------------------------------------------
            log.info(f"exporting ONNX (opset {opts.opset}, batch {opts.batch or 'dynamic'})")
            onnx_path = stage / ONNX_FILE
            export_onnx(fused, onnx_path, input_shape=input_shape, batch=opts.batch,
                        opset=opts.opset, metadata=metadata)
            _check_onnx(onnx_path)
            checks.append({"name": "onnx.checker full check", "passed": True, "file": ONNX_FILE})

            # 5. Graph audit. -------------------------------------------------------------
            log.info("auditing the graph against the plain architecture")
            graph = op_histogram(onnx_path)
            reference = reference_histogram(
                name, num_classes=info.num_classes, in_channels=info.in_channels,
                input_shape=input_shape, opset=opts.opset, batch=opts.batch)
            result = audit(graph, reference)
            report["audit"] = {
                "fused": graph,
                "reference": reference,
                **result,
                "note": "reference: models.create(name, form='deploy') exported the same way; "
                        "its Add nodes are the architecture's own (residual additions, and the "
                        "shift of standalone BNs kept as per-channel affines in pre-activation "
                        "nets such as DenseNet, which also add one Mul each)",
            }
            checks.append({"name": "graph audit", "passed": result["passed"], **result["rules"]})
            if not result["passed"]:
                raise RSDError(failure_message(result, "fused graph"))

            # 6. ONNX Runtime parity at batch 1 and at a larger batch. -------------------
            log.info("checking ONNX Runtime against PyTorch")
            runner = get_backend("ort").load(onnx_path)
            for batch, xs, ref in _ort_batches(x, ref_fused, opts.batch):
                got = logits(runner, xs, batch)
                require(_add(checks, parity(f"onnxruntime vs pytorch fused, batch {batch}",
                                            ref, got, tol, batch=batch)))
            del runner

            if opts.keep_unfused:
                log.info("exporting the unfused training form for comparison")
                unfused_path = stage / UNFUSED_ONNX_FILE
                export_onnx(model, unfused_path, input_shape=input_shape, batch=opts.batch,
                            opset=opts.opset, metadata=_onnx_metadata(info, info.form, source_sha))
                _check_onnx(unfused_path)
                unfused_graph = op_histogram(unfused_path)
                ops = sorted(set(unfused_graph) | set(graph))
                report["audit"]["unfused"] = unfused_graph
                report["audit"]["unfused_minus_fused"] = {
                    op: unfused_graph.get(op, 0) - graph.get(op, 0)
                    for op in ops if unfused_graph.get(op, 0) != graph.get(op, 0)}
                runner = get_backend("ort").load(unfused_path)
                batch, xs, ref = _ort_batches(x, ref_unfused, opts.batch)[-1]
                require(_add(checks, parity(f"onnxruntime unfused vs pytorch unfused, batch {batch}",
                                            ref, logits(runner, xs, batch), tol, batch=batch)))
                del runner
            deploy.onnx = OnnxInfo(ONNX_FILE, opts.opset, opts.batch or "dynamic")

        # 7. TensorRT. ------------------------------------------------------------------
        if opts.trt:
            report["tensorrt"] = _tensorrt_step(opts, stage, out, input_shape, x, checks)
            if report["tensorrt"]["status"] == "built":
                t = report["tensorrt"]
                deploy.tensorrt = TensorRTProfile(t["min_batch"], t["opt_batch"], t["max_batch"], t["precision"])

        # 8. Report. --------------------------------------------------------------------
        deploy.write(stage.path)
        report["artifacts"] = {
            p.name: _artifact_record(p) for p in sorted(stage.path.iterdir()) if p.is_file()
        }
        report["passed"] = all(ch["passed"] for ch in checks)
        report["seconds"] = round(time.perf_counter() - started, 2)
        write_json(stage / REPORT_FILE, report)
        stage.publish(last=REPORT_FILE)
        if stage.stale:
            log.info(f"removed staging folders of interrupted exports: {', '.join(stage.stale)}")
        if stage.removed:
            log.info(f"removed artifacts of an earlier export: {', '.join(stage.removed)}")
    return report


def _add(checks: list[dict[str, Any]], check: dict[str, Any]) -> dict[str, Any]:
    checks.append(check)
    return check


def _ort_batches(x, ref, fixed: int | None):
    """``(batch, inputs, reference logits)`` for the ONNX Runtime checks.

    Dynamic batch: batch 1 (the first few inputs one by one) and the whole set at
    once. Fixed batch N: the inputs, cycled to a multiple of N, in batches of N.
    """
    if fixed is None:
        k = min(8, len(x))
        return [(1, x[:k], ref[:k]), (len(x), x, ref)]
    n = -(-len(x) // fixed) * fixed
    xs = tile_batch(x, n)
    return [(fixed, xs, tile_batch(ref, n) if n != len(x) else ref)]


def _tensorrt_step(opts: ExportOptions, stage: _Staging, out: Path, input_shape, x, checks):
    trt = get_backend("trt")
    availability = trt.available("cuda")
    if not availability:
        log.info(f"skipping TensorRT: {availability.reason}")
        return {"status": "unavailable", "error": availability.reason}
    lo, opt, hi = opts.trt_profile()
    cache = stage / TIMING_CACHE_FILE
    if (out / TIMING_CACHE_FILE).is_file():
        shutil.copyfile(out / TIMING_CACHE_FILE, cache)
    log.info(f"building a TensorRT {opts.precision} engine, batch profile ({lo}, {opt}, {hi})")
    info = trt.build_engine(stage / ONNX_FILE, stage / ENGINE_FILE, input_shape=input_shape,
                            min_batch=lo, opt_batch=opt, max_batch=hi, precision=opts.precision,
                            timing_cache=cache)
    runner = trt.load(stage / ENGINE_FILE, precision=opts.precision)
    reference = get_backend("ort").load(stage / ONNX_FILE)
    tol = opts.trt_tolerance()
    for batch in sorted({lo, hi}):
        xs = tile_batch(x, batch)
        ref = logits(reference, xs, opts.batch)
        got = logits(runner, xs)
        require(_add(checks, parity(f"tensorrt {opts.precision} vs onnxruntime, batch {batch}",
                                    ref, got, tol, batch=batch)))
    return {"status": "built", **info}


# --------------------------------------------------------------------------------------


def format_report(report: Mapping[str, Any]) -> str:
    """A short table of the checks, the audit and the artifacts."""
    rows = [("check", "max abs", "max rel", "top-1", "result")]
    for ch in report["checks"]:
        if "max_abs" in ch:
            rows.append((ch["name"], f"{ch['max_abs']:.2e}", f"{ch['max_rel']:.2e}",
                         f"{ch['top1_agreement']:.4f}", "ok" if ch["passed"] else "FAIL"))
        else:
            rows.append((ch["name"], "", "", "", "ok" if ch["passed"] else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(wd) for cell, wd in zip(r, widths, strict=True)).rstrip() for r in rows]
    if "audit" in report:
        a = report["audit"]
        rules = a["rules"]
        lines.append(
            f"audit: Conv {rules['conv_equal']['graph']}/{rules['conv_equal']['reference']}, "
            f"BatchNormalization {rules['no_batchnorm']['graph']}, "
            f"Add {rules['no_extra_add']['graph']}/{rules['no_extra_add']['reference']} "
            f"(fused/plain architecture); histogram "
            f"{'identical to' if a['identical'] else 'differs from'} the plain architecture's"
        )
        if "unfused_minus_fused" in a:
            diff = ", ".join(f"{op} {n:+d}" for op, n in a["unfused_minus_fused"].items())
            lines.append(f"unfused graph vs fused: {diff or 'same operators'}")
    trt = report.get("tensorrt")
    if trt:
        lines.append(f"tensorrt: {trt['status']}" + (
            f" ({trt['precision']}, batch {trt['min_batch']}..{trt['max_batch']})"
            if trt["status"] == "built" else ""))
    lines.append(f"inputs: {report.get('verification_inputs', '-')}")
    written = [*report.get("artifacts", {}), REPORT_FILE]
    lines.append(f"wrote {', '.join(written)} to {report['out_dir']}")
    return "\n".join(lines)
