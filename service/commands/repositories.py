"""``registry-migrator repositories``: add, seed, show and requeue container repositories.

The store (psycopg) and the ``leases`` package are imported inside the commands, so
``repositories --help`` loads neither.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import click

from migration.config import Config
from migration.keys import repository_lease_key
from migration.states import REQUEUE_STATES, SkipReason, State
from service.cli import LazyCommand, LazyGroup
from service.commands.db import fail, open_store

if TYPE_CHECKING:
    from migration.store import Repository


#: The operator's repair of one repository (service/commands/repair.py), loaded on use.
REPAIR_COMMANDS = {
    "abort": LazyCommand(
        "service.commands.repair:abort",
        "Abort an active migration, as the guard does (a retry is charged).",
    ),
    "cancel": LazyCommand(
        "service.commands.repair:cancel",
        "Ask the registry to cancel a running (pre-)import, then abort the repository.",
    ),
    "retry": LazyCommand(
        "service.commands.repair:retry",
        "Put an aborted or waiting repository first in line now, and send one run.",
    ),
    "skip": LazyCommand(
        "service.commands.repair:skip",
        "Skip a repository for good, with a reason (any state but done or skipped).",
    ),
}


@click.group(cls=LazyGroup, lazy_commands=REPAIR_COMMANDS)
def repositories() -> None:
    """Add, seed, inspect, repair and requeue the repositories to migrate.

    \b
    Examples:
      registry-migrator repositories add gitlab-org/gitlab/build --tags 120
      registry-migrator repositories seed --count 100000
      registry-migrator repositories show gitlab-org/gitlab/build
      registry-migrator repositories abort gitlab-org/gitlab/build --dry-run
      registry-migrator repositories requeue --state import_skipped \\
          --reason too_many_retries --since 2h --dry-run
    """


def _timestamp(value: str | None, option: str = "--created-at") -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: expected an ISO 8601 timestamp, got {value!r}", 2)
        raise  # unreachable: fail exits
    if moment.tzinfo is None:
        fail(f"{option}: {value!r} has no UTC offset (add Z or +00:00)", 2)
    return moment


_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(value: str | None) -> datetime | None:
    """--since: a duration ago (``90m``, ``2h``, ``1d``) or an ISO 8601 time with offset."""
    if value is None:
        return None
    ago = _AGO.fullmatch(value.strip())
    if ago:
        return datetime.now(UTC) - timedelta(seconds=float(ago[1]) * _UNIT_SECONDS[ago[2]])
    try:
        datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since: expected a duration ago (30m, 2h, 1d) or an ISO 8601 time with "
             f"offset (2026-11-30T09:00:00Z), got {value!r}", 2)  # fmt: skip
    return _timestamp(value, "--since")


@repositories.command()
@click.argument("path")
@click.option("--created-at", help="When it was created (ISO 8601 with offset); default now.")
@click.option("--tags", "tags", type=click.IntRange(min=0), default=0, show_default=True,
              help="How many tags it has.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the new row as JSON.")
def add(path: str, created_at: str | None, tags: int, as_json: bool) -> None:
    """Add repository PATH (root-namespace/.../name) in state default; print its id.

    \b
    Example:
      registry-migrator repositories add acme/api/server --created-at 2021-03-01T00:00:00Z --tags 40
    """
    from migration.store import InvalidRepository

    moment = _timestamp(created_at)
    with open_store() as store:
        try:
            rid = store.add_repository(path, created_at=moment, tags_count=tags)
        except InvalidRepository as error:
            fail(str(error), 2)
        repo = store.get(rid)
    if as_json and repo is not None:
        click.echo(json.dumps(repo.as_dict()))
    else:
        click.echo(rid)


@repositories.command()
@click.option("--count", type=click.IntRange(min=1), required=True, help="How many to add.")
@click.option("--seed", "rng_seed", type=int, default=0, show_default=True,
              help="Random generator seed.")  # fmt: skip
def seed(count: int, rng_seed: int) -> None:
    """Add COUNT generated repositories with a realistic spread (fast: COPY).

    \b
    Example:
      registry-migrator repositories seed --count 1000000
    """
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        if total >= 100_000:
            click.echo(f"  {done:,}/{total:,} ({time.monotonic() - started:.1f} s)", err=True)

    with open_store() as store:
        added = store.seed(count, rng_seed=rng_seed, progress=progress)
    click.echo(f"added {added:,} repositories in {time.monotonic() - started:.1f} s")


def _lease_holder(repository_id: int) -> tuple[dict[str, object] | None, str | None]:
    """The repository's lease key as held now (holder, token, TTL left), or why unknown."""
    from leases import EtcdUnavailable, HolderInfo, LeaseError

    config = Config.from_env()
    key = repository_lease_key(config.etcd_prefix, repository_id)
    try:
        with config.etcd_client(timeout=3.0) as client:
            kv = client.get(key)
            if kv is None:
                return None, None
            ttl = client.time_to_live(kv.lease_id) if kv.lease_id else -1
    except (EtcdUnavailable, LeaseError) as error:
        return None, f"etcd unreachable at {config.etcd_endpoints_text}: {error}"
    holder = HolderInfo.from_json(kv.value)
    return {"key": key, "token": kv.create_revision, "ttl_remaining": ttl,
            "holder": holder.__dict__, "describe": holder.describe()}, None  # fmt: skip


def _find(store_get_id: Repository | None, ident: str) -> Repository:
    if store_get_id is None:
        fail(f"no repository {ident}")
    assert store_get_id is not None
    return store_get_id


@repositories.command()
@click.argument("ident", metavar="ID|PATH")
@click.option("--json", "as_json", is_flag=True, help="Print the row and its events as JSON.")
@click.option("--events", "event_limit", type=click.IntRange(min=0), default=50,
              show_default=True, help="How many of the latest events to show.")  # fmt: skip
def show(ident: str, as_json: bool, event_limit: int) -> None:
    """Show a repository's state, timestamps, retries, event history and lease holder.

    The lease holder is read from etcd (the key <prefix>/leases/container_repository/<id>);
    when etcd is unreachable the rest is shown and the holder is reported unknown.

    \b
    Examples:
      registry-migrator repositories show 42
      registry-migrator repositories show acme/api/server --json
    """
    with open_store() as store:
        repo = _find(store.get(int(ident)) if ident.isdigit() else store.get_by_path(ident), ident)
        events = store.events(repo.id, limit=event_limit)
    lease, lease_error = _lease_holder(repo.id)
    if as_json:
        click.echo(json.dumps({"repository": repo.as_dict(),
                               "events": [e.as_dict() for e in events],
                               "lease": lease, "lease_error": lease_error}))  # fmt: skip
        return
    click.echo(f"repository {repo.id}  {repo.path}")
    click.echo(f"  state            {repo.migration_state}")
    if repo.migration_skipped_reason:
        click.echo(f"  skipped reason   {repo.migration_skipped_reason}")
    click.echo(f"  retries          {repo.migration_retries_count}"
               + (f" (aborted in {repo.migration_aborted_in_state})"
                  if repo.migration_aborted_in_state else ""))  # fmt: skip
    click.echo(f"  starts           pre-import {repo.migration_pre_import_starts},"
               f" final import {repo.migration_import_starts}")  # fmt: skip
    click.echo(f"  tags             {repo.tags_count}")
    if repo.registry_failures:
        due = repo.registry_not_before.isoformat() if repo.registry_not_before else "now"
        click.echo(f"  backing off      {repo.registry_failures} registry fault(s) in a row;"
                   f" not picked before {due}")  # fmt: skip
        click.echo(f"  last registry error {repo.registry_last_error}")
    click.echo(f"  fencing token    {repo.fencing_token}")
    if lease is not None:
        click.echo(f"  lease held by    {lease['describe']} (token {lease['token']}, "
                   f"{lease['ttl_remaining']} s left)")  # fmt: skip
    else:
        click.echo(f"  lease held by    {'unknown: ' + lease_error if lease_error else 'nobody'}")
    for label, value in (
        ("created", repo.created_at),
        ("last step", repo.last_step_at),
        ("pre-import start", repo.migration_pre_import_started_at),
        ("pre-import done", repo.migration_pre_import_done_at),
        ("import start", repo.migration_import_started_at),
        ("import done", repo.migration_import_done_at),
        ("aborted", repo.migration_aborted_at),
        ("skipped", repo.migration_skipped_at),
    ):
        if value is not None:
            click.echo(f"  {label:<16} {value.isoformat()}")
    click.echo(f"  events ({len(events)}{' latest' if len(events) == event_limit else ''}):")
    for e in events:
        mark = "" if e.accepted else f"  REFUSED ({e.detail.get('reason')})"
        click.echo(f"    {e.at.isoformat()}  {e.event:<17} {e.from_state or '-'} -> "
                   f"{e.to_state or '-'}  token {e.token}  {e.actor}{mark}")  # fmt: skip


@repositories.command()
@click.option("--state", "state_name", required=True, metavar="STATE",
              help="Requeue those in this state: import_skipped or import_aborted.")  # fmt: skip
@click.option("--reason", "reason_name", metavar="REASON",
              help="Only those skipped for this reason (needed with import_skipped).")  # fmt: skip
@click.option("--since", "since_text", metavar="TIME",
              help="Only those that arrived in the state since TIME: a duration ago "
              "(30m, 2h, 1d) or an ISO 8601 time with offset.")  # fmt: skip
@click.option("--path-prefix", metavar="P", help="Only paths that start with P.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="At most N, those that arrived in the state first.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="List what would be requeued; change nothing.")
def requeue(
    *,
    state_name: str,
    reason_name: str | None,
    since_text: str | None,
    path_prefix: str | None,
    limit: int | None,
    dry_run: bool,
) -> None:
    """Move skipped or aborted repositories back to default, retries reset.

    The repair after an incident that charged repositories for a fault that was not
    theirs (a registry outage that skipped them too_many_retries): each one goes back to
    default with retries 0 and no skip reason, and gets a `requeue` event (actor
    operator) recording its old state, reason and retries. The next runs migrate it
    again. Active states (a worker may be stepping them) and import_done are refused
    (exit 2). Run with --dry-run first: it lists the repositories and the count.

    \b
    Examples:
      registry-migrator repositories requeue --state import_skipped \\
          --reason too_many_retries --since 2026-11-30T09:00:00Z --dry-run
      registry-migrator repositories requeue --state import_skipped \\
          --reason too_many_retries --since 2h --path-prefix acme/ --limit 500
      registry-migrator repositories requeue --state import_aborted --since 1h
    """
    states = ", ".join(sorted(REQUEUE_STATES))
    if state_name not in {s.value for s in State}:
        fail(f"--state: expected one of {states}, got {state_name!r}", 2)
    state = State(state_name)
    if state not in REQUEUE_STATES:
        why = ("a worker may be stepping it" if state not in (State.DEFAULT, State.IMPORT_DONE)
               else "there is nothing to repair")  # fmt: skip
        fail(f"--state: cannot requeue from {state} ({why}); only from {states}", 2)
    reasons = ", ".join(r.value for r in SkipReason)
    reason: SkipReason | None = None
    if reason_name is not None:
        if reason_name not in {r.value for r in SkipReason}:
            fail(f"--reason: expected one of {reasons}, got {reason_name!r}", 2)
        if state is not State.IMPORT_SKIPPED:
            fail(f"--reason: only with --state {State.IMPORT_SKIPPED}", 2)
        reason = SkipReason(reason_name)
    elif state is State.IMPORT_SKIPPED:
        fail(f"--reason is required with --state {State.IMPORT_SKIPPED} (one of {reasons})", 2)
    since = _since(since_text)
    with open_store() as store:
        rows = store.requeue(state=state, reason=reason, since=since, path_prefix=path_prefix,
                             limit=limit, dry_run=dry_run)  # fmt: skip
    arrived = "skipped at" if state is State.IMPORT_SKIPPED else "aborted at"
    if rows:
        width = max(len(r.path) for r in rows)
        click.echo(f"{'ID':>10}  {'PATH':<{width}}  {'STATE':<14}  {'REASON':<27}  "
                   f"{'RETRIES':>7}  {arrived.upper()}")  # fmt: skip
        for r in rows:
            at = r.migration_skipped_at if state is State.IMPORT_SKIPPED else r.migration_aborted_at
            click.echo(f"{r.id:>10}  {r.path:<{width}}  {r.migration_state:<14}  "
                       f"{r.migration_skipped_reason or '-':<27}  {r.migration_retries_count:>7}  "
                       f"{at.isoformat(timespec='seconds') if at else '-'}")  # fmt: skip
    if dry_run:
        click.echo(f"would requeue {len(rows)} repositories (dry run: nothing changed)")
    else:
        click.echo(f"requeued {len(rows)} repositories to default (retries reset)")
