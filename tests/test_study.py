"""rsd_deploy.study: train once, resume, ledger of committed results, one writer per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import benchmark_module
from rsd_deploy import study as study_module
from rsd_deploy.errors import RSDError
from rsd_deploy.io import DirLock, write_json
from rsd_deploy.study import Job, Study, command_line, mean_std, record, relative
from rsd_deploy.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "resnet20", "data": "digits", "input_size": 8, "train_samples": 64, "batch_size": 32,
        "epochs": 1, "precise_bn": 1, "workers": 0, "device": "cpu"}


def _job(name: str, **changes) -> Job:
    return Job(name, TrainConfig.from_dict({**TINY, **changes}).validate(), {"group": "t", "seed": 0})


@pytest.fixture
def calls(monkeypatch):
    """The runs trained in this process, by folder name (training still happens)."""
    seen, real = [], study_module.train

    def train(config, run_dir, **kw):
        seen.append(Path(run_dir).name)
        return real(config, run_dir, **kw)

    monkeypatch.setattr(study_module, "train", train)
    threads = torch.get_num_threads()
    yield seen
    torch.set_num_threads(threads)


def test_runs_are_trained_once_and_read_back(tmp_path, calls):
    jobs = [_job("base", method="baseline"), _job("rsd")]
    s = Study(tmp_path / "work")
    assert [s.load(j).status for j in jobs] == ["pending", "pending"]
    assert s.run(jobs) == [] and calls == ["base", "rsd"]
    runs = [s.load(j) for j in jobs]
    assert [r.status for r in runs] == ["finished", "finished"]
    assert all(len(r.history) == 1 and 0 <= r.top1() <= 100 for r in runs)
    assert runs[0].machine["threads"] == 1 and runs[0].machine["device"] == "cpu"
    assert s.run(jobs) == [] and calls == ["base", "rsd"]  # nothing left to do
    # More epochs of the same run resume it: only the new epoch is trained.
    longer = _job("rsd", epochs=2)
    assert s.load(longer).status == "partial"
    s.run([longer])
    assert calls[-1] == "rsd" and len(s.load(longer).history) == 2


def test_a_folder_trained_otherwise_is_refused(tmp_path, calls):
    s = Study(tmp_path)
    s.run([_job("x", method="baseline")])
    with pytest.raises(RSDError, match="was trained with lr = 0.05"):
        s.load(_job("x", method="baseline", lr=0.1))


def test_the_ledger_counts_committed_runs_as_done(tmp_path, calls):
    job = _job("base", method="baseline")
    first = Study(tmp_path / "a")
    first.run([job])
    ledger = tmp_path / "results.json"
    ran = first.load(job)
    ran.history[-1].update(val_top1=1 / 3, train_acc=2 / 3)  # more digits than the ledger keeps of a time: exact
    write_json(ledger, {"runs": [record(ran, tmp_path)]})
    entry = json.loads(ledger.read_text())["runs"][0]
    assert entry["group"] == "t" and entry["config"]["lr"] == 0.05 and entry["val_top1_curve"] == [1 / 3]
    assert "history" not in entry and entry["eval_time_median_s"] > 0  # compact: the run folder has the rest
    # Another machine: an empty work folder, the committed results.
    other = Study(tmp_path / "b", ledger=ledger)
    run = other.load(job)
    assert run.status == "finished" and run.top1() == ran.top1() == 100 * (1 / 3) and run.path is None
    assert run.train_acc() == ran.train_acc() == 100 * (2 / 3)
    assert run.epoch_time() == pytest.approx(ran.epoch_time(), rel=1e-5) and run.eval_time() > 0
    assert record(run, tmp_path) == entry  # a report rewritten from the ledger keeps the record as it was
    assert other.run([job]) == [] and calls == ["base"]
    # An entry written before a setting existed counts as that setting's default.
    older = json.loads(ledger.read_text())
    del older["runs"][0]["config"]["kxk_branches"]
    write_json(tmp_path / "older.json", older)
    assert Study(tmp_path / "c", ledger=tmp_path / "older.json").load(job).status == "finished"
    # An entry of the older format (every metric per epoch, no curve) reads back the same figures.
    verbose = {k: v for k, v in entry.items() if k not in ("val_top1_curve", "eval_time_median_s")}
    write_json(tmp_path / "verbose.json", {"runs": [{**verbose, "history": ran.history}]})
    old = Study(tmp_path / "d", ledger=tmp_path / "verbose.json").load(job)
    assert (old.top1(), old.train_acc(), old.eval_time()) == (ran.top1(), ran.train_acc(), ran.eval_time())
    assert record(old, tmp_path)["val_top1_curve"] == [1 / 3]
    # Where the location differs only (the data folder, workers), the entry still matches ...
    assert other.load(_job("base", method="baseline", workers=2)).status == "finished"
    # ... but not a setting that shapes the result, nor with the ledger set aside (files needed).
    assert other.load(_job("base", method="baseline", weight_decay=1e-3)).status == "pending"
    assert other.load(job, ledger=False).status == "pending"
    other.run([job], ledger=False)
    assert calls == ["base", "base"] and other.load(job, ledger=False).status == "finished"


def test_a_run_trained_again_here_reads_as_the_ledgers_until_it_ends(tmp_path, calls, monkeypatch):
    job = _job("base", method="baseline")
    Study(tmp_path / "a").run([job])
    ledger = tmp_path / "results.json"
    write_json(ledger, {"runs": [record(Study(tmp_path / "a").load(job), tmp_path)]})
    monkeypatch.setattr(study_module.checkpoint, "read_progress", lambda path: (0, None))  # mid-retraining
    study = Study(tmp_path / "a", ledger=ledger)
    assert study.load(job).status == "finished" and study.load(job).path is None
    assert study.load(job, ledger=False).status == "partial"
    assert Study(tmp_path / "a").load(job).status == "partial"  # no ledger: the folder's


def test_the_study_report_keeps_ledger_records_it_does_not_plan(de, tmp_path):
    ledger = tmp_path / "de.json"
    write_json(ledger, {"runs": [{"name": "a", "status": "finished"}, {"name": "b", "status": "collapsed"},
                                 {"name": "c", "status": "partial"}, {"name": "d", "status": "finished"}]})
    assert [r["name"] for r in de.kept_records(ledger, [{"name": "d"}])] == ["a", "b"]
    assert de.kept_records(tmp_path / "none.json", []) == []


def test_the_study_report_tabulates_the_sizes_its_ledger_records(de, tmp_path):
    ledger = tmp_path / "de.json"
    runs = [{"name": "a", "status": "finished", "group": "fair", "size": 2500},
            {"name": "b", "status": "partial", "group": "fair", "size": 5000},
            {"name": "c", "status": "finished", "group": "finetune", "size": 1000},
            {"name": "d", "status": "finished", "group": "map", "size": 500},
            {"name": "e", "status": "finished", "group": "map32", "size": 123}]
    write_json(ledger, {"runs": runs})
    assert de.recorded_sizes(ledger, (500, 1000, 2500, 5000)) == {"fair_sizes": {2500}, "finetune_sizes": {1000}}
    assert de.recorded_sizes(tmp_path / "none.json", (500,)) == {}


def test_a_run_another_process_trains_is_left_to_it(tmp_path, calls):
    job = _job("held")
    s = Study(tmp_path)
    s.path(job).mkdir(parents=True)
    with DirLock(s.path(job), "run"):
        assert s.busy(job)
        assert s.run([job]) == [] and calls == []
    assert not s.busy(job)


def test_a_collapse_is_recorded_and_other_failures_are_retried(tmp_path, monkeypatch):
    def collapse(config, run_dir, **kw):
        raise RSDError("the network collapsed in epoch 2: training accuracy 10.0% ...")

    monkeypatch.setattr(study_module, "train", collapse)
    s = Study(tmp_path)
    assert s.run([_job("c")]) == []
    run = s.load(_job("c"))
    assert run.status == "collapsed" and "collapsed" in run.message

    monkeypatch.setattr(study_module, "train", lambda *a, **k: (_ for _ in ()).throw(RSDError("no data")))
    assert s.run([_job("d")]) == ["d"] and s.load(_job("d")).status == "pending"


@pytest.mark.slow
def test_parallel_runs_train_in_processes_of_their_own(tmp_path):
    jobs = [_job("a", method="baseline"), _job("b", method="baseline", seed=1),
            _job("bad", method="baseline", data="imagefolder", data_dir=str(tmp_path / "none"))]
    s = Study(tmp_path / "work", parallel=2)
    ended = []
    assert s.run(jobs, on_done=lambda j: ended.append(j.name)) == ["bad"]
    assert sorted(ended) == ["a", "b"]
    assert [s.load(j).status for j in jobs] == ["finished", "finished", "pending"]
    assert "has no train/ folder" in (tmp_path / "work" / "logs" / "bad.log").read_text()
    # The two seeds are two runs, and each is what one process trains alone.
    assert s.load(jobs[0]).history[0]["loss"] != s.load(jobs[1]).history[0]["loss"]


def test_summaries_and_paths():
    ms = mean_std([1.0, None, 3.0])
    assert (ms["mean"], ms["n"], ms["values"]) == (2.0, 2, [1.0, 3.0]) and ms["std"] == pytest.approx(2 ** 0.5)
    assert mean_std([4.0])["std"] is None and mean_std([])["mean"] is None
    assert relative(ROOT / "train" / "x.json", ROOT) == "train/x.json"
    assert relative(ROOT.parent / "shared" / "data", ROOT) == "../shared/data"
    assert command_line("benchmarks/b.py", ["--work-dir", str(ROOT / "runs"), "--seeds", "0,1"], ROOT) == (
        "python benchmarks/b.py --work-dir runs --seeds 0,1")


# benchmarks/data_efficiency.py ------------------------------------------------------------


@pytest.fixture
def de():
    with benchmark_module("data_efficiency") as module:
        yield module


def test_time_left_counts_evaluation_which_does_not_grow_with_the_train_set(de):
    from rsd_deploy.study import Run

    def run(n: int, epochs: int, done: int, **timing) -> Run:
        config = TrainConfig.from_dict({**TINY, "train_samples": n, "epochs": epochs, "input_size": 8}).validate()
        return Run(Job(f"r{n}", config, {}), "finished" if done == epochs else "partial",
                   [{"epoch": e + 1, **timing} for e in range(done)])

    # 100 images train in 1 s an epoch, precise BN + validation take 3 s whatever the train set.
    rates = de._rates([run(100, 4, 4, epoch_time=1.0, eval_time=3.0)])
    assert de.seconds_left(run(1000, 10, 4), rates) == pytest.approx(6 * (10.0 + 3.0))
    # Records from before evaluation was timed count training only.
    old = de._rates([run(100, 4, 4, epoch_time=1.0)])
    assert de.seconds_left(run(1000, 10, 4), old) == pytest.approx(6 * 10.0)
    assert de.seconds_left(run(1000, 10, 4), {}) is None


@pytest.mark.slow
def test_data_efficiency_smoke_pilot_map_and_report(de, tmp_path, calls, monkeypatch, caplog):
    out = tmp_path / "out"
    argv = ["--smoke", "--groups", "pilot,map,ablation", "--seeds", "0", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(out), "--out-name", "de"]
    assert de.main(argv) == 0
    r = json.loads((out / "de.json").read_text())
    # The pilot: the baseline at 1 and 2 epochs per size (seed 0), then a budget per size.
    pilot = {x["name"] for x in r["runs"] if x["group"] in ("pilot", "map") and x["method"] == "baseline"}
    assert pilot == {f"baseline_n{n}_e{e}_s0" for n in (64, 128) for e in (1, 2)}
    budgets = {n: c["epochs"] for n, c in r["summary"]["epochs"].items()}
    assert set(budgets) == {"64", "128"} and all(e in (1, 2) for e in budgets.values())
    for n, c in r["summary"]["epochs"].items():
        gain = c["steps"][0]["gain"]
        top1 = {x["epochs"]: x["last_top1"] for x in r["runs"] if x["size"] == int(n) and x["method"] == "baseline"
                and x["variant"] is None}
        assert gain == pytest.approx(top1[2] - top1[1])
        assert c["epochs"] == (1 if gain < de.CONVERGED_GAIN else 2)
    # The map: both methods at every size, at its budget; RSD - baseline from the same seed.
    for row in r["summary"]["map"]:
        assert row["baseline"]["n"] == row["rsd"]["n"] == 1
        assert row["diff"]["mean"] == pytest.approx(row["rsd"]["mean"] - row["baseline"]["mean"])
    # The ablations: every variant once, each a change of the RSD config and nothing else.
    abl = [x for x in r["runs"] if x["group"] == "ablation"]
    assert {x["variant"] for x in abl} == set(de.ABLATIONS)
    paper = next(x for x in r["runs"] if x["group"] == "map" and x["method"] == "rsd" and x["size"] == 64)
    for x in abl:
        changed = {k for k in x["config"] if x["config"][k] != paper["config"][k]}
        assert changed == set(de.ABLATIONS[x["variant"]]), x["variant"]
    assert not r["complete"] and r["pending"]  # fair, dial, finetune, map32 not trained
    # Pending counts per seed: seed 0's asked groups are done; seeds 1 and 2 (reported, not trained) are not.
    by_seed = r["pending_by_seed"]
    assert set(by_seed) == {"0", "1", "2"} and by_seed["0"]["map"] == by_seed["0"]["ablation"] == 0
    assert by_seed["1"]["map"] == by_seed["2"]["map"] == 4 and by_seed["0"]["fair"] > 0  # 2 sizes x 2 methods
    assert sum(sum(g.values()) for g in by_seed.values()) == len(r["pending"])
    md = (out / "de.md").read_text()
    assert "## Regime map" in md and "Provisional" in md and (out / "de.png").stat().st_size > 1000
    assert "/tmp" not in json.dumps(r["runs"][0]["config"])  # paths relative to the repository
    # Everything recorded: a second call trains nothing; the results alone (another machine) suffice.
    trained = len(calls)
    assert de.main(argv) == 0 and len(calls) == trained
    assert de.main(argv[:-4] + ["--work-dir", str(tmp_path / "empty"), "--out-dir", str(out),
                                "--out-name", "de"]) == 0
    assert len(calls) == trained
    # A report of other seeds keeps these runs: the results are the ledger later sessions resume from.
    before = {x["name"] for x in json.loads((out / "de.json").read_text())["runs"]}
    assert de.main(["--smoke", "--seeds", "1", "--report-only", "--work-dir", str(tmp_path / "empty"),
                    "--out-dir", str(out), "--out-name", "de"]) == 0
    assert before and before <= {x["name"] for x in json.loads((out / "de.json").read_text())["runs"]}
    # So does one that trains other sizes: the profile's sizes stay in the report beside the asked ones.
    assert de.main(["--smoke", "--seeds", "0", "--report-only", "--fair-sizes", "128", "--ablation-size", "128",
                    "--work-dir", str(tmp_path / "empty"), "--out-dir", str(out), "--out-name", "de"]) == 0
    r = json.loads((out / "de.json").read_text())
    assert before <= {x["name"] for x in r["runs"]}
    assert [row["size"] for row in r["summary"]["fair"]] == [64, 128]
    # A deadline the speeds say a run cannot meet starts none: neither the fair baselines nor the
    # fine-tune's source, which this machine lacks and would otherwise train again for its weights.
    monkeypatch.setattr(de, "seconds_left", lambda run, rates: 7200.0)
    caplog.set_level("INFO", logger="data_efficiency")
    assert de.main(["--smoke", "--groups", "finetune,fair", "--seeds", "0", "--deadline-s", "3600",
                    "--work-dir", str(tmp_path / "empty"), "--out-dir", str(out), "--out-name", "de"]) == 0
    assert len(calls) == trained
    source = next(x["name"] for x in r["runs"] if x["group"] == "map" and x["method"] == "baseline" and x["size"] == 64)
    assert f"{source}: needs about 2.0 h, past the deadline; not started" in caplog.text
    assert "_wd1e-3: needs about 2.0 h, past the deadline" in caplog.text


def test_data_efficiency_refuses_bad_options(de, capsys):
    assert de.main(["--groups", "map,nope"]) == 1
    assert de.main(["--fair-sizes", "123"]) == 1
    assert de.main(["--seeds", "-1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
