"""build_engine against a stand-in ``tensorrt`` module that models TensorRT 10's builder API.

No GPU or TensorRT here: the stand-in records what the builder was asked to do, so the
profile, precision flags, fixed-batch checks, parse errors, timing cache and the atomic
engine write are tested on any machine.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from rsd_deploy import RSDError
from rsd_deploy.backends import trt as trt_backend


def _standin(input_shape=(-1, 3, 8, 8), parse_ok=True, version="10.9.0"):
    """A module with the parts of TensorRT 10's Python API that build_engine uses."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls = {"flags_set": [], "flags_cleared": [], "profiles": [], "cache_in": None}
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Tensor:
        name = "input"
        shape = input_shape

    class Network:
        num_inputs = num_outputs = 1

        def get_input(self, i):
            return Tensor()

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return "Unsupported ONNX op: Foo"

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["profiles"].append((name, lo, opt, hi))

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"cache:" + self.data

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            calls["flags_set"].append(flag)

        def clear_flag(self, flag):
            calls["flags_cleared"].append(flag)

        def add_optimization_profile(self, profile):
            pass

        def create_timing_cache(self, data):
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["cache_in"] = cache.data
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0  # TensorRT 10: explicit batch is the only mode
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["built"] = True
            return b"ENGINE"

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, Parser, Builder
    return trt


@pytest.fixture
def standin(monkeypatch):
    def install(**kw):
        trt = _standin(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
        return trt
    return install


def test_dynamic_batch_profile_precision_and_atomic_engine(standin, tmp_path):
    trt = standin()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    info = trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", input_shape=(3, 8, 8),
                                    min_batch=1, opt_batch=4, max_batch=16, precision="fp16",
                                    timing_cache=cache)
    assert trt.calls["profiles"] == [("input", (1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))]
    assert trt.calls["flags_set"] == ["FP16"] and trt.calls["flags_cleared"] == ["TF32"]
    assert trt.calls["cache_in"] == b"old" and cache.read_bytes() == b"cache:old"
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert info == {"min_batch": 1, "opt_batch": 4, "max_batch": 16, "precision": "fp16", "tf32": False,
                    "tensorrt_version": "10.9.0", "engine_bytes": 6, "device": "stand-in GPU"}


def test_fp32_sets_no_precision_flag(standin, tmp_path):
    trt = standin()
    trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", input_shape=(3, 8, 8),
                             opt_batch=2, max_batch=2)
    assert trt.calls["flags_set"] == [] and trt.calls["flags_cleared"] == ["TF32"]


@pytest.mark.parametrize("kw, needle", [
    ({"input_shape": (4, 3, 8, 8)}, r"fixed batch of 4: the engine profile must be \(4, 4, 4\), not \(1, 2, 8\)"),
    ({"input_shape": (-1, 3, 16, 16)}, r"takes input \(N, 3, 16, 16\), not \(N, \(3, 8, 8\)\)"),
    ({"parse_ok": False}, "cannot parse .*Unsupported ONNX op: Foo"),
    ({"version": "9.3.0"}, "TensorRT 9.3.0 found; rsd-deploy needs TensorRT 10"),
])
def test_refusals_are_one_line_and_write_nothing(standin, tmp_path, kw, needle):
    trt = standin(**kw)
    with pytest.raises(RSDError, match=needle) as e:
        trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", input_shape=(3, 8, 8),
                                 min_batch=1, opt_batch=2, max_batch=8)
    assert "\n" not in str(e.value)
    assert "built" not in trt.calls
    assert list(tmp_path.iterdir()) == []


def test_a_fixed_batch_file_builds_with_its_own_batch(standin, tmp_path):
    trt = standin(input_shape=(4, 3, 8, 8))
    trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", input_shape=(3, 8, 8),
                             min_batch=4, opt_batch=4, max_batch=4)
    assert trt.calls["profiles"] == [] and trt.calls["built"]
