"""Deployment precisions on CPU: fuse-export's int8 file (calibrated on training images, gated on
validation top-1) and fp16 file, the engine's source file per precision, and bench --precision.

The run is resnet20 at 16x16 trained a few steps on cifar10-mini with a linear probe (see
helpers.trained_run), so it predicts varied classes and its top-1 figures can move.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from helpers import on_log, trained_run
from rsd_deploy import RSDError, quantize
from rsd_deploy.backends import Availability, get_backend
from rsd_deploy.backends import trt as trt_backend
from rsd_deploy.bench import Budget, bench_run, timing
from rsd_deploy.cli import main
from rsd_deploy.data import calibration_dataset, eval_dataset, first_batch
from rsd_deploy.export import ExportOptions, fuse_export
from rsd_deploy.export import steps as export_steps
from rsd_deploy.fuse import fuse_model
from rsd_deploy.run import load_run, read_run
from rsd_deploy.verify import logits, torch_logits

SIZE = 16


@pytest.fixture(scope="module")
def run16(tmp_path_factory, cifar_mini) -> Path:
    """A resnet20 run on 16x16 cifar10-mini images: 2 steps of 32 images and a 1000-image linear probe
    (~19 % top-1 over all 10 classes: far from chance, and its predictions can move)."""
    run_dir = tmp_path_factory.mktemp("quantize") / "resnet20"
    trained_run(run_dir, "resnet20", cifar_mini, steps=2, batch_size=32, probe=1000, input_size=SIZE)
    return run_dir


@pytest.fixture(scope="module")
def int8_export(run16):
    """``fuse-export RUN --onnx --int8`` into the run's deploy folder (the one bench reads), its
    output, the calibration images the quantizer read, and the report."""
    seen: list[np.ndarray] = []

    class SpyReader(quantize.CalibrationReader):
        def get_next(self):
            batch = super().get_next()
            if batch is not None:
                seen.append(batch["input"].copy())
            return batch

    mp = pytest.MonkeyPatch()
    mp.setattr(quantize, "CalibrationReader", SpyReader)
    try:
        res = _invoke("fuse-export", run16, "--onnx", "--int8", "--samples", "16")
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    report = json.loads((run16 / "deploy" / "report.json").read_text())
    return res, np.concatenate(seen), report


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result) -> str:
    lines = [ln for ln in result.output.strip().splitlines() if not ln.startswith("[fuse-export]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _top1(runner, dataset) -> np.ndarray:
    """Predictions of ``runner`` on every image of ``dataset``, in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=500)
    return np.concatenate([logits(runner, x).argmax(1) for x, _ in loader])


# The int8 file and its gate ---------------------------------------------------------------------


def test_int8_gate_passes_with_figures_that_add_up(run16, int8_export):
    """model_int8.onnx is written; report.json's figures are recomputed here from the two files."""
    res, _, report = int8_export
    out = run16 / "deploy"
    assert {"model.onnx", "model_int8.onnx", "report.json", "run.json"} <= {p.name for p in out.iterdir()}
    int8 = report["int8"]
    assert int8["passed"] and report["passed"]
    _, info = load_run(run16)
    assert int8["calibration"] == {"format": "ort", "method": "minmax", "samples": 192,
                                   "images": f"192 training images of imagefolder ({info.data.dir})"}

    # Recomputed: top-1 of model.onnx and model_int8.onnx on all 2000 validation images.
    val = eval_dataset(info.data)
    labels = np.array([y for _, y in val.samples])
    ort = get_backend("ort")
    p32, p8 = _top1(ort.load(out / "model.onnx"), val), _top1(ort.load(out / "model_int8.onnx"), val)
    assert int8["images"] == len(val) == 2000
    assert int8["fp32_top1"] == pytest.approx(100 * (p32 == labels).mean())
    assert int8["int8_top1"] == pytest.approx(100 * (p8 == labels).mean())
    assert int8["top1_drop"] == pytest.approx(int8["fp32_top1"] - int8["int8_top1"])
    assert int8["top1_agreement"] == pytest.approx((p32 == p8).mean())
    assert int8["fp32_top1"] > 15 and len(set(p32)) == 10  # a model that predicts (chance: 10 %)
    assert int8["top1_agreement"] < 1.0  # really quantized: some predictions moved
    assert int8["top1_drop"] <= int8["max_top1_drop"] == 1.0
    gate = next(c for c in report["checks"] if c["name"] == "int8 top-1 gate on validation images")
    assert gate["passed"] and gate["top1_drop"] == int8["top1_drop"]
    assert f"drop {int8['top1_drop']:.2f} points" in res.output

    # The file: Q/DQ with per-channel int8 weights and uint8 activations (the ort format).
    proto = onnx.load(str(out / "model_int8.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quant = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quant and {inits[n.input[2]].dtype for n in quant} == {np.dtype(np.uint8)}
    conv_weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                    and inits.get(n.input[0]) is not None and inits[n.input[0]].ndim == 4]
    assert len(conv_weights) == 21  # every convolution of resnet20
    assert all(inits[n.input[0]].dtype == np.int8 and inits[n.input[1]].ndim == 1 for n in conv_weights)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["precision"] == "int8" and props["model"] == "resnet20"
    assert json.loads(props["quantization"]) == {"format": "ort", "method": "minmax", "samples": 192}
    deploy = read_run(out)
    assert deploy.onnx.int8.file == "model_int8.onnx" and deploy.onnx.int8.calib_samples == 192
    assert report["artifacts"]["model_int8.onnx"]["bytes"] == (out / "model_int8.onnx").stat().st_size


def test_calibration_reads_training_images_never_validation_ones(run16, int8_export):
    """What the quantizer read: the 192 images calibrate() spreads over the training split."""
    _, seen, _ = int8_export
    _, info = load_run(run16)
    train = calibration_dataset(info.data)
    assert seen.shape == (192, 3, SIZE, SIZE)
    expected, _ = first_batch(train, 192)
    np.testing.assert_array_equal(seen, expected.numpy())
    # Evaluation preprocessing (no random crop or flip): the same image, read again, is identical.
    step = len(train) // 192
    np.testing.assert_array_equal(seen[5], train[5 * step][0].numpy())
    assert len({train.samples[i * step][1] for i in range(192)}) == 10  # spread over every class
    val, _ = first_batch(eval_dataset(info.data), 2000)
    val_keys = {x.tobytes() for x in val.numpy()}
    assert not any(x.tobytes() in val_keys for x in seen)


def test_gate_refuses_a_quantizer_that_breaks_the_model(run16, int8_export, tmp_path, monkeypatch):
    """A quantizer whose file negates the logits: the gate refuses with the figures, nothing written."""
    real = export_steps.quantize_onnx

    def breaking(src, dst, calibration, **kw):
        real(src, dst, calibration, **kw)
        proto = onnx.load(str(dst))
        last = next(n for n in proto.graph.node if "logits" in n.output)
        last.output[0] = "logits_before"
        proto.graph.node.append(onnx.helper.make_node("Neg", ["logits_before"], ["logits"]))
        onnx.save(proto, str(dst))

    monkeypatch.setattr(export_steps, "quantize_onnx", breaking)
    out = tmp_path / "d"
    res = _invoke("fuse-export", run16, "--int8", "--samples", "8", "--out", out)
    assert res.exit_code == 1
    line = _one_line_error(res)
    fp32 = int8_export[2]["int8"]["fp32_top1"]
    assert f"(fp32 {fp32:.2f}% -> int8 " in line and "on 2000 images" in line, line
    int8_top1 = float(line.split("-> int8 ")[1].split("%")[0])
    assert int8_top1 < fp32 - 10  # argmin instead of argmax
    assert f"top-1 drops {fp32 - int8_top1:.2f} points" in line
    assert "more than --max-top1-drop 1;" in line and "--calib-method" in line and "nothing was written" in line
    assert not out.exists()


def test_gate_refuses_a_real_drop_at_max_top1_drop_0(run16, int8_export, tmp_path):
    """The file the passing export wrote loses top-1; with no drop allowed it is refused."""
    figures = int8_export[2]["int8"]
    assert figures["top1_drop"] > 0  # this run's real int8 drop (deterministic: same images, same model)
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    res = _invoke("fuse-export", run16, "--int8", "--max-top1-drop", "0", "--samples", "8", "--out", out)
    assert res.exit_code == 1
    line = _one_line_error(res)
    assert (f"top-1 drops {figures['top1_drop']:.2f} points (fp32 {figures['fp32_top1']:.2f}% -> int8 "
            f"{figures['int8_top1']:.2f}% on 2000 images, top-1 agreement {figures['top1_agreement']:.4f})") in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_int8_with_a_fixed_batch(run16, tmp_path, monkeypatch):
    """A fixed-batch model takes only its batch: calibration batches of 4 (10 images cycled to 12),
    and the gate pads the last chunk of the 2000 validation images."""
    batches = []

    class SpyReader(quantize.CalibrationReader):
        def get_next(self):
            batch = super().get_next()
            if batch is not None:
                batches.append(len(batch["input"]))
            return batch

    monkeypatch.setattr(quantize, "CalibrationReader", SpyReader)
    monkeypatch.setattr(quantize, "GATE_BATCH", 3)  # unused with a fixed batch: chunks of 4
    out = tmp_path / "d"
    report = fuse_export(run16, ExportOptions(int8=True, batch=4, calib_samples=10, samples=8, out=str(out),
                                              max_top1_drop=100.0))
    assert batches == [4, 4, 4]
    assert report["int8"]["calibration"]["samples"] == 10 and report["int8"]["images"] == 2000
    proto = onnx.load(str(out / "model_int8.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    _, info = load_run(run16)
    val = eval_dataset(info.data)
    labels = np.array([y for _, y in val.samples])
    runner, x = get_backend("ort").load(out / "model_int8.onnx"), first_batch(val, 2000)[0]
    preds = quantize.predictions(runner, x, 4)
    assert report["int8"]["int8_top1"] == pytest.approx(100 * (preds == labels).mean())
    np.testing.assert_array_equal(quantize.predictions(runner, x[:7], 4), preds[:7])  # 7 padded to 8


def test_int8_is_refused_without_the_runs_real_data(run16, tmp_path):
    """No calibration on random inputs: a run whose data set moved away is refused, before any work."""
    run = tmp_path / "run"
    shutil.copytree(run16, run, ignore=shutil.ignore_patterns("deploy", "bench"))
    meta = json.loads((run / "run.json").read_text())
    meta["data"]["dir"] = str(tmp_path / "moved-away")
    (run / "run.json").write_text(json.dumps(meta))
    seen: list[str] = []
    with on_log(seen.append):
        res = _invoke("fuse-export", run, "--onnx", "--int8")
    assert res.exit_code == 1
    line = _one_line_error(res)
    assert "int8 quantization calibrates on the run's training images" in line
    assert "is not available here" in line and "does not calibrate on random inputs" in line
    assert not any(m.startswith("fusing") for m in seen)
    assert not (run / "deploy").exists()
    # Without int8 the same run still exports (on fixed random inputs).
    assert fuse_export(run, ExportOptions(onnx=True, samples=4))["verification_inputs"].startswith("4 fixed random")


@pytest.mark.parametrize("args, fragment", [
    (["--int8", "--calib-samples", "-5"], "--calib-samples must be at least 1 (got -5)"),
    (["--int8", "--calib-samples", "0"], "--calib-samples must be at least 1 (got 0)"),
    (["--int8", "--max-top1-drop", "nan"], "--max-top1-drop must be a finite number (got nan)"),
    (["--int8", "--max-top1-drop", "-1"], "--max-top1-drop must be >= 0 (got -1.0)"),
    (["--int8", "--int8-format", "tensorrt"], "--int8-format must be one of ort, trt (got 'tensorrt')"),
    (["--int8", "--calib-method", "kl"], "--calib-method must be one of minmax, entropy, percentile (got 'kl')"),
    (["--int8", "--opset", "11"], "--int8 quantizes weights per channel, which needs --opset 13 or later"),
    (["--trt", "--int8", "--fp16"], "a TensorRT engine has one precision: ask for --fp16 or --int8"),
    (["--trt", "--int8", "--int8-format", "ort"], "set --int8-format trt (or leave it unset)"),
])
def test_bad_precision_values_are_one_line_before_any_work(run16, tmp_path, args, fragment):
    out = tmp_path / "d"
    seen: list[str] = []
    with on_log(seen.append):
        res = _invoke("fuse-export", run16, *args, "--out", out)
    assert res.exit_code == 1
    assert fragment in _one_line_error(res)
    assert seen == [] and not out.exists()


def test_profile_values_are_checked_too(run16, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"int8": True, "calib_method": "median"}))
    res = _invoke("fuse-export", run16, "--profile", path, "--out", tmp_path / "d")
    assert "--calib-method must be one of minmax, entropy, percentile (got 'median')" in _one_line_error(res)
    path.write_text(json.dumps({"int8": True, "max_top1_drop": "1"}))
    res = _invoke("fuse-export", run16, "--profile", path, "--out", tmp_path / "d")
    assert "max_top1_drop must be a number" in _one_line_error(res)
    assert not (tmp_path / "d").exists()


# The fp16 file --------------------------------------------------------------------------------------


def test_fp16_file_runs_in_onnxruntime_and_matches_pytorch(run16, tmp_path):
    out = tmp_path / "d"
    report = fuse_export(run16, ExportOptions(fp16=True, samples=16, out=str(out)))
    assert {"model.onnx", "model_fp16.onnx"} <= {p.name for p in out.iterdir()}
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["onnxruntime fp16 vs pytorch fused, batch 16"]["passed"]
    assert checks["onnxruntime fp16 vs pytorch fused, batch 16"]["atol"] == 1e-2
    assert read_run(out).onnx.fp16_file == "model_fp16.onnx"

    proto = onnx.load(str(out / "model_fp16.onnx"))
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]
    assert len(weights) == 21 and {i.data_type for i in weights} == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # On 200 validation images: within fp16 tolerance of the fused PyTorch model in fp32, and
    # off by fp16 rounding (an fp32 file would agree to ~1e-6).
    model, info = load_run(run16)
    x, _ = first_batch(eval_dataset(info.data), 200)
    ref = torch_logits(fuse_model(model), x).numpy()
    got = logits(get_backend("ort").load(out / "model_fp16.onnx", precision="fp16"), x)
    err = np.abs(got - ref).max()
    assert 1e-4 < err <= 1e-2 + 2e-2 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99


# TensorRT: the engine's ONNX file per precision (stand-ins for TensorRT) ---------------------------


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_the_engine_is_built_from_the_file_of_its_precision(run16, tmp_path, monkeypatch, precision):
    """Strongly typed builds: fp16 from model_fp16.onnx, int8 from the symmetric model_int8.onnx
    (checked against ONNX Runtime running that file). The stand-in engine runs its ONNX file."""
    built = []

    def build_engine(onnx_path, engine_path, **kw):
        built.append((Path(onnx_path).name, kw["precision"]))
        Path(engine_path).write_text(str(onnx_path))
        return {"min_batch": kw["min_batch"], "opt_batch": kw["opt_batch"], "max_batch": kw["max_batch"],
                "precision": kw["precision"]}

    def load(path, *, precision="fp32", device="cuda", threads=None):
        return get_backend("ort").load(Path(path).read_text())  # the engine "is" its ONNX file

    monkeypatch.setattr(trt_backend, "available", lambda device="cuda": Availability())
    monkeypatch.setattr(trt_backend, "build_engine", build_engine)
    monkeypatch.setattr(trt_backend, "load", load)
    out = tmp_path / "d"
    # The gate is not what this test is about: the symmetric format may lose more top-1.
    report = fuse_export(run16, ExportOptions(trt=True, max_batch=8, samples=8, out=str(out), max_top1_drop=100.0,
                                              **{precision: True}))
    source = f"model_{precision}.onnx"
    assert built == [(source, precision)] and report["tensorrt"]["onnx_file"] == source
    trt_checks = [c for c in report["checks"] if c["name"].startswith(f"tensorrt {precision}")]
    assert [c["batch"] for c in trt_checks] == [1, 8] and all(c["passed"] for c in trt_checks)
    if precision == "int8":
        assert report["int8"]["calibration"]["format"] == "trt"  # what TensorRT wants, by default
        assert all(c["max_abs"] == 0 for c in trt_checks)  # against ONNX Runtime on the same file
        proto = onnx.load(str(out / source))
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
        assert {z.dtype for z in zero_points} == {np.dtype(np.int8)} and not any(z.any() for z in zero_points)
    else:
        assert all(0 < c["max_abs"] <= c["bound"] for c in trt_checks)  # fp16 file against the fp32 one
    assert read_run(out).tensorrt.precision == precision


# bench --precision ----------------------------------------------------------------------------------


def test_bench_int8_times_three_int8_models_and_the_fp32_fused_one(run16, int8_export, tmp_path, monkeypatch):
    quantized = []
    real = quantize.quantize_onnx

    def spy(src, dst, calibration, **kw):
        quantized.append((Path(dst).name, calibration))
        return real(src, dst, calibration, **kw)

    monkeypatch.setattr(quantize, "quantize_onnx", spy)
    out = tmp_path / "bench"
    res = CliRunner().invoke(main, ["bench", str(run16), "--ort", "--precision", "int8", "--batch-sizes", "1,4",
                                    "--iters", "3", "--warmup-s", "0", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "bench.json").read_text())
    assert report["precision"] == "int8"
    assert report["calibration"]["format"] == "ort" and report["calibration"]["samples"] == 192
    assert report["calibration"]["images"].startswith("192 training images")
    # The same Calibration (images, method, format) for all three int8 models.
    assert sorted(name for name, _ in quantized) == ["baseline.onnx", "fused.onnx", "unfused.onnx"]
    assert len({id(c) for _, c in quantized}) == 1
    models = report["models"]
    assert set(models) == {"unfused", "fused", "baseline", "fused_fp32"}
    assert str(run16 / "deploy" / "model.onnx") in models["fused_fp32"]["description"]
    assert "int8 (ort format, minmax calibration on 192 training images)" in models["fused"]["description"]
    timings = json.loads((out / "timings.json").read_text())
    for entry in report["results"]:
        assert set(entry["models"]) == set(models) and entry["rounds"] == 3
        med = {r: t["median"] for r, t in timings["batches"][str(entry["batch"])].items()}
        speedup = float(np.median([a / b for a, b in zip(med["fused_fp32"], med["fused"], strict=True)]))
        assert entry["ratios"]["fused_fp32/fused"]["value"] == pytest.approx(speedup, rel=1e-4)
        assert f"batch {entry['batch']:>4}: fused int8 vs fp32" in res.output
    md = (out / "bench.md").read_text()
    assert "int8 speed-up of fused" in md and "| 4 | fused_fp32 |" in md


def test_bench_precisions_a_backend_lacks_or_without_data(run16, tmp_path):
    res = CliRunner().invoke(main, ["bench", str(run16), "--torch", "--precision", "int8", "--iters", "1"])
    assert res.exit_code == 1 and "PyTorch has no 'int8' precision (it has: fp32)" in res.stderr
    res = CliRunner().invoke(main, ["bench", str(run16), "--ort", "--precision", "int4", "--iters", "1"])
    assert res.exit_code == 1 and "ONNX Runtime has no 'int4' precision (it has: fp32, fp16, int8)" in res.stderr
    run = tmp_path / "run"
    shutil.copytree(run16, run)
    meta = json.loads((run / "run.json").read_text())
    meta["data"]["dir"] = str(tmp_path / "gone")
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RSDError, match="calibrates on the run's training images"):
        bench_run(run, "ort", precision="int8", budget=Budget(iters=1), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bench_int8_of_an_old_opset_export_is_refused_before_calibration(run16, tmp_path, monkeypatch):
    out = tmp_path / "deploy12"
    fuse_export(run16, ExportOptions(onnx=True, opset=12, samples=4, out=str(out)))
    from rsd_deploy.bench import compare

    monkeypatch.setattr(compare, "calibrate", lambda *a, **k: pytest.fail("calibrated before the refusal"))
    with pytest.raises(RSDError, match=r"^int8 models \(per-channel Q/DQ\) need opset 13 or later; .* opset 12: "
                       r"re-export it with `opset` 13$"):
        bench_run(run16, "ort", deploy=out, precision="int8", budget=Budget(iters=1), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bench_fp16_converts_all_three(run16, int8_export, tmp_path, monkeypatch):
    loaded = []
    real = get_backend("ort").load

    graphs = {}

    def spy(path, **kw):
        loaded.append((Path(path).name, kw["precision"], _weight_type(path)))
        graphs[Path(path).name] = sorted(n.op_type for n in onnx.load(str(path)).graph.node)
        return real(path, **kw)

    monkeypatch.setattr(get_backend("ort"), "load", spy)
    monkeypatch.setattr(timing, "runner_timer", lambda runner, batch, shape: lambda: 1e-3)
    report = bench_run(run16, "ort", precision="fp16", batch_sizes="2", budget=Budget(warmup_s=0, iters=2),
                       threads=1, out=tmp_path / "b")
    assert report["precision"] == "fp16" and report["calibration"] is None
    assert sorted(loaded) == [("baseline.onnx", "fp16", onnx.TensorProto.FLOAT16),
                              ("fused.onnx", "fp16", onnx.TensorProto.FLOAT16),
                              ("model.onnx", "fp32", onnx.TensorProto.FLOAT),
                              ("unfused.onnx", "fp16", onnx.TensorProto.FLOAT16)]
    assert report["results"][0]["ratios"]["fused_fp32/fused"]["value"] == 1.0
    # The default baseline (random weights, all-zero folded biases) has the fused model's graph:
    # no initializers shared through Identity nodes, which ONNX Runtime ran slower at fp16.
    assert graphs["baseline.onnx"] == graphs["fused.onnx"]
    assert not any("Identity" in graph for graph in graphs.values())


def _weight_type(path) -> int:
    types_ = {i.data_type for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 4}
    assert len(types_) == 1
    return types_.pop()


def test_bench_trt_int8_quantizes_the_others_as_the_engines_file_was(run16, tmp_path, monkeypatch):
    """A TensorRT int8 engine from fuse-export (stand-in builder): bench builds the unfused model and
    the baseline from trt-format Q/DQ files calibrated as the deploy run.json records (percentile,
    64 images), and the fused model's fp32 reference from an fp32 file."""
    built = []

    def build_engine(onnx_path, engine_path, **kw):
        proto = onnx.load(str(onnx_path))
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        zero_points = {inits[n.input[2]].dtype for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        built.append((Path(onnx_path).name, kw["precision"], zero_points))
        Path(engine_path).write_text(str(onnx_path))
        return {"min_batch": kw["min_batch"], "opt_batch": kw["opt_batch"], "max_batch": kw["max_batch"],
                "precision": kw["precision"]}

    def load(path, *, precision="fp32", device="cuda", threads=None):
        source = Path(Path(path).read_text())  # the engine "is" its ONNX file (staged, then published)
        runner = get_backend("ort").load(source if source.exists() else Path(path).parent / source.name)
        runner.name = Path(path).name
        return runner

    monkeypatch.setattr(trt_backend, "available", lambda device="cuda": Availability())
    monkeypatch.setattr(trt_backend, "build_engine", build_engine)
    monkeypatch.setattr(trt_backend, "load", load)
    run = tmp_path / "run"
    shutil.copytree(run16, run, ignore=shutil.ignore_patterns("deploy", "bench"))
    fuse_export(run, ExportOptions(trt=True, int8=True, max_batch=4, samples=4, calib_method="percentile",
                                   calib_samples=64, max_top1_drop=100.0))
    assert built == [("model_int8.onnx", "int8", {np.dtype(np.int8)})]
    latency = {"model.engine": 1e-3, "unfused.engine": 3e-3, "baseline.engine": 1e-3, "fused_fp32.engine": 2e-3}
    monkeypatch.setattr(timing, "runner_timer", lambda runner, batch, shape: lambda: latency[runner.name])
    report = bench_run(run, "trt", batch_sizes="1,4", budget=Budget(warmup_s=0, iters=2), out=tmp_path / "b")
    assert built[1:] == [("unfused.onnx", "int8", {np.dtype(np.int8)}), ("baseline.onnx", "int8", {np.dtype(np.int8)}),
                         ("fused_fp32.onnx", "fp32", set())]
    assert report["precision"] == "int8" and report["tensorrt_profile"]["precision"] == "int8"
    assert {k: report["calibration"][k] for k in ("format", "method", "samples")} == {
        "format": "trt", "method": "percentile", "samples": 64}
    assert report["results"][0]["ratios"]["fused_fp32/fused"]["value"] == pytest.approx(2.0)
