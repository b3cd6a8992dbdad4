"""The training loop: run directory contract, resume after a real kill, DDP, non-finite loss."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rsd_deploy.errors import RSDError
from rsd_deploy.fuse import fuse_model
from rsd_deploy.io import load_tensors
from rsd_deploy.run import load_run
from rsd_deploy.training import TrainConfig, checkpoint, loop, train
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
    assert train(_config(), out) == out
    return out


def test_run_directory_contract(rsd_run):
    names = {p.name for p in rsd_run.iterdir()}
    assert names == {"model.safetensors", "run.json", "metrics.jsonl", "curves.png",
                     "checkpoint.safetensors"}  # no temp files left
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
                "images_per_sec", "eval_time"} <= set(r)
        assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 1.0
        assert 0.0 < r["eval_time"] < 60.0 and math.isfinite(r["epoch_time"])
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
        train(TrainConfig.from_dict({TINY!r}), {str(out)!r}, on_epoch_end=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoint.read_progress(out) == (1, 4)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    train(_config(), out, resume=True)
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
        train(_config(), rsd_run, resume=True)
    with pytest.raises(RSDError, match="cannot change lr"):
        resume_config(rsd_run, {"lr": 0.1})
    assert resume_config(rsd_run, {"epochs": 5}).epochs == 5


def test_max_steps_stops_mid_epoch_keeping_last_full_checkpoint(tmp_path):
    out = tmp_path / "short"
    train(_config(method="baseline", epochs=3, max_steps=6), out)
    meta = json.loads((out / "run.json").read_text())
    assert meta["metrics"]["steps"] == 6 and meta["metrics"]["complete"] is False
    assert checkpoint.read_progress(out) == (1, 4)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    saved = {}

    def poison(epoch, metrics, model):
        saved.update({p.name: _sha(p) for p in out.iterdir()})
        with torch.no_grad():
            model.head[-1].weight.fill_(float("nan"))

    with pytest.raises(RSDError, match=r"non-finite loss \(nan\) at epoch 2, step 1") as err:
        train(_config(method="baseline"), out, on_epoch_end=poison)
    assert "\n" not in str(err.value)
    assert {p.name: _sha(p) for p in out.iterdir()} == saved  # nothing rewritten
    model, info = load_run(out)
    assert info.form == "plain" and info.method == "baseline"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert set(info.metrics["terms"]) == {"ce"}
    assert checkpoint.read_progress(out) == (1, 4)


# Resume state: damaged, edited, old format; one-step epoch writes (issue 14) ---------------


def _state_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next((k for k in metadata if "resume" in k), "")
    return tensors, metadata, key


def _edit_state(run: Path, edit) -> None:
    """Apply ``edit`` to the JSON part of the resume state in place, in either format."""
    legacy = run / "checkpoint.json"
    if legacy.exists():  # format 1, before issue 14
        state = json.loads(legacy.read_text())
        edit(state)
        legacy.write_text(json.dumps(state))
        return
    tensors, metadata, key = _state_entry(run / checkpoint.STATE_FILE)
    state = json.loads(metadata[key])
    edit(state)
    save_file(tensors, str(run / checkpoint.STATE_FILE), metadata={**metadata, key: json.dumps(state)})


def _to_format_1(run: Path) -> None:
    """Rewrite the resume state as a run written before issue 14 kept it: two files."""
    tensors, metadata, key = _state_entry(run / checkpoint.STATE_FILE)
    state = json.loads(metadata[key])
    (run / "checkpoint.json").write_text(json.dumps(dict(state, format=1)))
    save_file(tensors, str(run / checkpoint.STATE_FILE), metadata={"epoch": str(state["epoch"])})


def _files(run: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in run.iterdir()}


def test_corrupt_resume_state_is_an_error(rsd_run, tmp_path):
    for damage in ("truncate", "not safetensors", "no state", "state json", "format 1 pair of two epochs"):
        run = tmp_path / damage.replace(" ", "-")
        shutil.copytree(rsd_run, run)
        path = run / checkpoint.STATE_FILE
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "not safetensors":
            path.write_text('{"format": 2, "epoch": ')
        elif damage == "no state":
            tensors, _, _ = _state_entry(path)
            save_file(tensors, str(path))
        elif damage == "state json":
            tensors, metadata, key = _state_entry(path)
            save_file(tensors, str(path), metadata={key: metadata[key][:-10]})
        else:
            _to_format_1(run)
            _edit_state(run, lambda s: s.update(epoch=1, history=s["history"][:1]))
        before = _files(run)
        with pytest.raises(RSDError) as err:
            train(_config(epochs=3), run, resume=True)
        assert "\n" not in str(err.value) and str(run) in str(err.value), damage
        assert _files(run) == before, damage
    assert "is inconsistent: checkpoint.safetensors is from epoch 2, its state from epoch 1" in str(err.value)


def _no_history_loss(state):
    del state["history"][0]["loss"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(epoch="abc"), "epoch must be a non-negative integer (got 'abc')"),
    (lambda s: s.update(step=-4), "step must be a non-negative integer (got -4)"),
    (lambda s: s.update(config=[]), "config must be an object (got [])"),
    (lambda s: s["config"].update(lr=float("nan")), "--lr must be a finite number"),
    (lambda s: s["config"].update(bogus=1), "unknown key 'bogus'"),
    (lambda s: s.update(history=[{"epoch": 1}]), "history must list the 2 epochs completed"),
    (lambda s: s["history"][1].update(epoch=7), "history entry 2 must be epoch 2 (got 7)"),
    (_no_history_loss, "history entry 1 lacks loss (numbers)"),
    (lambda s: s["history"][0].update(terms=["ce"]), "history entry 1 must hold terms"),
    (lambda s: s.update(optimizer=None), "optimizer must be an object"),
    (lambda s: s.update(scaler=3), "scaler must be an object or null"),
])
def test_edited_resume_state_is_refused_before_any_work(rsd_run, tmp_path, monkeypatch, edit, message):
    """Every entry is checked up front: a bad one used to surface as a traceback, some only
    after a whole epoch, with that epoch's files half written (issue 14, case 6)."""
    from click.testing import CliRunner

    from rsd_deploy.cli import main

    run = tmp_path / "run"
    shutil.copytree(rsd_run, run)
    _edit_state(run, edit)
    before = _files(run)
    trained = []
    real = loop._train_epoch
    monkeypatch.setattr(loop, "_train_epoch", lambda *a, **k: trained.append(1) or real(*a, **k))
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(run), "--epochs", "3", "--quiet"])
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert line.startswith("error: ") and "\n" not in line and message in line, line
    assert not trained and _files(run) == before


def test_format_1_resume_state_still_resumes(tmp_path):
    """A run written before issue 14 (checkpoint.json beside the tensors) resumes exactly;
    its first epoch commits the one-file state and removes checkpoint.json."""
    new, old = tmp_path / "new", tmp_path / "old"
    train(_config(method="baseline", epochs=1), new)
    shutil.copytree(new, old)
    _to_format_1(old)
    for run in (new, old):
        train(_config(method="baseline", epochs=2), run, resume=True)
    assert not (old / "checkpoint.json").exists()
    assert checkpoint.read_progress(old) == (2, 8)
    a, b = load_tensors(old / "model.safetensors"), load_tensors(new / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_recorded_before_kxk_branches_resumes_with_three(rsd_run, tmp_path):
    """A resume state and run.json without the key read as the paper's 3 branches; changing it is refused."""
    from rsd_deploy.blocks import RSDConv

    run = tmp_path / "run"
    shutil.copytree(rsd_run, run)
    _edit_state(run, lambda state: state["config"].pop("kxk_branches"))
    record = json.loads((run / "run.json").read_text())
    del record["config"]["kxk_branches"]
    assert "restructure" not in record
    (run / "run.json").write_text(json.dumps(record))
    assert [b.num_square for b in load_run(run)[0].modules() if isinstance(b, RSDConv)] == [3] * 19
    with pytest.raises(RSDError, match="cannot change kxk_branches when resuming"):
        loop.resume_config(run, {"kxk_branches": 1})
    config = loop.resume_config(run, {"kxk_branches": 3, "epochs": 3})
    assert config.kxk_branches == 3
    train(config, run, resume=True)
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["kxk_branches"] == 3 and "restructure" not in record
    assert checkpoint.read_progress(run)[0] == 3


def test_an_epoch_is_written_as_one_step(rsd_run, tmp_path, monkeypatch):
    """A failure while writing an epoch's files (here: the plot) changes none of them."""
    run = tmp_path / "run"
    shutil.copytree(rsd_run, run)
    before = _files(run)
    model, info = load_run(run)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)  # a later epoch's weights
    commit = dict(epoch=3, step=12, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=None,
                  config=info.config, history=history + [dict(history[-1], epoch=3)])

    def broken_plot(history, path):
        Path(path).write_bytes(b"half a png")
        raise RuntimeError("plot failed")

    monkeypatch.setattr(loop, "plot_curves", broken_plot)
    with pytest.raises(RuntimeError, match="plot failed"):
        loop._write_epoch(run, model=model, info=info.replace(metrics={}), history=commit["history"],
                          state=commit)
    assert _files(run) == before  # no temporary file left either
    monkeypatch.undo()
    loop._write_epoch(run, model=model, info=info, history=commit["history"], state=commit)
    assert checkpoint.read_progress(run) == (3, 12)
    assert torch.equal(load_tensors(run / "model.safetensors")[f"head.{len(model.head) - 1}.bias"], model.head[-1].bias)


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
        train(_config(epochs=3), run, resume=True)
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
    train(_config(method="baseline", epochs=1), out)
    assert not [name for name in stale if (out / name).exists()]
    assert (out / ".notes.tmp").read_text() == "not ours"


def test_one_training_process_per_run_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    from rsd_deploy.io import DirLock

    with DirLock(out, "training run"):  # as another process training there would hold it
        with pytest.raises(RSDError, match=f"another training run is writing to {out}"):
            train(_config(method="baseline", epochs=1), out)
    assert not list(out.iterdir())


# The kill test: SIGKILL before every rename of a run's start and epoch ends ------------------

_KILLER = r"""
import json, os, signal, sys, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)  # forked children compute: one thread, as in the reference run
from rsd_deploy.training import TrainConfig, checkpoint, train
from rsd_deploy.training.plots import plot_curves
from rsd_deploy.data import load_datasets

config = TrainConfig.from_dict(json.loads(sys.argv[1])).validate()
base = Path(sys.argv[2])
real_replace = os.replace
# Pay the one-time costs (sklearn, torchvision, matplotlib's first draw) once, before forking;
# none of this runs a torch kernel, so the children start with an untouched thread pool.
load_datasets("digits", input_size=8)
plot_curves([{"epoch": 1, "loss": 1.0, "terms": {"ce": 1.0}, "train_acc": 0.5}], base / "warm.png")


def child(out, *, kill_at=0, log=None):
    # Train (or resume) into out in a forked child; SIGKILL it before its kill_at-th rename there.
    pid = os.fork()
    if pid == 0:
        renames = []

        def replace(src, dst, *a, **k):
            if Path(dst).parent == out:
                renames.append(Path(dst).name)
                if len(renames) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **k)

        os.replace = replace
        code = 0
        try:
            train(config, out, resume=checkpoint.exists(out))
        except BaseException:
            traceback.print_exc()
            code = 1
        if log:
            Path(log).write_text(json.dumps(renames))
        os._exit(code)
    return os.waitpid(pid, 0)[1]


assert child(base / "reference", log=base / "renames.json") == 0
renames = json.loads((base / "renames.json").read_text())
results = []
for k in range(1, len(renames) + 1):
    out = base / f"kill-{k:02d}"
    killed = child(out, kill_at=k)
    recovered = child(out)
    results.append({"kill_at": k, "before": renames[k - 1], "killed": killed, "recovered": recovered})
print(json.dumps({"renames": renames, "results": results}))
"""


@pytest.mark.slow
def test_killed_at_every_write_of_an_epoch_end_resumes_to_the_same_result(tmp_path):
    """SIGKILL just before each rename into the run folder (so each epoch's end is cut after
    every one of its writes, with its temporary file left behind), then --resume (or a fresh
    start, when no resume state was committed yet): every run ends bit-identical to the
    uninterrupted one, with no temporary files left (issue 14, cases 2 and 10)."""
    cfg = dict(TINY, method="baseline", val_samples=64)
    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(cfg), str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    epoch_end = ["model.safetensors", "run.json", "metrics.jsonl", "curves.png", "checkpoint.safetensors"]
    ref = tmp_path / "reference"
    want = {name: load_tensors(ref / name) for name in ("model.safetensors", "checkpoint.safetensors")}
    want_metrics = [{k: v for k, v in json.loads(line).items() if k not in ("epoch_time", "images_per_sec", "eval_time")}
                    for line in (ref / "metrics.jsonl").read_text().splitlines()]
    for r in report["results"]:
        run = tmp_path / f"kill-{r['kill_at']:02d}"
        assert r["killed"] == signal.SIGKILL and r["recovered"] == 0, (r, proc.stderr[-3000:])
        assert sorted(p.name for p in run.iterdir()) == sorted(epoch_end), r  # no litter
        for name, tensors in want.items():
            got = load_tensors(run / name)
            assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got), (r, name)
        metrics = [{k: v for k, v in json.loads(line).items() if k not in ("epoch_time", "images_per_sec", "eval_time")}
                   for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert metrics == want_metrics, r
        assert json.loads((run / "run.json").read_text())["metrics"]["epochs_completed"] == 2
    # Killed before each of these: the start (write test, then the epoch-0 resume state),
    # then every write of two epoch ends.
    assert report["renames"] == [".write-test", "checkpoint.safetensors"] + 2 * epoch_end


@pytest.mark.slow
def test_ddp_two_processes_identical_weights_files_written_once(tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import logging, os, sys
        from rsd_deploy.io import save_tensors
        from rsd_deploy.training import TrainConfig, train
        out = sys.argv[1]
        def keep(epoch, metrics, model):
            save_tensors(os.path.join(out + "-ranks", f"rank{{os.environ['RANK']}}.safetensors"),
                         model.state_dict())
        cfg = TrainConfig.from_dict({dict(TINY, batch_size=16, epochs=1)!r})
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
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
    # Written once, by rank 0: one metrics line, one summary line (logged by rank 0 alone), no temp files.
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert proc.stdout.count("epoch 1/1:") == 1 and proc.stdout.count("effective batch") == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    meta = json.loads((out / "run.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["effective_batch_size"] == 32
    # 128 samples / (16 x 2 processes) = 4 steps.
    assert meta["metrics"]["steps"] == 4
    assert "effective batch 32 (2 processes)" in proc.stdout
