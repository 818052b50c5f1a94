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
"""

from __future__ import annotations

from collections.abc import Callable

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


@pytest.mark.timeout(420)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_registry_fault_costs_no_repository(
    fault: str,
    clean_store: Store,
    database_url: str,
    make_migration: Callable[..., LocalMigration],
) -> None:
    seed_spread(clean_store, REPOSITORIES, seed=11)
    prepare(clean_store)
    run = make_migration(**migration_options())
    run.start(timeout=120)

    def while_it_lasts(outage: Outage) -> None:
        assert outage.skipped == 0, outage
        assert outage.charged == 0, outage
        if fault == "401":
            assert outage.paused_reason, outage  # paused itself, and says why
        else:
            assert outage.undone > 0, outage  # claims were tried, and undone

    outage = run_outage(
        run, clean_store, database_url, FAULTS[fault], hold_s=HOLD_S, on_fault_end=while_it_lasts
    )
    print(f"\n{outage.row()}")
    assert outage.resume_s is not None and outage.resume_s <= RESUME_BOUND_S, outage.row()
    assert outage.terminal == outage.total == REPOSITORIES
    assert outage.wrong_ends == []
    assert outage.charged_aborts == []
