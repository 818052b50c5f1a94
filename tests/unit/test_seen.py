"""The row's columns a notification carries (``Seen``): what the API writes into the
message, the worker reads back; anything else is not taken for them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from migration.states import State
from migration.store import Repository, Seen

_ROW = Repository.from_row(
    id=7, path="group/app", root_namespace="group", tags_count=3,
    migration_state="import_aborted", migration_retries_count=2,
    migration_aborted_in_state="importing", migration_skipped_reason=None,
    fencing_token=123456789012, created_at=datetime(2026, 1, 1, tzinfo=UTC),
    migration_pre_import_started_at=None, migration_pre_import_done_at=None,
    migration_import_started_at=None, migration_import_done_at=None,
    migration_aborted_at=None, migration_skipped_at=None, last_step_at=None,
    registry_failures=0, registry_last_error=None,
    migration_pre_import_starts=1, migration_import_starts=2,
)  # fmt: skip


def test_the_columns_go_through_a_message_unchanged() -> None:
    seen = Seen.of(_ROW)
    assert seen == Seen(State.IMPORT_ABORTED, 2, State.IMPORTING, 123456789012, 1, 2)
    message = seen.as_message()
    assert message["migration_state"] == "import_aborted"  # JSON: the state's text
    assert Seen.from_message(message) == seen
    assert Seen.from_message({**message, "migration_aborted_in_state": None}) == seen._replace(
        migration_aborted_in_state=None
    )


@pytest.mark.parametrize(
    "change",
    [
        {"migration_state": "nope"},
        {"migration_state": 3},
        {"migration_aborted_in_state": "nope"},
        {"fencing_token": "123"},
        {"fencing_token": None},
        {"migration_retries_count": 1.0},
        {"migration_import_starts": True},
        {"extra": 1},
    ],
)
def test_anything_else_is_not_taken_for_the_columns(change: dict[str, Any]) -> None:
    assert Seen.from_message({**Seen.of(_ROW).as_message(), **change}) is None


@pytest.mark.parametrize("value", [None, "x", 5, [], {}, {"migration_state": "default"}])
def test_not_a_mapping_of_the_columns_is_none(value: object) -> None:
    assert Seen.from_message(value) is None
