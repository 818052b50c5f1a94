"""Operator-facing fixtures: a fresh database per module (``store``) on the shared stack."""

from __future__ import annotations

from tests.fixtures import clean_store, database_url, store

__all__ = ["clean_store", "database_url", "store"]
