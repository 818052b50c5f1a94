"""The store against a real PostgreSQL: schema, claims, fenced steps, selection, reads."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.rows import kwargs_row

from migration.settings import SettingsError
from migration.states import Event, InvalidTransition, SkipReason, State
from migration.store import (
    InvalidRepository,
    Outcome,
    RepositoryNotFound,
    Store,
    StoreUnavailable,
    schema_files,
)
from migration.store.model import Candidate, Repository, repository_rows

ACTOR = "test"


def _claim(
    store: Store,
    rid: int,
    token: int,
    *,
    expected: State = State.DEFAULT,
    event: Event = Event.START_PRE_IMPORT,
):  # type: ignore[no-untyped-def]
    return store.claim(rid, expected_state=expected, event=event, token=token, actor=ACTOR,
                       message_id=f"m-{token}")  # fmt: skip


def _step(store: Store, rid: int, expected: State, event: Event, token: int, **kw):  # type: ignore[no-untyped-def]
    return store.step(rid, expected_state=expected, event=event, token=token, actor=ACTOR,
                      message_id=f"m-{token}", **kw)  # fmt: skip


# -- schema ------------------------------------------------------------------------------


def test_upgrade_is_idempotent_and_recorded(store: Store) -> None:
    versions = [v for v, _ in schema_files()]
    assert versions and versions[0] == "0001_initial"
    assert store.upgrade() == []
    assert store.upgrade() == []
    assert store.schema_versions() == versions


def test_concurrent_upgraders_on_a_new_database_apply_once(database_url: str) -> None:
    from tests.store.conftest import database_url_for

    name = f"{psycopg.conninfo.conninfo_to_dict(database_url)['dbname']}_up"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = database_url_for(database_url, name)
        results: list[list[str]] = []
        errors: list[BaseException] = []

        def upgrade() -> None:
            try:
                with Store(url) as s:
                    results.append(s.upgrade())
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=upgrade) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert sorted(len(r) for r in results) == [0, 0, 0, len(schema_files())]
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_unreachable_database_is_one_line() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        Store("postgresql://postgres@127.0.0.1:1/nothing")
    assert "127.0.0.1:1/nothing" in str(caught.value)
    assert "\n" not in str(caught.value)


# -- repositories -------------------------------------------------------------------------


def test_add_and_read_a_repository(store: Store) -> None:
    created = datetime(2021, 5, 1, tzinfo=UTC)
    rid = store.add_repository("acme/tools/builder", created_at=created, tags_count=12)
    repo = store.get(rid)
    assert repo is not None and repo == store.get_by_path("acme/tools/builder")
    assert (repo.path, repo.root_namespace, repo.created_at, repo.tags_count) == (
        "acme/tools/builder", "acme", created, 12,
    )  # fmt: skip
    assert repo.migration_state is State.DEFAULT
    assert (repo.migration_retries_count, repo.fencing_token, repo.last_step_at) == (0, 0, None)
    assert store.get(10**12) is None and store.get_by_path("no/such") is None


def test_repository_rows_read_what_from_row_reads(store: Store, database_url: str) -> None:
    # The store's fast row factory against the plain one, on rows with every enum column set.
    rid = store.add_repository("acme/rows/aborted", tags_count=3)
    skipped = store.add_repository("acme/rows/skipped", tags_count=3)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE container_repositories SET migration_state = 'import_aborted',"
            " migration_aborted_in_state = 'pre_importing', migration_aborted_at = now()"
            " WHERE id = %s",
            (rid,),
        )
        conn.execute(
            "UPDATE container_repositories SET migration_state = 'import_skipped',"
            " migration_skipped_at = now(), migration_skipped_reason = 'too_many_tags'"
            " WHERE id = %s",
            (skipped,),
        )
        fast = conn.cursor(row_factory=repository_rows)
        plain = conn.cursor(row_factory=kwargs_row(Repository.from_row))
        query = "SELECT * FROM container_repositories WHERE id IN (%s, %s) ORDER BY id"
        got = fast.execute(query, (rid, skipped)).fetchall()
        assert len(got) == 2 and got == plain.execute(query, (rid, skipped)).fetchall()
        assert got[0].migration_aborted_in_state is State.PRE_IMPORTING
        assert got[1].migration_skipped_reason is SkipReason.TOO_MANY_TAGS
        assert [store.get(rid), store.get(skipped)] == got
        with pytest.raises(dataclasses.FrozenInstanceError):
            got[0].fencing_token = 5  # type: ignore[misc]
        # Columns other than the dataclass's fields are refused, as from_row refuses them.
        with pytest.raises(TypeError, match="unexpected keyword argument 'extra'"):
            fast.execute("SELECT *, 1 AS extra FROM container_repositories WHERE id = %s", (rid,))
            fast.fetchone()


@pytest.mark.parametrize(
    ("path", "kwargs", "message"),
    [
        ("single", {}, "invalid repository path"),
        ("Upper/case", {}, "invalid repository path"),
        ("a//b", {}, "invalid repository path"),
        ("a/b/", {}, "invalid repository path"),
        ("a/" + "b" * 300, {}, "invalid repository path"),
        ("a/b", {"tags_count": -1}, "invalid tags count"),
        ("a/b", {"created_at": datetime(2020, 1, 1)}, "has no UTC offset"),
    ],
)
def test_bad_repository_is_refused(store: Store, path: str, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRepository, match=message):
        store.add_repository(path, **kwargs)


def test_duplicate_path_is_refused(store: Store) -> None:
    store.add_repository("dup/one")
    with pytest.raises(InvalidRepository, match="exists already"):
        store.add_repository("dup/one")


# -- settings -----------------------------------------------------------------------------


def test_settings_are_live_and_validated(clean_store: Store) -> None:
    store = clean_store
    before = store.settings()
    assert before.enabled and before.capacity == 10 and before.lease_scope == "repository"
    after = store.update_settings(capacity="3", root_namespace_deny_list="x,y", enabled=False)
    assert (after.capacity, after.root_namespace_deny_list, after.enabled) == (3, ("x", "y"), False)
    assert store.settings() == after
    with pytest.raises(SettingsError, match="max_retries"):
        store.update_settings(capacity=4, max_retries=0)
    assert store.settings() == after  # nothing changed, not even capacity


# -- claims and fenced steps ----------------------------------------------------------------


def test_full_migration_path_writes_timestamps_tokens_and_events(clean_store: Store) -> None:
    store = clean_store
    rid = store.add_repository("flow/app")
    claimed = _claim(store, rid, token=5)
    assert claimed.outcome is Outcome.CLAIMED and claimed.ok
    assert claimed.transition is not None and claimed.transition.from_state is State.DEFAULT
    repo = claimed.repository
    assert repo.migration_state is State.PRE_IMPORTING and repo.fencing_token == 5
    assert repo.migration_pre_import_started_at is not None and repo.last_step_at is not None
    assert _step(store, rid, State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT, 5).ok
    assert _step(store, rid, State.PRE_IMPORT_DONE, Event.START_IMPORT, 7).ok
    done = _step(store, rid, State.IMPORTING, Event.FINISH_IMPORT, 7)
    assert done.outcome is Outcome.STEPPED
    final = done.repository
    assert final.migration_state is State.IMPORT_DONE and final.fencing_token == 7
    for column in ("pre_import_started_at", "pre_import_done_at", "import_started_at",
                   "import_done_at"):  # fmt: skip
        assert getattr(final, f"migration_{column}") is not None, column
    events = store.events(rid)
    assert [(e.from_state, e.to_state, e.event, e.token, e.accepted) for e in events] == [
        ("default", "pre_importing", "start_pre_import", 5, True),
        ("pre_importing", "pre_import_done", "finish_pre_import", 5, True),
        ("pre_import_done", "importing", "start_import", 7, True),
        ("importing", "import_done", "finish_import", 7, True),
    ]
    assert events[0].actor == ACTOR and events[0].message_id == "m-5"


def test_stale_token_is_refused_and_recorded(clean_store: Store) -> None:
    store = clean_store
    rid = store.add_repository("fence/app")
    assert _claim(store, rid, token=10).ok
    refused_before = store.refused_writes()
    # The old holder (token 9) tries to write after the new holder (10) did.
    stale = _step(store, rid, State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT, 9)
    assert stale.outcome is Outcome.STALE_TOKEN and not stale.ok and stale.transition is None
    assert stale.repository.migration_state is State.PRE_IMPORTING
    assert store.get(rid) == stale.repository  # nothing changed
    # Same token, wrong expected state: refused as state_changed.
    changed = _step(store, rid, State.IMPORTING, Event.FINISH_IMPORT, 10)
    assert changed.outcome is Outcome.STATE_CHANGED
    assert store.refused_writes() == refused_before + 2
    refused = [e for e in store.events(rid) if not e.accepted]
    assert [(e.event, e.token, e.detail["reason"], e.detail["row_token"]) for e in refused] == [
        ("finish_pre_import", 9, "stale_token", 10),
        ("finish_import", 10, "state_changed", 10),
    ]
    # The newer token may still write; an equal token is the same holder.
    assert _step(store, rid, State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT, 10).ok
    # A claim with a stale token is refused the same way.
    rid2 = store.add_repository("fence/other")
    assert _claim(store, rid2, token=20).ok
    assert _step(store, rid2, State.PRE_IMPORTING, Event.ABORT_IMPORT, 20).ok
    stale_claim = _claim(store, rid2, 19, expected=State.IMPORT_ABORTED,
                         event=Event.RETRY_PRE_IMPORT)  # fmt: skip
    assert stale_claim.outcome is Outcome.STALE_TOKEN


def test_invalid_transitions_raise_and_write_nothing(clean_store: Store) -> None:
    store = clean_store
    rid = store.add_repository("invalid/app")
    with pytest.raises(InvalidTransition):
        _step(store, rid, State.DEFAULT, Event.FINISH_IMPORT, 1)
    with pytest.raises(ValueError, match="use claim"):
        _step(store, rid, State.DEFAULT, Event.START_PRE_IMPORT, 1)
    with pytest.raises(ValueError, match="use step"):
        _claim(store, rid, 1, event=Event.FINISH_IMPORT)
    with pytest.raises(RepositoryNotFound):
        _step(store, 10**12, State.DEFAULT, Event.ALREADY_MIGRATED, 1)
    repo = store.get(rid)
    assert repo is not None and repo.fencing_token == 0 and store.events(rid) == []


def test_claim_refused_when_disabled_or_at_capacity(clean_store: Store) -> None:
    store = clean_store
    store.update_settings(capacity=2)
    ids = [store.add_repository(f"cap/app-{i}") for i in range(3)]
    assert _claim(store, ids[0], 1).outcome is Outcome.CLAIMED
    assert _claim(store, ids[1], 1).outcome is Outcome.CLAIMED
    full = _claim(store, ids[2], 1)
    assert full.outcome is Outcome.AT_CAPACITY and full.repository.migration_state is State.DEFAULT
    assert store.in_flight() == 2
    # Moving within the active states needs no capacity; leaving them frees a slot.
    assert _step(store, ids[0], State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT, 1).ok
    assert _claim(store, ids[2], 1).outcome is Outcome.AT_CAPACITY
    assert _step(store, ids[0], State.PRE_IMPORT_DONE, Event.ABORT_IMPORT, 1).ok
    store.update_settings(enabled=False)
    assert _claim(store, ids[2], 1).outcome is Outcome.DISABLED
    store.update_settings(enabled=True)
    assert _claim(store, ids[2], 1).outcome is Outcome.CLAIMED
    # The retry of the aborted one enters an active state: it is capacity-checked too.
    retry = _claim(store, ids[0], 2, expected=State.IMPORT_ABORTED, event=Event.RETRY_IMPORT)
    assert retry.outcome is Outcome.AT_CAPACITY
    assert store.get(ids[2]).migration_state is State.PRE_IMPORTING  # type: ignore[union-attr]
    assert store.in_flight() == 2


def test_abort_retries_then_skips_at_max_retries(clean_store: Store) -> None:
    store = clean_store
    store.update_settings(max_retries=2)
    rid = store.add_repository("retry/app")
    assert _claim(store, rid, 1).ok
    first = _step(store, rid, State.PRE_IMPORTING, Event.ABORT_IMPORT, 1)
    repo = first.repository
    assert repo.migration_state is State.IMPORT_ABORTED and repo.migration_retries_count == 1
    assert repo.migration_aborted_in_state is State.PRE_IMPORTING
    assert repo.migration_aborted_at is not None
    with pytest.raises(InvalidTransition, match="use retry_pre_import"):
        _claim(store, rid, 2, expected=State.IMPORT_ABORTED, event=Event.RETRY_IMPORT)
    retried = _claim(store, rid, 2, expected=State.IMPORT_ABORTED, event=Event.RETRY_PRE_IMPORT)
    assert retried.ok and retried.repository.migration_state is State.PRE_IMPORTING
    second = _step(store, rid, State.PRE_IMPORTING, Event.ABORT_IMPORT, 2).repository
    assert second.migration_state is State.IMPORT_SKIPPED
    assert second.migration_skipped_reason is SkipReason.TOO_MANY_RETRIES
    assert second.migration_retries_count == 2 and second.migration_skipped_at is not None


def test_skip_and_already_migrated(clean_store: Store) -> None:
    store = clean_store
    a, b = store.add_repository("skip/a"), store.add_repository("skip/b")
    with pytest.raises(InvalidTransition, match="needs a skip reason"):
        _step(store, a, State.DEFAULT, Event.SKIP_IMPORT, 1)
    skipped = _step(store, a, State.DEFAULT, Event.SKIP_IMPORT, 1,
                    skip_reason=SkipReason.TOO_MANY_TAGS).repository  # fmt: skip
    assert skipped.migration_state is State.IMPORT_SKIPPED
    assert skipped.migration_skipped_reason is SkipReason.TOO_MANY_TAGS
    done = _step(store, b, State.DEFAULT, Event.ALREADY_MIGRATED, 1).repository
    assert done.migration_state is State.IMPORT_DONE and done.migration_import_done_at is not None
    # The metrics' skipped-by-reason gauge: every reason present, only skipped rows counted.
    reasons = store.counts_by_skip_reason()
    assert set(reasons) == set(SkipReason)
    assert {r: n for r, n in reasons.items() if n} == {SkipReason.TOO_MANY_TAGS: 1}


def test_undo_claim_restores_the_previous_state_without_a_retry(clean_store: Store) -> None:
    store = clean_store
    store.update_settings(capacity=1)
    rid, other = store.add_repository("undo/app"), store.add_repository("undo/other")
    claimed = _claim(store, rid, 3)
    assert claimed.transition is not None
    stale = store.undo_claim(rid, expected_state=State.PRE_IMPORTING, claimed_from=State.DEFAULT,
                             token=2, actor=ACTOR, message_id="m")  # fmt: skip
    assert stale.outcome is Outcome.STALE_TOKEN
    undone = store.undo_claim(rid, expected_state=State.PRE_IMPORTING,
                              claimed_from=claimed.transition.from_state, token=3, actor=ACTOR,
                              message_id="m")  # fmt: skip
    assert undone.outcome is Outcome.STEPPED
    assert undone.repository.migration_state is State.DEFAULT
    assert undone.repository.migration_retries_count == 0
    assert store.events(rid)[-1].event == "undo_claim"
    assert _claim(store, other, 1).ok  # the slot is free again
    with pytest.raises(InvalidTransition):
        store.undo_claim(other, expected_state=State.PRE_IMPORTING,
                         claimed_from=State.PRE_IMPORT_DONE, token=1, actor=ACTOR,
                         message_id="m")  # fmt: skip


# -- selection and reads ------------------------------------------------------------------


def test_candidates_aborted_first_then_ready_by_age_with_cutoff_and_deny_list(
    clean_store: Store,
) -> None:
    store = clean_store
    base = datetime(2020, 1, 1, tzinfo=UTC)

    def add(path: str, days: int) -> int:
        return store.add_repository(path, created_at=base + timedelta(days=days))

    young, old, denied, too_new = (
        add("ok/young", 5),
        add("ok/old", 1),
        add("deny/x", 0),
        add("ok/new", 400),
    )
    same_a, same_b = add("ok/same-a", 3), add("ok/same-b", 3)
    abort_first, abort_second = add("ok/ab1", 10), add("ok/ab2", 11)
    for rid in (abort_first, abort_second):  # abort_first is aborted first
        assert _claim(store, rid, 1).ok
        assert _step(store, rid, State.PRE_IMPORTING, Event.ABORT_IMPORT, 1).ok
        time.sleep(0.01)
    busy = add("ok/busy", 0)
    assert _claim(store, busy, 1).ok  # active: never a candidate

    settings = store.update_settings(
        created_before=(base + timedelta(days=100)).isoformat(), root_namespace_deny_list="deny"
    )
    got = [r.id for r in store.candidates(settings, limit=10)]
    assert got == [abort_first, abort_second, old, same_a, same_b, young]
    # The enqueuer's one round trip reads the same, with the count of active ones (busy).
    for limit in (10, 3):
        in_flight, listed = store.in_flight_and_candidates(settings, limit=limit)
        assert (in_flight, listed) == (1, store.candidates(settings, limit=limit))
    # The metrics' eligible gauge counts exactly the candidates, uncapped.
    assert store.count_eligible(settings) == len(got)
    assert [r.id for r in store.candidates(settings, limit=3)] == [abort_first, abort_second, old]
    assert [r.id for r in store.candidates(settings, limit=1)] == [abort_first]
    no_rules = store.update_settings(created_before="none", root_namespace_deny_list="")
    got = [r.id for r in store.candidates(no_rules, limit=10)]
    assert got == [abort_first, abort_second, denied, old, same_a, same_b, young, too_new]
    assert store.count_eligible(no_rules) == len(got)
    only_cutoff = store.update_settings(created_before=(base + timedelta(days=100)).isoformat())
    assert store.count_eligible(only_cutoff) == len(store.candidates(only_cutoff, limit=10)) == 7

    # Each candidate carries its row's values: what a run orders, leases and claims by.
    listed = store.candidates(no_rules, limit=10)
    for candidate in listed:
        row = store.get(candidate.id)
        assert row is not None
        aborted = row.migration_state is State.IMPORT_ABORTED
        assert candidate == Candidate(
            id=row.id,
            migration_state=row.migration_state,
            migration_retries_count=row.migration_retries_count,
            migration_aborted_in_state=row.migration_aborted_in_state,
            fencing_token=row.fencing_token,
            path=row.path,
            order_at=row.migration_aborted_at if aborted else row.created_at,
        )
    first = listed[0]
    assert (first.id, first.migration_aborted_in_state) == (abort_first, State.PRE_IMPORTING)
    # ... and a claim given it (its transition computed from the candidate) writes the right row.
    claimed = store.claim(first.id, expected_state=first.migration_state,
                          event=Event.RETRY_PRE_IMPORT, token=2, actor=ACTOR,
                          message_id="m-seen", seen=first)  # fmt: skip
    assert claimed.ok and claimed.repository.migration_state is State.PRE_IMPORTING
    # A retry keeps the count its abort raised; the start is counted, the new token written.
    assert claimed.repository.migration_retries_count == first.migration_retries_count == 1
    assert claimed.repository.migration_pre_import_starts == 2
    assert claimed.repository.fencing_token == 2


def test_waiting_time_and_stale(clean_store: Store) -> None:
    store = clean_store
    rid = store.add_repository("wait/app")
    settings = store.update_settings(enqueue_waiting_time=30, max_step_duration=0.5)
    assert store.waiting_time_passed(settings)  # nothing finished yet
    assert _claim(store, rid, 1).ok
    assert store.waiting_time_passed(settings)  # a start is not a finished step
    assert _step(store, rid, State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT, 1).ok
    assert not store.waiting_time_passed(settings)
    assert store.waiting_time_passed(store.update_settings(enqueue_waiting_time=0))
    assert store.stale(settings) == []
    time.sleep(1.0)
    assert [r.id for r in store.stale(settings)] == [rid]
    assert store.waiting_time_passed(store.update_settings(enqueue_waiting_time=0.5))


def test_counts_by_state(clean_store: Store) -> None:
    store = clean_store
    ids = [store.add_repository(f"count/app-{i}") for i in range(3)]
    assert _claim(store, ids[0], 1).ok
    counts = store.counts_by_state()
    assert counts[State.DEFAULT] == 2 and counts[State.PRE_IMPORTING] == 1
    assert set(counts) == set(State) and sum(counts.values()) == 3


def test_seed_spread(clean_store: Store, database_url: str) -> None:
    store = clean_store
    seen: list[tuple[int, int]] = []
    assert (
        store.seed(5_000, rng_seed=7, batch_size=2_000, progress=lambda d, t: seen.append((d, t)))
        == 5_000
    )
    assert seen == [(2_000, 5_000), (4_000, 5_000), (5_000, 5_000)]
    assert store.seed(100, rng_seed=7) == 100  # seeding again adds more, no clash
    with psycopg.connect(database_url) as conn:
        roots, nested, small, large, old = conn.execute(
            "SELECT count(DISTINCT root_namespace),"
            " count(*) FILTER (WHERE path LIKE '%/%/%'),"
            " count(*) FILTER (WHERE tags_count < 50),"
            " count(*) FILTER (WHERE tags_count >= 500),"
            " count(*) FILTER (WHERE created_at < now() - interval '2 years')"
            " FROM container_repositories"
        ).fetchone()  # type: ignore[misc]
    assert roots >= 10 and nested > 1_000 and small > 4_000 and 10 <= large < 500 and old > 500
