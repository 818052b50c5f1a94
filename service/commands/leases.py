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

import click

from migration.config import Config
from migration.keys import leases_prefix, repository_lease_key


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
@click.argument("repository_id", type=click.IntRange(min=1))
@click.option(
    "--ttl",
    type=click.IntRange(min=2),
    default=1800,
    show_default=True,
    help="Seconds the lease lives; nobody keeps it alive.",
)
def take_command(repository_id: int, ttl: int) -> None:
    """Take a repository's lease for TTL seconds, then exit (the lease stays).

    The reference's "take the lease for 30 minutes": runs that pick this repository log
    lease_already_taken until the TTL runs out or `leases release` frees it. Exits 0 when
    taken, 1 with the holder named when the lease is busy.

    \b
    Example:
      registry-migrator leases take 42 --ttl 1800
    """
    from leases import EtcdUnavailable, HolderInfo, take

    config = Config.from_env()
    key = repository_lease_key(config.etcd_prefix, repository_id)
    try:
        with config.etcd_client() as client:
            acquisition = take(client, key, ttl=ttl, holder=HolderInfo(actor="leases take"))
    except EtcdUnavailable as error:
        _fail(f"etcd unreachable at {config.etcd_endpoints_text}: {error}")
    if acquisition.hold is None:
        holder = acquisition.holder.describe() if acquisition.holder else "someone"
        _fail(f"lease of repository {repository_id} is busy: held by {holder}")
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
