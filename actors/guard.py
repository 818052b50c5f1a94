"""``guard_stale_migrations``: the reference's GuardWorker.

Finds active repositories whose last step is older than ``max_step_duration`` — a lost
notification, a worker killed between its claim and its registry call, an import that
hangs — and reconciles each with the registry's status, under its lease.
"""

from __future__ import annotations

from collections import Counter

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage

from actors.config import CONFIG
from actors.enqueuer import frees_capacity, trigger_enqueue
from actors.runtime import get_runtime
from leases import HolderInfo, try_acquire
from migration.keys import repository_lease_key
from migration.migrator import Writer

log = structlog.get_logger(__name__)

ACTOR = "guard_stale_migrations"
BATCH = 100


@dramatiq.actor(actor_name=ACTOR, queue_name=CONFIG.queue_name, max_retries=0)
def guard_stale_migrations() -> None:
    """Reconcile every stale migration with the registry (at most 100 a run)."""
    runtime = get_runtime()
    settings = runtime.store.settings()
    stale = runtime.store.stale(settings, limit=BATCH)
    message = CurrentMessage.get_current_message()
    message_id = message.message_id if message is not None else None
    outcomes: Counter[str] = Counter()
    freed = 0  # steps out of the active states: only they let a run start another
    ids: dict[str, list[int]] = {}
    session = runtime.session() if stale else None
    for repository in stale:
        assert session is not None
        key = repository_lease_key(runtime.config.etcd_prefix, repository.id)
        acquisition = try_acquire(
            session, key, holder=HolderInfo(actor=ACTOR, message_id=message_id)
        )
        if acquisition.hold is None:
            outcome = "lease_already_taken"
        else:
            with acquisition.hold as hold:
                current = runtime.store.get(repository.id)
                assert current is not None
                report = runtime.migrator.reconcile_stale(
                    current, settings, Writer(token=hold.token, actor=ACTOR, message_id=message_id)
                )
            outcome = report.outcome.value
            freed += frees_capacity(report)
            log.info(
                "stale_migration_reconciled",
                container_repository_id=repository.id,
                container_repository_path=repository.path,
                from_state=repository.migration_state.value,
                container_repository_migration_state=report.repository.migration_state.value,
                step_outcome=outcome,
                **report.fields,
            )
        outcomes[outcome] += 1
        ids.setdefault(outcome, []).append(repository.id)
    log.info("guard_stale_migrations", stale_count=len(stale), outcomes=dict(outcomes), ids=ids)
    if freed:
        trigger_enqueue(runtime, source="guard", settings=settings)
