"""``handle_registry_notification``: apply what the registry reports, under the lease."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage

from actors.config import CONFIG
from actors.enqueuer import run_in_place
from actors.later import REGISTRY_RETRIES, TryLater
from actors.reconcile import recover_interrupted_delivery, redelivered
from actors.runtime import Runtime, get_runtime
from leases import HolderInfo, LeaseError, try_acquire
from migration import metrics
from migration.keys import repository_lease_key
from migration.migrator import RegistryUnavailable, StepOutcome, StepReport, Writer
from migration.registry import RegistryImportStatus
from migration.states import ACTIVE_STATES
from migration.store import Seen, StoreUnavailable

log = structlog.get_logger(__name__)

ACTOR = "handle_registry_notification"


#: Seconds before a notification that met a busy lease is tried again the first time;
#: doubled for each retry it has had, up to a second.
BUSY_FIRST_WAIT = 0.1


class LeaseBusy(dramatiq.Retry):
    """The repository's lease is held (the enqueuer is still finishing it): retry soon, with
    no traceback (a busy lease is normal).

    :param why: one line, logged by Dramatiq's retry message.
    :param after: seconds the holder's lease has left (etcd's time-to-live).
    :param retries: the retries the notification has had (Dramatiq's count, any cause).
    """

    def __init__(self, why: str, *, after: float, retries: int = 0) -> None:
        # The usual holder is the run that started this very phase, still between the
        # registry's answer and its release when the registry, done, notifies: it lets go
        # within a fraction of a second. So the first retry comes after 0.1 s, then 0.2,
        # 0.4, 0.8, then every second. A flat second cost a fast migration a second in
        # flight per busy meeting (bench/throughput.py, start-bound). A dead holder is
        # indistinguishable until its lease runs out: the recovery bound (TTL + 1 s) holds,
        # at most a second between tries, sooner when the lease ends sooner. Jittered, so
        # retries of many notifications do not come back together.
        backoff = BUSY_FIRST_WAIT * 2 ** min(max(retries, 0), 10)
        wait = min(max(after, 0.05), backoff, 1.0) * (0.75 + random.random() / 2)
        super().__init__(why, delay=int(wait * 1000))


def _delivered_before(message: Any) -> bool:
    """Whether an earlier delivery of this message may have run: a Dramatiq retry, or a
    RabbitMQ redelivery (its consumer's connection dropped before the ack)."""
    if message is None:
        return False
    return redelivered(message) or bool(message.options.get("retries", 0))


def _retry_when(retries: int, exception: BaseException) -> bool:
    # A busy lease is normal and short: retry it for a long while (a crashed holder's
    # lease takes up to the TTL to expire; 240 retries, all but the first four 0.75-1.25 s
    # apart, cover two minutes at least). A registry that cannot answer is not the
    # notification's fault either: retry it as long as an outage may last (invariant 7).
    # Anything else: a few times.
    if isinstance(exception, TryLater):
        return retries < REGISTRY_RETRIES
    return retries < (240 if isinstance(exception, LeaseBusy) else 5)


@dramatiq.actor(
    actor_name=ACTOR,
    queue_name=CONFIG.queue_name,
    retry_when=_retry_when,
    min_backoff=100,
    # At most 1 s between tries (Dramatiq waits half to all of it): once a crashed
    # holder's lease expires the notification is applied within a second, so the
    # repository moves again within TTL + 1 s (bench/recovery.py measured up to 2 s late
    # with 2 s).
    max_backoff=1_000,
)
def handle_registry_notification(
    path: str,
    status: str,
    detail: str = "",
    *,
    repository_id: int | None = None,
    seen: dict[str, Any] | None = None,
) -> None:
    """Step the repository at ``path`` by the registry's ``status``; when the step freed a
    slot of the capacity, do the enqueuer run that fills it.

    :param path: the repository path the registry reported on.
    :param status: pre_import_complete, import_complete, or a *_failed / *_canceled.
    :param detail: the registry's detail text, kept in the events log.
    :param repository_id: the repository's id as the API found it for ``path`` (saves the
        lookup here); checked against the row read under the lease, and looked up by
        ``path`` when it names no row or another one. None: looked up by ``path``.
    :param seen: the row's columns as the API read them (``Seen.as_message``): when the
        row under the lease still has them, the step is written in the round trip that
        reads it. None, or not such columns: the row is read, then stepped.
    """
    try:
        _handle(path, status, detail, repository_id, seen)
    except (LeaseError, StoreUnavailable) as error:
        # etcd or PostgreSQL is down: like a registry that cannot answer, no fault of the
        # notification's. Retry it as long (not 5 times, then a dead letter).
        log.warning("notification_deferred", container_repository_path=path, why=str(error))
        raise TryLater(f"{type(error).__name__}: {error}", after=2.0) from None


def _handle(
    path: str, status: str, detail: str, repository_id: int | None, seen: dict[str, Any] | None
) -> None:
    # ``notified_status``: what the notification says; a step's own fields may carry the
    # registry's current ``registry_status`` (a stale notification), a key of its own.
    fields: dict[str, Any] = {"container_repository_path": path, "notified_status": status}
    # The detail goes into the events log; PostgreSQL text and JSON cannot hold NUL, and the
    # step must not fail (and the notification be lost) over free text.
    detail = detail.replace("\x00", "\\0")
    try:
        registry_status = RegistryImportStatus(status)
    except ValueError:
        log.error("notification_dropped", reason="unknown status", **fields)
        return
    runtime = get_runtime()
    looked_up = repository_id is None
    if repository_id is None:
        found = runtime.store.get_by_path(path)
        if found is None:
            log.error("notification_dropped", reason="unknown repository", **fields)
            return
        repository_id = found.id
    message = CurrentMessage.get_current_message()
    message_id = message.message_id if message is not None else None
    retries = int(message.options.get("retries", 0)) if message is not None else 0
    recovery = recover_interrupted_delivery(runtime, message, actor=ACTOR)
    if recovery.unfinished:
        # What our earlier delivery claimed is not reconciled yet: our status is of the
        # attempt before that claim, and must not be applied to it (invariant 7).
        log.info("notification_deferred", why="interrupted delivery not reconciled", **fields)
        if recovery.freed:
            run_in_place(runtime, source="notification")
        raise TryLater("the earlier delivery's claims are not reconciled yet", after=2.0)
    breaker = runtime.registry_health.admit(runtime.live_settings.get())
    if breaker is not None:
        # Nothing to confirm the notification with: wait out the window (invariant 7).
        log.info("notification_deferred", why="registry breaker open", **fields)
        raise TryLater(
            f"registry breaker open: {breaker.reason}", after=max(breaker.remaining, 2.0)
        )

    as_seen = Seen.from_message(seen) if seen is not None else None
    if seen is not None and as_seen is None:
        log.warning("notification_seen_ignored", why="not a row's columns", **fields)

    def step(repository_id: int, as_seen: Seen | None = None) -> tuple[StepReport, int] | None:
        return _step_under_lease(
            runtime, repository_id, path=path, registry_status=registry_status,
            detail=detail, message_id=message_id, fields=fields,
            retries=retries, seen=as_seen,
        )  # fmt: skip

    stepped = step(repository_id, as_seen)
    if stepped is None and not looked_up:
        # The id the API sent names no row, or another path's: look the path up instead.
        log.warning("notification_repository_id_stale", container_repository_id=repository_id,
                    **fields)  # fmt: skip
        found = runtime.store.get_by_path(path)
        if found is not None:
            repository_id = found.id
            stepped = step(repository_id)
    if stepped is None:  # no row for the path, or it went between the lookup and the lease
        log.error("notification_dropped", reason="unknown repository", **fields)
        return
    report, token = stepped
    # Only a step out of the active states frees capacity; the run of a trigger after, say,
    # pre_import_complete -> final import started would find nothing more to do than before.
    # A second delivery of this message finds its step done (IGNORED) when the first one
    # committed it and then failed to trigger (RabbitMQ down): it triggers in its place.
    freed = (
        report.frees_capacity
        or recovery.freed > 0
        or (
            _delivered_before(message)
            and report.outcome is StepOutcome.IGNORED
            and report.repository.migration_state not in ACTIVE_STATES
        )
    )
    log.info(
        "registry_notification_handled",
        container_repository_id=repository_id,
        container_repository_migration_state=report.repository.migration_state.value,
        step_outcome=report.outcome.value,
        fencing_token=token,
        freed_capacity=freed,
        **{**report.fields, **fields},
    )
    if freed:
        # The run this step makes room for, done here rather than sent: one message per
        # repository fewer (bench/pipeline.py); it reads the in-flight count after our commit.
        run_in_place(runtime, source="notification")
    if report.outcome is StepOutcome.LEASE_AT_RISK:
        raise TryLater(f"not applied: {report.fields.get('why', '')}", after=1.0)
    if report.outcome is StepOutcome.REGISTRY_FAULT:
        # pre_import_complete applied, but the registry failed the final import's start:
        # the claim is undone (pre_import_done); this notification, retried, starts it.
        raise TryLater(
            f"final import of {path} not started: {report.fields.get('registry_error', '')}",
            after=2.0,
        )


def _step_under_lease(
    runtime: Runtime,
    repository_id: int,
    *,
    path: str,
    registry_status: RegistryImportStatus,
    detail: str,
    message_id: str | None,
    fields: dict[str, Any],
    retries: int,
    seen: Seen | None,
) -> tuple[StepReport, int] | None:
    """Under the repository's lease, apply ``registry_status`` to its row.

    :param retries: the notification's retries so far (a busy lease's wait grows with them).
    :param seen: the row's columns as the API read them: the step may then be written with
        the read (:meth:`Migrator.on_registry_status_as_seen`).
    :returns: the step's report and the lease's token; None when ``repository_id`` names no
        row, or the row of another path than ``path``.
    :raises LeaseBusy: the lease is held.
    :raises TryLater: the registry could not confirm the status.
    """
    key = repository_lease_key(runtime.config.etcd_prefix, repository_id)
    acquisition = try_acquire(
        runtime.session(), key, holder=HolderInfo(actor=ACTOR, message_id=message_id)
    )
    metrics.count_lease_acquisition(actor=ACTOR, taken=acquisition.hold is not None)
    if acquisition.hold is None:
        holder = acquisition.holder.describe() if acquisition.holder else "someone"
        log.info(
            "notification_lease_busy",
            holder=holder,
            container_repository_id=repository_id,
            **fields,
        )
        left = 1.0
        # A holder in this process lives as long as we do: no need to ask how long it may block.
        if acquisition.holder_lease_id and not acquisition.held_here:
            with contextlib.suppress(LeaseError):
                left = float(runtime.etcd.time_to_live(acquisition.holder_lease_id))
        raise LeaseBusy(
            f"lease of repository {repository_id} held by {holder}", after=left, retries=retries
        )
    with acquisition.hold as hold:
        writer = Writer(token=hold.token, actor=ACTOR, message_id=message_id, lease=hold)
        try:
            if seen is None:
                current = runtime.store.get(repository_id)
            else:
                written, current = runtime.migrator.on_registry_status_as_seen(
                    repository_id, path, seen, registry_status, writer, detail=detail
                )
                if written is not None:
                    return written, hold.token
            if current is None or current.path != path:
                return None
            report = runtime.migrator.on_registry_status(
                current, registry_status, writer, detail=detail
            )
        except RegistryUnavailable as error:
            log.info("notification_deferred", why=str(error), **fields)
            raise TryLater(str(error), after=2.0) from None
    return report, hold.token
