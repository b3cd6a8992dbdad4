"""Shared test helpers: run directories made by the real trainer and exporter, and skips.

- :func:`trained_run` runs ``rsd_deploy.training.train`` (what ``rsd-deploy train`` runs)
  for a few steps on real images. A few steps leave an untrained net that predicts
  nearly one class, which would make a top-1 comparison unable to fail; ``probe`` then
  fits the final linear layer on the trained body's features (a linear probe), so the
  model predicts varied classes as a trained one does, without the cost of training
  the whole network on CPU.
- :func:`untrained_run` writes an RSD (or plain) run with random weights and non-trivial
  BatchNorm statistics, and exports it with ``rsd_deploy.export.fuse_export`` (what
  ``rsd-deploy fuse-export`` runs) into ``RUN_DIR/deploy``: the bench tests' runs.
- :func:`on_log` calls a function with every progress message the library logs.
- :func:`benchmark_module` imports a script of ``benchmarks/`` for a test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rsd_deploy import blocks, models
from rsd_deploy.data import load_datasets
from rsd_deploy.export import ExportOptions, fuse_export
from rsd_deploy.run import ModelSource, Normalization, RunInfo, TensorRTProfile, load_run, read_run, save_run
from rsd_deploy.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

@contextlib.contextmanager
def on_log(fn: Callable[[str], None]) -> Iterator[None]:
    """Call ``fn(message)`` for every record the library logs at INFO or above, while inside."""

    class Hook(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fn(record.getMessage())

    logger, hook = logging.getLogger("rsd_deploy"), Hook()
    level = logger.level
    logger.addHandler(hook)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(hook)
        logger.setLevel(level)


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[Any]:
    """``benchmarks/NAME.py`` imported as a module (they are scripts), torch's thread count restored after."""
    import sys

    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        torch.set_num_threads(threads)  # the scripts set their own


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_tensorrt = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TENSORRT),
    reason="needs TensorRT (pip install 'rsd-deploy[trt]') and a CUDA device",
)


# Untrained runs, exported by the real exporter --------------------------------------------------


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics and affine parameters (and conv biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.eps = float(torch.rand(1, generator=g) * 1e-3 + 1e-5)  # each BN its own eps
            elif isinstance(m, blocks.RSDConv) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model



def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, as after training, so fusion has work to do."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def untrained_info(name: str, form: str = "rsd", input_size: int | None = None,
                   num_classes: int = 10) -> RunInfo:
    """The record of an untrained run of zoo model ``name`` (no data set: export checks on random inputs)."""
    size = input_size or models.get_spec(name).input_size
    return RunInfo(
        model=ModelSource(name), form=form, method="rsd" if form == "rsd" else "baseline",
        num_classes=num_classes, in_channels=3, input_size=[size, size],
        classes=[f"c{i}" for i in range(num_classes)],
        normalization=Normalization([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
        config={"note": "untrained: made by tests/helpers"},
    )


def untrained_run(root: Path, name: str = "resnet20", *, form: str = "rsd", export: bool = True,
                  input_size: int | None = None, tensorrt: dict[str, Any] | None = None,
                  seed: int = 0, dirname: str | None = None) -> Path:
    """An untrained run under ``root``; with ``export`` also its ``deploy/`` folder (ONNX, dynamic batch).

    ``tensorrt`` is recorded as the deploy folder's engine profile (see :func:`record_engine`):
    the engine itself can only be built where TensorRT is installed.
    """
    torch.manual_seed(seed)
    run_dir = Path(root) / (dirname or f"{name}-{form}")
    info = untrained_info(name, form, input_size)
    model = info.build_model()
    _randomize_bn(model, seed)
    save_run(run_dir, model.eval(), info)
    if export:
        fuse_export(run_dir, ExportOptions(onnx=True, samples=8))
        if tensorrt is not None:
            record_engine(run_dir / "deploy", tensorrt)
    return run_dir


def record_engine(deploy_dir: Path, profile: dict[str, Any]) -> None:
    """Record an engine ``profile`` in the export ``deploy_dir``, as ``fuse-export --trt`` does."""
    info = read_run(deploy_dir)
    info.replace(tensorrt=TensorRTProfile(**profile)).write(deploy_dir)


# Trained runs ------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _datasets(data_dir: str, input_size: int = 32):
    return load_datasets("imagefolder", data_dir, input_size=input_size)


def fit_head(model: nn.Module, train, n: int, generator: torch.Generator) -> None:
    """Fit ``model.head``'s final linear layer to ``n`` training images (body frozen, eval)."""
    idx = torch.randperm(len(train), generator=generator)[:n].tolist()
    x, y = zip(*(train[i] for i in idx), strict=True)
    x, y = torch.stack(x), torch.tensor(y)
    linear = model.head[-1]
    with torch.no_grad():
        feats = torch.cat([model.head[:-1](model.forward_to(c, len(model.stages))) for c in x.split(128)])
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mu) / sd
    w = torch.zeros(linear.out_features, z.shape[1], requires_grad=True)
    b = torch.zeros(linear.out_features, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardization into the layer
        linear.weight.copy_(w / sd)
        linear.bias.copy_(b - (w / sd) @ mu)


def trained_run(
    run_dir: str | Path,
    name: str,
    data_dir: str | Path,
    *,
    steps: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    form: str = "rsd",
    probe: int = 0,
    input_size: int | None = None,
) -> tuple[nn.Module, RunInfo]:
    """Train ``name`` for ``steps`` steps on ``data_dir`` into ``run_dir``; optionally probe.

    ``input_size``: the side of the images (default: the model's own). Returns the model
    (eval mode) and its record.
    """
    config = TrainConfig(
        model=name, method="rsd" if form == "rsd" else "baseline", data="imagefolder",
        data_dir=str(data_dir), epochs=1, max_steps=steps, batch_size=batch_size, seed=seed,
        train_samples=steps * batch_size, val_samples=64, workers=0, input_size=input_size,
    )
    train(config, run_dir)
    model, info = load_run(run_dir)
    if probe:
        train_ds, _, _ = _datasets(str(data_dir), info.input_size[0])
        fit_head(model, train_ds, probe, torch.Generator().manual_seed(seed))
        info.metrics["linear_probe_images"] = probe
        info = save_run(run_dir, model, info)
    return model, info
