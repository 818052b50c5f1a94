"""The reference's validation steps (GitLab's enqueuer rollout), from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from devtools.launcher import LocalMigration
from migration.store import Store
from tests.actors.conftest import wait_until

CLI = str(Path(sys.executable).with_name("registry-migrator"))


def _cli(run: LocalMigration, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        env={**os.environ, **run.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _runs_after(run: LocalMigration, seen: int) -> Callable[[], list[dict[str, Any]]]:
    def read() -> list[dict[str, Any]]:
        return run.log_events("worker-0", "enqueue_next_migration")[seen:]

    return read


def test_lease_taken_then_no_candidate(
    clean_store: Store, make_migration: Callable[..., LocalMigration]
) -> None:
    repository_id = clean_store.add_repository(
        "validation/one-eligible", created_at=datetime.now(UTC) - timedelta(seconds=3)
    )
    run = make_migration(workers=1, threads=2, scheduler=False, api=False)
    run.start()

    taken = _cli(run, "leases", "take", str(repository_id), "--ttl", "1800")
    assert taken.returncode == 0, taken.stderr
    try:
        enqueued = _cli(run, "enqueue")
        assert enqueued.returncode == 0, enqueued.stderr
        assert "enqueued one run" in enqueued.stdout
        (line,) = wait_until(_runs_after(run, 0), timeout=30, what="the run's log line")
        assert line["lease_already_taken"] is True
        assert line["migration_enabled"] is True and line["below_capacity"] is True
        assert line["job_status"] == "all_candidates_busy"
        assert line["candidates_tried"] == 1
        assert "container_repository_id" not in line  # nothing was stepped
        assert clean_store.get(repository_id).migration_state == "default"  # type: ignore[union-attr]
    finally:
        released = _cli(run, "leases", "release", str(repository_id))
    assert released.returncode == 0, released.stderr

    # Ineligible now: created after the cut-off.
    clean_store.update_settings(created_before=datetime.now(UTC) - timedelta(minutes=1))
    enqueued = _cli(run, "enqueue")
    assert enqueued.returncode == 0, enqueued.stderr
    (line,) = wait_until(_runs_after(run, 1), timeout=30, what="the second run's log line")
    assert line["no_container_repository_found"] is True
    assert line["job_status"] == "no_candidate"
    assert "lease_already_taken" not in line
    assert clean_store.get(repository_id).migration_state == "default"  # type: ignore[union-attr]
