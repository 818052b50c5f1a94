"""``registry-migrator db``: the PostgreSQL schema; and ``open_store`` for other commands."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from migration.config import Config

if TYPE_CHECKING:
    from migration.store import Store


def fail(message: str, status: int = 1) -> None:
    """Print one line on standard error and exit with ``status``."""
    click.echo(f"registry-migrator: {message}", err=True)
    sys.exit(status)


@contextmanager
def open_store(*, require_schema: bool = True) -> Iterator[Store]:
    """A Store on ``MIGRATOR_DATABASE_URL``; database trouble becomes one line and exit 1.

    :param require_schema: refuse (one line, exit 1) a schema older than this release
        needs; only ``db upgrade``, the fix, opens the store without.
    """
    # Imported here, not above: ``--help`` of the commands that use a store imports neither.
    import psycopg
    import structlog

    from migration.store import Store, StoreError

    config = Config.from_env()
    if not structlog.is_configured():
        # A command prints its own result on stdout (maybe JSON); the store's log lines
        # would only get in the way there. Warnings and errors still go to stderr.
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        )
    try:
        with Store(
            config.database_url, max_size=2, connect_options=config.database_options()
        ) as store:
            if require_schema:
                store.require_schema()
            yield store
    except StoreError as error:
        fail(str(error))
    except psycopg.errors.UndefinedTable:
        fail("the database has no schema yet; run `registry-migrator db upgrade`")
    except psycopg.Error as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        fail(f"database error: {first}")


@click.group()
def db() -> None:
    """Manage the PostgreSQL schema.

    \b
    Example:
      registry-migrator db upgrade
    """


@db.command()
def upgrade() -> None:
    """Apply the schema versions not applied yet (safe to run again, and concurrently).

    \b
    Example:
      registry-migrator db upgrade
    """
    with open_store(require_schema=False) as store:
        applied = store.upgrade()
        versions = store.schema_versions()
    if applied:
        click.echo(f"applied {', '.join(applied)}; schema at {versions[-1]}")
    else:
        click.echo(f"schema up to date at {versions[-1] if versions else 'nothing'}")
