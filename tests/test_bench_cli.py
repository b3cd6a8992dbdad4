"""``rsd-deploy bench`` end to end on CPU (few iterations), its reports, and its bad-input errors.

Nothing here asserts a speed: timings on a shared CI machine prove nothing. The tests
check that the right three models are timed and that the report is complete and
consistent with its per-round timings (timings.json); the latency goals live in ``benchmarks/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import HAS_CUDA, record_engine, requires_cuda, requires_tensorrt, untrained_run
from rsd_deploy.backends import Availability
from rsd_deploy.backends import trt as trt_backend
from rsd_deploy.bench import Budget, bench_run, timing
from rsd_deploy.cli import main
from rsd_deploy.errors import RSDError
from rsd_deploy.export import ExportOptions, fuse_export

FAST = ["--iters", "3", "--warmup-s", "0", "--threads", "2", "--quiet"]
STAT_KEYS = {"calls", "total_s", "median_ms", "mean_ms", "p25_ms", "p75_ms", "p90_ms", "p99_ms",
             "min_ms", "max_ms", "std_ms", "throughput_ips"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-runs")


@pytest.fixture(scope="module")
def rsd_run(runs) -> Path:
    return untrained_run(runs, "resnet20")


def invoke(*args: str):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def check_report(out: Path, backend: str, batches: list[int], iters: int) -> dict:
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png", "timings.json"}
    report = json.loads((out / "bench.json").read_text())
    assert report["schema"] == "rsd-deploy/bench/1"
    assert (report["model"], report["backend"], report["device"]) == ("resnet20", backend, "cpu")
    assert report["threads"] == 2 and report["machine"]["threads"] == 2
    assert report["batch_sizes"] == batches and report["precision"] == "fp32"
    machine = report["machine"]
    assert machine["cpu"] and machine["available_cores"] >= 1 and "torch" in machine["versions"]
    assert set(machine["torch_precision"]) == {"tf32_matmul", "tf32_cudnn", "float32_matmul_precision"}

    # The three models: the RSD training form costs several times the MACs of the fused
    # model, which has exactly the plain baseline's parameters and MACs.
    models = report["models"]
    assert set(models) == {"unfused", "fused", "baseline"}
    assert models["fused"]["params"] == models["baseline"]["params"]
    assert models["fused"]["macs_per_image"] == models["baseline"]["macs_per_image"]
    assert models["unfused"]["macs_per_image"] > 3 * models["fused"]["macs_per_image"]

    # timings.json (compact): per round its calls and their median, and the percentiles
    # 0..100 of all calls. With --iters every round is one call, kept as it is.
    timings = json.loads((out / "timings.json").read_text())
    assert timings["unit"] == "ms" and timings["schema"] == "rsd-deploy/bench-timings/2"
    assert [e["batch"] for e in report["results"]] == batches
    for entry in report["results"]:
        assert entry["rounds"] == iters
        raw = {r: t["median"] for r, t in timings["batches"][str(entry["batch"])].items()}
        for role in ("unfused", "fused", "baseline"):
            s = entry["models"][role]
            assert set(s) == STAT_KEYS
            t = timings["batches"][str(entry["batch"])][role]
            assert s["calls"] == iters and len(raw[role]) == iters and t["calls"] == [1] * iters
            flat = np.asarray(raw[role])
            assert s["median_ms"] == pytest.approx(float(np.median(flat)), rel=1e-4)
            assert s["median_ms"] == pytest.approx(t["percentiles"][50], rel=1e-4)
            assert (t["percentiles"][0], t["percentiles"][100]) == pytest.approx((s["min_ms"], s["max_ms"]), rel=1e-4)
            assert s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
            assert s["throughput_ips"] == pytest.approx(entry["batch"] / (s["median_ms"] / 1e3))
            ci = entry["median_ci_ms"][role]
            assert ci["lo"] <= s["median_ms"] <= ci["hi"]
        # Ratios are taken round by round (the models ran back to back), then the median.
        def paired(num, den, raw=raw):
            return float(np.median([a / b for a, b in zip(raw[num], raw[den], strict=True)]))  # per-round medians

        fb, uf = entry["ratios"]["fused/baseline"], entry["ratios"]["unfused/fused"]
        assert fb["value"] == pytest.approx(paired("fused", "baseline"), rel=1e-4)
        assert uf["value"] == pytest.approx(paired("unfused", "fused"), rel=1e-4)
        assert fb["lo"] <= fb["value"] <= fb["hi"] and fb["level"] == 0.95
        assert entry["verdict"]["status"] in {"no_overhead", "overhead", "inconclusive"}
        assert isinstance(entry["warnings"], list)
    assert report["verdict"]["status"] in {"no_overhead", "overhead", "inconclusive"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "| batch | model | median ms" in md and "unfused/fused" in md
    return report


def test_compact_timings_keep_round_medians_and_percentiles():
    from rsd_deploy.bench.report import compact_timings

    rounds = {"unfused": [[3.0, 1.0, 2.0], [4.0]], "fused": [[1.0, 2.0], [2.5, 2.5, 9.0]]}
    out = compact_timings({"unit": "ms", "batches": {"8": rounds}})
    assert out["unit"] == "ms" and out["schema"] == "rsd-deploy/bench-timings/2"
    fused = out["batches"]["8"]["fused"]
    assert fused["calls"] == [2, 3] and fused["median"] == [1.5, 2.5]
    assert len(fused["percentiles"]) == 101
    assert fused["percentiles"][0] == 1.0 and fused["percentiles"][50] == 2.5 and fused["percentiles"][100] == 9.0
    assert out["batches"]["8"]["unfused"]["median"] == [2.0, 4.0]


def test_ort_end_to_end(rsd_run, tmp_path):
    out = tmp_path / "ort"
    result = invoke(rsd_run, "--ort", "--batch-sizes", "1,2", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "verdict:" in result.stdout and "unfused/fused" in result.stdout
    report = check_report(out, "ort", [1, 2], iters=3)
    # The fused model is the exported artifact; the bench exported the other two alike.
    assert str(rsd_run / "deploy" / "model.onnx") in report["models"]["fused"]["description"]
    assert "opset 17, batch dynamic" in report["models"]["unfused"]["description"]


def test_torch_end_to_end_writes_into_the_run_by_default(runs):
    run_dir = untrained_run(runs, "resnet20", export=False, seed=1, dirname="torch-run")  # no export needed
    result = invoke(run_dir, "--torch", "--batch-sizes", "2", *FAST)
    assert result.exit_code == 0, result.output
    report = check_report(run_dir / "bench", "torch", [2], iters=3)
    assert "fused in-process" in report["models"]["fused"]["description"]


def test_baseline_run_is_used_and_must_match(rsd_run, runs, tmp_path):
    plain = untrained_run(runs, "resnet20", form="plain", export=False, dirname="plain20")
    report = bench_run(rsd_run, "torch", baseline=plain, batch_sizes="1",
                       budget=Budget(warmup_s=0, iters=2), threads=1, out=tmp_path / "b")
    assert report["models"]["baseline"]["description"].startswith(f"baseline run {plain}")
    other = untrained_run(runs, "resnet32", form="plain", export=False, dirname="plain32")
    assert_one_line_error(invoke(rsd_run, "--torch", "--baseline", other, *FAST), "model 'resnet32'")
    assert_one_line_error(invoke(rsd_run, "--torch", "--baseline", rsd_run, *FAST), "is an RSD run")


# Bad input --------------------------------------------------------------------------------

def test_ort_without_exported_onnx(runs, tmp_path):
    bare = untrained_run(runs, "resnet20", export=False, seed=2, dirname="bare")
    out = tmp_path / "out"
    assert_one_line_error(invoke(bare, "--ort", "--out", out, *FAST), "no exported ONNX", "fuse-export")
    assert not out.exists()  # nothing half-written


def test_trt_without_engine(rsd_run):
    assert_one_line_error(invoke(rsd_run, "--trt", *FAST), "no TensorRT engine", "--trt")


def test_batch_above_the_engine_profile_is_refused_before_tensorrt_is_imported(runs, monkeypatch):
    run_dir = untrained_run(runs, "resnet20", seed=3, dirname="with-engine")
    record_engine(run_dir / "deploy", {"min_batch": 1, "opt_batch": 8, "max_batch": 8, "precision": "fp32"})
    (run_dir / "deploy" / "model.engine").write_bytes(b"not built here")

    def no_tensorrt_please(device):
        raise AssertionError("TensorRT was imported before the batch sizes were checked")

    monkeypatch.setattr(trt_backend, "available", no_tensorrt_please)
    assert_one_line_error(invoke(run_dir, "--trt", "--batch-sizes", "1,64", *FAST),
                          "batch size 64 is outside the engine's profile (1 to 8)", "--max-batch 64")
    # Within the profile the check passes and the TensorRT import is next.
    with pytest.raises(AssertionError, match="TensorRT was imported"):
        bench_run(run_dir, "trt", batch_sizes="1,8", budget=Budget(iters=1))


def test_trt_profile_must_be_recorded(runs):
    run_dir = untrained_run(runs, "resnet20", seed=4, dirname="engine-no-profile")
    (run_dir / "deploy" / "model.engine").write_bytes(b"x")
    assert_one_line_error(invoke(run_dir, "--trt", *FAST), "no complete 'tensorrt' profile")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_gpu_backends_without_cuda_say_how_to_get_it(runs):
    run_dir = untrained_run(runs, "resnet20", seed=5, tensorrt={
        "min_batch": 1, "opt_batch": 4, "max_batch": 4, "precision": "fp32"}, dirname="trt-no-gpu")
    (run_dir / "deploy" / "model.engine").write_bytes(b"x")
    assert_one_line_error(invoke(run_dir, "--trt", "--batch-sizes", "1,4", *FAST), "pip install 'rsd-deploy[trt]'")
    assert_one_line_error(invoke(run_dir, "--ort", "--device", "cuda", *FAST), "CUDA")


def test_unknown_backend_and_backend_choice():
    with pytest.raises(RSDError, match="unknown backend 'tensorflow'"):
        bench_run("unused", "tensorflow")
    assert_one_line_error(invoke("unused", *FAST), "choose exactly one backend")
    assert_one_line_error(invoke("unused", "--ort", "--torch", *FAST), "choose exactly one backend")
    result = invoke("unused", "--tensorflow")
    assert result.exit_code == 2 and "No such option" in result.output and "--tensorflow" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--ort", "--device", "tpu"], "unknown device 'tpu'"),
        (["--trt", "--device", "cpu"], "TensorRT runs on CUDA only"),
        (["--ort", "--batch-sizes", "1,x"], "comma-separated integers"),
        (["--ort", "--batch-sizes", "0"], "positive"),
        (["--ort", "--min-s", "1", "--iters", "3"], "either --min-s or --iters"),
        (["--ort", "--iters", "0"], "--iters must be at least 1"),
        (["--torch", "--threads", "0"], "--threads must be positive"),
    ],
)
def test_bad_options(rsd_run, args, fragment):
    assert_one_line_error(invoke(rsd_run, *args, "--warmup-s", "0", "--quiet"), fragment)


def test_non_finite_times_are_refused(rsd_run, tmp_path):
    """--warmup-s nan used to run and write NaN into bench.json (--min-s nan: see test_bench_stats)."""
    out = tmp_path / "bench"
    result = invoke(rsd_run, "--torch", "--iters", "1", "--batch-sizes", "1", "--warmup-s", "nan",
                    "--out", out, "--quiet")
    assert_one_line_error(result, "--warmup-s must be a finite number")
    assert not out.exists()


def test_bad_run_directories(runs, tmp_path):
    assert_one_line_error(invoke(tmp_path / "missing", "--ort", *FAST), "does not exist")
    deploy = untrained_run(runs, "resnet20", seed=6, dirname="deploy-as-run") / "deploy"
    assert_one_line_error(invoke(deploy, "--torch", *FAST), "'deploy'-form model")


def test_fixed_batch_onnx_only_runs_its_batch(runs):
    run_dir = untrained_run(runs, "resnet20", seed=7, dirname="fixed", export=False)
    fuse_export(run_dir, ExportOptions(onnx=True, batch=4, samples=8))
    assert_one_line_error(invoke(run_dir, "--ort", "--batch-sizes", "1,4", *FAST), "for batch 4 only")


# GPU paths ---------------------------------------------------------------------------------

def _gpu_report(run_dir: Path, backend: str, out: Path, batches="1,4") -> dict:
    report = bench_run(run_dir, backend, device="cuda", batch_sizes=batches,
                       budget=Budget(warmup_s=0.2, iters=5), out=out)
    assert report["device"] == "cuda" and report["machine"]["gpu"]["name"]
    assert report["models"]["fused"]["macs_per_image"] == report["models"]["baseline"]["macs_per_image"]
    for entry in report["results"]:
        assert entry["rounds"] == 5
        assert all(entry["models"][r]["median_ms"] > 0 for r in ("unfused", "fused", "baseline"))
    return report


@requires_cuda
@pytest.mark.cuda
def test_torch_cuda_end_to_end(rsd_run, tmp_path):
    _gpu_report(rsd_run, "torch", tmp_path / "torch-cuda")


@requires_cuda
@pytest.mark.cuda
def test_ort_cuda_end_to_end(rsd_run, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here")
    _gpu_report(rsd_run, "ort", tmp_path / "ort-cuda")


@requires_tensorrt
@pytest.mark.tensorrt
def test_trt_end_to_end(runs, tmp_path):
    profile = {"min_batch": 1, "opt_batch": 4, "max_batch": 4, "precision": "fp32"}
    run_dir = untrained_run(runs, "resnet20", seed=8, export=False, dirname="trt")
    fuse_export(run_dir, ExportOptions(trt=True, max_batch=4, samples=8))
    report = _gpu_report(run_dir, "trt", tmp_path / "trt")
    assert report["tensorrt_profile"] == profile
    assert "model.engine" in report["models"]["fused"]["description"]


# The TensorRT orchestration, with stand-ins for TensorRT's builder and runner --------------------

@pytest.mark.parametrize(("fused_ms", "status"), [(1.0, "no_overhead"), (1.1, "overhead")])
def test_trt_orchestration_builds_the_others_with_the_fused_engines_settings(
    runs, tmp_path, monkeypatch, fused_ms, status
):
    """Everything but the GPU: which engines get built, with which profile, and what is timed.

    The TensorRT backend's ``build_engine`` records its calls and ``load`` gives stand-in
    runners; the timers are deterministic (unfused 4 ms, baseline 1 ms, fused 1 or 1.1 ms,
    the fused model at fp32 2 ms), so the whole analysis down to the verdict is pinned.
    The engine is fp16: strongly typed builds take it from the ONNX file, so the others are
    built from fp16 files, and the fused model's fp32 reference from an fp32 one.
    """
    import types

    import onnx

    profile = {"min_batch": 1, "opt_batch": 8, "max_batch": 16, "precision": "fp16"}
    run_dir = untrained_run(runs, "resnet20", seed=9, tensorrt=profile, dirname=f"fake-trt-{status}")
    (run_dir / "deploy" / "model.engine").write_bytes(b"engine")
    built = []

    def build_engine(onnx_path, engine_path, **kwargs):
        weights = {i.data_type for i in onnx.load(str(onnx_path)).graph.initializer}
        built.append((Path(onnx_path).name, kwargs, weights))
        Path(engine_path).write_bytes(b"engine")

    def load(path, *, device, precision, threads):
        loaded.append(Path(path).name)
        return types.SimpleNamespace(name=Path(path).name, device=device, precision=precision, settings=dict)

    loaded = []
    monkeypatch.setattr(trt_backend, "available", lambda device: Availability())
    monkeypatch.setattr(trt_backend, "build_engine", build_engine)
    monkeypatch.setattr(trt_backend, "load", load)
    latency = {"model.engine": fused_ms * 1e-3, "unfused.engine": 4e-3, "baseline.engine": 1e-3,
               "fused_fp32.engine": 2e-3}
    monkeypatch.setattr(timing, "runner_timer", lambda runner, batch, shape: lambda: latency[runner.name])

    report = bench_run(run_dir, "trt", batch_sizes="1,16", budget=Budget(warmup_s=0, iters=6),
                       out=tmp_path / "trt")
    assert [name for name, _, _ in built] == ["unfused.onnx", "baseline.onnx", "fused_fp32.onnx"]
    for name, kwargs, weights in built:
        precision = "fp32" if name == "fused_fp32.onnx" else "fp16"
        assert kwargs == {"input_shape": (3, 32, 32), "min_batch": 1, "opt_batch": 8, "max_batch": 16,
                          "precision": precision}
        assert weights == {onnx.TensorProto.FLOAT if precision == "fp32" else onnx.TensorProto.FLOAT16}, name
    assert loaded == ["unfused.engine", "model.engine", "baseline.engine", "fused_fp32.engine"]
    assert report["precision"] == "fp16" and report["tensorrt_profile"] == profile
    for entry in report["results"]:
        assert entry["ratios"]["unfused/fused"]["value"] == pytest.approx(4.0 / fused_ms)
        assert entry["ratios"]["fused/baseline"] == pytest.approx(
            {"value": fused_ms, "lo": fused_ms, "hi": fused_ms, "level": 0.95})
        assert entry["verdict"]["status"] == status
        assert entry["models"]["unfused"]["throughput_ips"] == pytest.approx(entry["batch"] / 4e-3)
        assert entry["ratios"]["fused_fp32/fused"]["value"] == pytest.approx(2.0 / fused_ms)
    assert report["verdict"]["status"] == status
    expected = "no inference overhead" if status == "no_overhead" else "overhead +10.0%"
    assert expected in (tmp_path / "trt" / "bench.md").read_text()
