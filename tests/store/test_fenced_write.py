"""The one-call fenced write (schema 0002's ``migration_fenced_write``) against a real PostgreSQL.

The same scripted history of claims, steps, undos and refusals runs on the locked path and on
the function path, and must leave the same rows and the same events; the function path must
answer the common writes without the locked transaction; the function itself writes nothing
when the row no longer holds what the transition was computed from; and a database before
0002 (no function) still gets every write through the locked path, and upgrading one adds
the function.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from migration.states import ACTIVE_STATES, Event, InvalidTransition, SkipReason, State
from migration.store import (
    Outcome,
    Repository,
    RepositoryNotFound,
    StepResult,
    Store,
    schema_files,
)
from tests.store.conftest import database_url_for

ACTOR = "fenced-write-test"
# Columns that differ between two runs of the same history whatever the path.
_VOLATILE_COLUMNS = {"id", "path", "root_namespace", "created_at", "last_step_at"}


def _history(store: Store) -> tuple[list[object], list[int]]:
    """Run a fixed history on three new repositories; what each call returned, and the ids."""
    a, b, c = (store.add_repository(f"hist/{store.write_path}/{n}") for n in "abc")
    said: list[object] = []

    def claim(rid: int, expected: State, event: Event, token: int) -> None:
        said.append(_outcome(lambda: store.claim(rid, expected_state=expected, event=event,
                                                 token=token, actor=ACTOR, message_id=f"m{token}",
                                                 detail={"n": token})))  # fmt: skip

    def step(rid: int, expected: State, event: Event, token: int, **kw: Any) -> None:
        said.append(_outcome(lambda: store.step(rid, expected_state=expected, event=event,
                                                token=token, actor=ACTOR, message_id=f"m{token}",
                                                **kw)))  # fmt: skip

    def undo(rid: int, expected: State, claimed_from: State, token: int) -> None:
        said.append(_outcome(lambda: store.undo_claim(rid, expected_state=expected,
                                                      claimed_from=claimed_from, token=token,
                                                      actor=ACTOR, message_id=None)))  # fmt: skip

    store.update_settings(capacity=1, max_retries=2, enabled=True)
    claim(a, State.DEFAULT, Event.START_PRE_IMPORT, 5)  # claimed
    claim(b, State.DEFAULT, Event.START_PRE_IMPORT, 5)  # at capacity
    claim(a, State.DEFAULT, Event.START_PRE_IMPORT, 6)  # state changed (refused, recorded)
    claim(a, State.PRE_IMPORTING, Event.START_PRE_IMPORT, 3)  # stale token (refused)
    claim(b, State.DEFAULT, Event.RETRY_IMPORT, 7)  # invalid transition
    claim(10**9, State.DEFAULT, Event.START_PRE_IMPORT, 7)  # not found
    step(a, State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT, 4)  # stale token
    step(a, State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT, 5)  # stepped
    step(a, State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT, 5)  # state changed
    step(a, State.PRE_IMPORT_DONE, Event.FINISH_IMPORT, 5)  # invalid transition
    store.update_settings(enabled=False)
    claim(a, State.PRE_IMPORT_DONE, Event.START_PRE_IMPORT, 5)  # invalid transition
    step(a, State.PRE_IMPORT_DONE, Event.START_IMPORT, 8)  # stepped (steps ignore enabled)
    step(a, State.IMPORTING, Event.ABORT_IMPORT, 8)  # aborted, retries 1
    claim(a, State.IMPORT_ABORTED, Event.RETRY_IMPORT, 9)  # disabled
    store.update_settings(enabled=True)
    claim(a, State.IMPORT_ABORTED, Event.RETRY_PRE_IMPORT, 9)  # invalid: aborted in importing
    claim(a, State.IMPORT_ABORTED, Event.RETRY_IMPORT, 9)  # claimed
    undo(a, State.IMPORTING, State.IMPORT_ABORTED, 9)  # back to aborted, no retry counted
    undo(a, State.IMPORTING, State.IMPORT_ABORTED, 9)  # state changed
    claim(a, State.IMPORT_ABORTED, Event.RETRY_IMPORT, 10)  # claimed
    step(a, State.IMPORTING, Event.ABORT_IMPORT, 10)  # retries 2 = max: skipped
    claim(c, State.DEFAULT, Event.START_PRE_IMPORT, 11)  # claimed (a is no longer active)
    undo(c, State.PRE_IMPORTING, State.IMPORTING, 11)  # invalid: not a claim
    step(c, State.PRE_IMPORTING, Event.SKIP_IMPORT, 11, skip_reason=SkipReason.NOT_FOUND)
    step(b, State.DEFAULT, Event.ALREADY_MIGRATED, 12)  # stepped
    return said, [a, b, c]


def _outcome(call: Any) -> object:
    """What a write returned, without the columns that differ between runs."""
    try:
        result: StepResult = call()
    except (InvalidTransition, RepositoryNotFound) as error:
        return type(error).__name__
    return (result.outcome, _row(result.repository), result.transition)


def _row(repo: Repository) -> dict[str, object]:
    """The row's values; timestamps as 'set or not' (their values differ between runs)."""
    return {
        k: (v is not None if k.endswith("_at") else v)
        for k, v in repo.__dict__.items()
        if k not in _VOLATILE_COLUMNS
    }


def _events(database_url: str, ids: list[int]) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT array_position(%s::bigint[], repository_id), from_state, to_state, event,"
            " token, actor, message_id, detail, accepted FROM migration_events"
            " WHERE repository_id = ANY(%s) ORDER BY id",
            (ids, ids),
        ).fetchall()
    return [tuple(r) for r in rows]


class _NoLockedPath(Store):
    """A Store whose locked transaction fails the test if any write reaches it."""

    @staticmethod
    def _lock_row(conn: psycopg.Connection[Any], repository_id: int) -> Repository:
        raise AssertionError("the locked path was taken")


def test_function_and_locked_paths_write_the_same_history(
    clean_store: Store, database_url: str
) -> None:
    clean_store.write_path = "locked"
    try:
        locked_said, locked_ids = _history(clean_store)
    finally:
        clean_store.write_path = "function"
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The second run starts from the same in-flight count: the first left none active.
        assert conn.execute(
            "SELECT count(*) FROM container_repositories WHERE migration_state IN"
            " ('pre_importing', 'pre_import_done', 'importing')"
        ).fetchone() == (0,)
    function_said, function_ids = _history(clean_store)

    assert function_said == locked_said
    # Every kind of answer was exercised, so the comparison covers them all.
    outcomes = {s[0] if isinstance(s, tuple) else s for s in function_said}
    assert outcomes == {*Outcome, "InvalidTransition", "RepositoryNotFound"}
    assert _events(database_url, function_ids) == _events(database_url, locked_ids)
    rows_locked = [_row(clean_store.get(i)) for i in locked_ids]  # type: ignore[arg-type]
    rows_function = [_row(clean_store.get(i)) for i in function_ids]  # type: ignore[arg-type]
    assert rows_function == rows_locked
    assert rows_function[0]["migration_state"] is State.IMPORT_SKIPPED
    assert rows_function[0]["migration_retries_count"] == 2


def test_common_writes_do_not_take_the_locked_path(database_url: str, store: Store) -> None:
    with _NoLockedPath(database_url, max_size=2) as fast:
        rid = fast.add_repository("fast/path/one")
        kw: dict[str, Any] = {"token": 3, "actor": ACTOR, "message_id": None}
        claimed = fast.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT, **kw)
        assert claimed.outcome is Outcome.CLAIMED
        assert claimed.repository.migration_pre_import_started_at is not None
        assert claimed.transition is not None
        undone = fast.undo_claim(rid, expected_state=State.PRE_IMPORTING,
                                 claimed_from=State.DEFAULT, **kw)  # fmt: skip
        assert undone.outcome is Outcome.STEPPED
        assert undone.repository.migration_state is State.DEFAULT
        again = fast.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT, **kw)
        assert again.outcome is Outcome.CLAIMED
        stepped = fast.step(rid, expected_state=State.PRE_IMPORTING,
                            event=Event.FINISH_PRE_IMPORT, **kw)  # fmt: skip
        assert stepped.outcome is Outcome.STEPPED
        assert stepped.repository.migration_pre_import_done_at is not None
        # A refused step is recorded under the row lock (here: the assertion it was taken).
        with pytest.raises(AssertionError, match="locked path"):
            fast.step(rid, expected_state=State.PRE_IMPORTING, event=Event.FINISH_PRE_IMPORT, **kw)
    assert [e.event for e in store.events(rid)] == [
        "start_pre_import", "undo_claim", "start_pre_import", "finish_pre_import",
    ]  # fmt: skip


def test_the_function_writes_nothing_when_the_row_changed(
    clean_store: Store, database_url: str
) -> None:
    rid = clean_store.add_repository("fn/mismatch/one")
    call = (
        "SELECT outcome, (repository).migration_state FROM migration_fenced_write(%s, true,"
        " %s, %s, %s, %s, 'pre_importing', 0, NULL, NULL, 'migration_pre_import_started_at',"
        " 'start_pre_import', 'x', NULL, '{}')"
    )
    cases = [
        ("pre_import_done", 0, None, 5),  # another state
        ("default", 1, None, 5),  # another retries count
        ("default", 0, "importing", 5),  # another aborted-in state
    ]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE container_repositories SET fencing_token = 7 WHERE id = %s", (rid,))
        for from_state, retries, aborted_in, token in [*cases, ("default", 0, None, 6)]:
            row = conn.execute(call, (rid, from_state, retries, aborted_in, token)).fetchone()
            assert row == ("mismatch", "default")
        missing = conn.execute(call, (10**9, "default", 0, None, 9)).fetchone()
        assert missing == ("mismatch", None)
        events = conn.execute("SELECT count(*) FROM migration_events").fetchone()
        assert events == (0,)
        # The same call with the row's values (and a token not older) writes.
        row = conn.execute(call, (rid, "default", 0, None, 7)).fetchone()
        assert row == ("claimed", "pre_importing")


def test_a_database_before_0002_takes_the_locked_path(
    clean_store: Store, database_url: str
) -> None:
    rid = clean_store.add_repository("fn/old-schema/one")
    function_sql = dict(schema_files())["0002_fenced_write_function"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP FUNCTION migration_fenced_write")
        try:
            claimed = clean_store.claim(rid, expected_state=State.DEFAULT,
                                        event=Event.START_PRE_IMPORT, token=1, actor=ACTOR,
                                        message_id=None)  # fmt: skip
            stepped = clean_store.step(rid, expected_state=State.PRE_IMPORTING,
                                       event=Event.ABORT_IMPORT, token=1, actor=ACTOR,
                                       message_id=None)  # fmt: skip
        finally:
            conn.execute(function_sql.encode())
    assert claimed.outcome is Outcome.CLAIMED
    assert stepped.repository.migration_state is State.IMPORT_ABORTED


def test_the_function_counts_the_same_active_states() -> None:
    text = dict(schema_files())["0002_fenced_write_function"]
    counted = re.search(r"count\(\*\).*?IN \(([^)]*)\)", text, re.DOTALL)
    assert counted is not None
    assert set(re.findall(r"'(\w+)'", counted.group(1))) == {s.value for s in ACTIVE_STATES}


def test_upgrade_from_0001_adds_the_function(database_url: str) -> None:
    # A database the previous release made: schema 0001 only, with a claimed repository.
    name = f"test_old_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    old_url = database_url_for(database_url, name)
    try:
        first_version, first_sql = schema_files()[0]
        with psycopg.connect(old_url, autocommit=True) as conn:
            conn.execute(first_sql.encode())
            conn.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (first_version,))
        with _NoLockedPath(old_url, max_size=2) as store:
            rid = store.add_repository("old/schema/one")
            assert store.upgrade() == [v for v, _ in schema_files()[1:]]
            assert store.upgrade() == []
            claimed = store.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT,
                                  token=1, actor=ACTOR, message_id=None)  # fmt: skip
            assert claimed.outcome is Outcome.CLAIMED
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
