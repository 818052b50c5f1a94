"""The pool's quiet check (migration/connection_check.py) on a real PostgreSQL."""

from __future__ import annotations

import time

import psycopg
import pytest

from migration.connection_check import check_quietly
from migration.store import Store


def _last_query(admin: psycopg.Connection[object], pid: int) -> str:
    row = admin.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    assert row is not None
    return str(row[0])


def _terminate(admin: psycopg.Connection[object], pid: int) -> None:
    """End the backend ``pid`` and wait until it is gone (its FATAL message sent)."""
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 10
    while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
        assert time.monotonic() < deadline, "the backend did not end"
        time.sleep(0.05)


def test_a_quiet_connection_is_handed_out_without_a_round_trip(database_url: str) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as admin,
        psycopg.connect(database_url, autocommit=True) as conn,
    ):
        conn.execute("SELECT 42 AS marker")
        check_quietly(conn)
        # The server's view of the backend: its last statement is still ours, not the
        # full check's empty query.
        assert _last_query(admin, conn.info.backend_pid) == "SELECT 42 AS marker"


def test_a_connection_the_server_ended_fails_the_check(database_url: str) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as admin,
        psycopg.connect(database_url, autocommit=True) as conn,
    ):
        _terminate(admin, conn.info.backend_pid)
        with pytest.raises(psycopg.OperationalError):
            check_quietly(conn)


def test_the_store_replaces_a_pooled_connection_the_server_ended(database_url: str) -> None:
    with (
        Store(database_url, min_size=1, max_size=1) as store,
        psycopg.connect(database_url, autocommit=True) as admin,
    ):
        with store._connection() as conn:
            pid = conn.info.backend_pid
        _terminate(admin, pid)
        # The next call gets a working connection (a new backend), not the dead one's error.
        with store._connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.backend_pid != pid
