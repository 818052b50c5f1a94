"""What one process needs to run steps: store, etcd, a lease session, the registry.

Created lazily on first use — after Dramatiq has forked its worker processes, since gRPC
channels and connection pools do not survive a fork — and closed after the worker has
stopped, which revokes the session's lease so this process's keys vanish at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import Middleware

from actors.config import CONFIG
from actors.live_settings import LiveSettings
from leases import DedupGate, EtcdClient, EtcdNoSpace, Session, SharedBreaker
from migration import metrics
from migration.config import Config
from migration.keys import enqueue_gate_name, registry_breaker_name
from migration.migrator import Migrator
from migration.registry import RegistryClient
from migration.registry_health import THRESHOLD, RegistryHealth
from migration.store import SchemaOutdated, Store, StoreUnavailable, check_schema

log = structlog.get_logger(__name__)

#: Seconds a gate marker lives when its message never starts (lost, or stuck in a queue).
GATE_TTL = 60
#: Seconds the runs and triggers of a process reuse the settings they read.
SETTINGS_MAX_AGE = 1.0


class Runtime:
    """The per-process resources of the actors, the API and the scheduler.

    :param config: the process configuration.
    :param pool_size: PostgreSQL connections (one per worker thread, plus a few).
    """

    def __init__(self, config: Config, *, pool_size: int = 10) -> None:
        self.config = config
        # A silent PostgreSQL costs a step about the database timeout, not the pool's
        # default 30 s wait for a connection (its lease held all along).
        self.store = Store(
            config.database_url,
            max_size=pool_size,
            timeout=config.database_timeout,
            connect_options=config.database_options(),
        )
        try:
            # Refuse to work against a schema older than this release needs (one line).
            self.store.require_schema()
            self.etcd: EtcdClient = config.etcd_client()
            self.registry = RegistryClient.from_config(config)
        except Exception:
            self.store.close()
            raise
        self.migrator = Migrator(self.store, self.registry)
        #: The settings for enqueuer runs and triggers (at most SETTINGS_MAX_AGE old).
        self.live_settings = LiveSettings(self.store.settings, max_age=SETTINGS_MAX_AGE)
        self.gate = DedupGate(
            self.etcd, enqueue_gate_name(config.etcd_prefix), slots=1, ttl=GATE_TTL
        )
        #: The registry's health shared by every worker: breaker and pause (invariant 7).
        #: ``on_open`` is set by the actors (it sends the wake-up run).
        self.registry_health = RegistryHealth(
            breaker=SharedBreaker(
                self.etcd, registry_breaker_name(config.etcd_prefix), threshold=THRESHOLD
            ),
            store=self.store,
            registry=self.registry,
            on_open=_wake_up_after,
        )
        self._session: Session | None = None
        self._session_lock = threading.Lock()

    def session(self) -> Session:
        """The process's live lease session, opening a new one when the last was lost.

        :raises EtcdUnavailable: etcd cannot be reached to grant a lease.
        """
        with self._session_lock:
            if self._session is None or self._session.lost:
                if self._session is not None:
                    log.warning("lease_session_renewed", lost_reason=self._session.lost_reason)
                self._session = Session(
                    self.etcd,
                    ttl=self.config.lease_ttl,
                    on_lost=lambda _reason: metrics.LEASE_SESSIONS_LOST.inc(),
                )
                log.info(
                    "lease_session_opened",
                    lease_id=f"{self._session.lease_id:x}",
                    ttl=self._session.ttl,
                )
            return self._session

    def close(self) -> None:
        """Revoke the session (keys vanish at once) and close every connection."""
        with self._session_lock:
            if self._session is not None:
                self._session.close()
                log.info("lease_session_revoked", lease_id=f"{self._session.lease_id:x}")
                self._session = None
        self.registry_health.close()
        self.registry.close()
        self.etcd.close()
        self.store.close()


def _wake_up_after(window: float) -> None:
    """This process opened the registry breaker: one enqueuer run when its window ends."""
    from actors.enqueuer import wake_up_after  # noqa: PLC0415 - the actors import this module

    wake_up_after(window)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def note_etcd_failure(error: BaseException | None, *, where: str) -> None:
    """Count and log an etcd that is out of space (NOSPACE alarm), once per failure.

    Every other failure is already logged where it happened; this one needs an operator
    (README runbook "etcd out of space"), so it gets its own line at error level and the
    ``registry_migrator_etcd_nospace`` counter its alert rule watches. Until then, lease and
    gate writes fail before any repository is claimed, as in any etcd outage.

    :param error: the exception a step or trigger failed with (None: nothing to note).
    :param where: the actor, or ``trigger:<source>``.
    """
    if isinstance(error, EtcdNoSpace):
        metrics.ETCD_NOSPACE.labels(where=where).inc()
        log.error(
            "etcd_nospace",
            where=where,
            error=str(error),
            action="compact, defragment, disarm: registry-migrator leases etcd-space --recover",
        )


def get_runtime() -> Runtime:
    """This process's runtime, created on first use from ``MIGRATOR_*``."""
    global _runtime  # noqa: PLW0603 - one runtime per process, by design
    with _runtime_lock:
        if _runtime is None:
            # The pool opens connections on demand: sized for Dramatiq's default 8 threads
            # per process plus a few, it costs nothing when fewer are used.
            _runtime = Runtime(CONFIG, pool_size=16)
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install a runtime built elsewhere (tests, the demo), closing none."""
    global _runtime  # noqa: PLW0603
    with _runtime_lock:
        _runtime = runtime


def close_runtime() -> None:
    """Close this process's runtime, if any."""
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.close()


class RuntimeMiddleware(Middleware):
    """Binds each message's actor and id into the log context; closes the runtime at exit.

    The runtime is closed after the worker has stopped (every running message finished or
    was interrupted), so a graceful shutdown (SIGTERM) revokes the lease at once.
    """

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        # A worker refuses to start against a schema older than it needs: one line, and the
        # process exits (Dramatiq's main process then stops the others). PostgreSQL down
        # is not a reason to exit: the runtime is made on the first message, as before.
        try:
            check_schema(CONFIG.database_url)
        except SchemaOutdated as error:
            log.error("schema_outdated", error=str(error))
            sys.exit(3)
        except StoreUnavailable:
            pass

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        # A launcher (tests, the demo) asks the worker child to die with Dramatiq's main
        # process, so a killed launcher leaves no orphan consuming from its queue.
        if os.environ.get("MIGRATOR_DIE_WITH_PARENT") == "1":
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PDEATHSIG

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            actor=message.actor_name, message_id=message.message_id
        )

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        note_etcd_failure(exception, where=message.actor_name)
        structlog.contextvars.clear_contextvars()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        structlog.contextvars.clear_contextvars()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        close_runtime()
