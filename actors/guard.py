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
from dataclasses import dataclass
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage

from actors.config import CONFIG
from actors.enqueuer import trigger_enqueue
from actors.reconcile import LEASE_TAKEN, MOVED_ON, outcome_of, reconcile_under_lease
from actors.runtime import Runtime, get_runtime
from migration.store import Repository

log = structlog.get_logger(__name__)

ACTOR = "guard_stale_migrations"
BATCH = 100


@dataclass(frozen=True)
class Reconciled:
    """What one guard pass did to one stale repository."""

    repository: Repository
    outcome: str
    state_after: str
    fields: dict[str, Any]


def guard_pass(
    runtime: Runtime, *, actor: str, message_id: str | None, dry_run: bool = False
) -> tuple[list[Reconciled], int]:
    """One guard pass: reconcile every stale migration (at most 100) under its lease.

    :param actor: who writes (the actor, or ``operator`` for ``registry-migrator guard``).
    :param dry_run: list the stale repositories only; no lease, no registry call, no write.
    :returns: what became of each, and how many steps freed a slot of the capacity.
    """
    settings = runtime.store.settings()
    stale = runtime.store.stale(settings, limit=BATCH)
    done: list[Reconciled] = []
    freed = 0  # steps out of the active states: only they let a run start another
    for repository in stale:
        if dry_run:
            done.append(Reconciled(repository, "would_reconcile",
                                   repository.migration_state.value, {}))  # fmt: skip
            continue
        result = reconcile_under_lease(
            runtime, repository, settings, actor=actor, message_id=message_id
        )
        if isinstance(result, str):
            done.append(Reconciled(repository, result, repository.migration_state.value, {}))
            continue
        freed += result.frees_capacity
        done.append(
            Reconciled(
                repository,
                outcome_of(result),
                result.repository.migration_state.value,
                dict(result.fields),
            )
        )
    return done, freed


@dramatiq.actor(actor_name=ACTOR, queue_name=CONFIG.queue_name, max_retries=0)
def guard_stale_migrations() -> None:
    """Reconcile every stale migration with the registry (at most 100 a run)."""
    runtime = get_runtime()
    message = CurrentMessage.get_current_message()
    message_id = message.message_id if message is not None else None
    done, freed = guard_pass(runtime, actor=ACTOR, message_id=message_id)
    outcomes: Counter[str] = Counter()
    ids: dict[str, list[int]] = {}
    for item in done:
        if item.outcome not in (LEASE_TAKEN, MOVED_ON):
            log.info(
                "stale_migration_reconciled",
                container_repository_id=item.repository.id,
                container_repository_path=item.repository.path,
                from_state=item.repository.migration_state.value,
                container_repository_migration_state=item.state_after,
                step_outcome=item.outcome,
                **item.fields,
            )
        outcomes[item.outcome] += 1
        ids.setdefault(item.outcome, []).append(item.repository.id)
    log.info("guard_stale_migrations", stale_count=len(done), outcomes=dict(outcomes), ids=ids)
    if freed:
        trigger_enqueue(runtime, source="guard")
