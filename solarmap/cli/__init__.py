"""The ``solarmap`` command line: thin click commands over the library's tools.

Heavy imports happen inside the commands so ``--help`` stays fast. Errors solarmap raises on
purpose become one line on stderr and exit 1 (click's usage errors exit 2); ``-v`` shows tracebacks.
"""

from __future__ import annotations

import logging
import sys

import click

from solarmap import __version__
from solarmap.cli.detect import detect
from solarmap.cli.inventory import compare, summarize
from solarmap.cli.scenes import demo, evaluate, info, synth
from solarmap.cli.train import classify, train
from solarmap.errors import SolarmapError

__all__ = ["main"]


class _Group(click.Group):
    """Turns SolarmapError and click's usage errors into a one-line message unless verbose."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "solarmap"
            click.echo(f"solarmap: error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("solarmap: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SolarmapError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"solarmap: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("solarmap: interrupted; no output was written (detect: rerun with --resume to continue)",
                       err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="solarmap")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging and full tracebacks.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Find solar panels in georeferenced aerial imagery and map them as polygons with areas."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")




for _command in (synth, demo, info, detect, evaluate, summarize, compare, train, classify):
    main.add_command(_command)
