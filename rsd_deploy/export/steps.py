"""The steps of :func:`fuse_export`: each one small, over one shared :class:`Export`.

A step reads what earlier steps left on the :class:`Export` (the models, the
verification inputs and their reference logits, the staging folder), writes its
artifact into the staging folder, and adds its checks to ``export.checks`` (a
failed one raises, see :meth:`Export.check`). :func:`plan` lists the steps the
options ask for, in order; adding a check is adding a step there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .. import __version__
from ..audit import audit, failure_message, op_histogram, reference_histogram
from ..backends import get_backend
from ..errors import RSDError, option
from ..fuse import fuse_model
from ..io import save_tensors, sha256_file, write_json
from ..onnx import export_onnx
from ..quantize import Calibration, accuracy_gate, calibrate, gate_message, quantize_onnx, validation_set
from ..run import (
    RUN_FILE,
    WEIGHTS_FILE,
    Int8Info,
    OnnxInfo,
    RunInfo,
    Source,
    TensorRTProfile,
    load_run,
    load_state,
)
from ..verify import Tolerance, logits, parity, require, tile_batch, torch_logits, verification_inputs
from .options import ExportOptions
from .report import REPORT_FILE
from .staging import Staging

ONNX_FILE = "model.onnx"
FP16_ONNX_FILE = "model_fp16.onnx"
INT8_ONNX_FILE = "model_int8.onnx"
UNFUSED_ONNX_FILE = "model_unfused.onnx"
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
DEPLOY_DIR = "deploy"

#: Files this command owns in an output folder. One from an earlier export that
#: this export does not produce is removed when the new artifacts are published,
#: so the folder never mixes two exports. The timing cache is kept: it only
#: speeds up later builds and TensorRT checks it before use.
OWNED = (WEIGHTS_FILE, RUN_FILE, ONNX_FILE, FP16_ONNX_FILE, INT8_ONNX_FILE, UNFUSED_ONNX_FILE, ENGINE_FILE,
         REPORT_FILE)
#: The ONNX file a TensorRT engine of each precision is built from (strongly typed: the file carries it).
ENGINE_SOURCES = {"fp32": ONNX_FILE, "fp16": FP16_ONNX_FILE, "int8": INT8_ONNX_FILE}

#: Files a training run keeps beside model.safetensors and run.json (training/loop.py,
#: training/checkpoint.py): a folder holding one of them is a run, never an export's.
_TRAINING_FILES = ("metrics.jsonl", "checkpoint.safetensors", "checkpoint.json")

log = logging.getLogger(__name__)


@dataclass
class Export:
    """One export in progress: its inputs, what the steps made so far, and the report."""

    run_dir: Path
    opts: ExportOptions
    model: nn.Module  #: the training form, as loaded
    info: RunInfo
    source_sha: str  #: sha256 of the weights the export is made from
    out: Path
    report: dict[str, Any]
    started: float
    fused: nn.Module | None = None
    stage: Staging | None = None
    x: Tensor | None = None  #: verification inputs
    ref_unfused: Tensor | None = None  #: their logits through the training form
    ref_fused: Tensor | None = None  #: and through the fused model
    deploy: RunInfo | None = None  #: the deploy run.json being made
    graph: dict[str, int] = field(default_factory=dict)  #: operator histogram of model.onnx
    calibration: Calibration | None = None  #: int8: training images to calibrate on
    val_set: Any = None  #: int8: the validation split the accuracy gate runs on

    @property
    def checks(self) -> list[dict[str, Any]]:
        return self.report["checks"]

    @property
    def name(self) -> str:
        return str(self.info.model)

    @property
    def tol(self) -> Tolerance:
        return Tolerance(self.opts.atol, self.opts.rtol)

    def check(self, result: dict[str, Any]) -> None:
        """Record a parity check; raise when it failed."""
        self.checks.append(result)
        require(result)


Step = Callable[[Export], None]


def start(run_dir: Path, opts: ExportOptions) -> Export:
    """Load the run, decide the output folder and open the report."""
    started = time.perf_counter()
    model, info = load_run(run_dir)
    weights = run_dir / WEIGHTS_FILE
    source_sha = sha256_file(weights)
    out = Path(opts.out) if opts.out else run_dir / DEPLOY_DIR
    refuse_run_folder(out, run_dir)
    report: dict[str, Any] = {
        "rsd_deploy_version": __version__,
        "run_dir": str(run_dir.resolve()),
        "out_dir": str(out.resolve()),
        "model": str(info.model),
        "source": {"form": info.form, "weights": str(weights.resolve()), "sha256": source_sha},
        "options": asdict(opts),
        "checks": [],
        "warnings": [],
    }
    return Export(run_dir, opts, model, info, source_sha, out, report, started)


def refuse_run_folder(out: Path, run_dir: Path) -> None:
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
        if info is None:  # unreadable as a record: an earlier export's still counts as one
            if not _raw_export_record(out / RUN_FILE):
                held.insert(0, f"a {RUN_FILE} that is not an export's")
        elif not info.is_export:
            held.insert(0, f"{RUN_FILE} of a {info.form!r}-form run")
    if held:
        raise RSDError(f"{option('out')} {out} holds a training run ({', '.join(held)}): the export would "
                       f"replace its weights; {hint}")


def _raw_export_record(path: Path) -> bool:
    """Whether ``path`` is a JSON object with ``form`` "deploy" and a ``source``: an export's
    record, even one written by a version whose record no longer reads as a :class:`RunInfo`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("form") == "deploy" and "source" in data


def fuse(ex: Export) -> None:
    """Fuse the training form into the plain network (before anything is staged)."""
    log.info(f"fusing {ex.name} ({ex.info.form} form)")
    ex.fused = fuse_model(ex.model)


def prepare_int8(ex: Export) -> None:
    """int8's real images, before anything is staged: the calibration images (training
    split) and the validation split of the gate; RSDError when the run's data set is not here."""
    opts = ex.opts
    ex.calibration = calibrate(ex.info.data, opts.calib_samples, opts.calib_method, opts.quant_format)
    ex.val_set = validation_set(ex.info.data)
    log.info(f"int8: calibrating on {ex.calibration.source}, judging on {len(ex.val_set)} validation images")


def plan(opts: ExportOptions) -> list[Step]:
    """The staged steps ``opts`` asks for, in order; the report comes last."""
    steps: list[Step] = [verify_pytorch, write_deploy_weights]
    if opts.writes_onnx:
        steps += [write_onnx, audit_graph, verify_onnxruntime]
        if opts.keep_unfused:
            steps.append(write_unfused_onnx)
    if opts.fp16:
        steps.append(write_fp16_onnx)
    if opts.int8:
        steps.append(write_int8_onnx)
    if opts.trt:
        steps.append(build_tensorrt)
    return steps + [write_report]


# The staged steps ----------------------------------------------------------------------


def verify_pytorch(ex: Export) -> None:
    """PyTorch parity, fused against unfused, on the verification inputs."""
    ex.x, inputs = verification_inputs(ex.info.data, ex.info.input_shape, ex.opts.samples)
    ex.report["verification_inputs"] = inputs
    log.info(f"verifying in PyTorch on {inputs}")
    ex.ref_unfused = torch_logits(ex.model, ex.x)
    ex.ref_fused = torch_logits(ex.fused, ex.x)
    ex.check(parity("pytorch fused vs unfused", ex.ref_unfused, ex.ref_fused, ex.tol, batch=len(ex.x)))


def write_deploy_weights(ex: Export) -> None:
    """Fused weights, reloaded the way a user would (bit-identical logits), and the deploy record."""
    path = ex.stage / WEIGHTS_FILE
    save_tensors(path, ex.fused.state_dict(),
                 metadata={"model": ex.name, "form": "deploy", "source_sha256": ex.source_sha})
    plain = ex.info.build_model(form="deploy")
    load_state(plain, path, f"architecture {ex.name!r} (deploy form)")
    ex.check(parity("deploy weights reloaded", ex.ref_fused, torch_logits(plain, ex.x),
                    Tolerance(0.0, 0.0), batch=len(ex.x)))
    # A deploy-form source's onnx/tensorrt entries describe its files, not this export's.
    ex.deploy = ex.info.replace(form="deploy", weights_sha256=sha256_file(path), onnx=None, tensorrt=None,
                                source=Source(ex.source_sha, str(ex.run_dir.resolve()), ex.info.form))
    metadata = onnx_metadata(ex.info, "deploy", ex.source_sha)
    for key in ("classes", "mean", "std"):
        if key not in metadata:
            ex.report["warnings"].append(f"the run records no {key}; the ONNX metadata lacks it")


def write_onnx(ex: Export) -> None:
    """model.onnx with the deploying side's metadata, passing ``onnx.checker``'s full check."""
    opts = ex.opts
    log.info(f"exporting ONNX (opset {opts.opset}, batch {opts.batch or 'dynamic'})")
    path = ex.stage / ONNX_FILE
    export_onnx(ex.fused, path, input_shape=ex.info.input_shape, batch=opts.batch, opset=opts.opset,
                metadata=onnx_metadata(ex.info, "deploy", ex.source_sha))
    check_onnx(path)
    ex.checks.append({"name": "onnx.checker full check", "passed": True, "file": ONNX_FILE})
    ex.deploy.onnx = OnnxInfo(ONNX_FILE, opts.opset, opts.batch or "dynamic")


def audit_graph(ex: Export) -> None:
    """The operator histogram of model.onnx against the plain architecture's."""
    log.info("auditing the graph against the plain architecture")
    info = ex.info
    ex.graph = op_histogram(ex.stage / ONNX_FILE)
    reference = reference_histogram(info.build_model(form="deploy").eval(), input_shape=info.input_shape,
                                    opset=ex.opts.opset, batch=ex.opts.batch)
    result = audit(ex.graph, reference)
    ex.report["audit"] = {
        "fused": ex.graph,
        "reference": reference,
        **result,
        "note": "reference: the architecture's deploy form (zoo: form='deploy'; torchvision/timm: "
                "the original with every conv+BN pair folded) exported the same way; "
                "its Add nodes are the architecture's own (residual additions, and the "
                "shift of standalone BNs kept as per-channel affines in pre-activation "
                "nets such as DenseNet, which also add one Mul each)",
    }
    ex.checks.append({"name": "graph audit", "passed": result["passed"], **result["rules"]})
    if not result["passed"]:
        raise RSDError(failure_message(result, "fused graph"))


def verify_onnxruntime(ex: Export) -> None:
    """ONNX Runtime against the fused PyTorch model, at batch 1 and at a larger batch."""
    log.info("checking ONNX Runtime against PyTorch")
    runner = get_backend("ort").load(ex.stage / ONNX_FILE)
    for batch, xs, ref in ort_batches(ex.x, ex.ref_fused, ex.opts.batch):
        ex.check(parity(f"onnxruntime vs pytorch fused, batch {batch}", ref, logits(runner, xs, batch),
                        ex.tol, batch=batch))


def write_unfused_onnx(ex: Export) -> None:
    """The training form as model_unfused.onnx, for comparison: its graph and its parity."""
    log.info("exporting the unfused training form for comparison")
    opts, path = ex.opts, ex.stage / UNFUSED_ONNX_FILE
    export_onnx(ex.model, path, input_shape=ex.info.input_shape, batch=opts.batch, opset=opts.opset,
                metadata=onnx_metadata(ex.info, ex.info.form, ex.source_sha))
    check_onnx(path)
    unfused_graph = op_histogram(path)
    ops = sorted(set(unfused_graph) | set(ex.graph))
    ex.report["audit"]["unfused"] = unfused_graph
    ex.report["audit"]["unfused_minus_fused"] = {
        op: unfused_graph.get(op, 0) - ex.graph.get(op, 0)
        for op in ops if unfused_graph.get(op, 0) != ex.graph.get(op, 0)}
    runner = get_backend("ort").load(path)
    batch, xs, ref = ort_batches(ex.x, ex.ref_unfused, opts.batch)[-1]
    ex.check(parity(f"onnxruntime unfused vs pytorch unfused, batch {batch}", ref, logits(runner, xs, batch),
                    ex.tol, batch=batch))


def write_fp16_onnx(ex: Export) -> None:
    """model_fp16.onnx (fp16 weights and compute, fp32 input and output), checked against the
    fused PyTorch model in fp32 at fp16 tolerances, at batch 1 and at a larger batch."""
    opts, path = ex.opts, ex.stage / FP16_ONNX_FILE
    log.info("exporting the fp16 ONNX file")
    metadata = {**onnx_metadata(ex.info, "deploy", ex.source_sha), "precision": "fp16"}
    export_onnx(ex.fused, path, input_shape=ex.info.input_shape, batch=opts.batch, opset=opts.opset,
                metadata=metadata, precision="fp16")
    check_onnx(path)
    ex.checks.append({"name": f"onnx.checker full check, {FP16_ONNX_FILE}", "passed": True,
                      "file": FP16_ONNX_FILE})
    ort = get_backend("ort")
    runner = ort.load(path, precision="fp16")
    for batch, xs, ref in ort_batches(ex.x, ex.ref_fused, opts.batch):
        ex.check(parity(f"onnxruntime fp16 vs pytorch fused, batch {batch}", ref, logits(runner, xs, batch),
                        ort.TOLERANCES["fp16"], batch=batch))
    ex.deploy.onnx.fp16_file = FP16_ONNX_FILE


def write_int8_onnx(ex: Export) -> None:
    """model_int8.onnx: model.onnx quantized (calibrated on training images), kept only when its
    top-1 on the validation images stays within ``max_top1_drop`` points of model.onnx's."""
    opts, cal, path = ex.opts, ex.calibration, ex.stage / INT8_ONNX_FILE
    quantize_onnx(ex.stage / ONNX_FILE, path, cal, batch=opts.batch)
    check_onnx(path)
    ex.checks.append({"name": f"onnx.checker full check, {INT8_ONNX_FILE}", "passed": True,
                      "file": INT8_ONNX_FILE})
    ort = get_backend("ort")
    log.info(f"int8 gate: top-1 against model.onnx on {len(ex.val_set)} validation images")
    gate = accuracy_gate(ort.load(ex.stage / ONNX_FILE), ort.load(path, precision="int8"), ex.val_set,
                         max_top1_drop=opts.max_top1_drop, batch=opts.batch)
    ex.checks.append(gate)
    ex.report["int8"] = {"file": INT8_ONNX_FILE, "calibration": cal.to_json(),
                         **{k: v for k, v in gate.items() if k not in ("name", "passed")}, "passed": gate["passed"]}
    if not gate["passed"]:
        raise RSDError(gate_message(gate))
    ex.deploy.onnx.int8 = Int8Info(INT8_ONNX_FILE, cal.format, cal.method, cal.samples)


def build_tensorrt(ex: Export) -> None:
    """A TensorRT engine built from the ONNX file of its precision and checked against ONNX
    Runtime; "unavailable" (not an error) without TensorRT."""
    opts, stage = ex.opts, ex.stage
    trt = get_backend("trt")
    availability = trt.available("cuda")
    if not availability:
        log.info(f"skipping TensorRT: {availability.reason}")
        ex.report["tensorrt"] = {"status": "unavailable", "error": availability.reason}
        return
    lo, opt, hi = opts.trt_profile()
    cache = stage / TIMING_CACHE_FILE
    if (ex.out / TIMING_CACHE_FILE).is_file():
        shutil.copyfile(ex.out / TIMING_CACHE_FILE, cache)
    source = ENGINE_SOURCES[opts.precision]
    log.info(f"building a TensorRT {opts.precision} engine from {source}, batch profile ({lo}, {opt}, {hi})")
    built = trt.build_engine(stage / source, stage / ENGINE_FILE, input_shape=ex.info.input_shape,
                             min_batch=lo, opt_batch=opt, max_batch=hi, precision=opts.precision,
                             timing_cache=cache)
    runner = trt.load(stage / ENGINE_FILE, precision=opts.precision)
    # fp32 and fp16 engines against the fp32 file; an int8 engine against ONNX Runtime running its Q/DQ file.
    reference = get_backend("ort").load(stage / (INT8_ONNX_FILE if opts.precision == "int8" else ONNX_FILE))
    tol = opts.trt_tolerance()
    for batch in sorted({lo, hi}):
        xs = tile_batch(ex.x, batch)
        ex.check(parity(f"tensorrt {opts.precision} vs onnxruntime, batch {batch}",
                        logits(reference, xs, opts.batch), logits(runner, xs), tol, batch=batch))
    ex.report["tensorrt"] = {"status": "built", "onnx_file": source, **built}
    ex.deploy.tensorrt = TensorRTProfile(built["min_batch"], built["opt_batch"], built["max_batch"],
                                         built["precision"])


def write_report(ex: Export) -> None:
    """The deploy run.json and report.json: every check, every artifact's size and sha256."""
    ex.deploy.write(ex.stage.path)
    ex.report["artifacts"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(ex.stage.path.iterdir()) if p.is_file()
    }
    ex.report["passed"] = all(ch["passed"] for ch in ex.checks)
    ex.report["seconds"] = round(time.perf_counter() - ex.started, 2)
    write_json(ex.stage / REPORT_FILE, ex.report)


# Helpers -------------------------------------------------------------------------------


def onnx_metadata(info: RunInfo, form: str, source_sha: str) -> dict[str, str]:
    """The ONNX metadata a deploying side reads: model, classes, input size, normalization."""
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


def check_onnx(path: Path) -> None:
    """``onnx.checker``'s full check; a rejection is an RSDError naming its first line."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RSDError(f"onnx.checker rejects {path.name}: {str(e).splitlines()[0][:200]}") from None


def ort_batches(x: Tensor, ref: Tensor, fixed: int | None) -> list[tuple[int, Tensor, Tensor]]:
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


def publish(ex: Export) -> None:
    """Move the staged artifacts to the output folder, the report last; say what was cleaned up."""
    ex.stage.publish(last=REPORT_FILE)
    if ex.stage.stale:
        log.info(f"removed staging folders of interrupted exports: {', '.join(ex.stage.stale)}")
    if ex.stage.removed:
        log.info(f"removed artifacts of an earlier export: {', '.join(ex.stage.removed)}")


def fuse_export(run_dir: str | os.PathLike, options: ExportOptions | None = None) -> dict[str, Any]:
    """Fuse, verify and export the run in ``run_dir``; returns the report (also ``report.json``).

    Raises :class:`RSDError` on bad input or a failed check, leaving no artifact: a
    refused int8 accuracy gate, and ``int8`` for a run whose data set is not here, too.
    When TensorRT was asked for but TensorRT or a CUDA device is missing, the other
    artifacts are still written and ``report["tensorrt"]["status"]`` is
    ``"unavailable"`` with the reason in ``report["tensorrt"]["error"]``.
    """
    opts = options or ExportOptions()
    opts.validate()
    ex = start(Path(run_dir), opts)
    if opts.int8:
        prepare_int8(ex)
    fuse(ex)
    with Staging(ex.out, OWNED) as ex.stage:
        for step in plan(opts):
            step(ex)
        publish(ex)
    return ex.report
