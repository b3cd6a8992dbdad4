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


@main.command("bench")
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--ort", "use_ort", is_flag=True, help="ONNX Runtime; fused model: RUN_DIR/deploy/model.onnx.")
@click.option("--torch", "use_torch", is_flag=True, help="PyTorch eager; fused in-process.")
@click.option("--trt", "use_trt", is_flag=True, help="TensorRT; fused engine: RUN_DIR/deploy/model.engine.")
@click.option("--device", default=None, help="cpu or cuda [default: cuda for --trt, else cpu].")
@click.option("--baseline", default=None, type=click.Path(path_type=str),
              help="A plain (baseline-trained) run of the same architecture [default: the plain "
                   "architecture with BatchNorm folded; weights do not change latency].")
@click.option("--batch-sizes", default="1,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--warmup-s", type=float, default=1.0, show_default=True, help="Warm-up seconds per model.")
@click.option("--min-s", type=float, default=None,
              help="Time every model for at least this many seconds [default: 3].")
@click.option("--iters", type=int, default=None, help="Instead of --min-s: this many rounds of one call per model.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all cores available].")
@click.option("--out", default=None, type=click.Path(path_type=str), help="Report folder [default: RUN_DIR/bench].")
@click.option("--quiet", is_flag=True, help="Print only the result.")
def bench_cmd(run_dir, use_ort, use_torch, use_trt, device, baseline, batch_sizes, warmup_s, min_s,
              iters, threads, out, quiet) -> None:
    """Time an RSD run unfused, fused and against a plain baseline: is there any inference overhead?

    The three models run in interleaved rounds; the report (bench.json, bench.md,
    bench.png, timings.json) gives latency statistics, the unfused/fused and
    fused/baseline ratios with bootstrap 95% intervals, and a verdict.
    """
    from .bench import Budget, bench_run

    chosen = [name for name, on in (("ort", use_ort), ("torch", use_torch), ("trt", use_trt)) if on]
    if len(chosen) != 1:
        raise RSDError("choose exactly one backend: --ort, --torch or --trt")
    budget = Budget(warmup_s=warmup_s, min_s=min_s, iters=iters)

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    result = bench_run(run_dir, chosen[0], device=device, baseline=baseline, batch_sizes=batch_sizes,
                       budget=budget, threads=threads, out=out, progress=progress)
    click.echo(f"{result['model']}: {result['backend']} on {result['device']}, {result['threads']} threads")
    for e in result["results"]:
        m, uf = e["models"], e["ratios"]["unfused/fused"]
        click.echo(
            f"batch {e['batch']:>4}: median ms unfused {m['unfused']['median_ms']:.3g}, fused "
            f"{m['fused']['median_ms']:.3g}, baseline {m['baseline']['median_ms']:.3g}; "
            f"unfused/fused {uf['value']:.2f}x ({uf['lo']:.2f}-{uf['hi']:.2f}); {e['verdict']['text']}"
        )
        for w in e["warnings"]:
            click.echo(f"warning: batch {e['batch']}: {w}", err=True)
    click.echo(f"verdict: {result['verdict']['status']}")
    click.echo(f"report: {result['files']['markdown']}")
