"""The read-only status queries of ``registry-migrator status`` and the demo.

Light on purpose: psycopg and the SQL text only (no pool, no logging), so that ``status
--json`` stays quick to start. The store's own :meth:`~migration.store.Store.waiting_time_passed`
uses the same query as the snapshot (:func:`waiting_time_passed_on`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from migration.settings import Settings
from migration.states import State
from migration.store.sql import ACTIVE_SQL, WAITING_TIME_PASSED_SQL


def waiting_time_passed_on(
    conn: psycopg.Connection[Any], settings: Settings, *, now: datetime | None = None
) -> bool:
    """True when ``enqueue_waiting_time`` has passed since the last finished step.

    A finished step is a pre-import done, an import done, an abort or a skip, of a
    repository still in that finished state (the reference's "last import step done at"
    of its recently_done_migration_step).

    :param now: the moment to judge at (None: the server's ``now()``).
    """
    if settings.enqueue_waiting_time <= 0:
        return True
    row = conn.execute(
        WAITING_TIME_PASSED_SQL, {"now": now, "wait": settings.enqueue_waiting_time}
    ).fetchone()
    return bool(row and row[0])


def migration_seconds(conn: psycopg.Connection[Any]) -> float | None:
    """Seconds from the first accepted write to the last one (the migration's own span)."""
    row = conn.execute(
        "SELECT extract(epoch FROM max(at) - min(at))::float8 FROM migration_events WHERE accepted"
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def read_snapshot(
    conn: psycopg.Connection[Any], *, recent: int, windows: tuple[int, ...]
) -> dict[str, Any]:
    """The database's part of a status snapshot, read on ``conn`` (call it in one
    REPEATABLE READ transaction, so every figure comes from the same moment).

    :param recent: how many of the latest aborts and skips to list.
    :param windows: the minutes of the throughput windows (accepted import_done writes).
    :returns: settings, now, counts by state, skipped and done by reason, denied and cut
        counts, done per window, the oldest active row, the recent ends, whether the
        waiting time has passed, and the rows backing off.
    """
    cur = conn.cursor(row_factory=dict_row)
    settings_row = cur.execute("SELECT * FROM migration_settings WHERE id = 1").fetchone()
    if settings_row is None:
        raise psycopg.errors.UndefinedTable("migration_settings row missing")
    settings = Settings.from_row(**settings_row)
    now = cur.execute("SELECT now() AS now").fetchone()["now"]  # type: ignore[index]
    counts = dict.fromkeys((s.value for s in State), 0)
    for row in cur.execute(
        "SELECT migration_state AS state, count(*) AS n FROM container_repositories GROUP BY 1"
    ):
        counts[row["state"]] = int(row["n"])
    skipped: dict[str, int] = {}
    done: dict[str, int] = {}
    for row in cur.execute(
        "SELECT migration_state AS state, migration_skipped_reason AS reason, count(*) AS n"
        " FROM container_repositories WHERE migration_skipped_reason IS NOT NULL"
        " GROUP BY 1, 2 ORDER BY 3 DESC"
    ):
        (skipped if row["state"] == State.IMPORT_SKIPPED else done)[row["reason"]] = int(row["n"])
    deny = list(settings.root_namespace_deny_list)
    excluded = cur.execute(
        "SELECT count(*) FILTER (WHERE root_namespace = ANY(%(deny)s::text[])) AS denied,"
        " count(*) FILTER (WHERE migration_state = 'default'"
        "   AND NOT root_namespace = ANY(%(deny)s::text[])"
        "   AND %(cutoff)s::timestamptz IS NOT NULL AND created_at >= %(cutoff)s) AS cut"
        " FROM container_repositories WHERE migration_state IN ('default', 'import_aborted')",
        {"deny": deny, "cutoff": settings.created_before},
    ).fetchone()
    assert excluded is not None
    # Accepted writes into import_done, per window. `at` is the writer's clock_timestamp();
    # the scan is bounded by the largest window.
    minutes = [int(m) for m in windows]  # literals in the text: integers only
    counted = ", ".join(
        f"count(*) FILTER (WHERE at > %(now)s - interval '{m} minutes') AS w{m}" for m in minutes
    )
    done_rows = cur.execute(
        f"SELECT {counted} FROM migration_events"  # noqa: S608 - constants only
        " WHERE accepted AND to_state = 'import_done'"
        f" AND at > %(now)s - interval '{max(minutes)} minutes'",
        {"now": now},
    ).fetchone()
    assert done_rows is not None
    oldest = cur.execute(
        "SELECT id, path, migration_state, last_step_at,"  # noqa: S608 - constants only
        " extract(epoch FROM %(now)s - last_step_at)::float8 AS age"
        f" FROM container_repositories WHERE migration_state IN {ACTIVE_SQL}"
        " ORDER BY last_step_at NULLS FIRST, id LIMIT 1",
        {"now": now},
    ).fetchone()
    ends = cur.execute(
        "SELECT e.repository_id, r.path, e.to_state, e.at,"
        " coalesce(CASE WHEN e.to_state = 'import_skipped' THEN r.migration_skipped_reason END,"
        "          e.detail->>'why') AS reason"
        " FROM migration_events e JOIN container_repositories r ON r.id = e.repository_id"
        " WHERE e.accepted AND e.to_state IN ('import_aborted', 'import_skipped')"
        " ORDER BY e.id DESC LIMIT %(recent)s",
        {"recent": recent},
    ).fetchall()
    backing_off = cur.execute(
        "SELECT id, path, migration_state, registry_failures, registry_not_before,"
        " registry_last_error, count(*) OVER () AS total FROM container_repositories"
        " WHERE registry_not_before > %(now)s ORDER BY registry_not_before LIMIT 10",
        {"now": now},
    ).fetchall()
    waited = waiting_time_passed_on(conn, settings, now=now)
    return {
        "settings": settings,
        "now": now,
        "counts": counts,
        "skipped": skipped,
        "done_by_reason": done,
        "denied": int(excluded["denied"]),
        "cut": int(excluded["cut"]),
        "done": {m: int(done_rows[f"w{m}"]) for m in minutes},
        "oldest": oldest,
        "ends": ends,
        "waited": waited,
        "backing_off": backing_off,
    }
