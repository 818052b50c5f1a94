"""The scheduler: publishes periodic enqueues and guard runs; only the elected leader does.

Several replicas may run (Kubernetes runs two); they campaign in one etcd election on
their lease sessions. When the leader dies its candidacy expires with its lease and a
follower leads within TTL + 1 s.
"""

from __future__ import annotations

import threading
import time

import dramatiq
import structlog

from actors.enqueuer import trigger_enqueue
from actors.guard import guard_stale_migrations
from actors.runtime import Runtime
from leases import Election, HolderInfo, LeaseError
from migration import metrics
from migration.keys import scheduler_election_name
from migration.store import StoreError

log = structlog.get_logger(__name__)


class Scheduler:
    """Publishes ``enqueue_next_migration`` every ``enqueue_interval`` and
    ``guard_stale_migrations`` every ``guard_interval`` (live settings) while leading.

    :param runtime: the process runtime.
    :param tick: seconds between checks of leadership and the clock.
    """

    def __init__(self, runtime: Runtime, *, tick: float = 0.25) -> None:
        self.runtime = runtime
        self.tick = tick
        self.leading = False
        self.published = {"enqueue": 0, "guard": 0}
        self._election: Election | None = None

    def _current_election(self) -> Election:
        session = self.runtime.session()  # a new one after a loss: campaign again with it
        if self._election is None or self._election.session is not session:
            self._election = Election(
                session,
                scheduler_election_name(self.runtime.config.etcd_prefix),
                holder=HolderInfo(actor="scheduler"),
            )
        return self._election

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; resign the leadership on the way out."""
        next_enqueue = next_guard = 0.0
        backoff = self.tick
        while not stop.is_set():
            try:
                leading = self._current_election().is_leader()
                if leading != self.leading:
                    log.info("scheduler_leadership", leading=leading)
                    self.leading = leading
                metrics.SCHEDULER_LEADER.set(1 if leading else 0)
                if leading:
                    now = time.monotonic()
                    if now >= next_enqueue or now >= next_guard:
                        settings = self.runtime.store.settings()
                        if now >= next_enqueue:
                            trigger_enqueue(self.runtime, source="scheduler", settings=settings)
                            self.published["enqueue"] += 1
                            metrics.SCHEDULER_PUBLISHED.labels("enqueue").inc()
                            next_enqueue = now + settings.enqueue_interval
                        if now >= next_guard:
                            guard_stale_migrations.send()
                            self.published["guard"] += 1
                            metrics.SCHEDULER_PUBLISHED.labels("guard").inc()
                            next_guard = now + settings.guard_interval
                backoff = self.tick
            except (StoreError, LeaseError, OSError) as error:
                log.warning("scheduler_step_failed", error=str(error), retry_in_s=round(backoff, 2))
                self.leading = False
                metrics.SCHEDULER_LEADER.set(0)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception as error:  # e.g. the broker is down: keep the loop alive
                log.warning(
                    "scheduler_publish_failed",
                    # Say which server, as the other servers' errors do.
                    server="rabbitmq"
                    if isinstance(error, dramatiq.errors.ConnectionError)
                    else None,
                    error=str(error),
                    retry_in_s=round(backoff, 2),
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            stop.wait(self.tick)
        if self._election is not None:
            self._election.resign()
        metrics.SCHEDULER_LEADER.set(0)
