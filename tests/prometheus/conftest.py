"""Fixtures of the Prometheus tests: Debian's ``promtool`` and ``prometheus`` binaries.

``deploy/local/stack up`` installs the Debian package ``prometheus`` (when root) along with the
servers; it is never started as a service, the tests run their own server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.fixtures import database_url, store  # noqa: F401 (fixtures of this folder)

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"


def _binary(name: str) -> Path:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found: install Debian's prometheus package"
            " (`deploy/local/stack up` does as root, or: apt-get install prometheus)",
            pytrace=False,
        )
    return Path(found)


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Path of ``promtool``."""
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    """Path of the ``prometheus`` server."""
    return _binary("prometheus")
