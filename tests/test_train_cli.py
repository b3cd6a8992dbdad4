"""``rsd-deploy train`` / ``eval``: options, recipes, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from rsd_deploy import models
from rsd_deploy.cli import main, train_cmd
from rsd_deploy.errors import RSDError
from rsd_deploy.training import TrainConfig, evaluation, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--input-size", "8", "--train-samples", "64", "--batch-size", "32", "--workers", "0",
        "--device", "cpu", "--quiet"]


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text, text
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, text


def test_cli_defaults_are_the_config_defaults():
    defaults = TrainConfig().to_json()
    for param in train_cmd.params:
        if param.name in defaults:
            value = param.default
            if param.callback is not None and isinstance(value, str):
                value = param.callback(None, param, value)
            assert value == defaults[param.name], param.name
    assert set(defaults) <= {p.name for p in train_cmd.params}


def test_stability_options_reach_the_config(monkeypatch, tmp_path):
    import rsd_deploy.training as training

    seen = []
    monkeypatch.setattr(training, "train", lambda config, out, **kw: seen.append(config) or Path(out))
    result = _run("train", "--quiet", "--out", str(tmp_path / "r"), "--clip-grad-norm", "0", "--no-collapse-guard",
                  "--warmup-epochs", "0.25", "--schedule", "step", "--precise-bn", "0", "--lr", "0.05")
    assert result.exit_code == 0, result.output
    c, = seen
    assert (c.clip_grad_norm, c.collapse_guard, c.warmup_epochs, c.schedule, c.precise_bn, c.lr) == \
        (None, False, 0.25, "step", 0, 0.05)
    seen.clear()
    assert _run("train", "--quiet", "--out", str(tmp_path / "r"), "--clip-grad-norm", "2.5").exit_code == 0
    assert seen[0].clip_grad_norm == 2.5 and seen[0].collapse_guard and seen[0].precise_bn == TrainConfig().precise_bn


@pytest.mark.parametrize("path", sorted((ROOT / "train").glob("*.json")), ids=lambda p: p.name)
def test_recipes_are_valid(path):
    config = TrainConfig.from_dict(load_recipe(path), str(path)).validate()
    if path.name.startswith("cifar100_"):
        stem = path.stem[len("cifar100_"):]
        stable = stem.endswith("_stable")
        model, method = stem.removesuffix("_stable").rsplit("_", 1)
        assert (config.model, config.method) == (model, method)
        assert (config.epochs, config.batch_size, config.lr, config.momentum) == (240, 64, 0.05, 0.9)
        assert config.weight_decay == 5e-4 and config.lr_milestones == [150, 180, 210]
        assert config.schedule == "step"
        assert config.lr_at(149) == 0.05 and config.lr_at(150) == pytest.approx(0.005)
        assert config.lr_at(239) == pytest.approx(0.05e-3)
        if stable:  # the paper's recipe plus warm-up, clipping and precise BN, nothing else
            paper = TrainConfig.from_dict(load_recipe(path.with_name(path.name.replace("_stable", ""))))
            changed = {k for k, v in config.to_json().items() if paper.to_json()[k] != v}
            assert changed == {"warmup_epochs", "clip_grad_norm", "precise_bn"}
            assert (config.warmup_epochs, config.clip_grad_norm, config.precise_bn) == (5.0, 5.0, 50)
            assert config.lr_at(0, 0, 100) == pytest.approx(0.05 / 500)
        else:  # exactly as the paper states it: no warm-up, no clipping, no precise BN
            assert (config.warmup_epochs, config.clip_grad_norm, config.precise_bn) == (0.0, None, 0)
            assert config.lr_at(0, 0, 100) == 0.05


def test_paper_recipes_cover_every_model_and_method():
    names = {p.stem for p in (ROOT / "train").glob("cifar100_*.json")}
    for model in ("resnet32", "resnet110", "wrn20_8", "vgg16", "vgg19", "densenet40_12"):
        assert model in models.names()
        assert {f"cifar100_{model}_{m}{v}" for m in ("rsd", "baseline") for v in ("", "_stable")} <= names


def test_train_and_eval_commands(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "baseline"\nepochs = 3\nlr = 0.1\nseed = 4\n')
    out = tmp_path / "run"
    # Explicit flags override the recipe; the recipe overrides the defaults.
    result = _run("train", "--config", str(recipe), "--epochs", "1", *TINY, "--out", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["method"], config["epochs"], config["lr"], config["seed"]) == ("baseline", 1, 0.1, 4)
    assert config["drop_rate"] == 0.2
    result = _run("eval", str(out), "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    top1 = json.loads((out / "run.json").read_text())["metrics"]["val_top1"]
    assert f"top-1 {100 * top1:.2f}%" in result.output and "360 images" in result.output


def test_train_prints_run_and_next_command(tmp_path):
    out = tmp_path / "run"
    result = _run("train", "--method", "baseline", "--epochs", "1", *TINY[:-1], "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"run: {out}" in result.output
    assert f"next: rsd-deploy fuse-export {out} --onnx" in result.output
    assert "epoch 1/1:" in result.output and "val top-1" in result.output


@pytest.mark.parametrize("args,needles", [
    (["--model", "resnet9000"], ["unknown model 'resnet9000'"]),
    (["--data", "mnist"], ["unknown data 'mnist'"]),
    (["--data", "cifar10", "--data-dir", "/nonexistent/cifar"], ["cifar10 not found", "--download"]),
    (["--data", "cifar100"], ["needs --data-dir"]),
    (["--data", "imagefolder", "--data-dir", "/nonexistent/images"], ["no train/ folder"]),
    (["--epochs", "0"], ["--epochs must be at least 1"]),
    (["--loss-terms", "ce_student,bogus"], ["unknown loss term"]),
    (["--lr-milestones", "5,3"], ["--lr-milestones"]),
    (["--resume"], ["--resume needs --out"]),
])
def test_bad_options_are_one_line_errors(args, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is runs/<name>-<time> under the working directory
    _one_line_error(_run("train", *args), *needles)
    assert not list(tmp_path.glob("runs/*")), "a failed run left its directory behind"


def test_amp_on_a_cpu_without_bfloat16_is_a_one_line_error(tmp_path, monkeypatch):
    """--amp on the CPU trains in bfloat16 where the CPU has bfloat16 instructions (it was
    refused everywhere, "--amp needs a CUDA device"); on any other CPU it is one line."""

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation, "cpu_has_bf16", lambda: False)
    _one_line_error(_run("train", "--amp", "--device", "cpu"), "bfloat16 instructions")
    assert not list(tmp_path.glob("runs/*")), "a failed run left its directory behind"


@pytest.mark.parametrize("args,needles", [
    (["--lr", "nan"], ["--lr must be a finite number (got nan)"]),
    (["--lr", "inf"], ["--lr must be a finite number (got inf)"]),
    (["--momentum", "nan"], ["--momentum must be a finite number"]),
    (["--temperature", "nan"], ["--temperature must be a finite number"]),
    (["--weight-decay", "-inf"], ["--weight-decay must be a finite number"]),
    (["--alpha", "-5"], ["--alpha must be >= 0 (got -5.0)"]),
    (["--alpha", "0", "--beta", "0"], ["--alpha and --beta cannot both be 0"]),
    (["--momentum", "1.5"], ["--momentum must be in [0, 1)"]),
    (["--drop-rate", "1"], ["--drop-rate must be in [0, 1)"]),
    (["--kxk-branches", "0"], ["--kxk-branches must be 1, 2 or 3 (got 0)"]),
    (["--kxk-branches", "4"], ["--kxk-branches must be 1, 2 or 3 (got 4)"]),
    (["--kxk-branches", "-1"], ["--kxk-branches must be 1, 2 or 3 (got -1)"]),
    (["--label-smoothing", "1"], ["--label-smoothing must be in [0, 1) (got 1.0)"]),
    (["--label-smoothing", "-0.1"], ["--label-smoothing must be in [0, 1)"]),
    (["--label-smoothing", "nan"], ["--label-smoothing must be a finite number"]),
    (["--seed", "-1"], ["--seed must be >= 0"]),
    (["--seed", "99999999999999999999999"], ["--seed must fit in 64 bits"]),
    (["--model", "vgg16", "--input-size", "4"], ["--input-size 4 is too small for vgg16 (it needs at least 8)"]),
    (["--model", "densenet40_12", "--input-size", "2"], ["too small for densenet40_12 (it needs at least 4)"]),
])
def test_nonsense_numbers_are_refused_before_any_work(args, needles, tmp_path):
    """NaN passes `x <= 0`, so every float is checked for finiteness first; ranges after.

    The tiny options make a run that slips through finish in seconds (and fail the test).
    """
    out = tmp_path / "run"
    tiny = [*TINY, "--method", "baseline", "--epochs", "1", "--max-steps", "1", "--out", str(out)]
    _one_line_error(_run("train", *tiny, *args), *needles)
    assert not out.exists()


@pytest.mark.parametrize("value", [0, 4, -1, 2.0, 2.5, True, "2", None])
def test_kxk_branches_other_than_1_2_3_is_one_line_in_the_api_and_in_recipes(value):
    """Not 2.0 nor True either (they equal 2 and 1): a branch count is an integer."""
    with pytest.raises(RSDError, match=r"^`kxk_branches` must be 1, 2 or 3 \(got ") as err:
        TrainConfig(kxk_branches=value).validate()
    assert "\n" not in str(err.value)
    with pytest.raises(RSDError, match="kxk_branches"):
        TrainConfig.from_dict({"kxk-branches": value}, "recipe.json").validate()
    assert [TrainConfig(kxk_branches=k).validate().kxk_branches for k in (1, 2, 3)] == [1, 2, 3]


def test_unwritable_out_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _one_line_error(_run("train", *TINY, "--out", str(blocker / "run")), "cannot write")
    _one_line_error(_run("train", *TINY, "--out", str(blocker)), "not a directory")


def test_existing_run_needs_resume(tmp_path):
    out = tmp_path / "run"
    assert _run("train", "--method", "baseline", "--epochs", "1", *TINY, "--out", str(out)).exit_code == 0
    _one_line_error(_run("train", *TINY, "--out", str(out)), "already holds a run", "--resume")
    _one_line_error(_run("train", "--resume", "--out", str(out), "--lr", "1.0"), "cannot change lr")
    _one_line_error(_run("train", "--resume", "--out", str(out), "--kxk-branches", "1"), "cannot change kxk_branches")
    _one_line_error(_run("train", "--resume", "--out", str(out)), "already trained 1 epochs")
    result = _run("train", "--resume", "--out", str(out), "--epochs", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    _one_line_error(_run("train", "--resume", "--out", str(tmp_path / "nothing")), "no resume state")


@pytest.mark.parametrize("text,suffix,needles", [
    ('{"epochs": 2, "lerning_rate": 0.1}', ".json", ["unknown key 'lerning_rate'"]),
    ('{"epochs": "two"}', ".json", ["epochs", "wrong type"]),
    ('{"epochs": 2,', ".json", ["not valid JSON"]),
    ('epochs = [', ".toml", ["not valid TOML"]),
    ('[1, 2]', ".json", ["table of settings"]),
    ('{"lr": NaN}', ".json", ["--lr must be a finite number (got nan)"]),
    ('{"lr_gamma": -Infinity}', ".json", ["--lr-gamma must be a finite number"]),
    ('temperature = nan', ".toml", ["--temperature must be a finite number"]),
    ('lr_milestones = [5, 99999999999999999999]', ".toml", ["--lr-milestones must fit in 64 bits"]),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, suffix, needles):
    recipe = tmp_path / f"recipe{suffix}"
    recipe.write_text(text)
    out = tmp_path / "run"  # tiny options: a recipe that slips through trains in seconds
    _one_line_error(_run("train", "--config", str(recipe), *TINY, "--epochs", "1", "--max-steps", "1",
                         "--out", str(out)), *needles)
    assert not out.exists()


@pytest.mark.parametrize("args,needles", [
    (["--batch-size", "0"], ["--batch-size must be at least 1 (got 0)"]),
    (["--workers", "-1"], ["--workers must be >= 0 (got -1)"]),
])
def test_eval_refuses_what_train_refuses(tmp_path, args, needles):
    """train checked --batch-size and --workers, eval did not (a traceback from the DataLoader)."""
    out = tmp_path / "run"
    assert _run("train", "--method", "baseline", "--epochs", "1", "--max-steps", "1", *TINY,
                "--out", str(out)).exit_code == 0
    _one_line_error(_run("eval", str(out), "--device", "cpu", *args), *needles)


def test_missing_recipe_and_eval_of_missing_run(tmp_path):
    _one_line_error(_run("train", "--config", str(tmp_path / "nope.json")), "not found")
    _one_line_error(_run("eval", str(tmp_path / "nope")), "does not exist")


def test_config_type_checks():
    with pytest.raises(RSDError, match="wrong type"):
        TrainConfig.from_dict({"mixture": "yes"})
    with pytest.raises(RSDError, match="wrong type"):
        TrainConfig.from_dict({"lr_milestones": [1.5]})
    config = TrainConfig.from_dict({"lr": 1, "lr-milestones": [2, 4], "input_size": None})
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.lr_milestones == [2, 4]
    assert config.resolved_input_size() == 16  # digits default
    assert TrainConfig(data="imagefolder").resolved_input_size() == 32


# Bad image folders (issue 14, case 7): one line naming the folder or the file. ---------------

IMAGE_TINY = ["--data", "imagefolder", "--input-size", "8", "--train-samples", "32", "--batch-size", "16",
              "--epochs", "1", "--method", "baseline", "--device", "cpu", "--quiet"]


@pytest.fixture
def images(tmp_path, cifar_mini) -> Path:
    """Two classes of real images: 20 per class in train/, 8 in val/."""
    root = tmp_path / "images"
    for split, n in (("train", 20), ("val", 8)):
        for cls in ("airplane", "cat"):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((cifar_mini / split / cls).iterdir())[:n]:
                shutil.copy(src, root / split / cls / src.name)
    return root


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"\x00 not an image " * 8)
    return path


@pytest.mark.parametrize("damage,workers,needles", [
    ("empty train", "0", ["train: Couldn't find any class folder"]),
    ("empty class", "0", ["train: Found no valid file for the classes bird"]),
    ("corrupt train image", "0", ["cannot read image", "train/cat/broken.jpg"]),
    ("corrupt val image", "0", ["cannot read image", "val/cat/broken.jpg"]),
    # Through a DataLoader worker process, which wraps the error in its traceback.
    ("corrupt val image", "1", ["cannot read image", "val/cat/broken.jpg"]),
])
def test_bad_image_folders(images, tmp_path, damage, workers, needles):
    if damage == "empty train":
        shutil.rmtree(images / "train")
        (images / "train").mkdir()
    elif damage == "empty class":
        (images / "train" / "bird").mkdir()
    else:
        _corrupt(images / ("train" if "train" in damage else "val") / "cat" / "broken.jpg")
    out = tmp_path / "run"
    result = _run("train", *IMAGE_TINY, "--data-dir", str(images), "--workers", workers, "--out", str(out))
    _one_line_error(result, *needles)
    assert not out.exists()


def test_eval_of_a_moved_or_damaged_validation_split(images, tmp_path):
    out = tmp_path / "run"
    assert _run("train", *IMAGE_TINY, "--data-dir", str(images), "--workers", "0",
                "--out", str(out)).exit_code == 0
    assert _run("eval", str(out), "--device", "cpu", "--workers", "0").exit_code == 0
    broken = _corrupt(images / "val" / "airplane" / "broken.png")
    for workers in ("0", "1"):
        _one_line_error(_run("eval", str(out), "--device", "cpu", "--workers", workers),
                        f"cannot read image {broken}")
    moved = tmp_path / "moved"
    (moved / "train").mkdir(parents=True)
    _one_line_error(_run("eval", str(out), "--data-dir", str(moved), "--device", "cpu", "--workers", "0"),
                    f"{moved} has no val/ folder")


def test_a_baseline_run_starts_an_equivalent_rsd_run(tmp_path):
    """--init-weights BASELINE_RUN/model.safetensors for a zoo model: RSD fine-tunes the baseline."""
    import torch

    from rsd_deploy.data import load_datasets
    from rsd_deploy.io import sha256_file
    from rsd_deploy.run import load_run
    from rsd_deploy.training.loop import _build_model

    base = tmp_path / "base"
    tiny = [*TINY, "--epochs", "1", "--precise-bn", "1"]
    assert _run("train", *tiny, "--method", "baseline", "--out", str(base)).exit_code == 0
    weights = base / "model.safetensors"
    plain, _ = load_run(base)
    _, _, info = load_datasets("digits", input_size=8)
    config = TrainConfig(model="resnet20", input_size=8, init_weights=str(weights)).validate()
    rsd, _ = _build_model(config, info, "rsd", say=False)
    assert sum(type(m).__name__ == "RSDConv" for m in rsd.modules()) == 19
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # trained BN statistics, so this is not the identity of a fresh net
        torch.testing.assert_close(rsd.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)
        assert plain(x).abs().max() > 0.1

    ft = tmp_path / "ft"
    result = _run("train", *tiny, "--init-weights", str(weights), "--label-smoothing", "0.1", "--out", str(ft))
    assert result.exit_code == 0, result.output
    recorded = json.loads((ft / "run.json").read_text())
    assert recorded["training"]["init_weights_sha256"] == sha256_file(weights)
    assert recorded["config"]["label_smoothing"] == 0.1
    assert _run("fuse-export", str(ft), "--onnx").exit_code == 0
    assert json.loads((ft / "deploy" / "report.json").read_text())["audit"]["passed"]

    # Weights of another model, or of an RSD run (not the plain form): one line, nothing written.
    for bad, model in ((weights, "resnet32"), (ft / "model.safetensors", "resnet20")):
        out = tmp_path / f"bad_{model}"
        _one_line_error(_run("train", *tiny, "--model", model, "--init-weights", str(bad), "--out", str(out)),
                        "--init-weights", f"does not match {model}")
        assert not out.exists()


@pytest.mark.parametrize("k", [1, 2])
def test_fewer_kxk_branches_train_fuse_and_export(tmp_path, k):
    """--kxk-branches: the run records it, rebuilds with it, fuses exactly and passes the ONNX audit."""
    import torch

    from rsd_deploy.blocks import RSDConv
    from rsd_deploy.fuse import fuse_model
    from rsd_deploy.run import load_run

    run = tmp_path / "run"
    result = _run("train", *TINY, "--epochs", "1", "--precise-bn", "1", "--kxk-branches", str(k), "--out", str(run))
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["kxk_branches"] == k and info["restructure"] == {"num_square": k}
    model, _ = load_run(run)
    blocks = [m for m in model.modules() if isinstance(m, RSDConv)]
    assert len(blocks) == 19 and all(b.num_square == k and b.weight_square.shape[0] == k for b in blocks)
    paper = models.create("resnet20", num_classes=10, form="rsd")
    fewer = sum(p.numel() for p in paper.parameters()) - sum(p.numel() for p in model.parameters())
    assert fewer == sum((3 - k) * (b.weight_square[0].numel() + 2 * b.out_channels) for b in blocks)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fuse_model(model)(x), model(x), rtol=1e-4, atol=1e-5)
    result = _run("fuse-export", str(run), "--onnx", "--keep-unfused")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "deploy" / "report.json").read_text())
    audit = report["audit"]
    assert audit["passed"] and audit["identical"] and audit["fused"]["Conv"] == 21
    # Unfused, each block keeps three convs (stacked KxK, Kx1, 1xK) with their BNs and k + 1 Adds
    # over its k + 2 branches; the stacked KxK output is split only when it holds several branches.
    assert audit["unfused"]["Conv"] == 3 * 19 + 2 and audit["unfused"]["BatchNormalization"] == 3 * 19
    assert audit["unfused"]["Add"] == 9 + (k + 1) * 19
    assert audit["unfused"].get("Split", 0) == (19 if k > 1 else 0)
