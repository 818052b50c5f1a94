"""The :class:`Store`: one object with every part of the store, one pool shared by them."""

from __future__ import annotations

from migration.store.repositories import RepositoriesMixin
from migration.store.schema import SchemaMixin
from migration.store.seed import SeedMixin
from migration.store.settings import SettingsMixin
from migration.store.together import TogetherMixin


class Store(SchemaMixin, SettingsMixin, RepositoriesMixin, TogetherMixin, SeedMixin):
    """The migration's PostgreSQL state. Thread-safe; one per process.

    Each call takes a connection from a ``psycopg_pool.ConnectionPool`` for one short
    transaction. The parts, one module each: schema versions (:mod:`.schema`), settings
    (:mod:`.settings`), repositories and their queries (:mod:`.repositories`), the fenced
    writes (:mod:`.writes`, several in one round trip: :mod:`.together`), seeding (:mod:`.seed`).

    :param database_url: PostgreSQL URL (``Config.database_url``).
    :param min_size: connections the pool keeps open.
    :param max_size: most connections the pool opens (size it to the worker threads).
    :param timeout: seconds a call waits for a free connection before
        :class:`StoreUnavailable`.
    :raises StoreUnavailable: PostgreSQL cannot be reached now.
    """
