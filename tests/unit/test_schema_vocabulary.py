"""migration/states.py is the one vocabulary of states: every list of state or reason
literals written in the schema files names exactly the states the code groups that way."""

from __future__ import annotations

import re

from migration.states import (
    ACTIVE_STATES,
    DONE_REASONS,
    FINISHED_STATES,
    SkipReason,
    State,
)
from migration.store import schema_files

SCHEMA = "\n".join(text for _, text in schema_files())


def _literals(fragment: str) -> set[str]:
    return set(re.findall(r"'([a-z_]+)'", fragment))


def _in_lists(column: str) -> list[set[str]]:
    """Every ``column IN (...)`` / ``column = ANY ...`` literal list of the schema."""
    return [_literals(m) for m in re.findall(rf"{column} IN \(([^)]*)\)", SCHEMA)]


def test_the_state_check_names_every_state() -> None:
    [check] = re.findall(
        r"migration_state text NOT NULL DEFAULT 'default' CHECK \(([^;]*?)\)\)", SCHEMA, re.S
    )
    assert _literals(check) == {s.value for s in State}


def test_the_reason_check_names_every_reason() -> None:
    [check] = re.findall(r"migration_skipped_reason text CHECK \(([^;]*?)\)\)", SCHEMA, re.S)
    assert _literals(check) == {r.value for r in SkipReason}


def test_state_lists_are_the_groups_of_states_py() -> None:
    groups = {
        frozenset(s.value for s in ACTIVE_STATES): "active",
        frozenset(s.value for s in FINISHED_STATES): "finished",
        frozenset({State.IMPORT_ABORTED.value, State.DEFAULT.value}): "waiting",
        frozenset(s.value for s in State): "every state (the CHECK)",
    }
    lists = _in_lists("migration_state")
    assert lists, "no state list found in the schema"
    for found in lists:
        assert frozenset(found) in groups, f"{sorted(found)} is no group of migration/states.py"
    # The active list is written in the partial index and in the fenced-write function.
    assert (
        sum(frozenset(found) == frozenset(s.value for s in ACTIVE_STATES) for found in lists) >= 2
    )


def test_the_reasons_beside_import_done_are_done_reasons() -> None:
    every = {r.value for r in SkipReason}
    lists = [found for found in _in_lists("migration_skipped_reason") if found != every]
    assert lists, "no reason list found beside import_done"
    for listed in lists:
        assert listed == {r.value for r in DONE_REASONS}
