"""Store fixtures: a fresh PostgreSQL database per test module, on the shared stack.

The database has a random name, gets the schema with ``Store.upgrade()``, and is dropped
(``WITH (FORCE)``) after the module, so tests of several people never see each other's rows.
"""

from __future__ import annotations

from tests.fixtures import clean_store, database_url, database_url_for, store

# The fixtures, and the helper the tests import from here.
__all__ = ["clean_store", "database_url", "database_url_for", "store"]
