"""Verified export: a training run in, deployable artifacts out, every one checked.

:func:`fuse_export` loads a run, fuses it and verifies each artifact before it
exists under its final name, as a list of steps (:mod:`.steps`):

1. fuse the training form with :func:`rsd_deploy.fuse_model`;
2. PyTorch parity, fused against unfused, on real validation images when the
   run's data set is here (fixed random inputs otherwise);
3. fused weights (safetensors) and a deploy ``run.json``, reloaded strictly into
   the architecture's deploy form and checked to give identical logits;
4. ONNX (``onnx.checker`` full check) with metadata for the deploying side;
5. graph audit against the plain architecture (:mod:`rsd_deploy.audit`);
6. ONNX Runtime parity at batch 1 and at a larger batch;
7. optionally ``model_fp16.onnx`` (fp16 compute, fp32 input and output), checked
   against PyTorch at fp16 tolerances;
8. optionally ``model_int8.onnx`` (:mod:`rsd_deploy.quantize`): static Q/DQ
   quantization calibrated on training images, kept only when its top-1 on the
   validation images stays within ``max_top1_drop`` points of ``model.onnx``'s (a run
   whose data set is not here is refused: no calibration on random inputs);
9. optionally a TensorRT engine built from the ONNX file of its precision, checked
   against ONNX Runtime;
10. ``report.json`` with every check and its numbers.

Everything is written into a hidden staging folder inside the output folder
(:mod:`.staging`) and moved to its final name only when all checks have passed,
so a failed check leaves no artifact behind. What is asked for is an
:class:`ExportOptions` (:mod:`.options`: keyword arguments, a JSON profile or
command-line overrides); :func:`format_report` (:mod:`.report`) is the table people read.
"""

from ..io import sha256_file
from .options import DEFAULT_MAX_BATCH, TRT_TOLERANCES, ExportOptions, load_profile, parse_batch
from .report import REPORT_FILE, format_report
from .steps import (
    DEPLOY_DIR,
    ENGINE_FILE,
    FP16_ONNX_FILE,
    INT8_ONNX_FILE,
    ONNX_FILE,
    TIMING_CACHE_FILE,
    UNFUSED_ONNX_FILE,
    fuse_export,
)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEPLOY_DIR",
    "ENGINE_FILE",
    "FP16_ONNX_FILE",
    "INT8_ONNX_FILE",
    "ONNX_FILE",
    "REPORT_FILE",
    "TIMING_CACHE_FILE",
    "TRT_TOLERANCES",
    "UNFUSED_ONNX_FILE",
    "ExportOptions",
    "format_report",
    "fuse_export",
    "load_profile",
    "parse_batch",
    "sha256_file",
]
