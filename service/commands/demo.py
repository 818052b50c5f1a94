"""``registry-migrator demo``: the whole migration on this machine, watched live.

What the demo runs (psycopg, rich, etcd, the launcher) is imported inside the command, so
``demo --help`` loads none of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from migration.config import Config

if TYPE_CHECKING:
    from service.status import MigrationStatus

#: Exit statuses besides 0 (every eligible repository terminal).
EXIT_UNFINISHED = 1  # the timeout passed, or a process the demo needs died
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM


class _Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM: leave the run and stop every child."""


def _on_signal(_signum: int, _frame: FrameType | None) -> None:
    # Further signals are ignored while the children are stopped: a second Ctrl-C must
    # not interrupt the shutdown half-way and leave processes behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"registry-migrator: {message}", err=True)
    sys.exit(status)


def _simulator_args(*, capacity: int, time_scale: float, seed: int) -> list[str]:
    # Durations in the range of a small registry repository's pre-import and import, scaled;
    # the registry's own concurrency limit equals the capacity (a 429 would undo a claim).
    return [
        "--pre-import-seconds", f"{0.5 * time_scale:g}", f"{2.5 * time_scale:g}",
        "--import-seconds", f"{0.5 * time_scale:g}", f"{3.0 * time_scale:g}",
        "--max-concurrent", str(capacity),
        "--pre-import-failure-rate", "0.02",
        "--import-failure-rate", "0.02",
        "--seed", str(seed),
        "--log-level", "warning",
    ]  # fmt: skip


def _snapshot(config: Config) -> MigrationStatus | None:
    import psycopg

    from service.status import collect

    try:
        return collect(config, recent=0)
    except psycopg.Error:
        return None  # a blip: the next poll tries again


@click.command()
@click.option("--count", type=click.IntRange(min=1), default=500, show_default=True,
              help="Repositories to seed.")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes (dramatiq actors).")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=8, show_default=True,
              help="Threads per worker process.")  # fmt: skip
@click.option("--capacity", type=click.IntRange(min=1), default=20, show_default=True,
              help="Most migrations in flight at once.")  # fmt: skip
@click.option("--lease-scope", type=click.Choice(["repository", "global"]),
              default="repository", show_default=True,
              help="One lease per repository, or the reference's single global lease.")  # fmt: skip
@click.option("--seed", "rng_seed", type=int, default=1, show_default=True,
              help="Seed of the repositories and the simulator.")  # fmt: skip
@click.option("--time-scale", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Scales simulated durations (0.5-2.5 s pre, 0.5-3 s final).")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Seconds before giving up (exit 1).")  # fmt: skip
@click.option("--no-live", is_flag=True, help="Plain progress lines instead of the live view.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=None,
              help="Seconds between updates [default: 0.5 live, 5 with --no-live].")  # fmt: skip
@click.option("--database", default="migrator_demo", show_default=True,
              envvar="MIGRATOR_DEMO_DATABASE", show_envvar=True,
              help="Database the demo DROPS and recreates (on the configured server).")  # fmt: skip
@click.option("--etcd-prefix", default="/registry-migrator-demo", show_default=True,
              envvar="MIGRATOR_DEMO_ETCD_PREFIX", show_envvar=True)  # fmt: skip
@click.option("--queue-name", default="registry_migrator_demo", show_default=True,
              envvar="MIGRATOR_DEMO_QUEUE_NAME", show_envvar=True)  # fmt: skip
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the processes' logs go [default: a new temporary folder].")  # fmt: skip
def demo(
    *,
    count: int,
    workers: int,
    threads: int,
    capacity: int,
    lease_scope: str,
    rng_seed: int,
    time_scale: float,
    timeout: float,
    no_live: bool,
    interval: float | None,
    database: str,
    etcd_prefix: str,
    queue_name: str,
    log_dir: Path | None,
) -> None:
    """Migrate COUNT seeded repositories through a simulated registry, live.

    Creates a fresh database (--database, dropped first), seeds it with a realistic spread
    (a denied root namespace, a few repositories over the tags limit, some the simulator
    fails once or always, a few native and missing ones), starts the simulator, the API,
    a scheduler and the workers, shows progress, then a summary. Repositories of the
    denied namespace are never picked: they count as excluded, and the demo succeeds (exit
    0) when every other repository is import_done or import_skipped. Exit 1 on timeout,
    130 on Ctrl-C or SIGTERM (every child process is stopped first).

    \b
    Examples:
      registry-migrator demo
      registry-migrator demo --count 40 --workers 2 --no-live --time-scale 0.2
      registry-migrator demo --lease-scope global   # the reference's single lease
    """
    import psycopg
    import structlog
    from rich.console import Console
    from rich.live import Live

    from devtools.demo import (
        DENIED_NAMESPACE,
        MAX_TAGS,
        DemoDatabaseError,
        Outcome,
        Progress,
        busy_lease_runs,
        insert_repositories,
        live_view,
        migration_seconds,
        plan_repositories,
        progress_line,
        recreate_database,
        summary_table,
    )
    from devtools.launcher import LaunchError, LocalMigration
    from leases import LeaseError
    from migration.store import Store
    from service.status import collect

    base = Config.from_env()
    if no_live and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach CI logs at once
    # This process prints the view; the store's info lines would only garble it.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    console = Console()
    say = console.print if not no_live else click.echo
    try:
        url = recreate_database(base.database_url, database)
    except DemoDatabaseError as error:
        _fail(str(error))
    env = {
        **{k: v for k, v in os.environ.items() if k.startswith("MIGRATOR_")},
        "MIGRATOR_DATABASE_URL": url,
    }
    config = Config.from_env({**env, "MIGRATOR_ETCD_PREFIX": etcd_prefix})
    inserted = insert_repositories(url, plan_repositories(count, seed=rng_seed))
    with Store(url, max_size=1) as store:
        store.update_settings(
            enabled=True, capacity=capacity, enqueue_waiting_time=0, created_before=None,
            max_tags_count=MAX_TAGS, max_retries=3, root_namespace_deny_list=[DENIED_NAMESPACE],
            lease_scope=lease_scope, pending_enqueues=None, enqueue_interval=1, guard_interval=2,
            max_step_duration=max(30.0, 20 * time_scale), pre_import_timeout=120,
            import_timeout=120,
        )  # fmt: skip
    logs = log_dir or Path(tempfile.mkdtemp(prefix="registry-migrator-demo-"))
    say(f"seeded {inserted} repositories into database {database!r}; logs in {logs}")

    run = LocalMigration(
        env=env, log_dir=logs, workers=workers, threads=threads,
        simulator_args=_simulator_args(capacity=capacity, time_scale=time_scale, seed=rng_seed),
        etcd_prefix=etcd_prefix, queue_name=queue_name,
    )  # fmt: skip
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress()
    status: MigrationStatus | None = None
    finished = interrupted = False
    elapsed: float | None = None
    problem = ""
    registry: dict[str, object] | None = None
    every = interval if interval is not None else (5.0 if no_live else 0.5)
    try:
        try:
            say("starting the simulator, the API, a scheduler and "
                f"{workers} worker(s) ({threads} threads each)...")  # fmt: skip
            run.start(timeout=90)
            progress = Progress()
            deadline = time.monotonic() + timeout
            live = None if no_live else Live(console=console, refresh_per_second=4)
            if live is not None:
                live.start()
            try:
                while True:
                    status = _snapshot(config) or status
                    if status is not None:
                        progress.add(status.terminal)
                        if live is not None:
                            live.update(live_view(status, progress))
                        else:
                            click.echo(progress_line(status, progress))
                        if status.done:
                            finished = True
                            elapsed = progress.elapsed
                            break
                    dead = [name for name, up in run.alive().items() if not up]
                    if dead:
                        problem = f"process(es) exited: {', '.join(dead)} (see {logs})"
                        break
                    if time.monotonic() > deadline:
                        problem = f"not finished after {timeout:g} s"
                        break
                    time.sleep(every)
            finally:
                if live is not None:
                    live.stop()
            try:
                registry = run.report()
            except Exception:  # the summary does without it
                registry = None
        except _Stop:
            interrupted = True
            click.echo("stopping every process...", err=True)
        except LaunchError as error:
            problem = f"could not start: {str(error).splitlines()[0]} (see {logs})"
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            codes = run.stop(timeout=30)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    span: float | None = None
    with contextlib.suppress(psycopg.Error, LeaseError):
        status = collect(config, recent=0)
        span = migration_seconds(url)
    runs, busy = busy_lease_runs(sorted(logs.glob("worker-*.log")))
    if status is not None:
        outcome = Outcome(
            status=status, elapsed_s=span or elapsed or progress.elapsed, finished=status.done,
            enqueuer_runs=runs, busy_lease_runs=busy, registry=registry,
        )  # fmt: skip
        console.print(summary_table(outcome))
    click.echo(f"processes stopped: {', '.join(f'{k} {v}' for k, v in codes.items())}")
    click.echo(
        f"inspect: MIGRATOR_DATABASE_URL={url} MIGRATOR_ETCD_PREFIX={etcd_prefix} "
        "registry-migrator status"
    )
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)
    if not finished:
        _fail(problem or "not every eligible repository is terminal", EXIT_UNFINISHED)
