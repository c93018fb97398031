"""Option callbacks shared by the commands."""

from __future__ import annotations

import click


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter("must be positive")
    return value


def unit_interval(ctx, param, value):
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter("must be between 0 and 1")
    return value


def scheduler_option(ctx, param, value):
    """``--scheduler``: local, local:N (N >= 1) or an address, checked before any work."""
    if value is None:
        return value
    from solarmap.errors import OptionError
    from solarmap.pipeline.regional import local_workers

    try:
        local_workers(value)
    except OptionError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--scheduler {value}: ")) from None
    return value
