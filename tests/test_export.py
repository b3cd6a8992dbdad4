"""rsd-deploy fuse-export end to end: real runs in, verified artifacts out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from helpers import HAS_CUDA, HAS_TENSORRT, on_log, trained_run
from rsd_deploy import models
from rsd_deploy.backends import get_backend
from rsd_deploy.cli import main
from rsd_deploy.data import DataInfo, eval_dataset
from rsd_deploy.errors import RSDError
from rsd_deploy.export import ExportOptions, fuse_export, sha256_file
from rsd_deploy.run import load_run
from rsd_deploy.verify import logits, torch_logits

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "export"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_mini):
    """Short training-run directories (see helpers.trained_run), made once per module."""
    base = tmp_path_factory.mktemp("runs")
    made = {}
    # resnet20 also gets a linear probe so that it predicts varied classes: its top-1
    # comparison over the validation set must be able to fail.
    for name, steps, batch, probe in (("resnet20", 2, 32, 256), ("densenet40_12", 1, 16, 0),
                                      ("vgg16", 1, 8, 0)):
        made[name] = base / name
        trained_run(made[name], name, cifar_mini, steps=steps, batch_size=batch, probe=probe)
    return made


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("deploy"))
    return dst


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result) -> str:
    lines = [ln for ln in result.output.strip().splitlines() if not ln.startswith("[fuse-export]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# -- the happy path ------------------------------------------------------------------


def test_resnet20_end_to_end_cli(runs, tmp_path):
    """CLI with the ONNX profile: exit 0, every artifact verified; the fused ONNX top-1
    equals the unfused PyTorch model's on all of cifar10-mini/val."""
    out = tmp_path / "deploy"
    res = _invoke("fuse-export", runs["resnet20"], "--profile", PROFILES / "onnx-dynamic.json",
                  "--out", out, "--samples", "32")
    assert res.exit_code == 0, res.output
    expected = {"model.safetensors", "run.json", "model.onnx", "model_unfused.onnx", "report.json"}
    assert {p.name for p in out.iterdir()} == expected  # no staging leftovers either
    assert "graph audit" in res.output and "FAIL" not in res.output

    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and all(c["passed"] for c in report["checks"])
    assert report["verification_inputs"].startswith("32 validation images")
    names = [c["name"] for c in report["checks"]]
    assert "onnxruntime vs pytorch fused, batch 1" in names
    assert "onnxruntime vs pytorch fused, batch 32" in names
    torch_check = report["checks"][0]
    assert torch_check["name"] == "pytorch fused vs unfused"
    assert 0 < torch_check["max_abs"] <= torch_check["bound"]  # really compared, not identical
    assert "tensorrt" not in report
    src_sha = report["source"]["sha256"]

    # Audit: the fused graph is the plain resnet20; the unfused one is not.
    audit = report["audit"]
    assert audit["fused"]["Conv"] == audit["reference"]["Conv"] == 21
    assert audit["fused"]["Add"] == audit["reference"]["Add"] == 9  # the residual adds
    assert "BatchNormalization" not in audit["fused"]
    assert audit["identical"]
    # Unfused, each of the 19 RSD blocks keeps three convolutions (stacked KxK, Kx1,
    # 1xK), each with its BN, a Split of the stacked KxK output and four Adds over the
    # five branches; the two 1x1 shortcuts are conv+BN, which the exporter folds.
    assert audit["unfused"]["BatchNormalization"] == 3 * 19
    assert audit["unfused"]["Split"] == 19
    assert audit["unfused"]["Add"] == 9 + 4 * 19
    assert audit["unfused"]["Conv"] == 3 * 19 + 2
    assert audit["unfused_minus_fused"]["BatchNormalization"] == 3 * 19
    assert audit["unfused_minus_fused"]["Conv"] == 2 * 19

    # Deploy run.json and weights: plain PyTorch loads them strictly.
    meta = json.loads((out / "run.json").read_text())
    assert meta["form"] == "deploy" and meta["source"]["weights_sha256"] == src_sha
    assert meta["onnx"] == {"file": "model.onnx", "opset": 17, "batch": "dynamic"}
    assert "tensorrt" not in meta
    plain = models.create("resnet20", num_classes=10, form="deploy")
    plain.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    deployed, _ = load_run(out)
    assert isinstance(deployed.stem[0], torch.nn.Conv2d)

    # ONNX: checker, names, dynamic batch, metadata.
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model"] == "resnet20" and props["source_sha256"] == src_sha
    info = DataInfo.from_json(meta["data"])
    assert json.loads(props["classes"]) == info.classes
    assert json.loads(props["mean"]) == info.mean and json.loads(props["std"]) == info.std
    assert json.loads(props["input_size"]) == [32, 32]
    assert props["rsd_deploy_version"]

    # Top-1 of the fused ONNX == top-1 of the unfused PyTorch model, all val images.
    unfused, _ = load_run(runs["resnet20"])
    val = eval_dataset(info)
    assert len(val) == 2000
    loader = torch.utils.data.DataLoader(val, batch_size=250)
    session = get_backend("ort").load(out / "model.onnx")
    pred_torch, pred_onnx, labels = [], [], []
    for x, y in loader:
        pred_torch.append(torch_logits(unfused, x).argmax(1).numpy())
        pred_onnx.append(logits(session, x).argmax(1))
        labels.append(y.numpy())
    pred_torch, pred_onnx = np.concatenate(pred_torch), np.concatenate(pred_onnx)
    assert len(np.unique(pred_torch)) >= 3  # a model that predicts, not a constant
    assert (pred_onnx == pred_torch).all()
    acc_torch = (pred_torch == np.concatenate(labels)).mean()
    assert acc_torch == (pred_onnx == np.concatenate(labels)).mean()


@pytest.mark.parametrize(
    "name, convs, adds, extra",
    [
        # DenseNet is pre-activation: its 21 standalone BNs stay as per-channel affines
        # (Mul + Add) in the plain architecture too, so those Adds are its own.
        ("densenet40_12", 39, 21, {"Mul": 21, "Concat": 18}),
        ("vgg16", 13, 0, {"MaxPool": 3}),
    ],
)
def test_audit_matches_plain_architecture(runs, tmp_path, name, convs, adds, extra):
    report = fuse_export(runs[name], ExportOptions(onnx=True, samples=16, out=str(tmp_path / "d")))
    audit = report["audit"]
    assert audit["passed"] and audit["identical"]
    assert audit["fused"]["Conv"] == audit["reference"]["Conv"] == convs
    assert audit["fused"].get("Add", 0) == audit["reference"].get("Add", 0) == adds
    assert "BatchNormalization" not in audit["fused"]
    for op, n in extra.items():
        assert audit["fused"][op] == n
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["pytorch fused vs unfused"]["top1_agreement"] == 1.0
    assert checks["onnxruntime vs pytorch fused, batch 16"]["passed"]
    # ONNX Runtime reproduces the run's unfused PyTorch model on real images.
    unfused, info = load_run(runs[name])
    x = torch.stack([eval_dataset(info.data)[i][0] for i in range(0, 2000, 125)])
    got = logits(get_backend("ort").load(tmp_path / "d" / "model.onnx"), x)
    ref = torch_logits(unfused, x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-4


@pytest.mark.skipif(HAS_CUDA and HAS_TENSORRT, reason="checks the behaviour without TensorRT")
def test_trt_without_tensorrt_still_completes_onnx(runs, tmp_path):
    out = tmp_path / "d"
    res = _invoke("fuse-export", runs["resnet20"], "--trt", "--samples", "8", "--out", out)
    assert res.exit_code == 3, res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "pip install 'rsd-deploy[trt]' on a machine with an NVIDIA GPU" in err[0]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "run.json", "model.onnx", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["tensorrt"]["status"] == "unavailable" and report["passed"]
    assert "onnxruntime vs pytorch fused, batch 8" in [c["name"] for c in report["checks"]]
    assert "tensorrt" not in json.loads((out / "run.json").read_text())


def test_fixed_batch_without_real_data(runs, tmp_path):
    """A fixed ONNX batch, and fixed random inputs when the run's data set is gone."""
    run = _copy_run(runs["resnet20"], tmp_path / "run")
    meta = json.loads((run / "run.json").read_text())
    meta["data"]["dir"] = str(tmp_path / "moved-away")
    (run / "run.json").write_text(json.dumps(meta))
    report = fuse_export(run, ExportOptions(onnx=True, batch=4, samples=6, opset=13))
    assert report["verification_inputs"].startswith("6 fixed random inputs")
    names = [c["name"] for c in report["checks"]]
    assert "onnxruntime vs pytorch fused, batch 4" in names
    proto = onnx.load(str(run / "deploy" / "model.onnx"))
    assert proto.opset_import[0].version == 13
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    with pytest.raises(Exception, match="Got: 1 Expected: 4"):  # the batch is really fixed
        get_backend("ort").load(run / "deploy" / "model.onnx")(np.zeros((1, 3, 32, 32), np.float32))


def test_reexport_replaces_stale_artifacts(runs, tmp_path):
    out = tmp_path / "d"
    fuse_export(runs["resnet20"], ExportOptions(onnx=True, samples=4, out=str(out)))
    assert (out / "model.onnx").exists()
    (out / "timing.cache").write_bytes(b"kept: only speeds up later TensorRT builds")
    report = fuse_export(runs["resnet20"], ExportOptions(onnx=False, samples=4, out=str(out)))
    assert "audit" not in report
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "run.json", "report.json",
                                               "timing.cache"}


def test_interrupted_export_removes_only_what_it_made(runs, tmp_path):
    """Export A creates --out and is interrupted: only A's staging folder goes, never the
    folder with what others put there; export B, started while A runs, is refused."""
    out = tmp_path / "d"

    def at_work(msg: str) -> None:
        if msg.startswith("verifying"):  # A is staging inside out
            with pytest.raises(RSDError, match=f"another fuse-export is writing to {out}"):
                fuse_export(runs["resnet20"], ExportOptions(samples=4, out=str(out)))
            (out / "notes.txt").write_text("someone else's")
            raise KeyboardInterrupt  # Ctrl-C on A

    with pytest.raises(KeyboardInterrupt), on_log(at_work):
        fuse_export(runs["resnet20"], ExportOptions(samples=4, out=str(out)))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # The lock went with A: the next export runs.
    fuse_export(runs["resnet20"], ExportOptions(samples=4, out=str(out)))
    assert {p.name for p in out.iterdir()} == {"notes.txt", "model.safetensors", "run.json", "report.json"}


def test_next_export_removes_what_a_killed_one_left(runs, tmp_path, monkeypatch):
    out = tmp_path / "d"
    fuse_export(runs["resnet20"], ExportOptions(samples=4, out=str(out)))
    # Stopped half-way through publishing: the earlier report.json is removed first and
    # the new one renamed last, so no report.json vouches for a folder of mixed exports.
    real, moved = os.replace, []

    def stop_at_second_move(src, dst, **kw):
        if Path(dst).parent == out:
            moved.append(Path(dst).name)
            if len(moved) == 2:
                raise KeyboardInterrupt
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", stop_at_second_move)
    with pytest.raises(KeyboardInterrupt):
        fuse_export(runs["vgg16"], ExportOptions(samples=4, out=str(out)))
    monkeypatch.undo()
    assert not (out / "report.json").exists()
    # A SIGKILL mid-export leaves its staging folder: the next export removes it.
    (out / ".fuse-export-k1ll3d").mkdir()
    (out / ".fuse-export-k1ll3d" / "model.onnx").write_bytes(b"half")
    seen: list[str] = []
    with on_log(seen.append):
        fuse_export(runs["resnet20"], ExportOptions(samples=4, out=str(out)))
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "run.json", "report.json"}
    assert "removed staging folders of interrupted exports: .fuse-export-k1ll3d" in seen
    report = json.loads((out / "report.json").read_text())
    assert all(sha256_file(out / name) == a["sha256"] for name, a in report["artifacts"].items())


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_out_holding_a_run_is_refused(runs, tmp_path):
    """--out into the run folder (or any run's) replaced its training weights and run.json."""
    run = _copy_run(runs["resnet20"], tmp_path / "run")
    other = _copy_run(runs["vgg16"], tmp_path / "other")
    state_only = tmp_path / "killed"  # a run killed in its first epoch: only its resume state
    state_only.mkdir()
    (state_only / "checkpoint.safetensors").write_bytes(b"state")
    cases = [(run, "is the run folder itself"), (tmp_path / "." / "run", "is the run folder itself"),
             (other, "holds a training run (run.json of a 'rsd'-form run, metrics.jsonl"),
             (state_only, "holds a training run (checkpoint.safetensors)")]
    for out, message in cases:
        before = _fingerprint(out)
        res = _invoke("fuse-export", run, "--onnx", "--samples", "4", "--out", out)
        assert res.exit_code == 1
        assert message in _one_line_error(res)
        assert _fingerprint(out) == before, out
    # An earlier export's folder (deploy-form run.json with its source) is fine to replace.
    deploy = tmp_path / "run-deploy"
    fuse_export(run, ExportOptions(samples=4, out=str(deploy)))
    fuse_export(runs["vgg16"], ExportOptions(samples=4, out=str(deploy)))
    assert json.loads((deploy / "run.json").read_text())["model"] == "vgg16"


# -- bad input: one-line error, non-zero exit, nothing written ----------------------------


def _assert_nothing_written(run: Path, out: Path | None = None) -> None:
    out = out or run / "deploy"
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_missing_run_directory(tmp_path):
    res = _invoke("fuse-export", tmp_path / "nope", "--onnx")
    assert res.exit_code == 1
    assert "does not exist" in _one_line_error(res)
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("damage", ["truncate", "corrupt_header", "other_architecture", "nan"])
def test_bad_weights(runs, tmp_path, damage):
    run = _copy_run(runs["resnet20"], tmp_path / "run")
    weights = run / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        expect = "not a readable safetensors file"
    elif damage == "corrupt_header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(data))
        expect = "not a readable safetensors file"
    elif damage == "other_architecture":
        save_file(models.create("resnet32", num_classes=10).state_dict(), str(weights))
        expect = "does not match architecture 'resnet20'"
    else:
        state = load_file(weights)
        key = next(k for k in state if k.endswith("bn.running_var"))
        state[key][0] = float("nan")
        save_file(state, str(weights))
        expect = "non-finite"
    res = _invoke("fuse-export", run, "--onnx")
    assert res.exit_code == 1
    assert expect in _one_line_error(res)
    _assert_nothing_written(run)


def test_unknown_model(runs, tmp_path):
    run = _copy_run(runs["resnet20"], tmp_path / "run")
    meta = json.loads((run / "run.json").read_text())
    meta["model"] = "resnet21"
    (run / "run.json").write_text(json.dumps(meta))
    res = _invoke("fuse-export", run, "--onnx")
    assert res.exit_code == 1
    assert "unknown model 'resnet21'" in _one_line_error(res)
    _assert_nothing_written(run)


@pytest.mark.parametrize("key, value, message", [
    ("input_size", "abc", "input_size must be [H, W], two positive integers (got 'abc')"),
    ("input_size", [32, 0], "input_size must be [H, W]"),
    ("num_classes", "ten", "num_classes must be a positive integer (got 'ten')"),
    ("in_channels", True, "in_channels must be a positive integer (got True)"),
    ("model", 20, "model must be a model name"),
    ("classes", ["a", "b"], "2 classes for num_classes 10"),
    ("normalization", {"mean": [0.5] * 3, "std": [0.0] * 3}, "normalization must be"),
    ("data", {"input_size": [0, 0]}, "data: lacks name"),
    ("data.input_size", [0, 0], "data: input_size must be [H, W], two positive integers (got [0, 0])"),
    ("data.mean", [0.5, "x", 0.5], "data: mean must be a list of finite numbers"),
    ("data.val_split", "../train", "data: val_split must be 'val' or 'test'"),
])
def test_wrong_typed_run_record(runs, tmp_path, key, value, message):
    """read_run checked that keys exist, not their types: tracebacks deep in the export."""
    run = _copy_run(runs["resnet20"], tmp_path / "run")
    meta = json.loads((run / "run.json").read_text())
    if key.startswith("data."):
        meta["data"][key[len("data."):]] = value
    else:
        meta[key] = value
    (run / "run.json").write_text(json.dumps(meta))
    res = _invoke("fuse-export", run, "--onnx", "--samples", "4")
    assert res.exit_code == 1
    line = _one_line_error(res)
    assert str(run / "run.json") in line and message in line, line
    _assert_nothing_written(run)


def test_unwritable_output_directory(runs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    res = _invoke("fuse-export", runs["resnet20"], "--onnx", "--out", blocker / "deploy")
    assert res.exit_code == 1
    assert "cannot write to" in _one_line_error(res)
    assert blocker.read_text() == "not a directory"


def test_opset_the_exporter_cannot_produce(runs, tmp_path):
    out = tmp_path / "d"
    res = _invoke("fuse-export", runs["resnet20"], "--onnx", "--opset", "99", "--out", out)
    assert res.exit_code == 1
    assert "opset 99 cannot be produced" in _one_line_error(res)
    _assert_nothing_written(runs["resnet20"], out)


def test_failed_check_leaves_no_artifact(runs, tmp_path):
    """Zero tolerance: fused and unfused differ by float rounding, so the check fails."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    res = _invoke("fuse-export", runs["resnet20"], "--onnx", "--atol", "0", "--rtol", "0",
                  "--samples", "8", "--out", out)
    assert res.exit_code == 1
    line = _one_line_error(res)
    assert "pytorch fused vs unfused" in line and "nothing was written" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # no artifact, no staging folder


@pytest.mark.parametrize(
    "profile, message",
    [
        ({"onnx": True, "bogus": 1}, "unknown key 'bogus'"),
        ({"onnx": "yes"}, "onnx must be true/false"),
        ({"batch": "big"}, "must be 'dynamic' or a positive integer"),
        ({"opset": 12.5}, "opset must be an integer"),
    ],
)
def test_bad_profile(runs, tmp_path, profile, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    res = _invoke("fuse-export", runs["resnet20"], "--profile", path, "--out", tmp_path / "d")
    assert res.exit_code == 1
    assert message in _one_line_error(res)
    assert not (tmp_path / "d").exists()
