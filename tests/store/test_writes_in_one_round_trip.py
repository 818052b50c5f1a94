"""Fenced writes that share a round trip, on a real PostgreSQL: a claim made from a
candidates' list entry with the read that checks it (``Store.claim_as_listed``), and two
steps in a row (``Store.step_twice``).

Each must answer, write and record exactly what the separate calls would (the same rows,
the same events, a refusal recorded once), in one statement where the separate calls took
two.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from migration.states import ACTIVE_STATES, Event, State
from migration.store import Candidate, Outcome, Repository, Seen, Store

ACTOR = "one-round-trip-test"
_BY: dict[str, Any] = {"actor": ACTOR, "message_id": "m1"}
# Columns that differ between two repositories written the same way.
_OWN = {"id", "path", "root_namespace", "created_at", "last_step_at", "fencing_token"}


@contextmanager
def _statements(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The statements the store sends meanwhile (each execute is a round trip here)."""
    sent: list[str] = []
    execute = psycopg.Cursor.execute

    def counted(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query)[:60])
        return execute(self, query, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", counted)
        yield sent


def _events(database_url: str, rid: int) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT from_state, to_state, event, token, accepted, detail->>'reason'"
            " FROM migration_events WHERE repository_id = %s ORDER BY id",
            (rid,),
        ).fetchall()
    return [tuple(r) for r in rows]


def _listed(store: Store, rid: int) -> Candidate:
    store.update_settings(enabled=True, capacity=100, max_tags_count=0)
    (candidate,) = [c for c in store.candidates(store.settings(), limit=1000) if c.id == rid]
    return candidate


def _values(repo: Repository | None) -> dict[str, object]:
    assert repo is not None
    return {
        k: (v is not None if k.endswith("_at") else v)
        for k, v in repo.__dict__.items()
        if k not in _OWN
    }


def _new(store: Store, **kw: Any) -> int:
    return store.add_repository(f"trip/{uuid.uuid4().hex[:10]}/repo", **kw)


def test_a_listed_claim_reads_and_claims_in_one_statement_as_claim_would(
    clean_store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid, twin = _new(clean_store), _new(clean_store)
    candidate = _listed(clean_store, rid)
    with _statements(monkeypatch) as sent:
        listed = clean_store.claim_as_listed(
            candidate, event=Event.START_PRE_IMPORT, max_tags_count=0, token=7, **_BY
        )
    assert len(sent) == 1
    (result,) = listed.results
    assert result.outcome is Outcome.CLAIMED
    assert listed.repository == result.repository
    assert listed.repository.migration_state is State.PRE_IMPORTING
    assert listed.repository.migration_pre_import_starts == 1
    # The same as a read and a claim of its own.
    seen = clean_store.get(twin)
    claimed = clean_store.claim(
        twin, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT, token=8, seen=seen,
        **_BY,
    )  # fmt: skip
    assert _values(listed.repository) == _values(claimed.repository)
    assert result.transition == claimed.transition
    assert _events(database_url, rid) == [
        ("default", "pre_importing", "start_pre_import", 7, True, None)
    ]


def test_a_stale_listing_writes_and_records_nothing_and_returns_the_row(
    clean_store: Store, database_url: str
) -> None:
    rid = _new(clean_store)
    candidate = _listed(clean_store, rid)
    clean_store.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT,
                      token=5, **_BY)  # fmt: skip  # another run started it since the listing
    refused = clean_store.refused_writes()
    listed = clean_store.claim_as_listed(
        candidate, event=Event.START_PRE_IMPORT, max_tags_count=0, token=6, **_BY
    )
    assert listed.results == []
    assert listed.repository is not None
    assert listed.repository.migration_state is State.PRE_IMPORTING
    assert listed.repository.fencing_token == 5
    # The one event is the other run's claim: no refusal recorded, none counted.
    assert [e[4] for e in _events(database_url, rid)] == [True]
    assert clean_store.refused_writes() == refused


def test_too_many_tags_claims_nothing_and_the_row_says_why(clean_store: Store) -> None:
    rid = _new(clean_store, tags_count=50)
    candidate = _listed(clean_store, rid)
    listed = clean_store.claim_as_listed(
        candidate, event=Event.START_PRE_IMPORT, max_tags_count=10, token=6, **_BY
    )
    assert listed.results == []
    assert listed.repository is not None
    assert (listed.repository.migration_state, listed.repository.tags_count) == (
        State.DEFAULT, 50,
    )  # fmt: skip
    allowed = clean_store.claim_as_listed(
        candidate, event=Event.START_PRE_IMPORT, max_tags_count=50, token=6, **_BY
    )
    assert [r.outcome for r in allowed.results] == [Outcome.CLAIMED]


def test_a_listed_claim_keeps_the_capacity_and_a_gone_row_is_none(clean_store: Store) -> None:
    rid = _new(clean_store)
    candidate = _listed(clean_store, rid)
    active = sum(n for state, n in clean_store.counts_by_state().items() if state in ACTIVE_STATES)
    clean_store.update_settings(capacity=active)
    full = clean_store.claim_as_listed(
        candidate, event=Event.START_PRE_IMPORT, max_tags_count=0, token=6, **_BY
    )
    assert [r.outcome for r in full.results] == [Outcome.AT_CAPACITY]
    assert full.repository is not None
    assert full.repository.migration_state is State.DEFAULT
    gone = candidate._replace(id=10**9)
    missing = clean_store.claim_as_listed(
        gone, event=Event.START_PRE_IMPORT, max_tags_count=0, token=6, **_BY
    )
    assert (missing.repository, missing.results) == (None, [])


def _pre_importing(store: Store, token: int) -> Repository:
    rid = _new(store)
    store.update_settings(enabled=True, capacity=100)
    claimed = store.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT,
                          token=token, **_BY)  # fmt: skip
    assert claimed.outcome is Outcome.CLAIMED
    return claimed.repository


def test_two_steps_in_one_statement_write_what_two_steps_write(
    clean_store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = _pre_importing(clean_store, 5), _pre_importing(clean_store, 5)
    with _statements(monkeypatch) as sent:
        results = clean_store.step_twice(
            one.id, expected_state=State.PRE_IMPORTING, first=Event.FINISH_PRE_IMPORT,
            then=Event.START_IMPORT, token=6, detail={"registry": "done"}, seen=one, **_BY,
        )  # fmt: skip
    assert len(sent) == 1
    assert [r.outcome for r in results] == [Outcome.STEPPED, Outcome.STEPPED]
    first = clean_store.step(
        two.id, expected_state=State.PRE_IMPORTING, event=Event.FINISH_PRE_IMPORT, token=6,
        detail={"registry": "done"}, seen=two, **_BY,
    )  # fmt: skip
    second = clean_store.step(
        two.id, expected_state=State.PRE_IMPORT_DONE, event=Event.START_IMPORT, token=6,
        seen=first.repository, **_BY,
    )  # fmt: skip
    assert [_values(r.repository) for r in results] == [
        _values(first.repository), _values(second.repository),
    ]  # fmt: skip
    assert [r.transition for r in results] == [first.transition, second.transition]
    assert results[1].repository.migration_state is State.IMPORTING
    assert results[1].repository.migration_import_starts == 1
    assert results[1].repository.migration_pre_import_done_at is not None
    expected = [
        ("default", "pre_importing", "start_pre_import", 5, True, None),
        ("pre_importing", "pre_import_done", "finish_pre_import", 6, True, None),
        ("pre_import_done", "importing", "start_import", 6, True, None),
    ]
    assert _events(database_url, one.id) == expected == _events(database_url, two.id)


def test_a_refused_first_step_is_recorded_once_and_the_second_not_sent(
    clean_store: Store, database_url: str
) -> None:
    row = _pre_importing(clean_store, 9)
    results = clean_store.step_twice(
        row.id, expected_state=State.PRE_IMPORTING, first=Event.FINISH_PRE_IMPORT,
        then=Event.START_IMPORT, token=8, seen=row, **_BY,
    )  # fmt: skip
    assert [r.outcome for r in results] == [Outcome.STALE_TOKEN]
    assert [(e[3], e[4], e[5]) for e in _events(database_url, row.id)] == [
        (9, True, None), (8, False, "stale_token"),
    ]  # fmt: skip
    assert results[0].repository.migration_state is State.PRE_IMPORTING


def test_two_steps_from_a_moved_row_go_one_by_one_from_the_row_as_it_is(
    clean_store: Store, database_url: str
) -> None:
    row = _pre_importing(clean_store, 5)
    # Aborted and claimed again since the caller's read: same state, one retry more.
    clean_store.step(row.id, expected_state=State.PRE_IMPORTING, event=Event.ABORT_IMPORT,
                     token=5, **_BY)  # fmt: skip
    clean_store.claim(row.id, expected_state=State.IMPORT_ABORTED,
                      event=Event.RETRY_PRE_IMPORT, token=6, **_BY)  # fmt: skip
    results = clean_store.step_twice(
        row.id, expected_state=State.PRE_IMPORTING, first=Event.FINISH_PRE_IMPORT,
        then=Event.START_IMPORT, token=7, seen=row, **_BY,
    )  # fmt: skip
    assert [r.outcome for r in results] == [Outcome.STEPPED, Outcome.STEPPED]
    assert results[1].repository.migration_state is State.IMPORTING
    assert results[1].repository.migration_retries_count == 1  # from the row, not the copy
    assert [e[4] for e in _events(database_url, row.id)] == [True] * 5


def _importing(store: Store, database_url: str) -> Repository:
    """A repository importing, its final import started once (as a claim leaves it)."""
    row = _pre_importing(store, 5)
    store.step(row.id, expected_state=State.PRE_IMPORTING, event=Event.FINISH_PRE_IMPORT,
               token=5, **_BY)  # fmt: skip
    stepped = store.step(row.id, expected_state=State.PRE_IMPORT_DONE, event=Event.START_IMPORT,
                         token=5, **_BY)  # fmt: skip
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE container_repositories SET migration_import_starts = 1 WHERE id = %s",
            (row.id,),
        )
    found = store.get(row.id)
    assert found is not None and stepped.ok
    return found


def test_steps_as_seen_read_and_write_in_one_statement_when_the_row_is_as_seen(
    clean_store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    row, twin = _pre_importing(clean_store, 5), _pre_importing(clean_store, 5)
    with _statements(monkeypatch) as sent:
        written = clean_store.steps_as_seen(
            row.id, path=row.path, seen=Seen.of(row),
            events=[Event.FINISH_PRE_IMPORT, Event.START_IMPORT], token=6,
            detail={"registry": "done"}, **_BY,
        )  # fmt: skip
    assert len(sent) == 1
    assert [r.outcome for r in written.results] == [Outcome.STEPPED, Outcome.STEPPED]
    assert written.repository == written.results[1].repository
    alone = clean_store.step_twice(
        twin.id, expected_state=State.PRE_IMPORTING, first=Event.FINISH_PRE_IMPORT,
        then=Event.START_IMPORT, token=6, detail={"registry": "done"}, seen=twin, **_BY,
    )  # fmt: skip
    assert [_values(r.repository) for r in written.results] == [
        _values(r.repository) for r in alone
    ]
    assert _events(database_url, row.id) == _events(database_url, twin.id)
    # One step: import_complete.
    importing = _importing(clean_store, database_url)
    done = clean_store.steps_as_seen(
        importing.id, path=importing.path, seen=Seen.of(importing),
        events=[Event.FINISH_IMPORT], token=7, **_BY,
    )  # fmt: skip
    assert [r.outcome for r in done.results] == [Outcome.STEPPED]
    assert done.repository is not None
    assert done.repository.migration_state is State.IMPORT_DONE


@pytest.mark.parametrize(
    "change",
    [
        "fencing_token = 6",  # another holder wrote it since (same state)
        "migration_import_starts = 2",  # started again since
        "migration_retries_count = 1",
        "path = path || '-renamed'",
    ],
)
def test_steps_as_seen_write_and_record_nothing_when_the_row_is_not_as_seen(
    clean_store: Store, database_url: str, change: str
) -> None:
    row = _importing(clean_store, database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE container_repositories SET {change} WHERE id = %s", (row.id,))  # noqa: S608
    before = _events(database_url, row.id)
    refused = clean_store.refused_writes()
    written = clean_store.steps_as_seen(
        row.id, path=row.path, seen=Seen.of(row), events=[Event.FINISH_IMPORT], token=9, **_BY
    )
    assert written.results == []
    assert written.repository == clean_store.get(row.id)  # the row as it is, to decide on
    assert written.repository is not None
    assert written.repository.migration_state is State.IMPORTING
    assert _events(database_url, row.id) == before
    assert clean_store.refused_writes() == refused
    gone = clean_store.steps_as_seen(
        10**9, path=row.path, seen=Seen.of(row), events=[Event.FINISH_IMPORT], token=9, **_BY
    )
    assert (gone.repository, gone.results) == (None, [])
