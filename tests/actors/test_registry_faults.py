"""Registry faults against the real stack: never a repository's failure (invariant 7).

For each fault class of ``devtools.registry_outage.FAULTS`` (the registry's process stopped,
503 on every start, answers later than the client's timeout, a rotated token answered 401,
connections closed mid-answer, answers that are not the API's), a local migration (2
workers, a scheduler, the API, the simulator) of 24 repositories with every path marker
meets the fault from its first run:

- while the fault lasts, no repository is skipped and no retry is charged (claims are
  undone; on 401 the migration pauses itself with a reason);
- after it ends the registry gets a start within the breaker's cap + 5 s (the 401: after
  ``registry-migrator resume``), with no trigger from the test;
- then every repository ends as its path says, and every abort has a repository's cause.

The fault classes take turns on one migration (its processes start once per module, which
was most of each class's minutes): each class gets a truncated database and 24 new paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.launcher import LocalMigration
from devtools.registry_outage import (
    FAULTS,
    RESUME_BOUND_S,
    Outage,
    migration_options,
    prepare,
    run_outage,
)
from migration.store import Store
from tests.fixtures import seed_spread

REPOSITORIES = 24
#: How long each fault lasts once the migration is enabled (at least until seen).
HOLD_S = 4.0


@pytest.fixture(scope="module")
def outage_run(
    stack: dict[str, str], database_url: str, store: Store, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalMigration]:
    """One started migration that every fault class of the module uses in turn."""
    options = migration_options()
    env = {**stack, "MIGRATOR_DATABASE_URL": database_url, "MIGRATOR_LOG_LEVEL": "info"}
    run = LocalMigration(
        env={**env, **options.pop("env")},
        log_dir=Path(tmp_path_factory.mktemp("registry-faults")),
        **options,
    )
    # Before the scheduler starts: it reads its intervals when it sleeps.
    prepare(store)
    try:
        run.start(timeout=120)
        yield run
    finally:
        run.stop(timeout=20)
        run.delete_queues()


@pytest.fixture
def paused_store(store: Store, database_url: str, outage_run: LocalMigration) -> Iterator[Store]:
    """``store`` emptied for the next fault class, the migration paused (never claimed)."""
    # The settings stay the module's (a reset would hand the scheduler a 60 s interval).
    prepare(store)
    with psycopg.connect(database_url) as conn:
        conn.execute("TRUNCATE container_repositories, migration_events RESTART IDENTITY")
    yield store
    # The next class seeds before it enables: claims until then are refused by the store.
    store.update_settings(enabled=False)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_registry_fault_costs_no_repository(
    fault: str, paused_store: Store, database_url: str, outage_run: LocalMigration
) -> None:
    store = paused_store
    # Paths of their own per class: the simulator remembers what it did for a path.
    seed_spread(store, REPOSITORIES, seed=11 + list(FAULTS).index(fault))

    def while_it_lasts(outage: Outage) -> None:
        assert outage.skipped == 0, outage
        assert outage.charged == 0, outage
        if fault == "401":
            assert outage.paused_reason, outage  # paused itself, and says why
        else:
            assert outage.undone > 0, outage  # claims were tried, and undone

    outage = run_outage(
        outage_run, store, database_url, FAULTS[fault], hold_s=HOLD_S, on_fault_end=while_it_lasts
    )
    print(f"\n{outage.row()}")
    assert outage.resume_s is not None and outage.resume_s <= RESUME_BOUND_S, outage.row()
    assert outage.terminal == outage.total == REPOSITORIES
    assert outage.wrong_ends == []
    assert outage.charged_aborts == []
