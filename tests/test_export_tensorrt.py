"""TensorRT engines from fuse-export: built, checked against ONNX Runtime, reloadable.

Everything here but the first test needs TensorRT 10 and a CUDA device and skips
with the reason otherwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import HAS_CUDA, HAS_TENSORRT, requires_tensorrt
from rsd_deploy import RSDError, fuse_model, models
from rsd_deploy.backends import get_backend
from rsd_deploy.export import ExportOptions, fuse_export
from rsd_deploy.onnx import export_onnx
from rsd_deploy.run import ModelSource, RunInfo, save_run
from rsd_deploy.verify import logits


@pytest.mark.skipif(HAS_CUDA and HAS_TENSORRT, reason="checks the message shown where TensorRT is absent")
def test_missing_tensorrt_is_a_one_line_hint(tmp_path):
    from rsd_deploy.backends.trt import TrtRunner, build_engine, require_tensorrt

    for call in (require_tensorrt,
                 lambda: build_engine(tmp_path / "m.onnx", tmp_path / "m.engine",
                                      input_shape=(3, 32, 32), opt_batch=1, max_batch=1),
                 lambda: TrtRunner(tmp_path / "m.engine")):
        with pytest.raises(RSDError, match=r"pip install 'rsd-deploy\[trt\]' on a machine with an NVIDIA GPU") as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "m.engine").exists()


@pytest.fixture(scope="module")
def fused_onnx(tmp_path_factory):
    """A fused resnet20 with non-trivial BN statistics, as dynamic-batch ONNX."""
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, form="rsd")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    fused = fuse_model(model.eval())
    path = tmp_path_factory.mktemp("trt") / "model.onnx"
    export_onnx(fused, path, input_shape=(3, 32, 32))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return path, x, logits(get_backend("ort").load(path), x)


@pytest.mark.tensorrt
@requires_tensorrt
@pytest.mark.parametrize("precision, atol, rtol", [("fp32", 1e-3, 1e-3), ("fp16", 1e-2, 2e-2)])
def test_engine_matches_onnxruntime(fused_onnx, tmp_path, precision, atol, rtol):
    from rsd_deploy.backends.trt import TrtRunner, build_engine

    onnx_path, x, ref = fused_onnx
    cache = tmp_path / "timing.cache"
    info = build_engine(onnx_path, tmp_path / "m.engine", input_shape=(3, 32, 32),
                        opt_batch=8, max_batch=16, precision=precision, timing_cache=cache)
    assert info["precision"] == precision
    assert (tmp_path / "m.engine").stat().st_size == info["engine_bytes"] > 0
    assert cache.stat().st_size > 0
    runner = TrtRunner(tmp_path / "m.engine", precision)
    assert (runner.device, runner.precision) == ("cuda", precision)
    assert (runner.min_batch, runner.max_batch) == (1, 16)
    for n in (1, 7, 16):
        out = runner(x[:n].cuda())
        assert out.is_cuda and out.shape == (n, 10)
        err = np.abs(out.float().cpu().numpy() - ref[:n]).max()
        assert err <= atol + rtol * np.abs(ref[:n]).max()
    with pytest.raises(RSDError, match="outside the engine's profile"):
        runner(torch.zeros(17, 3, 32, 32, device="cuda"))
    # A second build reuses the timing cache written by the first.
    before = cache.read_bytes()
    build_engine(onnx_path, tmp_path / "m2.engine", input_shape=(3, 32, 32),
                 opt_batch=8, max_batch=16, precision=precision, timing_cache=cache)
    assert len(cache.read_bytes()) >= len(before)


@pytest.mark.tensorrt
@requires_tensorrt
def test_fuse_export_with_engine(tmp_path):
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, form="rsd").eval()
    info = RunInfo(model=ModelSource("resnet20"), form="rsd", method="rsd", num_classes=10,
                   in_channels=3, input_size=[32, 32])
    save_run(tmp_path / "run", model, info)
    report = fuse_export(tmp_path / "run", ExportOptions(trt=True, max_batch=8, samples=8))
    out = tmp_path / "run" / "deploy"
    assert report["tensorrt"]["status"] == "built"
    assert {"model.engine", "timing.cache", "model.onnx"} <= {p.name for p in out.iterdir()}
    trt_checks = [c for c in report["checks"] if c["name"].startswith("tensorrt fp32")]
    assert [c["batch"] for c in trt_checks] == [1, 8] and all(c["passed"] for c in trt_checks)
    deploy = json.loads((out / "run.json").read_text())
    assert deploy["tensorrt"] == {"min_batch": 1, "opt_batch": 8, "max_batch": 8, "precision": "fp32"}
