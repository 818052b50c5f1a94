"""Fixtures of the bad-input tests: a fresh database per module (``tests.fixtures``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures import clean_store, database_url, store

__all__ = ["clean_store", "database_url", "store"]


SUMMARY_ATTRIBUTE = "registry_migrator_summary_lines"


def add_summary_lines(config: pytest.Config, lines: list[str]) -> None:
    """Lines to print in the terminal summary at the end of the run (figures of a test)."""
    if getattr(config, SUMMARY_ATTRIBUTE, None) is None:
        setattr(config, SUMMARY_ATTRIBUTE, [])
    getattr(config, SUMMARY_ATTRIBUTE).extend(lines)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = getattr(config, SUMMARY_ATTRIBUTE, None)
    if lines:
        terminalreporter.section("bad input figures")
        for line in lines:
            terminalreporter.write_line(line)
