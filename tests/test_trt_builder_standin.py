"""build_engine and TrtRunner against stand-in ``tensorrt`` modules that model TensorRT 10 and 11.

No GPU or TensorRT here: each stand-in records what the builder was asked to do, so the
strongly typed network, the absence of precision flags, the profile, fixed-batch checks,
parse errors, timing cache, the engine inspector's layer datatypes and the atomic engine
write are tested on any machine, for both versions.

What the stand-ins model, from NVIDIA's 10.x -> 11.x migration guide and API references:

- 10: ``BuilderFlag`` has the weak-typing precision flags (``FP16``, ``INT8``, ...) and
  ``TF32``; setting a precision flag on a strongly typed network fails the build.
- 11: weak typing is gone: ``BuilderFlag.FP16`` and the other precision flags do not
  exist (an ``AttributeError``, as on the real module); ``TF32`` stays.
- Both: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (deprecated and ignored in 11),
  an engine inspector whose JSON describes every layer only when the build asked for
  ``ProfilingVerbosity.DETAILED``. Layer tensors carry 10's combined "Format/Datatype"
  string, or 11's separate "Datatype" and "Format"; 10's "Bindings" became 11's
  "I/O Tensors".
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from rsd_deploy import RSDError
from rsd_deploy.backends import trt as trt_backend
from rsd_deploy.export.report import format_report

VERSIONS = ("10.9.0", "11.4.0")
#: The weak-typing flags TensorRT 11 removed.
WEAK_TYPING_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                     "PREFER_PRECISION_CONSTRAINTS")
#: TensorRT's datatype names, and 10's "Format/Datatype" strings for them.
TRT_NAME = {"fp32": "Float", "fp16": "Half", "int8": "Int8"}
FORMAT_10 = {
    "fp32": "Row major linear FP32 format",
    "fp16": "Channel major FP16 format where channel % 8 == 0",
    "int8": "Thirty-two wide channel vectorized row major Int8 format.",
}


def _tensor(version: str, name: str, dtype: str) -> dict:
    """One layer input or output as the inspector's JSON of that version gives it."""
    if version.startswith("10."):
        return {"Name": name, "Location": "Device", "Dimensions": [-1, 16, 8, 8], "Format/Datatype": FORMAT_10[dtype]}
    # 11 splits the field; this Format names no type, so only "Datatype" can tell it.
    return {"Name": name, "Location": "Device", "Dimensions": [-1, 16, 8, 8],
            "Datatype": TRT_NAME[dtype], "Format": "Row major linear format"}


def _layer(version: str, kind: str, dtype_in: str, dtype_out: str | None = None, i: int = 0) -> dict:
    """A layer of kind "conv" (a fused convolution), "reformat", "pool" or "kgen" (a Myelin layer)."""
    types_ = {"conv": ("CaskConvolution", "Convolution"), "reformat": ("Reformat", "Reformat"),
              "pool": ("CaskPooling", "Pooling"), "kgen": ("kgen", None)}
    layer_type, parameter_type = types_[kind]
    layer = {"Name": f"{kind}{i}", "LayerType": layer_type,
             "Inputs": [_tensor(version, f"in{i}", dtype_in)],
             "Outputs": [_tensor(version, f"out{i}", dtype_out or dtype_in)]}
    if parameter_type:
        layer["ParameterType"] = parameter_type
    return layer


def engine_layers(version: str, conv: str, n: int = 4, other: str | None = None, n_other: int = 0) -> list[dict]:
    """An engine as the inspector describes it: an fp32 input reformatted to ``conv``'s type,
    ``n`` convolutions computing in ``conv`` and ``n_other`` in ``other``, and a pooling."""
    layers = [_layer(version, "reformat", "fp32", conv, 0)]
    layers += [_layer(version, "conv", conv, i=i + 1) for i in range(n)]
    layers += [_layer(version, "conv", other, i=n + i + 1) for i in range(n_other)]
    return layers + [_layer(version, "pool", conv, "fp32", n + n_other + 1)]


def _standin(version="10.9.0", input_shape=(-1, 3, 8, 8), parse_ok=True, layers=None,
             io_dtype="FLOAT", strongly_typed_flag=True):
    """A module with the parts of TensorRT 10's or 11's Python API that build_engine and TrtRunner use."""
    head = version.split(".")[0]
    major = int(head) if head.isdigit() else 0
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls = {"flags_set": [], "flags_cleared": [], "profiles": [], "cache_in": None,
                         "network_flags": None, "verbosity": None}
    flags = {"TF32": "TF32", "REFIT": "REFIT"}
    if major == 10:
        flags.update({f: f for f in WEAK_TYPING_FLAGS})
    trt.BuilderFlag = types.SimpleNamespace(**flags)  # 11: BuilderFlag.FP16 -> AttributeError
    # The bit positions differ so that a hard-coded mask would show: 10's is 1 (after
    # EXPLICIT_BATCH, 0), 11's is taken here as 0 (EXPLICIT_BATCH is gone).
    creation = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else {"STRONGLY_TYPED": 0}
    if not strongly_typed_flag:
        creation.pop("STRONGLY_TYPED")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
    strongly_typed_bit = 1 << creation["STRONGLY_TYPED"] if strongly_typed_flag else 0
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(LAYER_NAMES_ONLY="LAYER_NAMES_ONLY", DETAILED="DETAILED",
                                                   NONE="NONE")
    trt.LayerInformationFormat = types.SimpleNamespace(ONELINE="ONELINE", JSON="JSON")
    trt.TensorIOMode = types.SimpleNamespace(NONE="NONE", INPUT="INPUT", OUTPUT="OUTPUT")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT8="INT8")
    engine_layers_ = engine_layers(version, "fp32") if layers is None else layers

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Tensor:
        name = "input"
        shape = input_shape

    class Network:
        num_inputs = num_outputs = 1

        def __init__(self, flags):
            self.strongly_typed = major >= 11 or bool(flags & strongly_typed_bit)

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
        profiling_verbosity = "LAYER_NAMES_ONLY"

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
            calls["network_flags"] = flags
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["verbosity"] = config.profiling_verbosity
            weak = set(WEAK_TYPING_FLAGS) & set(calls["flags_set"])
            if network.strongly_typed and weak:
                return None  # TensorRT 10 refuses precision flags on a strongly typed network
            calls["built"] = True
            return b"ENGINE:" + config.profiling_verbosity.encode()

    class Inspector:
        def __init__(self, detailed):
            self.detailed = detailed

        def get_engine_information(self, fmt):
            assert fmt == "JSON"
            layers = engine_layers_ if self.detailed else [la["Name"] for la in engine_layers_]
            io = (["input", "logits"] if major == 10 else
                  [{"Name": "input", "IOMode": "Input", "DataType": "Float"},
                   {"Name": "logits", "IOMode": "Output", "DataType": "Float"}])
            return json.dumps({"Layers": layers, ("Bindings" if major == 10 else "I/O Tensors"): io})

    class Engine:
        num_io_tensors = 2
        names = ("input", "logits")

        def __init__(self, data):
            self.detailed = data.endswith(b"DETAILED")

        def create_engine_inspector(self):
            return Inspector(self.detailed)

        def create_execution_context(self):
            return object()

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_shape(self, name):
            return input_shape if name == "input" else (input_shape[0], 10)

        def get_tensor_profile_shape(self, name, profile):
            return [(1, *input_shape[1:]), (4, *input_shape[1:]), (16, *input_shape[1:])]

        def get_tensor_dtype(self, name):
            return io_dtype

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            return Engine(data) if data.startswith(b"ENGINE") else None

    trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, Parser, Builder, Runtime
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


def _build(tmp_path, **kw):
    args = {"input_shape": (3, 8, 8), "min_batch": 1, "opt_batch": 2, "max_batch": 8, **kw}
    return trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", **args)


def test_the_11_standin_lacks_the_weak_typing_flags_as_tensorrt_11_does():
    """Otherwise the tests below could not fail on a builder that still sets them."""
    trt10, trt11 = _standin("10.9.0"), _standin("11.4.0")
    for flag in WEAK_TYPING_FLAGS:
        assert getattr(trt10.BuilderFlag, flag) == flag
        with pytest.raises(AttributeError):
            getattr(trt11.BuilderFlag, flag)
    assert trt11.BuilderFlag.TF32 == "TF32"


@pytest.mark.parametrize("version", VERSIONS)
def test_dynamic_batch_profile_precision_and_atomic_engine(standin, tmp_path, version):
    trt = standin(version=version, layers=engine_layers(version, "fp16"))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    info = trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", input_shape=(3, 8, 8),
                                    min_batch=1, opt_batch=4, max_batch=16, precision="fp16",
                                    timing_cache=cache)
    assert trt.calls["profiles"] == [("input", (1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))]
    assert trt.calls["flags_set"] == [] and trt.calls["flags_cleared"] == ["TF32"]
    assert trt.calls["cache_in"] == b"old" and cache.read_bytes() == b"cache:old"
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE:DETAILED"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert info == {"min_batch": 1, "opt_batch": 4, "max_batch": 16, "precision": "fp16",
                    "strongly_typed": True, "tf32": False, "tensorrt_version": version, "engine_bytes": 15,
                    "layer_precisions": {"convolution": {"fp16": 4}, "all": {"fp16": 5, "fp32": 1}},
                    "device": "stand-in GPU"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_strongly_typed_with_no_precision_flag_and_the_engine_precision_recorded(standin, tmp_path, version,
                                                                               precision):
    trt = standin(version=version, layers=engine_layers(version, precision))
    info = _build(tmp_path, precision=precision)
    bit = 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert trt.calls["network_flags"] == bit  # the strongly typed bit, and only it
    assert trt.calls["flags_set"] == [] and trt.calls["flags_cleared"] == ["TF32"]
    assert trt.calls["verbosity"] == "DETAILED"
    assert info["precision"] == precision and info["strongly_typed"] is True
    assert info["layer_precisions"]["convolution"] == {precision: 4}
    assert (tmp_path / "m.engine").is_file()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_silent_fp32_fallback_is_refused_and_writes_nothing(standin, tmp_path, version, precision):
    """An fp32 ONNX file builds an fp32 engine whatever is asked: refused, with what the engine holds."""
    trt = standin(version=version, layers=engine_layers(version, "fp32", n=12))
    cache = tmp_path / "timing.cache"
    with pytest.raises(RSDError) as e:
        _build(tmp_path, precision=precision, timing_cache=cache)
    message = str(e.value)
    assert "\n" not in message and trt.calls["built"]
    assert message.startswith(f"{precision} was asked but the engine TensorRT built from")
    assert "(convolution layers: fp32 12)" in message and "nothing was written" in message
    assert list(tmp_path.iterdir()) == []  # neither the engine nor the timing cache


@pytest.mark.parametrize("version", VERSIONS)
def test_an_engine_mostly_in_another_precision_is_refused(standin, tmp_path, version):
    """More than half of the convolutions must compute in the asked precision."""
    standin(version=version, layers=engine_layers(version, "int8", n=3, other="fp32", n_other=3))
    with pytest.raises(RSDError, match=r"\(convolution layers: int8 3, fp32 3\)"):
        _build(tmp_path, precision="int8")
    assert list(tmp_path.iterdir()) == []
    standin(version=version, layers=engine_layers(version, "int8", n=4, other="fp32", n_other=3))
    info = _build(tmp_path, precision="int8")
    assert info["layer_precisions"]["convolution"] == {"int8": 4, "fp32": 3}


@pytest.mark.parametrize("version", VERSIONS)
def test_an_fp16_file_asked_as_fp32_is_refused(standin, tmp_path, version):
    standin(version=version, layers=engine_layers(version, "fp16"))
    with pytest.raises(RSDError, match=r"fp32 was asked .*\(convolution layers: fp16 4\).*an fp32 ONNX file"):
        _build(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_an_int8_convolution_counts_by_what_it_reads(standin, tmp_path, version):
    """An int8 convolution reads int8 and may write fp32 (no Q after it): it computes in int8."""
    layers = [_layer(version, "conv", "int8", "fp32", i) for i in range(3)]
    standin(version=version, layers=layers)
    assert _build(tmp_path, precision="int8")["layer_precisions"]["convolution"] == {"int8": 3}


@pytest.mark.parametrize("version", VERSIONS)
def test_without_convolution_layers_all_layers_decide(standin, tmp_path, version):
    """Myelin may fuse a network into "kgen" layers: then the majority of all layers decides."""
    layers = [_layer(version, "reformat", "fp32", "fp16", 0), _layer(version, "kgen", "fp16", i=1),
              _layer(version, "kgen", "fp16", "fp32", 2)]
    standin(version=version, layers=layers)
    info = _build(tmp_path, precision="fp16")
    assert info["layer_precisions"] == {"convolution": {}, "all": {"fp16": 2, "fp32": 1}}
    standin(version=version, layers=layers)
    with pytest.raises(RSDError, match=r"\(layers: fp16 2, fp32 1\)"):
        _build(tmp_path, precision="int8")


@pytest.mark.parametrize("version", VERSIONS)
def test_an_engine_without_layer_datatypes_cannot_pass_as_fp16(standin, tmp_path, version, monkeypatch):
    """Without DETAILED verbosity the inspector names layers only: fp16 is unverifiable, fp32 passes."""
    trt = standin(version=version, layers=engine_layers(version, "fp16"))
    monkeypatch.setattr(trt, "ProfilingVerbosity", types.SimpleNamespace(DETAILED="LAYER_NAMES_ONLY"))
    with pytest.raises(RSDError, match="gave no layer datatypes .* so its fp16 precision cannot be verified"):
        _build(tmp_path, precision="fp16")
    assert list(tmp_path.iterdir()) == []
    info = _build(tmp_path)
    assert info["layer_precisions"] == {"convolution": {}, "all": {"unknown": 6}}


def test_11_without_the_deprecated_strongly_typed_flag_builds_strongly_typed(standin, tmp_path):
    """11 types every network strongly and only keeps the flag for compatibility; 10 needs it."""
    trt = standin(version="11.4.0", strongly_typed_flag=False)
    _build(tmp_path)
    assert trt.calls["network_flags"] == 0 and trt.calls["built"]
    standin(version="10.9.0", strongly_typed_flag=False)
    with pytest.raises(RSDError, match="TensorRT 10.9.0 has no strongly typed networks"):
        _build(tmp_path)


def test_without_a_tf32_flag_the_record_says_tf32_is_unknown(standin, tmp_path, monkeypatch):
    trt = standin(version="11.4.0")
    monkeypatch.setattr(trt, "BuilderFlag", types.SimpleNamespace())
    info = _build(tmp_path)
    assert info["tf32"] is None and trt.calls["flags_cleared"] == []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kw, needle", [
    ({"input_shape": (4, 3, 8, 8)}, r"fixed batch of 4: the engine profile must be \(4, 4, 4\), not \(1, 2, 8\)"),
    ({"input_shape": (-1, 3, 16, 16)}, r"takes input \(N, 3, 16, 16\), not \(N, \(3, 8, 8\)\)"),
    ({"parse_ok": False}, "cannot parse .*Unsupported ONNX op: Foo"),
])
def test_refusals_are_one_line_and_write_nothing(standin, tmp_path, version, kw, needle):
    trt = standin(version=version, **kw)
    with pytest.raises(RSDError, match=needle) as e:
        _build(tmp_path)
    assert "\n" not in str(e.value)
    assert "built" not in trt.calls
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", ["9.3.0", "12.0.0", "12.1.1", "dev"])
def test_other_tensorrt_versions_are_refused(standin, tmp_path, version):
    trt = standin(version=version)
    needle = rf"TensorRT {version} found; rsd-deploy needs TensorRT 10 or 11: pip install 'rsd-deploy\[trt\]'"
    for call in (trt_backend.require_tensorrt, lambda: _build(tmp_path),
                 lambda: trt_backend.TrtRunner(tmp_path / "m.engine")):
        with pytest.raises(RSDError, match=needle) as e:
            call()
        assert "\n" not in str(e.value)
    assert "built" not in trt.calls and list(tmp_path.iterdir()) == []
    assert not trt_backend.available("cuda")


@pytest.mark.parametrize("version", VERSIONS)
def test_a_fixed_batch_file_builds_with_its_own_batch(standin, tmp_path, version):
    trt = standin(version=version, input_shape=(4, 3, 8, 8))
    _build(tmp_path, min_batch=4, opt_batch=4, max_batch=4)
    assert trt.calls["profiles"] == [] and trt.calls["built"]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_runner_loads_the_engine_through_the_named_tensor_api(standin, tmp_path, version):
    """Deserialize, find the one input and output by name, read the profile and the I/O types."""
    standin(version=version)
    _build(tmp_path)
    runner = trt_backend.load(tmp_path / "m.engine")
    assert (runner.input_name, runner.output_name) == ("input", "logits")
    assert (runner.min_batch, runner.max_batch, runner.input_shape) == (1, 16, (3, 8, 8))
    assert (runner.input_dtype, runner.output_dtype) == (torch.float32, torch.float32)
    assert (runner.device, runner.precision) == ("cuda", "fp32")
    standin(version=version, io_dtype="INT8")
    with pytest.raises(RSDError, match="tensor 'input' is INT8; rsd-deploy runs engines with fp32 or fp16"):
        trt_backend.load(tmp_path / "m.engine")
    (tmp_path / "bad.engine").write_bytes(b"garbage")
    with pytest.raises(RSDError, match="TensorRT cannot load .*bad.engine: it is corrupt"):
        trt_backend.load(tmp_path / "bad.engine")


def test_the_report_shows_the_engine_convolutions_by_datatype():
    built = {"status": "built", "precision": "int8", "min_batch": 1, "max_batch": 64,
             "layer_precisions": {"convolution": {"int8": 18, "fp32": 1}, "all": {"int8": 20, "fp32": 4}}}
    text = format_report({"checks": [], "tensorrt": built, "out_dir": "deploy"})
    assert "tensorrt: built (int8, batch 1..64; convolutions int8 18, fp32 1)" in text
