"""Schema versions without a pool or logging: the files of :mod:`migration.schema`, the
versions applied to a database, and the check that a process may start against it."""

from __future__ import annotations

from importlib import resources
from typing import Any

import psycopg

from migration.store.model import StoreError, StoreUnavailable


def schema_files() -> list[tuple[str, str]]:
    """The schema files as (version, SQL), in the order they apply."""
    folder = resources.files("migration.schema")
    files = sorted(
        (item.name, item.read_text(encoding="utf-8"))
        for item in folder.iterdir()
        if item.name.endswith(".sql")
    )
    return [(name.removesuffix(".sql"), text) for name, text in files]


def required_version() -> str:
    """The newest schema version this release ships, which its processes need."""
    return schema_files()[-1][0]


class SchemaOutdated(StoreError):
    """The database's schema is older than this release needs. One line naming the missing
    versions and the fix (``registry-migrator db upgrade``)."""


def applied_versions(conn: psycopg.Connection[Any]) -> list[str]:
    """The versions applied to the database of ``conn`` (empty before the first upgrade)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]


def require_schema_on(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`SchemaOutdated` unless every schema version of this release is applied.

    For processes that reach the database without a :class:`~migration.store.Store`
    (``registry-migrator status``).
    """
    require_versions(applied_versions(conn))


def require_versions(applied: list[str]) -> None:
    """Raise :class:`SchemaOutdated` when a version of :func:`schema_files` is not in
    ``applied``."""
    missing = [version for version, _ in schema_files() if version not in applied]
    if missing:
        at = f"is at {applied[-1]}" if applied else "has no schema yet"
        raise SchemaOutdated(
            f"the database {at}, this release needs {missing[-1]}"
            f" (missing: {', '.join(missing)}); run `registry-migrator db upgrade`"
        )


def check_schema(database_url: str) -> None:
    """Check, on a connection of its own, that the database at ``database_url`` has every
    schema version of this release (a process's start-up check, before it makes its Store).

    :raises SchemaOutdated: a version is missing (the message says to run ``db upgrade``).
    :raises StoreUnavailable: PostgreSQL cannot be reached now.
    """
    try:
        with psycopg.connect(database_url, connect_timeout=5, autocommit=True) as conn:
            require_schema_on(conn)
    except psycopg.Error as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise StoreUnavailable(f"cannot reach PostgreSQL: {first}") from None
