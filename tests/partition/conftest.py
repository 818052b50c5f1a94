"""Fixtures of the partition scenarios: a fresh database per module, a local migration
whose workers talk through cuttable links (``tests/partition/links.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.launcher import LocalMigration
from tests.fixtures import clean_store, database_url, store
from tests.partition.scenario import PartitionRun

__all__ = ["clean_store", "database_url", "store"]


@pytest.fixture
def partitioned(
    stack: dict[str, str], database_url: str, clean_store: Any, tmp_path: Path
) -> Iterator[Callable[..., PartitionRun]]:
    """Build partition runs (not started); each is stopped and cleaned up after the test."""
    made: list[PartitionRun] = []

    def make(*, lease_ttl: float = 3, workers: int = 2, threads: int = 2,
             api_links: bool = False, broker_heartbeat: int = 4,
             env: dict[str, str] | None = None) -> PartitionRun:  # fmt: skip
        run = LocalMigration(
            env={**stack, "MIGRATOR_DATABASE_URL": database_url, "MIGRATOR_LOG_LEVEL": "info",
                 **(env or {})},
            log_dir=tmp_path / f"run-{len(made)}",
            workers=workers, threads=threads, lease_ttl=lease_ttl, worker_shutdown_timeout=5,
            simulator_args=["--no-double-start-guard", "--pre-import-seconds", "0.1", "0.3",
                            "--import-seconds", "0.1", "0.3"],
        )  # fmt: skip
        partition = PartitionRun(
            run, clean_store, database_url, workers=workers, api_links=api_links,
            broker_heartbeat=broker_heartbeat,
        )  # fmt: skip
        made.append(partition)
        return partition

    yield make
    for partition in made:
        for links in partition.links:
            links.restore()
        partition.run.stop(timeout=20)
        partition.run.delete_queues()
        partition.close()
