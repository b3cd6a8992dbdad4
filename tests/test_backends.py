"""The backend registry and its runners on CPU; TensorRT through stand-in modules; lazy imports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd_deploy import RSDError, fuse_model, models
from rsd_deploy.backends import ArtifactSpec, Availability, get_backend, list_backends, make_artifact
from rsd_deploy.bench.timing import runner_timer
from rsd_deploy.verify import logits, torch_logits

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
PROTOCOL = ("NAME", "LABEL", "SOURCE", "FILE", "DEVICES", "TOLERANCES", "available", "deployed", "make", "load")


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    return fuse_model(models.create("resnet20", num_classes=10, form="rsd").eval())


@pytest.fixture(scope="module")
def x():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_registry_lists_every_backend_with_the_whole_protocol():
    assert list_backends() == ("torch", "ort", "trt")
    for name in list_backends():
        backend = get_backend(name)
        assert backend.NAME == name and all(hasattr(backend, a) for a in PROTOCOL), name
        assert "fp32" in backend.TOLERANCES and backend.DEVICES
        assert backend.SOURCE is None or backend.SOURCE in list_backends()
    with pytest.raises(RSDError, match="unknown backend 'tensorflow'; choose from: torch, ort, trt"):
        get_backend("tensorflow")


def test_torch_and_onnxruntime_runners_agree_with_the_model(fused, x, tmp_path):
    ref = fused(x).detach().numpy()
    spec = ArtifactSpec((3, 32, 32))
    for name in ("torch", "ort"):
        backend = get_backend(name)
        assert backend.available("cpu")
        runner = backend.load(make_artifact(backend, fused, tmp_path, "m", spec), device="cpu", threads=1)
        assert (runner.backend, runner.device, runner.precision, runner.cuda_events) == (name, "cpu", "fp32", False)
        for inputs in (x, x.numpy()):  # tensors and numpy arrays alike
            np.testing.assert_allclose(logits(runner, inputs), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits(runner, x, batch_size=4), ref, rtol=1e-4, atol=1e-4)
        assert isinstance(runner.settings(), dict)
        assert runner_timer(runner, 2, (3, 32, 32))() > 0
    assert (tmp_path / "m.onnx").is_file()
    assert torch.equal(torch_logits(fused, x), torch.from_numpy(logits(get_backend("torch").load(fused), x)))


def test_devices_and_precisions_a_backend_lacks_are_refused(fused, tmp_path):
    with pytest.raises(RSDError, match="unknown device 'tpu'"):
        get_backend("torch").load(fused, device="tpu")
    with pytest.raises(RSDError, match="PyTorch has no 'int8' precision"):
        get_backend("torch").load(fused, precision="int8")
    with pytest.raises(RSDError, match="TensorRT runs on CUDA only"):
        get_backend("trt").load(tmp_path / "m.engine", device="cpu")
    assert not get_backend("trt").available("cpu")
    if not HAS_CUDA:
        for name in ("torch", "ort"):
            availability = get_backend(name).available("cuda")
            assert not availability and "CUDA" in availability.reason
            with pytest.raises(RSDError, match="CUDA"):
                availability.require()


def test_artifacts_chain_through_their_sources_in_fp32(fused, tmp_path, monkeypatch):
    """A stand-in TensorRT backend module, found by the registry's lazy import, gets the ONNX file."""
    made = []

    def make(source, folder, name, spec):
        made.append((Path(source).name, spec.precision))
        return Path(folder) / f"{name}.engine"

    stand_in = types.ModuleType("rsd_deploy.backends.trt")
    stand_in.__dict__.update(NAME="trt", SOURCE="ort", make=make)
    monkeypatch.setitem(sys.modules, "rsd_deploy.backends.trt", stand_in)
    assert get_backend("trt") is stand_in
    spec = ArtifactSpec((3, 32, 32), precision="fp16", profile=(1, 2, 4))
    assert make_artifact(stand_in, fused, tmp_path, "m", spec) == tmp_path / "m.engine"
    assert made == [("m.onnx", "fp16")] and (tmp_path / "m.onnx").is_file()


@pytest.mark.skipif(HAS_CUDA or HAS_TENSORRT, reason="checks the messages where TensorRT and CUDA are absent")
def test_tensorrt_availability_through_its_lazy_import(monkeypatch):
    trt = get_backend("trt")
    assert "TensorRT is not installed: pip install 'rsd-deploy[trt]'" in trt.available().reason
    # A stand-in tensorrt module: the import now succeeds, and the missing GPU is named.
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    reason = trt.available().reason
    assert reason.startswith("TensorRT needs a CUDA device") and "\n" not in reason
    assert Availability(reason) == trt.available("cuda")


def test_import_rsd_deploy_loads_no_optional_backend_library():
    """Not on ``import rsd_deploy``, nor on importing the commands' modules and every backend."""
    heavy = ("onnxruntime", "matplotlib", "sklearn", "tensorrt", "onnx")
    loaded = f"print([m for m in {heavy!r} if m in sys.modules])"
    code = "; ".join([
        "import sys", "import rsd_deploy", loaded,
        "import rsd_deploy.export, rsd_deploy.bench, rsd_deploy.cli, rsd_deploy.training",
        "from rsd_deploy.backends import get_backend, list_backends",
        "[get_backend(n) for n in list_backends()]", loaded,
    ])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]"], out.stdout
