"""The training loop: run directory contract, resume after a real kill, DDP, non-finite loss."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from rsd_deploy.errors import RSDError
from rsd_deploy.fuse import fuse_model
from rsd_deploy.io import load_tensors
from rsd_deploy.run import load_run
from rsd_deploy.training import TrainConfig, train
from rsd_deploy.training import checkpoint, loop
from rsd_deploy.training.evaluation import evaluate_run

ROOT = Path(__file__).resolve().parents[1]

# resnet20 on 8x8 digits, 4 steps of 32 per epoch: seconds per epoch on a CPU.
TINY = dict(data="digits", input_size=8, train_samples=128, batch_size=32, epochs=2, workers=0,
            device="cpu", eval_batch_size=512)


def _config(**kw) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **kw})


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rsd_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "rsd"
    torch.set_num_threads(torch.get_num_threads())
    assert train(_config(), out, quiet=True) == out
    return out


def test_run_directory_contract(rsd_run):
    names = {p.name for p in rsd_run.iterdir()}
    assert names == {"model.safetensors", "run.json", "metrics.jsonl", "curves.png",
                     "checkpoint.safetensors", "checkpoint.json"}  # no temp files left
    meta = json.loads((rsd_run / "run.json").read_text())
    assert meta["model"] == "resnet20" and meta["form"] == "rsd" and meta["method"] == "rsd"
    assert meta["num_classes"] == 10 and meta["classes"] == [str(i) for i in range(10)]
    assert meta["input_size"] == [8, 8] and meta["in_channels"] == 3
    assert meta["normalization"]["mean"] == meta["data"]["mean"]
    assert meta["config"] == _config().to_json()
    assert {"rsd_deploy", "torch", "torchvision"} <= set(meta["versions"])
    assert meta["metrics"]["epochs_completed"] == 2
    lines = [json.loads(line) for line in (rsd_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and [r["steps"] for r in lines] == [4, 8]
    for r in lines:
        assert set(r["terms"]) == {"ce_student", "ce_teacher", "ce_mix_tt", "ce_mix_ts", "kd_student", "kd_mix"}
        assert {"train_acc", "train_acc_student", "val_top1", "val_top5", "lr", "epoch_time",
                "images_per_sec"} <= set(r)
        assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 1.0
    assert meta["metrics"]["val_top1"] == lines[-1]["val_top1"]
    assert (rsd_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The weights are the model, it fuses, and the fused net computes the same logits.
    model, _ = load_run(rsd_run)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fuse_model(model)(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(m.drop_rate == 0.0 for m in model.modules() if hasattr(m, "drop_rate"))


def test_eval_reproduces_recorded_validation_accuracy(rsd_run):
    result = evaluate_run(rsd_run, device="cpu", workers=0)
    meta = json.loads((rsd_run / "run.json").read_text())
    assert result["images"] == 360 and result["split"] == "val"
    assert result["top1"] == pytest.approx(meta["metrics"]["val_top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(meta["metrics"]["val_top5"], abs=1e-9)


def test_killed_after_an_epoch_and_resumed_is_bit_identical(rsd_run, tmp_path):
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from rsd_deploy.training import TrainConfig, train
        torch.set_num_threads({torch.get_num_threads()})
        def die(epoch, metrics, model):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        train(TrainConfig.from_dict({TINY!r}), {str(out)!r}, quiet=True, on_epoch_end=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((out / "checkpoint.json").read_text())["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    train(_config(), out, resume=True, quiet=True)
    resumed, straight = load_tensors(out / "model.safetensors"), load_tensors(rsd_run / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    a, b = load_tensors(out / "checkpoint.safetensors"), load_tensors(rsd_run / "checkpoint.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)  # optimizer momentum too
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (rsd_run / "metrics.jsonl").read_text().splitlines()]
    assert [(h["loss"], h["val_top1"]) for h in hist] == [(h["loss"], h["val_top1"]) for h in ref]


def test_resume_of_finished_run_and_changed_settings(rsd_run):
    from rsd_deploy.training import resume_config

    with pytest.raises(RSDError, match="already trained 2 epochs"):
        train(_config(), rsd_run, resume=True, quiet=True)
    with pytest.raises(RSDError, match="cannot change lr"):
        resume_config(rsd_run, {"lr": 0.1})
    assert resume_config(rsd_run, {"epochs": 5}).epochs == 5


def test_max_steps_stops_mid_epoch_keeping_last_full_checkpoint(tmp_path):
    out = tmp_path / "short"
    train(_config(method="baseline", epochs=3, max_steps=6), out, quiet=True)
    meta = json.loads((out / "run.json").read_text())
    assert meta["metrics"]["steps"] == 6 and meta["metrics"]["complete"] is False
    assert json.loads((out / "checkpoint.json").read_text())["epoch"] == 1


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    saved = {}

    def poison(epoch, metrics, model):
        saved.update({p.name: _sha(p) for p in out.iterdir()})
        with torch.no_grad():
            model.head[-1].weight.fill_(float("nan"))

    with pytest.raises(RSDError, match=r"non-finite loss \(nan\) at epoch 2, step 1") as err:
        train(_config(method="baseline"), out, quiet=True, on_epoch_end=poison)
    assert "\n" not in str(err.value)
    assert {p.name: _sha(p) for p in out.iterdir()} == saved  # nothing rewritten
    model, meta = load_run(out)
    assert meta["form"] == "plain" and meta["method"] == "baseline"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert set(meta["metrics"]["terms"]) == {"ce"}
    assert json.loads((out / "checkpoint.json").read_text())["epoch"] == 1


def test_corrupt_resume_state_is_an_error(rsd_run, tmp_path):
    import shutil

    for damage in ("truncate", "json", "mismatch"):
        run = tmp_path / damage
        shutil.copytree(rsd_run, run)
        if damage == "truncate":
            data = (run / checkpoint.TENSORS_FILE).read_bytes()
            (run / checkpoint.TENSORS_FILE).write_bytes(data[: len(data) // 2])
        elif damage == "json":
            (run / checkpoint.STATE_FILE).write_text('{"format": 1, "epoch": ')
        else:
            state = json.loads((run / checkpoint.STATE_FILE).read_text())
            state["epoch"] = 1
            (run / checkpoint.STATE_FILE).write_text(json.dumps(state))
        with pytest.raises(RSDError) as err:
            train(_config(epochs=3), run, resume=True, quiet=True)
        assert "\n" not in str(err.value) and str(run) in str(err.value)


def test_resume_into_an_unwritable_folder_fails_before_training(rsd_run, tmp_path, monkeypatch):
    """Fresh runs tested --out for writing first; a resumed one trained a whole epoch first.

    Running as root, a read-only folder is still writable, so the write failure is
    simulated where every file is created: mkstemp beside the target.
    """
    run = tmp_path / "run"
    shutil.copytree(rsd_run, run)
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kw):
        if dir is not None and Path(dir) == run:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    trained = []
    real = loop._train_epoch
    monkeypatch.setattr(loop, "_train_epoch", lambda *a, **k: trained.append(1) or real(*a, **k))
    with pytest.raises(RSDError, match=f"cannot write to {run}"):
        train(_config(epochs=3), run, resume=True, quiet=True)
    assert not trained


def test_a_new_run_sweeps_what_killed_runs_left(tmp_path):
    """A SIGKILL during a write leaves its temporary file (8 MB for a checkpoint); the next
    run in the folder removes such files, and only those (issue 14, case 10)."""
    out = tmp_path / "run"
    out.mkdir()
    stale = [".checkpoint.safetensors.k1ll3d00.tmp", ".model.safetensors.abcdefgh.tmp",
             "..curves.png.abcdefgh.tmp.ijklmnop.tmp", "..write-test.x1y2z3w4.tmp"]
    for name in stale:
        (out / name).write_bytes(b"half")
    (out / ".notes.tmp").write_text("not ours")
    train(_config(method="baseline", epochs=1), out, quiet=True)
    assert not [name for name in stale if (out / name).exists()]
    assert (out / ".notes.tmp").read_text() == "not ours"


def test_one_training_process_per_run_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    from rsd_deploy.io import DirLock

    with DirLock(out, "training run"):  # as another process training there would hold it
        with pytest.raises(RSDError, match=f"another training run is writing to {out}"):
            train(_config(method="baseline", epochs=1), out, quiet=True)
    assert not list(out.iterdir())


@pytest.mark.slow
def test_ddp_two_processes_identical_weights_files_written_once(tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from rsd_deploy.io import save_tensors
        from rsd_deploy.training import TrainConfig, train
        out = sys.argv[1]
        def keep(epoch, metrics, model):
            save_tensors(os.path.join(out + "-ranks", f"rank{{os.environ['RANK']}}.safetensors"),
                         model.state_dict())
        cfg = TrainConfig.from_dict({dict(TINY, batch_size=16, epochs=1)!r})
        train(cfg, out, on_epoch_end=keep)
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out)]
    proc = subprocess.run(cmd, env=dict(_env(), OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_tensors(tmp_path / "ddp-ranks" / "rank0.safetensors")
    r1 = load_tensors(tmp_path / "ddp-ranks" / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    saved = load_tensors(out / "model.safetensors")
    assert all(torch.equal(saved[k], r0[k]) for k in r0)
    # Written once, by rank 0: one metrics line, one summary line, no temp files.
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert proc.stdout.count("epoch 1/1:") == 1 and proc.stdout.count("run: ") == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    meta = json.loads((out / "run.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["effective_batch_size"] == 32
    # 128 samples / (16 x 2 processes) = 4 steps.
    assert meta["metrics"]["steps"] == 4
    assert "effective batch 32 (2 processes)" in proc.stdout
