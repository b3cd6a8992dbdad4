"""The ``rsd-deploy`` command line: a thin layer over the library.

User mistakes surface as :class:`RSDError` and are printed as one line with a
non-zero exit, the options it names (```max_batch```) shown as flags (``--max-batch``);
anything else is a bug and keeps its traceback. The library reports progress through
:mod:`logging`; the commands show it on stderr (``--quiet``: warnings only) and print
their results and every command-line hint on stdout.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import click

from . import __version__
from .bench.compare import DEFAULT_BATCH_SIZES
from .bench.runner import DEFAULT_MIN_S, Budget
from .data import DATASETS
from .errors import OPTION, RSDError
from .export import DEFAULT_MAX_BATCH, TRT_TOLERANCES, ExportOptions
from .quantize import FORMATS as QUANT_FORMATS
from .quantize import METHODS as QUANT_METHODS
from .training.config import DEVICES, METHODS, SCHEDULES, TrainConfig

#: The defaults every option below shows and uses: the library's dataclasses own them.
_TRAIN, _EXPORT, _BUDGET = TrainConfig(), ExportOptions(), Budget()


def _listed(values) -> str:
    return ",".join(map(str, values))


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RSDError as e:
            command = self.commands.get(ctx.invoked_subcommand or "")
            click.echo(f"error: {_as_flags(str(e), command, self)}", err=True)
            sys.exit(1)


def _flags(command: click.Command) -> dict[str, str]:
    """Each option's parameter name -> its long flag (``max_batch`` -> ``--max-batch``)."""
    return {p.name: next(o for o in p.opts if o.startswith("--")) for p in command.params
            if isinstance(p, click.Option) and any(o.startswith("--") for o in p.opts)}


#: Library functions a message may point to, and the command that runs each.
_COMMANDS = {"fuse_export": "rsd-deploy fuse-export"}


def _as_flags(message: str, command: click.Command | None, group: click.Group) -> str:
    """``message`` in command-line terms: the options it names as flags (the command's own, else
    any command's), the library functions it points to as commands."""
    known: dict[str, str] = {}
    for other in group.commands.values():
        known.update({k: v for k, v in _flags(other).items() if k not in known})
    if command is not None:
        known.update(_flags(command))
    known.update({k.removeprefix("use_"): v for k, v in known.items() if k.startswith("use_")})
    message = OPTION.sub(lambda m: known.get(m.group(1), m.group(1)), message)
    for function, cli in _COMMANDS.items():
        # As a word of prose only: not inside a path or file name (runs/fuse_export/x).
        message = re.sub(rf"(?<![\w/.\\-]){function}(?![\w/.\\-])", cli, message)
    return message


class _EchoHandler(logging.Handler):
    """Log records to stderr through click (so test runners capture them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _show_progress(command: str, quiet: bool = False) -> None:
    """Show the library's log on stderr as ``[command] message``; ``quiet``: warnings only."""
    logger = logging.getLogger("rsd_deploy")
    for old in [h for h in logger.handlers if isinstance(h, _EchoHandler)]:
        logger.removeHandler(old)
    handler = _EchoHandler()
    handler.setFormatter(logging.Formatter(f"[{command}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rsd-deploy")
def main() -> None:
    """Train CNNs with Restructured Self-Distillation and ship them as plain networks."""


@main.command("models")
def models_cmd() -> None:
    """List the architectures: parameters and multiply-adds, training vs deployed form."""
    from .complexity import model_table

    click.echo(model_table())


@main.command("inspect")
@click.argument("model")
@click.option("--input-size", type=int, default=None,
              help="Input side [default: the zoo model's, else 224].")
@click.option("--num-classes", type=int, default=None,
              help="Classes of the head [default: 100 for the CIFAR zoo, else 1000].")
def inspect_cmd(model: str, input_size: int | None, num_classes: int | None) -> None:
    """What RSD would do to MODEL (NAME, torchvision:NAME or timm:NAME).

    Lists every conv, restructured or skipped (and why), the parameters and multiply-adds
    of the training and deployed forms, and the default mix points.
    """
    from .inspection import inspect_model

    for value, flag in ((input_size, "--input-size"), (num_classes, "--num-classes")):
        if value is not None and value < 1:
            raise RSDError(f"{flag} must be a positive integer (got {value})")
    click.echo(inspect_model(model, input_size=input_size, num_classes=num_classes).text())


@main.command("fuse-export")
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--onnx/--no-onnx", default=_EXPORT.onnx, help="Write and verify model.onnx.")
@click.option("--trt/--no-trt", default=_EXPORT.trt,
              help="Also build and verify a TensorRT engine (implies --onnx).")
@click.option("--out", type=click.Path(path_type=str), default=None,
              help="Output folder [default: RUN_DIR/deploy].")
@click.option("--opset", type=int, default=None, help=f"ONNX opset [default: {_EXPORT.opset}].")
@click.option("--batch", default=None, metavar="dynamic|N",
              help="ONNX batch axis: dynamic, or a fixed size N [default: dynamic].")
@click.option("--max-batch", type=int, default=None,
              help=f"TensorRT profile maximum batch [default: {DEFAULT_MAX_BATCH}].")
@click.option("--opt-batch", type=int, default=None,
              help="TensorRT profile batch to tune for [default: --max-batch].")
@click.option("--fp16/--fp32", default=_EXPORT.fp16,
              help="Also write model_fp16.onnx (fp16 weights and compute, fp32 input and output), checked "
                   "against PyTorch; with --trt the engine is built from it (fp16).")
@click.option("--int8/--no-int8", default=_EXPORT.int8,
              help="Also write model_int8.onnx (static Q/DQ, per-channel weights), calibrated on training "
                   "images and written only if its validation top-1 passes --max-top1-drop; with --trt the "
                   "engine is built from it (int8). Needs the run's data set.")
@click.option("--int8-format", default=None, metavar="|".join(QUANT_FORMATS),
              help="ort: uint8 activations for ONNX Runtime's CPU kernels; trt: symmetric int8 for TensorRT "
                   "[default: trt with --trt, else ort].")
@click.option("--calib-samples", type=int, default=None,
              help=f"Training images to calibrate on [default: {_EXPORT.calib_samples}].")
@click.option("--calib-method", default=None, metavar="|".join(QUANT_METHODS),
              help=f"Calibration method [default: {_EXPORT.calib_method}].")
@click.option("--max-top1-drop", type=float, default=None, metavar="PTS",
              help=f"Points of validation top-1 the int8 model may lose against fp32 [default: "
                   f"{_EXPORT.max_top1_drop:g}].")
@click.option("--profile", "profile", type=click.Path(path_type=str), default=None,
              help="JSON file of options (see export/); flags given here override it.")
@click.option("--keep-unfused/--no-keep-unfused", default=_EXPORT.keep_unfused,
              help="Also write the unfused training form as model_unfused.onnx.")
@click.option("--atol", type=float, default=None, help=f"fp32 parity tolerance [default: {_EXPORT.atol:g}].")
@click.option("--rtol", type=float, default=None,
              help=f"fp32 parity tolerance relative to max|logit| [default: {_EXPORT.rtol:g}].")
@click.option("--trt-atol", type=float, default=None, help="TensorRT tolerance [default: " + ", ".join(
    f"{t.atol:g} {p}" for p, t in TRT_TOLERANCES.items()) + "].")
@click.option("--trt-rtol", type=float, default=None, help="TensorRT relative tolerance [default: " + ", ".join(
    f"{t.rtol:g} {p}" for p, t in TRT_TOLERANCES.items()) + "].")
@click.option("--samples", type=int, default=None,
              help=f"Verification inputs (validation images when available) [default: {_EXPORT.samples}].")
@click.pass_context
def fuse_export_cmd(ctx: click.Context, run_dir: str, profile: str | None, **flags) -> None:
    """Fuse a training run into the plain network and export verified artifacts.

    Writes model.safetensors and run.json (deploy form), model.onnx (--onnx),
    model_unfused.onnx (--keep-unfused), model_fp16.onnx (--fp16), model_int8.onnx
    (--int8), model.engine and timing.cache (--trt) and report.json to --out, each
    only after its checks pass. Exit status: 0 when
    everything asked for was written; 1 on bad input or a failed check (nothing
    written); 3 when --trt was asked for but TensorRT or a CUDA device is missing
    (everything else written and verified).
    """
    from click.core import ParameterSource

    from .export import format_report, fuse_export, load_profile, parse_batch

    given = {k: v for k, v in flags.items()
             if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
    if "batch" in given:
        given["batch"] = parse_batch(given["batch"])
    base = load_profile(profile) if profile else ExportOptions()
    options = base.with_overrides(given)
    _show_progress("fuse-export")
    report = fuse_export(run_dir, options)
    click.echo(format_report(report))
    trt = report.get("tensorrt")
    if trt and trt["status"] == "unavailable":
        click.echo(f"error: {trt['error']} (everything else was written and verified)", err=True)
        sys.exit(3)


def _backend_flags(command):
    """One flag per registered backend (``--torch``, ``--ort``, ...): a new backend needs no CLI change."""
    from .backends import get_backend, list_backends

    for name in reversed(list_backends()):
        backend = get_backend(name)
        fused = f"fused model: DEPLOY/{backend.FILE}" if backend.FILE else "fused in-process"
        command = click.option(f"--{name}", f"use_{name}", is_flag=True, help=f"{backend.LABEL}; {fused}.")(command)
    return command


@main.command("bench")
@click.argument("run_dir", type=click.Path(path_type=str))
@_backend_flags
@click.option("--deploy", default=None, type=click.Path(path_type=str),
              help="The fuse-export folder (its --out) of this run's current weights, for backends "
                   "that time an exported file [default: RUN_DIR/deploy].")
@click.option("--device", default=None, help="cpu or cuda [default: cuda for --trt, else cpu].")
@click.option("--baseline", default=None, type=click.Path(path_type=str),
              help="A plain (baseline-trained) run of the same architecture [default: the plain "
                   "architecture with BatchNorm folded; weights do not change latency].")
@click.option("--batch-sizes", default=_listed(DEFAULT_BATCH_SIZES), show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--warmup-s", type=float, default=_BUDGET.warmup_s, show_default=True,
              help="Warm-up seconds per model.")
@click.option("--min-s", type=float, default=None,
              help=f"Time every model for at least this many seconds [default: {DEFAULT_MIN_S:g}].")
@click.option("--iters", type=int, default=None, help="Instead of --min-s: this many rounds of one call per model.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all cores available].")
@click.option("--precision", default=None, metavar="fp32|fp16|int8",
              help="Time the models at this precision, each converted the same way (int8: calibrated on "
                   "the same training images), plus the fused model at fp32 for the speed-up [default: the "
                   "deploy artifact's, fp32 for --ort].")
@click.option("--out", default=None, type=click.Path(path_type=str), help="Report folder [default: RUN_DIR/bench].")
@click.option("--quiet", is_flag=True, help="Print only the result.")
def bench_cmd(run_dir, deploy, device, baseline, batch_sizes, warmup_s, min_s, iters, threads, precision, out, quiet,
              **use) -> None:
    """Time an RSD run unfused, fused and against a plain baseline: is there any inference overhead?

    The three models run in interleaved rounds; the report (bench.json, bench.md,
    bench.png, timings.json) gives latency statistics, the unfused/fused and
    fused/baseline ratios with bootstrap 95% intervals, and a verdict.
    """
    from .backends import list_backends
    from .bench import bench_run

    chosen = [name for name in list_backends() if use[f"use_{name}"]]
    if len(chosen) != 1:
        flags = [f"--{name}" for name in list_backends()]
        raise RSDError(f"choose exactly one backend: {', '.join(flags[:-1])} or {flags[-1]}")
    budget = Budget(warmup_s=warmup_s, min_s=min_s, iters=iters)
    _show_progress("bench", quiet)
    result = bench_run(run_dir, chosen[0], device=device, baseline=baseline, deploy=deploy, batch_sizes=batch_sizes,
                       budget=budget, threads=threads, out=out, precision=precision)
    click.echo(f"{result['model']}: {result['backend']} on {result['device']}, {result['threads']} threads, "
               f"{result['precision']}")
    for e in result["results"]:
        m, uf = e["models"], e["ratios"]["unfused/fused"]
        click.echo(
            f"batch {e['batch']:>4}: median ms unfused {m['unfused']['median_ms']:.3g}, fused "
            f"{m['fused']['median_ms']:.3g}, baseline {m['baseline']['median_ms']:.3g}; "
            f"unfused/fused {uf['value']:.2f}x ({uf['lo']:.2f}-{uf['hi']:.2f}); {e['verdict']['text']}"
        )
        sp = e["ratios"].get("fused_fp32/fused")
        if sp:
            click.echo(f"batch {e['batch']:>4}: fused {result['precision']} vs fp32 (median ms "
                       f"{m['fused_fp32']['median_ms']:.3g}): {sp['value']:.2f}x faster ({sp['lo']:.2f}-{sp['hi']:.2f})")
        for w in e["warnings"]:
            click.echo(f"warning: batch {e['batch']}: {_as_flags(w, bench_cmd, main)}", err=True)
    click.echo(f"verdict: {result['verdict']['status']}")
    click.echo(f"report: {result['files']['markdown']}")


# Training and evaluation -----------------------------------------------------------------


def _csv(kind):
    def convert(ctx, param, value):
        if value is None or isinstance(value, list):
            return value
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            return [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return convert


@main.command("train")
@click.option("--config", "recipe", default=None,
              help="Recipe file (JSON or TOML, keys as the options below with - or _); "
                   "options given on the command line override it.")
@click.option("--model", default=_TRAIN.model, show_default=True,
              help="Architecture: a zoo NAME (see `rsd-deploy models`), torchvision:NAME or timm:NAME "
                   "(see `rsd-deploy inspect`).")
@click.option("--mix-points", callback=_csv(str), default=None,
              help="Comma-separated modules whose outputs RSD mixes (stage outputs) [default: the "
                   "model's, or its family's].")
@click.option("--init-weights", default=None,
              help="A safetensors state dict of the plain model to start from: a baseline run's "
                   "model.safetensors, or a torchvision/timm state dict (the RSD form starts equivalent to it).")
@click.option("--method", type=click.Choice(METHODS), default=_TRAIN.method, show_default=True,
              help="rsd: multi-branch form with the RSD loss; baseline: plain conv+BN with cross-entropy.")
@click.option("--data", default=_TRAIN.data, show_default=True,
              help=" | ".join(DATASETS) + ".")
@click.option("--data-dir", default=None, help="Data set folder (cifar10/cifar100/imagefolder).")
@click.option("--download/--no-download", default=_TRAIN.download, show_default=True,
              help="Let torchvision fetch CIFAR into --data-dir.")
@click.option("--input-size", type=int, default=None,
              help="Input side [default: the model's, 16 for digits].")
@click.option("--train-samples", type=int, default=None,
              help="Train on an evenly spread subset of this many images (smoke runs).")
@click.option("--val-samples", type=int, default=None,
              help="Validate on an evenly spread subset of this many images (smoke runs).")
@click.option("--epochs", type=int, default=_TRAIN.epochs, show_default=True)
@click.option("--batch-size", type=int, default=_TRAIN.batch_size, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=_TRAIN.lr, show_default=True)
@click.option("--lr-milestones", callback=_csv(int), default=_listed(_TRAIN.lr_milestones), show_default=True,
              help="Epochs at which the learning rate is multiplied by --lr-gamma, e.g. 150,180,210.")
@click.option("--lr-gamma", type=float, default=_TRAIN.lr_gamma, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_TRAIN.schedule, show_default=True,
              help="step: x --lr-gamma at each milestone; cosine: down to 0 at the end of the last epoch.")
@click.option("--warmup-epochs", type=float, default=_TRAIN.warmup_epochs, show_default=True,
              help="Linear learning-rate warm-up over this many epochs (fractions allowed).")
@click.option("--clip-grad-norm", type=float, default=_TRAIN.clip_grad_norm, show_default=True,
              callback=lambda ctx, param, v: None if v == 0 else v,
              help="Clip the global gradient norm to this value; 0 turns clipping off (null in a recipe).")
@click.option("--precise-bn", type=int, default=_TRAIN.precise_bn, show_default=True,
              help="Re-estimate BatchNorm statistics over this many clean training batches before "
                   "every evaluation and before the weights are written (0: off).")
@click.option("--collapse-guard/--no-collapse-guard", default=_TRAIN.collapse_guard, show_default=True,
              help="Stop a run whose network has collapsed (three epochs at chance accuracy and the loss of predicting the label frequencies, not falling).")
@click.option("--momentum", type=float, default=_TRAIN.momentum, show_default=True)
@click.option("--weight-decay", type=float, default=_TRAIN.weight_decay, show_default=True)
@click.option("--seed", type=int, default=_TRAIN.seed, show_default=True)
@click.option("--drop-rate", type=float, default=_TRAIN.drop_rate, show_default=True,
              help="Branch-drop rate of the student pass.")
@click.option("--alpha", type=float, default=_TRAIN.alpha, show_default=True, help="Weight of the CE terms.")
@click.option("--beta", type=float, default=_TRAIN.beta, show_default=True, help="Weight of the KL terms.")
@click.option("--temperature", type=float, default=_TRAIN.temperature, show_default=True, help="KL temperature.")
@click.option("--mixture/--no-mixture", default=_TRAIN.mixture, show_default=True,
              help="The feature mixture block (off: no mix terms).")
@click.option("--loss-terms", callback=_csv(str), show_default=True,
              default=_listed(_TRAIN.loss_terms),
              help="Loss terms switched on (ablations).")
@click.option("--detach-teacher/--no-detach-teacher", default=_TRAIN.detach_teacher, show_default=True,
              help="Stop gradients through the KL targets.")
@click.option("--kxk-branches", type=int, default=_TRAIN.kxk_branches, show_default=True,
              help="KxK branches per restructured block, 1-3 (each also has a Kx1 and a 1xK branch): 3 is the "
                   "paper's, 1 an ACNet-like block that costs less per step.")
@click.option("--label-smoothing", type=float, default=_TRAIN.label_smoothing, show_default=True,
              help="Label smoothing of every cross-entropy term, RSD's and the baseline's, in [0, 1).")
@click.option("--device", type=click.Choice(DEVICES), default=_TRAIN.device, show_default=True)
@click.option("--amp/--no-amp", default=_TRAIN.amp, show_default=True, help="mixed precision: float16 autocast with gradient scaling on CUDA, bfloat16 autocast on a CPU with bfloat16 instructions.")
@click.option("--workers", type=int, default=_TRAIN.workers, show_default=True, help="Data loading processes.")
@click.option("--eval-batch-size", type=int, default=_TRAIN.eval_batch_size, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--out", default=None,
              help="Run directory [default: runs/MODEL-METHOD-DATA-TIME].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@click.pass_context
def train_cmd(ctx: click.Context, recipe: str | None, out: str | None, resume: bool, quiet: bool,
              **options) -> None:
    """Train a model with RSD (or the plain baseline) and write a run directory.

    With no options it trains resnet20 with RSD on scikit-learn's digits for a few
    epochs (a couple of minutes on 2 CPU cores). Under `torchrun --no-python
    --nproc_per_node N rsd-deploy train ...` it trains with DistributedDataParallel.
    """
    from click.core import ParameterSource

    from .training import load_recipe, resume_config, train

    given = {k: v for k, v in options.items()
             if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    if resume:
        if recipe is not None:
            raise RSDError("--config cannot be combined with --resume: the run keeps its configuration")
        if out is None:
            raise RSDError("--resume needs --out, the run directory to continue")
        config = resume_config(out, given)
    else:
        base = TrainConfig() if recipe is None else TrainConfig.from_dict(load_recipe(recipe), str(recipe))
        config = base.update(given, "options")
    _show_progress("train", quiet)
    run_dir = train(config, out, resume=resume, progress_bar=not quiet)
    if not quiet and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process reports
        click.echo(f"run: {run_dir}")
        click.echo(f"next: rsd-deploy fuse-export {run_dir} --onnx")


@main.command("eval")
@click.argument("run_dir")
@click.option("--data-dir", default=None, help="Where the run's data set is now, if it moved.")
@click.option("--batch-size", type=int, default=_TRAIN.eval_batch_size, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default=_TRAIN.device, show_default=True)
@click.option("--workers", type=int, default=_TRAIN.workers, show_default=True)
def eval_cmd(run_dir: str, data_dir: str | None, batch_size: int, device: str, workers: int) -> None:
    """Print top-1 and top-5 accuracy of a run on its validation split."""
    from .training.evaluation import evaluate_run

    result = evaluate_run(run_dir, data_dir=data_dir, batch_size=batch_size, device=device,
                          workers=workers)
    click.echo(f"{run_dir}: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
               f"({result['images']} images, {result['split']} split of {result['data']})")
