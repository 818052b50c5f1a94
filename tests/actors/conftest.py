"""Fixtures of the actor tests: a fresh database per module, local migrations on it.

Everything is real: PostgreSQL, etcd and RabbitMQ of the shared stack, the simulator, the
API, ``dramatiq actors`` workers and the scheduler as processes (``devtools.launcher``).
Each migration has its own etcd prefix and RabbitMQ queue, so runs of several people on the
same servers never see each other's keys or messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from devtools.launcher import LocalMigration
from tests.fixtures import clean_store, database_url, seed_spread, store, wait_until
from tests.invariants import TERMINAL, all_terminal, stale_accepted_writes

__all__ = [
    "TERMINAL",
    "all_terminal",
    "clean_store",
    "database_url",
    "seed_spread",
    "stale_accepted_writes",
    "store",
    "wait_until",
]


@pytest.fixture
def queue(stack: dict[str, str], request: pytest.FixtureRequest) -> Iterator[str]:
    """A queue name of the test's own; the queue, its ``.DQ`` and ``.XQ`` are deleted
    from the stack's RabbitMQ after the test."""
    name = f"{request.module.__name__.rpartition('.')[2]}_{uuid.uuid4().hex[:8]}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(stack["MIGRATOR_BROKER_URL"]))
    channel = connection.channel()
    for suffix in ("", ".DQ", ".XQ"):
        channel.queue_delete(queue=name + suffix)
    connection.close()


@pytest.fixture
def migration_env(stack: dict[str, str], database_url: str) -> dict[str, str]:
    """The ``MIGRATOR_*`` variables of a child process: the stack, this module's database."""
    return {**stack, "MIGRATOR_DATABASE_URL": database_url, "MIGRATOR_LOG_LEVEL": "info"}


@pytest.fixture
def make_migration(
    migration_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LocalMigration]]:
    """Build (not start) local migrations; every one is stopped after the test.

    When the test failed, each run's digest (events counted, the last lines of every
    process) is printed: CI shows only the report, not the log files.
    """
    made: list[LocalMigration] = []

    def make(**options: Any) -> LocalMigration:
        options.setdefault("log_dir", tmp_path / f"run-{len(made)}")
        run = LocalMigration(env={**migration_env, **options.pop("env", {})}, **options)
        made.append(run)
        return run

    yield make
    report = getattr(request.node, "rep_call", None)
    for run in made:
        if report is not None and report.failed:
            print(run.digest())
        run.stop(timeout=20)
        run.delete_queues()
