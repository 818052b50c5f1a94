"""The scheduler: publishes periodic enqueues and guard runs; only the elected leader does.

Several replicas may run (Kubernetes runs two); they campaign in one etcd election on
their lease sessions. When the leader dies its candidacy expires with its lease and a
follower leads within TTL + 1 s.
"""

from __future__ import annotations

import contextlib
import threading
import time

import dramatiq
import structlog
import tenacity

from actors.enqueuer import trigger_enqueue
from actors.guard import guard_stale_migrations
from actors.runtime import Runtime
from leases import Election, HolderInfo, LeaseError
from migration import metrics, retrying
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
        self._next_enqueue = self._next_guard = 0.0  # monotonic times the next runs are due

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
        """Loop until ``stop`` is set; resign the leadership on the way out.

        A step that fails (a server down) is tried again with the project's backoff
        (:mod:`migration.retrying`: from one to two ticks, doubling up to 5 s), one warning
        line per failure naming what failed; the first success starts the backoff over.
        """
        step = retrying.policy(
            initial=2 * self.tick, maximum=5.0, stop_event=stop, before_sleep=self._failed
        )
        while not stop.is_set():
            # An exception here is a failure after stop was set: the loop ends, no retry.
            with contextlib.suppress(Exception):
                step(self._step)
                stop.wait(self.tick)
        if self._election is not None:
            self._election.resign()
        metrics.SCHEDULER_LEADER.set(0)

    def _step(self) -> None:
        """Look at the leadership; while leading, publish what is due."""
        try:
            self._lead()
        except (StoreError, LeaseError, OSError):
            # A server this replica needs failed: it does not lead until a step succeeds.
            self.leading = False
            metrics.SCHEDULER_LEADER.set(0)
            raise

    def _lead(self) -> None:
        leading = self._current_election().is_leader()
        if leading != self.leading:
            log.info("scheduler_leadership", leading=leading)
            self.leading = leading
        metrics.SCHEDULER_LEADER.set(1 if leading else 0)
        now = time.monotonic()
        if not leading or (now < self._next_enqueue and now < self._next_guard):
            return
        settings = self.runtime.store.settings()
        if now >= self._next_enqueue:
            trigger_enqueue(self.runtime, source="scheduler", settings=settings)
            self.published["enqueue"] += 1
            metrics.SCHEDULER_PUBLISHED.labels("enqueue").inc()
            self._next_enqueue = now + settings.enqueue_interval
        if now >= self._next_guard:
            guard_stale_migrations.send()
            self.published["guard"] += 1
            metrics.SCHEDULER_PUBLISHED.labels("guard").inc()
            self._next_guard = now + settings.guard_interval

    def _failed(self, state: tenacity.RetryCallState) -> None:
        """Log a failed step before the wait: which server, what error, how long."""
        assert state.outcome is not None
        error = state.outcome.exception()
        if isinstance(error, StoreError | LeaseError | OSError):
            retrying.log_before_sleep(log, "scheduler_step_failed")(state)
        else:  # e.g. the broker is down: say which server, as the other servers' errors do
            server = "rabbitmq" if isinstance(error, dramatiq.errors.ConnectionError) else None
            retrying.log_before_sleep(log, "scheduler_publish_failed", server=server)(state)
