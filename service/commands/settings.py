"""``registry-migrator settings``, ``pause``, ``resume``: the live migration settings."""

from __future__ import annotations

import json

import click

from migration.config import Config
from migration.settings import Settings, SettingsError, parse_assignments
from service.commands.db import fail, open_store


def _print(settings: Settings, as_json: bool) -> None:
    values = settings.as_dict()
    if as_json:
        click.echo(json.dumps(values))
        return
    for key, value in values.items():
        shown = ",".join(value) if isinstance(value, list) else value
        click.echo(f"{key:<26} {'' if shown is None else shown}")


@click.group()
def settings() -> None:
    """Show and change the migration settings (live: no restart needed).

    \b
    Examples:
      registry-migrator settings show
      registry-migrator settings set capacity=25 max_retries=3 root_namespace_deny_list=acme,evil
    """


@settings.command("show")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def show_command(as_json: bool) -> None:
    """Print the current settings.

    \b
    Example:
      registry-migrator settings show --json
    """
    with open_store() as store:
        current = store.settings()
    _print(current, as_json)


@settings.command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--json", "as_json", is_flag=True, help="Print the settings after as JSON.")
def set_command(assignments: tuple[str, ...], as_json: bool) -> None:
    """Change settings; all are validated first and nothing changes if one is bad (exit 2).

    Durations are seconds; created_before is ISO 8601 with an offset, or none; the deny
    list is comma-separated; pending_enqueues may be none (= capacity).

    \b
    Example:
      registry-migrator settings set capacity=10 enqueue_waiting_time=0 created_before=none
    """
    try:
        changes = parse_assignments(assignments)
    except SettingsError as error:
        fail(str(error), 2)
    with open_store() as store:
        try:
            after = store.update_settings(**changes)
        except SettingsError as error:
            fail(str(error), 2)
    _print(after, as_json)


@click.command()
def pause() -> None:
    """Stop starting new migrations (in-flight ones go on). Sets enabled=false.

    \b
    Example:
      registry-migrator pause
    """
    with open_store() as store:
        store.update_settings(enabled=False)
    click.echo("paused: no new migrations start until `registry-migrator resume`")


@click.command()
def resume() -> None:
    """Start new migrations again. Sets enabled=true, clears a pause the system made (the
    registry refused our token: fix MIGRATOR_REGISTRY_TOKEN first), and sends one run.

    \b
    Example:
      registry-migrator resume
    """
    with open_store() as store:
        before = store.settings()
        store.update_settings(enabled=True)
    if before.paused_reason:
        click.echo(f"resumed (it was paused by the system: {before.paused_reason})")
    else:
        click.echo("resumed")
    # Start now rather than at the scheduler's next period (up to enqueue_interval).
    from service.commands.run import send_one_run

    try:
        sent = send_one_run(Config.from_env())
    except Exception as error:  # the scheduler's next period starts it anyway
        click.echo(f"(no run sent now: {error}; the scheduler sends the next one)")
        return
    click.echo("enqueued one run" if sent else "runs are already waiting")
