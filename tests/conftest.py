"""Root test configuration: the shared local stack and the --long switch.

Fixtures of one area (leases, store, actors...) live in that area's own conftest.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# Re-exported: the chaos fixtures import it from here.
from devtools.stack_env import parse_stack_env

REPO_ROOT = Path(__file__).resolve().parent.parent
STACK_SCRIPT = REPO_ROOT / "deploy" / "local" / "stack"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="also run the tests marked slow (chaos, soak)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # etcd3 0.12's generated protobuf code warns on import; nothing we can act on.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:etcd3")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    # Each phase's report on the item (``item.rep_call``...): a fixture's teardown can tell
    # whether the test failed and print what helps to understand why.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def _run_stack(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STACK_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def stack() -> dict[str, str]:
    """The shared local stack (PostgreSQL, etcd, RabbitMQ), started when not all up.

    Sets the ``MIGRATOR_*`` variables of ``deploy/local/stack env`` into ``os.environ``.

    :returns: those variables by name.
    """
    if _run_stack("status", timeout=60).returncode != 0:
        up = _run_stack("up", timeout=900)
        if up.returncode != 0:
            pytest.fail(
                f"deploy/local/stack up failed (exit {up.returncode}):\n{up.stdout}{up.stderr}",
                pytrace=False,
            )
    printed = _run_stack("env", timeout=60)
    if printed.returncode != 0:
        pytest.fail(f"deploy/local/stack env failed:\n{printed.stderr}", pytrace=False)
    variables = parse_stack_env(printed.stdout)
    os.environ.update(variables)
    return variables
