"""Fixtures shared by several test areas; a conftest imports the ones it uses.

``database_url``: a fresh PostgreSQL database per test module on the shared stack. It has a
random name and is dropped (``WITH (FORCE)``) after the module, so tests of several people
never see each other's rows. ``store``: a Store on it with the schema applied;
``clean_store``: that store emptied, with default settings, for tests that count.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

# Re-exported: the tests import it from here.
from devtools.seeding import seed_spread  # noqa: F401
from devtools.waiting import wait_until  # noqa: F401  # the tests import it from here
from migration.config import Config
from migration.store import Store


def database_url_for(base_url: str, dbname: str) -> str:
    """``base_url`` (a postgresql:// URL, as MIGRATOR_DATABASE_URL is) for database ``dbname``."""
    return urlunsplit(urlsplit(base_url)._replace(path=f"/{dbname}"))


@contextmanager
def temporary_database(admin_url: str, *, prefix: str) -> Iterator[str]:
    """A new database on the server of ``admin_url``, schema applied; dropped afterwards.

    :param prefix: the start of its random name (which test made it, when one is left).
    """
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = database_url_for(admin_url, name)
    try:
        with Store(url, max_size=2) as store:
            store.upgrade()
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="module")
def database_url(stack: dict[str, str]) -> Iterator[str]:
    """A new, empty database for this module; dropped afterwards."""
    admin_url = Config.from_env().database_url
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url_for(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="module")
def store(database_url: str) -> Iterator[Store]:
    """A Store on this module's database, schema applied. Shared by the module's tests."""
    with Store(database_url, max_size=40) as s:
        s.upgrade()
        yield s


@pytest.fixture
def clean_store(store: Store, database_url: str) -> Store:
    """``store`` with no repositories or events and default settings, for tests that count."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE container_repositories, migration_events RESTART IDENTITY")
        conn.execute("DELETE FROM migration_settings")
        conn.execute("INSERT INTO migration_settings (id) VALUES (1)")
    return store
