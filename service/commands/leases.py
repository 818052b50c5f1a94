"""``registry-migrator leases``: inspect, take, hold and release repository leases.

The ``leases`` package (etcd3, gRPC) is imported inside each command, so ``leases --help``
does not load it.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from migration.config import Config
from migration.keys import leases_prefix, repository_lease_key

if TYPE_CHECKING:
    from leases import SpaceReport


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"registry-migrator: {message}", err=True)
    sys.exit(status)


@click.group()
def leases() -> None:
    """Inspect and manage the per-repository etcd leases.

    \b
    Examples:
      registry-migrator leases list
      registry-migrator leases take 42 --ttl 1800   # block repository 42 for 30 minutes
      registry-migrator leases release 42
      registry-migrator leases etcd-space --recover # after a NOSPACE alarm
    """


@leases.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per held key.")
def list_command(as_json: bool) -> None:
    """List held lease keys with their holder and remaining TTL.

    \b
    Example:
      registry-migrator leases list --json
    """
    from leases import EtcdUnavailable, list_held

    config = Config.from_env()
    try:
        with config.etcd_client() as client:
            held = list_held(client, leases_prefix(config.etcd_prefix))
    except EtcdUnavailable as error:
        _fail(f"etcd unreachable at {config.etcd_endpoints_text}: {error}")
    if as_json:
        for item in held:
            click.echo(json.dumps({**asdict(item), "lease_id": f"{item.lease_id:x}"}))
        return
    if not held:
        click.echo("no leases held")
        return
    click.echo(f"{'KEY':<60} {'TOKEN':>8} {'TTL':>5}  HOLDER")
    for item in held:
        click.echo(
            f"{item.key:<60} {item.token:>8} {item.ttl_remaining:>5}  {item.holder.describe()}"
        )


@leases.command("take")
@click.argument("repository_id", type=click.IntRange(min=1), required=False)
@click.option(
    "--ttl",
    type=click.IntRange(min=2),
    default=1800,
    show_default=True,
    help="Seconds the lease lives; nobody keeps it alive.",
)
@click.option(
    "--global",
    "global_key",
    is_flag=True,
    help="Take the one fixed key every run takes under lease_scope=global instead.",
)
def take_command(repository_id: int | None, ttl: int, global_key: bool) -> None:
    """Take a repository's lease for TTL seconds, then exit (the lease stays).

    The reference's "take the lease for 30 minutes": runs that pick this repository log
    lease_already_taken until the TTL runs out or `leases release` frees it. With
    --global, the fixed key of lease_scope=global: every run stops (lease_taken), as the
    reference's runbook does to hold the whole migration. Exits 0 when taken, 1 with the
    holder named when the lease is busy.

    \b
    Examples:
      registry-migrator leases take 42 --ttl 1800
      registry-migrator leases take --global --ttl 1800
    """
    from leases import EtcdUnavailable, HolderInfo, take
    from migration.keys import global_lease_key

    if (repository_id is None) == (not global_key):
        _fail("give a REPOSITORY_ID or --global (one of them)", 2)
    config = Config.from_env()
    key = (
        global_lease_key(config.etcd_prefix)
        if global_key
        else repository_lease_key(config.etcd_prefix, repository_id or 0)
    )
    try:
        with config.etcd_client() as client:
            acquisition = take(client, key, ttl=ttl, holder=HolderInfo(actor="leases take"))
    except EtcdUnavailable as error:
        _fail(f"etcd unreachable at {config.etcd_endpoints_text}: {error}")
    if acquisition.hold is None:
        holder = acquisition.holder.describe() if acquisition.holder else "someone"
        what = "the global lease" if global_key else f"lease of repository {repository_id}"
        _fail(f"{what} is busy: held by {holder}")
    assert acquisition.hold is not None
    click.echo(f"took {key} for {ttl} s (token {acquisition.hold.token})")


@leases.command("hold")
@click.argument("repository_id", type=click.IntRange(min=1))
def hold_command(repository_id: int) -> None:
    """Hold a repository's lease, kept alive, until interrupted (Ctrl-C or SIGTERM).

    The lease is revoked on exit, so the repository is free again at once; if this
    process is killed, the lease expires after MIGRATOR_LEASE_TTL seconds.

    \b
    Example:
      registry-migrator leases hold 42
    """
    from leases import HolderInfo, LeaseError, Session, try_acquire

    config = Config.from_env()
    key = repository_lease_key(config.etcd_prefix, repository_id)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with config.etcd_client() as client, Session(client, ttl=config.lease_ttl) as session:
            acquisition = try_acquire(session, key, holder=HolderInfo(actor="leases hold"))
            if acquisition.hold is None:
                holder = acquisition.holder.describe() if acquisition.holder else "someone"
                _fail(f"lease of repository {repository_id} is busy: held by {holder}")
            assert acquisition.hold is not None
            click.echo(
                f"holding {key} (token {acquisition.hold.token}); Ctrl-C to release", err=True
            )
            click.echo(acquisition.hold.token)
            sys.stdout.flush()
            while not stop.wait(0.5):
                if session.lost:
                    _fail(f"lost the lease of repository {repository_id}: {session.lost_reason}")
            acquisition.hold.release()
            click.echo(f"released {key}", err=True)
    except LeaseError as error:
        _fail(f"etcd: {error}")


@leases.command("release")
@click.argument("repository_id", type=click.IntRange(min=1))
def release_command(repository_id: int) -> None:
    """Release a repository's lease, whoever holds it.

    The holder's next fenced write is refused, so releasing a live worker's lease is
    safe but wastes its step. Exits 0 when a lease was released, 1 when none was held.

    \b
    Example:
      registry-migrator leases release 42
    """
    from leases import EtcdUnavailable, release

    config = Config.from_env()
    key = repository_lease_key(config.etcd_prefix, repository_id)
    try:
        with config.etcd_client() as client:
            released = release(client, key)
    except EtcdUnavailable as error:
        _fail(f"etcd unreachable at {config.etcd_endpoints_text}: {error}")
    if not released:
        _fail(f"no lease held for repository {repository_id}")
    click.echo(f"released {key}")


def _space_lines(report: SpaceReport) -> list[str]:
    lines = [f"{'MEMBER':<22} {'DB BYTES':>12} {'IN USE':>12} {'REVISION':>10}"]
    for member in report.members:
        status = member.status
        lines.append(
            f"{member.endpoint:<22} {status.db_size:>12} {status.db_size_in_use:>12}"
            f" {status.revision:>10}"
        )
    alarms = ", ".join(f"{name} on {member:x}" for member, name in report.alarms) or "none"
    lines.append(f"alarms: {alarms}")
    return lines


@leases.command("etcd-space")
@click.option(
    "--recover",
    is_flag=True,
    help="Compact the history, defragment each member, disarm the NOSPACE alarm.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def etcd_space_command(recover: bool, as_json: bool) -> None:
    """Show etcd's database size per member and its alarms; --recover gives space back.

    Every hold, release and gate marker adds etcd history. An etcd run with
    auto-compaction keeps it bounded; one without it grows until --quota-backend-bytes,
    raises the NOSPACE alarm and refuses every lease write (the migration stops, nothing
    is charged). --recover compacts at the current revision, defragments the members one
    after another and disarms the alarm; the migration then goes on by itself. Safe while
    it runs. Exits 1 when etcd cannot be reached, or (without --recover) when the NOSPACE
    alarm is raised.

    \b
    Examples:
      registry-migrator leases etcd-space
      registry-migrator leases etcd-space --recover
    """
    from leases import EtcdUnavailable, recover_space, space_report

    config = Config.from_env()
    try:
        with config.etcd_client(timeout=10) as client:
            if recover:
                done = recover_space(client)
                report = done.after
            else:
                report = space_report(client)
    except EtcdUnavailable as error:
        _fail(f"etcd unreachable at {config.etcd_endpoints_text}: {error}")
    if as_json:
        body: dict[str, object] = {
            "members": [{"endpoint": m.endpoint, **asdict(m.status)} for m in report.members],
            "alarms": [{"member_id": f"{m:x}", "alarm": a} for m, a in report.alarms],
        }
        if recover:
            body["recovered"] = {
                "compacted_at": done.revision,
                "db_bytes_before": [m.status.db_size for m in done.before.members],
                "disarmed": done.disarmed,
            }
        click.echo(json.dumps(body))
    else:
        if recover:
            before = ", ".join(str(m.status.db_size) for m in done.before.members)
            click.echo(
                f"compacted at revision {done.revision}, defragmented"
                f" {len(report.members)} member(s) (db bytes before: {before}),"
                f" disarmed {done.disarmed} NOSPACE alarm(s)"
            )
        for line in _space_lines(report):
            click.echo(line)
    if report.nospace and not recover:
        sys.exit(1)
