"""Run directories for the bench tests: an RSD training run plus its exported deploy folder.

One place that stands in for ``rsd-deploy train`` + ``rsd-deploy fuse-export``: it
writes exactly the layout of the run-directory contract (``model.safetensors``,
``run.json``, ``deploy/model.safetensors``, ``deploy/run.json`` with
``"form": "deploy"``, ``deploy/model.onnx``), so it can later be replaced by the
real export command.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from rsd_deploy import fuse_model, models
from rsd_deploy.onnx import export_onnx
from rsd_deploy.run import RUN_FILE, WEIGHTS_FILE, save_run


def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, as after training, so fusion has work to do."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def run_meta(name: str, form: str, input_size: int, num_classes: int = 10) -> dict[str, Any]:
    return {
        "model": name, "form": form, "method": "rsd" if form == "rsd" else "baseline",
        "num_classes": num_classes, "in_channels": 3, "input_size": [input_size, input_size],
        "classes": [f"c{i}" for i in range(num_classes)],
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "data": None, "config": {"note": "untrained: made by tests/bench_runs.py"},
        "versions": {}, "metrics": {},
    }


def make_run(root: Path, name: str = "resnet20", *, form: str = "rsd", export: bool = True,
             input_size: int | None = None, tensorrt: dict[str, Any] | None = None,
             seed: int = 0, dirname: str | None = None) -> Path:
    """Write a run directory under ``root``; with ``export`` also its ``deploy/`` folder.

    ``tensorrt`` is recorded as the deploy ``run.json``'s engine profile (the engine
    itself can only be built where TensorRT is installed).
    """
    torch.manual_seed(seed)
    size = input_size or models.get_spec(name).input_size
    run_dir = Path(root) / (dirname or f"{name}-{form}")
    model = models.create(name, num_classes=10, form=form)
    _randomize_bn(model, seed)
    meta = run_meta(name, form, size)
    save_run(run_dir, model.eval(), meta)
    if export:
        deploy = run_dir / "deploy"
        fused = fuse_model(model)
        sha = hashlib.sha256((run_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
        deploy_meta = {**meta, "form": "deploy", "source": {"weights": WEIGHTS_FILE, "sha256": sha}}
        if tensorrt is not None:
            deploy_meta["tensorrt"] = tensorrt
        save_run(deploy, fused, deploy_meta)
        export_onnx(fused, deploy / "model.onnx", input_shape=(3, size, size))
    assert (run_dir / RUN_FILE).is_file()
    return run_dir
