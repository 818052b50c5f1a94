"""Long-running processes (``api``, ``scheduler``) and the one-shot ``enqueue``.

What each one runs (the actors, FastAPI, uvicorn, the store, etcd) is imported inside it:
their ``--help`` loads none of it, and ``enqueue`` does not load the API.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import click

from migration.config import Config


def refuse_outdated_schema(config: Config) -> None:
    """Exit with one line when the database's schema is older than this release needs.

    PostgreSQL down is no reason to exit here: the process starts and waits for it, and
    its runtime checks the schema once it answers (``/readyz`` says why until then).
    """
    from migration.store import SchemaOutdated, StoreUnavailable, check_schema

    try:
        check_schema(config.database_url)
    except SchemaOutdated as error:
        click.echo(f"registry-migrator: {error}", err=True)
        sys.exit(1)
    except StoreUnavailable:
        pass


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--fd",
    type=click.IntRange(3),
    default=None,
    metavar="N",
    help="Serve on the listening TCP socket inherited as file descriptor N instead of "
    "binding --host/--port (a launcher that holds the port passes it).",
)
def api(host: str, port: int, fd: int | None) -> None:
    """Serve the notification API, /healthz, /readyz and /metrics (uvicorn).

    The registry sends PUT /notifications/registry/repositories/<path>/status with
    MIGRATOR_NOTIFICATION_SECRET in Authorization; 202 means the notification is queued
    in RabbitMQ and will be applied.

    \b
    Example:
      MIGRATOR_NOTIFICATION_SECRET=s3cret registry-migrator api --port 8080
    """
    import structlog
    import uvicorn

    import actors  # configures the broker
    from actors.notifications import handle_registry_notification
    from actors.runtime import Runtime
    from migration.logging import configure as configure_logging
    from service.api import LazyRuntime, create_app, rabbitmq_check, rabbitmq_queue_counts

    log = structlog.get_logger(__name__)
    config = Config.from_env()
    config.require_notification_secret()
    refuse_outdated_schema(config)
    configure_logging(config.log_level)
    runtime = LazyRuntime(lambda: Runtime(config))

    def publish(
        path: str, status: str, detail: str, repository_id: int, seen: dict[str, object]
    ) -> None:
        handle_registry_notification.send(
            path, status, detail, repository_id=repository_id, seen=seen
        )

    app = create_app(
        config,
        runtime=runtime,
        publish=publish,
        broker_check=rabbitmq_check(config.broker_url),
        queue_counts=rabbitmq_queue_counts(config.broker_url),
    )
    sockets = None
    if fd is not None:
        from service.sockets import inherited_listener

        try:
            sockets = [inherited_listener(fd)]
        except OSError as error:
            click.echo(f"registry-migrator api: --fd {fd}: {error.strerror or error}", err=True)
            sys.exit(2)
        host, port = sockets[0].getsockname()[:2]
    log.info("api_starting", host=host, port=port, broker=actors.broker.__class__.__name__)
    # Serve at once (liveness, /readyz 503) while a server is down; say so in the log, with
    # backoff, until all answer.
    watcher_stop = threading.Event()
    threading.Thread(
        target=app.state.server_checks.wait_until_ready,
        args=(watcher_stop,),
        name="server-checks",
        daemon=True,
    ).start()
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal to
    # the handler that was in place before: make that one a no-op, so that a requested stop
    # ends the process with status 0 (as the simulator does) rather than "killed by SIGTERM".
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Server.run, not uvicorn.run: it serves a socket it is given (uvicorn's own fd
        # option would take the descriptor for a Unix socket).
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False)
        )
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=sockets)
        if not server.started:
            sys.exit(3)  # as uvicorn.run: the server never started (the port, the app)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        runtime.close()
    log.info("api_stopped")


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/healthz"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}' if ok else b'{"error":"not found"}')

    def log_message(self, *args: object) -> None:
        pass


@click.command()
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    default=8081,
    show_default=True,
    help="Port of the /healthz endpoint (0: none).",
)
@click.option(
    "--health-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the /healthz and /metrics endpoints.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port of the Prometheus /metrics endpoint (0: none; Kubernetes uses 9192).",
)
def scheduler(health_port: int, health_host: str, metrics_port: int) -> None:
    """Publish enqueue and guard runs periodically; only the elected leader publishes.

    Run two or more for availability: they hold an etcd election, and a follower takes
    over within TTL + 1 s of the leader's death. Intervals are the live settings
    enqueue_interval and guard_interval. Prometheus metrics (leadership, messages
    published, lease sessions lost) are served on --metrics-port.

    \b
    Example:
      registry-migrator scheduler --health-port 8081 --metrics-port 9192
    """
    import structlog

    from actors.runtime import Runtime  # importing actors sets the broker
    from actors.scheduler import Scheduler
    from migration.logging import configure as configure_logging
    from service.api import LazyRuntime, ServerChecks, rabbitmq_check

    log = structlog.get_logger(__name__)
    config = Config.from_env()
    refuse_outdated_schema(config)
    configure_logging(config.log_level)
    stop = _stop_on_signals()
    server = None
    if health_port:
        server = ThreadingHTTPServer((health_host, health_port), _Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    metrics_server = None
    if metrics_port:
        from prometheus_client import start_http_server

        from migration import metrics

        metrics.SCHEDULER_LEADER.set(0)  # a follower says so from its first scrape
        try:
            metrics_server, _ = start_http_server(metrics_port, addr=health_host)
        except OSError as error:
            click.echo(f"registry-migrator: --metrics-port {metrics_port}: {error}", err=True)
            sys.exit(2)
    runtime = LazyRuntime(lambda: Runtime(config))
    checks = ServerChecks(config, runtime=runtime, broker_check=rabbitmq_check(config.broker_url))
    try:
        # The API's start-up wait: one server_unavailable line per down server per retry,
        # with backoff, until PostgreSQL, etcd and RabbitMQ all answer (or a stop signal).
        if checks.wait_until_ready(stop):
            log.info("scheduler_started")
            Scheduler(runtime()).run(stop)
    finally:
        runtime.close()
        if server is not None:
            server.shutdown()
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("scheduler_stopped")


def send_one_run(config: Config) -> bool:
    """Send one enqueuer run through the dedup gate; True when sent, False when collapsed.

    :param config: the process configuration (read first: a bad one exits 2 on its own).
    :raises StoreError: PostgreSQL cannot be reached.
    :raises LeaseError: etcd cannot be reached (``str`` names it).
    """
    from actors.enqueuer import trigger_enqueue
    from actors.runtime import Runtime
    from leases import LeaseError

    runtime = Runtime(config)
    try:
        return trigger_enqueue(runtime, source="operator")
    except LeaseError as error:
        raise LeaseError(f"etcd: {error}") from error
    finally:
        runtime.close()


@click.command()
def enqueue() -> None:
    """Send one enqueue_next_migration run through the dedup gate (like perform_async).

    Exits 0 whether the run was queued or collapsed into runs already waiting (the gate
    keeps at most pending_enqueues of them); says which.

    \b
    Example:
      registry-migrator enqueue
    """
    from leases import LeaseError
    from migration.store import StoreError

    config = Config.from_env()
    try:
        sent = send_one_run(config)
    except (StoreError, LeaseError) as error:
        click.echo(f"registry-migrator: {error}", err=True)
        sys.exit(1)
    except Exception as error:  # PostgreSQL or RabbitMQ failed: one line, not a traceback
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        click.echo(f"registry-migrator: enqueue failed: {first_line}", err=True)
        sys.exit(1)
    click.echo("enqueued one run" if sent else "collapsed: enough runs are already waiting")
