"""Store behaviour that follows the reference (issue 12 §2), against a real PostgreSQL."""

from __future__ import annotations

import uuid

import psycopg
from psycopg import sql

from migration.states import Event, SkipReason, State
from migration.store import Store, schema_files
from tests.store.conftest import database_url_for

ACTOR = "test"


def _claim(store: Store, rid: int, token: int = 1) -> None:
    assert store.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT,
                       token=token, actor=ACTOR, message_id=None).ok  # fmt: skip


def test_an_active_row_without_a_last_step_is_stale_and_first(
    clean_store: Store, database_url: str
) -> None:
    store = clean_store
    old, imported = store.add_repository("g/old"), store.add_repository("g/imported")
    _claim(store, old)
    _claim(store, imported)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE container_repositories SET last_step_at = now() - interval '1 hour'"
                     " WHERE id = %s", (old,))  # fmt: skip
        # A row written outside the project (imported from GitLab's tables): no timestamp.
        conn.execute("UPDATE container_repositories SET last_step_at = NULL WHERE id = %s",
                     (imported,))  # fmt: skip
    store.update_settings(max_step_duration=60)
    assert [r.id for r in store.stale(store.settings())] == [imported, old]


def test_the_waiting_time_counts_finished_states_only(
    clean_store: Store, database_url: str
) -> None:
    store = clean_store
    store.update_settings(enqueue_waiting_time=600)
    rid = store.add_repository("g/one")
    assert store.waiting_time_passed(store.settings())  # nothing finished yet
    _claim(store, rid)
    assert store.step(rid, expected_state=State.PRE_IMPORTING, event=Event.FINISH_PRE_IMPORT,
                      token=1, actor=ACTOR, message_id=None).ok  # fmt: skip
    # pre_import_done just now: a finished step, the waiting time holds.
    assert not store.waiting_time_passed(store.settings())
    assert store.step(rid, expected_state=State.PRE_IMPORT_DONE, event=Event.START_IMPORT,
                      token=1, actor=ACTOR, message_id=None).ok  # fmt: skip
    # Now importing: its pre-import's end no longer counts (the reference's
    # recently_done_migration_step looks at finished states only).
    assert store.waiting_time_passed(store.settings())
    assert store.step(rid, expected_state=State.IMPORTING, event=Event.FINISH_IMPORT,
                      token=1, actor=ACTOR, message_id=None).ok  # fmt: skip
    assert not store.waiting_time_passed(store.settings())


def test_upgrade_moves_native_and_not_found_skips_to_done(database_url: str) -> None:
    name = f"test_0003_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    old_url = database_url_for(database_url, name)
    try:
        files = schema_files()
        before = [(v, text) for v, text in files if v < "0004"]
        with psycopg.connect(old_url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, text in before:
                conn.execute(text.encode())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            for path, reason in (("g/native", "native_import"), ("g/missing", "not_found"),
                                 ("g/many", "too_many_retries")):  # fmt: skip
                conn.execute(
                    "INSERT INTO container_repositories (path, migration_state,"
                    " migration_skipped_reason, migration_skipped_at)"
                    " VALUES (%s, 'import_skipped', %s, now())",
                    (path, reason),
                )
        with Store(old_url, max_size=2) as store:
            assert store.upgrade() == [v for v, _ in files if v >= "0004"]
            rows = {p: store.get_by_path(p) for p in ("g/native", "g/missing", "g/many")}
        native, missing, many = rows["g/native"], rows["g/missing"], rows["g/many"]
        assert native is not None and missing is not None and many is not None
        assert (native.migration_state, native.migration_skipped_reason) == (
            State.IMPORT_DONE, SkipReason.NATIVE_IMPORT,
        )  # fmt: skip
        assert native.migration_import_done_at is not None
        assert (missing.migration_state, missing.migration_skipped_reason) == (
            State.IMPORT_DONE, SkipReason.NOT_FOUND,
        )  # fmt: skip
        assert many.migration_state is State.IMPORT_SKIPPED
        # Only those two reasons may stand beside import_done.
        with psycopg.connect(old_url, autocommit=True) as conn:
            try:
                conn.execute("UPDATE container_repositories SET migration_state = 'import_done'"
                             " WHERE path = 'g/many'")  # fmt: skip
            except psycopg.errors.CheckViolation:
                pass
            else:
                raise AssertionError("import_done with too_many_retries was accepted")
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
