"""``registry-migrator status --json`` reports what the database and etcd hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from leases import HolderInfo, take
from migration.config import Config
from migration.keys import repository_lease_key
from migration.states import Event, SkipReason, State
from migration.store import Store

CLI = str(Path(sys.executable).with_name("registry-migrator"))
DENIED = "denied-ns"


class _Tokens:
    """Fencing tokens for the writes (any increasing numbers do for a store-level test)."""

    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value += 1
        return self.value


def _claim(store: Store, rid: int, tokens: _Tokens) -> int:
    token = tokens.next()
    result = store.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT,
                         token=token, actor="test", message_id=None)  # fmt: skip
    assert result.ok, result.outcome
    return token


def _step(store: Store, rid: int, token: int, frm: State, event: Event, **kw: object) -> None:
    result = store.step(rid, expected_state=frm, event=event, token=token, actor="test",
                        message_id=None, **kw)  # type: ignore[arg-type]  # fmt: skip
    assert result.ok, result.outcome


@pytest.fixture
def populated(clean_store: Store) -> Store:
    """Repositories in every state, written through the store's real transitions."""
    store, tokens = clean_store, _Tokens()
    store.update_settings(capacity=7, root_namespace_deny_list=[DENIED])
    ids = {name: store.add_repository(f"acme/{name}") for name in (
        "done-1", "done-2", "done-3", "pre-1", "pre-2", "importing-1", "aborted-1",
        "skipped-tags", "skipped-missing", "ready-1", "ready-2", "ready-3")}  # fmt: skip
    for name in ("denied-1", "denied-2"):
        ids[name] = store.add_repository(f"{DENIED}/{name}")
    for name in ("done-1", "done-2", "done-3", "importing-1"):
        token = _claim(store, ids[name], tokens)
        _step(store, ids[name], token, State.PRE_IMPORTING, Event.FINISH_PRE_IMPORT)
        _step(store, ids[name], token, State.PRE_IMPORT_DONE, Event.START_IMPORT)
        if name.startswith("done"):
            _step(store, ids[name], token, State.IMPORTING, Event.FINISH_IMPORT)
    for name in ("pre-1", "pre-2"):
        _claim(store, ids[name], tokens)
    token = _claim(store, ids["aborted-1"], tokens)
    _step(store, ids["aborted-1"], token, State.PRE_IMPORTING, Event.ABORT_IMPORT,
          detail={"why": "registry: pre_import_failed"})  # fmt: skip
    _step(store, ids["skipped-tags"], tokens.next(), State.DEFAULT, Event.SKIP_IMPORT,
          skip_reason=SkipReason.TOO_MANY_TAGS)  # fmt: skip
    _step(store, ids["skipped-missing"], tokens.next(), State.DEFAULT, Event.SKIP_IMPORT,
          skip_reason=SkipReason.NOT_FOUND)  # fmt: skip
    return store


def _status_json(database_url: str, prefix: str) -> dict[str, object]:
    env = {**os.environ, "MIGRATOR_DATABASE_URL": database_url, "MIGRATOR_ETCD_PREFIX": prefix}
    done = subprocess.run([CLI, "status", "--json"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    document: dict[str, object] = json.loads(done.stdout)
    return document


def test_status_json_matches_the_database(populated: Store, database_url: str) -> None:
    prefix = f"/test-{uuid.uuid4().hex[:8]}"
    config = Config.from_env()
    with config.etcd_client() as client:
        held = take(client, repository_lease_key(prefix, 5), ttl=60,
                    holder=HolderInfo(actor="status-test"))  # fmt: skip
        assert held.hold is not None
        try:
            status = _status_json(database_url, prefix)
        finally:
            held.hold.release()

    with psycopg.connect(database_url) as conn:
        counts: dict[str, int] = dict(
            conn.execute(
                "SELECT migration_state, count(*) FROM container_repositories GROUP BY 1"
            ).fetchall()
        )
        done_last_minute = conn.execute(
            "SELECT count(*) FROM migration_events WHERE accepted AND to_state = 'import_done'"
            " AND at > now() - interval '1 minute'"
        ).fetchone()[0]  # type: ignore[index]
        oldest_active = conn.execute(
            "SELECT id FROM container_repositories"
            " WHERE migration_state IN ('pre_importing', 'pre_import_done', 'importing')"
            " ORDER BY last_step_at, id LIMIT 1"
        ).fetchone()[0]  # type: ignore[index]
        ends = [
            r[0]
            for r in conn.execute(
                "SELECT repository_id FROM migration_events WHERE accepted"
                " AND to_state IN ('import_aborted', 'import_skipped') ORDER BY id DESC"
            )
        ]
        skipped: dict[str, int] = dict(
            conn.execute(
                "SELECT migration_skipped_reason, count(*) FROM container_repositories"
                " WHERE migration_skipped_reason IS NOT NULL GROUP BY 1"
            ).fetchall()
        )
    # fmt: on
    expected_counts = {state.value: counts.get(state.value, 0) for state in State}
    assert status["counts"] == expected_counts
    assert expected_counts == {"default": 5, "pre_importing": 2, "pre_import_done": 0,
                               "importing": 1, "import_done": 3, "import_aborted": 1,
                               "import_skipped": 2}  # fmt: skip
    assert status["total"] == sum(counts.values()) == 14
    assert status["in_flight"] == 3
    assert status["capacity"] == 7
    assert status["terminal"] == 5
    assert status["skipped_by_reason"] == skipped
    assert status["excluded_by_deny_list"] == 2
    assert status["eligible_remaining"] == 14 - 5 - 2
    assert status["done"] is False
    assert done_last_minute == 3
    assert status["import_done_per_minute"] == {"1": 3.0, "5": 0.6, "15": 0.2}
    assert status["oldest_active"]["repository_id"] == oldest_active  # type: ignore[index]
    assert [e["repository_id"] for e in status["recent_ends"]] == ends  # type: ignore[attr-defined]
    reasons = {e["to_state"]: e["reason"] for e in status["recent_ends"]}  # type: ignore[attr-defined]
    assert reasons["import_aborted"] == "registry: pre_import_failed"
    settings = status["settings"]
    assert settings["capacity"] == 7 and settings["enabled"] is True  # type: ignore[index]
    assert settings["root_namespace_deny_list"] == [DENIED]  # type: ignore[index]
    assert status["leases_error"] is None
    leases = status["leases"]
    assert [lease["key"] for lease in leases] == [repository_lease_key(prefix, 5)]  # type: ignore[attr-defined]
    assert leases[0]["holder"]["actor"] == "status-test"  # type: ignore[index]


def test_status_table_and_unreachable_etcd(populated: Store, database_url: str) -> None:
    env = {**os.environ, "MIGRATOR_DATABASE_URL": database_url,
           "MIGRATOR_ETCD_ENDPOINTS": "127.0.0.1:1", "COLUMNS": "160"}  # fmt: skip
    done = subprocess.run([CLI, "status"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    # etcd down hides the leases, not the rest.
    assert done.returncode == 0, done.stderr
    assert "3 / 7" in done.stdout
    assert "etcd unreachable" in done.stdout
    assert "too_many_tags" in done.stdout


def test_status_without_schema_is_one_line(stack: dict[str, str]) -> None:
    env = {**os.environ, "MIGRATOR_DATABASE_URL": Config.from_env().database_url.rsplit("/", 1)[0]
           + "/postgres"}  # fmt: skip
    done = subprocess.run([CLI, "status", "--json"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "db upgrade" in done.stderr
