"""``guard_stale_migrations``: the reference's GuardWorker.

Finds active repositories whose last step is older than ``max_step_duration`` — a lost
notification, an import that hangs, a worker killed between its claim and its registry call
whose message was not redelivered (a node lost without closing its connection: RabbitMQ
redelivers only after the heartbeat timeout) — and reconciles each with the registry's
status, under its lease. A killed worker's message is usually redelivered at once and
reconciles its repository itself (``actors.reconcile``); the guard is the net under that.
"""

from __future__ import annotations

from collections import Counter

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage

from actors.config import CONFIG
from actors.enqueuer import trigger_enqueue
from actors.reconcile import outcome_of, reconcile_under_lease
from actors.runtime import get_runtime

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
    for repository in stale:
        result = reconcile_under_lease(
            runtime, repository, settings, actor=ACTOR, message_id=message_id
        )
        outcome = outcome_of(result)
        if not isinstance(result, str):
            freed += result.frees_capacity
            log.info(
                "stale_migration_reconciled",
                container_repository_id=repository.id,
                container_repository_path=repository.path,
                from_state=repository.migration_state.value,
                container_repository_migration_state=result.repository.migration_state.value,
                step_outcome=outcome,
                **result.fields,
            )
        outcomes[outcome] += 1
        ids.setdefault(outcome, []).append(repository.id)
    log.info("guard_stale_migrations", stale_count=len(stale), outcomes=dict(outcomes), ids=ids)
    if freed:
        trigger_enqueue(runtime, source="guard", settings=settings)
