"""The store's hot queries read their partial indexes, even under a generic plan.

Each query is prepared and explained with ``plan_cache_mode = force_generic_plan``, the plan
a long-lived worker ends up with after psycopg's automatic prepare. 100,000 rows by default;
1,000,000 with ``--long`` (seeding that many takes 20-30 s on this machine).
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from psycopg import sql

from migration.settings import Settings
from migration.store import Store
from migration.store.sql import (
    COUNT_ACTIVE,
    SELECT_STALE,
    WAITING_TIME_PASSED_SQL,
    select_ordered,
)

# How long one of these queries may take here. They run in well under a millisecond; the
# margin is for a shared 2-core machine under load, and still far below any scan of the table.
MAX_MS = 50.0


def _prepare_data(store: Store, database_url: str, rows: int) -> Settings:
    store.seed(rows, rng_seed=11)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # A migration in progress: some done, some aborted, a few in flight.
        conn.execute(
            "UPDATE container_repositories SET migration_state = 'import_done',"
            " migration_import_done_at = now() - (id % 1000) * interval '1 minute'"
            " WHERE id % 7 = 0"
        )
        conn.execute(
            "UPDATE container_repositories SET migration_state = 'import_aborted',"
            " migration_aborted_at = now() - (id % 977) * interval '1 minute',"
            " migration_aborted_in_state = 'pre_importing', migration_retries_count = 1"
            " WHERE id % 101 = 0 AND id % 7 <> 0"
        )
        conn.execute(
            "UPDATE container_repositories SET migration_state = 'importing',"
            " last_step_at = now() - (id % 10) * interval '1 minute'"
            " WHERE id % 10007 = 1"
        )
        conn.execute("VACUUM (ANALYZE) container_repositories")
        biggest = conn.execute(
            "SELECT root_namespace FROM container_repositories GROUP BY 1 ORDER BY count(*) DESC"
            " LIMIT 1"
        ).fetchone()
    assert biggest is not None
    return store.update_settings(
        created_before="2030-01-01T00:00:00Z",
        root_namespace_deny_list=[biggest[0], "nothing-here"],
        enqueue_waiting_time=60,
        max_step_duration=120,
    )


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


def _explain_generic(
    conn: psycopg.Connection[Any], query: str, params: dict[str, tuple[str, object]]
) -> tuple[list[dict[str, Any]], float]:
    """Prepare ``query`` with typed $n parameters, explain-analyze a generic-plan execute."""
    text = query
    for i, name in enumerate(params, 1):
        text = text.replace(f"%({name})s", f"${i}")
    types = f"({', '.join(t for t, _ in params.values())})" if params else ""
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(f"PREPARE q {types} AS {text}".encode())
    try:
        args = sql.SQL(", ").join(sql.Literal(v) for _, v in params.values())
        call = sql.SQL("({})").format(args) if params else sql.SQL("")
        row = conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE q {}").format(call)
        ).fetchone()
    finally:
        conn.execute("DEALLOCATE q")
    assert row is not None
    document = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    top = document[0]
    return _nodes(top["Plan"]), float(top["Execution Time"])


def _check(nodes: list[dict[str, Any]], ms: float, index: str, what: str) -> None:
    scans = [(n["Node Type"], n.get("Index Name"), n.get("Relation Name")) for n in nodes]
    assert any(name == index for _, name, _ in scans), f"{what}: {index} not used: {scans}"
    assert not any(t == "Seq Scan" for t, _, _ in scans), f"{what}: sequential scan: {scans}"
    assert ms < MAX_MS, f"{what}: {ms:.2f} ms"


def _run_checks(store: Store, database_url: str, rows: int) -> dict[str, float]:
    settings = _prepare_data(store, database_url, rows)
    deny = list(settings.root_namespace_deny_list)
    timings: dict[str, float] = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        aborted = select_ordered(
            state="import_aborted",
            order=("migration_aborted_at", "id"),
            deny=True,
            cutoff=False,
            limit=5,
        ).as_string(conn)
        nodes, ms = _explain_generic(conn, aborted, {"deny": ("text[]", deny)})
        _check(nodes, ms, "container_repositories_aborted", "aborted candidates")
        timings["aborted"] = ms
        ready = select_ordered(
            state="default", order=("created_at", "id"), deny=True, cutoff=True, limit=5
        ).as_string(conn)
        nodes, ms = _explain_generic(
            conn,
            ready,
            {
                "cutoff": ("timestamptz", settings.created_before),
                "deny": ("text[]", deny),
            },
        )
        _check(nodes, ms, "container_repositories_ready", "ready candidates")
        timings["ready"] = ms
        nodes, ms = _explain_generic(conn, COUNT_ACTIVE, {})
        _check(nodes, ms, "container_repositories_active", "capacity count")
        timings["count_active"] = ms
        nodes, ms = _explain_generic(
            conn, SELECT_STALE, {"age": ("float8", 120.0), "limit": ("bigint", 100)}
        )
        _check(nodes, ms, "container_repositories_active", "stale")
        timings["stale"] = ms
        nodes, ms = _explain_generic(
            conn, WAITING_TIME_PASSED_SQL, {"now": ("timestamptz", None), "wait": ("float8", 60.0)}
        )
        _check(nodes, ms, "container_repositories_last_step_done", "waiting time")
        timings["waiting_time"] = ms
    # The store's own calls give the answers the plans were checked for.
    candidates = store.candidates(settings, limit=5)
    assert [r.migration_state.value for r in candidates] == ["import_aborted"] * 5
    assert all(store.get(c.id).root_namespace not in deny for c in candidates)  # type: ignore[union-attr]
    assert store.in_flight() == len(range(1, rows + 1, 10007))
    assert not store.waiting_time_passed(settings)  # the done ones finished minutes ago
    return timings


def test_partial_indexes_used_at_100k(clean_store: Store, database_url: str) -> None:
    timings = _run_checks(clean_store, database_url, 100_000)
    print("100k rows, ms:", {k: round(v, 3) for k, v in timings.items()})


@pytest.mark.slow
def test_partial_indexes_used_at_1m(clean_store: Store, database_url: str) -> None:
    timings = _run_checks(clean_store, database_url, 1_000_000)
    print("1M rows, ms:", {k: round(v, 3) for k, v in timings.items()})
