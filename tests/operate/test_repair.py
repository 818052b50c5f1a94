"""The operator's repair commands as a person runs them (subprocesses), against the real
PostgreSQL, etcd and RabbitMQ and the simulator: repositories abort|skip|retry|cancel,
guard, leases take --global. Each takes the lease, writes fenced, records actor operator."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.simulator import SimulatorConfig, SimulatorServer
from migration.registry import RegistryClient
from migration.states import Event, State
from migration.store import Store

CLI = str(Path(sys.executable).parent / "registry-migrator")
SLOW = SimulatorConfig(pre_import_seconds=(60, 60), import_seconds=(60, 60))


@pytest.fixture
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(SLOW) as server:
        yield server


@pytest.fixture
def env(stack: dict[str, str], database_url: str, simulator: SimulatorServer) -> dict[str, str]:
    return {
        **os.environ, **stack,
        "MIGRATOR_DATABASE_URL": database_url,
        "MIGRATOR_ETCD_PREFIX": f"/repair-{uuid.uuid4().hex[:8]}",
        "MIGRATOR_QUEUE_NAME": f"repair_{uuid.uuid4().hex[:8]}",
        "MIGRATOR_REGISTRY_URL": simulator.url,
        "MIGRATOR_LEASE_TTL": "2",
        "MIGRATOR_PROMETHEUS": "0",
    }  # fmt: skip


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def claimed(store: Store, path: str) -> int:
    rid = store.add_repository(path)
    assert store.claim(rid, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT,
                       token=1, actor="test", message_id=None).ok  # fmt: skip
    return rid


def last_event(database_url: str, rid: int) -> tuple[str, str, dict]:  # type: ignore[type-arg]
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT event, actor, detail FROM migration_events WHERE repository_id = %s"
            " AND accepted ORDER BY id DESC LIMIT 1",
            (rid,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_abort_and_skip(env: dict[str, str], clean_store: Store, database_url: str) -> None:
    rid = claimed(clean_store, "repair/stuck/app")
    dry = run(env, "repositories", "abort", "repair/stuck/app", "--dry-run")
    assert dry.returncode == 0 and "would abort" in dry.stdout
    assert clean_store.get(rid).migration_state is State.PRE_IMPORTING  # type: ignore[union-attr]
    done = run(env, "repositories", "abort", str(rid), "--why", "stuck")
    assert done.returncode == 0, done.stderr
    row = clean_store.get(rid)
    assert row is not None
    assert (row.migration_state, row.migration_retries_count) == (State.IMPORT_ABORTED, 1)
    event, actor, detail = last_event(database_url, rid)
    assert (event, actor, detail["cause"]) == ("abort_import", "operator", "operator")
    again = run(env, "repositories", "abort", str(rid))
    assert again.returncode == 2 and "only an active migration" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    bad = run(env, "repositories", "skip", str(rid), "--reason", "bored")
    assert bad.returncode == 2 and "not a skip reason" in bad.stderr
    skipped = run(env, "repositories", "skip", str(rid), "--reason", "migration_canceled")
    assert skipped.returncode == 0, skipped.stderr
    row = clean_store.get(rid)
    assert row is not None and row.migration_state is State.IMPORT_SKIPPED
    assert last_event(database_url, rid)[:2] == ("skip_import", "operator")
    unknown = run(env, "repositories", "skip", "no/such/repo", "--reason", "not_found")
    assert unknown.returncode == 2 and "no repository" in unknown.stderr


def test_retry_puts_it_first(env: dict[str, str], clean_store: Store, database_url: str) -> None:
    older, mine = claimed(clean_store, "repair/older/app"), claimed(clean_store, "repair/mine/app")
    for rid in (older, mine):
        assert clean_store.step(rid, expected_state=State.PRE_IMPORTING, event=Event.ABORT_IMPORT,
                                token=1, actor="test", message_id=None).ok  # fmt: skip
    assert [c.id for c in clean_store.candidates(clean_store.settings())][:2] == [older, mine]
    done = run(env, "repositories", "retry", "repair/mine/app")
    assert done.returncode == 0, done.stderr
    assert "first in line" in done.stdout
    assert [c.id for c in clean_store.candidates(clean_store.settings())][:2] == [mine, older]
    assert last_event(database_url, mine)[:2] == ("to_front", "operator")


def test_cancel_asks_the_registry_first(
    env: dict[str, str], clean_store: Store, simulator: SimulatorServer, database_url: str
) -> None:
    rid = claimed(clean_store, "repair/running/app")
    with RegistryClient(simulator.url) as registry:
        assert registry.start_pre_import("repair/running/app").started
    # The registry is unreachable: nothing is aborted.
    down = run({**env, "MIGRATOR_REGISTRY_URL": "http://127.0.0.1:1"}, "repositories",
               "cancel", str(rid))  # fmt: skip
    assert down.returncode == 1 and "nothing aborted" in down.stderr
    assert clean_store.get(rid).migration_state is State.PRE_IMPORTING  # type: ignore[union-attr]
    done = run(env, "repositories", "cancel", str(rid))
    assert done.returncode == 0, done.stderr
    assert clean_store.get(rid).migration_state is State.IMPORT_ABORTED  # type: ignore[union-attr]
    cancels = [e for e in simulator.report(events=True)["events"] if e.get("action") == "cancel"]
    assert len(cancels) == 1 and cancels[0]["answer"] == 202


def test_a_held_lease_is_named_and_nothing_changes(env: dict[str, str], clean_store: Store) -> None:
    rid = claimed(clean_store, "repair/held/app")
    took = run(env, "leases", "take", str(rid), "--ttl", "30")
    assert took.returncode == 0, took.stderr
    busy = run(env, "repositories", "abort", str(rid))
    assert busy.returncode == 1 and "held by" in busy.stderr and "leases take" in busy.stderr
    assert clean_store.get(rid).migration_state is State.PRE_IMPORTING  # type: ignore[union-attr]
    assert run(env, "leases", "release", str(rid)).returncode == 0


def test_guard_pass_now(env: dict[str, str], clean_store: Store, database_url: str) -> None:
    rid = claimed(clean_store, "repair/orphan/app")  # claimed, never started at the registry
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE container_repositories SET last_step_at = now() - interval '1 hour'")
    dry = run(env, "guard", "--dry-run")
    assert dry.returncode == 0 and "repair/orphan/app" in dry.stdout and "would" in dry.stdout
    assert clean_store.get(rid).migration_state is State.PRE_IMPORTING  # type: ignore[union-attr]
    done = run(env, "guard")
    assert done.returncode == 0, done.stderr
    # The registry never heard of it: the claim is undone, nothing charged.
    assert "pre_importing -> default [undone]" in done.stdout
    assert last_event(database_url, rid)[:2] == ("undo_claim", "operator")
    assert run(env, "guard").stdout.strip() == "no stale migration"


def test_take_the_global_lease(env: dict[str, str]) -> None:
    first = run(env, "leases", "take", "--global", "--ttl", "60")
    assert first.returncode == 0 and "container_registry_migration_enqueuer" in first.stdout
    second = run(env, "leases", "take", "--global", "--ttl", "60")
    assert second.returncode == 1 and "the global lease is busy" in second.stderr
    both = run(env, "leases", "take", "3", "--global")
    assert both.returncode == 2
