"""A fresh PostgreSQL database per module (see tests/fixtures.py)."""

from tests.fixtures import clean_store, database_url, store

__all__ = ["clean_store", "database_url", "store"]
