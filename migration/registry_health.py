"""What every worker knows about the registry as a whole (invariant 7 of docs/design.md).

A registry that fails for everyone is not any repository's failure. This module turns the
registry client's answers into fleet-wide decisions:

- a **shared breaker** (:class:`leases.SharedBreaker`, in etcd): a connection error opens
  it at once, N consecutive 5xx / timeouts / answers that are not the API's across every
  worker open it too. While it is open, enqueuer runs neither claim nor re-enqueue; when its
  window passes, the next run probes ``GET /gitlab/v1/`` first: success closes it, failure
  reopens it with the window doubled (up to the ``registry_breaker_max_window`` setting).
  Whoever opens it asks for one wake-up run at the end of the window, so the migration
  resumes by itself without waiting for the scheduler;
- **401/403 pauses the migration** (``enabled = false`` with a ``paused_reason``): a refused
  token is an operator's matter; ``registry-migrator resume`` once it is fixed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import structlog

from leases import BreakerState, LeaseError, SharedBreaker
from migration import metrics
from migration.registry import ErrorKind, FaultClass, RegistryClient
from migration.settings import Settings
from migration.store import Store, StoreError

log = structlog.get_logger(__name__)

#: Seconds of the breaker's first window (capped by the live max-window setting).
BASE_WINDOW = 5.0
#: Registry faults in a row, across every worker, that open the breaker.
THRESHOLD = 3
#: Seconds a process reuses a *closed* breaker read (an open or half-open one is read every
#: time). A registry fault this process sees ends the reuse at once; another process's
#: opening reaches its runs within this time, and a run that calls the registry meanwhile
#: gets the same fault, charged to no repository (invariant 7).
CLOSED_REUSE = 0.5


class RegistryHealth:
    """The shared view of the registry's health; one per process, shared by threads.

    :param breaker: the shared breaker (its windows are set from the live settings).
    :param store: for pausing the migration on 401/403.
    :param registry: the client whose answers this observes (it sets itself as observer)
        and which probes the registry in half-open.
    :param on_open: called with the window (seconds) when this process opened the breaker:
        schedules the wake-up run.
    :param closed_reuse: seconds a closed breaker read is reused (default
        :data:`CLOSED_REUSE`; 0 reads it on every :meth:`admit`).
    """

    def __init__(
        self,
        *,
        breaker: SharedBreaker,
        store: Store,
        registry: RegistryClient,
        on_open: Callable[[float], None] | None = None,
        closed_reuse: float = CLOSED_REUSE,
    ) -> None:
        self.breaker = breaker
        self.closed_reuse = closed_reuse
        self.store = store
        self.registry = registry
        self.on_open = on_open
        # Whether soft failures may be on record: a success then clears them (one etcd
        # write), and only then, so a healthy migration's calls cost etcd nothing.
        self._failures_seen = False
        # time.monotonic() until which a closed breaker read is reused (CLOSED_REUSE).
        self._closed_until = 0.0
        # The etcd and PostgreSQL writes an answer leads to are made by one thread of their
        # own, not in the step that got the answer: with etcd cut off, a write waits out the
        # client's timeout, and the step must not outlive its lease for it (invariant 8).
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-health")
        self._pending: Future[None] | None = None
        registry.observer = self.observe

    def admit(self, settings: Settings) -> BreakerState | None:
        """Whether a run may call the registry now (while closed, one etcd read per
        ``closed_reuse`` seconds in this process, and after each registry fault it sees).

        :param settings: the live settings (the breaker's max window).
        :returns: None to go ahead, or the breaker's state when it is open (the run stops
            without claiming and without re-enqueueing itself).
        :raises EtcdUnavailable: etcd cannot be read.
        """
        now = time.monotonic()
        if now < self._closed_until:
            return None  # read closed less than CLOSED_REUSE ago, no fault seen since
        self.breaker.max_window = settings.registry_breaker_max_window
        self.breaker.base_window = min(BASE_WINDOW, settings.registry_breaker_max_window)
        state = self.breaker.state()
        self._failures_seen = state.failures > 0
        metrics.REGISTRY_BREAKER_OPEN.set(0 if state.closed else 1)
        if state.closed:
            self._closed_until = now + self.closed_reuse
            return None
        if state.open:
            return state
        probe = self.registry.probe()
        if probe.ok:
            self.breaker.close()
            metrics.REGISTRY_BREAKER_OPEN.set(0)
            log.info("registry_breaker_closed", after_window_s=state.window, reason=state.reason)
            return None
        if probe.error_kind is ErrorKind.AUTH:
            self._pause(f"probe GET /gitlab/v1/: {probe.detail}")
        window = self._trip(f"probe GET /gitlab/v1/ failed: {probe.detail}")
        return BreakerState(
            open=True, window=window or state.window, reason=probe.detail, failures=0
        )

    def observe(self, call: str, fault: FaultClass, kind: ErrorKind | None, detail: str) -> None:
        """The registry client's observer: every answer of every call comes here.

        Never raises: etcd or PostgreSQL being down must not turn a registry answer into a
        failure of the step that got it (the next run reads the breaker again).
        """
        if call == "probe":
            return  # admit() acts on its own probes
        if fault is FaultClass.REGISTRY:
            self._closed_until = 0.0  # the next admit() reads the breaker again
        if fault is not FaultClass.REGISTRY and not self._failures_seen:
            return  # the common case: nothing to record, no thread hand-off
        if fault is FaultClass.REGISTRY and kind not in (ErrorKind.AUTH, ErrorKind.CONNECT):
            self._failures_seen = True  # now, so that the next success clears it
        self._pending = self._recorder.submit(self._record, call, fault, kind, detail)

    def close(self) -> None:
        """Record what was observed, then stop the recording thread."""
        self._recorder.shutdown(wait=True)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until what was observed so far is recorded (tests; a clean stop)."""
        pending = self._pending
        if pending is not None:
            pending.result(timeout=timeout)

    def _record(self, call: str, fault: FaultClass, kind: ErrorKind | None, detail: str) -> None:
        try:
            if fault is not FaultClass.REGISTRY:
                if self._failures_seen:
                    self._failures_seen = False
                    self.breaker.record_success()
                return
            reason = f"{call}: {kind}: {detail}"[:300]
            if kind is ErrorKind.AUTH:
                self._pause(reason)
            elif kind is ErrorKind.CONNECT:
                self._trip(reason)
            else:
                window = self.breaker.record_failure(reason)
                if window is not None:
                    self._opened(window, reason)
        except (LeaseError, StoreError) as error:
            log.warning("registry_health_not_recorded", call=call, error=str(error))

    def _trip(self, reason: str) -> float | None:
        window = self.breaker.trip(reason)
        if window is not None:
            self._opened(window, reason)
        return window

    def _opened(self, window: float, reason: str) -> None:
        metrics.REGISTRY_BREAKER_OPEN.set(1)
        metrics.REGISTRY_BREAKER_OPENED.labels(reason.split(":", 1)[0]).inc()
        log.warning("registry_breaker_opened", window_s=window, reason=reason)
        if self.on_open is not None:
            self.on_open(window)

    def _pause(self, reason: str) -> None:
        why = f"registry refused our token: {reason}"[:500]
        if self.store.pause(why):
            log.error(
                "migration_paused",
                paused_reason=why,
                action="fix MIGRATOR_REGISTRY_TOKEN, then run `registry-migrator resume`",
            )
