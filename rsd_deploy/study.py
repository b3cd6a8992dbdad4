"""Training studies: named training configurations, each trained once, resumed, summarised.

A study is a list of jobs: a :class:`Job` (a run directory name, a
:class:`~rsd_deploy.training.TrainConfig` and labels) or any object with ``name`` and
``config``. :meth:`Study.run` trains every job that is not done yet, one at a time in
this process, or ``parallel`` at a time in processes of their own; each run is resumable: a
study that is killed continues where it stopped when it is run again, and a run folder
another process is training is left to it. :meth:`Study.load` reads a run back as a
:class:`Run` (its status, per-epoch history and how it ended).

A *ledger* (a JSON file of :func:`record` s, typically the study's own results file)
keeps what finished runs recorded, so a study whose results were committed counts those
runs as done on a machine whose work folder does not have them. A run is matched to its
ledger entry by name and by every setting that shapes its result. A record is compact: its
summary figures and the validation curve; the run folder's ``metrics.jsonl`` has the rest.

A collapse or a divergence is a setting's outcome and is recorded as such; any other
failure of a run (missing data, a bug) is logged, records nothing, and is retried by
the next :meth:`Study.run`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import RSDError
from .io import DirLock, read_json, write_json
from .training import TrainConfig, checkpoint, train

log = logging.getLogger(__name__)

OUTCOME_FILE = "outcome.json"  #: how a run ended (status, message, machine), in its directory
FAILED = ("collapsed", "diverged")  #: a setting's legitimate failures: recorded, never retried
DONE = ("finished",) + FAILED
#: Settings that do not change what a run computes: a ledger entry matches whatever they are.
LOCATION_KEYS = ("data_dir", "init_weights", "device", "workers", "eval_batch_size", "download")
POLL_S = 2.0


class JobLike(Protocol):
    """What a study needs of a job: the run folder's name and the run's configuration."""

    name: str
    config: TrainConfig


@dataclass
class Job:
    """One training run of a study: its directory name, its configuration, labels for reports."""

    name: str
    config: TrainConfig
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """A job and what is known of it."""

    job: JobLike
    status: str  #: finished, collapsed, diverged, partial (resumable) or pending (not started)
    history: list[dict[str, Any]]
    message: str | None = None
    machine: dict[str, Any] | None = None
    path: Path | None = None  #: its folder, when this machine has it
    #: The ledger's record of a run this machine does not have: figures its curve-only history lacks.
    recorded: dict[str, Any] = field(default_factory=dict)

    def top1(self, epoch: int | None = None) -> float | None:
        """Validation top-1 (%) after ``epoch`` (1-based; default: the last one run)."""
        if not self.history or (epoch is not None and epoch > len(self.history)):
            return None
        return 100 * self.history[(epoch or len(self.history)) - 1]["val_top1"]

    def train_acc(self) -> float | None:
        """Last epoch's training accuracy (%, full network on augmented batches)."""
        if self.history and "train_acc" in self.history[-1]:
            return 100 * self.history[-1]["train_acc"]
        return self.recorded.get("last_train_acc")

    def epoch_time(self) -> float | None:
        """Median wall time of an epoch (s), evaluation excluded."""
        return self._median("epoch_time")

    def eval_time(self) -> float | None:
        """Median time of an epoch's precise BN and validation (s); None where the records lack it."""
        return self._median("eval_time")

    def _median(self, key: str) -> float | None:
        times = [e[key] for e in self.history if key in e]
        return statistics.median(times) if times else self.recorded.get(f"{key}_median_s")


def read_history(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of the run in ``path`` (empty when it has none yet)."""
    from .training.loop import METRICS_FILE

    metrics = path / METRICS_FILE
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def machine(threads: int, parallel: int, device: str = "cpu") -> dict[str, Any]:
    """What a run was trained on: CPU model, cores, threads, runs at once, device, versions."""
    from .bench.report import cpu_model

    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "threads": threads,
            "parallel_runs": parallel, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version()}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    from .training.loop import RESUMABLE_CHANGES

    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES and k not in LOCATION_KEYS}


def record(run: Run, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a study's results keep of one run; :class:`Study` reads it back as a ledger entry.

    With ``root``, the configuration's paths are given relative to it (a repository's results
    name no machine's folders).
    """
    h = run.history
    config = run.job.config.to_json()
    if root is not None:
        config.update({k: relative(config[k], root) for k in ("data_dir", "init_weights") if config.get(k)})
    best = max(range(len(h)), key=lambda i: h[i]["val_top1"]) if h else None
    return {
        "name": run.job.name, **getattr(run.job, "tags", {}), "status": run.status, "message": run.message,
        "epochs": run.job.config.epochs, "epochs_run": len(h),
        "last_top1": run.top1(), "best_top1": run.top1(best + 1) if h else None,
        "best_epoch": best + 1 if h else None, "last_train_acc": run.train_acc(),
        "epoch_time_median_s": _short(run.epoch_time()), "eval_time_median_s": _short(run.eval_time()),
        "machine": run.machine, "config": config,
        "val_top1_curve": [e["val_top1"] for e in h],  # fractions, exact: a report's figures equal the run's
    }


def ledger_history(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A ledger record's per-epoch history: its validation curve (older records kept every metric)."""
    if "history" in entry:
        return entry["history"]
    return [{"epoch": i, "val_top1": v} for i, v in enumerate(entry.get("val_top1_curve", []), 1)]


def _short(value: float | None) -> float | None:
    """A time to 6 significant digits: no more is meaningful, the ledger stays small."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` of the values given (None skipped; std needs two)."""
    v = [x for x in values if x is not None]
    return {"mean": statistics.mean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else None,
            "n": len(v), "values": v}


def relative(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` (``../data`` for a folder beside it): reports name no machine's folders."""
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


def command_line(script: str, argv: Sequence[str], root: str | os.PathLike) -> str:
    """``python SCRIPT ARGS`` as a report shows it: every absolute path relative to ``root``."""
    words = [relative(a, root) if os.path.isabs(a) else a for a in argv]
    return " ".join(["python", script, *words])


def failure_kind(message: str) -> str | None:
    """``collapsed`` / ``diverged`` for a setting's own failures, None for anything else."""
    if "network collapsed" in message:
        return "collapsed"
    if "non-finite loss" in message:
        return "diverged"
    return None


def execute(config: TrainConfig, path: Path, threads: int = 1, parallel: int = 1) -> dict[str, Any]:
    """Train (or resume) one run into ``path``; returns and records how it ended.

    A collapse or a divergence is recorded as the run's outcome; any other error is
    raised and nothing is recorded, so a later call retries.
    """
    from .run import RUN_FILE
    from .training.distributed import resolve_device
    from .training.loop import METRICS_FILE

    torch.set_num_threads(threads)
    resume = checkpoint.exists(path)
    if not resume:  # files of an epoch that has no resume state: start afresh
        for stale in (RUN_FILE, METRICS_FILE):
            (path / stale).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(epoch: int, rec: dict[str, Any], _model: Any) -> None:
        log.info(f"{path.name}: epoch {epoch}/{config.epochs}, loss {rec['loss']:.3f}, "
                 f"val top-1 {100 * rec.get('val_top1', float('nan')):.2f}%, {rec['epoch_time']:.1f} s")

    try:
        train(config, path, resume=resume, on_epoch_end=on_epoch_end)
        outcome: dict[str, Any] = {"status": "finished", "message": None}
    except RSDError as e:
        kind = failure_kind(str(e))
        if kind is None:
            raise
        outcome = {"status": kind, "message": str(e)}
    outcome["machine"] = machine(threads, parallel, resolve_device(config.device).type)
    write_json(path / OUTCOME_FILE, outcome)
    return outcome


class Study:
    """Runs under ``work_dir/runs/<job name>``; ``ledger``: a JSON file of finished runs' records."""

    def __init__(self, work_dir: str | os.PathLike, *, ledger: str | os.PathLike | None = None,
                 threads: int = 1, parallel: int = 1) -> None:
        if threads < 1 or parallel < 1:
            raise RSDError(f"threads and parallel runs must be at least 1 (got {threads}, {parallel})")
        self.work_dir = Path(work_dir)
        self.threads, self.parallel = threads, parallel
        self.ledger: dict[str, dict[str, Any]] = {}
        if ledger is not None and Path(ledger).exists():
            runs = read_json(ledger).get("runs", [])
            self.ledger = {r["name"]: r for r in runs if isinstance(r, dict) and r.get("status") in DONE}

    def path(self, job: JobLike) -> Path:
        return self.work_dir / "runs" / job.name

    def load(self, job: JobLike, ledger: bool = True) -> Run:
        """The run of ``job`` as this machine's folder, else the ledger, has it.

        A run this folder holds part of but the ledger records as done (trained again here
        for its weights, or finished elsewhere) is the ledger's, unless ``ledger`` is False.
        RSDError when the folder holds a run trained with other settings (never a silent mix).
        """
        path = self.path(job)
        entry = self.ledger.get(job.name) if ledger else None
        recorded = {**TrainConfig().to_json(), **(entry or {}).get("config", {})}  # an older entry: defaults
        if entry is not None and _comparable(recorded) != _comparable(job.config.to_json()):
            entry = None
        outcome = read_json(path / OUTCOME_FILE) if (path / OUTCOME_FILE).exists() else {}
        if outcome.get("status") in FAILED or checkpoint.exists(path):
            if checkpoint.exists(path):
                self._check_same_settings(job, checkpoint.read_config(path), path)
            status = outcome.get("status")
            if status not in FAILED:
                done = checkpoint.read_progress(path)[0] >= job.config.epochs
                status = "finished" if done else "partial"
            if status != "partial" or entry is None:
                return Run(job, status, read_history(path), outcome.get("message"), outcome.get("machine"), path)
        if entry is not None:
            return Run(job, entry["status"], ledger_history(entry), entry.get("message"), entry.get("machine"),
                       recorded=entry)
        return Run(job, "pending", [], path=None)

    def _check_same_settings(self, job: JobLike, saved: dict[str, Any], path: Path) -> None:
        from .training.loop import RESUMABLE_CHANGES

        defaults = TrainConfig().to_json()  # a key an older run lacks had its default
        for key, value in job.config.to_json().items():
            if key not in RESUMABLE_CHANGES and saved.get(key, defaults.get(key)) != value:
                raise RSDError(f"{path} was trained with {key} = {saved.get(key)!r}, this study asks for "
                               f"{value!r}: use another work folder (or delete that run)")

    def busy(self, job: JobLike) -> bool:
        """Whether another process holds the run folder's writer lock (it is training that run)."""
        path = self.path(job)
        if not path.is_dir():
            return False
        try:
            with DirLock(path, "run"):
                return False
        except RSDError:
            return True

    def run(self, jobs: Sequence[JobLike] | Callable[[], Sequence[JobLike]],
            on_done: Callable[[JobLike], None] | None = None, ledger: bool = True,
            deadline: float | None = None) -> list[str]:
        """Train the jobs not yet done, in the order given; returns the names of runs that failed.

        ``jobs`` may be a function returning them: it is asked again whenever a run ends, so
        a study can add runs as it learns (a pilot that decides the epochs of later runs).
        ``on_done(job)`` is called after each run ends. ``ledger=False`` retrains runs this
        machine lacks even when the ledger has them (their files are needed, e.g. weights).
        A run that fails other than by collapsing or diverging is logged and named in the
        result; the others go on. A run another process is training is left to it. After
        ``deadline`` (a ``time.time()``) no run starts and runs in processes of their own
        are stopped (each resumes from its last epoch).
        """
        plan = jobs if callable(jobs) else (lambda: jobs)
        failed: list[str] = []
        seen: set[str] = set()  # each run is tried (or left to another process) once per call
        running: dict[str, tuple[JobLike, subprocess.Popen, Path]] = {}

        def todo() -> list[JobLike]:
            unique = {j.name: j for j in plan()}.values()
            out = [j for j in unique if j.name not in seen
                   and self.load(j, ledger).status not in DONE]
            for j in [j for j in out if self.busy(j)]:
                log.info(f"{j.name}: being trained by another process; left to it")
                seen.add(j.name)
                out.remove(j)
            return out

        def ended(job: JobLike, error: str | None) -> None:
            if error is not None:
                log.error(f"run {job.name} failed: {error}")
                failed.append(job.name)
            elif on_done is not None:
                on_done(job)

        pending = todo()
        log.info(f"{len(pending)} run(s) to train" + (": " + ", ".join(j.name for j in pending) if pending else ""))
        try:
            while pending or running:
                if deadline is not None and time.time() > deadline:
                    log.info(f"deadline: {len(running)} run(s) stopped, {len(pending)} not started")
                    break
                if self.parallel == 1:
                    job = pending[0]
                    seen.add(job.name)
                    try:
                        execute(job.config, self.path(job), self.threads, self.parallel)
                        ended(job, None)
                    except RSDError as e:
                        ended(job, str(e))
                    pending = todo()
                    continue
                while pending and len(running) < self.parallel:
                    job = pending.pop(0)
                    seen.add(job.name)
                    running[job.name] = (job, *self._spawn(job))
                time.sleep(POLL_S)
                for name, (job, proc, log_file) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[name]
                    tail = " | ".join(log_file.read_text().splitlines()[-3:])
                    ended(job, None if proc.returncode == 0 else f"exit status {proc.returncode}; {log_file}: {tail}")
                    pending = todo()
        finally:
            for _, proc, _ in running.values():  # resumable: every file is written atomically
                proc.terminate()
                proc.wait()
        return failed

    def _spawn(self, job: JobLike) -> tuple[subprocess.Popen, Path]:
        spec = {"config": job.config.to_json(), "run_dir": str(self.path(job)),
                "threads": self.threads, "parallel": self.parallel}
        job_file, log_file = self.work_dir / "jobs" / f"{job.name}.json", self.work_dir / "logs" / f"{job.name}.log"
        write_json(job_file, spec)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with log_file.open("a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "rsd_deploy.study", str(job_file)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        log.info(f"{job.name}: started (log {log_file})")
        return proc, log_file


def job_main(job_file: str) -> int:
    """Entry of a study's child process: train the run ``job_file`` describes."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = read_json(job_file)
    try:
        config = TrainConfig.from_dict(spec["config"], job_file)
        execute(config, Path(spec["run_dir"]), spec["threads"], spec["parallel"])
    except RSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1]))
