"""The whole migration with real processes: workers, API, scheduler, simulator."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from devtools.launcher import LocalMigration
from migration.states import State
from migration.store import Store
from tests.actors.conftest import all_terminal, seed_spread, stale_accepted_writes, wait_until
from tests.invariants import wrong_end_states


@pytest.mark.parametrize(
    "count", [300, pytest.param(2000, marks=pytest.mark.slow, id="2000-slow")], ids=str
)
def test_repositories_migrate_with_two_workers(
    count: int,
    clean_store: Store,
    database_url: str,
    make_migration: Callable[..., LocalMigration],
) -> None:
    ids = seed_spread(clean_store, count)
    clean_store.update_settings(
        capacity=8, enqueue_interval=1, guard_interval=2, max_step_duration=20
    )
    run = make_migration(workers=2, threads=4)
    started = time.monotonic()
    run.start()
    wait_until(
        lambda: all_terminal(clean_store),
        timeout=150 * count / 300,
        interval=1,
        what="all terminal",
    )
    elapsed = time.monotonic() - started
    report = run.report()
    codes = run.stop()

    counts = clean_store.counts_by_state()
    assert counts.get(State.IMPORT_DONE, 0) + counts.get(State.IMPORT_SKIPPED, 0) == len(ids)
    # Each ended as its path says (tests/invariants.END_BY_MARKER, the one table).
    assert wrong_end_states(database_url) == []
    assert report["overlapping_repositories"] == []
    assert report["max_concurrent_imports"] <= 8
    assert stale_accepted_writes(database_url) == []
    assert all(code == 0 for code in codes.values()), codes
    print(f"{count} repositories in {elapsed:.1f} s; report {report['outcomes']}")
