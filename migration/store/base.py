"""The connection pool every part of :class:`~migration.store.Store` works through."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import kwargs_row
from psycopg_pool import ConnectionPool, PoolTimeout

from migration.store.model import Repository, StoreUnavailable

log = structlog.get_logger("migration.store")


def _where(database_url: str) -> str:
    try:
        params = conninfo_to_dict(database_url)
    except psycopg.ProgrammingError:
        return "the configured database"
    return (
        f"{params.get('host', 'localhost')}:{params.get('port', 5432)}/{params.get('dbname', '')}"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


#: Seconds a pooled connection may sit unused and still be handed out without a check.
IDLE_BEFORE_CHECK = 1.0


def _stamp_returned(conn: psycopg.Connection[Any]) -> None:
    conn._migration_returned_at = time.monotonic()  # type: ignore[attr-defined]


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    returned = getattr(conn, "_migration_returned_at", None)
    if returned is None or time.monotonic() - returned > IDLE_BEFORE_CHECK:
        ConnectionPool.check_connection(conn)


class StoreBase:
    """The migration's PostgreSQL state. Thread-safe; one per process.

    :param database_url: PostgreSQL URL (``Config.database_url``).
    :param min_size: connections the pool keeps open.
    :param max_size: most connections the pool opens (size it to the worker threads).
    :param timeout: seconds a call waits for a free connection before
        :class:`StoreUnavailable`.
    :raises StoreUnavailable: PostgreSQL cannot be reached now.
    """

    def __init__(
        self, database_url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 30.0
    ) -> None:
        self._where = _where(database_url)
        try:
            # Fail now, with one clear line, rather than after the pool's timeout.
            psycopg.connect(database_url, connect_timeout=5).close()
        except psycopg.Error as error:
            raise StoreUnavailable(
                f"cannot reach PostgreSQL at {self._where}: {_first_line(error)}"
            ) from None
        self._pool = ConnectionPool(
            database_url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            kwargs={"autocommit": True, "connect_timeout": 5},
            # The check costs a round trip: only for a connection idle long enough to have
            # been lost meanwhile (a server restart, an idle timeout); one used a moment
            # ago is alive, or fails its next query as it could right after any check.
            check=_check_if_idle,
            reset=_stamp_returned,
            name="migration-store",
            open=True,
        )
        self._refused = 0
        self._refused_lock = threading.Lock()

    def close(self) -> None:
        """Close every connection."""
        self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as error:
            raise StoreUnavailable(
                f"no PostgreSQL connection to {self._where}: {_first_line(error)}"
            ) from None

    def _one(self, query: str, params: tuple[object, ...]) -> Repository | None:
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            return cur.execute(query.encode(), params).fetchone()

    def _many(
        self, query: str | bytes | sql.Composed, params: dict[str, object]
    ) -> list[Repository]:
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            text = query.encode() if isinstance(query, str) else query
            return cur.execute(text, params).fetchall()
