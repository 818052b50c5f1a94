"""The one fenced write (``migration_fenced_write``, schemas 0005-0006) on a real PostgreSQL.

A scripted history of claims, steps, undos and refusals gives the answers and leaves the
events the state machine says, the function recording each refusal itself; a row the caller
saw saves the read and is read again when it moved; the function writes nothing when the
row no longer holds what the transition was computed from; and upgrading a database made
by an older release adds the function and keeps the rows.
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
    a, b, c = (store.add_repository(f"hist/{uuid.uuid4().hex[:8]}/{n}") for n in "abc")
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


# What each call of _history answers, in order (see the comments there).
_EXPECTED = [
    Outcome.CLAIMED, Outcome.AT_CAPACITY, Outcome.STATE_CHANGED, Outcome.STALE_TOKEN,
    "InvalidTransition", "RepositoryNotFound", Outcome.STALE_TOKEN, Outcome.STEPPED,
    Outcome.STATE_CHANGED, "InvalidTransition", "InvalidTransition", Outcome.STEPPED,
    Outcome.STEPPED, Outcome.DISABLED, "InvalidTransition", Outcome.CLAIMED, Outcome.STEPPED,
    Outcome.STATE_CHANGED, Outcome.CLAIMED, Outcome.STEPPED, Outcome.CLAIMED,
    "InvalidTransition", Outcome.STEPPED, Outcome.STEPPED,
]  # fmt: skip


def test_a_scripted_history_answers_and_records_as_the_state_machine_says(
    clean_store: Store, database_url: str
) -> None:
    refused_before = clean_store.refused_writes()
    said, ids = _history(clean_store)
    assert [s[0] if isinstance(s, tuple) else s for s in said] == _EXPECTED
    # Every kind of answer was exercised.
    assert set(_EXPECTED) == {*Outcome, "InvalidTransition", "RepositoryNotFound"}
    events = _events(database_url, ids)
    accepted = [(e[0], e[1], e[2], e[3], e[4]) for e in events if e[8]]
    assert accepted == [
        (1, "default", "pre_importing", "start_pre_import", 5),
        (1, "pre_importing", "pre_import_done", "finish_pre_import", 5),
        (1, "pre_import_done", "importing", "start_import", 8),
        (1, "importing", "import_aborted", "abort_import", 8),
        (1, "import_aborted", "importing", "retry_import", 9),
        (1, "importing", "import_aborted", "undo_claim", 9),
        (1, "import_aborted", "importing", "retry_import", 10),
        (1, "importing", "import_skipped", "abort_import", 10),
        (3, "default", "pre_importing", "start_pre_import", 11),
        (3, "pre_importing", "import_skipped", "skip_import", 11),
        (2, "default", "import_done", "already_migrated", 12),
    ]
    # The function recorded each refusal: the row's state, no target, why, the caller's
    # detail kept beside it.
    refused = [(e[0], e[1], e[2], e[3], e[4], e[7]) for e in events if not e[8]]
    assert refused == [
        (1, "pre_importing", None, "start_pre_import", 6,
         {"n": 6, "reason": "state_changed", "expected_state": "default",
          "row_state": "pre_importing", "row_token": 5}),
        (1, "pre_importing", None, "start_pre_import", 3,
         {"n": 3, "reason": "stale_token", "expected_state": "pre_importing",
          "row_state": "pre_importing", "row_token": 5}),
        (1, "pre_importing", None, "finish_pre_import", 4,
         {"reason": "stale_token", "expected_state": "pre_importing",
          "row_state": "pre_importing", "row_token": 5}),
        (1, "pre_import_done", None, "finish_pre_import", 5,
         {"reason": "state_changed", "expected_state": "pre_importing",
          "row_state": "pre_import_done", "row_token": 5}),
        (1, "import_aborted", None, "undo_claim", 9,
         {"reason": "state_changed", "expected_state": "importing",
          "row_state": "import_aborted", "row_token": 9}),
    ]  # fmt: skip
    assert clean_store.refused_writes() == refused_before + len(refused)
    final = clean_store.get(ids[0])
    assert final is not None
    assert final.migration_state is State.IMPORT_SKIPPED
    assert final.migration_retries_count == 2
    # Each phase's arrivals (schema 0006): accepted claims only; the undo takes none back,
    # refusals and the at-capacity claim add none.
    starts = {}
    for rid in ids:
        row = clean_store.get(rid)
        assert row is not None
        starts[rid] = (row.migration_pre_import_starts, row.migration_import_starts)
    assert [starts[rid] for rid in ids] == [(1, 3), (0, 0), (1, 0)]


def test_a_seen_row_saves_the_read_and_a_moved_one_is_read_again(
    clean_store: Store, database_url: str
) -> None:
    rid = clean_store.add_repository("fn/seen/one")
    seen = clean_store.get(rid)
    assert seen is not None
    kw: dict[str, Any] = {"token": 3, "actor": ACTOR, "message_id": None}
    claimed = clean_store.claim(rid, expected_state=State.DEFAULT,
                                event=Event.START_PRE_IMPORT, seen=seen, **kw)  # fmt: skip
    assert claimed.outcome is Outcome.CLAIMED
    assert claimed.repository.migration_pre_import_started_at is not None
    # An abort (retries 0 -> 1), then the stale copy, still "default" with retries 0,
    # undone in between: the function answers mismatch, the store reads again.
    clean_store.undo_claim(rid, expected_state=State.PRE_IMPORTING,
                           claimed_from=State.DEFAULT, **kw)  # fmt: skip
    clean_store.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT, **kw)
    clean_store.step(rid, expected_state=State.PRE_IMPORTING, event=Event.ABORT_IMPORT, **kw)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE container_repositories SET migration_state = 'default',"
            " migration_aborted_in_state = NULL WHERE id = %s",
            (rid,),
        )
    again = clean_store.claim(rid, expected_state=State.DEFAULT,
                              event=Event.START_PRE_IMPORT, seen=seen, **kw)  # fmt: skip
    assert again.outcome is Outcome.CLAIMED
    # Computed from the row as it is (retries 1), not from the stale copy (retries 0).
    assert again.repository.migration_retries_count == 1


def test_the_function_refuses_and_records_or_writes_nothing(
    clean_store: Store, database_url: str
) -> None:
    rid = clean_store.add_repository("fn/mismatch/one")
    call = (
        "SELECT outcome, (repository).migration_state FROM migration_fenced_write(%s, true,"
        " %s, %s, %s, %s, 'pre_importing', 0, NULL, NULL, 'migration_pre_import_started_at',"
        " 'start_pre_import', 'x', NULL, '{}')"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE container_repositories SET fencing_token = 7 WHERE id = %s", (rid,))
        # The row moved since the read: nothing written, nothing recorded.
        for from_state, retries, aborted_in, token in [
            ("default", 1, None, 7),  # another retries count
            ("default", 0, "importing", 7),  # another aborted-in state
        ]:
            row = conn.execute(call, (rid, from_state, retries, aborted_in, token)).fetchone()
            assert row == ("mismatch", "default")
        assert conn.execute("SELECT count(*) FROM migration_events").fetchone() == (0,)
        # Fenced out: refused and recorded.
        row = conn.execute(call, (rid, "pre_import_done", 0, None, 7)).fetchone()
        assert row == ("state_changed", "default")
        row = conn.execute(call, (rid, "default", 0, None, 6)).fetchone()
        assert row == ("stale_token", "default")
        missing = conn.execute(call, (10**9, "default", 0, None, 9)).fetchone()
        assert missing == ("not_found", None)
        recorded = conn.execute(
            "SELECT token, detail->>'reason', accepted FROM migration_events ORDER BY id"
        ).fetchall()
        assert recorded == [(7, "state_changed", False), (6, "stale_token", False)]
        # The same call with the row's values (and a token not older) writes.
        row = conn.execute(call, (rid, "default", 0, None, 7)).fetchone()
        assert row == ("claimed", "pre_importing")


def test_the_function_counts_the_same_active_states() -> None:
    # The newest version of the function (each schema file that changes it replaces it).
    [*_, text] = (t for _, t in schema_files() if "FUNCTION migration_fenced_write(" in t)
    text = text[text.index("FUNCTION migration_fenced_write(") :]
    counted = re.search(r"count\(\*\).*?IN \(([^)]*)\)", text, re.DOTALL)
    assert counted is not None
    assert set(re.findall(r"'(\w+)'", counted.group(1))) == {s.value for s in ACTIVE_STATES}


@pytest.mark.parametrize("old", ["0001_initial", "0004_reference_parity", "0005_one_fenced_write"])
def test_upgrade_keeps_the_rows_and_the_one_path_works(database_url: str, old: str) -> None:
    # A database an older release made, with a claimed repository and its event.
    name = f"test_old_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    old_url = database_url_for(database_url, name)
    files = schema_files()
    versions = [v for v, _ in files]
    applied = files[: versions.index(old) + 1]
    try:
        with psycopg.connect(old_url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, text in applied:
                conn.execute(text.encode())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            conn.execute(
                "INSERT INTO container_repositories (path, migration_state, fencing_token,"
                " migration_pre_import_started_at) VALUES ('old/claimed', 'pre_importing', 4,"
                " now()), ('old/waiting', 'default', 0, NULL)"
            )
            conn.execute(
                "INSERT INTO migration_events (repository_id, from_state, to_state, event,"
                " token, actor, detail, accepted) VALUES (1, 'default', 'pre_importing',"
                " 'start_pre_import', 4, 'old-release', '{}', true)"
            )
        with Store(old_url, max_size=2) as store:
            assert store.upgrade() == versions[len(applied) :]
            assert store.upgrade() == []
            assert store.schema_versions() == versions
            claimed, waiting = store.get_by_path("old/claimed"), store.get_by_path("old/waiting")
            assert claimed is not None and waiting is not None
            assert (claimed.migration_state, claimed.fencing_token) == (State.PRE_IMPORTING, 4)
            # Schema 0006 counted the claim the events log holds; none for the waiting row.
            assert (claimed.migration_pre_import_starts, claimed.migration_import_starts) == (1, 0)
            assert (waiting.migration_pre_import_starts, waiting.migration_import_starts) == (0, 0)
            assert [e.actor for e in store.events(claimed.id)] == ["old-release"]
            kw: dict[str, Any] = {"actor": ACTOR, "message_id": None}
            assert store.step(claimed.id, expected_state=State.PRE_IMPORTING,
                              event=Event.FINISH_PRE_IMPORT, token=3, **kw).outcome \
                is Outcome.STALE_TOKEN  # fmt: skip
            assert store.step(claimed.id, expected_state=State.PRE_IMPORTING,
                              event=Event.FINISH_PRE_IMPORT, token=4, **kw).ok  # fmt: skip
            assert store.claim(waiting.id, expected_state=State.DEFAULT,
                               event=Event.START_PRE_IMPORT, token=1, **kw).ok  # fmt: skip
            assert [e.accepted for e in store.events(claimed.id)] == [True, False, True]
            waiting = store.get(waiting.id)
            assert waiting is not None and waiting.migration_pre_import_starts == 1
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
