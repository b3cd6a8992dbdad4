"""The pieces of fuse-export: parity numbers, graph audit, options and profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd_deploy import RSDError, models
from rsd_deploy.audit import audit, op_histogram, reference_histogram
from rsd_deploy.export import ExportOptions, load_profile, parse_batch
from rsd_deploy.onnx import export_onnx
from rsd_deploy.verify import Tolerance, compare, parity, require, tile_batch

PROFILES = Path(__file__).resolve().parents[1] / "export"


def test_compare_numbers():
    ref = torch.tensor([[1.0, 4.0, 2.0], [3.0, 0.0, -8.0]])
    out = ref.clone()
    out[0, 0] += 0.5  # no top-1 change
    out[1, 1] += 3.5  # row 1 now picks class 1 instead of 0
    stats = compare(ref, out)
    assert stats["n"] == 2
    assert stats["max_abs"] == pytest.approx(3.5)
    assert stats["max_ref"] == pytest.approx(8.0)
    assert stats["max_rel"] == pytest.approx(3.5 / 8.0)
    assert stats["top1_agreement"] == pytest.approx(0.5)


def test_parity_bound_scales_with_logits():
    ref = np.array([[100.0, -50.0]])
    check = parity("x", ref, ref + 0.01, Tolerance(atol=1e-4, rtol=1e-4))
    assert check["bound"] == pytest.approx(1e-4 + 1e-2)
    assert check["passed"]
    check = parity("x", ref, ref + 0.02, Tolerance(atol=1e-4, rtol=1e-4))
    assert not check["passed"]
    with pytest.raises(RSDError, match="max abs error 0.02 exceeds the tolerance 0.0101"):
        require(check)


def test_parity_rejects_non_finite_and_shape_mismatch():
    ref = np.zeros((2, 3))
    bad = ref.copy()
    bad[1, 2] = np.nan
    check = parity("x", ref, bad, Tolerance(1.0, 1.0))
    assert not check["passed"]
    with pytest.raises(RSDError, match="non-finite"):
        require(check)
    with pytest.raises(RSDError, match="shape"):
        compare(ref, np.zeros((2, 4)))
    with pytest.raises(RSDError, match="non-negative"):
        Tolerance(-1.0, 0.0)
    for bad in (float("nan"), float("inf")):  # inf: a check that cannot fail
        with pytest.raises(RSDError, match="finite"):
            Tolerance(1e-4, bad)


def test_tile_batch():
    x = torch.arange(3).view(3, 1)
    assert tile_batch(x, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert tile_batch(x, 2).flatten().tolist() == [0, 1]


def test_audit_rules():
    ref = {"Add": 9, "Conv": 21, "Gemm": 1, "Relu": 19}
    assert audit(dict(ref), ref)["passed"]
    bad = audit({**ref, "Conv": 22, "BatchNormalization": 1, "Add": 10, "Identity": 3}, ref)
    assert not bad["passed"]
    assert {k for k, r in bad["rules"].items() if not r["passed"]} == {
        "conv_equal", "no_batchnorm", "no_extra_add"}
    assert bad["difference"] == {"Add": 1, "BatchNormalization": 1, "Conv": 1}  # Identity ignored
    fewer_adds = audit({**ref, "Add": 8}, ref)
    assert fewer_adds["passed"] and not fewer_adds["identical"]


def test_reference_histogram_is_the_plain_architecture(tmp_path):
    hist = reference_histogram(models.create("resnet20", num_classes=10, form="deploy"),
                               input_shape=(3, 16, 16), opset=17, batch=None)
    assert hist["Conv"] == 21  # 19 3x3 convs + 2 projection shortcuts
    assert hist["Add"] == 9  # one residual add per basic block
    assert "BatchNormalization" not in hist

    # The RSD training form exported as is keeps BN and its branch bookkeeping.
    export_onnx(models.create("resnet20", num_classes=10).eval(), tmp_path / "m.onnx",
                input_shape=(3, 16, 16))
    rsd = op_histogram(tmp_path / "m.onnx")
    # Per RSD block: three convolutions (stacked KxK, Kx1, 1xK), each with its BN, a Split
    # of the stacked KxK output into its branches and four Adds summing the five branches.
    assert rsd["BatchNormalization"] == 3 * 19
    assert rsd["Conv"] == 3 * 19 + 2
    assert rsd["Split"] == 19
    assert rsd["Add"] == 9 + 4 * 19


def test_parse_batch():
    assert parse_batch("dynamic") is None and parse_batch(None) is None
    assert parse_batch("8") == 8 and parse_batch(8) == 8
    for bad in ("0", "-1", "x", 2.5, True):
        with pytest.raises(RSDError):
            parse_batch(bad)


def test_shipped_profiles_load():
    dyn = load_profile(PROFILES / "onnx-dynamic.json")
    assert dyn.onnx and dyn.batch is None and dyn.keep_unfused and not dyn.trt
    fp32 = load_profile(PROFILES / "trt-fp32.json")
    assert fp32.trt and not fp32.fp16 and fp32.trt_profile() == (1, 64, 64)
    assert fp32.trt_tolerance() == Tolerance(1e-3, 1e-3)
    fp16 = load_profile(PROFILES / "trt-fp16.json")
    assert fp16.trt and fp16.fp16 and fp16.trt_tolerance() == Tolerance(1e-2, 2e-2)
    assert fp16.precision == "fp16"  # the engine is built from model_fp16.onnx
    int8 = load_profile(PROFILES / "trt-int8.json")
    assert int8.trt and int8.int8 and int8.precision == "int8" and int8.quant_format == "trt"
    assert int8.trt_tolerance() == Tolerance(5e-2, 5e-2)
    ort8 = load_profile(PROFILES / "onnx-int8.json")
    assert ort8.int8 and not ort8.trt and ort8.quant_format == "ort" and ort8.max_top1_drop == 1.0
    for p in (dyn, fp32, fp16, int8, ort8):
        p.validate()


def test_int8_format_follows_the_engine_unless_asked():
    assert ExportOptions(int8=True).quant_format == "ort"
    assert ExportOptions(int8=True, trt=True).quant_format == "trt"
    assert ExportOptions(int8=True, int8_format="trt").quant_format == "trt"
    assert ExportOptions(int8=True).writes_onnx and ExportOptions(fp16=True).writes_onnx


def test_flags_override_profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"onnx": True, "trt": True, "fp16": True, "max_batch": 32}))
    opts = load_profile(path).with_overrides({"fp16": False, "max_batch": 8, "opt_batch": 4})
    assert opts.trt and not opts.fp16 and opts.trt_profile() == (1, 4, 8)


def test_options_validation():
    with pytest.raises(RSDError, match="opset 8 cannot be produced"):
        ExportOptions(onnx=True, opset=8).validate()
    ExportOptions(onnx=False, opset=8).validate()  # no ONNX asked for: opset unused
    with pytest.raises(RSDError, match="fixed ONNX batch of 4"):
        ExportOptions(trt=True, batch=4, max_batch=8).validate()
    assert ExportOptions(trt=True, batch=4).trt_profile() == (4, 4, 4)
    with pytest.raises(RSDError, match=r"`opt_batch` must be between 1 and `max_batch` \(8\); got 16"):
        ExportOptions(trt=True, max_batch=8, opt_batch=16).validate()
    with pytest.raises(RSDError, match="non-negative"):
        ExportOptions(atol=-1).validate()
    with pytest.raises(RSDError, match="finite"):
        ExportOptions(trt=True, trt_rtol=float("inf")).validate()
    assert ExportOptions(trt=True).writes_onnx


def test_a_model_the_onnx_exporter_cannot_take_is_one_line(tmp_path):
    # An adaptive pool to a size that does not divide its input has no ONNX form in the exporter.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(3))
    with pytest.raises(RSDError, match=r"^PyTorch's ONNX exporter cannot export Sequential at input \(3, 4, 4\)") as e:
        export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 4, 4))
    assert "\n" not in str(e.value) and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_repeated_weights_get_their_own_initializers(tmp_path, precision):
    import onnx
    import onnxruntime as ort

    # Three convs with bitwise-equal (zero) biases, as in an untrained fused model: the
    # exporter shares them through Identity nodes, which kept ONNX Runtime's CPU provider
    # on its fp16 kernels for an fp16 file. Each conv must read its own initializer.
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))).eval()
    for m in model:
        torch.nn.init.zeros_(m.bias)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, input_shape=(4, 6, 6), precision=precision)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node if n.op_type != "Cast"] == ["Conv"] * 3
    names = {t.name for t in graph.initializer}
    assert all(i in names for n in graph.node if n.op_type == "Conv" for i in n.input[1:])
    assert len(names) == 6  # a weight and a bias per conv, none unused
    x = torch.randn(2, 4, 6, 6)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    atol = 1e-5 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=atol, rtol=atol)


def test_unshare_initializers_keeps_an_identity_that_is_a_graph_output():
    from onnx import TensorProto, helper, numpy_helper

    from rsd_deploy.onnx import unshare_initializers

    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["a"]), helper.make_node("Identity", ["w"], ["out"]),
         helper.make_node("Add", ["x", "a"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])], [w])
    assert unshare_initializers(graph) == 1
    assert [n.op_type for n in graph.node] == ["Identity", "Add"]
    assert sorted(t.name for t in graph.initializer) == ["a", "w"]  # w still read by the kept Identity
