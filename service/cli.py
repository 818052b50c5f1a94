"""The ``registry-migrator`` command line.

Each group of commands lives in its own module under ``service.commands``; this module
only assembles them and turns configuration errors into one line and exit status 2.
"""

from __future__ import annotations

import sys

import click

from migration.config import ConfigError


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            click.echo(f"registry-migrator: configuration error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Drive a container registry migration, repository by repository.

    Configuration comes from MIGRATOR_* environment variables; `deploy/local/stack env`
    prints them for the local stack.

    \b
    Example:
      eval "$(deploy/local/stack env)"
      registry-migrator leases list
    """


def _register() -> None:
    # One import per command module; each adds its group or command to ``main``.
    from service.commands import db as _db  # noqa: F401, PLC0415
    from service.commands import demo as _demo  # noqa: F401, PLC0415
    from service.commands import leases as _leases  # noqa: F401, PLC0415
    from service.commands import repositories as _repositories  # noqa: F401, PLC0415
    from service.commands import run as _run  # noqa: F401, PLC0415
    from service.commands import settings as _settings  # noqa: F401, PLC0415
    from service.commands import simulator as _simulator  # noqa: F401, PLC0415
    from service.commands import status as _status  # noqa: F401, PLC0415


_register()
