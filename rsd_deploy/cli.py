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
