"""Fixtures of the actor tests: a fresh database per module, local migrations on it.

Everything is real: PostgreSQL, etcd and RabbitMQ of the shared stack, the simulator, the
API, ``dramatiq actors`` workers and the scheduler as processes (``service.launcher``).
Each migration has its own etcd prefix and RabbitMQ queue, so runs of several people on the
same servers never see each other's keys or messages.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migration.states import State
from migration.store import Store
from service.launcher import LocalMigration
from tests.fixtures import clean_store, database_url, store

__all__ = ["clean_store", "database_url", "store"]

TERMINAL = (State.IMPORT_DONE, State.IMPORT_SKIPPED)


@pytest.fixture
def migration_env(stack: dict[str, str], database_url: str) -> dict[str, str]:
    """The ``MIGRATOR_*`` variables of a child process: the stack, this module's database."""
    return {**stack, "MIGRATOR_DATABASE_URL": database_url, "MIGRATOR_LOG_LEVEL": "info"}


@pytest.fixture
def make_migration(
    migration_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., LocalMigration]]:
    """Build (not start) local migrations; every one is stopped after the test."""
    made: list[LocalMigration] = []

    def make(**options: Any) -> LocalMigration:
        options.setdefault("log_dir", tmp_path / f"run-{len(made)}")
        run = LocalMigration(env={**migration_env, **options.pop("env", {})}, **options)
        made.append(run)
        return run

    yield make
    for run in made:
        run.stop(timeout=20)
        run.delete_queues()


def seed_spread(store: Store, count: int, *, seed: int = 7) -> list[int]:
    """Add ``count`` repositories, about a tenth with each of the simulator's special paths.

    ``native`` (already imported: skipped native_import), ``missing`` (404: skipped
    not_found), ``fail-once`` (pre-import fails once, then migrates), ``fail-always``
    (skipped too_many_retries); the rest migrate normally. Created a day ago and earlier.
    """
    rng = random.Random(seed)
    specials = ("native", "missing", "fail-once", "fail-always")
    ids = []
    old = datetime.now(UTC) - timedelta(days=1)
    for n in range(count):
        kind = specials[n % 10] if n % 10 < len(specials) else "plain"
        path = f"group-{n % 17}/project-{n}/{kind}-{rng.randrange(10**6)}"
        ids.append(
            store.add_repository(
                path, created_at=old - timedelta(minutes=n), tags_count=rng.randrange(1, 20)
            )
        )
    return ids


def wait_until(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def all_terminal(store: Store) -> bool:
    """True when every repository is import_done or import_skipped."""
    counts = store.counts_by_state()
    return sum(n for state, n in counts.items() if state not in TERMINAL) == 0


def stale_accepted_writes(database_url: str) -> list[tuple[Any, ...]]:
    """Accepted writes whose token is older than an earlier accepted write of the same row.

    Such a write is what fencing forbids: a holder whose lease had passed to someone else
    writing after them. Empty when invariant 1 held.
    """
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT repository_id, id, token, newest_before FROM ("
            " SELECT repository_id, id, token, max(token) OVER (PARTITION BY repository_id"
            "  ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS newest_before"
            " FROM migration_events WHERE accepted) w"
            " WHERE token < newest_before"
        ).fetchall()
