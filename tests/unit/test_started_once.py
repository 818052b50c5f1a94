"""When a notification is applied without asking the registry first (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from migration.migrator import started_once
from migration.registry import RegistryImportStatus as Status
from migration.states import State
from migration.store import Repository


def _row(state: State, *, pre: int, final: int) -> Repository:
    return Repository(
        id=1, path="group/image", root_namespace="group", created_at=datetime.now(UTC),
        tags_count=1, migration_state=state, migration_pre_import_started_at=None,
        migration_pre_import_done_at=None, migration_import_started_at=None,
        migration_import_done_at=None, migration_aborted_at=None, migration_skipped_at=None,
        migration_aborted_in_state=None, migration_retries_count=0,
        migration_skipped_reason=None, fencing_token=1, last_step_at=None,
        migration_pre_import_starts=pre, migration_import_starts=final,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "state", "pre", "final", "unchecked"),
    [
        # The phase running, started once: no earlier attempt can have sent it.
        (Status.PRE_IMPORT_COMPLETE, State.PRE_IMPORTING, 1, 0, True),
        (Status.PRE_IMPORT_FAILED, State.PRE_IMPORTING, 1, 0, True),
        (Status.PRE_IMPORT_CANCELED, State.PRE_IMPORTING, 1, 0, True),
        (Status.IMPORT_COMPLETE, State.IMPORTING, 3, 1, True),
        (Status.IMPORT_FAILED, State.IMPORTING, 1, 1, True),
        # Started before (a retry, a requeue, an undone claim, an alignment): checked.
        (Status.PRE_IMPORT_FAILED, State.PRE_IMPORTING, 2, 0, False),
        (Status.IMPORT_FAILED, State.IMPORTING, 1, 2, False),
        (Status.IMPORT_CANCELED, State.IMPORTING, 1, 4, False),
        # Not known (a row from before schema 0006 or written by hand): checked.
        (Status.PRE_IMPORT_COMPLETE, State.PRE_IMPORTING, 0, 0, False),
        (Status.IMPORT_COMPLETE, State.IMPORTING, 1, 0, False),
        # Another phase's count does not stand in for this one's.
        (Status.PRE_IMPORT_COMPLETE, State.PRE_IMPORTING, 0, 1, False),
        # Reported in another state than its phase's (a final start whose answer was lost,
        # undone to pre_import_done): checked.
        (Status.IMPORT_COMPLETE, State.PRE_IMPORT_DONE, 1, 1, False),
        (Status.PRE_IMPORT_COMPLETE, State.PRE_IMPORT_DONE, 1, 0, False),
        (Status.PRE_IMPORT_FAILED, State.IMPORTING, 1, 1, False),
    ],
)
def test_started_once(status: Status, state: State, pre: int, final: int, unchecked: bool) -> None:
    assert started_once(status, _row(state, pre=pre, final=final)) is unchecked


def test_every_notified_status_has_a_phase() -> None:
    # A status added to the registry client without a phase here would always be checked:
    # safe, but this says so rather than letting it pass unnoticed.
    for status in Status:
        if status.ended:
            row = _row(State.PRE_IMPORTING if "pre" in status.value else State.IMPORTING,
                       pre=1, final=1)  # fmt: skip
            assert started_once(status, row), status
