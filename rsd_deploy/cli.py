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


@main.command("fuse-export")
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--onnx/--no-onnx", default=False, help="Write and verify model.onnx.")
@click.option("--trt/--no-trt", default=False,
              help="Also build and verify a TensorRT engine (implies --onnx).")
@click.option("--out", type=click.Path(path_type=str), default=None,
              help="Output folder [default: RUN_DIR/deploy].")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: 17].")
@click.option("--batch", default=None, metavar="dynamic|N",
              help="ONNX batch axis: dynamic, or a fixed size N [default: dynamic].")
@click.option("--max-batch", type=int, default=None,
              help="TensorRT profile maximum batch [default: 64].")
@click.option("--opt-batch", type=int, default=None,
              help="TensorRT profile batch to tune for [default: --max-batch].")
@click.option("--fp16/--fp32", default=False, help="TensorRT precision [default: fp32].")
@click.option("--profile", "profile", type=click.Path(path_type=str), default=None,
              help="JSON file of options (see export/); flags given here override it.")
@click.option("--keep-unfused/--no-keep-unfused", default=False,
              help="Also write the unfused training form as model_unfused.onnx.")
@click.option("--atol", type=float, default=None, help="fp32 parity tolerance [default: 1e-4].")
@click.option("--rtol", type=float, default=None,
              help="fp32 parity tolerance relative to max|logit| [default: 1e-4].")
@click.option("--trt-atol", type=float, default=None,
              help="TensorRT tolerance [default: 1e-3 fp32, 1e-2 fp16].")
@click.option("--trt-rtol", type=float, default=None,
              help="TensorRT relative tolerance [default: 1e-3 fp32, 2e-2 fp16].")
@click.option("--samples", type=int, default=None,
              help="Verification inputs (validation images when available) [default: 64].")
@click.pass_context
def fuse_export_cmd(ctx: click.Context, run_dir: str, profile: str | None, **flags) -> None:
    """Fuse a training run into the plain network and export verified artifacts.

    Writes model.safetensors and run.json (deploy form), model.onnx (--onnx),
    model_unfused.onnx (--keep-unfused), model.engine and timing.cache (--trt) and
    report.json to --out, each only after its checks pass. Exit status: 0 when
    everything asked for was written; 1 on bad input or a failed check (nothing
    written); 3 when --trt was asked for but TensorRT or a CUDA device is missing
    (everything else written and verified).
    """
    from click.core import ParameterSource

    from .export import ExportOptions, format_report, fuse_export, load_profile, parse_batch

    given = {k: v for k, v in flags.items()
             if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
    if "batch" in given:
        given["batch"] = parse_batch(given["batch"])
    base = load_profile(profile) if profile else ExportOptions()
    options = base.with_overrides(given)
    report = fuse_export(run_dir, options, log=lambda msg: click.echo(f"[fuse-export] {msg}", err=True))
    click.echo(format_report(report))
    trt = report.get("tensorrt")
    if trt and trt["status"] == "unavailable":
        click.echo(f"error: {trt['error']} (everything else was written and verified)", err=True)
        sys.exit(3)
