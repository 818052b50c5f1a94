"""The connection pool every part of :class:`~migration.store.Store` works through."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Self

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from migration.connection_check import check_quietly
from migration.store.model import Repository, StoreUnavailable, repository_rows

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


class StoreBase:
    """The migration's PostgreSQL state. Thread-safe; one per process.

    :param database_url: PostgreSQL URL (``Config.database_url``).
    :param min_size: connections the pool keeps open.
    :param max_size: most connections the pool opens (size it to the worker threads).
    :param timeout: seconds a call waits for a free connection before
        :class:`StoreUnavailable`.
    :param connect_options: libpq options of every connection (``Config.database_options``:
        the client-side bounds on a silent server); default a 5 s connect timeout.
    :raises StoreUnavailable: PostgreSQL cannot be reached now.
    """

    def __init__(
        self, database_url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 30.0,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self._where = _where(database_url)
        # Client-side bounds (Config.database_options): keep-alives, tcp_user_timeout...
        options = {"connect_timeout": 5, **(connect_options or {})}
        try:
            # Fail now, with one clear line, rather than after the pool's timeout.
            psycopg.connect(database_url, **options).close()
        except psycopg.Error as error:
            raise StoreUnavailable(
                f"cannot reach PostgreSQL at {self._where}: {_first_line(error)}"
            ) from None
        self._pool = ConnectionPool(
            database_url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            kwargs={"autocommit": True, **options},
            check=check_quietly,  # a round trip only when the socket has news
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
            cur = conn.cursor(row_factory=repository_rows)
            return cur.execute(query.encode(), params).fetchone()

    def _many(
        self, query: str | bytes | sql.Composed, params: dict[str, object]
    ) -> list[Repository]:
        with self._connection() as conn:
            cur = conn.cursor(row_factory=repository_rows)
            text = query.encode() if isinstance(query, str) else query
            return cur.execute(text, params).fetchall()
