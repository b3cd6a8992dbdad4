"""A torchvision model through the command line: train, fuse-export, bench, eval, inspect."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rsd_deploy.cli import main
from rsd_deploy.io import save_tensors, sha256_file
from rsd_deploy.models.external import build_plain
from rsd_deploy.run import load_run
from rsd_deploy.training import TrainConfig
from rsd_deploy.training.loop import _build_model

SMOKE = ["--train-samples", "128", "--val-samples", "64", "--batch-size", "32", "--epochs", "1",
         "--max-steps", "2", "--precise-bn", "1", "--workers", "0", "--device", "cpu", "--quiet"]


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text


@pytest.mark.slow
def test_torchvision_resnet18_train_export_bench(cifar_mini, tmp_path):
    run = tmp_path / "run"
    result = _run("train", "--model", "torchvision:resnet18", "--data", "imagefolder", "--data-dir", cifar_mini,
                  *SMOKE, "--out", run)
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["model"] == "torchvision:resnet18" and info["form"] == "rsd"
    assert info["input_size"] == [32, 32]  # the data's own side
    assert info["restructure"]["counts"]["converted"] == 16 and len(info["restructure"]["pairs"]) == 16
    assert info["training"]["mix_points"] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    model, _ = load_run(run)  # rebuilt from the record, weights loaded strictly
    assert sum(type(m).__name__ == "RSDConv" for m in model.modules()) == 16

    result = _run("fuse-export", run, "--onnx")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "deploy" / "report.json").read_text())
    assert report["audit"]["passed"] and report["audit"]["identical"]
    assert report["audit"]["fused"]["Conv"] == 20 and "BatchNormalization" not in report["audit"]["fused"]

    result = _run("bench", run, "--ort", "--batch-sizes", "1", "--iters", "3", "--warmup-s", "0.05",
                  "--threads", "1", "--quiet")
    assert result.exit_code == 0, result.output
    bench = json.loads((run / "bench" / "bench.json").read_text())
    assert bench["model"] == "torchvision:resnet18" and {"unfused", "fused", "baseline"} <= set(
        bench["results"][0]["models"])

    result = _run("eval", run, "--workers", "0")
    assert result.exit_code == 0 and "top-1" in result.output, result.output


def test_baseline_trains_the_unmodified_model(tmp_path):
    run = tmp_path / "base"
    result = _run("train", "--model", "torchvision:mobilenet_v2", "--method", "baseline", *SMOKE, "--out", run)
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["form"] == "plain" and "restructure" not in info
    model, _ = load_run(run)
    assert type(model).__name__ == "MobileNetV2" and not any(
        type(m).__name__ == "RSDConv" for m in model.modules())


def test_mix_points_are_asked_for_when_a_family_has_none(tmp_path):
    _one_line_error(_run("train", "--model", "torchvision:shufflenet_v2_x0_5", *SMOKE, "--out", tmp_path / "a"),
                    "has no default mix points", "--mix-points", "stage2")
    result = _run("train", "--model", "torchvision:shufflenet_v2_x0_5", "--mix-points", "stage2,stage3,stage4",
                  *SMOKE, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    _one_line_error(_run("train", "--model", "torchvision:resnet18", "--mix-points", "layer1.0.conv1",
                         *SMOKE, "--out", tmp_path / "c"), "'layer1.0.conv1' is not a cut")
    _one_line_error(_run("train", "--model", "torchvision:resnet99", *SMOKE), "no classification model 'resnet99'")


def test_init_weights_start_the_rsd_form_where_the_plain_model_was(tmp_path):
    torch.manual_seed(3)
    plain = build_plain("torchvision", "resnet18", num_classes=10, in_channels=3)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "init.safetensors"
    save_tensors(path, plain.state_dict())
    config = TrainConfig(model="torchvision:resnet18", init_weights=str(path)).validate()
    from rsd_deploy.data import load_datasets

    _, _, info = load_datasets("digits", input_size=16)
    model, record = _build_model(config, info, "rsd", say=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)
    assert record["counts"]["converted"] == 16

    result = _run("train", "--model", "torchvision:resnet18", "--init-weights", path, *SMOKE, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "r" / "run.json").read_text())
    assert recorded["training"]["init_weights_sha256"] == sha256_file(path)
    _one_line_error(_run("train", "--init-weights", path, *SMOKE), "does not match resnet20")
    _one_line_error(_run("train", "--model", "torchvision:resnet18", "--init-weights", tmp_path / "nope",
                         *SMOKE), "not found")
    # An ImageNet state dict (1000 classes) starts a 10-class run: only the classifier is fresh.
    imagenet = build_plain("torchvision", "resnet18", num_classes=1000, in_channels=3)
    save_tensors(tmp_path / "imagenet.safetensors", imagenet.state_dict())
    config = TrainConfig(model="torchvision:resnet18", init_weights=str(tmp_path / "imagenet.safetensors"))
    model, _ = _build_model(config.validate(), info, "plain", say=False)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight) and model.fc.weight.shape == (10, 512)
    save_tensors(tmp_path / "other.safetensors", {"fc.weight": torch.zeros(3, 3)})
    _one_line_error(_run("train", "--model", "torchvision:resnet18", "--init-weights",
                         tmp_path / "other.safetensors", *SMOKE, "--out", tmp_path / "o"), "does not match")


def test_inspect_lists_every_conv_and_both_forms():
    result = _run("inspect", "torchvision:resnet18", "--input-size", "64", "--num-classes", "10")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "16 of 20 convs restructured" in text and "default mix points: maxpool, layer1" in text
    rows = {line.split()[0]: line.split(maxsplit=4)[1:] for line in text.splitlines()[10:]}
    assert len(rows) == 20
    assert rows["conv1"] == ["7x7", "2x2", "1", "skipped: kernel 7x7 not restructured"]
    assert rows["layer2.0.downsample.0"] == ["1x1", "2x2", "1", "skipped: kernel 1x1 not restructured"]
    assert "layer1.0.conv1" in text and "restructured (BN layer1.0.bn1)" in text
    result = _run("inspect", "resnet20")
    assert result.exit_code == 0 and "default mix points: stem, stages.0, stages.1, stages.2" in result.output
    _one_line_error(_run("inspect", "torchvision:resnet18", "--input-size", "0"), "--input-size")
    _one_line_error(_run("inspect", "bogus:x"), "unknown model source 'bogus'")


def test_one_kxk_branch_restructures_a_torchvision_model_and_rebuilds_from_its_record():
    from rsd_deploy.blocks import RSDConv
    from rsd_deploy.data import load_datasets
    from rsd_deploy.fuse import fuse_model
    from rsd_deploy.models.external import create

    _, _, info = load_datasets("digits", input_size=16)
    config = TrainConfig(model="torchvision:resnet18", kxk_branches=1).validate()
    model, record = _build_model(config, info, "rsd", say=False)
    assert record["num_square"] == 1 and record["counts"]["converted"] == 16
    assert all(m.num_square == 1 for m in model.modules() if isinstance(m, RSDConv))
    again = create("torchvision", "resnet18", num_classes=10, in_channels=3, form="rsd", restructured=record)
    assert [m.num_square for m in again.modules() if isinstance(m, RSDConv)] == [1] * 16
    again.load_state_dict(model.state_dict())  # same tensors, same shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fuse_model(model.eval())(x), model(x), rtol=1e-4, atol=1e-4)
