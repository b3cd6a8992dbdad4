"""RunInfo, the one record of a run: layout, versions, model sources, provenance, bench's use of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import record_engine, untrained_info, untrained_run
from rsd_deploy.backends import trt as trt_backend
from rsd_deploy.bench import Budget, bench_run
from rsd_deploy.cli import main
from rsd_deploy.errors import RSDError
from rsd_deploy.export import ExportOptions, fuse_export
from rsd_deploy.io import sha256_file
from rsd_deploy.run import (
    RUN_FILE,
    SCHEMA_VERSION,
    SOURCES,
    WEIGHTS_FILE,
    ModelSource,
    RunInfo,
    SourceKind,
    load_run,
    read_run,
    save_run,
)
from rsd_deploy.schema import AT_LEAST_1, check_values, from_mapping
from rsd_deploy.training import TrainConfig

FAST = ["--iters", "1", "--warmup-s", "0", "--threads", "1", "--batch-sizes", "1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run-info")


@pytest.fixture(scope="module")
def exported(runs) -> Path:
    """An untrained resnet20 run and its export (RUN_DIR/deploy), by the real exporter."""
    return untrained_run(runs, "resnet20", dirname="exported")


def bench(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["bench", *map(str, args)])
    return result.exit_code, result.output


def one_line_error(result: tuple[int, str], *fragments: str) -> None:
    code, output = result
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), output
    for f in fragments:
        assert f in lines[0], lines[0]


def as_version_1(path: Path) -> dict:
    """Rewrite ``path`` (a run.json) as the current main wrote it: no version, no own sha256."""
    data = json.loads(path.read_text())
    del data["version"], data["weights_sha256"]
    path.write_text(json.dumps(data))
    return data


# The record ------------------------------------------------------------------------------------


def test_round_trip_and_layout(tmp_path):
    info = untrained_info("resnet20")
    saved = save_run(tmp_path, info.build_model(), info)
    data = json.loads((tmp_path / RUN_FILE).read_text())
    assert list(data)[:2] == ["version", "model"] and data["version"] == SCHEMA_VERSION == 3
    assert data["model"] == "resnet20" and data["input_size"] == [32, 32]
    assert data["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert "source" not in data and "tensorrt" not in data  # not recorded: left out
    assert data["weights_sha256"] == sha256_file(tmp_path / WEIGHTS_FILE) == saved.weights_sha256
    assert read_run(tmp_path) == saved
    assert RunInfo.from_json(saved.to_json()) == saved


def test_provenance_of_a_training_run_and_its_export(exported):
    run, deploy = read_run(exported), read_run(exported / "deploy")
    assert run.weights_sha256 == sha256_file(exported / WEIGHTS_FILE)
    assert deploy.form == "deploy" and deploy.is_export and not run.is_export
    assert deploy.source.weights_sha256 == run.weights_sha256
    assert deploy.source.run_dir == str(exported.resolve()) and deploy.source.form == "rsd"
    assert deploy.weights_sha256 == sha256_file(exported / "deploy" / WEIGHTS_FILE)
    assert deploy.onnx.opset == 17 and deploy.onnx.batch == "dynamic" and deploy.tensorrt is None


def test_training_records_the_sha256_of_its_weights(tmp_path):
    from rsd_deploy.training import train

    config = TrainConfig(data="digits", input_size=8, train_samples=64, batch_size=32, epochs=1,
                         max_steps=1, workers=0, device="cpu", precise_bn=0, method="baseline")
    out = train(config, tmp_path / "run")
    info = read_run(out)
    assert info.version == SCHEMA_VERSION and info.weights_sha256 == sha256_file(out / WEIGHTS_FILE)
    assert info.data.name == "digits" and info.normalization.mean == info.data.mean
    assert info.config == config.to_json()


@pytest.mark.parametrize("source, expected", [
    ({"run_dir": "/r", "form": "rsd", "weights_sha256": "ab"}, {"weights_sha256": "ab", "run_dir": "/r", "form": "rsd"}),
    ({"weights": "model.safetensors", "sha256": "cd"}, {"weights_sha256": "cd", "run_dir": None, "form": None}),
    ({"weights": "model.safetensors"}, None),  # no sha256: no provenance to check
])
def test_version_1_files_are_migrated_on_read(source, expected):
    data = {"model": "resnet20", "form": "deploy", "method": "rsd", "num_classes": 2, "in_channels": 3,
            "input_size": [32, 32], "data": None, "config": {}, "versions": {}, "metrics": {},
            "source": source}
    info = RunInfo.from_json(data)
    assert info.version == SCHEMA_VERSION and info.normalization is None
    assert (info.to_json().get("source")) == expected


def test_version_2_files_read_as_version_3():
    info = untrained_info("resnet20")
    data = {**info.to_json(), "version": 2}
    assert RunInfo.from_json(data) == info and RunInfo.from_json(data).version == 3


def test_a_zoo_records_kxk_branches_rebuild_its_rsd_form(tmp_path):
    """``"restructure": {"num_square": k}`` (train --kxk-branches k) rebuilds k KxK branches per
    block; without it (every run recorded before the option) the paper's 3; other keys are refused."""
    from rsd_deploy.blocks import RSDConv

    def squares(info: RunInfo, form: str = "rsd") -> list[int]:
        return sorted({m.num_square for m in info.build_model(form).modules() if isinstance(m, RSDConv)})

    info = untrained_info("resnet20").replace(form="rsd")
    assert info.restructure is None and squares(info) == [3]
    for k in (1, 2):
        one = info.replace(restructure={"num_square": k})
        assert squares(one) == [k] and squares(one, "plain") == squares(one, "deploy") == []
        saved = save_run(tmp_path / str(k), one.build_model(), one)
        model, again = load_run(tmp_path / str(k))
        assert again == saved and sorted({m.num_square for m in model.modules() if isinstance(m, RSDConv)}) == [k]
    with pytest.raises(RSDError, match="it is not restructured \\(pairs\\)"):
        info.replace(restructure={"num_square": 1, "pairs": []}).build_model()


def test_version_1_normalization_and_classes_from_the_data_entry():
    data = {"model": "resnet20", "form": "rsd", "num_classes": 2, "in_channels": 3, "input_size": [8, 8],
            "data": {"name": "digits", "dir": None, "classes": ["a", "b"], "input_size": [8, 8],
                     "in_channels": 3, "mean": [0.1] * 3, "std": [0.2] * 3}}
    info = RunInfo.from_json(data)
    assert info.classes == ["a", "b"] and info.normalization.mean == [0.1] * 3
    assert info.normalization.std == [0.2] * 3


@pytest.mark.parametrize("change, message", [
    ({"version": 4}, "version 4 of the run record; this rsd-deploy reads up to 3"),
    ({"version": "2"}, "version must be a positive integer (got '2')"),
    ({"form": "fused"}, "unknown form 'fused'"),
    ({"model": "zoo:resnet21"}, "model: unknown model 'resnet21'"),
    ({"model": "torchvision:resnet19"}, "model: torchvision has no classification model 'resnet19'"),
    ({"model": "keras:resnet18"}, "model: unknown model source 'keras'"),
    ({"onnx": {"file": "model.onnx", "opset": "17", "batch": "dynamic"}}, "onnx: wrong type: opset must be an integer"),
    ({"tensorrt": {"min_batch": 1, "opt_batch": 1, "max_batch": 1}}, "tensorrt lacks precision"),
    ({"metrics": []}, "wrong type: metrics must be an object"),
    ({"bogus": 1}, "unknown key 'bogus'"),
])
def test_bad_records_name_the_file_and_the_key(change, message):
    data = {**untrained_info("resnet20").to_json(), **change}
    with pytest.raises(RSDError, match="^runs/x/run.json") as e:
        RunInfo.from_json(data, "runs/x/run.json")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_model_source_of_another_kind_needs_no_special_case(tmp_path, monkeypatch):
    """What the torchvision and timm sources did: one entry in SOURCES, nothing else."""
    from rsd_deploy import models

    def check(name: str) -> None:
        if name != "tiny":
            raise RSDError(f"unknown test model {name!r}")

    def create(name: str, restructured=None, **kw) -> torch.nn.Module:
        return models.create("resnet20", **kw)  # any module will do

    monkeypatch.setitem(SOURCES, "test", SourceKind(check, create, lambda n: None, lambda n, m, s: None))
    assert {"zoo", "torchvision", "timm"} <= set(SOURCES)
    assert ModelSource.from_json("zoo:resnet20") == ModelSource.from_json("resnet20") == ModelSource("resnet20")
    info = untrained_info("resnet20").replace(model=ModelSource.from_json("test:tiny"))
    saved = save_run(tmp_path, info.build_model(), info)
    assert json.loads((tmp_path / RUN_FILE).read_text())["model"] == "test:tiny"
    model, loaded = load_run(tmp_path)
    assert loaded == saved and loaded.model.kind == "test" and str(loaded.model) == "test:tiny"
    with pytest.raises(RSDError, match="model: unknown test model 'huge'"):
        RunInfo.from_json({**saved.to_json(), "model": "test:huge"})


# Runs made before RunInfo keep working --------------------------------------------------------------


def test_runs_and_exports_written_before_the_version_key_still_export_and_bench(runs, tmp_path):
    run_dir = untrained_run(runs, "resnet20", export=False, seed=3, dirname="old")
    as_version_1(run_dir / RUN_FILE)
    fuse_export(run_dir, ExportOptions(onnx=True, samples=4))
    as_version_1(run_dir / "deploy" / RUN_FILE)  # an export made by the current main, too
    code, output = bench(run_dir, "--ort", "--out", tmp_path / "b", *FAST)
    assert code == 0, output


# bench: provenance and --deploy ----------------------------------------------------------------------


def test_bench_refuses_an_export_of_other_weights(runs, tmp_path):
    run_dir = untrained_run(runs, "resnet20", seed=4, dirname="retrained")
    before = sha256_file(run_dir / WEIGHTS_FILE)
    info = read_run(run_dir)
    model = info.build_model()
    save_run(run_dir, model, info)  # trained further / replaced: other weights than the export's
    out = tmp_path / "b"
    one_line_error(bench(run_dir, "--ort", "--out", out, *FAST),
                   f"{run_dir / 'deploy'} was exported from other weights (sha256 {before[:12]})",
                   "re-export it with rsd-deploy fuse-export")
    assert not out.exists()
    # TensorRT too, before TensorRT is looked for.
    record_engine(run_dir / "deploy", {"min_batch": 1, "opt_batch": 1, "max_batch": 1, "precision": "fp32"})
    (run_dir / "deploy" / "model.engine").write_bytes(b"engine")
    one_line_error(bench(run_dir, "--trt", *FAST), "was exported from other weights")
    # The torch backend fuses in-process and reads no export.
    assert bench(run_dir, "--torch", "--out", out, *FAST)[0] == 0


def test_bench_refuses_an_export_without_provenance(runs):
    run_dir = untrained_run(runs, "resnet20", seed=5, dirname="no-provenance")
    data = json.loads((run_dir / "deploy" / RUN_FILE).read_text())
    del data["source"]
    (run_dir / "deploy" / RUN_FILE).write_text(json.dumps(data))
    one_line_error(bench(run_dir, "--ort", *FAST), "records no sha256 of the weights it was exported from")


def test_bench_deploy_option_takes_an_export_elsewhere(runs, tmp_path, monkeypatch):
    run_dir = untrained_run(runs, "resnet20", export=False, seed=6, dirname="elsewhere")
    deploy = tmp_path / "exports" / "r20"
    fuse_export(run_dir, ExportOptions(onnx=True, samples=4, out=str(deploy)))
    one_line_error(bench(run_dir, "--ort", *FAST), "no exported ONNX")  # not in RUN_DIR/deploy
    code, output = bench(run_dir, "--ort", "--deploy", deploy, "--out", tmp_path / "b", *FAST)
    assert code == 0, output
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["deploy_dir"] == str(deploy)
    assert str(deploy / "model.onnx") in report["models"]["fused"]["description"]
    # Another run's export is refused, whichever folder it is in.
    other = untrained_run(runs, "resnet20", seed=7, dirname="other")
    one_line_error(bench(other, "--ort", "--deploy", deploy, *FAST), "was exported from other weights")
    # TensorRT reads the engine and its profile from --deploy too (checked before TensorRT).
    record_engine(deploy, {"min_batch": 1, "opt_batch": 2, "max_batch": 2, "precision": "fp32"})
    (deploy / "model.engine").write_bytes(b"engine")

    def no_tensorrt_please(device):
        raise AssertionError("reached TensorRT")

    monkeypatch.setattr(trt_backend, "available", no_tensorrt_please)
    one_line_error(bench(run_dir, "--trt", "--deploy", deploy, "--batch-sizes", "4", "--iters", "1", "--quiet"),
                   "outside the engine's profile (1 to 2)")
    with pytest.raises(AssertionError, match="reached TensorRT"):
        bench_run(run_dir, "trt", deploy=deploy, batch_sizes="1,2", budget=Budget(iters=1))


# The validator, and the CLI defaults it shares ---------------------------------------------------------


@dataclass
class _Inner:
    n: int


@dataclass
class _Record:
    name: str
    sizes: list[int] = field(default_factory=list)
    ratio: float = 1.0
    note: str | None = None
    inner: _Inner | None = None


def test_from_mapping_types_from_the_annotations():
    r = from_mapping(_Record, {"name": "a", "sizes": [1, 2], "ratio": 2, "inner": {"n": 3}}, "rec")
    assert r == _Record("a", [1, 2], 2.0, None, _Inner(3)) and isinstance(r.ratio, float)
    for values, message in [
        ({}, "rec lacks name"),
        ({"name": "a", "size": []}, "rec: unknown key 'size'"),
        ({"name": 1}, "rec: wrong type: name must be a string (got 1)"),
        ({"name": "a", "sizes": [1, True]}, "rec: wrong type: sizes must be a list of integers"),
        ({"name": "a", "ratio": None}, "rec: wrong type: ratio must be a number (got None)"),
        ({"name": "a", "note": 3}, "rec: wrong type: note must be a string or null"),
        ({"name": "a", "inner": {"n": "3"}}, "rec: inner: wrong type: n must be an integer"),
    ]:
        with pytest.raises(RSDError) as e:
            from_mapping(_Record, values, "rec")
        assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(RSDError, match="--sizes must fit in 64 bits"):
        check_values(_Record("a", [2**63]), {}, lambda n: f"--{n}")
    with pytest.raises(RSDError, match=r"ratio must be at least 1 \(got 0.5\)"):
        check_values(_Record("a", ratio=0.5), {"ratio": AT_LEAST_1})


def test_cli_defaults_are_the_dataclasses_defaults():
    config, options = TrainConfig(), ExportOptions()
    for command, record in (("train", config), ("fuse-export", options)):
        for param in main.commands[command].params:
            if param.name in {f for f in record.__dataclass_fields__} and param.default is not None:
                expected = getattr(record, param.name)
                if isinstance(expected, list):
                    expected = ",".join(map(str, expected))
                assert param.default == expected, (command, param.name)
    train_help = CliRunner().invoke(main, ["train", "--help"]).output
    assert "ce_student,ce_teacher" in train_help and "[default: resnet20]" in train_help


def test_bench_of_a_run_without_weights_is_one_line(runs):
    """bench hashed RUN_DIR/model.safetensors for provenance before loading the run: no weights
    file gave a FileNotFoundError traceback."""
    run_dir = untrained_run(runs, "resnet20", seed=8, dirname="no-weights")
    (run_dir / WEIGHTS_FILE).unlink()
    one_line_error(bench(run_dir, "--ort", *FAST), f"weights file {run_dir / WEIGHTS_FILE} not found")


def test_export_of_a_deploy_form_run_records_only_its_own_artifacts(runs, tmp_path):
    """The deploy record copied the source's onnx/tensorrt entries: exporting an export without
    TensorRT claimed an engine profile for a folder with no engine."""
    run_dir = untrained_run(runs, "resnet20", seed=9, dirname="engine-claimed")
    record_engine(run_dir / "deploy", {"min_batch": 1, "opt_batch": 2, "max_batch": 2, "precision": "fp32"})
    out = tmp_path / "again"
    fuse_export(run_dir / "deploy", ExportOptions(samples=4, out=str(out)))
    again = read_run(out)
    assert again.tensorrt is None and again.onnx is None
    assert not (out / "model.engine").exists()


def test_an_earlier_versions_export_may_be_replaced(runs, tmp_path):
    """--out holding an export whose record no longer reads as a RunInfo (an old export
    without a sha256) was refused as a training run's folder."""
    run_dir = untrained_run(runs, "resnet20", seed=10, dirname="old-export-out")
    out = tmp_path / "old-export"
    out.mkdir()
    (out / RUN_FILE).write_text(json.dumps({"model": "resnet20", "form": "deploy",
                                            "source": {"weights": "x"}, "input_size": "not read"}))
    fuse_export(run_dir, ExportOptions(samples=4, out=str(out)))
    assert read_run(out).source.weights_sha256 == sha256_file(run_dir / WEIGHTS_FILE)
    # A record that is no export's, readable or not, is still refused.
    for data in ({"model": "resnet20", "form": "rsd"}, {"no": "record"}):
        other = tmp_path / f"held-{len(data)}"
        other.mkdir()
        (other / RUN_FILE).write_text(json.dumps(data))
        with pytest.raises(RSDError, match="holds a training run"):
            fuse_export(run_dir, ExportOptions(samples=4, out=str(other)))
