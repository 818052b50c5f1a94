"""The ``registry-migrator`` command line.

Each group of commands lives in its own module under ``service.commands``. This module
names them without importing them: a command's module is imported only when that
command (or its ``--help``) is asked for, so ``registry-migrator --help`` answers at once
instead of importing FastAPI, the simulator, gRPC and psycopg first (click's "lazily
loading subcommands"). Command modules import their heavy libraries inside the commands,
so a group's ``--help`` stays cheap too. Configuration errors become one line, exit 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import click

from migration.config import ConfigError


@dataclass(frozen=True)
class LazyCommand:
    """Where a command is defined, and the line ``--help`` lists it with.

    :param target: ``module:attribute`` of the click command or group.
    :param short_help: the first sentence of its docstring (a test checks that they agree),
        shown in the parent's command list without importing the module.
    """

    target: str
    short_help: str

    def load(self) -> click.Command:
        """Import the module and return the command."""
        module_name, attribute = self.target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.target} is not a click command")
        return command


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use.

    :param lazy_commands: command name → where it lives and its one-line help.
    """

    def __init__(
        self,
        *args: Any,
        lazy_commands: Mapping[str, LazyCommand] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            # Cached in ``self.commands``: a command is imported once per process.
            self.add_command(self.lazy_commands[cmd_name].load(), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own version loads every subcommand to read its short help: list the lazy
        # ones from the table instead, formatted the same way.
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows: list[tuple[str, str]] = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                # A stand-in with the same help: click shortens it as it would the real one.
                command = click.Command(name, help=self.lazy_commands[name].short_help)
            if not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class _Main(LazyGroup):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            click.echo(f"registry-migrator: configuration error: {error}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as error:
            # The image leaves the development tools out (simulator, demo, launcher).
            if (error.name or "").partition(".")[0] != "devtools":
                raise
            click.echo(
                f"registry-migrator: {ctx.invoked_subcommand} is a development tool "
                "(package devtools) that this installation leaves out; run it from a "
                "source checkout",
                err=True,
            )
            sys.exit(2)


#: Every command of ``registry-migrator``: name → module attribute and one-line help.
COMMANDS = {
    "api": LazyCommand(
        "service.commands.run:api",
        "Serve the notification API, /healthz, /readyz and /metrics (uvicorn).",
    ),
    "db": LazyCommand("service.commands.db:db", "Manage the PostgreSQL schema."),
    "demo": LazyCommand(
        "service.commands.demo:demo",
        "Migrate COUNT seeded repositories through a simulated registry, live.",
    ),
    "enqueue": LazyCommand(
        "service.commands.run:enqueue",
        "Send one enqueue_next_migration run through the dedup gate (like perform_async).",
    ),
    "guard": LazyCommand(
        "service.commands.repair:guard",
        "Run one pass of the stale-migration guard now and print what it did.",
    ),
    "leases": LazyCommand(
        "service.commands.leases:leases", "Inspect and manage the per-repository etcd leases."
    ),
    "pause": LazyCommand(
        "service.commands.settings:pause",
        "Stop starting new migrations (in-flight ones go on).",
    ),
    "repositories": LazyCommand(
        "service.commands.repositories:repositories",
        "Add, seed, inspect, repair and requeue the repositories to migrate.",
    ),
    "resume": LazyCommand("service.commands.settings:resume", "Start new migrations again."),
    "scheduler": LazyCommand(
        "service.commands.run:scheduler",
        "Publish enqueue and guard runs periodically; only the elected leader publishes.",
    ),
    "settings": LazyCommand(
        "service.commands.settings:settings",
        "Show and change the migration settings (live: no restart needed).",
    ),
    "simulator": LazyCommand(
        "service.commands.simulator:simulator",
        "Serve a simulated registry import API until SIGTERM/SIGINT.",
    ),
    "status": LazyCommand(
        "service.commands.status:status",
        "Show counts by state, in flight vs capacity, throughput, the oldest active\n"
        "migration, the latest aborts and skips, leases held and the gating settings.",
    ),
}


@click.group(
    cls=_Main,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def main() -> None:
    """Drive a container registry migration, repository by repository.

    Configuration comes from MIGRATOR_* environment variables; `deploy/local/stack env`
    prints them for the local stack.

    \b
    Example:
      eval "$(deploy/local/stack env)"
      registry-migrator leases list
    """
