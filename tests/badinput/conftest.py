"""Fixtures of the bad-input tests: a fresh database per module (``tests.fixtures``)."""

from __future__ import annotations

from tests.fixtures import clean_store, database_url, store

__all__ = ["clean_store", "database_url", "store"]
