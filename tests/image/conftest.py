"""Fixtures of the image tests: a fresh database per module on the shared stack."""

from __future__ import annotations

from tests.fixtures import database_url

__all__ = ["database_url"]
