"""``registry-migrator simulator``: serve a simulated registry import API."""

from __future__ import annotations

import sys

import click

from devtools.simulator import SimulatorConfig, serve
from migration.logging import configure as configure_logging

_DEFAULTS = SimulatorConfig()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=5005,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on.",
)
@click.option(
    "--notify-url",
    default=None,
    metavar="URL",
    help="Base URL of the notification API; notifications go to "
    "URL/notifications/registry/repositories/<path>/status. None: no notifications.",
)
@click.option(
    "--secret",
    envvar="MIGRATOR_NOTIFICATION_SECRET",
    default=None,
    show_envvar=True,
    help="Authorization header value of notifications.",
)
@click.option(
    "--token",
    envvar="MIGRATOR_REGISTRY_TOKEN",
    default=None,
    show_envvar=True,
    help="Bearer token required on import calls (none: no authentication).",
)
@click.option(
    "--pre-import-seconds",
    nargs=2,
    type=float,
    default=_DEFAULTS.pre_import_seconds,
    show_default=True,
    metavar="MIN MAX",
    help="A pre-import lasts uniform(MIN, MAX) seconds, times tags/default-tags.",
)
@click.option(
    "--import-seconds",
    nargs=2,
    type=float,
    default=_DEFAULTS.import_seconds,
    show_default=True,
    metavar="MIN MAX",
    help="A final import lasts uniform(MIN, MAX) seconds, times tags/default-tags.",
)
@click.option(
    "--default-tags",
    type=int,
    default=_DEFAULTS.default_tags,
    show_default=True,
    help="Tags assumed when a start call passes no 'tags' query parameter.",
)
@click.option(
    "--pre-import-failure-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a pre-import fails.",
)
@click.option(
    "--import-failure-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a final import fails.",
)
@click.option(
    "--start-error-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a start call is answered 503.",
)
@click.option(
    "--max-concurrent",
    type=int,
    default=0,
    show_default=True,
    help="Imports (pre + final) running at once before 429; 0 = no limit.",
)
@click.option(
    "--start-latency",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds a start call waits before it is answered.",
)
@click.option(
    "--no-double-start-guard",
    is_flag=True,
    help="Accept a start while a phase runs (flagged as an overlap in the report).",
)
@click.option(
    "--no-metadata-database",
    is_flag=True,
    help="Answer the compliance check GET /gitlab/v1/ with 404, as a registry whose "
    "metadata database is disabled does.",
)
@click.option(
    "--fault",
    default=None,
    metavar="MODE",
    help="Fault switch, on from the start: status:CODE (401, 403 or 5xx), slow:SECONDS "
    "(the call acts, its answer comes late), garbage (200 with HTML) or reset (connection "
    'closed mid-answer). At runtime: POST /simulator/config {"fault": ...}.',
)
@click.option(
    "--fault-calls",
    default="all",
    show_default=True,
    metavar="KINDS",
    help="Calls the fault hits: 'all' or a comma-separated list of start, status, cancel, "
    "probe (GET /gitlab/v1/).",
)
@click.option(
    "--fault-seconds",
    type=float,
    default=0.0,
    show_default=True,
    help="The fault ends by itself after this many seconds; 0 = until cleared.",
)
@click.option(
    "--state-file",
    default=None,
    metavar="PATH",
    help="Save the registry's state (repositories, running imports, undelivered "
    "notifications, the report) to PATH on SIGTERM and load it at start: a stop and a "
    "start is then a registry outage, not a new registry.",
)
@click.option(
    "--notify-max-attempts",
    type=int,
    default=_DEFAULTS.notify_max_attempts,
    show_default=True,
    help="Attempts per notification answered 5xx/429 or unreachable.",
)
@click.option(
    "--seed", type=int, default=None, help="Seed of the random source, for repeatable runs."
)
@click.option(
    "--ready-file",
    default=None,
    metavar="PATH",
    help="Write the base URL into PATH once listening (useful with --port 0).",
)
@click.option(
    "--fd",
    type=click.IntRange(3),
    default=None,
    metavar="N",
    help="Serve on the listening TCP socket inherited as file descriptor N (--host and "
    "--port then only name it): a launcher that holds the port passes it, so that no "
    "other program can take the port between its choice and this bind.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def simulator(
    *,
    host: str,
    port: int,
    notify_url: str | None,
    secret: str | None,
    token: str | None,
    pre_import_seconds: tuple[float, float],
    import_seconds: tuple[float, float],
    default_tags: int,
    pre_import_failure_rate: float,
    import_failure_rate: float,
    start_error_rate: float,
    max_concurrent: int,
    start_latency: float,
    no_double_start_guard: bool,
    no_metadata_database: bool,
    fault: str | None,
    fault_calls: str,
    fault_seconds: float,
    state_file: str | None,
    notify_max_attempts: int,
    seed: int | None,
    ready_file: str | None,
    fd: int | None,
    log_level: str,
) -> None:
    """Serve a simulated registry import API until SIGTERM/SIGINT.

    Imports take random time, fail at the configured rates, and end with a notification to
    --notify-url. Paths decide some answers by substring: native (200), missing (404),
    fail-once / fail-always (pre-import fails), fail-import-once / fail-import-always
    (final import fails), server-error (500), garbage (not the API's answers).
    GET /simulator/report shows what happened; POST /simulator/config changes knobs
    (JSON object of SimulatorConfig fields); POST /simulator/reset clears the state.

    The fault switch makes the whole registry misbehave for a while (--fault or, at
    runtime, the config's fault, fault_calls and fault_seconds). The double-start guard
    (409/425 to a start while the repository imports) can be switched off
    (--no-double-start-guard, or guard_double_start); the report then counts the starts
    that ran two imports of one repository at once (overlapping_imports).

    \b
    Example:
      registry-migrator simulator --port 5005 \\
          --notify-url http://127.0.0.1:8080 --secret s3cret \\
          --pre-import-seconds 1 3 --import-seconds 2 5 --max-concurrent 20 \\
          --state-file /tmp/registry.state
      curl -s http://127.0.0.1:5005/simulator/report?events=false
      # 30 s of 503 on every start call, then the registry answers again:
      curl -s -X POST http://127.0.0.1:5005/simulator/config \\
          -d '{"fault": "status:503", "fault_calls": "start", "fault_seconds": 30}'
    """
    try:
        config = SimulatorConfig(
            pre_import_seconds=pre_import_seconds,
            import_seconds=import_seconds,
            default_tags=default_tags,
            pre_import_failure_rate=pre_import_failure_rate,
            import_failure_rate=import_failure_rate,
            start_error_rate=start_error_rate,
            max_concurrent_imports=max_concurrent,
            start_latency_seconds=start_latency,
            guard_double_start=not no_double_start_guard,
            metadata_database=not no_metadata_database,
            fault=fault or None,
            fault_calls=fault_calls,
            fault_seconds=fault_seconds,
            token=token or None,
            notify_url=notify_url or None,
            secret=secret or None,
            notify_max_attempts=notify_max_attempts,
            seed=seed,
        )
    except ValueError as error:
        click.echo(f"registry-migrator simulator: {error}", err=True)
        sys.exit(2)
    configure_logging(log_level)
    try:
        serve(
            config,
            host=host,
            port=port,
            log_level=log_level,
            ready_file=ready_file,
            state_file=state_file,
            fd=fd,
        )
    except ValueError as error:  # the state file
        click.echo(f"registry-migrator simulator: {error}", err=True)
        sys.exit(2)
    except OSError as error:
        reason = error.strerror or error
        where = f"file descriptor {fd}" if fd is not None else f"{host}:{port}"
        click.echo(f"registry-migrator simulator: cannot listen on {where}: {reason}", err=True)
        sys.exit(1)
