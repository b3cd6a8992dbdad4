"""The ``rsd-deploy`` command line: a thin layer over the library.

User mistakes surface as :class:`RSDError` and are printed as one line with a
non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import RSDError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RSDError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rsd-deploy")
def main() -> None:
    """Train CNNs with Restructured Self-Distillation and ship them as plain networks."""


@main.command("models")
def models_cmd() -> None:
    """List the architectures: parameters and multiply-adds, training vs deployed form."""
    from .complexity import model_table

    click.echo(model_table())


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
@click.option("--model", default="resnet20", show_default=True,
              help="Architecture (see `rsd-deploy models`).")
@click.option("--method", type=click.Choice(["rsd", "baseline"]), default="rsd", show_default=True,
              help="rsd: multi-branch form with the RSD loss; baseline: plain conv+BN with cross-entropy.")
@click.option("--data", default="digits", show_default=True,
              help="digits | cifar10 | cifar100 | imagefolder.")
@click.option("--data-dir", default=None, help="Data set folder (cifar10/cifar100/imagefolder).")
@click.option("--download/--no-download", default=False, show_default=True,
              help="Let torchvision fetch CIFAR into --data-dir.")
@click.option("--input-size", type=int, default=None,
              help="Input side [default: the model's, 16 for digits].")
@click.option("--train-samples", type=int, default=None,
              help="Train on an evenly spread subset of this many images (smoke runs).")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--lr-milestones", callback=_csv(int), default="", show_default=True,
              help="Epochs at which the learning rate is multiplied by --lr-gamma, e.g. 150,180,210.")
@click.option("--lr-gamma", type=float, default=0.1, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--drop-rate", type=float, default=0.2, show_default=True,
              help="Branch-drop rate of the student pass.")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Weight of the CE terms.")
@click.option("--beta", type=float, default=1.0, show_default=True, help="Weight of the KL terms.")
@click.option("--temperature", type=float, default=3.0, show_default=True, help="KL temperature.")
@click.option("--mixture/--no-mixture", default=True, show_default=True,
              help="The feature mixture block (off: no mix terms).")
@click.option("--loss-terms", callback=_csv(str), show_default=True,
              default="ce_student,ce_teacher,ce_mix_tt,ce_mix_ts,kd_student,kd_mix",
              help="Loss terms switched on (ablations).")
@click.option("--detach-teacher/--no-detach-teacher", default=False, show_default=True,
              help="Stop gradients through the KL targets.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp/--no-amp", default=False, show_default=True, help="float16 autocast (CUDA only).")
@click.option("--workers", type=int, default=2, show_default=True, help="Data loading processes.")
@click.option("--eval-batch-size", type=int, default=256, show_default=True)
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

    from .training import TrainConfig, load_recipe, resume_config, train

    given = {k: v for k, v in options.items()
             if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    if resume:
        if recipe is not None:
            raise RSDError("--config cannot be combined with --resume: the run keeps its configuration")
        if out is None:
            raise RSDError("--resume needs --out RUN_DIR, the run to continue")
        config = resume_config(out, given)
    else:
        base = TrainConfig() if recipe is None else TrainConfig.from_dict(load_recipe(recipe), str(recipe))
        config = base.update(given, "options")
    train(config, out, resume=resume, quiet=quiet)


@main.command("eval")
@click.argument("run_dir")
@click.option("--data-dir", default=None, help="Where the run's data set is now, if it moved.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
def eval_cmd(run_dir: str, data_dir: str | None, batch_size: int, device: str, workers: int) -> None:
    """Print top-1 and top-5 accuracy of a run on its validation split."""
    from .training.evaluation import evaluate_run

    result = evaluate_run(run_dir, data_dir=data_dir, batch_size=batch_size, device=device,
                          workers=workers)
    click.echo(f"{run_dir}: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
               f"({result['images']} images, {result['split']} split of {result['data']})")
