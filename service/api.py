"""The notification API: the registry reports here; health, readiness and metrics too.

``PUT /notifications/registry/repositories/{path}/status`` answers 202 only once RabbitMQ
has confirmed the message that will apply the notification, so an accepted notification
cannot be lost; anything else (bad secret, bad body, unknown repository, a state the
notification does not fit, a broker that is down) gets an error the registry can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import pika
import structlog
import tenacity
from fastapi import FastAPI, Header, HTTPException, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from actors.runtime import Runtime
from leases import LeaseError
from migration import retrying
from migration.config import Config, split_broker_urls
from migration.keys import leases_prefix
from migration.migrator import already_applied, status_matches_state
from migration.registry import RegistryImportStatus
from migration.states import ACTIVE_STATES, State
from migration.store import Seen, StoreError

log = structlog.get_logger(__name__)

#: The routes anyone may call (probes and the Prometheus scraper); all others need the secret.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

#: Seconds the API gives a notification (its lookup and RabbitMQ's confirm) before
#: answering 503: a broker cut off in silence must not hold the registry's request until
#: its own timeout (5 s); the registry retries.
NOTIFY_DEADLINE = 3.0
#: Notifications handled at once (each thread keeps its own broker connection); past them
#: a notification waits for a thread, within the same deadline.
NOTIFY_THREADS = 8

#: The statuses a notification may carry: a phase that ended.
NOTIFIED_STATUSES = tuple(s for s in RegistryImportStatus if s.ended)


class Notification(BaseModel):
    """The registry's notification body."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=255)
    path: str = Field(min_length=1, max_length=255)
    status: RegistryImportStatus
    detail: str = Field(default="", max_length=4096)


class Metrics:
    """The API's Prometheus metrics; gauges are read from the store at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.notifications = Counter(
            "registry_migrator_notifications", "Registry notifications by outcome", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.repositories = Gauge(
            "registry_migrator_repositories", "Repositories by migration state", ["state"],
            registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "registry_migrator_in_flight", "Repositories in an active state", registry=self.registry
        )
        self.capacity = Gauge(
            "registry_migrator_capacity", "The capacity setting", registry=self.registry
        )
        self.leases_held = Gauge(
            "registry_migrator_leases_held", "Lease keys held in etcd", registry=self.registry
        )
        self.eligible = Gauge(
            "registry_migrator_repositories_eligible",
            "Repositories a run could still start or retry (ready or aborted, not denied)",
            registry=self.registry,
        )
        self.skipped = Gauge(
            "registry_migrator_repositories_skipped", "Skipped repositories by skip reason",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        # 1 while the migration runs, 0 while paused (the ``enabled`` setting).
        self.enabled = Gauge(
            "registry_migrator_migration_enabled",
            "1 while the migration is enabled, 0 while paused",
            registry=self.registry,
        )
        # 1 while the system paused the migration (the registry refused our token), with
        # the reason as a label; 0 otherwise. An operator's pause is enabled=0 alone.
        self.paused_by_system = Gauge(
            "registry_migrator_migration_paused_by_system",
            "1 while the system paused the migration (paused_reason set)",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.backing_off = Gauge(
            "registry_migrator_repositories_backing_off",
            "Repositories waiting out a registry backoff (registry faults; never charged)",
            registry=self.registry,
        )
        self.queue_messages = Gauge(
            "registry_migrator_queue_messages",
            "Messages waiting in the actors' RabbitMQ queues (the queue and its delay queue)",
            ["queue"], registry=self.registry,
        )  # fmt: skip
        self.dead_letters = Gauge(
            "registry_migrator_dead_letters",
            "Messages in the dead-letter queue (<queue>.XQ): messages that failed every retry",
            ["queue"], registry=self.registry,
        )  # fmt: skip
        self.scrape_errors = Counter(
            "registry_migrator_metrics_scrape_errors",
            "Scrapes whose store, etcd or RabbitMQ reads failed, by server",
            ["server"], registry=self.registry,
        )  # fmt: skip


class RequireSecret:
    """ASGI middleware: 401 for a request to a path outside :data:`PUBLIC_PATHS` whose
    ``Authorization`` header is not the secret.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
    costs a task group and memory streams per request (py-spy of the API under
    bench/pipeline.py: about a third of its samples in and under it).

    :param app: the application it guards.
    :param secret: the notification secret, as bytes.
    :param refused: called for each request it refuses (the metric).
    """

    def __init__(self, app: ASGIApp, *, secret: bytes, refused: Callable[[], None]) -> None:
        self.app = app
        self.secret = secret
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            # The first Authorization header, as sent (ASGI servers lowercase the names);
            # compared in constant time: the comparison must not tell how much of a guess
            # was right.
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.secret):
                self.refused()
                response = JSONResponse(
                    {"detail": "missing or wrong Authorization"}, status_code=401
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    config: Config,
    *,
    runtime: Callable[[], Runtime],
    publish: Callable[[str, str, str, int, dict[str, object]], None],
    broker_check: Callable[[], None] | None = None,
    queue_counts: Callable[[list[str]], dict[str, int]] | None = None,
    deadline: float = NOTIFY_DEADLINE,
) -> FastAPI:
    """Build the ASGI app.

    :param config: the process configuration (the notification secret is required).
    :param runtime: returns the process runtime (created lazily: PostgreSQL may be down
        at start; requests then fail with 503 until it is back).
    :param publish: sends ``handle_registry_notification(path, status, detail,
        repository_id=..., seen=...)`` (the id and the row's columns as found here, which
        save the worker its lookup and its read) and returns only once the broker
        confirmed it.
    :param broker_check: raises when RabbitMQ is unreachable (for ``/readyz``).
    :param queue_counts: the messages in each named RabbitMQ queue (see
        :func:`rabbitmq_queue_counts`), for ``/metrics``; None: not exported.
    :param deadline: seconds a notification may take (lookup, publish) before it is
        answered 503; a publish that lands later is a duplicate the worker applies once.
    """
    secret = config.require_notification_secret().encode()
    metrics = Metrics()
    app = FastAPI(
        title="registry-migrator",
        summary="Registry import notifications, health and metrics",
        version="1",
        # The interactive docs page fetches the schema without the secret: off. The schema
        # itself is served to callers with the secret.
        docs_url=None,
        redoc_url=None,
    )

    def authorized(authorization: str | None) -> bool:
        # Starlette decodes header bytes as latin-1: encoding back gives the bytes sent.
        given = (authorization or "").encode("latin-1", errors="replace")
        # Constant time: the comparison must not tell how much of a guess was right.
        return hmac.compare_digest(given, secret)

    def authorize(authorization: str | None) -> None:
        if not authorized(authorization):
            metrics.notifications.labels("unauthorized").inc()
            raise HTTPException(status_code=401, detail="missing or wrong Authorization")

    def refused() -> None:
        metrics.notifications.labels("unauthorized").inc()

    # Before routing and body parsing: a caller without the secret learns nothing, not even
    # whether its body would have been valid (422) or the route exists (404).
    app.add_middleware(RequireSecret, secret=secret, refused=refused)

    def get_runtime() -> Runtime:
        try:
            return runtime()
        except (StoreError, LeaseError) as error:
            raise HTTPException(status_code=503, detail=f"not ready: {error}") from None

    # The lookup and the publish block: one pool thread does both, while the event loop
    # waits for at most the deadline (one thread hand-off each way per notification; a
    # sync route would run in Starlette's pool and wait on a second one for the deadline).
    handlers = ThreadPoolExecutor(max_workers=NOTIFY_THREADS, thread_name_prefix="notify")

    @app.put(
        "/notifications/registry/repositories/{path:path}/status",
        status_code=202,
        response_model=None,
        responses={200: {}, 401: {}, 404: {}, 409: {}, 422: {}, 503: {}},
    )
    async def notify(
        path: str,
        notification: Notification,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any] | JSONResponse:
        """Accept a registry notification; 202 once it is safely queued, 200 when its step
        is already done (a repeated delivery)."""
        authorize(authorization)
        if notification.path != path:
            metrics.notifications.labels("invalid").inc()
            raise HTTPException(status_code=422, detail="body path does not match the URL path")
        if notification.status not in NOTIFIED_STATUSES:
            metrics.notifications.labels("invalid").inc()
            raise HTTPException(
                status_code=422, detail=f"status {notification.status} is not a final status"
            )
        handled = asyncio.wrap_future(handlers.submit(accept, path, notification))
        try:
            return await asyncio.wait_for(handled, deadline)
        except TimeoutError:
            # Still queued for a thread, or under way (a publish RabbitMQ has not confirmed):
            # either way not safely queued yet, so not accepted.
            metrics.notifications.labels("timed_out").inc()
            log.error(
                "notification_not_queued", container_repository_path=path,
                error=f"not queued within {deadline:g} s",
            )  # fmt: skip
            raise HTTPException(
                status_code=503, detail="could not queue the notification in time"
            ) from None

    def accept(path: str, notification: Notification) -> dict[str, Any] | JSONResponse:
        store = get_runtime().store
        try:
            repository = store.get_by_path(path)
        except StoreError as error:
            raise HTTPException(status_code=503, detail=f"database unavailable: {error}") from None
        if repository is None:
            metrics.notifications.labels("unknown_repository").inc()
            raise HTTPException(status_code=404, detail=f"no repository {path!r}")
        if already_applied(notification.status, repository):
            # A repeated delivery of a notification whose step is done: the idempotent
            # no-op the registry's retry needs to stop (the reference answers 200 too).
            metrics.notifications.labels("already_applied").inc()
            log.info(
                "notification_already_applied", container_repository_id=repository.id,
                container_repository_path=path, registry_status=notification.status.value,
                container_repository_migration_state=repository.migration_state.value,
            )  # fmt: skip
            return JSONResponse(
                {"accepted": False, "already_applied": True,
                 "container_repository_id": repository.id},
                status_code=200,
            )  # fmt: skip
        if not status_matches_state(notification.status, repository.migration_state):
            metrics.notifications.labels("state_mismatch").inc()
            log.warning(
                "notification_state_mismatch", container_repository_id=repository.id,
                container_repository_path=path, registry_status=notification.status.value,
                container_repository_migration_state=repository.migration_state.value,
            )  # fmt: skip
            raise HTTPException(
                status_code=409,
                detail=(
                    f"repository is {repository.migration_state},"
                    f" not awaiting {notification.status}"
                ),
            )
        try:
            publish(
                path, notification.status.value, notification.detail, repository.id,
                Seen.of(repository).as_message(),
            )  # fmt: skip
        except Exception as error:  # the broker refused or is down: the registry retries
            metrics.notifications.labels("broker_unavailable").inc()
            log.error("notification_not_queued", container_repository_path=path, error=str(error))
            raise HTTPException(
                status_code=503, detail="could not queue the notification"
            ) from None
        metrics.notifications.labels("accepted").inc()
        log.info(
            "notification_accepted", container_repository_id=repository.id,
            container_repository_path=path, registry_status=notification.status.value,
        )  # fmt: skip
        return {"accepted": True, "container_repository_id": repository.id}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive (liveness)."""
        return {"status": "ok"}

    checks = ServerChecks(config, runtime=runtime, broker_check=broker_check)
    app.state.server_checks = checks

    @app.get("/readyz", responses={503: {}})
    def readyz() -> JSONResponse:
        """PostgreSQL, etcd and RabbitMQ are reachable (readiness)."""
        results = checks.run()
        ready = all(v == "ok" for v in results.values())
        body: dict[str, Any] = {"ready": ready, "checks": results}
        # A paused migration does not make the API unready (notifications must still come
        # in), but an operator looking here must see why nothing starts.
        with contextlib.suppress(Exception):
            settings = runtime().store.settings()
            body["migration_enabled"] = settings.enabled
            if settings.paused_reason:
                body["paused_reason"] = settings.paused_reason
        return JSONResponse(body, status_code=200 if ready else 503)

    queue = config.queue_name
    # Dramatiq's RabbitMQ broker: <queue>.DQ holds delayed (retrying) messages, <queue>.XQ
    # the dead letters (messages that failed every retry, or were rejected).
    waiting_queues = (queue, f"{queue}.DQ")
    dead_letter_queue = f"{queue}.XQ"

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        """Prometheus metrics read at scrape time: repositories by state and skip reason,
        eligible, in flight vs capacity, enabled, leases held, queue depths, dead letters."""
        try:
            current = runtime()
            store = current.store
            counts = store.counts_by_state()
            settings = store.settings()
            for state in State:
                metrics.repositories.labels(state.value).set(counts.get(state, 0))
            metrics.in_flight.set(sum(counts.get(s, 0) for s in ACTIVE_STATES))
            metrics.capacity.set(settings.capacity)
            metrics.enabled.set(1 if settings.enabled else 0)
            metrics.paused_by_system.clear()
            if settings.paused_reason:
                metrics.paused_by_system.labels(settings.paused_reason[:120]).set(1)
            metrics.backing_off.set(store.backing_off(limit=0)[0])
            for reason, n in store.counts_by_skip_reason().items():
                metrics.skipped.labels(reason.value).set(n)
            metrics.eligible.set(store.count_eligible(settings))
        except Exception as error:  # metrics of a half-down system still serve the counters
            metrics.scrape_errors.labels("postgresql").inc()
            log.warning("metrics_partial", server="postgresql", error=str(error))
        try:
            etcd = runtime().etcd
            metrics.leases_held.set(etcd.count_prefix(leases_prefix(config.etcd_prefix)))
        except Exception as error:
            metrics.scrape_errors.labels("etcd").inc()
            log.warning("metrics_partial", server="etcd", error=str(error))
        if queue_counts is not None:
            try:
                depths = queue_counts([*waiting_queues, dead_letter_queue])
                for name in waiting_queues:
                    metrics.queue_messages.labels(name).set(depths[name])
                metrics.dead_letters.labels(dead_letter_queue).set(depths[dead_letter_queue])
            except Exception as error:
                metrics.scrape_errors.labels("rabbitmq").inc()
                log.warning("metrics_partial", server="rabbitmq", error=str(error))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ServerChecks:
    """Reachability of PostgreSQL, etcd and RabbitMQ, for ``/readyz`` and the start-up log.

    :param config: the process configuration (the etcd prefix to read under).
    :param runtime: returns the process runtime; raises while it cannot be created.
    :param broker_check: raises when RabbitMQ is unreachable (None: not checked).
    """

    SERVERS = ("postgresql", "etcd", "rabbitmq")

    def __init__(
        self,
        config: Config,
        *,
        runtime: Callable[[], Runtime],
        broker_check: Callable[[], None] | None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.broker_check = broker_check or (lambda: None)

    def run(self) -> dict[str, str]:
        """Each server's state: ``ok`` or one line saying what is wrong."""
        results: dict[str, str] = {}
        try:
            current: Runtime | None = self.runtime()
        except StoreError as error:  # the runtime is made only once PostgreSQL answers
            current = None
            results["postgresql"] = _first_line(error)
            results["etcd"] = "not checked: waiting for PostgreSQL"
        except LeaseError as error:
            current = None
            results["etcd"] = _first_line(error)
        except Exception as error:  # reported, and retried by the caller
            current = None
            results["postgresql"] = f"runtime not created: {_first_line(error)}"
        if current is not None:
            store, etcd = current.store, current.etcd
            # A key under our prefix: an etcd user may be granted only that prefix.
            key = leases_prefix(self.config.etcd_prefix)
            for name, check in (("postgresql", store.settings), ("etcd", lambda: etcd.get(key))):
                try:
                    check()
                    results[name] = "ok"
                except Exception as error:  # any failure means not ready
                    results[name] = _first_line(error)
        try:
            self.broker_check()
            results["rabbitmq"] = "ok"
        except Exception as error:
            results["rabbitmq"] = _first_line(error)
        return {name: results.get(name, "not checked") for name in self.SERVERS}

    def wait_until_ready(
        self, stop: threading.Event, *, first_delay: float = 0.5, max_delay: float = 10.0
    ) -> bool:
        """Check until every server answers, with the project's backoff
        (:mod:`migration.retrying`: the waits grow from ``first_delay`` to ``max_delay``).

        Logs one ``server_unavailable`` line per down server per attempt (naming it, with
        the error and the delay before the next attempt), then ``servers_ready``.

        :returns: True once ready, False when ``stop`` was set first.
        """

        def down() -> dict[str, str]:
            return {name: state for name, state in self.run().items() if state != "ok"}

        def say_down(state: tenacity.RetryCallState) -> None:
            assert state.outcome is not None
            for name, error in state.outcome.result().items():
                log.warning(
                    "server_unavailable",
                    server=name,
                    error=error,
                    retry_in_s=round(state.upcoming_sleep, 2),
                )

        policy = retrying.policy(
            initial=first_delay,
            maximum=max_delay,
            stop_event=stop,
            retry=tenacity.retry_if_result(bool),  # while any server is down
            before_sleep=say_down,
        )
        if stop.is_set() or policy(down):
            return False
        log.info("servers_ready", servers=list(self.SERVERS))
        return True


class LazyRuntime:
    """Creates the runtime on first successful use, so the API starts with a server down."""

    def __init__(self, factory: Callable[[], Runtime]) -> None:
        self._factory = factory
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Runtime:
        with self._lock:
            if self._runtime is None:
                self._runtime = self._factory()
            return self._runtime

    def close(self) -> None:
        with self._lock:
            if self._runtime is not None:
                self._runtime.close()
                self._runtime = None


def rabbitmq_queue_counts(url: str) -> Callable[[list[str]], dict[str, int]]:
    """Counts of messages in RabbitMQ queues, read on one AMQP connection per call.

    A queue that does not exist (yet) counts 0: Dramatiq declares them on first use.
    """

    def counts(queues: list[str]) -> dict[str, int]:
        parameters = pika.URLParameters(url)
        parameters.socket_timeout = 2
        parameters.blocked_connection_timeout = 2
        parameters.connection_attempts = 1
        connection = pika.BlockingConnection(parameters)
        found: dict[str, int] = {}
        try:
            for queue in queues:
                # A passive declare of a missing queue closes the channel: one channel each.
                channel = connection.channel()
                try:
                    declared = channel.queue_declare(queue=queue, passive=True)
                    found[queue] = int(declared.method.message_count)
                except pika.exceptions.ChannelClosedByBroker as error:
                    if error.reply_code != 404:
                        raise
                    found[queue] = 0
                else:
                    channel.close()
        finally:
            connection.close()
        return found

    return counts


def rabbitmq_check(url: str) -> Callable[[], None]:
    """A readiness check that opens and closes one AMQP connection.

    :param url: ``MIGRATOR_BROKER_URL``: with several nodes, ready when one of them answers
        (the publisher fails over to it).
    """

    def check() -> None:
        candidates = []
        for node in split_broker_urls(url):
            parameters = pika.URLParameters(node)
            parameters.socket_timeout = 2
            parameters.blocked_connection_timeout = 2
            parameters.connection_attempts = 1
            candidates.append(parameters)
        pika.BlockingConnection(candidates).close()

    return check
