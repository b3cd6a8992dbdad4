"""The training loop: epochs of SGD over a data set, evaluation, and the run directory.

:func:`train` runs one configuration (:class:`~rsd_deploy.training.config.TrainConfig`)
to completion and returns the run directory: ``model.safetensors`` and ``run.json``
(the contract export and benchmarks read), ``metrics.jsonl`` (one line per epoch),
``curves.png`` and the resume state (``checkpoint.safetensors``), all rewritten after
every epoch as one step, the resume state last: it commits the epoch, and a run killed
at any moment resumes from the last one committed. A non-finite loss stops the run with
an :class:`RSDError` naming the epoch and step, before anything of that epoch is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import __version__
from ..data import DataInfo, load_datasets
from ..errors import RSDError, option
from ..io import DirLock, atomic_path, atomic_paths, load_tensors, remove_stale_temps, sha256_file, write_tensors
from ..models.external import deploy_form
from ..restructure import load_equivalent, restructure
from ..run import RUN_FILE, WEIGHTS_FILE, ModelSource, Normalization, RunInfo
from . import checkpoint, distributed
from .config import TrainConfig
from .evaluation import amp_dtype, autocast, evaluate
from .plots import plot_curves
from .precise_bn import update_bn_stats
from .rsd import CEStep, RSDStep

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
_WRITE_TEST = ".write-test"
#: Every file the loop writes into a run directory (their killed temporaries are swept).
RUN_FILES = (WEIGHTS_FILE, RUN_FILE, METRICS_FILE, CURVES_FILE, *checkpoint.FILES, _WRITE_TEST)
#: Options that may differ when a run is resumed; everything else must match.
RESUMABLE_CHANGES = ("epochs", "max_steps", "device", "workers", "eval_batch_size")

EpochCallback = Callable[[int, dict[str, Any], nn.Module], None]

log = logging.getLogger(__name__)


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model.replace(':', '-')}-{config.method}-{config.data}-{stamp}"


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The configuration of the run in ``run_dir``, with the changes a resume allows."""
    saved = TrainConfig.from_dict(checkpoint.read_config(run_dir), f"{run_dir}/{checkpoint.STATE_FILE}")
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    changed = [k for k, v in overrides.items() if k not in RESUMABLE_CHANGES and getattr(saved, k, v) != v]
    if changed:
        k = changed[0]
        raise RSDError(
            f"cannot change {k} when resuming (the run has {getattr(saved, k)!r}, got {overrides[k]!r}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change"
        )
    return saved.update({k: v for k, v in overrides.items() if k in RESUMABLE_CHANGES})


# Data ------------------------------------------------------------------------------------


def _subset(ds: Dataset, n: int | None) -> Dataset:
    """``n`` samples spread evenly over ``ds`` (class-sorted folders keep every class)."""
    if n is None or n >= len(ds):
        return ds
    step = len(ds) / n
    return Subset(ds, [int(i * step) for i in range(n)])


def _seed_for(config: TrainConfig, epoch: int, rank: int = 0) -> int:
    """Seed of every generator of ``epoch`` on ``rank``: resumable without saved generator state."""
    return (config.seed * 1_000_003 + epoch * 1_009 + rank) % (2**63)


def _train_loader(ds: Dataset, config: TrainConfig, ctx: distributed.Context, epoch: int) -> DataLoader:
    generator = torch.Generator().manual_seed(_seed_for(config, epoch))
    sampler = None
    if ctx.distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, ctx.world_size, ctx.rank, shuffle=True, seed=config.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
    return DataLoader(
        ds, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
        generator=generator, num_workers=config.workers, drop_last=True,
        pin_memory=ctx.device.type == "cuda", persistent_workers=False,
    )


def _precise_bn(model: nn.Module, ds: Dataset, config: TrainConfig, device: torch.device, epoch: int) -> int:
    """Re-estimate BN statistics over ``config.precise_bn`` clean training batches of ``epoch``
    (fewer when the training split has fewer full batches: recorded and logged); returns the batches used.

    The batches and their augmentations are drawn from generators of their own, derived
    from ``(seed, epoch)``, so the estimate depends only on the weights and the epoch (a
    resumed run re-estimates from the same images) and training's random draws are untouched.
    """
    seed = _seed_for(config, epoch, rank=2**20)
    loader = DataLoader(ds, batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                        num_workers=config.workers, drop_last=True)
    # Augmentations in this process draw from the global generator: seed it, and leave the
    # training's generator as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        used = update_bn_stats(model, loader, config.precise_bn, device)
    if used < config.precise_bn and epoch == 0:
        log.info("precise BN: the training split has %d full batches, fewer than the %d asked; "
                 "the statistics are estimated over those", used, config.precise_bn)
    return used


# Run directory ---------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import torchvision

    return {"rsd_deploy": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _lock_run_dir(run_dir: Path) -> DirLock:
    """Create ``run_dir`` if needed and lock it: one training process writes a run at a time."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RSDError(f"{option('out')} {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RSDError(f"cannot write to {option('out')} {run_dir}: {e.strerror or e}") from None
    return DirLock(run_dir, "training run")


def _prepare_run_dir(run_dir: Path, resume: bool) -> list[str]:
    """Check the locked ``run_dir`` for this start; sweep what killed runs left (their names)."""
    if resume:
        if not checkpoint.exists(run_dir):
            raise RSDError(f"{run_dir} holds no resume state; cannot {option('resume')} it")
    elif (run_dir / RUN_FILE).exists() or checkpoint.exists(run_dir):
        raise RSDError(f"{run_dir} already holds a run; {option('resume')} it to continue it or choose another "
                       f"{option('out')}")
    try:  # fail now, not after the first epoch, when the run directory is not writable (resumed runs too)
        with atomic_path(run_dir / _WRITE_TEST) as tmp:
            tmp.write_text("")
        (run_dir / _WRITE_TEST).unlink()
    except OSError as e:
        raise RSDError(f"cannot write to {option('out')} {run_dir}: {e.strerror or e}") from None
    return remove_stale_temps(run_dir, RUN_FILES)


def _write_epoch(run_dir: Path, *, model: nn.Module, info: RunInfo,
                 history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
    """Write an epoch's files as one step, the resume state (``state``, when given) last.

    Every file is written under a temporary name before any is renamed, so a failure
    while writing (say, a plot error) changes nothing. The resume state commits the
    epoch: a kill between the renames leaves the previous one, and a resume redoes the
    epoch, rewriting every file.
    """
    names = [WEIGHTS_FILE, RUN_FILE, METRICS_FILE, CURVES_FILE] + ([checkpoint.STATE_FILE] if state else [])
    with atomic_paths([run_dir / name for name in names]) as tmps:
        files = dict(zip(names, tmps, strict=True))
        write_tensors(files[WEIGHTS_FILE], model.state_dict())
        info.weights_sha256 = sha256_file(files[WEIGHTS_FILE])
        files[RUN_FILE].write_text(info.text())
        files[METRICS_FILE].write_text("".join(json.dumps(h) + "\n" for h in history))
        plot_curves(history, files[CURVES_FILE])
        if state:
            checkpoint.write(files[checkpoint.STATE_FILE], model=model, **state)
    if state:
        (run_dir / checkpoint.LEGACY_STATE_FILE).unlink(missing_ok=True)  # a format-1 run's, superseded


# Training --------------------------------------------------------------------------------


class _NonFinite(Exception):
    pass


#: A whole epoch's mean loss within this fraction of its collapsed value counts as "at" it.
COLLAPSE_LOSS_FRACTION = 0.97
#: Training accuracy at most chance plus this multiple of 1 / classes counts as chance level.
COLLAPSE_ACC_MARGIN = 0.5
#: The guard judges an epoch only after the first epoch and after this many optimizer
#: steps in all: a smoke run of a few steps has not had the time to leave chance level.
COLLAPSE_MIN_STEPS = 50
#: A collapse is this many consecutive epochs at chance level: a network that learns slowly
#: (RSD on a few hundred images) can spend one or two epochs there on its way up.
COLLAPSE_PATIENCE = 3
#: ... over which the mean loss has not fallen by more than this fraction of its collapsed
#: value: a network whose loss still falls is learning, a collapsed one stays where it is.
COLLAPSE_LOSS_FALL = 0.01


def _judged(epoch: int, steps: int) -> bool:
    """Whether the guard judges (1-based) ``epoch``, ended after ``steps`` optimizer steps in all."""
    return epoch > 1 and steps >= COLLAPSE_MIN_STEPS


@dataclass(frozen=True)
class Chance:
    """What a collapsed network scores: one that predicts the label frequencies ``p`` for
    every image has the majority share as accuracy and the label entropy ``H(p)`` as each
    cross-entropy term (``ln C`` for balanced classes)."""

    accuracy: float
    entropy: float
    num_classes: int

    @classmethod
    def of(cls, labels: np.ndarray | None, num_classes: int) -> "Chance":
        """From the training labels; balanced classes when they are unknown."""
        if labels is None or len(labels) == 0:
            return cls(1.0 / num_classes, math.log(num_classes), num_classes)
        p = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes) / len(labels)
        nz = p[p > 0]
        return cls(float(p.max()), float(-(nz * np.log(nz)).sum()), num_classes)


def _labels(ds: Dataset) -> np.ndarray | None:
    """The labels of ``ds`` where the dataset keeps them (folders, arrays, subsets of those)."""
    if isinstance(ds, Subset):
        inner = _labels(ds.dataset)
        return None if inner is None else inner[np.asarray(ds.indices, dtype=np.int64)]
    for name in ("targets", "labels"):
        value = getattr(ds, name, None)
        if value is not None:
            return np.asarray(value)
    return None


def _collapsed_loss(config: TrainConfig, chance: Chance) -> float | None:
    """The loss of a network that outputs the label frequencies for every image, or None.

    Each cross-entropy term is then the label entropy; the KL terms are 0. None when no
    cross-entropy term is active (nothing to compare against).
    """
    if config.method != "rsd":
        return chance.entropy
    ce_terms = [t for t in config.objective().active_terms if t.startswith("ce_")]
    return config.alpha * len(ce_terms) * chance.entropy if ce_terms else None


def _collapse(records: list[dict[str, Any]], chance: Chance, ceiling: float | None) -> str | None:
    """What shows that the network has collapsed over the epochs of ``records`` (the last
    ``COLLAPSE_PATIENCE``, oldest first), or None."""
    if ceiling is None or ceiling <= 0 or len(records) < COLLAPSE_PATIENCE:
        return None
    window = records[-COLLAPSE_PATIENCE:]
    limit = chance.accuracy + COLLAPSE_ACC_MARGIN / chance.num_classes
    at_chance = all(r["train_acc"] <= limit and r["loss"] >= COLLAPSE_LOSS_FRACTION * ceiling for r in window)
    first, last = window[0]["loss"], window[-1]["loss"]
    if not at_chance or last < first - COLLAPSE_LOSS_FALL * ceiling:
        return None
    return (f"for {COLLAPSE_PATIENCE} epochs, training accuracy at most "
            f"{100 * max(r['train_acc'] for r in window):.1f}% (chance {100 * chance.accuracy:.1f}%) and mean loss "
            f"from {first:.3f} to {last:.3f}, not falling, at the value of a network that predicts only the "
            f"label frequencies ({ceiling:.3f})")


def train(config: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
          progress_bar: bool = False, on_epoch_end: EpochCallback | None = None) -> Path:
    """Train ``config`` into the run directory ``out`` (or ``runs/<name>-<time>``); returns it.

    With ``resume``, continue the run in ``out`` from its last completed epoch. Progress
    (one line per epoch) is logged at INFO by the main process; ``progress_bar`` adds a
    tqdm bar per epoch on stderr.
    ``on_epoch_end(epoch, metrics, model)`` is called on every process after each epoch,
    once rank 0 has written the epoch's files and every rank holds the same model.
    Under ``torchrun`` this trains with DistributedDataParallel.
    """
    config.validate()
    if resume and out is None:
        raise RSDError(f"{option('resume')} needs {option('out')}, the run directory to continue")
    if resume:
        done, steps = checkpoint.read_progress(out)
        if done >= config.epochs or (config.max_steps is not None and steps >= config.max_steps):
            raise RSDError(f"nothing to do: {out} has already trained {done} epochs ({steps} steps); "
                           f"raise {option('epochs')} (or {option('max_steps')}) to continue it")
    if config.amp:
        amp_dtype(distributed.resolve_device(config.device))  # refuses a device without one
    run_dir = Path(out) if out is not None else default_run_dir(config)
    existed = run_dir.exists()
    ctx = distributed.setup(config.device)
    try:
        with _lock_run_dir(run_dir) if ctx.is_main else contextlib.nullcontext():
            # Under the lock, a resume state found now is an earlier run's; one found later, ours.
            fresh = ctx.is_main and not resume and not checkpoint.exists(run_dir)
            try:
                return _train(config, run_dir, ctx, resume=resume, progress_bar=progress_bar,
                              on_epoch_end=on_epoch_end)
            except BaseException:
                if fresh:
                    checkpoint.discard_start(run_dir)  # no epoch committed: leave no half-started run
                raise
    except BaseException:
        if ctx.is_main and not existed:
            with contextlib.suppress(OSError):  # rmdir removes only an empty directory:
                run_dir.rmdir()  # a failed start leaves no empty run directory behind
        raise
    finally:
        distributed.teardown(ctx)


@dataclass
class _Setup:
    """What the epochs run on: data, model, step, optimizer, and where the run stands."""

    train_ds: Dataset
    val_loader: DataLoader
    info: DataInfo
    steps_per_epoch: int
    model: nn.Module
    step_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    run_info: RunInfo
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _open_run_dir(run_dir: Path, ctx: distributed.Context, resume: bool) -> None:
    """Check (and sweep) the run directory on the main process; every rank waits for it."""
    if ctx.is_main:
        swept = _prepare_run_dir(run_dir, resume)
        if swept:
            log.info(f"removed {len(swept)} temporary file(s) an interrupted run left in {run_dir}")
    distributed.barrier(ctx)


def _load_data(config: TrainConfig, ctx: distributed.Context) -> tuple[Dataset, Dataset, DataInfo, int]:
    """The (subset) training and validation sets, their description, and the steps per epoch."""
    if config.download and ctx.distributed and not ctx.is_main:
        distributed.barrier(ctx)  # let rank 0 fetch the files first
    train_ds, val_ds, info = load_datasets(
        config.data, config.data_dir, input_size=config.resolved_input_size(),
        download=config.download and ctx.is_main,
    )
    if config.download and ctx.distributed and ctx.is_main:
        distributed.barrier(ctx)
    train_ds = _subset(train_ds, config.train_samples)
    val_ds = _subset(val_ds, config.val_samples)
    steps_per_epoch = len(train_ds) // (config.batch_size * ctx.world_size)
    if steps_per_epoch == 0:
        raise RSDError(
            f"{len(train_ds)} training samples make no full batch of {config.batch_size} "
            f"x {ctx.world_size} process(es); lower {option('batch_size')}"
        )
    return train_ds, val_ds, info, steps_per_epoch


def _setup(config: TrainConfig, run_dir: Path, ctx: distributed.Context, resume: bool) -> _Setup:
    """Data, model, step and optimizer; restored from the resume state, or saved as the start state."""
    train_ds, val_ds, info, steps_per_epoch = _load_data(config, ctx)
    torch.manual_seed(config.seed)  # same initial weights on every rank
    form = "rsd" if config.method == "rsd" else "plain"
    model, restructured = _build_model(config, info, form, ctx.is_main, resume)
    model = model.to(ctx.device)
    points = _mix_points(config, model, info) if form == "rsd" and config.mixture else None
    step_fn: nn.Module = (RSDStep(model, config.objective(), mix_points=points) if config.method == "rsd"
                          else CEStep(model, config.label_smoothing))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    # float16 needs gradient scaling; bfloat16 (the CPU's) has float32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and ctx.device.type == "cuda")
    val_loader = DataLoader(val_ds, batch_size=config.eval_batch_size, shuffle=False,
                            num_workers=config.workers, pin_memory=ctx.device.type == "cuda")
    setup = _Setup(train_ds, val_loader, info, steps_per_epoch, model, distributed.wrap(ctx, step_fn),
                   optimizer, scaler, _run_info(config, info, form, ctx, restructured, points, run_dir, resume))
    if resume:
        state = checkpoint.load(run_dir, model=model, optimizer=optimizer, scaler=scaler)
        setup.start_epoch, setup.global_step, setup.history = state["epoch"], state["step"], state["history"]
        if ctx.is_main:
            log.info(f"resuming {run_dir} after epoch {setup.start_epoch} (step {setup.global_step})")
    elif ctx.is_main:  # the start state: a run killed before its first epoch ends can be resumed
        checkpoint.save(run_dir, epoch=0, step=0, model=model, optimizer=optimizer, scaler=scaler,
                        config=config.to_json(), history=[])
    if ctx.is_main:
        log.info(f"training {config.model} ({config.method}, {form} form) on {info.name}: "
                 f"{len(train_ds)} images, {steps_per_epoch} steps/epoch, effective batch "
                 f"{config.batch_size * ctx.world_size} ({ctx.world_size} "
                 f"process{'es' if ctx.world_size > 1 else ''}), {ctx.device}")
    return setup


def _build_model(config: TrainConfig, info: DataInfo, form: str, say: bool,
                 resume: bool = False) -> tuple[nn.Module, dict | None]:
    """The model in ``form`` and, for a restructured one, the record of its restructuring.

    A torchvision/timm model must fuse into its deploy form (checked before any training:
    a model whose BatchNorms cannot be folded could be trained but never exported).
    Resuming, the initial weights are not read again: the resume state replaces them.
    """
    source = config.source()
    init = config.init_weights is not None and not resume
    if source.kind == "zoo":
        # Its RSD form is native; only another branch count is recorded (the record rebuilds it).
        record = {"num_square": config.kxk_branches} if form == "rsd" and config.kxk_branches != 3 else None
        model = source.create(num_classes=info.num_classes, in_channels=info.in_channels, form=form,
                              restructured=record)
        if init:  # the plain weights, then the RSD form started equivalent to them
            plain = source.create(num_classes=info.num_classes, in_channels=info.in_channels, form="plain")
            _load_init_weights(plain, Path(config.init_weights), source)
            model = plain if form == "plain" else load_equivalent(model, plain)
        return model, record
    plain = source.create(num_classes=info.num_classes, in_channels=info.in_channels, form="plain")
    deploy_form(str(source), plain)
    if init:
        _load_init_weights(plain, Path(config.init_weights), source)
    if form == "plain":
        return plain, None
    model, report = restructure(plain, num_square=config.kxk_branches, equivalent_init=config.init_weights is not None)
    if say:
        log.info(f"{source}: {report.summary()}")
    if not report.converted:
        raise RSDError(f"{source} has no conv+BN pair to restructure ({report.summary()}); "
                       f"train it as the baseline ({option('method')} baseline)")
    return model, report.to_json()


def _load_init_weights(model: nn.Module, path: Path, source: ModelSource) -> None:
    """Load ``path`` into ``model``; a classifier of another class count keeps its fresh weights.

    Every other tensor must match by name and shape (RSDError naming the first that does not).
    """
    if not path.is_file():
        raise RSDError(f"{option('init_weights')} {path} not found")
    state, own = load_tensors(path), model.state_dict()
    modules = dict(model.named_modules())
    differ = {k for k in own if k not in state or state[k].shape != own[k].shape}
    extra = sorted(set(state) - set(own))
    owners = {k.rpartition(".")[0] for k in differ}
    if extra or (differ and (len(owners) != 1 or not isinstance(modules.get(next(iter(owners))), nn.Linear))):
        first = extra[0] if extra else sorted(differ)[0]
        raise RSDError(f"{option('init_weights')} {path} does not match {source} (its plain form): "
                       f"first mismatch {first!r}")
    model.load_state_dict({k: v for k, v in state.items() if k not in differ}, strict=False)
    if differ:
        log.info(f"{path}: the classifier {next(iter(owners))!r} keeps fresh weights (another class count)")


def _mix_points(config: TrainConfig, model: nn.Module, info: DataInfo) -> list[str]:
    """The configured mix points, or the model's defaults; RSDError when there are none."""
    if config.mix_points is not None:
        return list(config.mix_points)
    source = config.source()
    points = source.default_mix_points(model, info.input_size[0])
    if not points:
        top = ", ".join(name for name, _ in model.named_children())
        raise RSDError(f"{source} has no default mix points: give {option('mix_points')}, modules whose "
                       f"outputs every path to the logits passes through (its top-level modules: {top})")
    return points


def _train(config: TrainConfig, run_dir: Path, ctx: distributed.Context, *, resume: bool,
           progress_bar: bool, on_epoch_end: EpochCallback | None) -> Path:
    _open_run_dir(run_dir, ctx, resume)
    setup = _setup(config, run_dir, ctx, resume)
    return _epochs(config, run_dir, ctx, setup, progress_bar, on_epoch_end)


def _epochs(config: TrainConfig, run_dir: Path, ctx: distributed.Context, setup: _Setup,
            progress_bar: bool, on_epoch_end: EpochCallback | None) -> Path:
    """Train from ``setup``'s epoch to the end (or ``max_steps``), committing every epoch."""
    say = log.info if ctx.is_main else (lambda *a: None)
    train_ds, val_loader, info, steps_per_epoch = (setup.train_ds, setup.val_loader, setup.info,
                                                   setup.steps_per_epoch)
    model, step_fn, optimizer, scaler = setup.model, setup.step_fn, setup.optimizer, setup.scaler
    run_info, start_epoch, global_step, history = (setup.run_info, setup.start_epoch, setup.global_step,
                                                   setup.history)

    chance = Chance.of(_labels(train_ds), info.num_classes)
    ceiling = _collapsed_loss(config, chance)
    # The judged epochs the guard looks back on (every rank keeps them; a resumed run reads them back).
    recent = [r for r in history if _judged(r["epoch"], r["steps"])][-COLLAPSE_PATIENCE:]
    trained = 0
    for epoch in range(start_epoch, config.epochs):
        if config.max_steps is not None and global_step >= config.max_steps:
            break
        torch.manual_seed(_seed_for(config, epoch, ctx.rank))
        try:
            record, global_step, complete = _train_epoch(
                step_fn, optimizer, scaler, _train_loader(train_ds, config, ctx, epoch),
                config, ctx, epoch, global_step, steps_per_epoch, progress_bar,
            )
        except _NonFinite as e:
            raise RSDError(f"{e}; training stopped ({_kept(run_dir, epoch)})") from None
        seen = None
        if config.collapse_guard and complete and _judged(epoch + 1, global_step):
            recent = [*recent[-(COLLAPSE_PATIENCE - 1):], record]
            seen = _collapse(recent, chance, ceiling)
        if seen:
            raise RSDError(
                f"the network collapsed in epoch {epoch + 1}: {seen}; training stopped "
                f"({_kept(run_dir, epoch)}). Try a lower learning rate, a learning-rate warm-up "
                "or gradient-norm clipping (or turn the collapse guard off)"
            )
        trained += 1
        evaluation_start = time.perf_counter()
        if ctx.is_main and config.precise_bn:
            record["precise_bn_batches"] = _precise_bn(model, train_ds, config, ctx.device, epoch)
        distributed.broadcast_buffers(ctx, model)
        if ctx.is_main:
            val = evaluate(model, val_loader, ctx.device, amp=config.amp)
            record.update(val_top1=val["top1"], val_top5=val["top5"], val_loss=val["loss"],
                          eval_time=time.perf_counter() - evaluation_start)  # precise BN + validation
            history.append(record)
            run_info.metrics = dict(record, epochs_completed=epoch + 1 if complete else epoch)
            commit = dict(epoch=epoch + 1, step=global_step, optimizer=optimizer, scaler=scaler,
                          config=config.to_json(), history=history) if complete else None
            _write_epoch(run_dir, model=model, info=run_info, history=history, state=commit)
            say(_summary(record, config.epochs))
        distributed.barrier(ctx)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record, model)
        if not complete:
            break

    if ctx.is_main:
        if not trained:
            raise RSDError(f"nothing to do: {run_dir} has already trained {start_epoch} epochs")
    return run_dir


def _kept(run_dir: Path, epoch: int) -> str:
    """What a run stopped during (0-based) ``epoch`` still has on disk."""
    return f"the run directory still holds epoch {epoch}, intact in {run_dir}" if epoch else "nothing was saved"


def _recorded_init_sha(run_dir: Path) -> str | None:
    try:
        return (RunInfo.read(run_dir).training or {}).get("init_weights_sha256")
    except RSDError:
        return None


def _run_info(config: TrainConfig, info: DataInfo, form: str, ctx: distributed.Context,
              restructured: dict[str, Any] | None, mix_points: list[str] | None,
              run_dir: Path, resume: bool) -> RunInfo:
    training: dict[str, Any] = {"world_size": ctx.world_size,
                                "effective_batch_size": config.batch_size * ctx.world_size,
                                "device": ctx.device.type}
    if mix_points is not None:
        training["mix_points"] = mix_points
    if config.init_weights is not None:  # resuming: what the run started from, as recorded then
        training["init_weights_sha256"] = (_recorded_init_sha(run_dir) if resume
                                           else sha256_file(config.init_weights))
    return RunInfo(
        model=ModelSource.from_json(config.model), form=form, method=config.method,
        num_classes=info.num_classes, in_channels=info.in_channels,
        input_size=list(info.input_size), classes=list(info.classes),
        normalization=Normalization(list(info.mean), list(info.std)),
        data=info, config=config.to_json(),
        training=training, versions=_versions(), restructure=restructured,
    )


def _summary(record: dict[str, Any], epochs: int) -> str:
    acc = f"train acc {100 * record['train_acc']:.2f}%"
    if "train_acc_student" in record:
        acc += f" (student {100 * record['train_acc_student']:.2f}%)"
    return (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, {acc}, "
            f"val top-1 {100 * record['val_top1']:.2f}% top-5 {100 * record['val_top5']:.2f}%, "
            f"{record['epoch_time']:.1f}s, {record['images_per_sec']:.0f} img/s")


def _train_epoch(step_fn: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loader: DataLoader, config: TrainConfig, ctx: distributed.Context, epoch: int,
                 global_step: int, steps_per_epoch: int, progress_bar: bool) -> tuple[dict[str, Any], int, bool]:
    from tqdm import tqdm

    step_fn.train()
    device = ctx.device
    # Running sums on the device: [loss, n, correct (full network), correct (student)] + terms.
    sums: Tensor | None = None
    term_names: list[str] = []
    complete = True
    start = time.perf_counter()
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not progress_bar or not ctx.is_main, dynamic_ncols=True, file=sys.stderr)
    images = 0
    lr = config.lr_at(epoch, 0, steps_per_epoch)
    grad_norms: list[Tensor] = []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, (x, y) in enumerate(loader):
        if config.max_steps is not None and global_step >= config.max_steps:
            complete = False
            break
        lr = config.lr_at(epoch, i, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, config.amp):
            out = step_fn(x, y)
        loss = out.loss.detach().float()
        finite = torch.isfinite(loss).float()
        if ctx.distributed:  # every rank must stop together
            finite = distributed.all_reduce_sum(ctx, finite) / ctx.world_size
        if float(finite) < 1.0:
            raise _NonFinite(f"non-finite loss ({float(loss)}) at epoch {epoch + 1}, step {i + 1} "
                             f"(optimizer step {global_step + 1})")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        if config.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            grad_norms.append(torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm).detach())
        scaler.step(optimizer)
        scaler.update()
        global_step += 1

        b = len(y)
        if sums is None:
            term_names = list(out.terms)
            sums = torch.zeros(4 + len(term_names), device=device, dtype=torch.float64)
        stats = [loss * b, torch.tensor(float(b), device=device),
                 (out.logits.argmax(1) == y).sum(),
                 (out.student_logits.argmax(1) == y).sum() if out.student_logits is not None
                 else torch.zeros((), device=device)]
        stats += [out.terms[n].float() * b for n in term_names]
        sums += torch.stack([s.to(torch.float64) for s in stats])
        images += b
        if not bar.disable:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{float(sums[0] / sums[1]):.3f}",
                            acc=f"{100 * float(sums[2] / sums[1]):.1f}%",
                            img_s=f"{images * ctx.world_size / max(elapsed, 1e-9):.0f}", refresh=False)
            bar.update()
    bar.close()
    elapsed = time.perf_counter() - start
    if sums is None:  # max_steps reached before the first step of this epoch
        sums = torch.zeros(4, device=device, dtype=torch.float64)
    sums = distributed.all_reduce_sum(ctx, sums)
    n = max(float(sums[1]), 1.0)
    record: dict[str, Any] = {
        "epoch": epoch + 1, "steps": global_step, "loss": float(sums[0]) / n,
        "terms": {name: float(sums[4 + j]) / n for j, name in enumerate(term_names)},
        "train_acc": float(sums[2]) / n,
    }
    if config.method == "rsd":
        record["train_acc_student"] = float(sums[3]) / n
    if grad_norms:  # gradient norms before clipping
        norms = torch.stack(grad_norms).float()
        record.update(grad_norm_mean=float(norms.mean()), grad_norm_max=float(norms.max()),
                      clipped_fraction=float((norms > config.clip_grad_norm).float().mean()))
    record.update(lr=lr, epoch_time=elapsed, images_per_sec=float(sums[1]) / max(elapsed, 1e-9),
                  complete=complete)
    return record, global_step, complete
