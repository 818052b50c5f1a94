"""``registry-migrator status``: one screen that says how the migration is doing.

psycopg and etcd (through :mod:`service.status`) are imported when a snapshot is taken,
rich only to render one: ``status --json`` never loads rich, ``status --help`` none of them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

import click

from migration.config import Config
from migration.states import State

if TYPE_CHECKING:
    from rich.console import RenderableType

    from service.status import MigrationStatus


def _fail(message: str) -> None:
    click.echo(f"registry-migrator: {message}", err=True)
    sys.exit(1)


def snapshot(config: Config, *, recent: int) -> MigrationStatus:
    """:func:`service.status.collect`, with database trouble turned into one line and exit 1."""
    import psycopg

    from migration.store.versions import SchemaOutdated
    from service.status import collect

    try:
        return collect(config, recent=recent)
    except SchemaOutdated as error:
        _fail(str(error))
    except psycopg.errors.UndefinedTable:
        _fail("the database has no schema yet; run `registry-migrator db upgrade`")
    except psycopg.Error as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        _fail(f"database error: {first}")
    raise AssertionError("unreachable")


def render(status: MigrationStatus) -> RenderableType:
    """The human view of a snapshot (tables), for ``status`` and ``status --watch``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from service.status import DONE_REASON_LABEL, STATE_STYLE

    states = Table(title="repositories by state", title_justify="left", show_edge=False)
    states.add_column("state")
    states.add_column("count", justify="right")
    states.add_column("share", justify="right")
    for state in State:
        n = status.counts[state.value]
        share = f"{100 * n / status.total:.1f}%" if status.total else "-"
        states.add_row(Text(state.value, style=STATE_STYLE[state]), f"{n:,}", share)
    states.add_row("total", f"{status.total:,}", "")
    for reason, n in status.done_by_reason.items():
        label = DONE_REASON_LABEL.get(reason, f"done ({reason})")
        states.add_row(Text(f"  {label}", style="green"), f"{n:,}", "")
    for reason, n in status.skipped_by_reason.items():
        states.add_row(Text(f"  skipped: {reason}", style="magenta"), f"{n:,}", "")
    if status.excluded_by_deny_list:
        states.add_row("  excluded: deny list", f"{status.excluded_by_deny_list:,}", "")
    if status.excluded_by_cutoff:
        states.add_row("  excluded: created_before", f"{status.excluded_by_cutoff:,}", "")

    flow = Table(title="flow", title_justify="left", show_header=False, show_edge=False)
    flow.add_column("what")
    flow.add_column("value")
    full = status.in_flight >= status.capacity
    flow.add_row(
        "in flight / capacity",
        Text(f"{status.in_flight} / {status.capacity}", style="bold red" if full else "bold"),
    )
    flow.add_row("eligible remaining", f"{status.eligible_remaining:,}")
    flow.add_row(
        "imports done / min",
        "  ".join(f"{v:g} ({m} min)" for m, v in status.import_done_per_minute.items()),
    )
    oldest = status.oldest_active
    flow.add_row(
        "oldest active",
        f"{oldest.path} (id {oldest.repository_id}, {oldest.state}, last step "
        f"{oldest.age_s:g} s ago; guard acts after "
        f"{status.settings['max_step_duration']:g} s)"
        if oldest and oldest.age_s is not None
        else "-",
    )
    if status.leases is None:
        flow.add_row("leases held", Text(status.leases_error or "?", style="red"))
    else:
        flow.add_row("leases held", str(len(status.leases)))
    breaker = status.registry_breaker
    if breaker is not None:
        shown = breaker.state.replace("_", "-")
        if breaker.state != "closed":
            shown += (
                f" ({breaker.remaining_s:g} s left of {breaker.window_s:g} s: {breaker.reason})"
            )
        flow.add_row(
            "registry breaker", Text(shown, style="" if breaker.state == "closed" else "bold red")
        )
    flow.add_row(
        "backing off",
        Text(
            f"{status.backing_off_count} (registry faults; not picked before their time)",
            style="yellow" if status.backing_off_count else "",
        ),
    )
    flow.add_row("waiting time passed", str(status.waiting_time_passed).lower())
    flow.add_row("snapshot at", status.taken_at)

    gates = Table(title="settings that gate runs", title_justify="left", show_edge=False)
    gates.add_column("setting")
    gates.add_column("value")
    for key, value in status.settings.items():
        shown = ",".join(value) if isinstance(value, list) else value
        style = (
            "bold red" if key in ("enabled", "paused_reason") and value not in (True, None) else ""
        )
        gates.add_row(key, Text("none" if shown in (None, "") else str(shown), style=style))

    ends = Table(title="latest aborts and skips", title_justify="left", show_edge=False)
    for column in ("at", "repository", "to", "reason"):
        ends.add_column(column)
    for end in status.recent_ends:
        ends.add_row(end.at[:19], f"{end.path} ({end.repository_id})", end.to_state,
                     (end.reason or "")[:80])  # fmt: skip

    parts: list[RenderableType] = [states, flow, gates]
    if status.recent_ends:
        parts.append(ends)
    if status.backing_off:
        waiting = Table(title="backing off (registry faults)", title_justify="left",
                        show_edge=False)  # fmt: skip
        for column in ("repository", "state", "faults", "not before", "last error"):
            waiting.add_column(column)
        for b in status.backing_off:
            waiting.add_row(f"{b.path} ({b.repository_id})", b.state, str(b.failures),
                            b.not_before[:19], (b.last_error or "")[:70])  # fmt: skip
        parts.append(waiting)
    if status.leases:
        held = Table(title="leases", title_justify="left", show_edge=False)
        for column in ("key", "token", "ttl", "holder"):
            held.add_column(column)
        for lease in status.leases[:20]:
            h = lease.holder
            held.add_row(lease.key, str(lease.token), str(lease.ttl_remaining),
                         f"{h.get('host')}:{h.get('pid')} {h.get('actor') or ''}")  # fmt: skip
        parts.append(held)
    return Group(*parts)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document (machine-readable).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")  # fmt: skip
@click.option("--recent", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the latest aborts and skips to show.")  # fmt: skip
def status(as_json: bool, watch: bool, interval: float, recent: int) -> None:
    """Show counts by state, in flight vs capacity, throughput, the oldest active
    migration, the latest aborts and skips, leases held and the gating settings.

    Throughput is the accepted writes into import_done per minute over the last 1, 5 and
    15 minutes. Repositories of a denied root namespace are never picked; they are
    counted as excluded, not as work left.

    \b
    Examples:
      registry-migrator status
      registry-migrator status --watch --interval 1
      registry-migrator status --json | jq .counts
    """
    config = Config.from_env()
    if as_json and watch:
        raise click.UsageError("--json and --watch do not go together")
    if as_json:
        click.echo(json.dumps(snapshot(config, recent=recent).as_dict()))
        return
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not watch:
        console.print(render(snapshot(config, recent=recent)))
        return
    try:
        with Live(render(snapshot(config, recent=recent)), console=console,
                  refresh_per_second=4, screen=False) as live:  # fmt: skip
            while True:
                time.sleep(interval)
                live.update(render(snapshot(config, recent=recent)))
    except KeyboardInterrupt:
        pass
