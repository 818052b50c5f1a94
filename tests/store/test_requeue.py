"""``Store.requeue`` and ``repositories requeue`` against a real PostgreSQL.

The repair after an incident: repositories skipped (or aborted) for a fault that was not
theirs go back to default with their retries reset, one ``requeue`` event each; nothing
else moves, and a dry run changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner, Result
from psycopg import sql
from psycopg.rows import dict_row

from migration.states import REQUEUE, Event, SkipReason, State
from migration.store import Store
from service.cli import main

NOW = datetime.now(UTC)
INCIDENT = NOW - timedelta(hours=1)  # the outage began an hour ago


@pytest.fixture(autouse=True, scope="module")
def _restore_structlog() -> Iterator[None]:
    # The commands quiet structlog when nothing configured it; undo that for other modules.
    yield
    structlog.reset_defaults()


_ARRIVAL = {
    State.IMPORT_SKIPPED: "migration_skipped_at",
    State.IMPORT_ABORTED: "migration_aborted_at",
    State.IMPORTING: "migration_import_started_at",
    State.IMPORT_DONE: "migration_import_done_at",
}
_SET_STATE = sql.SQL(
    "UPDATE container_repositories SET migration_state = %s, migration_skipped_reason = %s,"
    " migration_retries_count = %s, migration_aborted_in_state = %s, fencing_token = %s,"
    " last_step_at = %s, {arrival} = %s WHERE id = %s"
)


def _add(store: Store, database_url: str, path: str, state: State, *,
         reason: SkipReason | None = None, retries: int = 0, aborted_in: State | None = None,
         at: datetime = NOW, token: int = 0) -> int:  # fmt: skip
    """A repository put in ``state`` directly (as an incident left it), arrived ``at``."""
    rid = store.add_repository(path, created_at=NOW - timedelta(days=30), tags_count=3)
    if state in _ARRIVAL:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                _SET_STATE.format(arrival=sql.Identifier(_ARRIVAL[state])),
                (state.value, reason.value if reason else None, retries,
                 aborted_in.value if aborted_in else None, token, at, at, rid),
            )  # fmt: skip
    return rid


def _rows(database_url: str) -> dict[int, dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return {r["id"]: r for r in conn.execute("SELECT * FROM container_repositories")}


def _events(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM migration_events ORDER BY id").fetchall()


#: The table after a registry outage: (key, path, state, reason, retries, aborted in,
#: arrived, token). The three ``hit`` rows were skipped by the outage; the others must not move.
INCIDENT_ROWS = [
    ("hit-1", "acme/api/hit-1", State.IMPORT_SKIPPED, SkipReason.TOO_MANY_RETRIES, 3,
     State.PRE_IMPORTING, INCIDENT + timedelta(minutes=1), 41),
    ("hit-2", "acme/web/hit-2", State.IMPORT_SKIPPED, SkipReason.TOO_MANY_RETRIES, 3,
     State.IMPORTING, INCIDENT + timedelta(minutes=2), 42),
    ("hit-3", "other/app/hit-3", State.IMPORT_SKIPPED, SkipReason.TOO_MANY_RETRIES, 3,
     State.PRE_IMPORTING, INCIDENT + timedelta(minutes=3), 43),
    # skipped too_many_retries a week ago: a real failure, before the incident
    ("old", "acme/api/old", State.IMPORT_SKIPPED, SkipReason.TOO_MANY_RETRIES, 3,
     State.IMPORTING, NOW - timedelta(days=7), 7),
    ("missing", "acme/api/missing", State.IMPORT_SKIPPED, SkipReason.NOT_FOUND, 0,
     None, INCIDENT + timedelta(minutes=4), 44),
    ("aborted", "acme/api/aborted", State.IMPORT_ABORTED, None, 2,
     State.PRE_IMPORTING, INCIDENT + timedelta(minutes=5), 45),
    ("importing", "acme/api/importing", State.IMPORTING, None, 0, None, NOW, 46),
    ("done", "acme/api/done", State.IMPORT_DONE, None, 0, None, NOW, 47),
    ("waiting", "acme/api/waiting", State.DEFAULT, None, 0, None, NOW, 0),
]  # fmt: skip


@pytest.fixture
def incident(clean_store: Store, database_url: str) -> dict[str, int]:
    """:data:`INCIDENT_ROWS` in a clean database: key → repository id."""
    ids = {}
    for key, path, state, reason, retries, aborted_in, at, token in INCIDENT_ROWS:
        ids[key] = _add(clean_store, database_url, path, state, reason=reason, retries=retries,
                        aborted_in=aborted_in, at=at, token=token)  # fmt: skip
    return ids


def _assert_requeued(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["migration_state"] == "default"
    assert after["migration_retries_count"] == 0
    assert after["migration_skipped_reason"] is None
    assert after["migration_aborted_in_state"] is None
    assert after["fencing_token"] == before["fencing_token"]  # the next holder's is newer
    assert after["last_step_at"] > before["last_step_at"]
    # History stays: when it was skipped or aborted is still there, the events say the rest.
    assert after["migration_skipped_at"] == before["migration_skipped_at"]


def test_requeue_moves_the_matching_rows_and_records_one_event_each(
    clean_store: Store, database_url: str, incident: dict[str, int]
) -> None:
    before = _rows(database_url)
    moved = clean_store.requeue(state=State.IMPORT_SKIPPED, reason=SkipReason.TOO_MANY_RETRIES)
    expected = [incident[k] for k in ("old", "hit-1", "hit-2", "hit-3")]  # arrival order
    assert [r.id for r in moved] == expected
    assert all(r.migration_state is State.IMPORT_SKIPPED for r in moved)  # rows as they were
    after = _rows(database_url)
    for rid in expected:
        _assert_requeued(before[rid], after[rid])
    for rid in set(before) - set(expected):
        assert after[rid] == before[rid], f"repository {rid} moved"
    events = _events(database_url)
    assert [e["repository_id"] for e in events] == sorted(expected)
    for e in events:
        row = before[e["repository_id"]]
        assert (e["event"], e["actor"], e["accepted"]) == (REQUEUE, "operator", True)
        assert (e["from_state"], e["to_state"]) == ("import_skipped", "default")
        assert e["token"] == row["fencing_token"] and e["message_id"] is None
        assert e["detail"] == {"previous_state": "import_skipped",
                               "skipped_reason": "too_many_retries", "retries_count": 3,
                               "aborted_in_state": row["migration_aborted_in_state"]}  # fmt: skip
    # A second call finds nothing: requeue is not a loop.
    assert clean_store.requeue(state=State.IMPORT_SKIPPED, reason=SkipReason.TOO_MANY_RETRIES) == []


def test_a_requeued_repository_is_migrated_again(
    clean_store: Store, incident: dict[str, int]
) -> None:
    clean_store.requeue(state=State.IMPORT_SKIPPED, reason=SkipReason.TOO_MANY_RETRIES,
                        since=INCIDENT)  # fmt: skip
    candidates = {r.id for r in clean_store.candidates(clean_store.settings(), limit=20)}
    assert {incident["hit-1"], incident["hit-2"], incident["hit-3"]} <= candidates
    assert incident["old"] not in candidates
    claimed = clean_store.claim(incident["hit-1"], expected_state=State.DEFAULT,
                                event=Event.START_PRE_IMPORT, token=100, actor="test",
                                message_id="m-100")  # fmt: skip
    assert claimed.ok and claimed.repository.migration_state is State.PRE_IMPORTING
    assert claimed.repository.migration_retries_count == 0  # three fresh retries


def test_a_dry_run_changes_nothing(
    clean_store: Store, database_url: str, incident: dict[str, int]
) -> None:
    before, events = _rows(database_url), _events(database_url)
    would = clean_store.requeue(state=State.IMPORT_SKIPPED, reason=SkipReason.TOO_MANY_RETRIES,
                                since=INCIDENT, dry_run=True)  # fmt: skip
    assert [r.id for r in would] == [incident["hit-1"], incident["hit-2"], incident["hit-3"]]
    assert _rows(database_url) == before and _events(database_url) == events


@pytest.mark.parametrize(
    ("filters", "keys"),
    [
        ({"since": INCIDENT}, ["hit-1", "hit-2", "hit-3"]),
        ({"since": INCIDENT + timedelta(minutes=2)}, ["hit-2", "hit-3"]),
        ({"path_prefix": "acme/"}, ["old", "hit-1", "hit-2"]),
        ({"path_prefix": "acme/web/"}, ["hit-2"]),
        ({"path_prefix": "acme_"}, []),  # a prefix, not a LIKE pattern
        ({"limit": 2}, ["old", "hit-1"]),  # those skipped first
        ({"since": INCIDENT, "path_prefix": "acme/", "limit": 1}, ["hit-1"]),
    ],
    ids=["since", "since-later", "prefix", "prefix-narrow", "prefix-literal", "limit", "all"],
)
def test_filters(
    clean_store: Store, database_url: str, incident: dict[str, int],
    filters: dict[str, Any], keys: list[str],
) -> None:  # fmt: skip
    before = _rows(database_url)
    moved = clean_store.requeue(state=State.IMPORT_SKIPPED, reason=SkipReason.TOO_MANY_RETRIES,
                                **filters)  # fmt: skip
    assert [r.id for r in moved] == [incident[k] for k in keys]
    after = _rows(database_url)
    changed = {rid for rid in before if after[rid] != before[rid]}
    assert changed == {incident[k] for k in keys}
    assert len(_events(database_url)) == len(keys)


def test_requeue_from_import_aborted(
    clean_store: Store, database_url: str, incident: dict[str, int]
) -> None:
    before = _rows(database_url)
    moved = clean_store.requeue(state=State.IMPORT_ABORTED, since=INCIDENT)
    assert [r.id for r in moved] == [incident["aborted"]]
    after = _rows(database_url)[incident["aborted"]]
    assert (after["migration_state"], after["migration_retries_count"]) == ("default", 0)
    assert after["migration_aborted_in_state"] is None
    assert after["migration_aborted_at"] == before[incident["aborted"]]["migration_aborted_at"]
    (event,) = _events(database_url)
    assert event["detail"]["previous_state"] == "import_aborted"
    assert event["detail"]["retries_count"] == 2 and event["token"] == 45


def test_a_repository_skipped_through_the_store_is_requeued(clean_store: Store) -> None:
    # Not set by hand: three claims and aborts, as a registry outage used to charge them.
    rid = clean_store.add_repository("real/path/repo", created_at=NOW - timedelta(days=2))
    expected = State.DEFAULT
    for token in (1, 2, 3):
        event = Event.START_PRE_IMPORT if token == 1 else Event.RETRY_PRE_IMPORT
        assert clean_store.claim(rid, expected_state=expected, event=event, token=token,
                                 actor="test", message_id=None).ok  # fmt: skip
        aborted = clean_store.step(rid, expected_state=State.PRE_IMPORTING,
                                   event=Event.ABORT_IMPORT, token=token, actor="test",
                                   message_id=None)  # fmt: skip
        expected = aborted.repository.migration_state
    assert expected is State.IMPORT_SKIPPED
    (moved,) = clean_store.requeue(state=State.IMPORT_SKIPPED,
                                   reason=SkipReason.TOO_MANY_RETRIES)  # fmt: skip
    assert moved.id == rid and moved.migration_retries_count == 3
    row = clean_store.get(rid)
    assert row is not None and row.migration_state is State.DEFAULT
    assert row.migration_retries_count == 0 and row.migration_skipped_reason is None
    assert clean_store.events(rid)[-1].token == 3  # the row's token: the last holder's


@pytest.mark.parametrize("state", [State.PRE_IMPORTING, State.PRE_IMPORT_DONE, State.IMPORTING,
                                   State.IMPORT_DONE, State.DEFAULT])  # fmt: skip
def test_refuses_states_that_are_not_a_repair(
    clean_store: Store, database_url: str, incident: dict[str, int], state: State
) -> None:
    before = _rows(database_url)
    with pytest.raises(ValueError, match="cannot requeue"):
        clean_store.requeue(state=state)
    assert _rows(database_url) == before and _events(database_url) == []


def test_refuses_a_reason_with_import_aborted_and_a_naive_since(clean_store: Store) -> None:
    with pytest.raises(ValueError, match="import_skipped only"):
        clean_store.requeue(state=State.IMPORT_ABORTED, reason=SkipReason.TOO_MANY_RETRIES)
    with pytest.raises(ValueError, match="no UTC offset"):
        clean_store.requeue(state=State.IMPORT_ABORTED, since=datetime(2026, 1, 1))


# -- the command -------------------------------------------------------------------------


def _run(database_url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["repositories", "requeue", *args],
                              env={"MIGRATOR_DATABASE_URL": database_url})  # fmt: skip


SKIPPED = ("--state", "import_skipped", "--reason", "too_many_retries")


def test_command_dry_run_prints_a_table_and_a_count(
    database_url: str, incident: dict[str, int]
) -> None:
    before = _rows(database_url)
    result = _run(database_url, *SKIPPED, "--since", "90m", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["ID", "PATH", "STATE", "REASON", "RETRIES"]
    assert [int(line.split()[0]) for line in lines[1:-1]] == [
        incident["hit-1"], incident["hit-2"], incident["hit-3"]]  # fmt: skip
    assert lines[1].split()[1:5] == ["acme/api/hit-1", "import_skipped", "too_many_retries", "3"]
    assert lines[-1] == "would requeue 3 repositories (dry run: nothing changed)"
    assert _rows(database_url) == before


def test_command_requeues(database_url: str, incident: dict[str, int]) -> None:
    since = INCIDENT.isoformat()
    result = _run(database_url, *SKIPPED, "--since", since, "--path-prefix", "acme/")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == (
        "requeued 2 repositories to default (retries reset)")  # fmt: skip
    after = _rows(database_url)
    assert [after[incident[k]]["migration_state"] for k in ("hit-1", "hit-2", "hit-3", "old")] == [
        "default", "default", "import_skipped", "import_skipped"]  # fmt: skip
    assert {e["actor"] for e in _events(database_url)} == {"operator"}


def test_command_nothing_to_requeue(database_url: str, incident: dict[str, int]) -> None:
    result = _run(database_url, "--state", "import_skipped", "--reason", "too_many_tags")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "requeued 0 repositories to default (retries reset)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state", "importing"], "cannot requeue from importing (a worker may be stepping it)"),
        (["--state", "pre_importing"], "cannot requeue from pre_importing"),
        (["--state", "pre_import_done"], "cannot requeue from pre_import_done"),
        (["--state", "import_done"], "cannot requeue from import_done"),
        (["--state", "skipped"], "--state: expected one of import_aborted, import_skipped"),
        (["--state", "import_skipped"], "--reason is required with --state import_skipped"),
        ([*SKIPPED[:3], "too-many-retries"], "--reason: expected one of too_many_tags, "),
        (["--state", "import_aborted", "--reason", "not_found"], "--reason: only with"),
        ([*SKIPPED, "--since", "yesterday"], "--since: expected a duration ago"),
        ([*SKIPPED, "--since", "2h30"], "--since: expected a duration ago"),
        ([*SKIPPED, "--since", "2026-11-30T09:00:00"], "--since: '2026-11-30T09:00:00' has no UTC"),
    ],
)
def test_command_refuses_with_one_line(
    database_url: str, incident: dict[str, int], args: list[str], message: str
) -> None:
    before = _rows(database_url)
    result = _run(database_url, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("registry-migrator: "), result.stderr
    assert message in lines[0]
    assert _rows(database_url) == before and _events(database_url) == []
