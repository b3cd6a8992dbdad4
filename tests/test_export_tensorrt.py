"""TensorRT engines from fuse-export: built, checked against ONNX Runtime, reloadable.

Everything here but the first test needs TensorRT (10 or 11) and a CUDA device and
skips with the reason otherwise. Builds are strongly typed, so each precision is
built from an ONNX file that carries it: fp32, fp16 (fp16 weights and compute, fp32
input and output) and Q/DQ int8 (symmetric, per-channel weights).
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


def fused_onnx_model() -> torch.nn.Module:
    """A fused resnet20 with non-trivial BN statistics (the same every call).

    The statistics are measured on random images (as training would), so activations
    stay in fp16's range: with arbitrary ones they grow past 65504 and an fp16 engine
    would overflow.
    """
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, form="rsd")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.momentum = None  # running statistics: the plain average over the batches
        model.train()
        for _ in range(2):
            model(torch.randn(32, 3, 32, 32))
    return fuse_model(model.eval())


@pytest.fixture(scope="module")
def fused_onnx(tmp_path_factory):
    """The fused resnet20 as dynamic-batch ONNX, inputs, and ONNX Runtime's logits."""
    fused = fused_onnx_model()
    path = tmp_path_factory.mktemp("trt") / "model.onnx"
    export_onnx(fused, path, input_shape=(3, 32, 32))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return path, x, logits(get_backend("ort").load(path), x)


class _HalfWithFloatIO(torch.nn.Module):
    """fp16 weights and compute behind fp32 input and output (what an fp16 ONNX file holds)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _fp16_onnx(model: torch.nn.Module, path) -> None:
    torch.onnx.export(_HalfWithFloatIO(model).eval(), (torch.zeros(1, 3, 32, 32),), str(path),
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _int8_onnx(fp32_path, path, x: torch.Tensor) -> None:
    """Static Q/DQ quantization as TensorRT wants it: symmetric int8 activations and weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i:i + 4].numpy()} for i in range(0, len(x), 4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


@pytest.fixture(scope="module")
def onnx_files(fused_onnx, tmp_path_factory):
    """The fused model's ONNX file per precision, with the inputs and ONNX Runtime's logits on each."""
    fp32_path, x, ref = fused_onnx
    folder = tmp_path_factory.mktemp("precisions")
    _fp16_onnx(fused_onnx_model(), folder / "fp16.onnx")
    _int8_onnx(fp32_path, folder / "int8.onnx", x)
    ort = get_backend("ort")
    return {"fp32": (fp32_path, ref), "fp16": (folder / "fp16.onnx", ref),
            "int8": (folder / "int8.onnx", logits(ort.load(folder / "int8.onnx"), x))}


@pytest.mark.tensorrt
@requires_tensorrt
@pytest.mark.parametrize("precision, atol, rtol", [("fp32", 1e-3, 1e-3), ("fp16", 1e-2, 2e-2), ("int8", 5e-2, 5e-2)])
def test_engine_matches_onnxruntime(fused_onnx, onnx_files, tmp_path, precision, atol, rtol):
    """fp32 and fp16 against ONNX Runtime's fp32 logits, int8 against its run of the same Q/DQ file."""
    from rsd_deploy.backends.trt import TrtRunner, build_engine

    onnx_path, ref = onnx_files[precision]
    x = fused_onnx[1]
    cache = tmp_path / "timing.cache"
    info = build_engine(onnx_path, tmp_path / "m.engine", input_shape=(3, 32, 32),
                        opt_batch=8, max_batch=16, precision=precision, timing_cache=cache)
    assert info["precision"] == precision and info["strongly_typed"]
    convs = info["layer_precisions"]["convolution"]
    assert convs.get(precision, 0) * 2 > sum(convs.values()), convs  # the real inspector's JSON, parsed
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
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_an_fp32_file_asked_as_fp16_or_int8_is_refused(fused_onnx, tmp_path, precision):
    """A strongly typed build of an fp32 file is fp32 whatever is asked: no silent fallback."""
    from rsd_deploy.backends.trt import build_engine

    with pytest.raises(RSDError, match=rf"{precision} was asked but .*\(convolution layers: fp32 \d+"):
        build_engine(fused_onnx[0], tmp_path / "m.engine", input_shape=(3, 32, 32), opt_batch=8, max_batch=16,
                     precision=precision)
    assert list(tmp_path.iterdir()) == []


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
