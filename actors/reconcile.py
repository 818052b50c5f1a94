"""Reconcile a repository with the registry, under its lease.

Two callers: the guard (a repository that has not moved for ``max_step_duration``) and the
recovery of an interrupted delivery. A worker killed between its claim and its registry
call leaves the repository active with nothing running at the registry, so no
notification will ever come, and the guard would find it only after ``max_step_duration``
(minutes). But RabbitMQ redelivers the message that worker was processing as soon as its
connection drops (at once for a killed process). The redelivered copy looks up the
repositories whose latest write was its own first delivery's, waits for the dead worker's
lease to expire (at most the TTL), and reconciles each with the registry: the repository
moves again within TTL + a poll, as invariant 4 asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from actors.runtime import Runtime
from leases import HolderInfo, acquire_within, try_acquire
from migration import metrics
from migration.keys import repository_lease_key
from migration.migrator import AbortCause, StepOutcome, StepReport, Writer
from migration.settings import Settings
from migration.states import ACTIVE_STATES
from migration.store import Repository

log = structlog.get_logger(__name__)

#: What a reconcile that could not act reports instead of a step outcome.
LEASE_TAKEN = "lease_already_taken"
MOVED_ON = "moved_on"


def reconcile_under_lease(
    runtime: Runtime,
    repository: Repository,
    settings: Settings,
    *,
    actor: str,
    message_id: str | None,
    wait: float = 0.0,
    mismatch_cause: AbortCause = AbortCause.REGISTRY_STATE_MISMATCH,
) -> StepReport | str:
    """Take the repository's lease and reconcile it with the registry's status.

    :param repository: the repository as the caller found it (re-read under the lease).
    :param settings: the migration settings (timeouts, max_retries).
    :param actor: who writes, for the lease's holder and the events log.
    :param message_id: the message being processed.
    :param wait: seconds to wait for a busy lease (0: one try).
    :param mismatch_cause: the abort cause when the registry's status contradicts ours.
    :returns: the step's report, or :data:`LEASE_TAKEN` / :data:`MOVED_ON` (no longer
        active) when there was nothing to do.
    """
    key = repository_lease_key(runtime.config.etcd_prefix, repository.id)
    holder = HolderInfo(actor=actor, message_id=message_id)
    session = runtime.session()
    acquisition = (
        acquire_within(session, key, timeout=wait, holder=holder)
        if wait > 0
        else try_acquire(session, key, holder=holder)
    )
    metrics.count_lease_acquisition(actor=actor, taken=acquisition.hold is not None)
    if acquisition.hold is None:
        return LEASE_TAKEN
    with acquisition.hold as hold:
        current = runtime.store.get(repository.id)
        if current is None or current.migration_state not in ACTIVE_STATES:
            return MOVED_ON
        return runtime.migrator.reconcile_stale(
            current,
            settings,
            Writer(token=hold.token, actor=actor, message_id=message_id, lease=hold),
            mismatch_cause=mismatch_cause,
        )


def outcome_of(result: StepReport | str) -> str:
    """The outcome name of a :func:`reconcile_under_lease` result, for logs and counts."""
    return result if isinstance(result, str) else result.outcome.value


def redelivered(message: Any) -> bool:
    """Whether RabbitMQ delivers ``message`` again: its earlier consumer's connection
    dropped before the ack (a killed worker), so that delivery may have run in part."""
    return bool(getattr(message, "redelivered", False))


#: The message option that carries a recovery the registry did not let finish over to the
#: message's retry: a Dramatiq retry is a new delivery, which RabbitMQ does not mark
#: redelivered, and the options are what a retry keeps (as it keeps ``retries``).
RECOVERY_PENDING = "recovery_pending"
#: Reconcile outcomes that left the repository as it was, for a reason that passes.
_NOT_RECONCILED = {StepOutcome.REGISTRY_FAULT, StepOutcome.LEASE_AT_RISK}


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover_interrupted_delivery` did.

    :param freed: slots of the capacity it freed (worth a trigger).
    :param unfinished: repositories left as they were because the registry could not
        answer (or our lease was at risk); the message's retry recovers them first.
    """

    freed: int = 0
    unfinished: int = 0


def recover_interrupted_delivery(runtime: Runtime, message: Any, *, actor: str) -> Recovery:
    """After a redelivery, reconcile what this message's earlier delivery left active.

    Does nothing (no query) for a message delivered the first time. A redelivery whose
    earlier delivery is still running (a connection lost, not a worker) finds the lease
    held and gives up after the wait: that delivery finishes its own step. Until every
    repository is reconciled, the message carries :data:`RECOVERY_PENDING`, so its retries
    recover again (a notification must not be applied to the attempt its own earlier
    delivery claimed: its status is of the attempt before, invariant 7).

    :param message: Dramatiq's current message (RabbitMQ's carries ``redelivered``).
    :param actor: the actor processing it.
    """
    if message is None or not (redelivered(message) or message.options.get(RECOVERY_PENDING)):
        return Recovery()
    # Set before the work: an error raised in it (PostgreSQL, etcd) retries the message too.
    message.options[RECOVERY_PENDING] = True
    recovery = _reconcile_left_by(runtime, str(message.message_id), actor=actor)
    if not recovery.unfinished:
        message.options.pop(RECOVERY_PENDING, None)
    return recovery


def _reconcile_left_by(runtime: Runtime, message_id: str, *, actor: str) -> Recovery:
    """Reconcile each active repository whose latest write was ``message_id``'s."""
    left = runtime.store.active_last_written_by(message_id)
    if not left:
        return Recovery()
    settings = runtime.live_settings.get()
    # A killed holder's key is gone within the TTL of its last keep-alive; one more second
    # covers etcd's expiry sweep.
    wait = runtime.config.lease_ttl + 1.0
    freed = unfinished = 0
    for repository in left:
        result = reconcile_under_lease(
            runtime, repository, settings, actor=actor, message_id=message_id, wait=wait,
            mismatch_cause=AbortCause.INTERRUPTED,
        )  # fmt: skip
        fields = result.fields if not isinstance(result, str) else {}
        log.warning(
            "interrupted_step_reconciled",
            container_repository_id=repository.id,
            container_repository_path=repository.path,
            from_state=repository.migration_state.value,
            step_outcome=outcome_of(result),
            **fields,
        )
        if isinstance(result, str):
            continue
        freed += result.frees_capacity
        unfinished += result.outcome in _NOT_RECONCILED
    return Recovery(freed=freed, unfinished=unfinished)
