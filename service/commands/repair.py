"""Operator repair of one repository, and one guard pass now: never SQL by hand.

``registry-migrator repositories abort|skip|retry|cancel ID|PATH`` and ``registry-migrator
guard``. Each action takes the repository's lease first (waiting up to the lease TTL + 1 s
for a holder that may be gone, else naming the holder), writes fenced by the lease's token,
and records an event with actor ``operator``; ``--dry-run`` says what it would do and does
nothing (no lease, no registry call, no write).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from migration.config import Config

if TYPE_CHECKING:
    from actors.runtime import Runtime
    from leases import Hold
    from migration.migrator import StepReport, Writer
    from migration.store import Repository

ACTOR = "operator"


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"registry-migrator: {message}", err=True)
    sys.exit(status)


def _runtime() -> Runtime:
    from actors.runtime import Runtime
    from leases import LeaseError
    from migration.logging import configure as configure_logging
    from migration.store import StoreError

    config = Config.from_env()
    # A command's output is its lines; the process's own log says only what went wrong
    # (warnings: a refused write, a registry fault), unless asked for more.
    configure_logging(config.log_level if config.log_level == "debug" else "warning")
    try:
        return Runtime(config, pool_size=2)
    except (StoreError, LeaseError) as error:
        _fail(str(error))
        raise  # unreachable: _fail exits


def _find(runtime: Runtime, ident: str) -> Repository:
    repository = (
        runtime.store.get(int(ident)) if ident.isdigit() else runtime.store.get_by_path(ident)
    )
    if repository is None:
        _fail(f"no repository {ident!r} (give its id or its path)", 2)
    assert repository is not None
    return repository


def _under_lease(
    ident: str,
    *,
    allowed: Callable[[Repository], str | None],
    plan: str,
    dry_run: bool,
    act: Callable[[Runtime, Repository, Hold], StepReport | str],
) -> None:
    """Find the repository, check ``allowed`` (a refusal line, or None), then ``act`` on it
    under its lease; print what was (or would be) done."""
    from leases import HolderInfo, LeaseError, acquire_within
    from migration.keys import repository_lease_key

    runtime = _runtime()
    try:
        repository = _find(runtime, ident)
        refusal = allowed(repository)
        if refusal is not None:
            _fail(f"{repository.path} (id {repository.id}) is {repository.migration_state}: "
                  f"{refusal}", 2)  # fmt: skip
        if dry_run:
            click.echo(f"would {plan} {repository.path} (id {repository.id}, "
                       f"{repository.migration_state}); nothing done (--dry-run)")  # fmt: skip
            return
        key = repository_lease_key(runtime.config.etcd_prefix, repository.id)
        wait = runtime.config.lease_ttl + 1.0
        try:
            acquisition = acquire_within(
                runtime.session(), key, timeout=wait, holder=HolderInfo(actor=ACTOR)
            )
        except LeaseError as error:
            _fail(f"etcd: {error}")
        if acquisition.hold is None:
            holder = acquisition.holder.describe() if acquisition.holder else "someone"
            _fail(f"the lease of {repository.path} is held by {holder} (waited {wait:g} s);"
                  " try again, or `registry-migrator leases release "
                  f"{repository.id}` if that holder is stuck")  # fmt: skip
        assert acquisition.hold is not None
        with acquisition.hold as hold:
            current = runtime.store.get(repository.id)
            assert current is not None
            refusal = allowed(current)
            if refusal is not None:
                _fail(f"{current.path} moved on to {current.migration_state}: {refusal}", 2)
            result = act(runtime, current, hold)
        if isinstance(result, str):
            click.echo(result)
            return
        after = result.repository
        line = (f"{plan}: {after.path} (id {after.id}) is now {after.migration_state}"
                f" [{result.outcome}] (token {hold.token})")  # fmt: skip
        if result.outcome.value in ("refused", "lease_at_risk"):
            _fail(f"{line}; nothing changed: {result.fields}")
        click.echo(line)
    finally:
        runtime.close()


def _writer(hold: Hold) -> Writer:
    from migration.migrator import Writer

    return Writer(token=hold.token, actor=ACTOR, message_id=None, lease=hold)


def _active_only(repository: Repository) -> str | None:
    from migration.states import ACTIVE_STATES

    if repository.migration_state in ACTIVE_STATES:
        return None
    return "only an active migration (pre_importing, pre_import_done, importing) can be aborted"


@click.command()
@click.argument("ident", metavar="ID|PATH")
@click.option("--why", default="", help="A note kept in the events log.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; do nothing.")
def abort(ident: str, why: str, dry_run: bool) -> None:
    """Abort an active migration, as the guard does (a retry is charged).

    At max_retries it is skipped too_many_retries. It does not ask the registry to stop
    the import: see cancel.

    \b
    Example:
      registry-migrator repositories abort group/project/app --why "stuck since Monday"
    """

    def act(runtime: Runtime, repository: Repository, hold: Hold) -> StepReport:
        from migration.migrator import AbortCause

        note = f"operator: {why}" if why else "operator: aborted by hand"
        return runtime.migrator.abort(repository, _writer(hold), note, AbortCause.OPERATOR)

    _under_lease(ident, allowed=_active_only, plan="abort", dry_run=dry_run, act=act)


@click.command()
@click.argument("ident", metavar="ID|PATH")
@click.option("--reason", "reason_name", required=True, metavar="REASON",
              help="too_many_tags, too_many_retries, not_found, native_import, "
                   "migration_canceled or root_namespace_in_deny_list.")  # fmt: skip
@click.option("--why", default="", help="A note kept in the events log.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; do nothing.")
def skip(ident: str, reason_name: str, why: str, dry_run: bool) -> None:
    """Skip a repository for good, with a reason (any state but done or skipped).

    \b
    Example:
      registry-migrator repositories skip 42 --reason migration_canceled --why "owner asked"
    """
    from migration.states import TERMINAL_STATES, SkipReason

    try:
        reason = SkipReason(reason_name)
    except ValueError:
        known = ", ".join(r.value for r in SkipReason)
        _fail(f"--reason: {reason_name!r} is not a skip reason (known: {known})", 2)

    def allowed(repository: Repository) -> str | None:
        if repository.migration_state in TERMINAL_STATES:
            return "its migration has ended already"
        return None

    def act(runtime: Runtime, repository: Repository, hold: Hold) -> StepReport:
        return runtime.migrator.skip(repository, _writer(hold), reason, f"operator: {why}")

    _under_lease(ident, allowed=allowed, plan=f"skip ({reason})", dry_run=dry_run, act=act)


@click.command()
@click.argument("ident", metavar="ID|PATH")
@click.option("--dry-run", is_flag=True, help="Say what would be done; do nothing.")
def retry(ident: str, dry_run: bool) -> None:
    """Put an aborted or waiting repository first in line now, and send one run.

    It also leaves any registry backoff. Skipped ones: `repositories requeue`.

    \b
    Example:
      registry-migrator repositories retry group/project/app
    """
    from migration.states import STARTABLE_STATES

    def allowed(repository: Repository) -> str | None:
        if repository.migration_state in STARTABLE_STATES:
            return None
        return "only an aborted or waiting repository is retried (skipped: use requeue)"

    def act(runtime: Runtime, repository: Repository, hold: Hold) -> str:
        moved = runtime.store.to_front(
            repository.id, token=hold.token, actor=ACTOR, why="operator: retry now"
        )
        if moved is None:
            _fail(f"{repository.path}: refused (it moved on, or a newer holder wrote it)")
        from service.commands.run import send_one_run

        try:
            sent = send_one_run(runtime.config)
        except Exception as error:  # the scheduler's next period picks it up anyway
            return f"retry: {repository.path} is first in line (no run sent now: {error})"
        return (f"retry: {repository.path} (id {repository.id}) is first in line; "
                + ("one run sent" if sent else "runs are already waiting"))  # fmt: skip

    _under_lease(ident, allowed=allowed, plan="retry", dry_run=dry_run, act=act)


@click.command()
@click.argument("ident", metavar="ID|PATH")
@click.option("--dry-run", is_flag=True, help="Say what would be done; do nothing.")
def cancel(ident: str, dry_run: bool) -> None:
    """Ask the registry to cancel a running (pre-)import, then abort the repository.

    When the registry cannot be reached nothing is aborted (exit 1): try again later.

    \b
    Example:
      registry-migrator repositories cancel 42
    """

    def act(runtime: Runtime, repository: Repository, hold: Hold) -> StepReport:
        from migration.migrator import AbortCause
        from migration.registry import FaultClass

        writer = _writer(hold)
        answer = runtime.registry.cancel(repository.path, fence=writer.fence)
        if answer.fault_class is FaultClass.REGISTRY:
            _fail(f"the registry did not take the cancel ({answer.error_kind}: {answer.detail});"
                  " nothing aborted")  # fmt: skip
        why = f"operator: canceled at the registry ({answer.outcome})"
        return runtime.migrator.abort(repository, writer, why, AbortCause.OPERATOR)

    _under_lease(ident, allowed=_active_only, plan="cancel and abort", dry_run=dry_run, act=act)


@click.command()
@click.option("--dry-run", is_flag=True, help="List the stale migrations; touch nothing.")
def guard(dry_run: bool) -> None:
    """Run one pass of the stale-migration guard now and print what it did.

    Each active repository whose last step is older than max_step_duration is reconciled
    with the registry under its lease, as the scheduler's periodic guard does.

    \b
    Example:
      registry-migrator guard --dry-run
    """
    from actors.guard import guard_pass

    runtime = _runtime()
    try:
        done, freed = guard_pass(runtime, actor=ACTOR, message_id=None, dry_run=dry_run)
    finally:
        runtime.close()
    if not done:
        click.echo("no stale migration")
        return
    for item in done:
        repository = item.repository
        note = item.fields.get("why") or item.fields.get("abort_reason") or ""
        click.echo(f"{repository.path} (id {repository.id}): {repository.migration_state} -> "
                   f"{item.state_after} [{item.outcome}] {note}".rstrip())  # fmt: skip
    click.echo(f"{len(done)} stale; {freed} freed a slot" + (" (--dry-run)" if dry_run else ""))
